/**
 * The agent client: one agent of one project, over a WebSocket that reconnects by itself and
 * resumes as docs/PROTOCOL.md allows (see the README, "Reconnecting and resuming").
 */
import { Emitter } from './emitter.js';
import { AgentBusError, invalidArgument } from './errors.js';
import { RestClient } from './rest.js';
import { Reconnector, openBrokerSocket } from './reconnect.js';
import { resolveWebSocket } from './transport.js';
import type { CloseInfo, ResolvedWebSocket, Socket, WebSocketConstructor } from './transport.js';
import type {
  AckMode,
  ErrorFrame,
  JsonObject,
  Message,
  Priority,
  RequestFields,
  SendInit,
  SentReceipt,
  Welcome,
} from './types.js';
import {
  baseUrls,
  checkAgentId,
  checkIdentifier,
  checkPositiveInt,
  checkUuid,
  compact,
  describe,
  utf8Length,
  uuid,
} from './util.js';
import type { ReconnectOptions } from './util.js';
import type { Timer } from './timer.js';

export type { ReconnectOptions } from './util.js';

/** `connecting` until the first welcome, `open` while connected, `reconnecting` between connections, `closed` for good. */
export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface ConnectOptions {
  /** The broker's address: `http://127.0.0.1:8080`, `https://bus.example.com`, or the same with `ws(s)://`. */
  url: string;
  /** The project's id (a UUID). */
  projectId: string;
  /** This agent's id in the project (1 to 255 characters). */
  agentId: string;
  /** This agent's type (default `agent`): messages sent `to_type` it reach this agent. */
  agentType?: string;
  /** A project token or the admin token, when the broker requires tokens. */
  token?: string;
  /** `auto` (default): a message is done once received; `manual`: once its handler finished. */
  ack?: AckMode;
  /** What this agent can do; replaces the stored list on every connection when given. */
  capabilities?: string[];
  /**
   * Replay every message visible to this agent after this seq on the first connection
   * (`?since=`), done or not. Later connections replay only what is owed.
   */
  since?: number;
  /** The WebSocket class to use (default: the `ws` package in Node, the standard one elsewhere). */
  WebSocket?: WebSocketConstructor;
  /** Reconnection: `false` to never reconnect, or the backoff's bounds (default on). */
  reconnect?: boolean | ReconnectOptions;
  /** How long `connect()` waits for the first welcome, retries included (default 30000 ms). */
  connectTimeoutMs?: number;
  /** How long a send waits for its receipt, reconnections included (default 60000 ms). */
  sendTimeoutMs?: number;
  /** The default `timeout_ms` of a request (default 30000 ms, the broker's default). */
  requestTimeoutMs?: number;
  /**
   * How long after a request's deadline the client gives up waiting for the broker's timeout
   * response (default 5000 ms): it then rejects with `timeout` on its own.
   */
  requestGraceMs?: number;
  /**
   * In Node (`ws`), a connection on which nothing (no frame, no ping) arrived for this long is
   * dropped and replaced (default 30000 ms; the broker pings every 5 s by default). 0: never.
   */
  idleTimeoutMs?: number;
  /** How many handlers may run at once (default 1: messages are handled one after the other). */
  concurrency?: number;
  /** The broker's `max_frame_bytes` (default 262144): larger sends are refused before sending. */
  maxFrameBytes?: number;
}

/** What a handler may return: nothing, a reply's content, or a whole reply. */
export type HandlerResult = void | undefined | string | ReplyInit;

/** A reply, as a handler returns it or `reply()` takes it. */
export interface ReplyInit {
  content: string;
  /** Default `response`. */
  type?: string;
  metadata?: JsonObject;
  success?: boolean;
  error?: string;
  priority?: Priority;
}

/**
 * Handles one delivered message. When the message is a request (`expects_reply`), a returned
 * string or `ReplyInit` is sent as its reply; a thrown error is sent as a failed reply
 * (`success: false`, `error` the error's message).
 */
export type Handler = (message: Message) => HandlerResult | Promise<HandlerResult>;

export interface CloseEvent {
  code: number;
  reason: string;
  /** Whether the client will connect again. */
  willReconnect: boolean;
  /** Why the client stopped for good, when it did not stop because `close()` was called. */
  error?: AgentBusError;
}

export interface ClientEvents {
  state: ConnectionState;
  /** Every welcome: the first, and one per reconnection. */
  welcome: Welcome;
  /** Every delivered message, once (duplicates after a reconnection are filtered out), before its handler runs. */
  message: Message;
  close: CloseEvent;
  reconnecting: { attempt: number; delayMs: number };
  /** `no_recipient` and `ack_ignored`: warnings, not refusals. */
  warning: ErrorFrame;
  /** Error frames that belong to no send, and the reason of a stop for good. */
  error: AgentBusError;
  /** A handler threw (or its reply could not be sent). */
  handlerError: { message: Message; error: unknown };
}

interface PendingRequest {
  clientMsgId: string;
  id?: string;
  timeoutMs: number;
  timer?: Timer;
  settled: boolean;
  onSent?: (receipt: SentReceipt) => void;
  resolve(message: Message): void;
  reject(error: AgentBusError): void;
}

interface PendingSend {
  clientMsgId: string;
  text: string;
  bytes: number;
  written: boolean;
  retryTimer?: Timer;
  timer?: Timer;
  resolve(receipt: SentReceipt): void;
  reject(error: AgentBusError): void;
  request?: PendingRequest;
}

const PERMANENT_REFUSALS = new Set([400, 401, 403, 404]);
/** Seqs remembered for deduplication; the oldest are forgotten beyond this. */
const SEEN_LIMIT = 100_000;
/** The broker's bound on the seqs of one ack frame. */
const ACK_BATCH = 10_000;

/**
 * Connects an agent and resolves once the broker welcomed it. The client then stays connected,
 * reconnecting after every drop, until `close()`, a takeover (4001), a revoked token (4003) or
 * a refusal that retrying cannot change (400, 401, 403, 404 on the upgrade).
 */
export async function connect(options: ConnectOptions): Promise<AgentBusClient> {
  const client = new AgentBusClient(options);
  await client.start();
  return client;
}

export class AgentBusClient {
  readonly projectId: string;
  readonly agentId: string;
  readonly agentType: string;
  readonly ackMode: AckMode;
  /** REST helpers for the same broker, project and token. */
  readonly rest: RestClient;
  /** Connection lifecycle and delivery events (see `ClientEvents`). */
  readonly events = new Emitter<ClientEvents>();

  private readonly wsUrl: string;
  private readonly token: string | undefined;
  private readonly capabilities: string[] | undefined;
  private readonly since: number | undefined;
  private readonly givenWebSocket: WebSocketConstructor | undefined;
  private readonly reconnector: Reconnector;
  private readonly connectTimeoutMs: number;
  private readonly sendTimeoutMs: number;
  private readonly requestTimeoutMs: number;
  private readonly requestGraceMs: number;
  private readonly idleTimeoutMs: number;
  private readonly concurrency: number;
  private readonly maxFrameBytes: number;

  private resolved: ResolvedWebSocket | undefined;
  private socket: Socket | null = null;
  private currentState: ConnectionState = 'connecting';
  private lastWelcome: Welcome | undefined;
  private started = false;
  private closing = false;
  private idleTimer: Timer | undefined;
  private frameTooLarge = false;
  private closedWaiters: Array<() => void> = [];
  private stopping: Promise<void> | undefined;
  private firstWelcome: { resolve(): void; reject(error: AgentBusError): void } | undefined;

  private readonly pendingSends = new Map<string, PendingSend>();
  private readonly requestsByClientId = new Map<string, PendingRequest>();
  private readonly requestsById = new Map<string, PendingRequest>();
  /** The `client_msg_id`s of requests whose receipt has not come yet: a reply to one of them may come first. */
  private readonly unreceipted = new Set<string>();
  /**
   * Replies that arrived while some requests still waited for their receipts, each with the
   * requests it may belong to. It is matched, or handed to the handlers, once those are known.
   */
  private held: Array<{ message: Message; waitingFor: Set<string> }> = [];
  /** The last `hello`, sent again on every connection. */
  private lastHello: Record<string, unknown> | undefined;

  /** seq → `processing` (given to the application) or `done` (finished). */
  private readonly seen = new Map<number, 'processing' | 'done'>();
  /** Manual mode: the seqs delivered on the current connection and not acknowledged on it. */
  private deliveredHere = new Set<number>();
  private ackQueue: number[] = [];
  private ackTimer: Timer | undefined;

  private readonly handlers = new Map<string, Handler>();
  private defaultHandler: Handler | undefined;
  private readonly queue: Message[] = [];
  private running = 0;

  constructor(options: ConnectOptions) {
    if (options === null || typeof options !== 'object') throw invalidArgument('connect() needs an options object');
    this.wsUrl = baseUrls(options.url).ws;
    this.projectId = checkUuid('projectId', options.projectId);
    this.agentId = checkAgentId('agentId', options.agentId);
    this.agentType = options.agentType === undefined ? 'agent' : checkIdentifier('agentType', options.agentType);
    if (options.ack !== undefined && options.ack !== 'auto' && options.ack !== 'manual') {
      throw invalidArgument(`\`ack\` must be "auto" or "manual", not ${describe(options.ack)}`);
    }
    this.ackMode = options.ack ?? 'auto';
    if (options.token !== undefined && (typeof options.token !== 'string' || options.token.length === 0)) {
      throw invalidArgument('`token` must be a non-empty string');
    }
    this.token = options.token;
    if (options.capabilities !== undefined) {
      if (!Array.isArray(options.capabilities)) throw invalidArgument('`capabilities` must be an array of strings');
      if (options.capabilities.length > 64) throw invalidArgument('`capabilities` may hold at most 64 items');
      options.capabilities.forEach((c, i) => checkIdentifier(`capabilities[${i}]`, c));
      this.capabilities = [...options.capabilities];
    }
    if (options.since !== undefined) checkPositiveInt('since', options.since, 0);
    this.since = options.since;
    this.givenWebSocket = options.WebSocket;
    this.reconnector = new Reconnector(options.reconnect);
    this.connectTimeoutMs = opt('connectTimeoutMs', options.connectTimeoutMs, 30_000);
    this.sendTimeoutMs = opt('sendTimeoutMs', options.sendTimeoutMs, 60_000);
    this.requestTimeoutMs = opt('requestTimeoutMs', options.requestTimeoutMs, 30_000);
    this.requestGraceMs = opt('requestGraceMs', options.requestGraceMs, 5_000, 0);
    this.idleTimeoutMs = opt('idleTimeoutMs', options.idleTimeoutMs, 30_000, 0);
    this.concurrency = opt('concurrency', options.concurrency, 1);
    this.maxFrameBytes = opt('maxFrameBytes', options.maxFrameBytes, 262_144);
    this.rest = new RestClient({
      url: options.url,
      projectId: this.projectId,
      ...(this.token === undefined ? {} : { token: this.token }),
    });
  }

  /** The connection state. */
  get state(): ConnectionState {
    return this.currentState;
  }

  /** The session id of the current connection (of the last one while reconnecting). */
  get sessionId(): string | undefined {
    return this.lastWelcome?.session_id;
  }

  /** The welcome of the current (or last) connection. */
  get welcome(): Welcome | undefined {
    return this.lastWelcome;
  }

  /** Messages received and waiting for (or in) their handler. */
  get queueSize(): number {
    return this.queue.length + this.running;
  }

  /** Sends waiting for their receipt. */
  get pendingSendCount(): number {
    return this.pendingSends.size;
  }

  /**
   * Opens the first connection; resolves at its welcome. Called by `connect()`; call it
   * yourself when you built the client with `new AgentBusClient(options)` to attach handlers
   * before anything is delivered.
   */
  start(): Promise<this> {
    if (this.started) throw invalidArgument('start() was already called');
    this.started = true;
    return new Promise<this>((resolve, reject) => {
      const timer = setTimeout(() => {
        const error = new AgentBusError(
          'connect_timeout',
          `no welcome from ${this.wsUrl} within ${this.connectTimeoutMs} ms`,
        );
        this.firstWelcome = undefined;
        reject(error);
        void this.stop(error);
      }, this.connectTimeoutMs);
      this.firstWelcome = {
        resolve: () => {
          clearTimeout(timer);
          resolve(this);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      resolveWebSocket(this.givenWebSocket).then(
        (resolved) => {
          this.resolved = resolved;
          if (!this.closing) this.openConnection();
        },
        (error: unknown) => {
          const e =
            error instanceof AgentBusError ? error : new AgentBusError('invalid_argument', String(error), { cause: error });
          void this.stop(e);
        },
      );
    });
  }

  /**
   * Handles the messages of one type. The handler's return value becomes the reply when the
   * message is a request. Replaces the handler the type had; returns a function that removes it.
   */
  on(type: string, handler: Handler): () => void {
    checkIdentifier('type', type);
    if (typeof handler !== 'function') throw invalidArgument('a handler must be a function');
    this.handlers.set(type, handler);
    this.pump();
    return () => {
      if (this.handlers.get(type) === handler) this.handlers.delete(type);
    };
  }

  /**
   * Handles every message whose type has no handler of its own (see `on`). Returns a function
   * that removes it.
   */
  register(handler: Handler): () => void {
    if (typeof handler !== 'function') throw invalidArgument('a handler must be a function');
    this.defaultHandler = handler;
    this.pump();
    return () => {
      if (this.defaultHandler === handler) this.defaultHandler = undefined;
    };
  }

  /**
   * Sends a message; resolves with its `sent` receipt once it is committed. A `client_msg_id`
   * is generated when absent and reused for every retry (after a reconnection, `unavailable`,
   * `rate_limited` or `overloaded`), so the message is stored once. Rejects with an
   * `AgentBusError` carrying the broker's code when the broker refuses it.
   */
  async send(init: SendInit): Promise<SentReceipt> {
    return this.enqueue(this.frameOf(init, false));
  }

  /**
   * Sends a request (`expects_reply`) and resolves with its first reply. Rejects with code
   * `timeout` when the broker's timeout response comes first (it is in `details`), with
   * `no_recipient` when nobody can receive the request, or with the broker's refusal.
   * `onSent` is called with the request's receipt once it is stored.
   */
  async request(
    init: RequestFields,
    options: { timeoutMs?: number; onSent?: (receipt: SentReceipt) => void } = {},
  ): Promise<Message> {
    const frame = this.frameOf(init, true);
    const timeoutMs =
      options.timeoutMs ?? (init.timeout_ms === undefined ? this.requestTimeoutMs : init.timeout_ms);
    checkPositiveInt('timeoutMs', timeoutMs);
    frame.timeout_ms = timeoutMs;
    const clientMsgId = frame.client_msg_id as string;
    return new Promise<Message>((resolve, reject) => {
      const pr: PendingRequest = {
        clientMsgId,
        timeoutMs,
        settled: false,
        resolve: (m) => {
          if (pr.settled) return;
          this.forgetRequest(pr);
          resolve(m);
        },
        reject: (e) => {
          if (pr.settled) return;
          this.forgetRequest(pr);
          reject(e);
        },
      };
      pr.timer = setTimeout(() => {
        pr.reject(
          new AgentBusError('timeout', `no reply to the request within ${timeoutMs} ms (nor the broker's timeout response)`, {
            clientMsgId,
          }),
        );
      }, timeoutMs + this.requestGraceMs);
      this.requestsByClientId.set(clientMsgId, pr);
      this.unreceipted.add(clientMsgId);
      if (options.onSent) pr.onSent = options.onSent;
      this.enqueue(frame, pr).catch((error: AgentBusError) => pr.reject(error));
    });
  }

  /** `request()` with the seed-004 signature: the reply, or a rejection after `timeoutMs`. */
  sendAndWait(init: RequestFields, timeoutMs?: number): Promise<Message> {
    return this.request(init, timeoutMs === undefined ? {} : { timeoutMs });
  }

  /**
   * Replies to `message` (its sender receives the reply). Its `client_msg_id` is derived from
   * the message's id, so one agent's reply to a message is stored once however often it is sent.
   */
  async reply(message: Pick<Message, 'id'>, reply: string | ReplyInit): Promise<SentReceipt> {
    if (!message || typeof message.id !== 'string') throw invalidArgument('reply() needs the message to answer');
    const init = typeof reply === 'string' ? { content: reply } : reply;
    if (!init || typeof init !== 'object' || typeof init.content !== 'string') {
      throw invalidArgument(
        `a reply must be a string or an object with a string \`content\`, not ${describe(reply)}`,
      );
    }
    return this.send({
      type: 'response',
      ...compact(init),
      reply_to: message.id,
      client_msg_id: `reply-${message.id}`,
    });
  }

  /**
   * Declares what this agent can do (a `hello` frame): sent now if connected, and again on every
   * later connection (after the `capabilities` option, which it replaces). No answer.
   */
  hello(capabilities: string[], description?: string): void {
    if (!Array.isArray(capabilities)) throw invalidArgument('`capabilities` must be an array of strings');
    capabilities.forEach((c, i) => checkIdentifier(`capabilities[${i}]`, c));
    if (description !== undefined && typeof description !== 'string') throw invalidArgument('`description` must be a string');
    this.lastHello = compact({ op: 'hello', capabilities: [...capabilities], description });
    this.writeControl(this.lastHello);
  }

  /** Read receipts for these message ids (a `read` frame). Sent now if connected; no answer. */
  markRead(ids: string[]): void {
    if (!Array.isArray(ids) || ids.length === 0) throw invalidArgument('`ids` must be a non-empty array of message ids');
    ids.forEach((id) => checkUuid('ids[]', id));
    this.writeControl({ op: 'read', ids });
  }

  /**
   * Closes the connection and stops reconnecting. Acknowledgements of finished handlers are
   * sent first; sends still without a receipt reject with `closed` (their outcome is unknown:
   * retry them with the same `client_msg_id` on a new client).
   */
  async close(): Promise<void> {
    await this.stop(undefined);
  }

  // ----------------------------------------------------------------------------------------
  // Connection

  private openConnection(): void {
    if (!this.resolved || this.closing) return;
    const params = new URLSearchParams();
    params.set('agent_id', this.agentId);
    params.set('agent_type', this.agentType);
    params.set('ack', this.ackMode);
    if (this.capabilities && this.capabilities.length > 0) params.set('capabilities', this.capabilities.join(','));
    if (this.since !== undefined && this.lastWelcome === undefined) params.set('since', String(this.since));
    const url = `${this.wsUrl}/ws/agent/messages/${this.projectId}?${params.toString()}`;
    this.socket = openBrokerSocket(this.resolved, url, this.token, {
      onText: (text) => this.onText(text),
      onActivity: () => this.touch(),
      onClose: (info) => this.onSocketClose(info),
    });
  }

  private touch(): void {
    if (this.idleTimeoutMs === 0 || !this.socket?.seesPings) return;
    clearTimeout(this.idleTimer);
    const socket = this.socket;
    this.idleTimer = setTimeout(() => {
      if (this.socket === socket) socket.terminate();
    }, this.idleTimeoutMs);
  }

  private setState(state: ConnectionState): void {
    if (this.currentState === state) return;
    this.currentState = state;
    this.events.emit('state', state);
  }

  private onSocketClose(info: CloseInfo): void {
    this.socket = null;
    clearTimeout(this.idleTimer);
    this.deliveredHere = new Set();
    this.ackQueue = [];
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    for (const p of this.pendingSends.values()) p.written = false;

    if (this.closing) {
      this.closedWaiters.splice(0).forEach((w) => w());
      return;
    }

    let fatal: AgentBusError | undefined;
    if (info.refusal && PERMANENT_REFUSALS.has(info.refusal.status)) {
      fatal = new AgentBusError(info.refusal.code, info.refusal.error, { status: info.refusal.status });
    } else if (info.code === 4001) {
      fatal = new AgentBusError(
        'replaced',
        `another connection of agent "${this.agentId}" took over (4001): this client stops, without reconnecting`,
      );
    } else if (info.code === 4003) {
      fatal = new AgentBusError('token_revoked', 'the token of this connection was revoked (4003): get a new token');
    }
    if (info.code === 1009 || this.frameTooLarge) this.rejectLargestSend();

    fatal ??= this.reconnector.giveUp(info.code);
    if (fatal) {
      this.events.emit('close', { code: info.code, reason: info.reason, willReconnect: false, error: fatal });
      void this.stop(fatal);
      return;
    }
    this.events.emit('close', { code: info.code, reason: info.reason, willReconnect: true });
    this.reconnector.retry(
      (attempt, delayMs) => {
        this.setState(this.lastWelcome === undefined ? 'connecting' : 'reconnecting');
        this.events.emit('reconnecting', { attempt, delayMs });
      },
      () => this.openConnection(),
    );
  }

  /** Stops for good: after `close()` (no error) or a fatal condition. */
  private stop(error: AgentBusError | undefined): Promise<void> {
    this.stopping ??= this.doStop(error);
    return this.stopping;
  }

  private async doStop(error: AgentBusError | undefined): Promise<void> {
    this.closing = true;
    this.reconnector.cancel();
    clearTimeout(this.idleTimer);
    const socket = this.socket;
    if (socket) {
      this.flushAcks();
      const closed = new Promise<void>((resolve) => this.closedWaiters.push(resolve));
      socket.close(1000, 'bye');
      const guard = setTimeout(() => socket.terminate(), 3_000);
      await closed;
      clearTimeout(guard);
    }
    const reason = error ?? new AgentBusError('closed', 'the client was closed');
    for (const p of [...this.pendingSends.values()]) {
      this.forgetSend(p);
      p.reject(reason);
    }
    for (const pr of [...this.requestsByClientId.values()]) pr.reject(reason);
    this.queue.length = 0;
    this.firstWelcome?.reject(reason);
    this.firstWelcome = undefined;
    if (error) this.events.emit('error', error);
    this.setState('closed');
  }

  // ----------------------------------------------------------------------------------------
  // Frames from the broker

  private onText(text: string): void {
    let frame: { op?: unknown } & Record<string, unknown>;
    try {
      frame = JSON.parse(text) as typeof frame;
    } catch {
      this.events.emit('error', new AgentBusError('invalid_json', `the broker sent a frame that is not JSON: ${text.slice(0, 100)}`));
      return;
    }
    if (frame === null || typeof frame !== 'object') return;
    switch (frame.op) {
      case 'welcome':
        this.onWelcome(frame as unknown as Welcome);
        break;
      case 'message': {
        const { op: _op, ...message } = frame;
        this.onMessage(message as unknown as Message);
        break;
      }
      case 'sent':
        this.onSent(frame as unknown as SentReceipt);
        break;
      case 'error':
        this.onError(frame as unknown as ErrorFrame);
        break;
      default:
        // A frame of a newer protocol version: ignored.
        break;
    }
  }

  private onWelcome(welcome: Welcome): void {
    this.lastWelcome = welcome;
    this.reconnector.reset();
    this.frameTooLarge = false;
    // Messages at or below the floor are done and never come again (without `since`).
    for (const [seq, st] of this.seen) if (seq <= welcome.ack_floor && st === 'done') this.seen.delete(seq);
    // Frames waiting for a connection go first, in order, before listeners can send more.
    this.currentState = 'open';
    if (this.lastHello) this.writeControl(this.lastHello);
    for (const p of this.pendingSends.values()) this.write(p);
    this.events.emit('state', 'open');
    this.events.emit('welcome', welcome);
    const first = this.firstWelcome;
    this.firstWelcome = undefined;
    first?.resolve();
  }

  private onMessage(message: Message): void {
    const seq = message.seq;
    if (typeof seq !== 'number') return;
    if (this.ackMode === 'manual') this.deliveredHere.add(seq);
    const st = this.seen.get(seq);
    if (st === 'done') {
      // Already finished (its acknowledgement was lost with a connection): acknowledge it again.
      if (this.ackMode === 'manual') this.queueAck(seq);
      return;
    }
    if (st === 'processing') return; // acknowledged on this connection when its handler finishes
    this.remember(seq);
    this.events.emit('message', message);

    if (message.reply_to) {
      const pr = this.requestsById.get(message.reply_to);
      if (pr) {
        this.markDone(seq);
        this.settleRequest(pr, message);
        return;
      }
      if (this.unreceipted.size > 0 && message.in_reply_to_seq !== undefined) {
        this.held.push({ message, waitingFor: new Set(this.unreceipted) });
        return;
      }
    }
    this.enqueueDispatch(message);
  }

  private onSent(receipt: SentReceipt): void {
    const id = receipt.client_msg_id;
    if (id === null) return;
    const p = this.pendingSends.get(id);
    if (!p) return;
    this.forgetSend(p);
    const pr = p.request;
    if (pr && !pr.settled) {
      pr.id = receipt.id;
      this.requestsById.set(receipt.id, pr);
      try {
        pr.onSent?.(receipt);
      } catch (error) {
        setTimeout(() => {
          throw error;
        }, 0);
      }
      this.receiptKnown(pr.clientMsgId);
    }
    p.resolve({ id: receipt.id, seq: receipt.seq, client_msg_id: receipt.client_msg_id, created_at: receipt.created_at });
  }

  private onError(frame: ErrorFrame): void {
    const code = frame.code;
    const id = frame.client_msg_id;
    if (code === 'no_recipient' || code === 'ack_ignored') {
      this.events.emit('warning', frame);
      if (code === 'no_recipient' && id) {
        const pr = this.requestsByClientId.get(id);
        if (pr && !pr.settled) {
          pr.reject(
            new AgentBusError('no_recipient', frame.error, { clientMsgId: id, details: frame }),
          );
        }
      }
      return;
    }
    if (code === 'frame_too_large') this.frameTooLarge = true;
    const p = id ? this.pendingSends.get(id) : undefined;
    if (!p) {
      this.events.emit(
        'error',
        new AgentBusError(code, frame.error, {
          ...(frame.field === undefined ? {} : { field: frame.field }),
          details: frame,
        }),
      );
      return;
    }
    if (code === 'unavailable' || code === 'rate_limited' || code === 'overloaded') {
      const delay = frame.retry_after_ms ?? (code === 'overloaded' ? 100 : 1_000);
      p.written = false;
      clearTimeout(p.retryTimer);
      p.retryTimer = setTimeout(() => {
        p.retryTimer = undefined;
        this.write(p);
      }, delay);
      return;
    }
    this.forgetSend(p);
    p.reject(
      new AgentBusError(code, frame.error, {
        clientMsgId: p.clientMsgId,
        ...(frame.field === undefined ? {} : { field: frame.field }),
        ...(frame.retry_after_ms === undefined ? {} : { retryAfterMs: frame.retry_after_ms }),
        details: frame,
      }),
    );
  }

  // ----------------------------------------------------------------------------------------
  // Sends

  private frameOf(init: SendInit, request: boolean): Record<string, unknown> {
    if (init === null || typeof init !== 'object') throw invalidArgument(`a message must be an object, not ${describe(init)}`);
    if (typeof init.content !== 'string' || init.content.length === 0) {
      throw invalidArgument(`a message needs a non-empty string \`content\`, not ${describe(init.content)}`);
    }
    if (init.client_msg_id !== undefined && (typeof init.client_msg_id !== 'string' || init.client_msg_id.length === 0)) {
      throw invalidArgument('`client_msg_id` must be a non-empty string');
    }
    const frame: Record<string, unknown> = compact({ ...init });
    delete frame.op;
    delete frame.timeout_ms;
    delete frame.expects_reply;
    if (request) frame.expects_reply = true;
    frame.client_msg_id ??= uuid();
    return frame;
  }

  private enqueue(frame: Record<string, unknown>, request?: PendingRequest): Promise<SentReceipt> {
    if (this.closing || this.currentState === 'closed') {
      return Promise.reject(new AgentBusError('closed', 'the client is closed'));
    }
    const clientMsgId = frame.client_msg_id as string;
    if (this.pendingSends.has(clientMsgId)) {
      return Promise.reject(invalidArgument(`a send with client_msg_id ${describe(clientMsgId)} is already waiting for its receipt`));
    }
    let text: string;
    try {
      text = JSON.stringify(frame);
    } catch (cause) {
      return Promise.reject(new AgentBusError('invalid_argument', `the message cannot be written as JSON: ${String(cause)}`, { cause }));
    }
    const bytes = utf8Length(text);
    if (bytes > this.maxFrameBytes) {
      return Promise.reject(
        new AgentBusError('frame_too_large', `the frame would be ${bytes} bytes; the broker takes at most ${this.maxFrameBytes}`, {
          clientMsgId,
        }),
      );
    }
    return new Promise<SentReceipt>((resolve, reject) => {
      const p: PendingSend = { clientMsgId, text, bytes, written: false, resolve, reject };
      if (request) p.request = request;
      p.timer = setTimeout(() => {
        this.forgetSend(p);
        reject(
          new AgentBusError(
            'send_timeout',
            `no receipt within ${this.sendTimeoutMs} ms; it may have been stored: send again with client_msg_id ${clientMsgId} to know`,
            { clientMsgId },
          ),
        );
      }, this.sendTimeoutMs);
      this.pendingSends.set(clientMsgId, p);
      this.write(p);
    });
  }

  private write(p: PendingSend): void {
    if (p.written || p.retryTimer !== undefined || this.currentState !== 'open' || !this.socket) return;
    if (!this.pendingSends.has(p.clientMsgId)) return;
    p.written = this.socket.send(p.text);
  }

  private writeControl(frame: Record<string, unknown>): void {
    if (this.currentState === 'open' && this.socket) this.socket.send(JSON.stringify(frame));
  }

  private forgetSend(p: PendingSend): void {
    this.pendingSends.delete(p.clientMsgId);
    clearTimeout(p.timer);
    clearTimeout(p.retryTimer);
    p.retryTimer = undefined;
  }

  private rejectLargestSend(): void {
    let largest: PendingSend | undefined;
    for (const p of this.pendingSends.values()) if (!largest || p.bytes > largest.bytes) largest = p;
    this.frameTooLarge = false;
    if (!largest) return;
    this.forgetSend(largest);
    largest.reject(
      new AgentBusError('frame_too_large', `the broker refused a frame over its max_frame_bytes (this one is ${largest.bytes} bytes)`, {
        clientMsgId: largest.clientMsgId,
      }),
    );
  }

  // ----------------------------------------------------------------------------------------
  // Requests

  private settleRequest(pr: PendingRequest, reply: Message): void {
    if (reply.sender_agent_id === 'agentbus' && reply.error === 'timeout' && reply.success === false) {
      pr.reject(
        new AgentBusError('timeout', `no reply before the request's deadline (${pr.timeoutMs} ms)`, {
          clientMsgId: pr.clientMsgId,
          details: reply,
        }),
      );
    } else {
      pr.resolve(reply);
    }
  }

  private forgetRequest(pr: PendingRequest): void {
    pr.settled = true;
    clearTimeout(pr.timer);
    this.requestsByClientId.delete(pr.clientMsgId);
    if (pr.id !== undefined) this.requestsById.delete(pr.id);
    else this.receiptKnown(pr.clientMsgId);
  }

  /**
   * The request `clientMsgId` got its receipt (or was given up): the replies held for it can
   * be matched now, and those that waited for no other request are matched or handed on.
   */
  private receiptKnown(clientMsgId: string): void {
    if (!this.unreceipted.delete(clientMsgId) || this.held.length === 0) return;
    const ready: Message[] = [];
    this.held = this.held.filter((h) => {
      h.waitingFor.delete(clientMsgId);
      const pr = h.message.reply_to ? this.requestsById.get(h.message.reply_to) : undefined;
      if (pr || h.waitingFor.size === 0) {
        ready.push(h.message);
        return false;
      }
      return true;
    });
    for (const m of ready) {
      const pr = m.reply_to ? this.requestsById.get(m.reply_to) : undefined;
      if (pr && !pr.settled) {
        this.markDone(m.seq);
        this.settleRequest(pr, m);
      } else {
        this.enqueueDispatch(m);
      }
    }
  }

  // ----------------------------------------------------------------------------------------
  // Handlers and acknowledgements

  private remember(seq: number): void {
    this.seen.set(seq, 'processing');
    if (this.seen.size > SEEN_LIMIT) {
      // Forget the oldest finished seqs (a Map iterates in insertion order).
      for (const [s, st] of this.seen) {
        if (this.seen.size <= SEEN_LIMIT * 0.9) break;
        if (st === 'done') this.seen.delete(s);
      }
    }
  }

  private markDone(seq: number): void {
    this.seen.set(seq, 'done');
    if (this.ackMode === 'manual' && this.deliveredHere.has(seq)) this.queueAck(seq);
  }

  /** Forgets a message whose handler failed: it is handled again if it comes again. */
  private markFailed(seq: number): void {
    if (this.ackMode === 'manual') this.seen.delete(seq);
    else this.seen.set(seq, 'done');
  }

  private queueAck(seq: number): void {
    this.deliveredHere.delete(seq);
    this.ackQueue.push(seq);
    if (this.ackTimer === undefined) {
      this.ackTimer = setTimeout(() => {
        this.ackTimer = undefined;
        this.flushAcks();
      }, 0);
    }
  }

  private flushAcks(): void {
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    while (this.ackQueue.length > 0) {
      const seqs = this.ackQueue.splice(0, ACK_BATCH);
      this.writeControl({ op: 'ack', seqs });
    }
  }

  private enqueueDispatch(message: Message): void {
    this.queue.push(message);
    this.pump();
  }

  private pump(): void {
    while (this.running < this.concurrency && this.queue.length > 0 && !this.closing) {
      const message = this.queue.shift()!;
      this.running++;
      void this.handle(message).finally(() => {
        this.running--;
        this.pump();
      });
    }
  }

  private reportHandlerError(message: Message, error: unknown): void {
    if (this.events.listenerCount('handlerError') > 0) this.events.emit('handlerError', { message, error });
    else console.error(`agentbus: the handler of message #${message.seq} (${message.message_type}) failed:`, error);
  }

  private async handle(message: Message): Promise<void> {
    const handler = this.handlers.get(message.message_type) ?? this.defaultHandler;
    if (!handler) {
      this.markDone(message.seq);
      return;
    }
    let result: HandlerResult;
    try {
      result = await handler(message);
    } catch (error) {
      this.reportHandlerError(message, error);
      if (message.expects_reply) {
        const text = error instanceof Error ? error.message : String(error);
        try {
          await this.reply(message, {
            content: `the handler failed: ${text}`.slice(0, 60_000),
            success: false,
            error: text.slice(0, 4096) || 'error',
          });
          this.markDone(message.seq);
        } catch (replyError) {
          this.reportHandlerError(message, replyError);
          this.markFailed(message.seq);
        }
      } else {
        this.markFailed(message.seq);
      }
      return;
    }
    if (message.expects_reply && result !== undefined && result !== null) {
      try {
        await this.reply(message, result);
      } catch (error) {
        this.reportHandlerError(message, error);
        this.markFailed(message.seq);
        return;
      }
    }
    this.markDone(message.seq);
  }
}

function opt(name: string, value: number | undefined, fallback: number, min = 1): number {
  return value === undefined ? fallback : checkPositiveInt(name, value, min);
}
