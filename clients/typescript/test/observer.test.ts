/**
 * The read-only observer socket (`/ws/agent/messages/{project_id}` without `agent_id`), through
 * `observe()` and, for what the library never sends, through a raw WebSocket.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { TestContext } from 'node:test';

import WebSocket from 'ws';

import { AgentBusError, connect, observe } from '@agentbus/client';
import type { Message, Observer } from '@agentbus/client';

import { Broker, TcpProxy, nextEvent, until } from './helpers.js';

/** Opens an observer that reconnects quickly, closed when the test ends. */
async function observer(t: TestContext, options: Parameters<typeof observe>[0]): Promise<Observer> {
  const o = await observe({ reconnect: { initialDelayMs: 50, maxDelayMs: 500 }, ...options });
  t.after(() => o.close());
  return o;
}

function collect(observer: Observer): Message[] {
  const seen: Message[] = [];
  observer.events.on('message', (m) => seen.push(m));
  return seen;
}

/** The frames a raw WebSocket receives, and a way to wait for the next one. */
function rawFrames(ws: WebSocket): { frames: Record<string, unknown>[]; next(): Promise<Record<string, unknown>> } {
  const frames: Record<string, unknown>[] = [];
  const waiters: Array<(f: Record<string, unknown>) => void> = [];
  let read = 0;
  ws.on('message', (data) => {
    frames.push(JSON.parse(data.toString()) as Record<string, unknown>);
    while (waiters.length > 0 && read < frames.length) waiters.shift()!(frames[read++]!);
  });
  return {
    frames,
    next: () =>
      new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no frame within 10 s')), 10_000);
        const take = (f: Record<string, unknown>) => {
          clearTimeout(timer);
          resolve(f);
        };
        if (read < frames.length) take(frames[read++]!);
        else waiters.push(take);
      }),
  };
}

test('an observer sees every message of its project, broadcast and direct, and no other project', async (t) => {
  const broker = await Broker.start(t);
  const projectA = await broker.createProject('a');
  const projectB = await broker.createProject('b');
  const observerA = await observer(t, { url: broker.url, projectId: projectA });
  assert.equal(observerA.welcome?.observer, true);
  assert.equal(observerA.welcome?.project_id, projectA);
  assert.equal(observerA.welcome?.head_seq, 0);
  const seen = collect(observerA);
  const observerB = await observer(t, { url: broker.url, projectId: projectB });
  const seenB = collect(observerB);

  const alice = await connect({ url: broker.url, projectId: projectA, agentId: 'alice', agentType: 'coder' });
  t.after(() => alice.close());
  const bob = await connect({ url: broker.url, projectId: projectA, agentId: 'bob', agentType: 'reviewer' });
  t.after(() => bob.close());
  const carol = await connect({ url: broker.url, projectId: projectB, agentId: 'carol' });
  t.after(() => carol.close());

  await carol.send({ content: 'in project b' });
  await until('observer b sees its message', () => seenB.length === 1);
  await alice.send({ content: 'broadcast' });
  await alice.send({ to: 'bob', content: 'direct to bob' });
  await bob.send({ to_type: 'coder', content: 'to the coders' });
  await alice.send({ to: 'alice', content: 'a note to self' });
  await until('the observer sees the four messages', () => seen.length === 4);
  assert.deepEqual(
    seen.map((m) => [m.seq, m.content]),
    [
      [1, 'broadcast'],
      [2, 'direct to bob'],
      [3, 'to the coders'],
      [4, 'a note to self'],
    ],
  );
  assert.ok(seen.every((m) => m.project_id === projectA));
  assert.equal(seen[1]?.to, 'bob');
  assert.equal(seen[2]?.to_type, 'coder');
  assert.deepEqual(seenB.map((m) => m.content), ['in project b']);
  assert.equal(observerA.lastSeq, 4);

  // It is no member: not listed, nothing owed.
  const { agents } = await broker.rest(projectA).agents();
  assert.deepEqual(agents.map((a) => a.agent_id).sort(), ['alice', 'bob']);
});

test('an observer is read-only and counts as no recipient', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const seen = collect(await observer(t, { url: broker.url, projectId }));

  const ws = new WebSocket(`ws://127.0.0.1:${broker.port}/ws/agent/messages/${projectId}`);
  t.after(() => ws.close());
  const raw = rawFrames(ws);
  const welcome = await raw.next();
  assert.equal(welcome.op, 'welcome');
  assert.equal(welcome.observer, true);
  for (const frame of [{ content: 'may I?', client_msg_id: 'o-1' }, { op: 'ack', up_to: 1 }, { op: 'hello', capabilities: [] }]) {
    ws.send(JSON.stringify(frame));
    const answer = await raw.next();
    assert.equal(answer.op, 'error');
    assert.equal(answer.code, 'observer_read_only');
  }
  assert.equal((await broker.rest(projectId).history()).messages.length, 0, 'nothing stored');

  // With only observers listening, a request has nobody to go to.
  const alone = await connect({ url: broker.url, projectId, agentId: 'alone' });
  t.after(() => alone.close());
  await assert.rejects(
    alone.request({ content: 'anyone?' }, { timeoutMs: 60_000 }),
    (e: unknown) => e instanceof AgentBusError && e.code === 'no_recipient',
  );
  await until('both observers see the request', () => raw.frames.some((f) => f.content === 'anyone?') && seen.length === 1);
  assert.equal(seen[0]?.expects_reply, true);
});

test('an observer resumes with since: from a seq, and after a dropped connection', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const proxy = await TcpProxy.start(t, broker.port);
  const writer = await connect({ url: broker.url, projectId, agentId: 'writer' });
  t.after(() => writer.close());
  for (let i = 1; i <= 5; i++) await writer.send({ content: `early ${i}` });

  const fromTwo = await observer(t, { url: broker.url, projectId, since: 2 });
  const seenFromTwo = collect(fromTwo);
  assert.equal(fromTwo.welcome?.head_seq, 5);
  assert.equal(fromTwo.welcome?.replay, 3);
  await until('the replay after seq 2', () => seenFromTwo.length === 3);
  assert.deepEqual(seenFromTwo.map((m) => m.seq), [3, 4, 5]);

  // Through the proxy: the connection is cut while messages are sent; the observer resumes.
  const resumed = await observer(t, { url: proxy.url, projectId, since: 0 });
  const seen = collect(resumed);
  await until('the whole history', () => seen.length === 5);
  const reconnected = nextEvent(resumed.events, 'welcome');
  proxy.dropAll();
  for (let i = 6; i <= 15; i++) await writer.send({ content: `late ${i}` });
  await reconnected;
  assert.equal(proxy.accepted, 2);
  await until('every message', () => seen.length >= 15);
  assert.deepEqual(
    seen.map((m) => m.seq),
    Array.from({ length: 15 }, (_, i) => i + 1),
    'each message once, in seq order',
  );
  await until('the other observer too', () => seenFromTwo.length === 13);
  assert.deepEqual(seenFromTwo.map((m) => m.seq), Array.from({ length: 13 }, (_, i) => i + 3));
});

test('messages that arrive before the first listener is attached are kept for it', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject();
  const writer = await connect({ url: broker.url, projectId, agentId: 'writer' });
  t.after(() => writer.close());
  for (let i = 1; i <= 5; i++) await writer.send({ content: `m${i}` });
  const o = await observer(t, { url: broker.url, projectId, since: 0 });
  // A caller that attaches its listener late: the replay has arrived by then.
  await until('the replay to have arrived', () => (o as unknown as { held: Message[] }).held.length === 5);
  const seen = collect(o);
  assert.deepEqual(seen.map((m) => m.seq), [1, 2, 3, 4, 5], 'handed over at once, in order');
  await writer.send({ content: 'live' });
  await until('the live message', () => seen.length === 6);
  assert.equal(seen[5]?.content, 'live');
});
