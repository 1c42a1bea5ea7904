"""A blocking wrapper for scripts: the asyncio client on a background thread.

    import agentbus.sync

    with agentbus.sync.connect("http://127.0.0.1:8080", PROJECT_ID, "script-1") as bus:
        receipt = bus.send("build 118 is green", type="discovery")
        reply = bus.request("status?", to="gen-1", timeout=10)

Each call runs on one event loop owned by the wrapper, in a thread of its own,
and blocks until it is done. Handlers registered with :meth:`SyncAgentBus.on`
are called in worker threads, so they may call the wrapper's methods.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Callable, Concatenate, Coroutine, Iterator, ParamSpec, TypeVar, overload

from ._client import AgentBus, H
from ._errors import ClientClosed
from ._models import ConnectionState, InboxPage, Message, Welcome
from ._rest import RestClient

T = TypeVar("T")
P = ParamSpec("P")

__all__ = ["SyncAgentBus", "connect"]


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, name="agentbus-sync-loop", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a blocking agentbus call was made on the client's own event loop; "
                "use the async client there"
            )
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


def _blocking(
    method: Callable[Concatenate[AgentBus, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate["SyncAgentBus", P], T]:
    def call(self: "SyncAgentBus", /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._call(method(self._bus, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = f"As :meth:`AgentBus.{method.__name__}`, blocking until it is done."
    return call


def _blocking_rest(
    method: Callable[Concatenate[RestClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate["SyncAgentBus", P], T]:
    def call(self: "SyncAgentBus", /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._call(method(self._bus.rest, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = f"As :meth:`RestClient.{method.__name__}`, blocking until it is done."
    return call


class SyncAgentBus:
    """The blocking face of :class:`~agentbus.AgentBus`; see :func:`connect`."""

    def __init__(self, bus: AgentBus, runner: _LoopThread) -> None:
        self._bus = bus
        self._runner = runner
        self._closed = False

    @property
    def aio(self) -> AgentBus:
        """The underlying asyncio client (use it only on its own loop)."""
        return self._bus

    @property
    def state(self) -> ConnectionState:
        return self._bus.state

    @property
    def welcome(self) -> Welcome | None:
        return self._bus.welcome

    @property
    def reconnects(self) -> int:
        return self._bus.reconnects

    def __enter__(self) -> "SyncAgentBus":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Close the client (as :meth:`AgentBus.close`) and stop its thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(self._bus.close(timeout=timeout))
        finally:
            self._runner.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise ClientClosed()
        return self._runner.run(coro)

    send = _blocking(AgentBus.send)
    request = _blocking(AgentBus.request)
    reply = _blocking(AgentBus.reply)
    ack = _blocking(AgentBus.ack)
    receive = _blocking(AgentBus.receive)
    wait_for_state = _blocking(AgentBus.wait_for_state)

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.receive()
            except ClientClosed:
                return

    @overload
    def on(self, message_type: str = "*", handler: None = None) -> Callable[[H], H]: ...

    @overload
    def on(self, message_type: str, handler: H) -> H: ...

    def on(self, message_type: str = "*", handler: H | None = None) -> H | Callable[[H], H]:
        """As :meth:`AgentBus.on`. Plain functions run in worker threads."""
        if handler is None:
            return self._bus.on(message_type)
        return self._bus.on(message_type, handler)

    def off(self, message_type: str = "*") -> None:
        self._bus.off(message_type)

    # REST helpers, through the client's RestClient (with its token).
    history = _blocking_rest(RestClient.history)
    message = _blocking_rest(RestClient.message)
    agents = _blocking_rest(RestClient.agents)
    stats = _blocking_rest(RestClient.stats)
    dead_letters = _blocking_rest(RestClient.dead_letters)

    def inbox(
        self,
        agent_id: str | None = None,
        *,
        limit: int | None = None,
        wait: float | None = None,
        ack: bool = False,
        urgent_only: bool = False,
    ) -> InboxPage:
        """As :meth:`RestClient.inbox`, for this agent unless ``agent_id`` is given."""
        return self._call(
            self._bus.rest.inbox(
                agent_id or self._bus.agent_id,
                limit=limit,
                wait=wait,
                ack=ack,
                urgent_only=urgent_only,
            )
        )


def _connect(factory: Callable[P, AgentBus]) -> Callable[P, SyncAgentBus]:
    def connect(*args: P.args, **kwargs: P.kwargs) -> SyncAgentBus:
        """Connect an agent and block until its first welcome.

        Takes the arguments of :class:`~agentbus.AgentBus`; use the result as a
        context manager, or call :meth:`SyncAgentBus.close`.
        """
        runner = _LoopThread()

        async def start() -> AgentBus:
            return await factory(*args, **kwargs).start()

        try:
            bus = runner.run(start())
        except BaseException:
            runner.stop()
            raise
        return SyncAgentBus(bus, runner)

    return connect


connect = _connect(AgentBus)
