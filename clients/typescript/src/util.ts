import { invalidArgument } from './errors.js';

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const IDENT_RE = /^[A-Za-z0-9_.:-]{1,50}$/;

/** A random (version 4) UUID, in browsers' insecure contexts too. */
export function uuid(): string {
  const c = (globalThis as { crypto?: Crypto }).crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  bytes[6] = (bytes[6]! & 0x0f) | 0x40;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

export function isUuid(value: unknown): value is string {
  return typeof value === 'string' && UUID_RE.test(value);
}

/** An agent type, message type or capability: 1 to 50 of `A-Z a-z 0-9 _ - . :`. */
export function isIdentifier(value: unknown): value is string {
  return typeof value === 'string' && IDENT_RE.test(value);
}

export function checkUuid(name: string, value: unknown): string {
  if (!isUuid(value)) throw invalidArgument(`\`${name}\` must be a UUID, not ${describe(value)}`);
  return value;
}

export function checkIdentifier(name: string, value: unknown): string {
  if (!isIdentifier(value)) {
    throw invalidArgument(
      `\`${name}\` must be 1 to 50 characters from A-Z a-z 0-9 _ - . :, not ${describe(value)}`,
    );
  }
  return value;
}

export function checkAgentId(name: string, value: unknown): string {
  if (typeof value !== 'string' || value.length === 0 || value.length > 255) {
    throw invalidArgument(`\`${name}\` must be a string of 1 to 255 characters, not ${describe(value)}`);
  }
  if (value.trim() !== value) throw invalidArgument(`\`${name}\` must not start or end with white space`);
  return value;
}

export function checkPositiveInt(name: string, value: unknown, min = 1): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
    throw invalidArgument(`\`${name}\` must be an integer of at least ${min}, not ${describe(value)}`);
  }
  return value;
}

export function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 60 ? `${value.slice(0, 60)}…` : value);
  if (value === undefined) return 'undefined';
  try {
    const text = JSON.stringify(value);
    return text === undefined ? String(value) : text.length > 60 ? `${text.slice(0, 60)}…` : text;
  } catch {
    return String(value);
  }
}

/**
 * The broker's base URL, from `http(s)://host:port[/prefix]` or `ws(s)://…`. Returned as
 * `{http, ws}` without a trailing slash.
 */
export function baseUrls(url: unknown): { http: string; ws: string } {
  if (typeof url !== 'string' || url.length === 0) {
    throw invalidArgument(`\`url\` must be the broker's address, such as "http://127.0.0.1:8080", not ${describe(url)}`);
  }
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw invalidArgument(`\`url\` is not a URL: ${describe(url)}`);
  }
  const scheme = parsed.protocol;
  if (!['http:', 'https:', 'ws:', 'wss:'].includes(scheme)) {
    throw invalidArgument(`\`url\` must start with http://, https://, ws:// or wss://, not ${describe(url)}`);
  }
  if (parsed.search || parsed.hash) {
    throw invalidArgument(`\`url\` is the broker's base address: no query string or fragment (${describe(url)})`);
  }
  const secure = scheme === 'https:' || scheme === 'wss:';
  const rest = `//${parsed.host}${parsed.pathname.replace(/\/+$/, '')}`;
  return { http: `${secure ? 'https:' : 'http:'}${rest}`, ws: `${secure ? 'wss:' : 'ws:'}${rest}` };
}

const encoder = new TextEncoder();

export function utf8Length(text: string): number {
  return encoder.encode(text).length;
}

/** Options of the reconnection backoff. */
export interface ReconnectOptions {
  /** The first delay, in milliseconds (default 250). */
  initialDelayMs?: number;
  /** The longest delay, in milliseconds (default 10000). */
  maxDelayMs?: number;
  /** Give up after this many failed attempts in a row (default: never). */
  maxAttempts?: number;
}

/**
 * Jittered exponential backoff: attempt n (from 0) waits a random time between half and all
 * of `min(maxDelayMs, initialDelayMs * 2^n)`.
 */
export function backoffDelay(attempt: number, options: Required<Omit<ReconnectOptions, 'maxAttempts'>>): number {
  const ceiling = Math.min(options.maxDelayMs, options.initialDelayMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
}

/** Removes the keys whose value is `undefined`. */
export function compact<T extends object>(value: T): T {
  const out: Record<string, unknown> = {};
  for (const [key, item] of Object.entries(value)) if (item !== undefined) out[key] = item;
  return out as T;
}
