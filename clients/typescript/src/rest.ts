/**
 * Helpers for the broker's REST API (docs/PROTOCOL.md, "REST API"), over the runtime's
 * `fetch`. Every method resolves with the broker's JSON body, or rejects with an
 * `AgentBusError` carrying the broker's `code` and the HTTP status.
 */
import { AgentBusError, invalidArgument } from './errors.js';
import type { Agent, Json, JsonObject, Priority, Project, StoredMessage } from './types.js';
import { baseUrls, checkUuid, compact, describe } from './util.js';

/** The part of `fetch` this library uses (the runtime's `fetch` fits). */
export type FetchLike = (
  url: string,
  init: { method: string; headers: Record<string, string>; body?: string },
) => Promise<{ ok: boolean; status: number; headers: { get(name: string): string | null }; text(): Promise<string> }>;

export interface RestOptions {
  /** The broker's address, such as `http://127.0.0.1:8080` (`ws://` works too). */
  url: string;
  /** The project the project-scoped methods use (each method can name another). */
  projectId?: string;
  /** A project token or the admin token, sent as `Authorization: Bearer`. */
  token?: string;
  /** A `fetch` implementation (default: the runtime's). */
  fetch?: FetchLike;
}

export interface HistoryQuery {
  after_seq?: number;
  before_seq?: number;
  limit?: number;
  type?: string;
  sender?: string;
  correlation_id?: string;
  thread?: string;
  q?: string;
}

export interface HistoryPage {
  messages: StoredMessage[];
  head_seq: number;
  has_more: boolean;
  truncated: boolean;
  next: { after_seq: number } | { before_seq: number } | null;
}

export interface InboxQuery {
  limit?: number;
  wait_ms?: number;
  ack?: boolean;
  urgent_only?: boolean;
  agent_type?: string;
  after_priority?: number;
  after_seq?: number;
}

export interface Inbox {
  agent_id: string;
  ack_floor: number;
  messages: StoredMessage[];
  remaining: number;
  has_more: boolean;
  truncated: boolean;
  next: { after_priority: number; after_seq: number } | null;
}

/** The body of a REST publish: the fields of a send, plus its sender. */
export interface PublishInit {
  sender_agent_id?: string;
  sender_agent_type: string;
  content: string;
  type?: string;
  agent_type?: string;
  metadata?: JsonObject;
  to?: string;
  to_type?: string;
  priority?: Priority;
  ttl_ms?: number;
  correlation_id?: string;
  reply_to?: string;
  client_msg_id?: string;
  expects_reply?: boolean;
  timeout_ms?: number;
  success?: boolean;
  error?: string;
}

export interface MessageDetail {
  message: StoredMessage;
  owed_to: string[];
  replies: number;
  dead_letter: { reason: string; dead_at: string; retried_as: string | null } | null;
}

export interface DeadLetter {
  message: StoredMessage;
  reason: 'expired' | 'no_recipient' | 'max_deliveries';
  dead_at: string;
  retried_as: string | null;
}

/** `GET /api/projects/{id}/stats`: a project's counters. */
export interface ProjectStats {
  project_id: string;
  head_seq: number;
  connected_sessions: number;
  members: number;
  pending_requests: number;
  dead_letters: number;
  queue_depth: Record<string, number>;
  since_start: {
    messages_in: number;
    deliveries: number;
    messages_in_per_second: number;
    deliveries_per_second: number;
    messages_by_type: Record<string, number>;
  };
  persistence: { [key: string]: Json };
}

export class RestClient {
  readonly baseUrl: string;
  readonly projectId: string | undefined;
  private readonly token: string | undefined;
  private readonly fetchImpl: FetchLike;

  constructor(options: RestOptions) {
    if (options === null || typeof options !== 'object') throw invalidArgument('RestClient needs an options object');
    this.baseUrl = baseUrls(options.url).http;
    if (options.projectId !== undefined) checkUuid('projectId', options.projectId);
    this.projectId = options.projectId;
    if (options.token !== undefined && typeof options.token !== 'string') throw invalidArgument('`token` must be a string');
    this.token = options.token;
    const f = options.fetch ?? (globalThis as { fetch?: FetchLike }).fetch;
    if (typeof f !== 'function') throw invalidArgument('this runtime has no `fetch`: pass one as `fetch`');
    this.fetchImpl = f;
  }

  /** `POST /api/projects` (admin token): creates a project; the answer carries its first token. */
  createProject(name: string): Promise<Project & { token: string }> {
    if (typeof name !== 'string') throw invalidArgument(`a project name must be a string, not ${describe(name)}`);
    return this.call('POST', '/api/projects', { name });
  }

  /** `GET /api/projects` (admin token). */
  listProjects(): Promise<{ projects: Project[] }> {
    return this.call('GET', '/api/projects');
  }

  /** `GET /api/projects/{id}`. */
  project(projectId?: string): Promise<Project> {
    return this.call('GET', this.projectPath(projectId));
  }

  /** `GET /api/projects/{id}/messages`: a page of history, ascending seq. */
  history(query: HistoryQuery = {}, projectId?: string): Promise<HistoryPage> {
    return this.call('GET', `${this.projectPath(projectId)}/messages${queryString(query)}`);
  }

  /**
   * Every message of the history that matches `query` (the filters of `history`), page after
   * page from `after_seq` (default 0), ascending seq.
   */
  async historyAll(query: Omit<HistoryQuery, 'before_seq'> = {}, projectId?: string): Promise<StoredMessage[]> {
    const out: StoredMessage[] = [];
    let after = query.after_seq ?? 0;
    for (;;) {
      const page = await this.history({ limit: 1000, ...query, after_seq: after }, projectId);
      out.push(...page.messages);
      if (!page.has_more || page.messages.length === 0) return out;
      after = page.messages[page.messages.length - 1]!.seq;
    }
  }

  /** `GET /api/projects/{id}/messages/{message_id}`: one message with its delivery state. */
  message(messageId: string, projectId?: string): Promise<MessageDetail> {
    return this.call('GET', `${this.projectPath(projectId)}/messages/${encodeURIComponent(messageId)}`);
  }

  /** `POST /api/projects/{id}/messages`: publishes a message; resolves with it as stored. */
  publish(body: PublishInit, projectId?: string): Promise<StoredMessage> {
    return this.call('POST', `${this.projectPath(projectId)}/messages`, compact(body));
  }

  /**
   * `POST /api/projects/{id}/requests`: sends a request and waits for its first reply. A
   * timeout (504) rejects with code `timeout`, the body (with the broker's timeout response)
   * in `details`.
   */
  requestAndWait(
    body: Omit<PublishInit, 'expects_reply'>,
    projectId?: string,
  ): Promise<{ request: StoredMessage; response: StoredMessage }> {
    return this.call('POST', `${this.projectPath(projectId)}/requests`, compact(body));
  }

  /** `GET /api/projects/{id}/agents`: the members, optionally only those with a capability. */
  agents(query: { capability?: string } = {}, projectId?: string): Promise<{ agents: Agent[] }> {
    return this.call('GET', `${this.projectPath(projectId)}/agents${queryString(query)}`);
  }

  /** `POST /api/projects/{id}/agents`: joins (or updates) a member without a socket. */
  join(
    body: { agent_id?: string; agent_type: string; capabilities?: string[]; description?: string },
    projectId?: string,
  ): Promise<{ agent: Agent }> {
    return this.call('POST', `${this.projectPath(projectId)}/agents`, compact(body));
  }

  /** `GET /api/projects/{id}/agents/{agent_id}/inbox`: what the agent is owed. */
  inbox(agentId: string, query: InboxQuery = {}, projectId?: string): Promise<Inbox> {
    return this.call(
      'GET',
      `${this.projectPath(projectId)}/agents/${encodeURIComponent(agentId)}/inbox${queryString(query)}`,
    );
  }

  /** `POST /api/projects/{id}/agents/{agent_id}/ack`. */
  ack(
    agentId: string,
    body: { seqs?: number[]; up_to?: number },
    projectId?: string,
  ): Promise<{ agent_id: string; ack_floor: number; ignored: number[] }> {
    return this.call('POST', `${this.projectPath(projectId)}/agents/${encodeURIComponent(agentId)}/ack`, compact(body));
  }

  /** `GET /api/projects/{id}/stats`: the project's counters. */
  stats(projectId?: string): Promise<ProjectStats> {
    return this.call('GET', `${this.projectPath(projectId)}/stats`);
  }

  /** `GET /api/projects/{id}/dead-letters`, newest first. */
  deadLetters(query: { limit?: number } = {}, projectId?: string): Promise<{ dead_letters: DeadLetter[] }> {
    return this.call('GET', `${this.projectPath(projectId)}/dead-letters${queryString(query)}`);
  }

  /** `POST /api/projects/{id}/dead-letters/{message_id}/retry`. */
  retryDeadLetter(messageId: string, projectId?: string): Promise<StoredMessage> {
    return this.call('POST', `${this.projectPath(projectId)}/dead-letters/${encodeURIComponent(messageId)}/retry`);
  }

  private projectPath(projectId: string | undefined): string {
    const id = projectId ?? this.projectId;
    if (id === undefined) throw invalidArgument('no project: pass `projectId` to the RestClient or to this call');
    return `/api/projects/${checkUuid('projectId', id)}`;
  }

  /** One REST call; resolves with the parsed JSON body (or `undefined` for 204). */
  async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { Accept: 'application/json' };
    if (this.token !== undefined) headers.Authorization = `Bearer ${this.token}`;
    const init: { method: string; headers: Record<string, string>; body?: string } = { method, headers };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res: Awaited<ReturnType<FetchLike>>;
    try {
      res = await this.fetchImpl(`${this.baseUrl}${path}`, init);
    } catch (cause) {
      throw new AgentBusError('network_error', `${method} ${this.baseUrl}${path} failed: ${String(cause)}`, { cause });
    }
    const text = await res.text();
    let parsed: unknown = undefined;
    if (text.length > 0) {
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = undefined;
      }
    }
    if (res.ok) return parsed as T;
    const errorBody = parsed as { code?: unknown; error?: unknown } | undefined;
    const retryAfter = Number(res.headers.get('Retry-After'));
    const extra = {
      status: res.status,
      details: parsed ?? text,
      ...(Number.isFinite(retryAfter) && retryAfter > 0 ? { retryAfterMs: retryAfter * 1000 } : {}),
    };
    if (res.status === 504 && errorBody && typeof errorBody === 'object' && 'response' in errorBody) {
      throw new AgentBusError('timeout', "no reply before the request's deadline", extra);
    }
    if (errorBody && typeof errorBody.code === 'string') {
      throw new AgentBusError(
        errorBody.code,
        typeof errorBody.error === 'string' ? errorBody.error : `${method} ${path}: HTTP ${res.status}`,
        extra,
      );
    }
    throw new AgentBusError('http_error', `${method} ${path}: HTTP ${res.status} ${text.slice(0, 200)}`, extra);
  }
}

function queryString(query: object): string {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value === undefined || value === null) continue;
    if (!['string', 'number', 'boolean'].includes(typeof value)) {
      throw invalidArgument(`query parameter \`${key}\` must be a string, number or boolean, not ${describe(value)}`);
    }
    params.set(key, String(value));
  }
  const text = params.toString();
  return text ? `?${text}` : '';
}
