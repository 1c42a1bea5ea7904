/**
 * The agent client against a real broker: sends and receipts, handlers and replies,
 * requests and their timeouts, errors with the broker's codes, takeover, manual acks.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { AgentBusClient, AgentBusError, connect } from '@agentbus/client';
import type { Message } from '@agentbus/client';

import { Broker, deferred, nextEvent, until } from './helpers.js';

async function rejection(promise: Promise<unknown>): Promise<AgentBusError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof AgentBusError, `expected an AgentBusError, got ${String(error)}`);
    return error;
  }
  assert.fail('expected a rejection');
}

test('send resolves with the receipt; the recipient gets the message; a handler answers a request', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const alice = await connect({ url: broker.url, projectId, agentId: 'alice', agentType: 'coder' });
  t.after(() => alice.close());
  const bob = await connect({ url: broker.url, projectId, agentId: 'bob', agentType: 'reviewer', capabilities: ['review'] });
  t.after(() => bob.close());
  assert.equal(alice.state, 'open');
  assert.equal(bob.welcome?.agent_type, 'reviewer');

  const got = nextEvent(bob.events, 'message');
  const receipt = await alice.send({ type: 'coordination', content: 'touching config.yaml', metadata: { file: 'config.yaml' } });
  assert.match(receipt.id, /^[0-9a-f-]{36}$/);
  assert.equal(receipt.seq, 1);
  assert.ok(receipt.client_msg_id, 'a client_msg_id is generated');
  const message = await got;
  assert.equal(message.id, receipt.id);
  assert.equal(message.seq, 1);
  assert.equal(message.sender_agent_id, 'alice');
  assert.equal(message.message_type, 'coordination');
  assert.deepEqual(message.metadata, { file: 'config.yaml' });

  // A handler's return value becomes the reply to a request.
  bob.on('capability_query', (m) => ({ content: `I review; you asked: ${m.content}`, metadata: { langs: ['rust'] } }));
  const reply = await alice.request({ type: 'capability_query', to: 'bob', content: 'what can you do?' }, { timeoutMs: 10_000 });
  assert.equal(reply.sender_agent_id, 'bob');
  assert.equal(reply.to, 'alice');
  assert.equal(reply.message_type, 'response');
  assert.equal(reply.content, 'I review; you asked: what can you do?');
  assert.deepEqual(reply.metadata, { langs: ['rust'] });
  assert.equal(reply.in_reply_to_seq, 2);
  assert.equal(typeof reply.duration_ms, 'number');

  // register(): the handler of every type without its own; a string is the reply's content.
  bob.register((m) => `default handler saw ${m.message_type}`);
  const second = await alice.sendAndWait({ type: 'question', to_type: 'reviewer', content: '?' }, 10_000);
  assert.equal(second.content, 'default handler saw question');

  // The receipt of a send is matched to it even when several are in flight.
  const receipts = await Promise.all(Array.from({ length: 20 }, (_, i) => alice.send({ to: 'bob', content: `n${i}` })));
  const seqs = receipts.map((r) => r.seq);
  assert.equal(new Set(seqs).size, 20);
  const history = await broker.rest(projectId).historyAll({ sender: 'alice' });
  for (const r of receipts) {
    const stored = history.find((m) => m.id === r.id);
    assert.ok(stored, `message ${r.seq} is in the history`);
    assert.equal(stored.client_msg_id, r.client_msg_id);
    assert.equal(stored.content, `n${receipts.indexOf(r)}`);
  }

  // The agents list shows what the connection declared.
  const { agents } = await alice.rest.agents();
  const bobRow = agents.find((a) => a.agent_id === 'bob');
  assert.deepEqual(bobRow?.capabilities, ['review']);
  assert.deepEqual(bobRow?.session_ids, [bob.sessionId]);
});

test('errors carry the broker codes; bad input is refused before sending', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const a = await connect({ url: broker.url, projectId, agentId: 'a' });
  t.after(() => a.close());

  let e = await rejection(a.send({ content: 'x', to: 'b', to_type: 'coder' }));
  assert.equal(e.code, 'invalid_field');
  assert.equal(e.field, 'to_type');
  e = await rejection(a.send({ content: 'x', priority: 9 as 0 }));
  assert.equal(e.code, 'invalid_field');
  assert.equal(e.field, 'priority');
  e = await rejection(a.send({ content: 'x', type: 'not a type' }));
  assert.equal(e.code, 'invalid_field');
  assert.equal(e.field, 'type');
  e = await rejection(a.send({ content: 'x', reply_to: 'not-a-uuid' }));
  assert.equal(e.code, 'invalid_field');
  assert.equal(e.field, 'reply_to');
  assert.ok(e.clientMsgId, 'the refused send is named');

  // A request nobody can receive: rejected at once with no_recipient (it was dead-lettered).
  e = await rejection(a.request({ to_type: 'designer', content: 'draw it' }, { timeoutMs: 60_000 }));
  assert.equal(e.code, 'no_recipient');
  const { dead_letters } = await a.rest.deadLetters();
  assert.equal(dead_letters.length, 1);
  assert.equal(dead_letters[0]?.reason, 'no_recipient');

  // A plain send to nobody is stored, with a warning.
  const warning = nextEvent(a.events, 'warning');
  const receipt = await a.send({ to: 'ghost', content: 'hello?' });
  const w = await warning;
  assert.equal(w.code, 'no_recipient');
  assert.equal(w.client_msg_id, receipt.client_msg_id);

  // Checked by the client: nothing is sent.
  e = await rejection(a.send({ content: '' }));
  assert.equal(e.code, 'invalid_argument');
  e = await rejection(a.send({ content: 'x'.repeat(300_000) }));
  assert.equal(e.code, 'frame_too_large');
  assert.throws(() => new AgentBusClient({ url: 'ftp://x', projectId, agentId: 'a' }), /url/);
  assert.throws(() => new AgentBusClient({ url: broker.url, projectId: 'nope', agentId: 'a' }), /projectId/);
  assert.throws(() => new AgentBusClient({ url: broker.url, projectId, agentId: 'a', agentType: 'bad type' }), /agentType/);
  assert.throws(() => new AgentBusClient({ url: broker.url, projectId, agentId: 'a', ack: 'sometimes' as 'auto' }), /ack/);
  const history = await a.rest.history();
  assert.deepEqual(
    history.messages.map((m) => m.content),
    ['draw it', 'hello?'],
  );

  // Refused upgrades: the broker's code and status, and no reconnection loop.
  e = await rejection(connect({ url: broker.url, projectId: '00000000-0000-4000-8000-000000000000', agentId: 'a' }));
  assert.equal(e.code, 'not_found');
  assert.equal(e.status, 404);
  e = await rejection(connect({ url: broker.url, projectId, agentId: 'agentbus' }));
  assert.equal(e.code, 'invalid_field');
  assert.equal(e.status, 400);
});

test('request timeouts: the broker answers at the deadline; the client gives up alone when the broker is gone', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const asker = await connect({ url: broker.url, projectId, agentId: 'asker' });
  t.after(() => asker.close());
  const silent = await connect({ url: broker.url, projectId, agentId: 'silent' });
  t.after(() => silent.close());
  const seen = deferred<Message>();
  silent.on('request', (m) => {
    seen.resolve(m); // and no reply
  });

  const started = Date.now();
  const e = await rejection(asker.request({ type: 'request', to: 'silent', content: 'are the tests green?' }, { timeoutMs: 500 }));
  assert.equal(e.code, 'timeout');
  const response = e.details as Message;
  assert.equal(response.sender_agent_id, 'agentbus');
  assert.equal(response.error, 'timeout');
  assert.ok(Date.now() - started >= 450, 'not before the deadline');
  assert.equal((await seen.promise).content, 'are the tests green?');

  // Without a broker, neither a receipt nor a timeout response can come: the client's own timeouts.
  const lonely = await connect({
    url: broker.url,
    projectId,
    agentId: 'lonely',
    sendTimeoutMs: 500,
    requestGraceMs: 200,
    reconnect: { initialDelayMs: 50, maxDelayMs: 200 },
  });
  t.after(() => lonely.close());
  await broker.kill();
  await nextEvent(lonely.events, 'close');
  const sendError = await rejection(lonely.send({ content: 'into the void' }));
  assert.equal(sendError.code, 'send_timeout');
  assert.ok(sendError.clientMsgId);
  const requestError = await rejection(lonely.request({ to: 'silent', content: '?' }, { timeoutMs: 300 }));
  assert.ok(['timeout', 'send_timeout'].includes(requestError.code), requestError.code);
});

test('a takeover (4001) stops the replaced client without a reconnection loop', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const first = await connect({ url: broker.url, projectId, agentId: 'worker', reconnect: { initialDelayMs: 10 } });
  t.after(() => first.close());
  const closed = nextEvent(first.events, 'close');
  const second = await connect({ url: broker.url, projectId, agentId: 'worker' });
  t.after(() => second.close());
  const event = await closed;
  assert.equal(event.code, 4001);
  assert.equal(event.willReconnect, false);
  assert.equal(event.error?.code, 'replaced');
  await until('the first client is closed', () => first.state === 'closed');
  const e = await rejection(first.send({ content: 'still there?' }));
  assert.equal(e.code, 'closed');

  // The newer connection keeps the identity: it is the only session, and it works.
  const peer = await connect({ url: broker.url, projectId, agentId: 'peer' });
  t.after(() => peer.close());
  const got = nextEvent(second.events, 'message');
  await peer.send({ to: 'worker', content: 'for the survivor' });
  assert.equal((await got).content, 'for the survivor');
  const { agents } = await peer.rest.agents();
  assert.deepEqual(agents.find((a) => a.agent_id === 'worker')?.session_ids, [second.sessionId]);
  assert.equal(first.state, 'closed');
});

test('manual mode acknowledges what handlers finished; a failed handler gets its message again', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const sender = await connect({ url: broker.url, projectId, agentId: 'sender' });
  t.after(() => sender.close());
  const worker = new AgentBusClient({ url: broker.url, projectId, agentId: 'worker', ack: 'manual' });
  t.after(() => worker.close());
  const attempts = new Map<string, number>();
  const handled: string[] = [];
  worker.register((m) => {
    const n = (attempts.get(m.content) ?? 0) + 1;
    attempts.set(m.content, n);
    if (m.content === 'flaky' && n === 1) throw new Error('first attempt fails');
    handled.push(m.content);
  });
  const failed = nextEvent(worker.events, 'handlerError');
  await worker.start();
  for (const content of ['one', 'flaky', 'two']) await sender.send({ to: 'worker', content });
  assert.equal((await failed).message.content, 'flaky');
  await until('both good messages handled', () => handled.length === 2);
  const depth = async () => (await sender.rest.agents()).agents.find((a) => a.agent_id === 'worker')?.queue_depth;
  // 'one' and 'two' are acknowledged; 'flaky' is still owed.
  await until('only the failed message is owed', async () => (await depth()) === 1);

  // On the next connection the failed message comes again and is handled; nothing else repeats.
  const welcomed = nextEvent(worker.events, 'welcome', (w) => w.replay === 1);
  await broker.restart();
  await welcomed;
  await until('the failed message handled again', () => handled.length === 3);
  assert.deepEqual(handled, ['one', 'two', 'flaky']);
  assert.equal(attempts.get('flaky'), 2);
  assert.equal(attempts.get('one'), 1);
  await until('nothing owed', async () => (await depth()) === 0);
});
