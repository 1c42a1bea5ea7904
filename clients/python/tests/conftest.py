"""Fixtures: the real broker binary on a fresh PostgreSQL database per test.

The binary is ``$AGENTBUS_BIN``, or ``../../target/debug/agentbus`` relative to
this client's folder (where ``cargo build`` puts it). PostgreSQL is expected on
127.0.0.1:5432 (user postgres); ``$AGENTBUS_TEST_PG`` overrides the server URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypedDict

import httpx
import pytest

CLIENT_DIR = Path(__file__).resolve().parent.parent
BINARY = Path(os.environ.get("AGENTBUS_BIN") or CLIENT_DIR / "../../target/debug/agentbus").resolve()
PG_SERVER = os.environ.get("AGENTBUS_TEST_PG", "postgres://postgres@127.0.0.1:5432")
START_TIMEOUT_S = 60.0


class Broker:
    """One broker process on its own database; it can be killed and restarted."""

    def __init__(self, log_dir: Path, args: list[str], env: dict[str, str]) -> None:
        self.database = f"t_{uuid.uuid4().hex}"
        self.args = args
        self.env = {**os.environ, **env, "DATABASE_URL": f"{PG_SERVER}/{self.database}"}
        self.log_path = log_dir / f"broker-{self.database}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it (again on the same port once it has one) and wait until it listens."""
        assert self.proc is None, "already running"
        bind = f"127.0.0.1:{self.port or 0}"
        # stderr goes to a file, which never fills up and blocks the broker.
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BINARY), "serve", "--bind", bind, *self.args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        self.starts += 1
        line = self._read_listening_line()
        event = json.loads(line)
        assert event["event"] == "listening", line
        self.port = int(event["port"])

    def _read_listening_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        buf = b""
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise RuntimeError(f"the broker did not listen within {START_TIMEOUT_S} s\n{self.log_tail()}")
                if sel.select(left):
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        code = self.proc.wait()
                        self.proc = None
                        raise RuntimeError(f"the broker exited with {code} before listening\n{self.log_tail()}")
                    buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    def kill(self) -> None:
        """SIGKILL: the broker stops at once, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self._close_pipe()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not stopped within 15 s."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._close_pipe()

    def restart(self) -> None:
        """Kill it and start it again on the same port and database."""
        self.kill()
        self.start()

    def _close_pipe(self) -> None:
        assert self.proc is not None
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def drop_database(self) -> None:
        subprocess.run(
            [
                "psql",
                f"{PG_SERVER}/postgres",
                "-qc",
                f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)',
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def create_project(self, name: str = "test", token: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = httpx.post(f"{self.url}/api/projects", json={"name": name}, headers=headers, timeout=30)
        assert response.status_code == 201, response.text
        project: dict[str, Any] = response.json()
        return project


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def start_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerFactory]:
    """``start_broker(*args, env={...})``: a started broker, stopped and dropped at teardown."""
    if not BINARY.exists():
        pytest.fail(f"no broker binary at {BINARY}: build it (cargo build) or set AGENTBUS_BIN")
    brokers: list[Broker] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Broker:
        broker = Broker(tmp_path, list(args), env or {})
        brokers.append(broker)
        broker.start()
        return broker

    yield start
    failed = getattr(request.node, "rep_call", None)
    errors = []
    for broker in brokers:
        try:
            broker.kill()
        finally:
            try:
                broker.drop_database()
            except Exception as exc:  # report, but keep cleaning up the others
                errors.append(exc)
        if failed is not None and failed.failed:
            print(f"--- broker log {broker.database} ---\n{broker.log_tail()}")
    if errors:
        raise errors[0]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


@pytest.fixture
def broker(start_broker: BrokerFactory) -> Broker:
    return start_broker()


@pytest.fixture
def project_id(broker: Broker) -> str:
    return str(broker.create_project()["id"])


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 20.0,
    what: str = "the condition",
) -> None:
    """Wait until ``check()`` is true, polling; fail after ``timeout`` seconds.

    For state only observable by asking (REST), where there is no event to wait on.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


class Proxy:
    """A TCP relay between clients and the broker, which a test can cut or stall.

    ``cut()`` drops every relayed connection at once (both sides see the TCP
    connection end, as when a network path fails). While ``hold_replies`` is
    set, bytes from the broker are dropped instead of relayed, so a client's
    frames reach the broker but its answers never come back. While
    ``replies_flowing`` is clear, they are held back, and relayed once it is set.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.hold_replies = False
        self.replies_flowing = asyncio.Event()
        self.replies_flowing.set()
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "Proxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._pairs.append((writer, up_writer))
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, upstream=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                if not upstream:
                    if self.hold_replies:
                        continue
                    await self.replies_flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        for client, upstream in self._pairs:
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Backoff(TypedDict):
    backoff_initial: float
    backoff_max: float


# Reconnect quickly in tests: the broker restarts in well under a second.
FAST: Backoff = {"backoff_initial": 0.05, "backoff_max": 0.5}
