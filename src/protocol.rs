//! The wire protocol (v1): frames a client sends, frames the broker sends, error codes and
//! close codes, and the validation shared by the WebSocket and the REST publish route.
//! `docs/PROTOCOL.md` is the reference for clients; this module is its implementation.

use bytestring::ByteString;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::models::{NewMessage, StoredMessage};

pub mod coordination;

/// Longest agent id, in characters (the column is VARCHAR(255)).
pub const MAX_AGENT_ID_CHARS: usize = crate::domain::agent_id::MAX_AGENT_ID_CHARS;
/// Longest agent type and message type, in characters (VARCHAR(50)).
pub const MAX_TYPE_CHARS: usize = crate::domain::identifier::MAX_IDENTIFIER_CHARS;
/// Longest correlation id, in characters.
pub const MAX_CORRELATION_ID_CHARS: usize = 255;
/// Longest client_msg_id, in characters.
pub const MAX_CLIENT_MSG_ID_CHARS: usize = 64;
/// Longest time to live: 30 days.
pub const MAX_TTL_MS: i64 = 30 * 24 * 3600 * 1000;
/// The message type of a send that names none (as in the spec's handler).
pub const DEFAULT_MESSAGE_TYPE: &str = "status";
/// Priority of a send that names none: 0 critical, 1 high, 2 normal, 3 low.
pub const DEFAULT_PRIORITY: i16 = 2;

/// The WebSocket close codes the broker sends, each for one reason (the "Close codes" table
/// of docs/PROTOCOL.md): the standard ones of RFC 6455 §7.4.1, then the broker's own in the
/// private range (4000-4999). `code as u16` is the number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The client closed the connection; the broker answers with 1000 whatever code it used.
    Normal = 1000,
    /// The broker is shutting down.
    GoingAway = 1001,
    /// Malformed WebSocket framing, or the connection could not be read.
    ProtocolError = 1002,
    /// A text frame is not valid UTF-8.
    InvalidPayload = 1007,
    /// A frame or fragmented message over `max_frame_bytes`.
    MessageTooBig = 1009,
    /// The broker could not join the channel, count the queue or read the store.
    InternalError = 1011,
    /// Another connection with the same agent_id joined the project and took over.
    Replaced = 4001,
    /// Nothing was heard from the client (no frame, no pong) within the client timeout.
    HeartbeatTimeout = 4002,
    /// The token the connection was opened with was revoked.
    TokenRevoked = 4003,
    /// The client read too slowly: its outgoing queue reached its bound.
    SlowConsumer = 4008,
}

impl CloseCode {
    /// The number sent in the close frame.
    pub const fn code(self) -> u16 {
        self as u16
    }
}

/// The one line `agentbus serve` writes to standard output once it accepts connections, for
/// supervisors and tests to learn the port (`--bind 127.0.0.1:0` picks a free one), e.g.
/// `{"event":"listening","bind":"127.0.0.1:0","port":40123}`. Logs go to standard error.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    /// Always `"listening"`.
    pub event: String,
    /// The address as configured.
    pub bind: String,
    /// The port actually bound.
    pub port: u16,
    /// The broker's node id among the brokers sharing its database (docs/SCALING.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
}

impl Listening {
    pub fn new(bind: &str, port: u16) -> Self {
        Listening {
            event: "listening".to_owned(),
            bind: bind.to_owned(),
            port,
            node_id: None,
        }
    }

    /// The same line naming the broker's node.
    pub fn on_node(mut self, node_id: &str) -> Self {
        self.node_id = Some(node_id.to_owned());
        self
    }

    /// The listening line, if `line` is one.
    pub fn parse(line: &str) -> Option<Listening> {
        serde_json::from_str::<Listening>(line.trim())
            .ok()
            .filter(|l| l.event == "listening")
    }
}

/// Machine-readable error codes, sent as `code` in error frames and REST error bodies.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    InvalidJson,
    /// The frame is JSON but not a JSON object, or a field has the wrong JSON type.
    InvalidFrame,
    /// A required field is absent.
    MissingField,
    /// A field is present but its value is not allowed (empty, too long, out of range...).
    InvalidField,
    /// `op` names no operation of this protocol version.
    UnknownOp,
    /// A binary frame: the protocol is JSON text only.
    BinaryNotSupported,
    /// The frame is larger than the broker accepts; the connection is closed (1009).
    FrameTooLarge,
    /// Too many of this session's sends are waiting for their commit.
    Overloaded,
    /// Over the connection's or the project's rate: retry after `retry_after_ms`.
    RateLimited,
    /// The database could not be reached: nothing was stored, retry with the same
    /// client_msg_id.
    Unavailable,
    /// The project no longer exists.
    ProjectNotFound,
    /// Stored, but the agent (`to`) has never connected, or no agent of the type (`to_type`)
    /// is a member: nobody may ever read it. A request in that case is dead-lettered.
    NoRecipient,
    /// A warning after an ack: these seqs were not awaiting an acknowledgement on this
    /// connection (never given to it, or already acknowledged), so nothing was recorded for
    /// them.
    AckIgnored,
    /// The connection is a read-only observer (no `agent_id`): it cannot send, acknowledge
    /// or mark anything read.
    ObserverReadOnly,
}

impl ErrorCode {
    /// The code as it is sent (`invalid_json` …): the same names serde writes.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a frame or request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
    /// The offending field, when there is one.
    pub field: Option<&'static str>,
    /// For `rate_limited`: how long to wait before sending again.
    pub retry_after_ms: Option<u64>,
}

impl Rejection {
    /// Over a rate limit: wait `wait` before sending again.
    pub fn rate_limited(scope: &str, wait: std::time::Duration) -> Self {
        let ms = wait.as_millis().max(1) as u64;
        Rejection {
            code: ErrorCode::RateLimited,
            message: format!("too many messages for this {scope}; retry in {ms} ms"),
            field: None,
            retry_after_ms: Some(ms),
        }
    }

    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            field: None,
            retry_after_ms: None,
        }
    }

    fn missing(field: &'static str) -> Self {
        Rejection {
            code: ErrorCode::MissingField,
            message: format!("`{field}` is required"),
            field: Some(field),
            retry_after_ms: None,
        }
    }

    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            code: ErrorCode::InvalidField,
            message: message.into(),
            field: Some(field),
            retry_after_ms: None,
        }
    }
}

/// Most seqs one `ack` frame may carry.
pub const MAX_ACK_SEQS: usize = 10_000;
/// Most message ids one `read` frame may carry.
pub const MAX_READ_IDS: usize = 1_000;

/// A client frame as it arrives: the fields of every operation, all optional, so a frame is
/// parsed in one pass and validation can say precisely what is wrong. A REST publish body has
/// the same send fields.
#[derive(Deserialize, Debug, Default)]
pub struct SendFields {
    /// The operation: absent or `"send"`, `"ack"`, `"read"`.
    pub op: Option<String>,
    /// `ack`: these seqs are done.
    pub seqs: Option<Vec<i64>>,
    /// `ack`: every message owed up to this seq is done.
    pub up_to: Option<i64>,
    /// `read`: these messages were read.
    pub ids: Option<Vec<String>>,
    /// `hello`: what the agent can do, and a word about it.
    pub capabilities: Option<Vec<String>>,
    pub description: Option<String>,
    /// A send to every agent of this type.
    pub to_type: Option<String>,
    /// A request: the sender waits for a reply (see `timeout_ms`).
    pub expects_reply: Option<bool>,
    pub timeout_ms: Option<i64>,
    /// A reply's outcome.
    pub success: Option<bool>,
    pub error: Option<String>,
    pub agent_type: Option<String>,
    #[serde(rename = "type")]
    pub message_type: Option<String>,
    pub content: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub to: Option<String>,
    pub priority: Option<i64>,
    pub ttl_ms: Option<i64>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub client_msg_id: Option<String>,
    /// A task: exactly one agent takes it (docs/PROTOCOL.md, "Tasks").
    pub task: Option<bool>,
    pub claim_timeout_ms: Option<i64>,
    pub work_timeout_ms: Option<i64>,
}

/// What a client may ask of the broker in one frame.
// Built once per frame and consumed at once: boxing the send would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ClientOp {
    Send(SendFields),
    /// Manual acknowledgement: these seqs, and/or everything up to `up_to`, are done.
    Ack {
        seqs: Vec<i64>,
        up_to: Option<i64>,
    },
    /// Read receipts.
    Read {
        ids: Vec<Uuid>,
    },
    /// What the agent can do, declared after connecting.
    Hello {
        capabilities: Vec<String>,
        description: Option<String>,
    },
    /// A file claim or task operation (`claim`, `claim_task`, …), answered with a
    /// `claim_result` or `task_result`.
    Coordination {
        op: coordination::CoordinationOp,
        client_msg_id: Option<String>,
    },
}

/// Most capabilities one agent may declare.
pub const MAX_CAPABILITIES: usize = 64;
/// Longest agent description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1_000;
/// Longest reply error text, in characters.
pub const MAX_ERROR_CHARS: usize = 4_096;
/// A request's timeout when it names none (as in the agent protocol's sendAndWait examples).
pub const DEFAULT_REPLY_TIMEOUT_MS: i64 = 30_000;
/// Longest a request may wait for its reply: one day.
pub const MAX_REPLY_TIMEOUT_MS: i64 = 24 * 3600 * 1000;

/// Checks a list of declared capabilities (identifiers, at most [`MAX_CAPABILITIES`]).
pub fn check_capabilities(capabilities: &[String]) -> Result<(), Rejection> {
    if capabilities.len() > MAX_CAPABILITIES {
        return Err(Rejection::invalid(
            "capabilities",
            format!("at most {MAX_CAPABILITIES} capabilities"),
        ));
    }
    for capability in capabilities {
        check_identifier("capabilities", capability, MAX_TYPE_CHARS)?;
    }
    Ok(())
}

/// How a session's deliveries count as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// Done once the client's WebSocket has received it (at-most-once beyond that point).
    Auto,
    /// Done once the client acknowledges it (at-least-once).
    Manual,
}

fn parse_hello(frame: SendFields) -> Result<ClientOp, Rejection> {
    let capabilities = frame.capabilities.unwrap_or_default();
    check_capabilities(&capabilities)?;
    if let Some(d) = &frame.description {
        if d.chars().count() > MAX_DESCRIPTION_CHARS || d.contains('\0') {
            return Err(Rejection::invalid(
                "description",
                format!(
                    "`description` must be at most {MAX_DESCRIPTION_CHARS} characters, without NUL"
                ),
            ));
        }
    }
    Ok(ClientOp::Hello {
        capabilities,
        description: frame.description,
    })
}

/// An acknowledgement, as the `ack` frame and `POST …/agents/{agent_id}/ack` ask for it:
/// these seqs, and/or every owed message up to `up_to` (inclusive), are done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRequest {
    pub seqs: Vec<i64>,
    pub up_to: Option<i64>,
}

impl AckRequest {
    /// Checks an ack: at least one of the two, at most [`MAX_ACK_SEQS`] seqs, each seq at
    /// least 1.
    pub fn new(seqs: Option<Vec<i64>>, up_to: Option<i64>) -> Result<AckRequest, Rejection> {
        let seqs = seqs.unwrap_or_default();
        if seqs.is_empty() && up_to.is_none() {
            return Err(Rejection::new(
                ErrorCode::MissingField,
                "an ack needs `seqs` (a list of seqs) and/or `up_to` (a seq)",
            ));
        }
        if seqs.len() > MAX_ACK_SEQS {
            return Err(Rejection::invalid(
                "seqs",
                format!("at most {MAX_ACK_SEQS} seqs per ack"),
            ));
        }
        if seqs.iter().chain(up_to.iter()).any(|&s| s < 1) {
            return Err(Rejection::invalid("seqs", "seqs start at 1"));
        }
        Ok(AckRequest { seqs, up_to })
    }
}

fn parse_ack(frame: SendFields) -> Result<ClientOp, Rejection> {
    let AckRequest { seqs, up_to } = AckRequest::new(frame.seqs, frame.up_to)?;
    Ok(ClientOp::Ack { seqs, up_to })
}

fn parse_read(frame: SendFields) -> Result<ClientOp, Rejection> {
    let raw = frame.ids.ok_or_else(|| Rejection::missing("ids"))?;
    if raw.is_empty() || raw.len() > MAX_READ_IDS {
        return Err(Rejection::invalid(
            "ids",
            format!("`ids` must list 1 to {MAX_READ_IDS} message ids"),
        ));
    }
    let ids = raw
        .iter()
        .map(|id| Uuid::parse_str(id))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Rejection::invalid("ids", "`ids` must be message ids (UUIDs)"))?;
    Ok(ClientOp::Read { ids })
}

/// Parses one text frame. On failure the rejection carries the frame's `client_msg_id` when
/// one can still be read, so the client can tell which send failed.
pub fn parse_client_frame(text: &str) -> Result<ClientOp, (Rejection, Option<String>)> {
    match serde_json::from_str::<SendFields>(text) {
        Ok(frame) => match frame.op.as_deref() {
            None | Some("send") => Ok(ClientOp::Send(frame)),
            Some("ack") => parse_ack(frame).map_err(|r| (r, None)),
            Some("read") => parse_read(frame).map_err(|r| (r, None)),
            Some("hello") => parse_hello(frame).map_err(|r| (r, None)),
            Some(op) if coordination::OPS.contains(&op) => match coordination::parse(op, text) {
                Ok(op) => Ok(ClientOp::Coordination {
                    op,
                    client_msg_id: frame.client_msg_id,
                }),
                Err(rejection) => Err((rejection, frame.client_msg_id)),
            },
            Some(other) => Err((
                Rejection::new(
                    ErrorCode::UnknownOp,
                    format!(
                        "unknown op {other:?}; this broker understands send, ack, read, hello, \
                         claim, object, release, renew, claim_task, complete_task, \
                         release_task and cancel_task"
                    ),
                ),
                frame.client_msg_id,
            )),
        },
        Err(err) => {
            // Tell "not JSON at all" from "JSON of the wrong shape", and recover the
            // client_msg_id from a frame whose other fields are wrong.
            match serde_json::from_str::<serde_json::Value>(text) {
                Err(_) => Err((
                    Rejection::new(ErrorCode::InvalidJson, format!("invalid JSON: {err}")),
                    None,
                )),
                Ok(value) => {
                    let client_msg_id = value
                        .get("client_msg_id")
                        .and_then(|v| v.as_str())
                        .map(str::to_owned);
                    let message = if value.is_object() {
                        format!("a field has the wrong type: {err}")
                    } else {
                        "a frame must be a JSON object".to_owned()
                    };
                    Err((
                        Rejection::new(ErrorCode::InvalidFrame, message),
                        client_msg_id,
                    ))
                }
            }
        }
    }
}

/// A send that passed validation: every field within its limits.
#[derive(Debug, Clone)]
pub struct ValidSend {
    pub agent_type: Option<String>,
    pub message_type: String,
    pub content: String,
    pub metadata: serde_json::Value,
    pub to: Option<String>,
    pub priority: i16,
    pub ttl_ms: Option<i64>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<Uuid>,
    pub client_msg_id: Option<String>,
    pub to_type: Option<String>,
    /// `Some(timeout)` for a request.
    pub reply_timeout_ms: Option<i64>,
    pub success: Option<bool>,
    pub error: Option<String>,
    /// `Some` for a task.
    pub task: Option<crate::domain::tasks::TaskTerms>,
}

impl ValidSend {
    /// A validated send from `sender`, as the broker will store it. Requests without a
    /// correlation id are correlated by their own id.
    pub fn into_message(
        self,
        project_id: Uuid,
        sender_agent_id: String,
        sender_agent_type: String,
        sender_session_id: Option<Uuid>,
    ) -> NewMessage {
        let send = self;
        let id = Uuid::new_v4();
        let correlation_id = match (send.correlation_id, send.reply_timeout_ms) {
            (None, Some(_)) => Some(id.to_string()),
            (given, _) => given,
        };
        NewMessage {
            id,
            project_id,
            sender_agent_id,
            sender_agent_type: send.agent_type.unwrap_or(sender_agent_type),
            sender_session_id,
            recipient_agent_id: send.to,
            message_type: send.message_type,
            content: send.content,
            metadata: send.metadata,
            priority: send.priority,
            correlation_id,
            reply_to: send.reply_to,
            client_msg_id: send.client_msg_id,
            ttl_ms: send.ttl_ms,
            recipient_agent_type: send.to_type,
            reply_timeout_ms: send.reply_timeout_ms,
            success: send.success,
            error: send.error,
            reply: None,
            timeout_of: None,
            task: send.task,
        }
    }
}

/// The configurable bounds of a send.
#[derive(Debug, Clone, Copy)]
pub struct SendLimits {
    pub max_content_bytes: usize,
    /// About the bytes of the metadata's JSON.
    pub max_metadata_bytes: usize,
    /// Nesting levels of the metadata (the object itself is level 1).
    pub max_metadata_depth: usize,
}

impl SendLimits {
    /// No limit beyond the protocol's own rules (for tools that replay trusted frames).
    pub const UNBOUNDED: SendLimits = SendLimits {
        max_content_bytes: usize::MAX,
        max_metadata_bytes: usize::MAX,
        max_metadata_depth: usize::MAX,
    };

    #[cfg(test)]
    fn content(max_content_bytes: usize) -> SendLimits {
        SendLimits {
            max_content_bytes,
            ..SendLimits::UNBOUNDED
        }
    }
}

/// Checks a send's fields against the protocol's rules and the broker's limits. A refused
/// send gives back its client_msg_id, to be echoed in the error.
pub fn validate_send(
    mut fields: SendFields,
    limits: &SendLimits,
) -> Result<ValidSend, (Rejection, Option<String>)> {
    let client_msg_id = fields.client_msg_id.take();
    match check_send(fields, client_msg_id.as_deref(), limits) {
        Ok(mut send) => {
            send.client_msg_id = client_msg_id;
            Ok(send)
        }
        Err(rejection) => Err((rejection, client_msg_id)),
    }
}

fn check_send(
    fields: SendFields,
    client_msg_id: Option<&str>,
    limits: &SendLimits,
) -> Result<ValidSend, Rejection> {
    let max_content_bytes = limits.max_content_bytes;
    // Judged now (the fields move below), reported after the others.
    let task = check_task(&fields, fields.expects_reply == Some(true));
    let content = fields
        .content
        .ok_or_else(|| Rejection::missing("content"))?;
    if content.is_empty() {
        return Err(Rejection::invalid("content", "`content` must not be empty"));
    }
    if content.contains('\0') {
        return Err(Rejection::invalid(
            "content",
            "`content` must not contain NUL characters (PostgreSQL text cannot store them)",
        ));
    }
    if content.len() > max_content_bytes {
        return Err(Rejection::invalid(
            "content",
            format!(
                "`content` is {} bytes; at most {max_content_bytes} are accepted",
                content.len()
            ),
        ));
    }
    let message_type = match fields.message_type {
        None => DEFAULT_MESSAGE_TYPE.to_owned(),
        Some(t) => {
            check_identifier("type", &t, MAX_TYPE_CHARS)?;
            t
        }
    };
    if let Some(agent_type) = &fields.agent_type {
        check_identifier("agent_type", agent_type, MAX_TYPE_CHARS)?;
    }
    let metadata = match fields.metadata {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(value @ serde_json::Value::Object(_)) => {
            let mut found = Shape::default();
            shape(&value, 1, &mut found);
            if found.nul {
                return Err(Rejection::invalid(
                    "metadata",
                    "`metadata` must not contain NUL characters (PostgreSQL jsonb cannot store them)",
                ));
            }
            if found.bytes > limits.max_metadata_bytes {
                return Err(Rejection::invalid(
                    "metadata",
                    format!(
                        "`metadata` is about {} bytes; at most {} are accepted",
                        found.bytes, limits.max_metadata_bytes
                    ),
                ));
            }
            if found.depth > limits.max_metadata_depth {
                return Err(Rejection::invalid(
                    "metadata",
                    format!(
                        "`metadata` nests {} levels deep; at most {} are accepted",
                        found.depth, limits.max_metadata_depth
                    ),
                ));
            }
            value
        }
        Some(_) => {
            return Err(Rejection::invalid(
                "metadata",
                "`metadata` must be a JSON object",
            ))
        }
    };
    if let Some(to) = &fields.to {
        check_agent_id("to", to)?;
    }
    if let Some(to_type) = &fields.to_type {
        if fields.to.is_some() {
            return Err(Rejection::invalid(
                "to_type",
                "give `to` (an agent) or `to_type` (a type), not both",
            ));
        }
        check_identifier("to_type", to_type, MAX_TYPE_CHARS)?;
    }
    let reply_timeout_ms = match (fields.expects_reply, fields.timeout_ms) {
        (Some(true), timeout) => {
            let timeout = timeout.unwrap_or(DEFAULT_REPLY_TIMEOUT_MS);
            if !(1..=MAX_REPLY_TIMEOUT_MS).contains(&timeout) {
                return Err(Rejection::invalid(
                    "timeout_ms",
                    format!("`timeout_ms` must be between 1 and {MAX_REPLY_TIMEOUT_MS}"),
                ));
            }
            Some(timeout)
        }
        (_, Some(_)) => {
            return Err(Rejection::invalid(
                "timeout_ms",
                "`timeout_ms` is for requests: add \"expects_reply\": true",
            ))
        }
        (_, None) => None,
    };
    if let Some(e) = &fields.error {
        if e.chars().count() > MAX_ERROR_CHARS || e.contains('\0') {
            return Err(Rejection::invalid(
                "error",
                format!("`error` must be at most {MAX_ERROR_CHARS} characters, without NUL"),
            ));
        }
    }
    let priority = match fields.priority {
        None => DEFAULT_PRIORITY,
        Some(p @ 0..=3) => p as i16,
        Some(p) => {
            return Err(Rejection::invalid(
                "priority",
                format!("`priority` must be 0 (critical) to 3 (low), not {p}"),
            ))
        }
    };
    if let Some(ttl) = fields.ttl_ms {
        if !(1..=MAX_TTL_MS).contains(&ttl) {
            return Err(Rejection::invalid(
                "ttl_ms",
                format!("`ttl_ms` must be between 1 and {MAX_TTL_MS}"),
            ));
        }
    }
    if let Some(c) = &fields.correlation_id {
        check_text("correlation_id", c, MAX_CORRELATION_ID_CHARS)?;
    }
    let reply_to = match fields.reply_to {
        None => None,
        Some(r) => Some(Uuid::parse_str(&r).map_err(|_| {
            Rejection::invalid("reply_to", "`reply_to` must be a message id (UUID)")
        })?),
    };
    if let Some(c) = client_msg_id {
        check_text("client_msg_id", c, MAX_CLIENT_MSG_ID_CHARS)?;
    }
    let task = task?;
    Ok(ValidSend {
        agent_type: fields.agent_type,
        message_type,
        content,
        metadata,
        to: fields.to,
        priority,
        ttl_ms: fields.ttl_ms,
        correlation_id: fields.correlation_id,
        reply_to,
        client_msg_id: None,
        to_type: fields.to_type,
        reply_timeout_ms,
        success: fields.success,
        error: fields.error,
        task,
    })
}

/// A task's terms: `task`, `claim_timeout_ms`, `work_timeout_ms` (the timeouts only with
/// `"task": true`; a task is not a request).
fn check_task(
    fields: &SendFields,
    request: bool,
) -> Result<Option<crate::domain::tasks::TaskTerms>, Rejection> {
    use crate::domain::tasks::{check_timeout, TaskTerms};
    if fields.task != Some(true) {
        for (field, value) in [
            ("claim_timeout_ms", fields.claim_timeout_ms),
            ("work_timeout_ms", fields.work_timeout_ms),
        ] {
            if value.is_some() {
                return Err(Rejection::invalid(
                    field,
                    format!("`{field}` is for tasks: add \"task\": true"),
                ));
            }
        }
        return Ok(None);
    }
    if request {
        return Err(Rejection::invalid(
            "task",
            "a task is not a request: its holder's completion is its answer; drop `expects_reply`",
        ));
    }
    Ok(Some(TaskTerms {
        claim_timeout_ms: check_timeout("claim_timeout_ms", fields.claim_timeout_ms)
            .map_err(|e| Rejection::invalid("claim_timeout_ms", e))?,
        work_timeout_ms: check_timeout("work_timeout_ms", fields.work_timeout_ms)
            .map_err(|e| Rejection::invalid("work_timeout_ms", e))?,
    }))
}

/// What validation needs to know of a metadata value, found in one walk: its size (about
/// the bytes of its JSON), its nesting depth, and whether any string or key holds a NUL.
#[derive(Default)]
struct Shape {
    bytes: usize,
    depth: usize,
    nul: bool,
}

fn shape(value: &serde_json::Value, depth: usize, acc: &mut Shape) {
    acc.depth = acc.depth.max(depth);
    match value {
        serde_json::Value::String(s) => {
            acc.bytes += s.len() + 2;
            acc.nul |= s.contains('\0');
        }
        serde_json::Value::Array(items) => {
            acc.bytes += 2 + items.len();
            for item in items {
                shape(item, depth + 1, acc);
            }
        }
        serde_json::Value::Object(map) => {
            acc.bytes += 2 + map.len();
            for (k, v) in map {
                acc.bytes += k.len() + 3;
                acc.nul |= k.contains('\0');
                shape(v, depth + 1, acc);
            }
        }
        serde_json::Value::Number(_) => acc.bytes += 8,
        serde_json::Value::Bool(_) | serde_json::Value::Null => acc.bytes += 5,
    }
}

/// An agent id: 1 to 255 characters, no control, invisible or bidi characters, no white
/// space at either end, and not the broker's own id or a look-alike of it (the rules are
/// [`crate::domain::agent_id`]'s).
pub fn check_agent_id(field: &'static str, value: &str) -> Result<(), Rejection> {
    crate::domain::agent_id::check(field, value).map_err(|e| Rejection::invalid(field, e.0))
}

/// Non-empty, at most `max_chars` characters, no control characters (NUL included).
fn check_text(field: &'static str, value: &str, max_chars: usize) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(Rejection::invalid(
            field,
            format!("`{field}` must not be empty"),
        ));
    }
    if value.chars().count() > max_chars {
        return Err(Rejection::invalid(
            field,
            format!("`{field}` is longer than {max_chars} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Rejection::invalid(
            field,
            format!("`{field}` must not contain control characters"),
        ));
    }
    Ok(())
}

/// An identifier (message type, agent type): 1 to `max_chars` of `A-Z a-z 0-9 _ - . :`.
pub fn check_identifier(
    field: &'static str,
    value: &str,
    max_chars: usize,
) -> Result<(), Rejection> {
    crate::domain::identifier::check(field, value, max_chars)
        .map_err(|e| Rejection::invalid(field, e.0))
}

/// A message as delivered to a recipient: `{"op":"message", ...}`. Serialised once per
/// message and the same bytes handed to every recipient.
#[derive(Serialize)]
struct MessageFrame<'a> {
    op: &'static str,
    id: Uuid,
    seq: i64,
    project_id: Uuid,
    sender_agent_id: &'a str,
    sender_agent_type: &'a str,
    sender_session_id: Option<Uuid>,
    to: Option<&'a str>,
    message_type: &'a str,
    content: &'a str,
    metadata: &'a serde_json::Value,
    priority: i16,
    correlation_id: Option<&'a str>,
    reply_to: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_type: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    expects_reply: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_deadline: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_reply_to_seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    success: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<i64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    late: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    task: bool,
}

pub fn message_frame(msg: &StoredMessage) -> ByteString {
    to_frame(&MessageFrame {
        op: "message",
        id: msg.id,
        seq: msg.seq,
        project_id: msg.project_id,
        sender_agent_id: &msg.sender_agent_id,
        sender_agent_type: &msg.sender_agent_type,
        sender_session_id: msg.sender_session_id,
        to: msg.recipient_agent_id.as_deref(),
        message_type: &msg.message_type,
        content: &msg.content,
        metadata: &msg.metadata,
        priority: msg.priority,
        correlation_id: msg.correlation_id.as_deref(),
        reply_to: msg.reply_to,
        created_at: msg.created_at,
        expires_at: msg.expires_at,
        to_type: msg.recipient_agent_type.as_deref(),
        expects_reply: msg.expects_reply,
        reply_deadline: msg.reply_deadline,
        in_reply_to_seq: msg.in_reply_to_seq,
        success: msg.success,
        error: msg.error.as_deref(),
        duration_ms: msg.duration_ms,
        late: msg.late,
        task: msg.task,
    })
}

/// Frames the broker sends that are not messages.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame of every connection.
    Welcome {
        session_id: Uuid,
        project_id: Uuid,
        agent_id: &'a str,
        agent_type: &'a str,
        /// Seq of the newest message committed in the project when the session joined:
        /// everything after it is delivered live.
        head_seq: i64,
        ack: AckMode,
        /// The agent's ack floor when it connected.
        ack_floor: i64,
        /// How many owed messages are replayed before live delivery starts.
        replay: i64,
        /// The same, per priority: `[critical, high, normal, low]`.
        replay_by_priority: [i64; 4],
    },
    /// First frame of an observer's connection (no `agent_id`): it receives every message of
    /// the project, after `since` when given, else from `head_seq` on.
    #[serde(rename = "welcome")]
    ObserverWelcome {
        observer: bool,
        session_id: Uuid,
        project_id: Uuid,
        head_seq: i64,
        /// How many messages are replayed (`since` given) before live delivery starts.
        replay: i64,
    },
    /// To the sender, after the message's batch committed.
    Sent {
        id: Uuid,
        seq: i64,
        client_msg_id: Option<&'a str>,
        created_at: DateTime<Utc>,
    },
    /// A frame was refused; the connection stays open unless a close frame follows.
    Error {
        code: ErrorCode,
        error: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        field: Option<&'a str>,
        client_msg_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// The `ack_ignored` warning: an `error` frame that lists the seqs left out.
    #[serde(rename = "error")]
    AckIgnored {
        code: ErrorCode,
        error: &'a str,
        client_msg_id: Option<&'a str>,
        seqs: &'a [i64],
    },
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> ByteString {
        to_frame(self)
    }
}

pub fn receipt_frame(msg: &StoredMessage) -> ByteString {
    ServerFrame::Sent {
        id: msg.id,
        seq: msg.seq,
        client_msg_id: msg.client_msg_id.as_deref(),
        created_at: msg.created_at,
    }
    .encode()
}

pub fn error_frame(rejection: &Rejection, client_msg_id: Option<&str>) -> ByteString {
    ServerFrame::Error {
        code: rejection.code,
        error: &rejection.message,
        field: rejection.field,
        client_msg_id,
        retry_after_ms: rejection.retry_after_ms,
    }
    .encode()
}

/// The warning that an ack named seqs this connection was not waiting for: nothing was
/// recorded for them.
pub fn ack_ignored_frame(seqs: &[i64]) -> ByteString {
    ServerFrame::AckIgnored {
        code: ErrorCode::AckIgnored,
        error: "not acknowledged: these seqs are not awaiting an acknowledgement on this \
                connection (never delivered on it, or already acknowledged)",
        client_msg_id: None,
        seqs,
    }
    .encode()
}

fn to_frame<T: Serialize>(value: &T) -> ByteString {
    // Serialising these types cannot fail: every map key is a string and no Serialize impl
    // of ours returns an error.
    let text = serde_json::to_string(value).unwrap_or_else(|e| {
        log::error!("serialising a frame failed: {e}");
        String::from(r#"{"op":"error","code":"internal","error":"serialisation failed"}"#)
    });
    ByteString::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_shaped_frame_is_a_send() {
        let op = parse_client_frame(
            r#"{"agent_type":"coder","type":"status","content":"hi","metadata":{"a":1}}"#,
        )
        .expect("valid frame");
        let ClientOp::Send(fields) = op else {
            panic!("a send")
        };
        let send = validate_send(fields, &SendLimits::content(1024)).expect("valid send");
        assert_eq!(send.client_msg_id, None);
        assert_eq!(send.message_type, "status");
        assert_eq!(send.agent_type.as_deref(), Some("coder"));
        assert_eq!(send.priority, DEFAULT_PRIORITY);
        assert_eq!(send.metadata, serde_json::json!({"a": 1}));
    }

    #[test]
    fn bad_frames_are_told_apart() {
        let (r, _) = parse_client_frame("{not json").unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidJson);
        let (r, id) = parse_client_frame(r#"{"content":5,"client_msg_id":"c1"}"#).unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidFrame);
        assert_eq!(id.as_deref(), Some("c1"));
        let (r, _) = parse_client_frame("[1,2]").unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidFrame);
        let (r, _) = parse_client_frame(r#"{"op":"fly"}"#).unwrap_err();
        assert_eq!(r.code, ErrorCode::UnknownOp);
    }

    #[test]
    fn acks_and_reads_are_parsed() {
        match parse_client_frame(r#"{"op":"ack","seqs":[3,1],"up_to":7}"#) {
            Ok(ClientOp::Ack { seqs, up_to }) => assert_eq!((seqs, up_to), (vec![3, 1], Some(7))),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_client_frame(r#"{"op":"ack"}"#).unwrap_err().0.code,
            ErrorCode::MissingField
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"ack","seqs":[0]}"#)
                .unwrap_err()
                .0
                .code,
            ErrorCode::InvalidField
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"read","ids":["x"]}"#)
                .unwrap_err()
                .0
                .code,
            ErrorCode::InvalidField
        );
        let id = Uuid::new_v4();
        match parse_client_frame(&format!(r#"{{"op":"read","ids":["{id}"]}}"#)) {
            Ok(ClientOp::Read { ids }) => assert_eq!(ids, vec![id]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nul_characters_are_refused_before_they_reach_the_database() {
        let check = |json: &str| {
            let Ok(ClientOp::Send(fields)) = parse_client_frame(json) else {
                panic!("parses")
            };
            validate_send(fields, &SendLimits::content(100))
                .unwrap_err()
                .0
        };
        assert_eq!(check(r#"{"content":"a\u0000b"}"#).field, Some("content"));
        assert_eq!(
            check(r#"{"content":"x","metadata":{"k":["\u0000"]}}"#).field,
            Some("metadata")
        );
        assert_eq!(
            check(r#"{"content":"x","metadata":{"\u0000":1}}"#).field,
            Some("metadata")
        );
    }

    #[test]
    fn validation_names_the_field() {
        let check = |json: &str| {
            let Ok(ClientOp::Send(fields)) = parse_client_frame(json) else {
                panic!("parses")
            };
            validate_send(fields, &SendLimits::content(10))
                .unwrap_err()
                .0
        };
        assert_eq!(check(r#"{"type":"status"}"#).code, ErrorCode::MissingField);
        assert_eq!(check(r#"{"content":""}"#).field, Some("content"));
        assert_eq!(check(r#"{"content":"01234567890"}"#).field, Some("content"));
        assert_eq!(
            check(r#"{"content":"x","priority":7}"#).field,
            Some("priority")
        );
        assert_eq!(
            check(r#"{"content":"x","metadata":[1]}"#).field,
            Some("metadata")
        );
        assert_eq!(check(r#"{"content":"x","type":"a b"}"#).field, Some("type"));
        assert_eq!(
            check(r#"{"content":"x","reply_to":"nope"}"#).field,
            Some("reply_to")
        );
        let long = format!(r#"{{"content":"x","client_msg_id":"{}"}}"#, "c".repeat(65));
        assert_eq!(check(&long).field, Some("client_msg_id"));
        assert_eq!(
            check(r#"{"content":"x","to":"a\u0000b"}"#).field,
            Some("to")
        );
    }

    #[test]
    fn the_listening_line_round_trips_and_nothing_else_parses_as_it() {
        let line = serde_json::to_string(&Listening::new("127.0.0.1:0", 40123)).expect("JSON");
        assert_eq!(
            line,
            r#"{"event":"listening","bind":"127.0.0.1:0","port":40123}"#
        );
        assert_eq!(Listening::parse(&line).map(|l| l.port), Some(40123));
        assert_eq!(
            Listening::parse(r#"{"event":"stopped","bind":"x","port":1}"#),
            None
        );
        assert_eq!(
            Listening::parse("agentbus listening on 127.0.0.1:0 (port 1)"),
            None
        );
    }

    #[test]
    fn an_ack_request_needs_something_within_bounds() {
        assert!(AckRequest::new(None, None).is_err());
        assert!(AckRequest::new(Some(vec![]), None).is_err());
        assert!(AckRequest::new(Some(vec![0]), None).is_err());
        assert!(AckRequest::new(None, Some(0)).is_err());
        assert!(AckRequest::new(Some(vec![1; MAX_ACK_SEQS + 1]), None).is_err());
        assert_eq!(
            AckRequest::new(Some(vec![2]), Some(5)),
            Ok(AckRequest {
                seqs: vec![2],
                up_to: Some(5)
            })
        );
    }

    #[test]
    fn error_codes_are_written_as_serde_writes_them() {
        use strum::IntoEnumIterator;
        for code in ErrorCode::iter() {
            assert_eq!(
                serde_json::to_value(code).expect("JSON"),
                serde_json::json!(code.as_str())
            );
        }
        assert_eq!(ErrorCode::AckIgnored.as_str(), "ack_ignored");
    }
}
