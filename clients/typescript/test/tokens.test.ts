/**
 * A broker that requires tokens, reached with the `ws` package (the token in an
 * `Authorization` header) and with the standard WebSocket of browsers (the token in
 * `?token=`), which Node provides as `globalThis.WebSocket` (Node 22, or Node 20 with
 * `--experimental-websocket`, as run-tests.sh runs it).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { AgentBusError, RestClient, connect, observe } from '@agentbus/client';
import type { Message, WebSocketConstructor } from '@agentbus/client';

import { Broker, deferred, until } from './helpers.js';

const ADMIN_TOKEN = 'admin-token-for-the-client-tests';

function standardWebSocket(): WebSocketConstructor {
  const ctor = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  assert.equal(typeof ctor, 'function', 'this runtime has no standard WebSocket: run Node 20 with --experimental-websocket');
  return ctor!;
}

test('tokens: ws sends a Bearer header, the standard WebSocket a ?token=; refusals are final', async (t) => {
  const broker = await Broker.start(t, { args: ['--admin-token', ADMIN_TOKEN] });
  const admin = new RestClient({ url: broker.url, token: ADMIN_TOKEN });
  const project = await admin.createProject('tokens');
  const token = project.token;
  assert.match(token, /^ab_[0-9a-f]{64}$/);

  // REST without a token: the broker's code and status.
  await assert.rejects(
    new RestClient({ url: broker.url, projectId: project.id }).history(),
    (e: unknown) => e instanceof AgentBusError && e.code === 'unauthorized' && e.status === 401,
  );

  // The `ws` package: the token in the Authorization header.
  const nodeAgent = await connect({ url: broker.url, projectId: project.id, agentId: 'node-agent', token });
  t.after(() => nodeAgent.close());
  nodeAgent.on('request', (m) => `node-agent answers ${m.content}`);

  // The standard WebSocket: the token in the query string; an observer too.
  const WebSocket = standardWebSocket();
  const browserAgent = await connect({ url: broker.url, projectId: project.id, agentId: 'browser-agent', token, WebSocket });
  t.after(() => browserAgent.close());
  const watcher = await observe({ url: broker.url, projectId: project.id, token, WebSocket });
  t.after(() => watcher.close());
  const watched: Message[] = [];
  watcher.events.on('message', (m) => watched.push(m));

  const got = deferred<Message>();
  browserAgent.on('status', (m) => {
    got.resolve(m);
  });
  await nodeAgent.send({ to: 'browser-agent', content: 'hello from node' });
  assert.equal((await got.promise).content, 'hello from node');
  const reply = await browserAgent.request({ type: 'request', to: 'node-agent', content: '#1' }, { timeoutMs: 10_000 });
  assert.equal(reply.content, 'node-agent answers #1');
  await until('the observer saw all three', () => watched.length === 3);
  assert.deepEqual(watched.map((m) => m.seq), [1, 2, 3]);

  // Refused upgrades. With `ws` the client reads the broker's answer: final, no retrying.
  await assert.rejects(
    connect({ url: broker.url, projectId: project.id, agentId: 'no-token' }),
    (e: unknown) => e instanceof AgentBusError && e.code === 'unauthorized' && e.status === 401,
  );
  await assert.rejects(
    connect({ url: broker.url, projectId: project.id, agentId: 'bad-token', token: `ab_${'0'.repeat(64)}` }),
    (e: unknown) => e instanceof AgentBusError && e.code === 'unauthorized',
  );
  // A standard WebSocket cannot see why an upgrade failed; without reconnection it stops at once.
  await assert.rejects(
    connect({ url: broker.url, projectId: project.id, agentId: 'no-token', WebSocket, reconnect: false }),
    (e: unknown) => e instanceof AgentBusError && e.code === 'closed',
  );
});
