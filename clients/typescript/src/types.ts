/**
 * The objects of the agentbus protocol, with the protocol's own (snake_case) field names, so
 * that docs/PROTOCOL.md describes them exactly.
 */

/** A JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A JSON object, such as a message's `metadata`. */
export type JsonObject = { [key: string]: Json };

/** `auto`: a message is done once the client's WebSocket received it; `manual`: once acknowledged. */
export type AckMode = 'auto' | 'manual';

/** 0 critical, 1 high, 2 normal (the default), 3 low. */
export type Priority = 0 | 1 | 2 | 3;

/**
 * A committed message, as a `message` frame delivers it (without `op`). The optional fields
 * are present only when they have a value, as the protocol says.
 */
export interface Message {
  id: string;
  seq: number;
  project_id: string;
  sender_agent_id: string;
  sender_agent_type: string;
  sender_session_id: string | null;
  to: string | null;
  message_type: string;
  content: string;
  metadata: JsonObject;
  priority: Priority;
  correlation_id: string | null;
  reply_to: string | null;
  created_at: string;
  expires_at: string | null;
  to_type?: string;
  expects_reply?: true;
  reply_deadline?: string;
  in_reply_to_seq?: number;
  success?: boolean;
  error?: string;
  duration_ms?: number;
  late?: true;
}

/** A message as the REST API returns it: every field, plus the delivery state. */
export interface StoredMessage
  extends Omit<
    Message,
    'to_type' | 'expects_reply' | 'reply_deadline' | 'in_reply_to_seq' | 'success' | 'error' | 'duration_ms' | 'late'
  > {
  to_type: string | null;
  expects_reply: boolean;
  reply_deadline: string | null;
  in_reply_to_seq: number | null;
  success: boolean | null;
  error: string | null;
  duration_ms: number | null;
  late: boolean;
  client_msg_id: string | null;
  delivered_at: string | null;
  read_at: string | null;
  replied_at: string | null;
}

/** What `send()` sends: the fields of a `send` frame (docs/PROTOCOL.md, "send"). */
export interface SendInit {
  /** Required, not empty. */
  content: string;
  /** The message type, default `status`. */
  type?: string;
  /** A direct message to this agent id. */
  to?: string;
  /** A message to every agent of this type (except the sender). */
  to_type?: string;
  metadata?: JsonObject;
  priority?: Priority;
  ttl_ms?: number;
  correlation_id?: string;
  reply_to?: string;
  /** Generated (a UUID) when absent; reused for every retry of this send. */
  client_msg_id?: string;
  /** Overrides the sender's agent type for this message only. */
  agent_type?: string;
  /** A reply's outcome. */
  success?: boolean;
  /** A reply's error text. */
  error?: string;
}

/** What `request()` sends: a send that expects a reply. */
export interface RequestFields extends SendInit {
  /** How long the request waits for its reply (default: the client's `requestTimeoutMs`). */
  timeout_ms?: number;
}

/** The `sent` receipt of a send: the message is committed. */
export interface SentReceipt {
  id: string;
  seq: number;
  client_msg_id: string | null;
  created_at: string;
}

/** The first frame of an agent connection. */
export interface Welcome {
  op: 'welcome';
  session_id: string;
  project_id: string;
  agent_id: string;
  agent_type: string;
  head_seq: number;
  ack: AckMode;
  ack_floor: number;
  replay: number;
  replay_by_priority: [number, number, number, number];
}

/** The first frame of an observer connection. */
export interface ObserverWelcome {
  op: 'welcome';
  observer: true;
  session_id: string;
  project_id: string;
  head_seq: number;
  /** How many messages (those after `since`, up to `head_seq`) come before live delivery. */
  replay?: number;
}

/** An `error` frame. */
export interface ErrorFrame {
  op: 'error';
  code: string;
  error: string;
  field?: string;
  retry_after_ms?: number;
  seqs?: number[];
  client_msg_id: string | null;
}

/** A project, as the REST API returns it. */
export interface Project {
  id: string;
  name: string;
  head_seq: number;
  created_at: string;
}

/** A member of a project, as `GET …/agents` lists it. */
export interface Agent {
  agent_id: string;
  agent_type: string;
  online: boolean;
  session_ids: string[];
  interface: 'websocket' | 'rest' | 'mcp' | null;
  last_seen_at: string | null;
  ack_floor: number;
  queue_depth: number;
  capabilities: string[];
  description: string | null;
}
