// The official MCP TypeScript SDK against a real broker, driven by tests/api/mcp_sdk.rs.
// Environment: AGENTBUS_MCP_URL (the endpoint, with agent_id/agent_type), AGENTBUS_PEER (a
// WebSocket agent that replies to requests and answers "please-send" with a direct message).
// Prints one JSON object with what it saw; exits non-zero on any failure.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = new URL(process.env.AGENTBUS_MCP_URL);
const peer = process.env.AGENTBUS_PEER;
const contents = (result) => result.structuredContent.messages.map((m) => m.content);

const client = new Client({ name: "agentbus-sdk-test", version: "1.0.0" });
const transport = new StreamableHTTPClientTransport(url);
await client.connect(transport);
const call = (name, args) => client.callTool({ name, arguments: args });
const out = { protocol: transport.protocolVersion };
out.tools = (await client.listTools()).tools.map((t) => t.name);
out.sent = (await call("send_message", { content: "from-sdk", to: peer })).structuredContent;
out.inbox = contents(await call("check_inbox", {}));
out.second = contents(await call("check_inbox", {}));
const asked = await call("ask", { content: "ping", to: peer, timeout_seconds: 30 });
out.ask = { is_error: asked.isError, reply: asked.structuredContent.response.content };
await call("send_message", { content: "please-send", to: peer });
out.woken = contents(await call("check_inbox", { wait_seconds: 20 }));
out.empty = contents(await call("check_inbox", { wait_seconds: 1 }));
await transport.terminateSession();
await client.close();
console.log(JSON.stringify(out));
