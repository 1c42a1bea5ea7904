/**
 * Reconnecting and resuming: the broker killed (SIGKILL), or stopped (SIGTERM), and restarted on
 * the same port while messages flow, in both ack modes; a send whose receipt was lost with its
 * connection.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { TestContext } from 'node:test';

import { AgentBusClient, connect } from '@agentbus/client';
import type { AckMode, SentReceipt } from '@agentbus/client';

import { Broker, TcpProxy, nextEvent, until } from './helpers.js';

const fastReconnect = { initialDelayMs: 50, maxDelayMs: 500 };

async function restartMidStream(t: TestContext, ack: AckMode, signal: 'SIGKILL' | 'SIGTERM' = 'SIGKILL'): Promise<void> {
  const total = 400;
  const killAfter = 150;
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();

  // The receiver counts what its handler is given; the client filters duplicates by seq.
  const handled: number[] = [];
  const contents = new Map<number, string>();
  const receiver = new AgentBusClient({ url: broker.url, projectId, agentId: 'receiver', ack, reconnect: fastReconnect });
  t.after(() => receiver.close());
  receiver.register((m) => {
    handled.push(m.seq);
    contents.set(m.seq, m.content);
  });
  await receiver.start();
  const sender = await connect({ url: broker.url, projectId, agentId: 'sender', reconnect: fastReconnect });
  t.after(() => sender.close());
  const senderWelcomes: string[] = [];
  sender.events.on('welcome', (w) => senderWelcomes.push(w.session_id));
  const senderCloses: number[] = [];
  sender.events.on('close', (e) => senderCloses.push(e.code));

  // Up to 32 sends in flight; the broker is killed once 150 receipts came, and started again.
  const receipts: SentReceipt[] = [];
  let restarted: Promise<void> | undefined;
  const inFlight = new Set<Promise<void>>();
  for (let i = 0; i < total; i++) {
    const p: Promise<void> = sender.send({ to: 'receiver', content: `m${i}` }).then((r) => {
      receipts.push(r);
      if (receipts.length === killAfter) restarted = broker.restart(signal);
    });
    inFlight.add(p);
    void p.finally(() => inFlight.delete(p)).catch(() => undefined);
    if (inFlight.size >= 32) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
  assert.ok(restarted, 'the broker was restarted mid-stream');
  await restarted;
  assert.ok(senderWelcomes.length >= 1, 'the sender reconnected');
  // A killed broker just vanishes (1006); a stopped one says it is going away (1001).
  assert.equal(senderCloses[0], signal === 'SIGTERM' ? 1001 : 1006);

  // Every send got a receipt; each was stored once.
  assert.equal(receipts.length, total);
  const seqs = receipts.map((r) => r.seq);
  assert.equal(new Set(seqs).size, total, 'one seq per message');
  assert.equal(new Set(receipts.map((r) => r.id)).size, total);
  const history = await broker.rest(projectId).historyAll({ sender: 'sender' });
  assert.equal(history.length, total, 'no message stored twice, none lost');
  assert.deepEqual(
    history.map((m) => m.content).sort(),
    Array.from({ length: total }, (_, i) => `m${i}`).sort(),
  );
  const byId = new Map(history.map((m) => [m.id, m]));
  for (const r of receipts) assert.equal(byId.get(r.id)?.client_msg_id, r.client_msg_id);

  // The receiver got every one exactly once, in seq order.
  await until(`the receiver handled all ${total}`, () => handled.length >= total, { timeoutMs: 30_000 });
  assert.equal(handled.length, total, 'no duplicate reached the handler');
  assert.deepEqual(handled, [...seqs].sort((a, b) => a - b), 'every receipted message, in seq order');
  for (const m of history) assert.equal(contents.get(m.seq), m.content);

  // Nothing is owed any more: in manual mode every handled message was acknowledged.
  await until(
    'nothing owed to the receiver',
    async () => (await broker.rest(projectId).agents()).agents.find((a) => a.agent_id === 'receiver')?.queue_depth === 0,
  );
}

test('auto mode: the broker restarted mid-stream, no loss and no duplicate', (t) => restartMidStream(t, 'auto'));

test('manual mode: the broker restarted mid-stream, no loss and no duplicate', (t) => restartMidStream(t, 'manual'));

test('a graceful restart (SIGTERM: unavailable, then 1001) mid-stream, no loss and no duplicate', (t) =>
  restartMidStream(t, 'manual', 'SIGTERM'));

test('a send whose receipt was lost with the connection is sent again and stored once', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const proxy = await TcpProxy.start(t, broker.port);
  const receiver = await connect({ url: broker.url, projectId, agentId: 'receiver' });
  t.after(() => receiver.close());
  const received: string[] = [];
  receiver.events.on('message', (m) => received.push(m.content));
  const sender = await connect({ url: proxy.url, projectId, agentId: 'sender', reconnect: fastReconnect });
  t.after(() => sender.close());
  assert.equal(proxy.accepted, 1);

  // The frame reaches the broker, which stores and delivers it, but its receipt never arrives.
  proxy.holdReplies = true;
  const sending = sender.send({ to: 'receiver', content: 'exactly once' });
  const rest = broker.rest(projectId);
  await until('the message is stored', async () => (await rest.history()).messages.length === 1);
  await until('the receiver has it', () => received.length === 1);
  assert.equal(sender.pendingSendCount, 1, 'no receipt yet');

  // The connection drops; the client reconnects and sends the same frame again.
  proxy.holdReplies = false;
  const welcomed = nextEvent(sender.events, 'welcome');
  proxy.dropAll();
  await welcomed;
  const receipt = await sending;
  assert.equal(proxy.accepted, 2, 'the client reconnected');

  const { messages } = await rest.history();
  assert.equal(messages.length, 1, 'stored once');
  const stored = messages[0]!;
  assert.equal(receipt.id, stored.id, 'the original receipt');
  assert.equal(receipt.seq, stored.seq);
  assert.equal(receipt.client_msg_id, stored.client_msg_id);
  assert.equal(receipt.created_at, stored.created_at);

  // Delivered once: a later message comes right after it, with nothing in between.
  await sender.send({ to: 'receiver', content: 'after' });
  await until('the receiver has the later message', () => received.includes('after'));
  assert.deepEqual(received, ['exactly once', 'after']);
});

test('a reply replayed before its request is receipted again still settles the request', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const proxy = await TcpProxy.start(t, broker.port);
  const responder = await connect({ url: broker.url, projectId, agentId: 'responder' });
  t.after(() => responder.close());
  responder.on('request', (m) => `answer to ${m.content}`);
  const asker = await connect({ url: proxy.url, projectId, agentId: 'asker', reconnect: fastReconnect });
  t.after(() => asker.close());
  const handedOn: string[] = [];
  asker.register((m) => {
    handedOn.push(m.content);
  });

  // The request is stored and answered, but the asker hears neither receipt nor reply.
  proxy.holdReplies = true;
  const asking = asker.request({ type: 'request', to: 'responder', content: 'q1' }, { timeoutMs: 30_000 });
  const rest = broker.rest(projectId);
  await until('the request and its reply are stored', async () => (await rest.history()).messages.length === 2);

  // On the next connection the reply is replayed first; the request's receipt comes after it.
  proxy.holdReplies = false;
  const welcomed = nextEvent(asker.events, 'welcome', (w) => w.replay === 1);
  proxy.dropAll();
  await welcomed;
  const reply = await asking;
  assert.equal(reply.content, 'answer to q1');
  assert.equal(reply.in_reply_to_seq, 1);
  assert.equal((await rest.history()).messages.length, 2, 'the request was stored once');
  assert.deepEqual(handedOn, [], 'the reply settled the request instead of going to a handler');
});

test('hello is declared again on every connection', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const proxy = await TcpProxy.start(t, broker.port);
  const agent = await connect({
    url: proxy.url,
    projectId,
    agentId: 'reviewer',
    capabilities: ['initial'],
    reconnect: fastReconnect,
  });
  t.after(() => agent.close());
  const rest = broker.rest(projectId);
  const declared = async () => (await rest.agents()).agents.find((a) => a.agent_id === 'reviewer');
  assert.deepEqual((await declared())?.capabilities, ['initial']);
  agent.hello(['review', 'rust'], 'Reviews Rust changes');
  await until('the hello is stored', async () => (await declared())?.description === 'Reviews Rust changes');

  // The new connection names `capabilities=initial` again, which replaces the list; the hello follows it.
  const welcomed = nextEvent(agent.events, 'welcome');
  proxy.dropAll();
  await welcomed;
  assert.equal(proxy.accepted, 2);
  await until('the hello is stored again', async () => {
    const a = await declared();
    return a?.description === 'Reviews Rust changes' && a.capabilities.join(',') === 'review,rust' && a.online;
  });
});
