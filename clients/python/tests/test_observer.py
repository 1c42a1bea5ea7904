"""The read-only observer socket (``/ws/agent/messages/{id}`` without ``agent_id``)."""

from __future__ import annotations

import asyncio
import json
import secrets

import httpx
import pytest
import websockets

from agentbus import AgentBus, ConnectionRefused, Message, Observer, create_project, observe

from conftest import FAST, Broker, BrokerFactory


async def _open(broker: Broker, project_id: str, since: int | None = None) -> Observer:
    observer = observe(broker.url, project_id, since=since, reconnect=False)
    await observer.connect()
    return observer


async def _next(observer: Observer) -> Message:
    return await asyncio.wait_for(observer.__anext__(), 10)


async def test_observer_sees_its_project_only(broker: Broker, project_id: str) -> None:
    other_project = str(broker.create_project("other")["id"])
    observer = await _open(broker, project_id)
    try:
        assert observer.welcome is not None and observer.welcome.observer
        assert observer.welcome.head_seq == 0
        async with AgentBus.connect(broker.url, project_id, "a", **FAST) as a, \
                AgentBus.connect(broker.url, project_id, "b", **FAST) as b, \
                AgentBus.connect(broker.url, other_project, "c", **FAST) as c:
            await c.send("elsewhere")
            broadcast = await a.send("to everyone")
            direct = await a.send("just for b", to="b")
            await b.receive(timeout=10)
            await b.receive(timeout=10)

            first, second = await _next(observer), await _next(observer)
            assert (first.seq, first.id, first.content) == (broadcast.seq, broadcast.id, "to everyone")
            assert (second.seq, second.to, second.content) == (direct.seq, "b", "just for b")

            # An observer is no member: not listed, owed nothing, counted nowhere.
            assert {m.agent_id for m in await a.rest.agents()} == {"a", "b"}
    finally:
        await observer.aclose()


async def test_observer_since_and_read_only(broker: Broker, project_id: str) -> None:
    async with AgentBus.connect(broker.url, project_id, "a", **FAST) as a:
        for i in range(4):
            await a.send(f"n{i}", to="someone")
        observer = await _open(broker, project_id, since=2)
        try:
            assert observer.welcome is not None and observer.welcome.head_seq == 4
            assert [(await _next(observer)).content for _ in range(2)] == ["n2", "n3"]
            live = await a.send("live")
            assert (await _next(observer)).seq == live.seq
        finally:
            await observer.aclose()

    # Whatever an observer sends is refused, and the socket stays open.
    url = f"ws://127.0.0.1:{broker.port}/ws/agent/messages/{project_id}"
    async with websockets.connect(url) as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["op"] == "welcome" and welcome["observer"] is True
        await ws.send(json.dumps({"content": "let me in", "client_msg_id": "o-1"}))
        error = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert error["op"] == "error" and error["code"] == "observer_read_only"
        await ws.send(json.dumps({"op": "ack", "up_to": 1}))
        error = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert error["code"] == "observer_read_only"


async def test_observer_resumes_after_a_restart(broker: Broker, project_id: str) -> None:
    observer = await _open(broker, project_id)
    await observer.aclose()
    seen: list[int] = []
    async with AgentBus.connect(broker.url, project_id, "a", **FAST) as a:
        async with observe(broker.url, project_id, **FAST) as watching:
            await watching.connect()
            first = await a.send("before")
            seen.append((await _next(watching)).seq)
            broker.kill()
            broker.start()
            second = await a.send("after")
            seen.append((await asyncio.wait_for(watching.__anext__(), 30)).seq)
            assert watching.reconnects == 1
    assert seen == [first.seq, second.seq]


async def test_observer_tokens(start_broker: BrokerFactory) -> None:
    admin = secrets.token_hex(16)
    broker = start_broker("--admin-token", admin)
    project = await create_project(broker.url, "secured", token=admin)
    assert project.token is not None

    with pytest.raises(ConnectionRefused) as caught:
        await observe(broker.url, project.id, reconnect=False).connect()
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")

    async with httpx.AsyncClient(base_url=broker.url, headers={"Authorization": f"Bearer {admin}"}) as http:
        bound = (await http.post(f"/api/projects/{project.id}/tokens", json={"agent_id": "a"})).json()
    with pytest.raises(ConnectionRefused) as refused:
        await observe(broker.url, project.id, token=bound["token"], reconnect=False).connect()
    assert (refused.value.status, refused.value.code) == (403, "forbidden")

    async with observe(broker.url, project.id, token=project.token) as log:
        await log.connect()
        async with AgentBus.connect(broker.url, project.id, "a", token=bound["token"], **FAST) as a:
            receipt = await a.send("seen by the log")
        message = await asyncio.wait_for(log.__anext__(), 10)
        assert (message.id, message.sender_agent_id) == (receipt.id, "a")
