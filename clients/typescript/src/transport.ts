/**
 * One WebSocket connection, over the `ws` package in Node or the standard `WebSocket` of
 * browsers (and of any runtime that has one), with what each can tell about a failure.
 */
import { AgentBusError } from './errors.js';

/** The part of the standard `WebSocket` interface this library uses. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: any) => void): void;
}

/**
 * A WebSocket class: the standard one (`globalThis.WebSocket`), or the `ws` package's, which
 * also takes an options object (used to send the token in an `Authorization` header).
 */
export type WebSocketConstructor = new (url: string, protocolsOrOptions?: any) => WebSocketLike;

/** The extra events and methods of the `ws` package's sockets. */
interface NodeWebSocket extends WebSocketLike {
  on(event: string, listener: (...args: any[]) => void): unknown;
  terminate(): void;
}

/** A refused upgrade: the HTTP status and the broker's `{"error","code"}` body. */
export interface Refusal {
  status: number;
  code: string;
  error: string;
}

export interface CloseInfo {
  /** The close code; 1006 when the connection ended without a close frame (or never opened). */
  code: number;
  reason: string;
  /** Set when the broker refused the upgrade and the runtime could read its answer (Node). */
  refusal?: Refusal;
}

export interface SocketHandlers {
  onText(text: string): void;
  /** A sign of life: a frame or (in Node) a ping from the broker. */
  onActivity(): void;
  onClose(info: CloseInfo): void;
}

export interface Socket {
  send(text: string): boolean;
  close(code?: number, reason?: string): void;
  /** Ends the connection at once, without a close handshake. */
  terminate(): void;
  /** Whether the runtime reports the broker's pings (so silence can be noticed). */
  readonly seesPings: boolean;
}

export interface ResolvedWebSocket {
  ctor: WebSocketConstructor;
  /** The `ws` package (headers, pings, refused upgrades' bodies) or a standard WebSocket. */
  kind: 'ws' | 'standard';
}

let wsPackage: Promise<WebSocketConstructor> | undefined;

function isNode(): boolean {
  const proc = (globalThis as { process?: { versions?: { node?: string } } }).process;
  return typeof proc?.versions?.node === 'string';
}

function kindOf(ctor: WebSocketConstructor): 'ws' | 'standard' {
  return typeof (ctor.prototype as { terminate?: unknown })?.terminate === 'function' ? 'ws' : 'standard';
}

/**
 * The WebSocket class to use: the one given, else the `ws` package in Node, else the
 * runtime's standard `WebSocket`.
 */
export async function resolveWebSocket(given?: WebSocketConstructor): Promise<ResolvedWebSocket> {
  if (given !== undefined) {
    if (typeof given !== 'function') {
      throw new AgentBusError('invalid_argument', '`WebSocket` must be a WebSocket class (constructor)');
    }
    return { ctor: given, kind: kindOf(given) };
  }
  if (isNode()) {
    const specifier = 'ws';
    wsPackage ??= import(specifier).then(
      (mod: { default?: WebSocketConstructor; WebSocket?: WebSocketConstructor }) => {
        const ctor = mod.default ?? mod.WebSocket;
        if (typeof ctor !== 'function') throw new Error('the `ws` package has no WebSocket export');
        return ctor;
      },
    );
    try {
      const ctor = await wsPackage;
      return { ctor, kind: 'ws' };
    } catch (cause) {
      wsPackage = undefined;
      const native = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
      if (typeof native === 'function') return { ctor: native, kind: 'standard' };
      throw new AgentBusError(
        'invalid_argument',
        'no WebSocket implementation: install the `ws` package, or pass a WebSocket class as `WebSocket`',
        { cause },
      );
    }
  }
  const native = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (typeof native === 'function') return { ctor: native, kind: 'standard' };
  throw new AgentBusError('invalid_argument', 'this runtime has no WebSocket: pass a WebSocket class as `WebSocket`');
}

/**
 * Adds `token` to `url` as `?token=` (for WebSockets that cannot send headers). The token is
 * appended as written: the broker reads it without percent-decoding, and tokens are `ab_` and
 * hexadecimal digits.
 */
function withTokenQuery(url: string, token: string): string {
  return `${url}${url.includes('?') ? '&' : '?'}token=${encodeURIComponent(token)}`;
}

export interface OpenOptions {
  token?: string;
  /** Give up on the opening handshake after this long (the socket then closes with 1006). */
  handshakeTimeoutMs: number;
}

/** Opens one WebSocket connection. Every outcome ends with exactly one `onClose`. */
export function openSocket(
  resolved: ResolvedWebSocket,
  url: string,
  options: OpenOptions,
  handlers: SocketHandlers,
): Socket {
  let refusal: Refusal | undefined;
  let closed = false;
  const finish = (info: CloseInfo) => {
    if (closed) return;
    closed = true;
    clearTimeout(handshakeTimer);
    handlers.onClose(refusal ? { ...info, refusal } : info);
  };

  let sock: WebSocketLike;
  try {
    if (resolved.kind === 'ws') {
      const opts: Record<string, unknown> = { handshakeTimeout: options.handshakeTimeoutMs, perMessageDeflate: false };
      if (options.token !== undefined) opts.headers = { Authorization: `Bearer ${options.token}` };
      sock = new resolved.ctor(url, opts);
    } else {
      sock = new resolved.ctor(options.token !== undefined ? withTokenQuery(url, options.token) : url);
    }
  } catch (error) {
    // A URL the runtime refuses outright: report it like any failed attempt.
    const reason = error instanceof Error ? error.message : String(error);
    queueMicrotask(() => finish({ code: 1006, reason }));
    return { send: () => false, close: () => {}, terminate: () => {}, seesPings: false };
  }

  const handshakeTimer = setTimeout(() => {
    if (sock.readyState === 0) terminate();
  }, options.handshakeTimeoutMs);

  const terminate = () => {
    if (resolved.kind === 'ws') (sock as NodeWebSocket).terminate();
    else {
      try {
        sock.close();
      } catch {
        // already closing
      }
      // A standard WebSocket that never opened reports its close by itself; one that is open
      // may wait for the peer, so report the end now.
      finish({ code: 1006, reason: 'connection dropped by the client' });
    }
  };

  if (resolved.kind === 'ws') {
    const nodeSock = sock as NodeWebSocket;
    nodeSock.on('ping', () => handlers.onActivity());
    nodeSock.on('unexpected-response', (_req: unknown, res: NodeResponse) => {
      const chunks: Uint8Array[] = [];
      res.on('data', (chunk: Uint8Array) => {
        if (chunks.length < 64) chunks.push(chunk);
      });
      res.on('end', () => {
        refusal = parseRefusal(res.statusCode ?? 0, new TextDecoder().decode(concat(chunks)));
        nodeSock.terminate();
      });
      res.on('error', () => nodeSock.terminate());
    });
  }
  sock.addEventListener('open', () => {
    clearTimeout(handshakeTimer);
    handlers.onActivity();
  });
  sock.addEventListener('message', (event: { data: unknown }) => {
    if (closed) return;
    handlers.onActivity();
    if (typeof event.data === 'string') handlers.onText(event.data);
  });
  sock.addEventListener('error', () => {
    // With `ws` a close event always follows. Some standard implementations (Node 20's) fire no
    // close event after a failed handshake: the error then ends the connection by itself.
    if (resolved.kind === 'standard') {
      setTimeout(() => {
        if (closed) return;
        try {
          sock.close();
        } catch {
          // already closed
        }
        finish({ code: 1006, reason: 'the connection failed' });
      }, 0);
    }
  });
  sock.addEventListener('close', (event: { code?: number; reason?: string }) => {
    finish({ code: event.code ?? 1006, reason: event.reason ?? '' });
  });

  return {
    send(text: string): boolean {
      if (sock.readyState !== 1) return false;
      try {
        sock.send(text);
        return true;
      } catch {
        return false;
      }
    },
    close(code = 1000, reason = ''): void {
      try {
        sock.close(code, reason);
      } catch {
        terminate();
      }
    },
    terminate,
    seesPings: resolved.kind === 'ws',
  };
}

interface NodeResponse {
  statusCode?: number;
  on(event: string, listener: (...args: any[]) => void): unknown;
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

function parseRefusal(status: number, text: string): Refusal {
  try {
    const body = JSON.parse(text) as { code?: unknown; error?: unknown };
    if (typeof body.code === 'string') {
      return { status, code: body.code, error: typeof body.error === 'string' ? body.error : text };
    }
  } catch {
    // not the broker's JSON body
  }
  return { status, code: 'http_error', error: `the upgrade was refused with HTTP ${status}${text ? `: ${text.slice(0, 200)}` : ''}` };
}
