"""The blocking wrapper, used from plain (non-async) code."""

from __future__ import annotations

import threading

import pytest

import agentbus.sync
from agentbus import AgentBusError, ConnectionState, Message, RequestTimeout

from conftest import FAST, Broker


def test_sync_wrapper_sends_requests_and_handles(broker: Broker, project_id: str) -> None:
    handler_threads: list[str] = []

    with agentbus.sync.connect(broker.url, project_id, "script", agent_type="script", **FAST) as script, \
            agentbus.sync.connect(broker.url, project_id, "worker", agent_type="worker", **FAST) as worker:
        assert script.aio.connected and worker.aio.connected

        @worker.on("ping")
        def pong(message: Message) -> str:
            handler_threads.append(threading.current_thread().name)
            # A handler may use the blocking client too: it runs in a worker thread.
            worker.send(f"saw {message.content}", to="script", type="status")
            return f"pong: {message.content}"

        reply = script.request("hello", to="worker", type="ping", timeout=10)
        assert reply.content == "pong: hello" and reply.success is True
        assert script.receive(timeout=10).content == "saw hello"
        assert handler_threads and handler_threads[0] != threading.current_thread().name

        receipt = script.send("for you", to="worker", type="note")
        got = worker.receive(timeout=10)
        assert (got.id, got.content) == (receipt.id, "for you")

        with pytest.raises(TimeoutError):
            worker.receive(timeout=0.2)
        with pytest.raises(RequestTimeout):
            script.request("anyone?", to="worker", type="unanswered", timeout=0.3)
        assert worker.receive(timeout=10).type == "unanswered"  # no handler: to the iterator
        with pytest.raises(AgentBusError) as caught:
            script.send("x", type="bad type")
        assert caught.value.code == "invalid_field"

        page = script.history()
        assert [m.content for m in page.messages][:2] == ["hello", "saw hello"]
        assert {a.agent_id for a in script.agents()} == {"script", "worker"}
        assert script.stats()["head_seq"] == page.head_seq
        assert worker.inbox().messages == []

    assert script.state is ConnectionState.CLOSED and worker.state is ConnectionState.CLOSED
    with pytest.raises(AgentBusError):
        script.send("after close")


def test_sync_iteration(broker: Broker, project_id: str) -> None:
    with agentbus.sync.connect(broker.url, project_id, "a", **FAST) as a, \
            agentbus.sync.connect(broker.url, project_id, "b", ack="manual", **FAST) as b:
        for i in range(3):
            a.send(f"n{i}", to="b")
        seen = []
        for message in b:
            seen.append(message.content)
            b.ack(message)
            if len(seen) == 3:
                break
        assert seen == ["n0", "n1", "n2"]
