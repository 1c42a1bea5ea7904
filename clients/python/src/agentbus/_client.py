"""The asyncio agent client: one WebSocket connection, kept alive and resumed."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from types import TracebackType
from typing import (
    Any,
    Awaitable,
    Callable,
    Generator,
    Literal,
    Mapping,
    Sequence,
    TypeVar,
    overload,
)

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ._errors import (
    AgentBusError,
    ClientClosed,
    ConnectionEnded,
    ConnectionRefused,
    NoRecipient,
    Replaced,
    RequestTimeout,
    SendTimeout,
    TokenRevoked,
)
from ._models import ConnectionState, Message, Reply, SentReceipt, Welcome
from ._reconnect import Backoff, backoff, is_terminal, read_welcome, refusal
from ._rest import RestClient
from ._urls import auth_headers, check_agent_id, check_base_url, check_project_id, ws_url
from ._ws import Connection, open_connection

log = logging.getLogger("agentbus")

AckMode = Literal["auto", "manual"]
Handler = Callable[[Message], Any]
"""A message handler: a function (or coroutine function) taking a :class:`Message`.

For a request (``message.expects_reply``) its return value becomes the reply:
a :class:`Reply`, a ``str`` (the reply's content), any other JSON value (sent
as JSON text), or ``None`` for no automatic reply. An exception it raises is
sent as a failed reply (``success`` false, ``error`` the exception's text).
"""
H = TypeVar("H", bound=Handler)

# Sends refused for a passing reason: the same frame is sent again, with the
# same client_msg_id, after the broker's retry_after_ms or a short backoff.
_RETRYABLE = frozenset({"unavailable", "rate_limited", "overloaded"})
_CLOSED = object()
# A connection that lived this long resets the reconnect backoff.
_STABLE_AFTER_S = 5.0
_MAX_ERROR_TEXT = 4096


@dataclass(eq=False)
class _Conn:
    ws: Connection
    welcome: Welcome
    since: int | None
    delivered: set[int] = field(default_factory=set)
    ack_buf: list[int] = field(default_factory=list)
    ack_scheduled: bool = False
    replayed: int = 0


@dataclass(eq=False)
class _PendingSend:
    client_msg_id: str
    data: str
    future: asyncio.Future[SentReceipt]
    conn: _Conn | None = None
    retries: int = 0
    retry_handle: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _PendingRequest:
    future: asyncio.Future[Message]
    correlation_id: str
    client_msg_id: str
    request_id: str | None = None


def _reply_from(value: Any) -> Reply:
    if isinstance(value, Reply):
        return value
    if isinstance(value, str):
        return Reply(content=value)
    return Reply(content=json.dumps(value))


class AgentBus:
    """An agent's connection to one project of an agentbus broker.

    Create and connect it with ``async with AgentBus.connect(...) as bus`` (or
    ``bus = await AgentBus.connect(...)`` and later ``await bus.close()``).

    The client keeps one WebSocket open, reconnects with jittered exponential
    backoff when it drops, and resumes as the protocol allows: what the agent
    is owed is replayed by the broker, duplicates are dropped by seq, sends
    waiting for their receipt are sent again with the same ``client_msg_id``
    (so they are stored once). It gives up only when reconnecting cannot help:
    a takeover by another connection of the same agent (4001, :class:`Replaced`),
    a revoked token (4003, :class:`TokenRevoked`), or an upgrade refused with
    400, 401, 403 or 404 (:class:`ConnectionRefused`).

    Messages go to the handler registered for their type with :meth:`on` (or
    the ``"*"`` handler), else to ``async for message in bus`` / :meth:`receive`.
    In ``ack="manual"`` mode a message is acknowledged once its handler has
    finished (or, for iterated messages, once :meth:`ack` is called), so a
    message is never lost before it was processed.
    """

    def __init__(
        self,
        url: str,
        project_id: str,
        agent_id: str,
        *,
        agent_type: str = "agent",
        token: str | None = None,
        ack: AckMode = "auto",
        capabilities: Sequence[str] | None = None,
        description: str | None = None,
        since: int | None = None,
        reconnect: bool = True,
        backoff_initial: float = 0.25,
        backoff_max: float = 10.0,
        connect_timeout: float | None = 30.0,
        open_timeout: float = 10.0,
        send_timeout: float | None = 60.0,
        request_grace: float = 10.0,
        handler_concurrency: int = 1,
        max_frame_bytes: int = 262144,
        dedup_window: int = 100_000,
        on_warning: Callable[[AgentBusError], None] | None = None,
    ) -> None:
        self.base_url = check_base_url(url)
        self.project_id = check_project_id(project_id)
        self.agent_id = check_agent_id(agent_id)
        if not isinstance(agent_type, str) or not agent_type:
            raise ValueError("agent_type must be a non-empty string")
        if ack not in ("auto", "manual"):
            raise ValueError(f"ack must be 'auto' or 'manual', not {ack!r}")
        if since is not None and (not isinstance(since, int) or since < 0):
            raise ValueError("since must be a seq, 0 or more")
        if handler_concurrency < 1:
            raise ValueError("handler_concurrency must be at least 1")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if capabilities is not None and isinstance(capabilities, str):
            raise ValueError("capabilities must be a list of strings, not one string")
        self.agent_type = agent_type
        self.ack_mode: AckMode = ack
        self.capabilities = list(capabilities) if capabilities is not None else None
        self.description = description
        self._token = token
        self._headers = auth_headers(token)
        self._since_pending = since
        self._reconnect = reconnect
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._open_timeout = open_timeout
        self._send_timeout = send_timeout
        self._request_grace = request_grace
        self._handler_concurrency = handler_concurrency
        self._max_frame_bytes = max_frame_bytes
        self._dedup_window = dedup_window
        self._on_warning = on_warning

        self._state = ConnectionState.CONNECTING
        self._state_listeners: list[Callable[[ConnectionState], None]] = []
        self._state_waiters: list[tuple[ConnectionState, asyncio.Future[None]]] = []
        self._conn: _Conn | None = None
        self._welcome: Welcome | None = None
        self._error: AgentBusError | None = None
        self._closing = False
        self._sends_closed = False
        self._close_event: asyncio.Event | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._first_welcome: asyncio.Future[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._write_lock: asyncio.Lock | None = None

        self._pending: OrderedDict[str, _PendingSend] = OrderedDict()
        self._req_by_corr: dict[str, _PendingRequest] = {}
        self._req_by_id: dict[str, _PendingRequest] = {}
        self._req_by_cmid: dict[str, _PendingRequest] = {}
        # seq -> True once processed (done), False while its handler runs.
        self._seen: dict[int, bool] = {}
        self._handlers: dict[str, Handler] = {}
        self._inbox: asyncio.Queue[Message | object] | None = None
        self._dispatch: asyncio.Queue[Message] | None = None
        self._busy_handlers = 0
        self._idle: asyncio.Event | None = None
        self._rest: RestClient | None = None

        self.reconnects = 0
        """How many times the client connected again after losing a connection."""
        self.duplicates_dropped = 0
        """How many deliveries were dropped as repeats of a seq already received."""

    # --- construction ----------------------------------------------------------

    @classmethod
    def connect(
        cls,
        url: str,
        project_id: str,
        agent_id: str,
        *,
        agent_type: str = "agent",
        token: str | None = None,
        ack: AckMode = "auto",
        capabilities: Sequence[str] | None = None,
        description: str | None = None,
        since: int | None = None,
        reconnect: bool = True,
        backoff_initial: float = 0.25,
        backoff_max: float = 10.0,
        connect_timeout: float | None = 30.0,
        open_timeout: float = 10.0,
        send_timeout: float | None = 60.0,
        request_grace: float = 10.0,
        handler_concurrency: int = 1,
        max_frame_bytes: int = 262144,
        dedup_window: int = 100_000,
        on_warning: Callable[[AgentBusError], None] | None = None,
    ) -> "_Connecting":
        """Connect an agent; await it, or use it as ``async with``.

        Takes the arguments of :class:`AgentBus`. It returns once the first
        welcome has arrived, and raises :class:`ConnectionRefused` when the
        broker refuses the upgrade for good, or :class:`AgentBusError` (code
        ``unreachable``) when no connection was made within ``connect_timeout``.
        """
        return _Connecting(
            cls(
                url,
                project_id,
                agent_id,
                agent_type=agent_type,
                token=token,
                ack=ack,
                capabilities=capabilities,
                description=description,
                since=since,
                reconnect=reconnect,
                backoff_initial=backoff_initial,
                backoff_max=backoff_max,
                connect_timeout=connect_timeout,
                open_timeout=open_timeout,
                send_timeout=send_timeout,
                request_grace=request_grace,
                handler_concurrency=handler_concurrency,
                max_frame_bytes=max_frame_bytes,
                dedup_window=dedup_window,
                on_warning=on_warning,
            )
        )

    async def start(self) -> "AgentBus":
        """Open the connection (what :meth:`connect` does) and wait for its welcome."""
        if self._supervisor is not None:
            raise RuntimeError("this client was already started")
        loop = asyncio.get_running_loop()
        self._close_event = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._inbox = asyncio.Queue()
        self._dispatch = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._first_welcome = loop.create_future()
        for _ in range(self._handler_concurrency):
            self._workers.append(asyncio.create_task(self._worker()))
        self._supervisor = asyncio.create_task(self._supervise())
        try:
            await asyncio.shield(self._first_welcome)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> "AgentBus":
        if self._supervisor is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- state -----------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The connection's state (see :class:`ConnectionState`)."""
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is ConnectionState.CONNECTED

    @property
    def welcome(self) -> Welcome | None:
        """The welcome of the current (or last) connection."""
        return self._welcome

    @property
    def session_id(self) -> str | None:
        return self._welcome.session_id if self._welcome else None

    @property
    def error(self) -> AgentBusError | None:
        """Why the client closed, when the broker ended it (``None`` otherwise)."""
        return self._error

    @property
    def rest(self) -> RestClient:
        """A :class:`RestClient` for this project, with this client's token."""
        if self._rest is None:
            self._rest = RestClient(self.base_url, self.project_id, token=self._token)
        return self._rest

    def on_state_change(
        self, listener: Callable[[ConnectionState], None]
    ) -> Callable[[], None]:
        """Call ``listener(state)`` on every change of state; returns a function that removes it."""
        self._state_listeners.append(listener)

        def remove() -> None:
            if listener in self._state_listeners:
                self._state_listeners.remove(listener)

        return remove

    async def wait_for_state(
        self, state: ConnectionState, timeout: float | None = None
    ) -> None:
        """Wait until the client is in ``state`` (at once if it already is)."""
        if self._state is state:
            return
        if self._state is ConnectionState.CLOSED:
            raise self._error or ClientClosed()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (state, future)
        self._state_waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            if entry in self._state_waiters:
                self._state_waiters.remove(entry)

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state:
            return
        self._state = state
        for wanted, future in list(self._state_waiters):
            if future.done():
                continue
            if wanted is state:
                future.set_result(None)
            elif state is ConnectionState.CLOSED:
                future.set_exception(self._error or ClientClosed())
        for listener in list(self._state_listeners):
            try:
                listener(state)
            except Exception:
                log.exception("agentbus: a state listener raised")

    # --- handlers and receiving --------------------------------------------------

    @overload
    def on(self, message_type: str = "*", handler: None = None) -> Callable[[H], H]: ...

    @overload
    def on(self, message_type: str, handler: H) -> H: ...

    def on(self, message_type: str = "*", handler: H | None = None) -> H | Callable[[H], H]:
        """Register the handler of a message type (``"*"``: every type without its own).

        Use it as a decorator, ``@bus.on("task_assignment")``, or call it with
        the handler. A coroutine function runs on the event loop; a plain
        function runs in a worker thread. See :data:`Handler` for how its
        return value answers a request. Registering again replaces the handler.
        """
        if not isinstance(message_type, str) or not message_type:
            raise ValueError("message_type must be a non-empty string, or '*'")

        def register(fn: H) -> H:
            if not callable(fn):
                raise TypeError("a handler must be callable")
            self._handlers[str(message_type)] = fn
            return fn

        if handler is None:
            return register
        return register(handler)

    def off(self, message_type: str = "*") -> None:
        """Remove the handler of a message type."""
        self._handlers.pop(message_type, None)

    def __aiter__(self) -> "AgentBus":
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except ClientClosed:
            raise StopAsyncIteration from None

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message that no handler takes, in delivery order.

        Raises :class:`TimeoutError` after ``timeout`` seconds, and, once the
        client is closed and every received message was handed out,
        :class:`ClientClosed` (or the error that ended the connection).
        """
        if self._inbox is None:
            raise RuntimeError("the client is not started: use AgentBus.connect()")
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)  # wake every other reader too
            if self._error is not None:
                raise self._error
            raise ClientClosed()
        assert isinstance(item, Message)
        return item

    async def ack(self, message: Message | int) -> None:
        """Mark a message processed.

        In manual mode this acknowledges it to the broker (now if this
        connection delivered it, else when the broker delivers it again after
        a reconnect); messages handed to handlers and replies returned by
        :meth:`request` are acknowledged by the client itself. In auto mode it
        does nothing: the connection's pong confirmed the message already.
        """
        seq = message.seq if isinstance(message, Message) else int(message)
        self._finish(seq)

    # --- sending -------------------------------------------------------------------

    async def send(
        self,
        content: str,
        *,
        to: str | None = None,
        to_type: str | None = None,
        type: str | None = None,
        priority: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        ttl_ms: int | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        success: bool | None = None,
        error: str | None = None,
        agent_type: str | None = None,
        client_msg_id: str | None = None,
        timeout: float | None = None,
    ) -> SentReceipt:
        """Send a message and return the broker's receipt, once it is committed.

        With neither ``to`` (an agent id) nor ``to_type`` (an agent type) it is
        a broadcast. ``client_msg_id`` defaults to a new UUID; the send is
        retried with it across reconnects and passing refusals (``unavailable``,
        ``rate_limited``, ``overloaded``), so it is stored once. A refusal is
        raised as :class:`AgentBusError` with the broker's ``code``;
        :class:`SendTimeout` after ``timeout`` seconds without a receipt
        (``None``: the client's ``send_timeout``; ``math.inf``: no limit).
        """
        frame = self._send_frame(
            content,
            to=to,
            to_type=to_type,
            type=type,
            priority=priority,
            metadata=metadata,
            ttl_ms=ttl_ms,
            correlation_id=correlation_id,
            reply_to=reply_to,
            success=success,
            error=error,
            agent_type=agent_type,
        )
        return await self._send(frame, client_msg_id, timeout)

    async def request(
        self,
        content: str,
        *,
        to: str | None = None,
        to_type: str | None = None,
        type: str = "request",
        timeout: float = 30.0,
        priority: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        ttl_ms: int | None = None,
        correlation_id: str | None = None,
        agent_type: str | None = None,
        client_msg_id: str | None = None,
    ) -> Message:
        """Send a request and return its first reply (sendAndWait).

        ``timeout`` (seconds) is the request's deadline at the broker. Raises
        :class:`RequestTimeout` when the broker's timeout response comes first
        (or nothing came ``request_grace`` seconds after the deadline),
        :class:`NoRecipient` when nobody can receive the request, and
        :class:`AgentBusError` when the broker refuses it. A reply with
        ``success`` false is returned, not raised: check ``reply.success``.
        """
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86_400:
            raise ValueError("timeout must be more than 0 and at most 86400 seconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + self._request_grace
        corr = correlation_id or str(uuid.uuid4())
        cmid = client_msg_id or uuid.uuid4().hex
        frame = self._send_frame(
            content,
            to=to,
            to_type=to_type,
            type=type,
            priority=priority,
            metadata=metadata,
            ttl_ms=ttl_ms,
            correlation_id=corr,
            agent_type=agent_type,
        )
        frame["expects_reply"] = True
        frame["timeout_ms"] = max(1, round(timeout * 1000))
        pending = _PendingRequest(loop.create_future(), corr, cmid)
        self._req_by_corr[corr] = pending
        self._req_by_cmid[cmid] = pending
        try:
            try:
                receipt = await self._send(frame, cmid, max(0.0, deadline - loop.time()))
            except SendTimeout:
                raise RequestTimeout(
                    "the request was not confirmed before its deadline", client_msg_id=cmid
                ) from None
            pending.request_id = receipt.id
            self._req_by_id[receipt.id] = pending
            try:
                reply = await asyncio.wait_for(
                    asyncio.shield(pending.future), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                raise RequestTimeout(
                    "no reply, and no timeout response from the broker, in time",
                    request_id=receipt.id,
                    client_msg_id=cmid,
                ) from None
        finally:
            self._req_by_corr.pop(corr, None)
            self._req_by_cmid.pop(cmid, None)
            if pending.request_id is not None:
                self._req_by_id.pop(pending.request_id, None)
        if reply.is_broker_timeout:
            raise RequestTimeout(
                "no reply before the request's deadline",
                response=reply,
                request_id=pending.request_id,
                client_msg_id=cmid,
            )
        return reply

    async def reply(
        self,
        message: Message,
        content: str,
        *,
        success: bool | None = True,
        error: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        type: str = "response",
        priority: int | None = None,
    ) -> SentReceipt:
        """Reply to a message; the broker routes a reply to a request to its sender."""
        to = None if message.expects_reply else message.sender_agent_id
        return await self.send(
            content,
            to=to,
            reply_to=message.id,
            success=success,
            error=error,
            metadata=metadata,
            type=type,
            priority=priority,
        )

    def _send_frame(
        self,
        content: str,
        *,
        to: str | None = None,
        to_type: str | None = None,
        type: str | None = None,
        priority: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        ttl_ms: int | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        success: bool | None = None,
        error: str | None = None,
        agent_type: str | None = None,
    ) -> dict[str, Any]:
        if not isinstance(content, str):
            raise TypeError(f"content must be a string, not {content.__class__.__name__}")
        if to is not None and to_type is not None:
            raise ValueError("give to (an agent) or to_type (a type), not both")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError("metadata must be a mapping (a JSON object)")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            raise TypeError("priority must be an integer, 0 (critical) to 3 (low)")
        frame: dict[str, Any] = {"content": content}
        optional: dict[str, Any] = {
            "to": to,
            "to_type": to_type,
            "type": None if type is None else str(type),
            "priority": None if priority is None else int(priority),
            "metadata": dict(metadata) if metadata is not None else None,
            "ttl_ms": ttl_ms,
            "correlation_id": correlation_id,
            "reply_to": reply_to,
            "success": success,
            "error": error,
            "agent_type": agent_type,
        }
        frame.update({k: v for k, v in optional.items() if v is not None})
        return frame

    async def _send(
        self, frame: dict[str, Any], client_msg_id: str | None, timeout: float | None
    ) -> SentReceipt:
        if self._supervisor is None:
            raise RuntimeError("the client is not started: use AgentBus.connect()")
        if self._sends_closed or self._state is ConnectionState.CLOSED:
            raise self._error or ClientClosed()
        cmid = client_msg_id or uuid.uuid4().hex
        if not isinstance(cmid, str) or not 1 <= len(cmid) <= 64:
            raise ValueError("client_msg_id must be 1 to 64 characters")
        existing = self._pending.get(cmid)
        if existing is None:
            frame["client_msg_id"] = cmid
            data = json.dumps(frame, ensure_ascii=False)
            size = len(data.encode("utf-8"))
            if size > self._max_frame_bytes:
                raise AgentBusError(
                    "frame_too_large",
                    f"this send is {size} bytes of JSON, over the {self._max_frame_bytes} "
                    "a frame may have (max_frame_bytes): make content or metadata smaller",
                    client_msg_id=cmid,
                )
            future: asyncio.Future[SentReceipt] = asyncio.get_running_loop().create_future()
            entry = _PendingSend(cmid, data, future)
            self._pending[cmid] = entry
            await self._write_send(entry)
        else:
            entry = existing
        wait = self._send_timeout if timeout is None else timeout
        if wait is not None and math.isinf(wait):
            wait = None
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), wait)
        except TimeoutError:
            if self._pending.get(cmid) is entry:
                del self._pending[cmid]
                if entry.retry_handle is not None:
                    entry.retry_handle.cancel()
            raise SendTimeout(
                "send_timeout",
                f"no receipt within {wait} s; the message may or may not be stored: "
                "send it again with the same client_msg_id to find out",
                client_msg_id=cmid,
            ) from None

    async def _write_send(self, entry: _PendingSend) -> None:
        assert self._write_lock is not None
        async with self._write_lock:
            conn = self._conn
            if conn is None or entry.conn is conn or entry.future.done():
                return
            if self._pending.get(entry.client_msg_id) is not entry:
                return
            entry.conn = conn
            try:
                await conn.ws.send(entry.data)
            except ConnectionClosed:
                pass  # sent again on the next connection

    async def _resend_pending(self, conn: _Conn) -> None:
        for entry in list(self._pending.values()):
            if self._conn is not conn:
                return
            if entry.retry_handle is not None:
                entry.retry_handle.cancel()
                entry.retry_handle = None
            await self._write_send(entry)

    def _schedule_retry(self, entry: _PendingSend, error: AgentBusError) -> None:
        if error.retry_after_ms is not None:
            delay = error.retry_after_ms / 1000
        else:
            delay = backoff(entry.retries, 0.1, 5.0)
        entry.retries += 1
        entry.conn = None
        log.debug("agentbus: send %s refused (%s), retrying in %.2fs", entry.client_msg_id, error.code, delay)

        def fire() -> None:
            entry.retry_handle = None
            self._spawn(self._write_send(entry))

        entry.retry_handle = asyncio.get_running_loop().call_later(delay, fire)

    # --- the connection ----------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _url(self) -> str:
        params: dict[str, str] = {
            "agent_id": self.agent_id,
            "agent_type": self.agent_type,
            "ack": self.ack_mode,
        }
        if self.capabilities is not None:
            params["capabilities"] = ",".join(self.capabilities)
        if self._since_pending is not None:
            params["since"] = str(self._since_pending)
        return ws_url(self.base_url, self.project_id, params)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._close_event is not None and self._first_welcome is not None
        started = loop.time()
        delays = Backoff(self._backoff_initial, self._backoff_max)
        ever_connected = False
        last_error: AgentBusError | None = None
        try:
            while not self._closing:
                opened_at = loop.time()
                try:
                    connected, last_error = await self._run_connection()
                except ConnectionEnded as exc:
                    self._end(exc)
                    return
                except ConnectionRefused as exc:
                    self._end(exc)
                    return
                if self._closing:
                    break
                if connected:
                    ever_connected = True
                    if loop.time() - opened_at >= _STABLE_AFTER_S:
                        delays.reset()
                if not self._reconnect and ever_connected:
                    self._end(AgentBusError("connection_lost", "the connection was lost"))
                    return
                if not ever_connected and self._connect_timeout is not None:
                    if loop.time() - started >= self._connect_timeout:
                        detail = f": {last_error.message}" if last_error else ""
                        self._end(
                            AgentBusError(
                                "unreachable",
                                f"could not connect to {self.base_url} within "
                                f"{self._connect_timeout} s{detail}",
                            )
                        )
                        return
                self._set_state(
                    ConnectionState.RECONNECTING if ever_connected else ConnectionState.CONNECTING
                )
                try:
                    await asyncio.wait_for(self._close_event.wait(), delays.next())
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave callers hanging
            log.exception("agentbus: the connection supervisor failed")
            self._end(AgentBusError("internal", f"the client failed: {exc!r}"))

    async def _run_connection(self) -> tuple[bool, AgentBusError | None]:
        """One connection, from the upgrade to its end.

        Returns (whether it got a welcome, the error that ended it); raises
        ConnectionEnded / ConnectionRefused when reconnecting cannot help.
        """
        since = self._since_pending
        try:
            ws = await open_connection(self._url(), self._headers, self._open_timeout)
        except InvalidStatus as exc:
            error = refusal(exc)
            log.info("agentbus: connection refused: %s", error)
            if is_terminal(error):
                raise error from None
            return False, error
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            log.info("agentbus: cannot connect to %s: %r", self.base_url, exc)
            return False, AgentBusError("unreachable", repr(exc))
        try:
            try:
                welcome = await read_welcome(ws, self._open_timeout)
            except (TimeoutError, ValueError, KeyError, TypeError) as exc:
                log.warning("agentbus: bad start of connection: %r", exc)
                return False, AgentBusError("bad_welcome", repr(exc))
            except ConnectionClosed as exc:
                return False, self._closed_error(exc) or AgentBusError("connection_lost", repr(exc))
            conn = _Conn(ws, welcome, since)
            self._on_welcome(conn)
            try:
                async for text in ws:
                    if isinstance(text, str):
                        self._on_frame(conn, text)
            except ConnectionClosed:
                pass
            ended = self._closed_error_from(ws.close_code, ws.close_reason)
            if isinstance(ended, ConnectionEnded):
                raise ended
            return True, ended
        finally:
            if self._conn is not None and self._conn.ws is ws:
                self._conn = None
            await ws.close()

    def _closed_error(self, exc: ConnectionClosed) -> AgentBusError | None:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        error = self._closed_error_from(code, reason)
        if isinstance(error, ConnectionEnded):
            raise error
        return error

    def _closed_error_from(self, code: int | None, reason: str | None) -> AgentBusError | None:
        if code == 4001:
            return Replaced(
                "replaced",
                reason or "replaced by a newer connection of this agent",
                close_code=4001,
            )
        if code == 4003:
            return TokenRevoked(
                "token_revoked", reason or "the token of this connection was revoked", close_code=4003
            )
        if self._closing:
            return None
        log.info("agentbus: connection closed (%s %s), reconnecting", code, reason or "")
        return AgentBusError("connection_lost", f"connection closed with {code} {reason or ''}".strip())

    def _on_welcome(self, conn: _Conn) -> None:
        welcome = conn.welcome
        if self._welcome is not None:
            self.reconnects += 1
        self._welcome = welcome
        self._conn = conn
        floor = conn.since if conn.since is not None else welcome.ack_floor
        self._prune_seen(floor)
        if conn.since is not None and welcome.replay == 0:
            self._since_pending = None
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_result(None)
        self._set_state(ConnectionState.CONNECTED)
        if self.description is not None:
            hello = {
                "op": "hello",
                "capabilities": self.capabilities or [],
                "description": self.description,
            }
            self._spawn(self._write(conn, hello))
        self._spawn(self._resend_pending(conn))

    async def _write(self, conn: _Conn, frame: Mapping[str, Any]) -> None:
        if self._conn is not conn:
            return
        try:
            await conn.ws.send(json.dumps(frame))
        except ConnectionClosed:
            pass

    def _end(self, error: AgentBusError) -> None:
        """The broker ended the client for good."""
        log.warning("agentbus: giving up on the connection: %s", error)
        self._error = error
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_exception(error)
        self._fail_all(error)
        self._set_state(ConnectionState.CLOSED)
        if self._inbox is not None:
            self._inbox.put_nowait(_CLOSED)
        if self._close_task is None:
            self._closing = True
            if self._close_event is not None:
                self._close_event.set()

    def _fail_all(self, error: AgentBusError) -> None:
        for entry in self._pending.values():
            if entry.retry_handle is not None:
                entry.retry_handle.cancel()
            if not entry.future.done():
                entry.future.set_exception(error)
                entry.future.exception()  # mark retrieved: the caller may be gone
        self._pending.clear()
        for pending in list(self._req_by_corr.values()):
            if not pending.future.done():
                pending.future.set_exception(error)
                pending.future.exception()

    # --- frames from the broker ------------------------------------------------------

    def _on_frame(self, conn: _Conn, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            log.warning("agentbus: the broker sent text that is not JSON: %.200s", text)
            return
        if not isinstance(data, dict):
            return
        op = data.get("op")
        try:
            if op == "message":
                self._on_message(conn, Message.from_json(data))
            elif op == "sent":
                self._on_sent(data)
            elif op == "error":
                self._on_error(data)
            else:
                log.debug("agentbus: ignoring frame with op %r", op)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("agentbus: ignoring a malformed frame: %r", exc)

    def _on_sent(self, data: dict[str, Any]) -> None:
        receipt = SentReceipt.from_json(data)
        cmid = receipt.client_msg_id
        if cmid is None:
            return
        entry = self._pending.pop(cmid, None)
        if entry is None:
            return
        if entry.retry_handle is not None:
            entry.retry_handle.cancel()
        if not entry.future.done():
            entry.future.set_result(receipt)

    def _on_error(self, data: dict[str, Any]) -> None:
        error = AgentBusError.from_body(data)
        cmid = error.client_msg_id
        if error.code == "no_recipient":
            pending = self._req_by_cmid.get(cmid) if cmid else None
            if pending is not None:
                if not pending.future.done():
                    pending.future.set_exception(
                        NoRecipient(
                            error.message,
                            request_id=pending.request_id,
                            client_msg_id=cmid,
                            body=data,
                        )
                    )
                return
            self._warn(error)
            return
        entry = self._pending.get(cmid) if cmid else None
        if entry is None:
            if error.code == "ack_ignored":
                log.debug("agentbus: broker ignored acks %s", data.get("seqs"))
            else:
                self._warn(error)
            return
        if error.code in _RETRYABLE:
            self._schedule_retry(entry, error)
            return
        del self._pending[entry.client_msg_id]
        if not entry.future.done():
            entry.future.set_exception(error)

    def _warn(self, error: AgentBusError) -> None:
        log.warning("agentbus: %s", error)
        if self._on_warning is not None:
            try:
                self._on_warning(error)
            except Exception:
                log.exception("agentbus: on_warning raised")

    def _on_message(self, conn: _Conn, message: Message) -> None:
        seq = message.seq
        welcome = conn.welcome
        if conn.since is not None and self._since_pending is not None:
            if seq > welcome.head_seq:
                self._since_pending = None
            else:
                conn.replayed += 1
                if conn.replayed >= welcome.replay:
                    self._since_pending = None
        manual = self.ack_mode == "manual"
        done = self._seen.get(seq)
        if done is not None:
            self.duplicates_dropped += 1
            if manual:
                conn.delivered.add(seq)
                if done:
                    self._queue_ack(conn, seq)
            return
        self._remember(seq, done=not manual)
        if manual:
            conn.delivered.add(seq)
        if self._resolve_reply(message):
            self._finish(seq)
            return
        if self._closing and manual:
            # Not handed out: unacknowledged, it is delivered again next time.
            self._seen.pop(seq, None)
            conn.delivered.discard(seq)
            return
        if self._handler_for(message.message_type) is not None:
            assert self._dispatch is not None and self._idle is not None
            self._idle.clear()
            self._dispatch.put_nowait(message)
        else:
            assert self._inbox is not None
            self._inbox.put_nowait(message)

    def _resolve_reply(self, message: Message) -> bool:
        if message.in_reply_to_seq is None:
            return False
        pending = self._req_by_id.get(message.reply_to) if message.reply_to else None
        if pending is None and message.correlation_id is not None:
            pending = self._req_by_corr.get(message.correlation_id)
        if pending is None or pending.future.done():
            return False
        if pending.request_id is not None and message.reply_to != pending.request_id:
            return False
        pending.future.set_result(message)
        return True

    # --- dedup and acknowledgements -----------------------------------------------

    def _remember(self, seq: int, *, done: bool) -> None:
        self._seen[seq] = done
        if len(self._seen) > self._dedup_window * 1.1:
            keep = sorted(self._seen)[-self._dedup_window :]
            lowest = keep[0]
            self._seen = {s: d for s, d in self._seen.items() if s >= lowest or not d}

    def _prune_seen(self, floor: int) -> None:
        # Nothing at or below the floor is replayed again (without `since`).
        self._seen = {s: d for s, d in self._seen.items() if s > floor or not d}

    def _finish(self, seq: int) -> None:
        if seq in self._seen:
            self._seen[seq] = True
        if self.ack_mode != "manual":
            return
        conn = self._conn
        if conn is not None and seq in conn.delivered:
            self._queue_ack(conn, seq)

    def _queue_ack(self, conn: _Conn, seq: int) -> None:
        conn.delivered.discard(seq)
        conn.ack_buf.append(seq)
        if not conn.ack_scheduled:
            conn.ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks, conn)

    def _flush_acks(self, conn: _Conn) -> None:
        conn.ack_scheduled = False
        seqs, conn.ack_buf = conn.ack_buf, []
        for start in range(0, len(seqs), 10_000):
            self._spawn(self._write(conn, {"op": "ack", "seqs": seqs[start : start + 10_000]}))

    # --- handlers ----------------------------------------------------------------

    def _handler_for(self, message_type: str) -> Handler | None:
        return self._handlers.get(message_type) or self._handlers.get("*")

    async def _worker(self) -> None:
        assert self._dispatch is not None and self._idle is not None
        while True:
            message = await self._dispatch.get()
            self._busy_handlers += 1
            try:
                await self._handle(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agentbus: handling message %s failed", message.seq)
            finally:
                self._busy_handlers -= 1
                if self._busy_handlers == 0 and self._dispatch.empty():
                    self._idle.set()

    async def _handle(self, message: Message) -> None:
        handler = self._handler_for(message.message_type)
        if handler is None:  # removed since: hand it to the iterator instead
            assert self._inbox is not None
            self._inbox.put_nowait(message)
            return
        try:
            try:
                if inspect.iscoroutinefunction(handler):
                    result = await handler(message)
                else:
                    result = await asyncio.to_thread(handler, message)
                    if inspect.isawaitable(result):
                        result = await result
            except Exception as exc:
                log.exception(
                    "agentbus: handler for %r failed on message %s", message.message_type, message.seq
                )
                if message.expects_reply:
                    text = str(exc) or exc.__class__.__name__
                    await self._reply_safely(
                        message,
                        Reply(
                            content=f"the handler failed: {text}"[:1000],
                            success=False,
                            error=text[:_MAX_ERROR_TEXT],
                        ),
                    )
                return
            if message.expects_reply and result is not None:
                try:
                    reply = _reply_from(result)
                except (TypeError, ValueError) as exc:
                    reply = Reply(
                        content="the handler's answer could not be sent",
                        success=False,
                        error=f"cannot encode the handler's return value: {exc}"[:_MAX_ERROR_TEXT],
                    )
                await self._reply_safely(message, reply)
        finally:
            self._finish(message.seq)

    async def _reply_safely(self, message: Message, reply: Reply) -> None:
        try:
            await self._send_reply(message, reply)
        except AgentBusError as exc:
            if isinstance(exc, (ClientClosed, ConnectionEnded)):
                log.warning("agentbus: reply to %s not sent: %s", message.seq, exc)
                return
            log.warning("agentbus: reply to %s refused: %s", message.seq, exc)
            try:
                await self._send_reply(
                    message,
                    Reply(
                        content="the handler's reply was refused by the broker",
                        success=False,
                        error=f"{exc.code}: {exc.message}"[:_MAX_ERROR_TEXT],
                    ),
                    fallback=True,
                )
            except AgentBusError as again:
                log.warning("agentbus: reply to %s not sent: %s", message.seq, again)

    async def _send_reply(
        self, message: Message, reply: Reply, *, fallback: bool = False
    ) -> SentReceipt:
        # One client_msg_id per request: if the handler runs again (the message
        # was delivered again after a crash), the broker keeps the first reply.
        prefix = "reply-refused" if fallback else "reply"
        return await self.send(
            reply.content,
            reply_to=message.id,
            success=reply.success,
            error=reply.error,
            metadata=reply.metadata,
            type=reply.type,
            priority=reply.priority,
            client_msg_id=f"{prefix}:{message.id}",
        )

    # --- closing -------------------------------------------------------------------

    async def close(self, *, timeout: float = 10.0) -> None:
        """Close the client.

        Handlers already given a message get up to ``timeout`` seconds to
        finish (their replies and acknowledgements are sent), then the
        connection is closed normally, which lets the broker settle the sends it
        has taken (their receipts still arrive). Sends still without a receipt
        then fail with :class:`ClientClosed`. Messages received and not yet
        iterated stay readable with :meth:`receive` until consumed.
        """
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close(timeout))
        await asyncio.shield(self._close_task)

    async def _close(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._closing = True
        if self._idle is not None and self._state is ConnectionState.CONNECTED:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("agentbus: closing with handlers still running")
        self._sends_closed = True
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._close_event is not None:
            self._close_event.set()
        conn = self._conn
        if conn is not None:
            if conn.ack_buf:
                self._flush_acks(conn)
            if self._background:
                await asyncio.wait(list(self._background), timeout=max(0.1, deadline - loop.time()))
            try:
                await asyncio.wait_for(conn.ws.close(), max(0.1, deadline - loop.time()))
            except TimeoutError:
                pass
        if self._supervisor is not None:
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._supervisor), max(0.1, deadline - loop.time())
                )
            except TimeoutError:
                self._supervisor.cancel()
                await asyncio.gather(self._supervisor, return_exceptions=True)
        leftovers = list(self._background)
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        self._fail_all(self._error or ClientClosed())
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_exception(self._error or ClientClosed())
            self._first_welcome.exception()
        self._set_state(ConnectionState.CLOSED)
        if self._inbox is not None and self._error is None:
            self._inbox.put_nowait(_CLOSED)
        if self._rest is not None:
            await self._rest.aclose()


class _Connecting:
    """What :meth:`AgentBus.connect` returns: awaitable, or an async context manager."""

    def __init__(self, bus: AgentBus) -> None:
        self._bus = bus

    def __await__(self) -> Generator[Any, None, AgentBus]:
        return self._bus.start().__await__()

    async def __aenter__(self) -> AgentBus:
        return await self._bus.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._bus.close()
