"""The official MCP Python SDK against a real broker, driven by tests/api/mcp_sdk.rs.

Environment: AGENTBUS_MCP_URL (the endpoint, with agent_id/agent_type), AGENTBUS_PEER (a
WebSocket agent that replies to requests and answers "please-send" with a direct message).
Prints one JSON object with what it saw; exits non-zero on any failure.
"""

import asyncio
import json
import os

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client


def contents(result):
    return [m["content"] for m in result.structuredContent["messages"]]


async def main():
    url = os.environ["AGENTBUS_MCP_URL"]
    peer = os.environ["AGENTBUS_PEER"]
    out = {}
    async with streamablehttp_client(url) as (read, write, _):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out["protocol"] = init.protocolVersion
            tools = await session.list_tools()
            out["tools"] = [t.name for t in tools.tools]
            sent = await session.call_tool("send_message", {"content": "from-sdk", "to": peer})
            out["sent"] = sent.structuredContent
            out["inbox"] = contents(await session.call_tool("check_inbox", {}))
            out["second"] = contents(await session.call_tool("check_inbox", {}))
            asked = await session.call_tool(
                "ask", {"content": "ping", "to": peer, "timeout_seconds": 30}
            )
            out["ask"] = {
                "is_error": asked.isError,
                "reply": asked.structuredContent["response"]["content"],
            }
            await session.call_tool("send_message", {"content": "please-send", "to": peer})
            woken = await session.call_tool("check_inbox", {"wait_seconds": 20})
            out["woken"] = contents(woken)
            out["empty"] = contents(await session.call_tool("check_inbox", {"wait_seconds": 1}))
    print(json.dumps(out))


asyncio.run(main())
