/**
 * seed 004's agent protocol (the Miyabi `MessageBus`) over agentbus: the same classes, types,
 * methods and events, with messages that travel through a broker instead of staying in one
 * process. The README's "seed 004" section has the mapping and every difference.
 */
import { AgentBusClient } from './client.js';
import type { ReplyInit } from './client.js';
import { Emitter } from './emitter.js';
import { AgentBusError, invalidArgument } from './errors.js';
import { RestClient } from './rest.js';
import type { WebSocketConstructor } from './transport.js';
import type { JsonObject, Message, RequestFields, SentReceipt, StoredMessage } from './types.js';
import { describe, isUuid, uuid } from './util.js';

/** The eight message types of seed 004; their values are the agentbus message types. */
export enum MessageType {
  TASK_ASSIGNMENT = 'task_assignment',
  STATUS_UPDATE = 'status_update',
  ESCALATION = 'escalation',
  RESULT_REPORT = 'result_report',
  ERROR_REPORT = 'error_report',
  HEARTBEAT = 'heartbeat',
  CAPABILITY_QUERY = 'capability_query',
  CAPABILITY_RESPONSE = 'capability_response',
}

/** seed 004's priorities, which are agentbus's (0 critical … 3 low). */
export enum MessagePriority {
  CRITICAL = 0,
  HIGH = 1,
  MEDIUM = 2,
  LOW = 3,
}

/** An agent type, such as `CodeGenAgent`: 1 to 50 of `A-Z a-z 0-9 _ - . :`. */
export type AgentType = string;

/** What agentbus adds to a received `AgentMessage`. */
export interface AgentbusInfo {
  /** The stored message's seq in the project. */
  seq: number;
  /** The sending connection's agent id. */
  senderAgentId: string;
  /** The id the sender gave the message with `createMessage` (the broker's `id` is `AgentMessage.id`). */
  originalId?: string;
  /** When the broker committed it. */
  createdAt: string;
  /** Whether the sender waits for a response. */
  expectsReply: boolean;
  /** The message as the broker delivered it. */
  message: Message;
}

/**
 * seed 004's message. (The payload's type defaults to `any`, not the seed's `unknown`: with
 * `unknown`, the seed's own `CodeGenAgent` example, which passes an `AgentMessage` to a method
 * taking an `AgentMessage<TaskAssignmentPayload>`, does not compile.)
 */
export interface AgentMessage<T = any> {
  /** A UUID: from `createMessage` when sending; the broker's message id when received. */
  id: string;
  from: AgentType;
  /** An agent type (every agent of that type receives it), or `*` for every agent of the project. */
  to: AgentType;
  type: MessageType;
  priority: MessagePriority;
  payload: T;
  /** ISO 8601. */
  timestamp: string;
  correlationId?: string;
  /** The id of the message this one answers: a broker message id. */
  replyTo?: string;
  /** Time to live, in milliseconds. */
  ttl?: number;
  /** Set on received messages only. */
  agentbus?: AgentbusInfo;
}

export interface MessageResponse<T = any> {
  messageId: string;
  success: boolean;
  payload?: T;
  error?: string;
  timestamp: string;
  durationMs?: number;
}

export type MessageHandler = (message: AgentMessage) => Promise<MessageResponse> | MessageResponse;

export interface MessageBusConfig {
  /** The broker's address, such as `http://127.0.0.1:8080`. */
  url: string;
  projectId: string;
  /** A project token or the admin token, when the broker requires tokens. */
  token?: string;
  /** Keep the messages this bus sends in `getMessageLog()` (default true, as in seed 004). */
  enableLogging?: boolean;
  /** The `ttl` `createMessage` gives (default 300000 ms, as in seed 004). 0: none. */
  defaultTtl?: number;
  /** How many sent messages `getMessageLog()` keeps (default 1000). */
  maxLogSize?: number;
  /**
   * How long `send()` waits for the recipient's response when the message has no `ttl`
   * (default 30000 ms). With a `ttl`, `send()` waits as long as the message lives.
   */
  responseTimeout?: number;
  /** The agent id this bus uses for an agent type (default: the type itself). */
  agentId?: (agentType: AgentType) => string;
  /** A line for each message sent and each one processed, when `enableLogging` (default: none). */
  logger?: (line: string) => void;
  /** The WebSocket class (default: `ws` in Node, the standard one elsewhere). */
  WebSocket?: WebSocketConstructor;
}

export interface MessageBusEvents {
  'message:sent': AgentMessage;
  'message:response': MessageResponse;
  'message:error': { message: AgentMessage; error: unknown };
  'agent:registered': { agentType: AgentType };
  'agent:unregistered': { agentType: AgentType };
  /**
   * Not in seed 004: the connection of one of this bus's agents stopped for good (its agent id
   * was taken over by another connection, its token was revoked, the broker refused it).
   */
  'agent:error': { agentType: AgentType; error: AgentBusError };
}

/** The statistics `getStats()` returns (the seed's fields). */
export interface MessageBusStats {
  registeredAgents: number;
  totalQueueSize: number;
  messageLogSize: number;
  queueSizesByAgent: Record<AgentType, number>;
}

interface Connection {
  client: AgentBusClient;
  ready: Promise<void>;
}

const MAX_TIMEOUT_MS = 86_400_000;
const MAX_TTL_MS = 2_592_000_000;

/**
 * seed 004's `MessageBus`, remote. Each agent type this bus registers a handler for, or sends
 * from, is one agentbus agent (id: the type, unless `agentId` says otherwise) connected in
 * manual-ack mode, so a message is acknowledged only once its handler has returned.
 */
export class MessageBus extends Emitter<MessageBusEvents> {
  /** REST helpers for the same broker, project and token. */
  readonly rest: RestClient;
  private readonly config: Required<
    Pick<MessageBusConfig, 'enableLogging' | 'defaultTtl' | 'maxLogSize' | 'responseTimeout'>
  > &
    MessageBusConfig;
  private readonly handlers = new Map<AgentType, MessageHandler>();
  private readonly waiting = new Map<AgentType, Array<(handler: MessageHandler | undefined) => void>>();
  private readonly connections = new Map<AgentType, Connection>();
  private messageLog: AgentMessage[] = [];
  private closed = false;

  constructor(config: MessageBusConfig) {
    super();
    if (config === null || typeof config !== 'object') {
      throw invalidArgument('MessageBus needs a configuration: at least `url` and `projectId` of the broker');
    }
    this.rest = new RestClient({
      url: config.url,
      projectId: config.projectId,
      ...(config.token === undefined ? {} : { token: config.token }),
    });
    const config2 = {
      ...config,
      enableLogging: config.enableLogging ?? true,
      defaultTtl: config.defaultTtl ?? 300_000,
      maxLogSize: config.maxLogSize ?? 1000,
      responseTimeout: config.responseTimeout ?? 30_000,
    };
    for (const key of ['defaultTtl', 'maxLogSize', 'responseTimeout'] as const) {
      const v = config2[key];
      if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
        throw invalidArgument(`\`${key}\` must be a number of at least 0, not ${describe(v)}`);
      }
    }
    if (config.agentId !== undefined && typeof config.agentId !== 'function') {
      throw invalidArgument('`agentId` must be a function from an agent type to an agent id');
    }
    this.config = config2;
  }

  // ----------------------------------------------------------------------------------------
  // Registration

  /**
   * Handles the messages sent to `agentType`. Connects that agent (in the background; `send`
   * and `ready` wait for it). Replaces a handler registered before.
   */
  register(agentType: AgentType, handler: MessageHandler): void {
    if (typeof handler !== 'function') throw invalidArgument('a message handler must be a function');
    this.checkOpen();
    this.connection(agentType); // validates the type before anything is registered
    this.handlers.set(agentType, handler);
    const waiters = this.waiting.get(agentType);
    if (waiters) {
      this.waiting.delete(agentType);
      waiters.forEach((wake) => wake(handler));
    }
    this.log(`Registered handler for ${agentType}`);
    this.emit('agent:registered', { agentType });
  }

  /**
   * Removes the handler of `agentType`. Messages for it that arrive afterwards stay
   * unacknowledged (owed) and wait for a handler to be registered again.
   */
  unregister(agentType: AgentType): void {
    this.handlers.delete(agentType);
    this.log(`Unregistered handler for ${agentType}`);
    this.emit('agent:unregistered', { agentType });
  }

  isRegistered(agentType: AgentType): boolean {
    return this.handlers.has(agentType);
  }

  getRegisteredAgents(): AgentType[] {
    return [...this.handlers.keys()];
  }

  /** Resolves once every agent this bus has started to connect is connected. */
  async ready(): Promise<void> {
    await Promise.all([...this.connections.values()].map((c) => c.ready));
  }

  // ----------------------------------------------------------------------------------------
  // Sending

  /**
   * Sends `message` to every agent of type `message.to` and resolves with the response of the
   * first one to answer (its handler's `MessageResponse`). Resolves with `success: false` when
   * no agent of that type is a member of the project, or when no response came in time (the
   * message's `ttl`, else `responseTimeout`). Rejects when the broker refuses the message.
   */
  async send<T = unknown>(message: AgentMessage<T>): Promise<MessageResponse> {
    const timeoutMs = this.responseTimeoutFor(message);
    try {
      return await this.exchange(message, timeoutMs);
    } catch (error) {
      if (error instanceof AgentBusError && (error.code === 'no_recipient' || error.code === 'timeout')) {
        const response: MessageResponse = {
          messageId: message.id,
          success: false,
          error:
            error.code === 'no_recipient'
              ? `No handler registered for agent: ${message.to} (${error.message})`
              : `Message timeout after ${timeoutMs}ms`,
          timestamp: new Date().toISOString(),
        };
        this.emit('message:error', { message, error });
        return response;
      }
      this.emit('message:error', { message, error });
      throw error;
    }
  }

  /**
   * Sends `message` and resolves with the first response. Rejects with
   * `Message timeout after <timeoutMs>ms` (code `timeout`) when none came in time, and with
   * code `no_recipient` at once when no agent of type `message.to` is a member of the project.
   */
  async sendAndWait<T = unknown>(message: AgentMessage<T>, timeoutMs = 30_000): Promise<MessageResponse> {
    if (typeof timeoutMs !== 'number' || !Number.isFinite(timeoutMs) || timeoutMs < 1) {
      throw invalidArgument(`the timeout must be a number of milliseconds of at least 1, not ${describe(timeoutMs)}`);
    }
    try {
      return await this.exchange(message, Math.min(Math.ceil(timeoutMs), MAX_TIMEOUT_MS));
    } catch (error) {
      this.emit('message:error', { message, error });
      if (error instanceof AgentBusError && error.code === 'timeout') {
        throw new AgentBusError('timeout', `Message timeout after ${timeoutMs}ms`, {
          ...(error.details === undefined ? {} : { details: error.details }),
        });
      }
      throw error;
    }
  }

  /**
   * Sends `message` without waiting for any response: resolves with the broker's receipt once
   * the message is stored. (seed 004's `send` is described as fire-and-forget; this is that.)
   */
  async post<T = unknown>(message: AgentMessage<T>): Promise<SentReceipt> {
    const { conn, frame } = await this.prepare(message);
    const receipt = await conn.client.send(frame);
    this.logSent(message);
    this.emit('message:sent', message);
    return receipt;
  }

  /** A message with seed 004's defaults: a new id, now, `MEDIUM` priority, the default ttl. */
  createMessage<T = unknown>(
    from: AgentType,
    to: AgentType,
    type: MessageType,
    payload: T,
    priority: MessagePriority = MessagePriority.MEDIUM,
  ): AgentMessage<T> {
    const message: AgentMessage<T> = {
      id: uuid(),
      from,
      to,
      type,
      priority,
      payload,
      timestamp: new Date().toISOString(),
    };
    if (this.config.defaultTtl > 0) message.ttl = this.config.defaultTtl;
    return message;
  }

  // ----------------------------------------------------------------------------------------
  // Introspection (local, synchronous, as in seed 004) and its remote counterparts

  /** Messages for `agentType` received by this bus and not yet handled (or being handled). */
  getQueueSize(agentType: AgentType): number {
    return this.connections.get(agentType)?.client.queueSize ?? 0;
  }

  getTotalQueueSize(): number {
    let total = 0;
    for (const c of this.connections.values()) total += c.client.queueSize;
    return total;
  }

  /** The last `limit` messages this bus sent (kept when `enableLogging`). */
  getMessageLog(limit = 100): AgentMessage[] {
    return this.messageLog.slice(-limit);
  }

  clearMessageLog(): void {
    this.messageLog = [];
  }

  getStats(): MessageBusStats {
    const queueSizesByAgent: Record<AgentType, number> = {};
    for (const [agentType, c] of this.connections) queueSizesByAgent[agentType] = c.client.queueSize;
    return {
      registeredAgents: this.handlers.size,
      totalQueueSize: this.getTotalQueueSize(),
      messageLogSize: this.messageLog.length,
      queueSizesByAgent,
    };
  }

  /** What the broker still owes the agent of `agentType` (its `queue_depth`), 0 if it is no member. */
  async fetchQueueSize(agentType: AgentType): Promise<number> {
    const { agents } = await this.rest.agents();
    return agents.find((a) => a.agent_id === this.agentIdFor(agentType))?.queue_depth ?? 0;
  }

  /** The project's last `limit` messages (every sender's), from the broker's history. */
  async fetchMessageLog(limit = 100): Promise<AgentMessage[]> {
    const page = await this.rest.history({ limit: Math.max(1, Math.min(1000, Math.floor(limit))) });
    return page.messages.map((m) => toAgentMessage(storedToMessage(m)));
  }

  /** The project's counters, from the broker. */
  fetchStats(): ReturnType<RestClient['stats']> {
    return this.rest.stats();
  }

  /** Closes every connection of this bus. Handlers waiting for messages stop. */
  async close(): Promise<void> {
    this.closed = true;
    for (const waiters of this.waiting.values()) waiters.forEach((wake) => wake(undefined));
    this.waiting.clear();
    await Promise.all([...this.connections.values()].map((c) => c.client.close()));
  }

  // ----------------------------------------------------------------------------------------
  // Internals

  private agentIdFor(agentType: AgentType): string {
    return this.config.agentId ? this.config.agentId(agentType) : agentType;
  }

  private checkOpen(): void {
    if (this.closed) throw new AgentBusError('closed', 'this MessageBus was closed');
  }

  private log(line: string): void {
    if (this.config.enableLogging && this.config.logger) this.config.logger(line);
  }

  private logSent(message: AgentMessage): void {
    if (!this.config.enableLogging) return;
    this.messageLog.push(message);
    if (this.messageLog.length > this.config.maxLogSize) this.messageLog.splice(0, this.messageLog.length - this.config.maxLogSize);
    this.log(`Message sent: ${message.from} → ${message.to} [${message.type}]`);
  }

  private connection(agentType: AgentType): Connection {
    let conn = this.connections.get(agentType);
    if (conn) return conn;
    const client = new AgentBusClient({
      url: this.config.url,
      projectId: this.config.projectId,
      agentId: this.agentIdFor(agentType),
      agentType,
      ack: 'manual',
      ...(this.config.token === undefined ? {} : { token: this.config.token }),
      ...(this.config.WebSocket === undefined ? {} : { WebSocket: this.config.WebSocket }),
    });
    client.register((m) => this.dispatch(agentType, m));
    client.events.on('close', (event) => {
      if (event.error && !this.closed) this.emit('agent:error', { agentType, error: event.error });
    });
    client.events.on('handlerError', ({ message, error }) => {
      // A message still waiting for a handler when the bus closed is simply left owed.
      if (error instanceof AgentBusError && error.code === 'closed') return;
      this.emit('message:error', { message: toAgentMessage(message), error });
    });
    const ready = client.start().then(() => undefined);
    // A failed first connection is reported by the calls that wait for it.
    ready.catch(() => undefined);
    conn = { client, ready };
    this.connections.set(agentType, conn);
    return conn;
  }

  private async handlerFor(agentType: AgentType): Promise<MessageHandler | undefined> {
    const handler = this.handlers.get(agentType);
    if (handler || this.closed) return handler;
    return new Promise((resolve) => {
      const list = this.waiting.get(agentType) ?? [];
      list.push(resolve);
      this.waiting.set(agentType, list);
    });
  }

  /** Runs the handler of `agentType` for a delivered message; returns the reply of a request. */
  private async dispatch(agentType: AgentType, m: Message): Promise<ReplyInit | undefined> {
    if (m.in_reply_to_seq !== undefined) {
      // A response that came after its sender stopped waiting (a late one, or a second one):
      // reported, not handed to the agent's handler.
      const env = objectAt(m.metadata, 'agent_response');
      this.emit('message:response', toMessageResponse(m, str(env?.messageId) ?? m.reply_to ?? m.id));
      return undefined;
    }
    const handler = await this.handlerFor(agentType);
    if (!handler) throw new AgentBusError('closed', 'this MessageBus was closed before the message was handled');
    const message = toAgentMessage(m);
    const start = Date.now();
    let response: MessageResponse;
    try {
      const result = await handler(message);
      response =
        result && typeof result === 'object'
          ? { ...result }
          : { messageId: message.id, success: true, timestamp: new Date().toISOString() };
    } catch (error) {
      this.emit('message:error', { message, error });
      response = {
        messageId: message.id,
        success: false,
        error: error instanceof Error ? error.message : String(error),
        timestamp: new Date().toISOString(),
      };
    }
    response.durationMs ??= Date.now() - start;
    this.log(`Message processed: ${message.id} (${response.durationMs}ms)`);
    return m.expects_reply ? toReply(response) : undefined;
  }

  private responseTimeoutFor(message: AgentMessage): number {
    const ttl = typeof message?.ttl === 'number' && message.ttl > 0 ? message.ttl : undefined;
    return Math.min(Math.ceil(ttl ?? (this.config.responseTimeout || 30_000)), MAX_TIMEOUT_MS);
  }

  private async prepare(message: AgentMessage): Promise<{ conn: Connection; frame: RequestFields }> {
    checkAgentMessage(message);
    this.checkOpen();
    const frame = this.frameOf(message);
    const conn = this.connection(message.from);
    await this.ready();
    return { conn, frame };
  }

  private async exchange(message: AgentMessage, timeoutMs: number): Promise<MessageResponse> {
    const { conn, frame } = await this.prepare(message);
    const reply = await conn.client.request(frame, {
      timeoutMs,
      onSent: () => {
        this.logSent(message);
        this.emit('message:sent', message);
      },
    });
    const response = toMessageResponse(reply, message.id);
    this.emit('message:response', response);
    return response;
  }

  private frameOf(message: AgentMessage): RequestFields {
    const { content, encoding } = encodePayload(message.payload);
    const frame: RequestFields = {
      type: message.type,
      content,
      metadata: {
        agent_message: compactJson({
          id: message.id,
          from: message.from,
          to: message.to,
          timestamp: message.timestamp,
          payload: encoding,
        }),
      },
      priority: message.priority,
    };
    if (message.to === '*') {
      // every agent of the project
    } else if (message.to === message.from) {
      // The broker does not deliver a message to a type back to its sender: address the agent itself.
      frame.to = this.agentIdFor(message.to);
    } else {
      frame.to_type = message.to;
    }
    if (typeof message.ttl === 'number' && message.ttl > 0) frame.ttl_ms = Math.min(Math.ceil(message.ttl), MAX_TTL_MS);
    if (message.correlationId !== undefined) frame.correlation_id = message.correlationId;
    if (message.replyTo !== undefined) frame.reply_to = message.replyTo;
    return frame;
  }
}

/** The configuration of a `BaseAgent`: the bus it talks through, and anything else the agent needs. */
export interface AgentConfig {
  messageBus?: MessageBus;
  [key: string]: unknown;
}

let defaultBus: MessageBus | undefined;

/** The bus `BaseAgent`s use when their configuration names none. */
export function setDefaultMessageBus(bus: MessageBus | undefined): void {
  defaultBus = bus;
}

/** seed 004's `BaseAgent` messaging methods, over a `MessageBus`. */
export abstract class BaseAgent {
  protected readonly agentType: AgentType;
  protected readonly config: AgentConfig;
  protected readonly messageBus: MessageBus;

  constructor(agentType: AgentType, config: AgentConfig = {}) {
    const bus = config.messageBus ?? defaultBus;
    if (!bus) {
      throw invalidArgument(
        `agent ${describe(agentType)} has no MessageBus: pass \`messageBus\` in its configuration or call setDefaultMessageBus()`,
      );
    }
    this.agentType = agentType;
    this.config = config;
    this.messageBus = bus;
  }

  /** Sends a message to every agent of type `to` and resolves with the first response. */
  sendMessage<T = unknown>(
    to: AgentType,
    type: MessageType,
    payload: T,
    priority: MessagePriority = MessagePriority.MEDIUM,
  ): Promise<MessageResponse> {
    return this.messageBus.send(this.messageBus.createMessage(this.agentType, to, type, payload, priority));
  }

  /** The agent's work on a task; override it (seed 004's agents call it from their handlers). */
  protected async execute(_task: unknown): Promise<unknown> {
    throw new Error(`${this.agentType} does not implement execute(task)`);
  }

  /** Handles a received message; override it. */
  protected async receiveMessage(message: AgentMessage): Promise<MessageResponse> {
    return {
      messageId: message.id,
      success: false,
      error: `Unknown message type: ${message.type}`,
      timestamp: new Date().toISOString(),
    };
  }

  /** Registers `receiveMessage` as the handler of this agent's type. */
  registerMessageHandler(): void {
    this.messageBus.register(this.agentType, (message) => this.receiveMessage(message));
  }

  unregisterMessageHandler(): void {
    this.messageBus.unregister(this.agentType);
  }
}

// ------------------------------------------------------------------------------------------
// Mapping

type Encoding = 'json' | 'text' | 'none';

function encodePayload(payload: unknown): { content: string; encoding: Encoding } {
  if (payload === undefined) return { content: '(no payload)', encoding: 'none' };
  if (typeof payload === 'string' && payload.length > 0) return { content: payload, encoding: 'text' };
  let json: string | undefined;
  try {
    json = JSON.stringify(payload);
  } catch (cause) {
    throw new AgentBusError('invalid_argument', `the payload cannot be written as JSON: ${String(cause)}`, { cause });
  }
  if (json === undefined) throw invalidArgument(`the payload cannot be written as JSON: ${describe(payload)}`);
  return { content: json, encoding: 'json' };
}

function decodePayload(content: string, encoding: unknown): unknown {
  if (encoding === 'none') return undefined;
  if (encoding === 'json') {
    try {
      return JSON.parse(content);
    } catch {
      return content;
    }
  }
  return content;
}

function objectAt(metadata: JsonObject | undefined, key: string): Record<string, unknown> | undefined {
  const v = metadata?.[key];
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
}

function str(v: unknown): string | undefined {
  return typeof v === 'string' ? v : undefined;
}

/** An agentbus message as seed 004's `AgentMessage`. */
export function toAgentMessage(m: Message): AgentMessage {
  const env = objectAt(m.metadata, 'agent_message');
  const message: AgentMessage = {
    id: m.id,
    from: m.sender_agent_type,
    to: str(env?.to) ?? m.to_type ?? m.to ?? '*',
    type: m.message_type as MessageType,
    priority: m.priority as number as MessagePriority,
    payload: env ? decodePayload(m.content, env.payload) : m.content,
    timestamp: str(env?.timestamp) ?? m.created_at,
    agentbus: {
      seq: m.seq,
      senderAgentId: m.sender_agent_id,
      createdAt: m.created_at,
      expectsReply: m.expects_reply === true,
      message: m,
      ...(str(env?.id) === undefined ? {} : { originalId: str(env?.id)! }),
    },
  };
  if (m.correlation_id !== null) message.correlationId = m.correlation_id;
  if (m.reply_to !== null) message.replyTo = m.reply_to;
  if (m.expires_at !== null) {
    const ttl = Date.parse(m.expires_at) - Date.parse(m.created_at);
    if (Number.isFinite(ttl) && ttl > 0) message.ttl = ttl;
  }
  return message;
}

/** A reply from agentbus as seed 004's `MessageResponse` to the message `messageId`. */
export function toMessageResponse(reply: Message, messageId: string): MessageResponse {
  const env = objectAt(reply.metadata, 'agent_response');
  const response: MessageResponse = {
    messageId,
    success: reply.success ?? reply.error === undefined,
    timestamp: str(env?.timestamp) ?? reply.created_at,
  };
  const payload = env ? decodePayload(reply.content, env.payload) : reply.content;
  if (payload !== undefined) response.payload = payload;
  if (reply.error !== undefined) response.error = reply.error;
  const duration = typeof env?.durationMs === 'number' ? env.durationMs : reply.duration_ms;
  if (duration !== undefined) response.durationMs = duration;
  return response;
}

function toReply(response: MessageResponse): ReplyInit {
  const { content, encoding } = encodePayload(response.payload);
  const reply: ReplyInit = {
    content:
      encoding === 'none' ? (response.success ? 'ok' : `failed: ${response.error ?? 'no error given'}`) : content,
    success: response.success !== false,
    metadata: {
      agent_response: compactJson({
        messageId: typeof response.messageId === 'string' ? response.messageId : undefined,
        timestamp: typeof response.timestamp === 'string' ? response.timestamp : new Date().toISOString(),
        durationMs: typeof response.durationMs === 'number' ? response.durationMs : undefined,
        payload: encoding,
      }),
    },
  };
  if (response.error !== undefined) reply.error = String(response.error).slice(0, 4096);
  return reply;
}

function storedToMessage(m: StoredMessage): Message {
  const out: Record<string, unknown> = { ...m };
  for (const key of ['to_type', 'reply_deadline', 'in_reply_to_seq', 'success', 'error', 'duration_ms'] as const) {
    if (out[key] === null) delete out[key];
  }
  if (out.expects_reply !== true) delete out.expects_reply;
  if (out.late !== true) delete out.late;
  return out as unknown as Message;
}

function compactJson(value: Record<string, string | number | undefined>): JsonObject {
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(value)) if (v !== undefined) out[k] = v;
  return out;
}

function checkAgentMessage(message: unknown): asserts message is AgentMessage {
  const m = message as Partial<AgentMessage> | null;
  const problems: string[] = [];
  if (m === null || typeof m !== 'object') throw new AgentBusError('invalid_argument', 'Invalid message format: not an object');
  if (typeof m.id !== 'string' || m.id.length === 0) problems.push('`id` must be a non-empty string');
  if (typeof m.from !== 'string' || m.from.length === 0) problems.push('`from` must be an agent type');
  if (typeof m.to !== 'string' || m.to.length === 0) problems.push('`to` must be an agent type');
  if (typeof m.type !== 'string' || m.type.length === 0) problems.push('`type` must be a message type');
  if (typeof m.priority !== 'number' || ![0, 1, 2, 3].includes(m.priority)) problems.push('`priority` must be 0, 1, 2 or 3');
  if (typeof m.timestamp !== 'string') problems.push('`timestamp` must be an ISO 8601 string');
  if (m.ttl !== undefined && (typeof m.ttl !== 'number' || !Number.isFinite(m.ttl) || m.ttl < 0)) {
    problems.push('`ttl` must be a number of milliseconds');
  }
  if (m.replyTo !== undefined && !isUuid(m.replyTo)) problems.push('`replyTo` must be the id (a UUID) of a received message');
  if (problems.length > 0) throw new AgentBusError('invalid_argument', `Invalid message format: ${problems.join('; ')}`);
}
