"""The read-only observer socket: every message of a project, live."""

from __future__ import annotations

import asyncio
import json
import logging
from types import TracebackType
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ._errors import AgentBusError, ClientClosed, TokenRevoked
from ._models import ConnectionState, Message, Welcome
from ._reconnect import Backoff, is_terminal, read_welcome, refusal
from ._urls import auth_headers, check_base_url, check_project_id, ws_url
from ._ws import Connection, open_connection

log = logging.getLogger("agentbus")


class Observer:
    """Every message committed in a project, in seq order, read-only.

    Made by :func:`observe`. Iterate it with ``async for``; close it with
    :meth:`aclose` (or use it as ``async with``). An observer is no member of
    the project: it has no cursor and is owed nothing. When its connection
    drops, it reconnects with ``since`` set to the last seq it handed out, so it
    misses nothing and repeats nothing. It gives up, raising from the
    iteration, when the broker refuses it for good (400, 401, 403, 404) or
    revokes its token (4003).
    """

    def __init__(
        self,
        url: str,
        project_id: str,
        *,
        since: int | None = None,
        token: str | None = None,
        reconnect: bool = True,
        backoff_initial: float = 0.25,
        backoff_max: float = 10.0,
        open_timeout: float = 10.0,
    ) -> None:
        self.base_url = check_base_url(url)
        self.project_id = check_project_id(project_id)
        if since is not None and (not isinstance(since, int) or since < 0):
            raise ValueError("since must be a seq, 0 or more")
        self._since = since
        self._headers = auth_headers(token)
        self._reconnect = reconnect
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._open_timeout = open_timeout
        self._ws: Connection | None = None
        self._closed = False
        self.state = ConnectionState.CONNECTING
        self.welcome: Welcome | None = None
        """The welcome of the current (or last) connection."""
        self.last_seq: int | None = since
        """The seq of the last message handed out (or the ``since`` given)."""
        self.reconnects = 0

    def __aiter__(self) -> "Observer":
        return self

    async def __aenter__(self) -> "Observer":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        self.state = ConnectionState.CLOSED
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def connect(self) -> Welcome:
        """Open the socket now (iterating opens it too) and return its welcome."""
        while True:
            welcome = await self._open()
            if welcome is not None:
                return welcome

    async def _open(self) -> Welcome | None:
        params: dict[str, str] = {}
        if self.last_seq is not None:
            params["since"] = str(self.last_seq)
        url = ws_url(self.base_url, self.project_id, params)
        try:
            ws = await open_connection(url, self._headers, self._open_timeout)
        except InvalidStatus as exc:
            error = refusal(exc)
            if is_terminal(error) or not self._reconnect:
                await self.aclose()
                raise error from None
            await self._pause(error)
            return None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            if not self._reconnect:
                await self.aclose()
                raise AgentBusError("unreachable", repr(exc)) from exc
            await self._pause(AgentBusError("unreachable", repr(exc)))
            return None
        try:
            welcome = await read_welcome(ws, self._open_timeout)
        except (ConnectionClosed, TimeoutError, ValueError, KeyError) as exc:
            await ws.close()
            await self._pause(AgentBusError("connection_lost", repr(exc)))
            return None
        if not welcome.observer:
            await ws.close()
            await self.aclose()
            raise AgentBusError(
                "not_observer", "the broker did not open an observer connection"
            )
        if self.welcome is not None:
            self.reconnects += 1
        self.welcome = welcome
        if self.last_seq is None:
            # From the head: a reconnect resumes after it.
            self.last_seq = welcome.head_seq
        self._ws = ws
        self.state = ConnectionState.CONNECTED
        return welcome

    async def _pause(self, error: AgentBusError) -> None:
        if self._closed:
            raise ClientClosed("the observer is closed")
        if not self._reconnect:
            await self.aclose()
            raise error
        self.state = ConnectionState.RECONNECTING
        delay = self._backoff.next()
        log.info("agentbus: observer connection failed (%s), again in %.2fs", error, delay)
        await asyncio.sleep(delay)

    async def __anext__(self) -> Message:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._ws is None:
                try:
                    await self.connect()
                except ClientClosed:
                    raise StopAsyncIteration from None
                continue
            ws = self._ws
            try:
                text = await ws.recv()
            except ConnectionClosed as exc:
                self._ws = None
                if self._closed:
                    raise StopAsyncIteration from None
                code = exc.rcvd.code if exc.rcvd is not None else 1006
                if code == 4003:
                    await self.aclose()
                    raise TokenRevoked(
                        "token_revoked", "the token of this observer was revoked", close_code=4003
                    ) from None
                if not self._reconnect:
                    await self.aclose()
                    raise AgentBusError("connection_lost", f"connection closed with {code}") from None
                self.state = ConnectionState.RECONNECTING
                self._backoff.reset()
                continue
            message = self._parse(text)
            if message is None:
                continue
            if self.last_seq is not None and message.seq <= self.last_seq:
                continue  # already handed out before a reconnect
            self.last_seq = message.seq
            self._backoff.reset()
            return message

    def _parse(self, text: Any) -> Message | None:
        if not isinstance(text, str):
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        if data.get("op") == "message":
            try:
                return Message.from_json(data)
            except ValueError as exc:
                log.warning("agentbus: observer ignoring a malformed message: %s", exc)
                return None
        if data.get("op") == "error":
            log.warning("agentbus: observer got an error frame: %s", AgentBusError.from_body(data))
        return None


def observe(
    url: str,
    project_id: str,
    since: int | None = None,
    token: str | None = None,
    *,
    reconnect: bool = True,
    backoff_initial: float = 0.25,
    backoff_max: float = 10.0,
    open_timeout: float = 10.0,
) -> Observer:
    """Watch a project: ``async for message in observe(url, project_id): ...``.

    Every message committed in the project (broadcasts and direct messages
    alike), in seq order: those after ``since`` first, when given, then each one
    as it commits. ``token`` is needed when the broker requires tokens (an
    unbound token of the project, or the admin token). With ``reconnect`` (the
    default) a lost connection is opened again with jittered exponential
    backoff between ``backoff_initial`` and ``backoff_max`` seconds, resuming
    after the last message handed out.
    """
    return Observer(
        url,
        project_id,
        since=since,
        token=token,
        reconnect=reconnect,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        open_timeout=open_timeout,
    )
