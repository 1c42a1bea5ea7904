"""Request and reply: handlers' return values, timeouts, nobody to ask."""

from __future__ import annotations

import asyncio

import pytest

from agentbus import (
    AgentBus,
    Message,
    MessageType,
    NoRecipient,
    Priority,
    Reply,
    RequestTimeout,
)

from conftest import FAST, Broker


async def test_handler_return_values_become_replies(broker: Broker, project_id: str) -> None:
    async with AgentBus.connect(broker.url, project_id, "coord", agent_type="coordinator", **FAST) as coord, \
            AgentBus.connect(broker.url, project_id, "gen-1", agent_type="codegen", **FAST) as gen:

        @gen.on(MessageType.TASK_ASSIGNMENT)
        async def assign(message: Message) -> str:
            return f"done: {message.content}"

        @gen.on("capability_query")
        def capabilities(message: Message) -> Reply:  # a plain function runs in a thread
            return Reply(
                content="rust, sql",
                type=MessageType.CAPABILITY_RESPONSE,
                metadata={"capabilities": ["rust", "sql"]},
            )

        @gen.on("estimate")
        async def estimate(message: Message) -> dict[str, int]:
            return {"hours": 3}

        @gen.on("explode")
        async def explode(message: Message) -> str:
            raise RuntimeError("the build server is down")

        reply = await coord.request(
            "Implement the retry policy", to="gen-1", type="task_assignment",
            priority=Priority.HIGH, timeout=10,
        )
        assert reply.content == "done: Implement the retry policy"
        assert reply.success is True and reply.sender_agent_id == "gen-1"
        assert reply.message_type == "response" and reply.to == "coord"
        assert reply.in_reply_to_seq == 1 and reply.duration_ms is not None and not reply.late

        caps = await coord.request("What can you do?", to_type="codegen", type="capability_query", timeout=10)
        assert caps.message_type == "capability_response"
        assert caps.metadata == {"capabilities": ["rust", "sql"]}

        assert (await coord.request("how long?", to="gen-1", type="estimate", timeout=10)).json() == {"hours": 3}

        failed = await coord.request("boom", to="gen-1", type="explode", timeout=10)
        assert failed.success is False and failed.error == "the build server is down"

        # Replies went to the requests; nothing was left over for the iterator.
        with pytest.raises(TimeoutError):
            await coord.receive(timeout=0.2)


async def test_request_timeout_carries_the_brokers_response(broker: Broker, project_id: str) -> None:
    async with AgentBus.connect(broker.url, project_id, "coord", **FAST) as coord, \
            AgentBus.connect(broker.url, project_id, "gen-1", **FAST) as gen:
        answer_late = asyncio.Event()

        @gen.on("request")
        async def ignore(message: Message) -> None:
            await answer_late.wait()
            await gen.reply(message, "sorry, too late")

        with pytest.raises(RequestTimeout) as caught:
            await coord.request("Are the tests green?", to="gen-1", timeout=0.5)
        response = caught.value.response
        assert caught.value.code == "timeout"
        assert response is not None and response.is_broker_timeout
        assert response.sender_agent_id == "agentbus" and response.success is False
        assert response.reply_to == caught.value.request_id

        # A reply after the deadline is still delivered, marked late, to the iterator.
        answer_late.set()
        late = await coord.receive(timeout=10)
        assert late.content == "sorry, too late" and late.late
        assert late.reply_to == caught.value.request_id


async def test_request_nobody_can_receive(broker: Broker, project_id: str) -> None:
    async with AgentBus.connect(broker.url, project_id, "coord", **FAST) as coord:
        with pytest.raises(NoRecipient) as caught:
            await coord.request("Draw the diagram", to_type="designer", timeout=5)
        assert caught.value.code == "no_recipient"
        [dead] = await coord.rest.dead_letters()
        assert dead.reason == "no_recipient" and dead.message.content == "Draw the diagram"


async def test_request_reply_over_rest(broker: Broker, project_id: str) -> None:
    async with AgentBus.connect(broker.url, project_id, "gen-1", **FAST) as gen:
        gen.on("capability_query", lambda message: "rust, sql")
        result = await gen.rest.request(
            "What can you do?", sender_agent_id="operator", sender_agent_type="operator",
            to="gen-1", type="capability_query", timeout=10,
        )
        assert result.response.content == "rust, sql"
        assert result.response.reply_to == result.request.id

        with pytest.raises(RequestTimeout) as caught:
            await gen.rest.request(
                "anyone?", sender_agent_id="operator", to="gen-1", type="nobody_answers", timeout=0.3
            )
        assert caught.value.response is not None and caught.value.response.is_broker_timeout
