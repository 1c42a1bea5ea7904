/**
 * What the agent client and the observer do alike around their WebSocket: open it with the
 * token, and reconnect after a drop with the same option, the same limits and the same
 * backoff. Kept in one place so the two cannot drift apart.
 */
import { AgentBusError, invalidArgument } from './errors.js';
import { openSocket } from './transport.js';
import type { ResolvedWebSocket, Socket, SocketHandlers } from './transport.js';
import { backoffDelay, checkPositiveInt, describe } from './util.js';
import type { ReconnectOptions } from './util.js';
import type { Timer } from './timer.js';

/** Opens a connection to the broker, with `token` (if any) and a 10 s opening handshake. */
export function openBrokerSocket(
  resolved: ResolvedWebSocket,
  url: string,
  token: string | undefined,
  handlers: SocketHandlers,
): Socket {
  return openSocket(resolved, url, { ...(token === undefined ? {} : { token }), handshakeTimeoutMs: 10_000 }, handlers);
}

/** The `reconnect` option, checked, and the attempts made since the last welcome. */
export class Reconnector {
  private readonly enabled: boolean;
  private readonly backoff: { initialDelayMs: number; maxDelayMs: number };
  private readonly maxAttempts: number;
  /** Failed attempts in a row: the backoff grows with them, and `maxAttempts` bounds them. */
  private attempt = 0;
  private timer: Timer | undefined;

  /** `option` is the `reconnect` option as given (`undefined`: on, with the defaults). */
  constructor(option: boolean | ReconnectOptions | undefined) {
    const reconnect = option ?? true;
    if (typeof reconnect !== 'boolean' && (reconnect === null || typeof reconnect !== 'object')) {
      throw invalidArgument(`\`reconnect\` must be a boolean or an object, not ${describe(reconnect)}`);
    }
    this.enabled = reconnect !== false;
    const r: ReconnectOptions = typeof reconnect === 'object' ? reconnect : {};
    this.backoff = {
      initialDelayMs: r.initialDelayMs === undefined ? 250 : checkPositiveInt('reconnect.initialDelayMs', r.initialDelayMs),
      maxDelayMs: r.maxDelayMs === undefined ? 10_000 : checkPositiveInt('reconnect.maxDelayMs', r.maxDelayMs),
    };
    this.maxAttempts = r.maxAttempts === undefined ? Infinity : checkPositiveInt('reconnect.maxAttempts', r.maxAttempts);
  }

  /** A welcome came: the next drop starts the backoff over. */
  reset(): void {
    this.attempt = 0;
  }

  /** Why a connection that closed with `code` is not retried (reconnection off, attempts used up), if so. */
  giveUp(code: number): AgentBusError | undefined {
    if (!this.enabled) return new AgentBusError('closed', `the connection closed (${code}) and reconnection is off`);
    if (this.attempt >= this.maxAttempts) {
      return new AgentBusError('closed', `gave up after ${this.attempt} failed connection attempts`);
    }
    return undefined;
  }

  /**
   * Counts one more attempt and calls `open` after its backoff delay; `announce` is told the
   * attempt's number and delay first.
   */
  retry(announce: (attempt: number, delayMs: number) => void, open: () => void): void {
    const delayMs = backoffDelay(this.attempt, this.backoff);
    this.attempt++;
    announce(this.attempt, delayMs);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      open();
    }, delayMs);
  }

  /** Drops the pending retry, if any. */
  cancel(): void {
    clearTimeout(this.timer);
  }
}
