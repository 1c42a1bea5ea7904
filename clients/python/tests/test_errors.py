"""Errors surface with the broker's codes; refusals that retrying cannot fix are final."""

from __future__ import annotations

import secrets

import httpx
import pytest

from agentbus import (
    AgentBus,
    AgentBusError,
    ConnectionRefused,
    ConnectionState,
    RestClient,
    TokenRevoked,
    create_project,
)

from conftest import FAST, Broker, BrokerFactory


async def test_send_refusals_carry_the_brokers_code(broker: Broker, project_id: str) -> None:
    async with AgentBus.connect(broker.url, project_id, "a", **FAST) as bus:
        with pytest.raises(AgentBusError) as caught:
            await bus.send("x", type="not a type!")
        assert (caught.value.code, caught.value.field) == ("invalid_field", "type")
        assert caught.value.client_msg_id is not None

        with pytest.raises(AgentBusError) as caught:
            await bus.send("x", priority=9)
        assert (caught.value.code, caught.value.field) == ("invalid_field", "priority")

        with pytest.raises(AgentBusError) as caught:
            await bus.send("")
        assert (caught.value.code, caught.value.field) == ("invalid_field", "content")

        with pytest.raises(AgentBusError) as caught:
            await bus.send("x", to="agentbus")
        assert (caught.value.code, caught.value.field) == ("invalid_field", "to")

        # Caught before anything is sent:
        with pytest.raises(ValueError, match="not both"):
            await bus.send("x", to="b", to_type="coder")
        with pytest.raises(AgentBusError) as caught:
            await bus.send("x" * 300_000)
        assert caught.value.code == "frame_too_large"

        # The connection is still good after all of these.
        assert bus.state is ConnectionState.CONNECTED and bus.reconnects == 0
        assert (await bus.send("fine")).seq == 1


async def test_refused_connections_are_final(broker: Broker, project_id: str) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(ConnectionRefused) as caught:
        await AgentBus.connect(broker.url, missing, "a", **FAST)
    assert (caught.value.status, caught.value.code) == (404, "not_found")

    with pytest.raises(ConnectionRefused) as caught:
        await AgentBus.connect(broker.url, project_id, "agentbus", **FAST)
    assert (caught.value.status, caught.value.code) == (400, "invalid_field")

    with pytest.raises(ValueError, match="UUID"):
        AgentBus(broker.url, "not-a-uuid", "a")
    with pytest.raises(ValueError, match="ack"):
        AgentBus(broker.url, project_id, "a", ack="sometimes")  # type: ignore[arg-type]

    async with RestClient(broker.url, project_id) as rest:
        with pytest.raises(AgentBusError) as refused:
            await rest.history(limit=5000)
        assert (refused.value.status, refused.value.code) == (400, "invalid_query")
        with pytest.raises(AgentBusError) as refused:
            await rest.message("00000000-0000-4000-8000-000000000000")
        assert (refused.value.status, refused.value.code) == (404, "not_found")


async def test_unreachable_broker_times_out(broker: Broker, project_id: str) -> None:
    port = broker.port
    broker.kill()
    with pytest.raises(AgentBusError) as caught:
        await AgentBus.connect(f"http://127.0.0.1:{port}", project_id, "a", connect_timeout=0.5, **FAST)
    assert caught.value.code == "unreachable"


async def test_tokens_and_revocation(start_broker: BrokerFactory) -> None:
    admin = secrets.token_hex(16)
    broker = start_broker("--admin-token", admin)
    project = await create_project(broker.url, "secured", token=admin)
    assert project.token is not None and project.token.startswith("ab_")

    with pytest.raises(ConnectionRefused) as caught:
        await AgentBus.connect(broker.url, project.id, "a", **FAST)
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")

    with pytest.raises(AgentBusError) as forbidden:
        await create_project(broker.url, "not allowed", token=project.token)
    assert (forbidden.value.status, forbidden.value.code) == (403, "forbidden")

    headers = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=broker.url, headers=headers) as http:
        issued = (await http.post(f"/api/projects/{project.id}/tokens", json={})).json()
        bus = await AgentBus.connect(broker.url, project.id, "a", token=issued["token"], **FAST)
        try:
            assert bus.state is ConnectionState.CONNECTED
            assert (await bus.rest.stats())["connected_sessions"] == 1
            revoked = await http.delete(f"/api/projects/{project.id}/tokens/{issued['id']}")
            assert revoked.status_code == 204
            await bus.wait_for_state(ConnectionState.CLOSED, timeout=10)
            assert isinstance(bus.error, TokenRevoked) and bus.error.close_code == 4003
            assert bus.reconnects == 0
        finally:
            await bus.close()
