/**
 * seed 004's own examples (COMMUNICATION_PROTOCOL.md), run against a real broker. Each one is
 * as the seed wrote it except the line that constructs the MessageBus; the code around them
 * (starting a broker, `expect`, a logger) stands in for what the seed's project provided.
 */
import assert from 'node:assert/strict';
import { after, afterEach, before, beforeEach, describe, test } from 'node:test';

import { AgentBusError, BaseAgent, MessageBus, MessagePriority, MessageType } from '@agentbus/client';
import type { AgentConfig, AgentMessage, AgentType, MessageBusEvents, MessageResponse } from '@agentbus/client';

import { Broker, deferred, nextEvent, until } from './helpers.js';

/** The two matchers of Jest's `expect` that the seed's unit test uses. */
function expect(actual: unknown) {
  return {
    toBe: (expected: unknown) => assert.strictEqual(actual, expected),
    not: { toBeNull: () => assert.notStrictEqual(actual, null) },
  };
}

// --- The seed's "Unit Test Example", unchanged but for the construction line ---------------

let broker: Broker;
let projectId: string;
let buses: MessageBus[] = [];

describe('MessageBus', () => {
  before(async () => {
    broker = await Broker.start();
    projectId = await broker.createProject('seed004 unit test');
  });
  afterEach(async () => {
    await Promise.all(buses.map((b) => b.close()));
    buses = [];
  });
  after(() => broker?.cleanup());

  let bus: MessageBus;

  beforeEach(() => {
    bus = new MessageBus({ url: broker.url, projectId, enableLogging: false });
    buses.push(bus);
  });

  test('should register and send message', async () => {
    let received: any = null;

    bus.register('CodeGenAgent', async (message) => {
      received = message;
      return {
        messageId: message.id,
        success: true,
        timestamp: new Date().toISOString(),
      };
    });

    const message = bus.createMessage(
      'CoordinatorAgent',
      'CodeGenAgent',
      MessageType.TASK_ASSIGNMENT,
      { task: 'test' },
      MessagePriority.HIGH
    );

    await bus.send(message);

    expect(received).not.toBeNull();
    expect(received.type).toBe(MessageType.TASK_ASSIGNMENT);
  });

  test('the message went through the broker', async () => {
    // Not the seed's: what the test above left in the project's history.
    const { messages } = await broker.rest(projectId).history();
    const request = messages.find((m) => m.message_type === 'task_assignment');
    assert.ok(request, 'the task assignment is stored');
    assert.equal(request.sender_agent_id, 'CoordinatorAgent');
    assert.equal(request.to_type, 'CodeGenAgent');
    assert.equal(request.priority, 1);
    assert.equal(request.expects_reply, true);
    assert.deepEqual(JSON.parse(request.content), { task: 'test' });
    assert.equal((request.metadata.agent_message as { payload?: string }).payload, 'json');
    const reply = messages.find((m) => m.reply_to === request.id);
    assert.ok(reply, 'the handler answered');
    assert.equal(reply.sender_agent_id, 'CodeGenAgent');
    assert.equal(reply.to, 'CoordinatorAgent');
    assert.equal(reply.success, true);
  });
});

// --- The seed's CodeGenAgent, CoordinatorAgent.assignTask and sendAndWait snippets ----------

interface Task {
  title: string;
}
interface TaskAssignmentPayload {
  task: Task;
}

const logger = {
  errors: [] as string[],
  error(text: string) {
    this.errors.push(text);
  },
};

export class CodeGenAgent extends BaseAgent {
  readonly executed: Task[] = [];

  constructor(config: AgentConfig) {
    super('CodeGenAgent', config);

    // Register to receive messages
    this.registerMessageHandler();
  }

  // Override to handle incoming messages
  protected async receiveMessage(
    message: AgentMessage
  ): Promise<MessageResponse> {
    switch (message.type) {
      case MessageType.TASK_ASSIGNMENT:
        return await this.handleTaskAssignment(message);

      case MessageType.STATUS_UPDATE:
        return await this.handleStatusUpdate(message);

      default:
        return {
          messageId: message.id,
          success: false,
          error: `Unknown message type: ${message.type}`,
          timestamp: new Date().toISOString(),
        };
    }
  }

  private async handleTaskAssignment(
    message: AgentMessage<TaskAssignmentPayload>
  ): Promise<MessageResponse> {
    const { task } = message.payload;

    // Execute task...
    const result = await this.execute(task);

    return {
      messageId: message.id,
      success: true,
      payload: { result },
      timestamp: new Date().toISOString(),
    };
  }

  // Not in the seed's excerpt: the agent's own work, and the other handler it names.
  protected override async execute(task: Task): Promise<string> {
    this.executed.push(task);
    return `generated code for "${task.title}"`;
  }

  private async handleStatusUpdate(message: AgentMessage): Promise<MessageResponse> {
    return { messageId: message.id, success: true, payload: { seen: message.payload }, timestamp: new Date().toISOString() };
  }
}

class CoordinatorAgent extends BaseAgent {
  constructor(config: AgentConfig) {
    super('CoordinatorAgent', config);
  }

  // In CoordinatorAgent
  async assignTask(task: Task, agentType: AgentType): Promise<void> {
    const response = await this.sendMessage(
      agentType,
      MessageType.TASK_ASSIGNMENT,
      { task },
      MessagePriority.HIGH
    );

    if (!response.success) {
      logger.error(`Task assignment failed: ${response.error}`);
    }
  }
}

test('coordinator → codegen through two buses, as in two processes', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject('seed004');

  // The CodeGenAgent's process.
  const codegenBus = new MessageBus({ url: broker.url, projectId });
  t.after(() => codegenBus.close());
  const codegen = new CodeGenAgent({ messageBus: codegenBus });
  await codegenBus.ready();

  // The coordinator's process, with the seed's debugging listeners.
  const globalMessageBus = new MessageBus({ url: broker.url, projectId });
  t.after(() => globalMessageBus.close());
  const sent: AgentMessage[] = [];
  const responses: MessageResponse[] = [];
  globalMessageBus.on('message:sent', (message) => {
    sent.push(message);
  });
  globalMessageBus.on('message:response', (response) => {
    responses.push(response);
  });
  const coordinator = new CoordinatorAgent({ messageBus: globalMessageBus });

  await coordinator.assignTask({ title: 'retry policy' }, 'CodeGenAgent');
  assert.deepEqual(logger.errors, []);
  assert.deepEqual(codegen.executed, [{ title: 'retry policy' }]);
  assert.equal(sent.length, 1);
  assert.equal(sent[0]?.type, MessageType.TASK_ASSIGNMENT);
  assert.equal(responses.length, 1);
  assert.deepEqual(responses[0]?.payload, { result: 'generated code for "retry policy"' });
  assert.equal(responses[0]?.messageId, sent[0]?.id, 'the response names the message the coordinator created');
  assert.equal(typeof responses[0]?.durationMs, 'number');

  // The seed's "Send and Wait for Response" snippet.
  const task = { title: 'parser' };
  const message = globalMessageBus.createMessage(
    'CoordinatorAgent',
    'CodeGenAgent',
    MessageType.TASK_ASSIGNMENT,
    { task }
  );

  const response = await globalMessageBus.sendAndWait(message, 30000); // 30s timeout

  if (response.success) {
    console.log('Task accepted:', response.payload);
  }
  assert.equal(response.success, true);
  assert.deepEqual(response.payload, { result: 'generated code for "parser"' });
  assert.equal(response.messageId, message.id);

  // The other branches of the seed's receiveMessage.
  const update = await coordinator.sendMessage('CodeGenAgent', MessageType.STATUS_UPDATE, { progress: 50 });
  assert.equal(update.success, true);
  assert.deepEqual(update.payload, { seen: { progress: 50 } });
  const unknown = await coordinator.sendMessage('CodeGenAgent', MessageType.ESCALATION, 'blocked on CI');
  assert.equal(unknown.success, false);
  assert.equal(unknown.error, 'Unknown message type: escalation');

  // The seed's "View Message Log": what this bus sent, and its statistics.
  const messages = globalMessageBus.getMessageLog(50);
  assert.deepEqual(
    messages.map((m) => m.type),
    ['task_assignment', 'task_assignment', 'status_update', 'escalation'],
  );
  const stats = globalMessageBus.getStats();
  assert.equal(stats.messageLogSize, 4);
  assert.equal(stats.registeredAgents, 0, 'the coordinator registered no handler');
  // A handler that answers holds its message until the receipt of its reply arrives, and the
  // coordinator may get the reply itself a moment before that.
  await until('the codegen bus finished its handlers', () => codegenBus.getQueueSize('CodeGenAgent') === 0);
  assert.deepEqual(codegenBus.getStats().queueSizesByAgent, { CodeGenAgent: 0 });
  assert.equal(codegenBus.getQueueSize('CodeGenAgent'), 0);

  // The same, as the broker has it.
  const log = await globalMessageBus.fetchMessageLog(50);
  assert.equal(log.length, 8, 'four messages and four responses');
  const stored = log.find((m) => m.agentbus?.originalId === message.id);
  assert.ok(stored, 'the stored message carries the id the coordinator gave it');
  assert.deepEqual(stored.payload, { task });
  assert.equal(stored.from, 'CoordinatorAgent');
  assert.equal(stored.to, 'CodeGenAgent');
  assert.equal(stored.priority, MessagePriority.MEDIUM);
  assert.equal(stored.ttl, 300_000, 'createMessage gives the seed default ttl');
  await until('nothing owed to CodeGenAgent', async () => (await globalMessageBus.fetchQueueSize('CodeGenAgent')) === 0);
  const remoteStats = await globalMessageBus.fetchStats();
  assert.equal(remoteStats.head_seq, 8);
});

test('failures: a throwing handler, nobody to receive, a response too slow', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject('seed004 failures');
  const workers = new MessageBus({ url: broker.url, projectId, enableLogging: false });
  t.after(() => workers.close());
  const errors: { message: AgentMessage; error: unknown }[] = [];
  workers.on('message:error', (e) => {
    errors.push(e);
  });
  workers.register('FlakyAgent', async () => {
    throw new Error('disk full');
  });
  const release = deferred<void>();
  workers.register('SlowAgent', async (message) => {
    await release.promise;
    return { messageId: message.id, success: true, timestamp: new Date().toISOString() };
  });
  await workers.ready();

  const bus = new MessageBus({ url: broker.url, projectId, enableLogging: false });
  t.after(() => bus.close());
  const requesterErrors: unknown[] = [];
  bus.on('message:error', ({ error }) => {
    requesterErrors.push(error);
  });

  // A handler that throws: the sender gets a failed response; the handler's bus reports it.
  const flaky = await bus.send(bus.createMessage('CoordinatorAgent', 'FlakyAgent', MessageType.TASK_ASSIGNMENT, {}));
  assert.equal(flaky.success, false);
  assert.equal(flaky.error, 'disk full');
  assert.equal(errors.length, 1);
  assert.equal((errors[0]?.error as Error).message, 'disk full');
  assert.equal(errors[0]?.message.from, 'CoordinatorAgent');

  // No agent of that type: send() answers with a failed response, sendAndWait() rejects at once.
  const nobody = await bus.send(bus.createMessage('CoordinatorAgent', 'NobodyAgent', MessageType.HEARTBEAT, 'ping'));
  assert.equal(nobody.success, false);
  assert.match(nobody.error ?? '', /^No handler registered for agent: NobodyAgent/);
  await assert.rejects(
    bus.sendAndWait(bus.createMessage('CoordinatorAgent', 'NobodyAgent', MessageType.HEARTBEAT, 'ping'), 60_000),
    (e: unknown) => e instanceof AgentBusError && e.code === 'no_recipient',
  );

  // No response in time: the seed's error.
  await assert.rejects(
    bus.sendAndWait(bus.createMessage('CoordinatorAgent', 'SlowAgent', MessageType.CAPABILITY_QUERY, '?'), 500),
    (e: unknown) => e instanceof AgentBusError && e.code === 'timeout' && e.message === 'Message timeout after 500ms',
  );
  assert.equal(workers.getQueueSize('SlowAgent'), 1, 'the slow handler still holds the message');
  release.resolve();
  await until('the slow handler finished', () => workers.getQueueSize('SlowAgent') === 0);
  assert.equal(requesterErrors.length, 3);

  // An invalid message is refused before anything is sent.
  await assert.rejects(
    bus.send({ ...bus.createMessage('CoordinatorAgent', 'SlowAgent', MessageType.HEARTBEAT, 1), priority: 7 as MessagePriority }),
    /Invalid message format: `priority` must be 0, 1, 2 or 3/,
  );
});

test('messages wait at the broker for an agent that is away', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject('seed004 offline');

  // The codegen agent connects once (it becomes a member), then goes away.
  const first = new MessageBus({ url: broker.url, projectId, enableLogging: false });
  first.register('CodeGenAgent', async (message) => ({ messageId: message.id, success: true, timestamp: '' }));
  await first.ready();
  await first.close();

  const coordinator = new MessageBus({ url: broker.url, projectId, enableLogging: false });
  t.after(() => coordinator.close());
  const receipt = await coordinator.post(
    coordinator.createMessage('CoordinatorAgent', 'CodeGenAgent', MessageType.TASK_ASSIGNMENT, { task: 'while away' }),
  );
  assert.equal(receipt.seq, 1);
  assert.equal(await coordinator.fetchQueueSize('CodeGenAgent'), 1);

  // It comes back in a new process: the message is delivered and handled there.
  const second = new MessageBus({ url: broker.url, projectId, enableLogging: false });
  t.after(() => second.close());
  const got = deferred<AgentMessage>();
  second.register('CodeGenAgent', async (message) => {
    got.resolve(message);
    return { messageId: message.id, success: true, timestamp: new Date().toISOString() };
  });
  const message = await got.promise;
  assert.deepEqual(message.payload, { task: 'while away' });
  assert.equal(message.agentbus?.seq, 1);
  assert.equal(message.from, 'CoordinatorAgent');
  await until('acknowledged once handled', async () => (await coordinator.fetchQueueSize('CodeGenAgent')) === 0);
});

test('two buses acting as one agent: the older one is told and stops; distinct ids coexist', async (t) => {
  const broker = await Broker.start(t);
  const projectId = await broker.createProject('seed004 identities');
  const answer = (name: string) => async (message: AgentMessage) => ({
    messageId: message.id,
    success: true,
    payload: name,
    timestamp: new Date().toISOString(),
  });
  const first = new MessageBus({ url: broker.url, projectId });
  t.after(() => first.close());
  first.register('CodeGenAgent', answer('first'));
  await first.ready();
  const told = nextEvent<MessageBusEvents, 'agent:error'>(first, 'agent:error');

  const second = new MessageBus({ url: broker.url, projectId });
  t.after(() => second.close());
  second.register('CodeGenAgent', answer('second'));
  await second.ready();
  const { agentType, error } = await told;
  assert.equal(agentType, 'CodeGenAgent');
  assert.equal(error.code, 'replaced');

  const coordinator = new MessageBus({ url: broker.url, projectId });
  t.after(() => coordinator.close());
  const response = await coordinator.sendAndWait(
    coordinator.createMessage('CoordinatorAgent', 'CodeGenAgent', MessageType.TASK_ASSIGNMENT, 'x'),
    10_000,
  );
  assert.equal(response.payload, 'second');

  // With an id of its own, another CodeGenAgent process is a second member of the type.
  const third = new MessageBus({ url: broker.url, projectId, agentId: (type) => `${type}-2` });
  t.after(() => third.close());
  third.register('CodeGenAgent', answer('third'));
  await third.ready();
  const { agents } = await coordinator.rest.agents();
  const online = agents.filter((a) => a.agent_type === 'CodeGenAgent' && a.online).map((a) => a.agent_id);
  assert.deepEqual(online.sort(), ['CodeGenAgent', 'CodeGenAgent-2']);
});
