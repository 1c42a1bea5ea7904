"""Exceptions raised by the client.

Every error the broker reports carries its machine-readable ``code`` (see the
error codes of docs/PROTOCOL.md); errors the client raises on its own have codes
of their own, listed on each class.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from ._models import Message


class AgentBusError(Exception):
    """An error reported by the broker, or by the client about the broker.

    ``code`` is the broker's ``code`` (``invalid_field``, ``no_recipient``,
    ``not_found``, ``unauthorized``, ...). ``status`` is the HTTP status for
    REST calls and refused WebSocket upgrades, ``None`` for WebSocket error
    frames. ``body`` is the whole error frame or body as received.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        status: int | None = None,
        retry_after_ms: int | None = None,
        client_msg_id: str | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = status
        self.retry_after_ms = retry_after_ms
        self.client_msg_id = client_msg_id
        self.body: dict[str, Any] = dict(body or {})

    def __str__(self) -> str:
        parts = [f"[{self.code}] {self.message}"]
        if self.field:
            parts.append(f"(field {self.field!r})")
        if self.status is not None:
            parts.append(f"(HTTP {self.status})")
        return " ".join(parts)

    @classmethod
    def from_body(
        cls, body: Mapping[str, Any], *, status: int | None = None
    ) -> "AgentBusError":
        """Build the error from a WebSocket error frame or a REST error body."""
        code = body.get("code")
        text = body.get("error")
        retry = body.get("retry_after_ms")
        field = body.get("field")
        cmid = body.get("client_msg_id")
        return cls(
            code if isinstance(code, str) else "unknown",
            text if isinstance(text, str) else "the broker reported an error",
            field=field if isinstance(field, str) else None,
            status=status,
            retry_after_ms=retry if isinstance(retry, int) else None,
            client_msg_id=cmid if isinstance(cmid, str) else None,
            body=body,
        )


def error_body(content: bytes | bytearray) -> dict[str, Any] | None:
    """The broker's JSON error body in an HTTP answer, or ``None`` for anything else.

    REST calls and refused WebSocket upgrades carry the same body; a proxy in
    between may answer with something that is not one.
    """
    try:
        body = json.loads(content)
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return body
    return None


class ConnectionRefused(AgentBusError):
    """The broker refused the WebSocket upgrade (``status`` is its HTTP status).

    400, 401, 403 and 404 do not change by retrying, so the client gives up on
    them; 429 and 5xx are retried with backoff.
    """


class ConnectionEnded(AgentBusError):
    """The broker closed the connection for good; reconnecting would not help.

    ``close_code`` is the WebSocket close code.
    """

    def __init__(self, code: str, message: str, *, close_code: int) -> None:
        super().__init__(code, message)
        self.close_code = close_code


class Replaced(ConnectionEnded):
    """Close code 4001 (``code`` ``replaced``): another connection with the same
    ``agent_id`` took over. The client does not reconnect, so two processes
    sharing one identity do not take turns kicking each other out."""


class TokenRevoked(ConnectionEnded):
    """Close code 4003 (``code`` ``token_revoked``): the connection's token was
    revoked. A new token is needed."""


class ClientClosed(AgentBusError):
    """``code`` ``closed``: the client was closed before the operation finished."""

    def __init__(self, message: str = "the client is closed") -> None:
        super().__init__("closed", message)


class SendTimeout(AgentBusError):
    """``code`` ``send_timeout``: no receipt came within the send's timeout.

    The message may or may not have been stored. Sending again with the same
    ``client_msg_id`` (kept on this exception) is safe: the broker stores it at
    most once and answers with the original receipt if it had been stored.
    """


class RequestTimeout(AgentBusError):
    """``code`` ``timeout``: a request got no reply before its deadline.

    ``response`` is the broker's own timeout response (sender ``agentbus``,
    ``error`` ``"timeout"``), or ``None`` when the client gave up waiting for it
    (the broker was unreachable). ``request_id`` is the request's message id,
    when its receipt had come.
    """

    def __init__(
        self,
        message: str,
        *,
        response: "Message | None" = None,
        request_id: str | None = None,
        client_msg_id: str | None = None,
    ) -> None:
        super().__init__("timeout", message, client_msg_id=client_msg_id)
        self.response = response
        self.request_id = request_id


class NoRecipient(AgentBusError):
    """``code`` ``no_recipient``: nobody can receive the request.

    The broker stored it, dead-lettered it and closed it; no reply and no
    timeout will follow. ``request_id`` is the stored request's id.
    """

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        client_msg_id: str | None = None,
        body: Mapping[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(
            "no_recipient", message, client_msg_id=client_msg_id, body=body, status=status
        )
        self.request_id = request_id
