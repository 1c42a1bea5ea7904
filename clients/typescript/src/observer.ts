/**
 * The read-only observer: a WebSocket to `/ws/agent/messages/{project_id}` without an agent
 * id, which receives every message committed in the project (broadcast and direct) in seq
 * order. It is no member: nothing is owed to it and it acknowledges nothing. After a drop it
 * reconnects with `?since=` the last seq it received, so it misses nothing and repeats nothing.
 */
import { Emitter } from './emitter.js';
import { AgentBusError, invalidArgument } from './errors.js';
import { Reconnector, openBrokerSocket } from './reconnect.js';
import { resolveWebSocket } from './transport.js';
import type { CloseInfo, ResolvedWebSocket, Socket, WebSocketConstructor } from './transport.js';
import type { ErrorFrame, Message, ObserverWelcome } from './types.js';
import { baseUrls, checkPositiveInt, checkUuid } from './util.js';
import type { ReconnectOptions } from './util.js';
import type { Timer } from './timer.js';
import type { CloseEvent, ConnectionState } from './client.js';

export interface ObserveOptions {
  /** The broker's address: `http://127.0.0.1:8080` (or `ws://…`). */
  url: string;
  projectId: string;
  /** Start after this seq (every message with a higher seq is delivered); default: from the head. */
  since?: number;
  /** A project token or the admin token, when the broker requires tokens. */
  token?: string;
  /** The WebSocket class to use (default: the `ws` package in Node, the standard one elsewhere). */
  WebSocket?: WebSocketConstructor;
  /** `false` to never reconnect, or the backoff's bounds (default on). */
  reconnect?: boolean | ReconnectOptions;
  /** How long `observe()` waits for the first welcome (default 30000 ms). */
  connectTimeoutMs?: number;
  /** In Node, drop and replace a connection silent for this long (default 30000 ms; 0: never). */
  idleTimeoutMs?: number;
}

export interface ObserverEvents {
  state: ConnectionState;
  welcome: ObserverWelcome;
  /** Every committed message of the project, once, in seq order. */
  message: Message;
  close: CloseEvent;
  reconnecting: { attempt: number; delayMs: number };
  /** An error frame from the broker, or the reason of a stop for good. */
  error: AgentBusError;
}

const PERMANENT_REFUSALS = new Set([400, 401, 403, 404]);

/** Opens an observer and resolves at its first welcome. */
export async function observe(options: ObserveOptions): Promise<Observer> {
  const observer = new Observer(options);
  await observer.start();
  return observer;
}

export class Observer {
  readonly projectId: string;
  /**
   * Messages are kept while nobody listens for them (frames that come in the same read as
   * the welcome arrive before `observe()`'s caller can attach a listener) and handed to the
   * first `message` listener as soon as it is added, in order.
   */
  readonly events = new Emitter<ObserverEvents>((event) => {
    if (event === 'message') this.flushHeld();
  });
  private held: Message[] = [];

  private readonly wsUrl: string;
  private readonly token: string | undefined;
  private readonly givenWebSocket: WebSocketConstructor | undefined;
  private readonly reconnector: Reconnector;
  private readonly connectTimeoutMs: number;
  private readonly idleTimeoutMs: number;
  private resolved: ResolvedWebSocket | undefined;
  private socket: Socket | null = null;
  private currentState: ConnectionState = 'connecting';
  private lastWelcome: ObserverWelcome | undefined;
  /** The highest seq delivered (or the starting point): the next connection resumes after it. */
  private cursor: number | undefined;
  private started = false;
  private closing = false;
  private stopping: Promise<void> | undefined;
  private closedWaiters: Array<() => void> = [];
  private idleTimer: Timer | undefined;
  private firstWelcome: { resolve(): void; reject(error: AgentBusError): void } | undefined;

  constructor(options: ObserveOptions) {
    if (options === null || typeof options !== 'object') throw invalidArgument('observe() needs an options object');
    this.wsUrl = baseUrls(options.url).ws;
    this.projectId = checkUuid('projectId', options.projectId);
    if (options.since !== undefined) checkPositiveInt('since', options.since, 0);
    this.cursor = options.since;
    if (options.token !== undefined && (typeof options.token !== 'string' || options.token.length === 0)) {
      throw invalidArgument('`token` must be a non-empty string');
    }
    this.token = options.token;
    this.givenWebSocket = options.WebSocket;
    this.reconnector = new Reconnector(options.reconnect);
    this.connectTimeoutMs =
      options.connectTimeoutMs === undefined ? 30_000 : checkPositiveInt('connectTimeoutMs', options.connectTimeoutMs);
    this.idleTimeoutMs =
      options.idleTimeoutMs === undefined ? 30_000 : checkPositiveInt('idleTimeoutMs', options.idleTimeoutMs, 0);
  }

  get state(): ConnectionState {
    return this.currentState;
  }

  get welcome(): ObserverWelcome | undefined {
    return this.lastWelcome;
  }

  /** The seq of the last message delivered (or the starting point). */
  get lastSeq(): number | undefined {
    return this.cursor;
  }

  /** Opens the first connection; resolves at its welcome (called by `observe()`). */
  start(): Promise<this> {
    if (this.started) throw invalidArgument('start() was already called');
    this.started = true;
    return new Promise<this>((resolve, reject) => {
      const timer = setTimeout(() => {
        const error = new AgentBusError('connect_timeout', `no welcome from ${this.wsUrl} within ${this.connectTimeoutMs} ms`);
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
        (error: unknown) =>
          void this.stop(error instanceof AgentBusError ? error : new AgentBusError('invalid_argument', String(error))),
      );
    });
  }

  /** Closes the observer for good. */
  close(): Promise<void> {
    return this.stop(undefined);
  }

  private openConnection(): void {
    if (!this.resolved || this.closing) return;
    const query = this.cursor === undefined ? '' : `?since=${this.cursor}`;
    this.socket = openBrokerSocket(this.resolved, `${this.wsUrl}/ws/agent/messages/${this.projectId}${query}`, this.token, {
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

  private onText(text: string): void {
    let frame: Record<string, unknown>;
    try {
      frame = JSON.parse(text) as Record<string, unknown>;
    } catch {
      return;
    }
    if (frame === null || typeof frame !== 'object') return;
    if (frame.op === 'welcome') {
      const welcome = frame as unknown as ObserverWelcome;
      this.lastWelcome = welcome;
      this.reconnector.reset();
      // Without `since`, the stream starts after the head: resume from there next time.
      this.cursor ??= welcome.head_seq;
      this.setState('open');
      this.events.emit('welcome', welcome);
      const first = this.firstWelcome;
      this.firstWelcome = undefined;
      first?.resolve();
    } else if (frame.op === 'message') {
      const { op: _op, ...message } = frame;
      const m = message as unknown as Message;
      if (typeof m.seq !== 'number') return;
      if (this.cursor !== undefined && m.seq <= this.cursor) return; // already delivered
      this.cursor = m.seq;
      if (this.events.listenerCount('message') === 0) {
        this.held.push(m);
      } else {
        this.events.emit('message', m);
      }
    } else if (frame.op === 'error') {
      const e = frame as unknown as ErrorFrame;
      this.events.emit('error', new AgentBusError(e.code, e.error, { details: e }));
    }
  }

  /** Hands the messages kept while nobody listened to the listeners now attached. */
  private flushHeld(): void {
    const held = this.held;
    this.held = [];
    for (const m of held) this.events.emit('message', m);
  }

  private onSocketClose(info: CloseInfo): void {
    this.socket = null;
    clearTimeout(this.idleTimer);
    if (this.closing) {
      this.closedWaiters.splice(0).forEach((w) => w());
      return;
    }
    let fatal: AgentBusError | undefined;
    if (info.refusal && PERMANENT_REFUSALS.has(info.refusal.status)) {
      fatal = new AgentBusError(info.refusal.code, info.refusal.error, { status: info.refusal.status });
    } else if (info.code === 4003) {
      fatal = new AgentBusError('token_revoked', 'the token of this observer was revoked (4003): get a new token');
    } else {
      fatal = this.reconnector.giveUp(info.code);
    }
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

  private stop(error: AgentBusError | undefined): Promise<void> {
    this.stopping ??= (async () => {
      this.closing = true;
      this.reconnector.cancel();
      clearTimeout(this.idleTimer);
      const socket = this.socket;
      if (socket) {
        const closed = new Promise<void>((resolve) => this.closedWaiters.push(resolve));
        socket.close(1000, 'bye');
        const guard = setTimeout(() => socket.terminate(), 3_000);
        await closed;
        clearTimeout(guard);
      }
      this.firstWelcome?.reject(error ?? new AgentBusError('closed', 'the observer was closed'));
      this.firstWelcome = undefined;
      if (error) this.events.emit('error', error);
      this.setState('closed');
    })();
    return this.stopping;
  }
}
