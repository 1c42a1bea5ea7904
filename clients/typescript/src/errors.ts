/**
 * The one error class of this library.
 *
 * `code` is the broker's machine-readable code when the broker refused something (the
 * `code` of an `error` frame, of a refused WebSocket upgrade or of a REST error body: see
 * docs/PROTOCOL.md, "Error codes" and "REST errors"), or one of the client's own codes:
 *
 * | code | meaning |
 * | --- | --- |
 * | `invalid_argument` | A function of this library was called with bad input; nothing was sent. |
 * | `timeout` | A request got no reply in time: the broker's timeout response came (`response` holds it), or nothing came at all. |
 * | `send_timeout` | A send got no receipt within `sendTimeoutMs`. It may or may not have been stored: send it again with the same `client_msg_id` to find out. |
 * | `closed` | The client was closed (by `close()`, or for good after a refusal) before the operation finished. |
 * | `replaced` | Another connection with the same agent id took over (close code 4001). The client does not reconnect. |
 * | `token_revoked` | The token of the connection was revoked (close code 4003). The client does not reconnect. |
 * | `frame_too_large` | The send is larger than `maxFrameBytes` (or the broker's limit): it was not stored. |
 * | `connect_timeout` | `connect()` or `observe()` did not get a first `welcome` within `connectTimeoutMs`. |
 * | `http_error` | A REST call failed with a status and a body that is not an agentbus error body. |
 * | `network_error` | A REST call could not reach the broker. |
 */
export class AgentBusError extends Error {
  /** The broker's error code, or one of the client's own codes (see the class comment). */
  readonly code: string;
  /** The field at fault, when the broker named one. */
  readonly field?: string;
  /** The HTTP status, for a refused WebSocket upgrade or a REST call. */
  readonly status?: number;
  /** How long the broker asked to wait before trying again. */
  readonly retryAfterMs?: number;
  /** The `client_msg_id` of the send this error is about. */
  readonly clientMsgId?: string;
  /** Anything else the broker said: the whole error frame or error body, the timeout response. */
  readonly details?: unknown;

  constructor(
    code: string,
    message: string,
    extra: {
      field?: string;
      status?: number;
      retryAfterMs?: number;
      clientMsgId?: string;
      details?: unknown;
      cause?: unknown;
    } = {},
  ) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'AgentBusError';
    this.code = code;
    if (extra.field !== undefined) this.field = extra.field;
    if (extra.status !== undefined) this.status = extra.status;
    if (extra.retryAfterMs !== undefined) this.retryAfterMs = extra.retryAfterMs;
    if (extra.clientMsgId !== undefined) this.clientMsgId = extra.clientMsgId;
    if (extra.details !== undefined) this.details = extra.details;
  }
}

/** An `invalid_argument` error: the caller passed something this library cannot send. */
export function invalidArgument(message: string): AgentBusError {
  return new AgentBusError('invalid_argument', message);
}
