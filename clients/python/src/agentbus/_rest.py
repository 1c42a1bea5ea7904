"""The REST API of a project: history, inbox, agents, stats, publishing."""

from __future__ import annotations

from types import TracebackType
from typing import Any, AsyncIterator, Mapping, Sequence
from urllib.parse import quote

import httpx

from ._errors import AgentBusError, NoRecipient, RequestTimeout, error_body
from ._models import (
    AckResult,
    Agent,
    DeadLetter,
    HistoryPage,
    InboxPage,
    Message,
    MessageDetail,
    Project,
    RequestResult,
    _ts,
)
from ._urls import auth_headers, check_agent_id, check_project_id, http_base

_DEFAULT_TIMEOUT = 30.0


def _clean(params: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        else:
            out[key] = str(value)
    return out


def _error(response: httpx.Response) -> AgentBusError:
    body = error_body(response.content)
    if body is not None:
        return AgentBusError.from_body(body, status=response.status_code)
    text = response.text.strip()[:200] or response.reason_phrase
    return AgentBusError("http_error", f"HTTP {response.status_code}: {text}", status=response.status_code)


class RestClient:
    """The REST API of one project, over :mod:`httpx`.

    Every method raises :class:`AgentBusError` (with the broker's ``code`` and
    the HTTP ``status``) when the broker refuses the call. Use it as an async
    context manager, or call :meth:`aclose` when done.
    """

    def __init__(
        self,
        url: str,
        project_id: str,
        *,
        token: str | None = None,
        timeout: float = _DEFAULT_TIMEOUT,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = http_base(url)
        self.project_id = check_project_id(project_id)
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._headers = auth_headers(token)

    async def __aenter__(self) -> "RestClient":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def _path(self, suffix: str = "") -> str:
        return f"{self.base_url}/api/projects/{self.project_id}{suffix}"

    async def _call(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        ok: Sequence[int] = (200, 201),
        timeout: float | None = None,
    ) -> httpx.Response:
        kwargs: dict[str, Any] = {"headers": self._headers}
        if params:
            kwargs["params"] = _clean(params)
        if body is not None:
            kwargs["json"] = body
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise AgentBusError(
                "unreachable", f"no answer from the broker at {self.base_url}: {exc!r}"
            ) from exc
        if response.status_code not in ok:
            raise _error(response)
        return response

    # --- the project ---------------------------------------------------------

    async def project(self) -> Project:
        """``GET /api/projects/{id}``."""
        return Project.from_json((await self._call("GET", self._path())).json())

    # --- history -------------------------------------------------------------

    async def history(
        self,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int | None = None,
        type: str | None = None,
        sender: str | None = None,
        correlation_id: str | None = None,
        thread: str | None = None,
        q: str | None = None,
    ) -> HistoryPage:
        """One page of the project's history (``GET …/messages``).

        With ``after_seq``, the first ``limit`` messages after it; with only
        ``before_seq``, the ``limit`` just before it; with neither, the latest.
        """
        params = {
            "after_seq": after_seq,
            "before_seq": before_seq,
            "limit": limit,
            "type": type,
            "sender": sender,
            "correlation_id": correlation_id,
            "thread": thread,
            "q": q,
        }
        response = await self._call("GET", self._path("/messages"), params=params)
        return HistoryPage.from_json(response.json())

    async def iter_history(
        self,
        *,
        after_seq: int = 0,
        page_size: int = 500,
        type: str | None = None,
        sender: str | None = None,
        correlation_id: str | None = None,
        thread: str | None = None,
        q: str | None = None,
    ) -> AsyncIterator[Message]:
        """Every message after ``after_seq`` that matches, page by page, in seq order."""
        cursor = after_seq
        while True:
            page = await self.history(
                after_seq=cursor,
                limit=page_size,
                type=type,
                sender=sender,
                correlation_id=correlation_id,
                thread=thread,
                q=q,
            )
            for message in page.messages:
                yield message
            if not page.has_more or not page.messages:
                return
            cursor = page.messages[-1].seq

    async def message(self, message_id: str) -> MessageDetail:
        """One message with its delivery state (``GET …/messages/{message_id}``)."""
        data = (await self._call("GET", self._path(f"/messages/{message_id}"))).json()
        return MessageDetail(
            message=Message.from_json(data["message"]),
            owed_to=[str(a) for a in data.get("owed_to") or ()],
            replies=int(data.get("replies", 0)),
            dead_letter=data.get("dead_letter"),
        )

    async def mark_read(self, message_id: str, agent_id: str) -> bool:
        """A read receipt; ``True`` when it set the message's ``read_at``."""
        data = (
            await self._call(
                "POST",
                self._path(f"/messages/{message_id}/read"),
                body={"agent_id": check_agent_id(agent_id)},
            )
        ).json()
        return bool(data.get("marked"))

    # --- publishing ----------------------------------------------------------

    @staticmethod
    def _publish_body(
        content: str,
        sender_agent_id: str | None,
        sender_agent_type: str,
        fields: Mapping[str, Any],
    ) -> dict[str, Any]:
        if not isinstance(content, str):
            raise TypeError("content must be a string")
        body: dict[str, Any] = {"content": content, "sender_agent_type": sender_agent_type}
        if sender_agent_id is not None:
            body["sender_agent_id"] = sender_agent_id
        body.update({k: v for k, v in fields.items() if v is not None})
        return body

    async def publish(
        self,
        content: str,
        *,
        sender_agent_id: str | None,
        sender_agent_type: str = "agent",
        type: str | None = None,
        to: str | None = None,
        to_type: str | None = None,
        priority: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        ttl_ms: int | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        client_msg_id: str | None = None,
        success: bool | None = None,
        error: str | None = None,
    ) -> Message:
        """Publish a message without a WebSocket (``POST …/messages``).

        ``sender_agent_id`` may be ``None`` only with a token bound to an agent.
        """
        body = self._publish_body(
            content,
            sender_agent_id,
            sender_agent_type,
            {
                "type": type,
                "to": to,
                "to_type": to_type,
                "priority": priority,
                "metadata": dict(metadata) if metadata is not None else None,
                "ttl_ms": ttl_ms,
                "correlation_id": correlation_id,
                "reply_to": reply_to,
                "client_msg_id": client_msg_id,
                "success": success,
                "error": error,
            },
        )
        response = await self._call("POST", self._path("/messages"), body=body)
        return Message.from_json(response.json())

    async def request(
        self,
        content: str,
        *,
        sender_agent_id: str | None,
        sender_agent_type: str = "agent",
        to: str | None = None,
        to_type: str | None = None,
        type: str | None = None,
        timeout: float = 30.0,
        priority: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        client_msg_id: str | None = None,
    ) -> RequestResult:
        """sendAndWait over REST (``POST …/requests``): the request and its first reply.

        Raises :class:`RequestTimeout` (with the broker's timeout response) when
        nobody replied in time, :class:`NoRecipient` when nobody can receive it.
        """
        timeout_ms = max(1, round(timeout * 1000))
        body = self._publish_body(
            content,
            sender_agent_id,
            sender_agent_type,
            {
                "type": type,
                "to": to,
                "to_type": to_type,
                "timeout_ms": timeout_ms,
                "priority": priority,
                "metadata": dict(metadata) if metadata is not None else None,
                "correlation_id": correlation_id,
                "client_msg_id": client_msg_id,
            },
        )
        response = await self._call(
            "POST",
            self._path("/requests"),
            body=body,
            ok=(200, 422, 504),
            timeout=timeout + 30.0,
        )
        data = response.json()
        if response.status_code == 422:
            request = data.get("request") or {}
            raise NoRecipient(
                str(data.get("error", "nobody can receive the request")),
                request_id=request.get("id"),
                body=data,
                status=422,
            )
        result = RequestResult(
            request=Message.from_json(data["request"]),
            response=Message.from_json(data["response"]),
        )
        if response.status_code == 504:
            raise RequestTimeout(
                "no reply before the request's deadline",
                response=result.response,
                request_id=result.request.id,
            )
        return result

    # --- agents --------------------------------------------------------------

    async def agents(self, *, capability: str | None = None) -> list[Agent]:
        """The project's members (``GET …/agents``), sorted by agent id."""
        data = (
            await self._call("GET", self._path("/agents"), params={"capability": capability})
        ).json()
        return [Agent.from_json(a) for a in data.get("agents") or ()]

    async def join(
        self,
        agent_id: str | None,
        agent_type: str = "agent",
        *,
        capabilities: Sequence[str] | None = None,
        description: str | None = None,
    ) -> Agent:
        """Join the project without a socket (``POST …/agents``), or update a member."""
        body: dict[str, Any] = {"agent_type": agent_type}
        if agent_id is not None:
            body["agent_id"] = agent_id
        if capabilities is not None:
            body["capabilities"] = list(capabilities)
        if description is not None:
            body["description"] = description
        data = (await self._call("POST", self._path("/agents"), body=body)).json()
        return Agent.from_json(data["agent"])

    async def inbox(
        self,
        agent_id: str,
        *,
        limit: int | None = None,
        wait: float | None = None,
        ack: bool = False,
        urgent_only: bool = False,
        agent_type: str | None = None,
        after_priority: int | None = None,
        after_seq: int | None = None,
    ) -> InboxPage:
        """What ``agent_id`` is owed, in replay order (``GET …/agents/{agent_id}/inbox``).

        ``wait`` (seconds, at most 60) long-polls until something is owed;
        ``ack=True`` acknowledges exactly the messages returned.
        """
        wait_ms = None if wait is None else round(wait * 1000)
        params = {
            "limit": limit,
            "wait_ms": wait_ms,
            "ack": ack or None,
            "urgent_only": urgent_only or None,
            "agent_type": agent_type,
            "after_priority": after_priority,
            "after_seq": after_seq,
        }
        response = await self._call(
            "GET",
            self._path(f"/agents/{_segment(agent_id)}/inbox"),
            params=params,
            timeout=None if wait is None else wait + _DEFAULT_TIMEOUT,
        )
        return InboxPage.from_json(response.json())

    async def ack(
        self,
        agent_id: str,
        *,
        seqs: Sequence[int] | None = None,
        up_to: int | None = None,
    ) -> AckResult:
        """Acknowledge messages for ``agent_id`` (``POST …/agents/{agent_id}/ack``)."""
        if seqs is None and up_to is None:
            raise ValueError("give seqs, up_to, or both")
        body: dict[str, Any] = {}
        if seqs is not None:
            body["seqs"] = [int(s) for s in seqs]
        if up_to is not None:
            body["up_to"] = int(up_to)
        data = (
            await self._call("POST", self._path(f"/agents/{_segment(agent_id)}/ack"), body=body)
        ).json()
        return AckResult(
            agent_id=str(data.get("agent_id", agent_id)),
            ack_floor=int(data.get("ack_floor", 0)),
            ignored=[int(s) for s in data.get("ignored") or ()],
        )

    # --- counters and dead letters --------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """The project's counters (``GET …/stats``), as the broker reports them."""
        data = (await self._call("GET", self._path("/stats"))).json()
        return dict(data)

    async def dead_letters(self, *, limit: int | None = None) -> list[DeadLetter]:
        """Dead letters, newest first (``GET …/dead-letters``)."""
        data = (
            await self._call("GET", self._path("/dead-letters"), params={"limit": limit})
        ).json()
        return [
            DeadLetter(
                message=Message.from_json(d["message"]),
                reason=str(d.get("reason", "")),
                dead_at=_ts(d.get("dead_at")),
                retried_as=d.get("retried_as"),
            )
            for d in data.get("dead_letters") or ()
        ]

    async def retry_dead_letter(self, message_id: str) -> Message:
        """Send a dead letter again, as a new message (once)."""
        response = await self._call("POST", self._path(f"/dead-letters/{message_id}/retry"))
        return Message.from_json(response.json())


def _segment(value: str) -> str:
    return quote(check_agent_id(value), safe="")


async def create_project(
    url: str, name: str, *, token: str | None = None, timeout: float = _DEFAULT_TIMEOUT
) -> Project:
    """Create a project (``POST /api/projects``; the admin token on a broker that has one).

    The answer's ``token`` is the project's first token, shown this once.
    """
    async with httpx.AsyncClient(timeout=timeout) as http:
        try:
            response = await http.post(
                f"{http_base(url)}/api/projects", json={"name": name}, headers=auth_headers(token)
            )
        except httpx.TransportError as exc:
            raise AgentBusError("unreachable", f"no answer from the broker at {url}: {exc!r}") from exc
        if response.status_code != 201:
            raise _error(response)
        return Project.from_json(response.json())
