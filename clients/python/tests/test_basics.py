"""Sending, receiving, receipts and the REST helpers against a real broker."""

from __future__ import annotations

import asyncio

import pytest

from agentbus import (
    AgentBus,
    ConnectionState,
    Message,
    MessageType,
    Priority,
    RestClient,
)

from conftest import FAST, Broker


async def test_broadcast_and_direct_messages(broker: Broker, project_id: str) -> None:
    async with AgentBus.connect(broker.url, project_id, "coder-1", agent_type="coder", **FAST) as coder, \
            AgentBus.connect(broker.url, project_id, "reviewer-1", agent_type="reviewer", **FAST) as reviewer:
        assert coder.state is ConnectionState.CONNECTED
        assert coder.welcome is not None and coder.welcome.agent_id == "coder-1"
        assert coder.welcome.agent_type == "coder"

        receipt = await coder.send(
            "About to modify config.yaml, any objections?",
            type=MessageType.COORDINATION,
            metadata={"file": "config.yaml"},
        )
        assert receipt.seq == 1
        assert receipt.client_msg_id is not None and len(receipt.client_msg_id) == 32

        got = await reviewer.receive(timeout=10)
        assert isinstance(got, Message)
        assert (got.id, got.seq) == (receipt.id, 1)
        assert got.sender_agent_id == "coder-1" and got.sender_agent_type == "coder"
        assert got.message_type == "coordination" and got.type == "coordination"
        assert got.metadata == {"file": "config.yaml"}
        assert got.to is None and got.priority == Priority.NORMAL
        assert got.created_at == receipt.created_at

        direct = await reviewer.send("Go ahead", to="coder-1", reply_to=got.id, priority=Priority.HIGH)
        answer = await coder.receive(timeout=10)
        assert answer.seq == direct.seq == 2
        assert answer.to == "coder-1" and answer.reply_to == got.id and answer.priority == 1

        # A broadcast does not come back to its sender.
        with pytest.raises(TimeoutError):
            await coder.receive(timeout=0.3)


async def test_async_iteration_ends_when_closed(broker: Broker, project_id: str) -> None:
    sender = await AgentBus.connect(broker.url, project_id, "s", **FAST)
    receiver = await AgentBus.connect(broker.url, project_id, "r", **FAST)
    try:
        for i in range(3):
            await sender.send(f"n{i}", to="r")
        seen: list[str] = []
        async for message in receiver:
            seen.append(message.content)
            if len(seen) == 3:
                await receiver.close()
        assert seen == ["n0", "n1", "n2"]
        assert receiver.state is ConnectionState.CLOSED
    finally:
        await sender.close()
        await receiver.close()


async def test_since_replays_history_before_the_first_connection(broker: Broker, project_id: str) -> None:
    async with AgentBus.connect(broker.url, project_id, "early", **FAST) as early:
        for i in range(3):
            await early.rest.publish(f"old {i}", sender_agent_id="ci", sender_agent_type="ci")
        # A newcomer is owed nothing from before it joined...
        async with AgentBus.connect(broker.url, project_id, "late", **FAST) as late:
            assert late.welcome is not None and late.welcome.replay == 0
        # ...unless it asks for the history with since.
        async with AgentBus.connect(broker.url, project_id, "later", since=1, **FAST) as later:
            assert later.welcome is not None and later.welcome.replay == 2
            assert [(await later.receive(timeout=10)).content for _ in range(2)] == ["old 1", "old 2"]


async def test_rest_helpers(broker: Broker, project_id: str) -> None:
    async with AgentBus.connect(
        broker.url, project_id, "gen-1", agent_type="codegen", capabilities=["rust", "sql"], **FAST
    ) as gen:
        rest = gen.rest
        published = await rest.publish(
            "build 118 is green", sender_agent_id="ci", sender_agent_type="ci", type="discovery",
            client_msg_id="ci-118",
        )
        assert published.seq == 1 and published.client_msg_id == "ci-118"
        delivered = await gen.receive(timeout=10)
        assert delivered.id == published.id

        for i in range(4):
            await gen.send(f"note {i}", to="offline-1")

        page = await rest.history(limit=2)
        assert [m.seq for m in page.messages] == [4, 5]
        assert page.head_seq == 5 and page.has_more and page.next == {"before_seq": 4}
        everything = [m.seq async for m in rest.iter_history(page_size=2)]
        assert everything == [1, 2, 3, 4, 5]
        found = await rest.history(q="green")
        assert [m.id for m in found.messages] == [published.id]

        inbox = await rest.inbox("offline-1", limit=3)
        assert [m.content for m in inbox.messages] == ["note 0", "note 1", "note 2"]
        assert inbox.remaining == 1
        acked = await rest.ack("offline-1", up_to=5)
        assert acked.ack_floor == 5 and acked.ignored == []
        assert (await rest.inbox("offline-1")).messages == []

        agents = {a.agent_id: a for a in await rest.agents()}
        assert set(agents) == {"ci", "gen-1", "offline-1"}
        assert agents["gen-1"].online and agents["gen-1"].capabilities == ("rust", "sql")
        assert agents["gen-1"].session_ids == (gen.session_id,)
        assert [a.agent_id for a in await rest.agents(capability="sql")] == ["gen-1"]

        stats = await rest.stats()
        assert stats["head_seq"] == 5 and stats["members"] == 3

        detail = await rest.message(published.id)
        assert detail.message.content == "build 118 is green" and detail.replies == 0

    async with RestClient(broker.url, project_id) as standalone:
        project = await standalone.project()
        assert project.id == project_id and project.head_seq == 5


def test_the_installed_package_is_what_is_tested() -> None:
    import agentbus

    # run-tests.sh installs the package as users do; the tests must not import src/.
    assert "site-packages" in agentbus.__file__, agentbus.__file__
