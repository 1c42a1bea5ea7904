/**
 * Test helpers: a real broker process on a fresh PostgreSQL database, a TCP proxy to cut
 * connections at chosen moments, and bounded waits for events.
 */
import { spawn, spawnSync } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';

import { RestClient } from '@agentbus/client';
import type { Emitter } from '@agentbus/client';

/** This package's folder (the compiled tests run from build/test). */
const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
/** The broker binary: $AGENTBUS_BIN, or the repository's debug build. */
export const BROKER_BIN = process.env.AGENTBUS_BIN ?? path.resolve(PACKAGE_DIR, '../../target/debug/agentbus');
/** The PostgreSQL server the brokers use (user postgres, trust authentication). */
const PG_URL = (process.env.AGENTBUS_TEST_PG ?? 'postgres://postgres@127.0.0.1:5432').replace(/\/+$/, '');

const live = new Set<Broker>();

function dropDatabaseSync(name: string): void {
  const res = spawnSync('psql', [`${PG_URL}/postgres`, '-qAtc', `DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`], {
    stdio: ['ignore', 'ignore', 'pipe'],
    timeout: 30_000,
  });
  if (res.status !== 0) {
    process.stderr.write(`could not drop test database ${name}: ${res.stderr?.toString() ?? res.error}\n`);
  }
}

// Whatever happens to the test process, no broker and no database is left behind.
process.on('exit', () => {
  for (const broker of live) {
    broker.proc?.kill('SIGKILL');
    dropDatabaseSync(broker.dbName);
  }
  live.clear();
});
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => process.exit(signal === 'SIGINT' ? 130 : 143));
}

export interface BrokerOptions {
  /** Extra `agentbus serve` arguments, such as `--heartbeat-interval-ms 500`. */
  args?: string[];
}

/** A broker process of the binary under test, with its own fresh database. */
export class Broker {
  readonly dbName = `t_${randomBytes(16).toString('hex')}`;
  proc: ChildProcess | undefined;
  port = 0;
  private readonly args: string[];
  private stderrTail: string[] = [];

  private constructor(options: BrokerOptions) {
    this.args = options.args ?? [];
  }

  /**
   * Starts a broker on a fresh database and a free port. With a test context, the broker is
   * stopped and its database dropped when the test ends, whether it passed or not.
   */
  static async start(t?: TestContext, options: BrokerOptions = {}): Promise<Broker> {
    if (!existsSync(BROKER_BIN)) {
      throw new Error(`no broker binary at ${BROKER_BIN}: build it (cargo build) or set AGENTBUS_BIN`);
    }
    const broker = new Broker(options);
    live.add(broker);
    t?.after(() => broker.cleanup());
    await broker.spawn('127.0.0.1:0');
    return broker;
  }

  /** `http://127.0.0.1:PORT` */
  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** REST helpers for this broker (no token: it is open, on loopback). */
  rest(projectId?: string): RestClient {
    return new RestClient({ url: this.url, ...(projectId === undefined ? {} : { projectId }) });
  }

  /** Creates a project; resolves with its id. */
  async createProject(name = 'test'): Promise<string> {
    const project = await this.rest().createProject(name);
    return project.id;
  }

  /** Kills the broker process at once (SIGKILL), as a crash would. */
  async kill(): Promise<void> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    proc.kill('SIGKILL');
    await exited;
  }

  /** Stops the broker as `agentbus serve` stops on SIGTERM: it settles pending sends and closes with 1001. */
  async terminate(): Promise<void> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    proc.kill('SIGTERM');
    await exited;
  }

  /** Starts the broker again, on the same port and database, after killing it (or `SIGTERM`). */
  async restart(signal: 'SIGKILL' | 'SIGTERM' = 'SIGKILL'): Promise<void> {
    if (signal === 'SIGTERM') await this.terminate();
    else await this.kill();
    await this.spawn(`127.0.0.1:${this.port}`);
  }

  /** Kills the broker and drops its database. */
  async cleanup(): Promise<void> {
    await this.kill();
    if (live.delete(this)) dropDatabaseSync(this.dbName);
  }

  /** The last lines the broker logged, to explain a failure. */
  log(): string {
    return this.stderrTail.join('\n');
  }

  private spawn(bind: string): Promise<void> {
    const proc = spawn(BROKER_BIN, ['serve', '--bind', bind, ...this.args], {
      env: { ...process.env, DATABASE_URL: `${PG_URL}/${this.dbName}`, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.proc = proc;
    // Keep reading stderr so that the broker never blocks on a full pipe.
    createInterface({ input: proc.stderr! }).on('line', (line) => {
      this.stderrTail.push(line);
      if (this.stderrTail.length > 50) this.stderrTail.shift();
    });
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        proc.kill('SIGKILL');
        reject(new Error(`the broker did not report listening within 60 s:\n${this.log()}`));
      }, 60_000);
      const lines = createInterface({ input: proc.stdout! });
      lines.on('line', (line) => {
        let event: { event?: string; port?: number };
        try {
          event = JSON.parse(line) as typeof event;
        } catch {
          return;
        }
        if (event.event === 'listening' && typeof event.port === 'number') {
          clearTimeout(timer);
          this.port = event.port;
          resolve();
        }
      });
      proc.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`the broker exited (${code ?? signal}) before listening:\n${this.log()}`));
      });
    });
  }
}

/**
 * A TCP proxy in front of a broker, to cut connections at chosen moments: `holdReplies`
 * stops forwarding what the broker sends (the client's frames still reach the broker), and
 * `dropAll` ends every proxied connection at once.
 */
export class TcpProxy {
  private readonly server: net.Server;
  private readonly pairs = new Set<{ client: net.Socket; upstream: net.Socket }>();
  port = 0;
  /** While true, bytes from the broker are discarded instead of forwarded. */
  holdReplies = false;
  /** How many connections were accepted. */
  accepted = 0;

  private constructor(targetPort: number) {
    this.server = net.createServer((client) => {
      this.accepted++;
      const upstream = net.connect(targetPort, '127.0.0.1');
      const pair = { client, upstream };
      this.pairs.add(pair);
      client.on('data', (data) => upstream.write(data));
      upstream.on('data', (data) => {
        if (!this.holdReplies) client.write(data);
      });
      const end = () => {
        this.pairs.delete(pair);
        client.destroy();
        upstream.destroy();
      };
      client.on('close', end);
      upstream.on('close', end);
      client.on('error', end);
      upstream.on('error', end);
    });
  }

  static async start(t: TestContext, targetPort: number): Promise<TcpProxy> {
    const proxy = new TcpProxy(targetPort);
    await new Promise<void>((resolve) => proxy.server.listen(0, '127.0.0.1', resolve));
    proxy.port = (proxy.server.address() as net.AddressInfo).port;
    t.after(() => proxy.close());
    return proxy;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** How many proxied connections are open. */
  get open(): number {
    return this.pairs.size;
  }

  dropAll(): void {
    for (const { client, upstream } of this.pairs) {
      client.destroy();
      upstream.destroy();
    }
    this.pairs.clear();
  }

  close(): Promise<void> {
    this.dropAll();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/**
 * Resolves with the next `event` of `emitter` that satisfies `accept` (any, by default);
 * rejects after `timeoutMs`, which only bounds a hang.
 */
export function nextEvent<E extends { [K in keyof E]: unknown }, K extends keyof E>(
  emitter: Emitter<E>,
  event: K,
  accept: (value: E[K]) => boolean = () => true,
  timeoutMs = 20_000,
): Promise<E[K]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${String(event)} event within ${timeoutMs} ms`));
    }, timeoutMs);
    const off = emitter.on(event, (value) => {
      if (!accept(value)) return;
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

/**
 * Resolves once `check` returns true, checking again every `intervalMs`; rejects after
 * `timeoutMs`, which only bounds a hang. For state that only a REST read can show.
 */
export async function until(
  what: string,
  check: () => boolean | Promise<boolean>,
  { timeoutMs = 20_000, intervalMs = 50 }: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** A deferred value: `promise` settles when `resolve` or `reject` is called. */
export function deferred<T>(): { promise: Promise<T>; resolve(value: T): void; reject(error: unknown): void } {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}
