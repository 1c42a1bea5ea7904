//! `/api/projects/{id}/messages`: history, and publishing over REST through the same path as
//! WebSocket sends.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{granted, projects, ApiError, AppState};
use crate::actors::channel::{AwaitReply, ForgetReply};
use crate::actors::deadlines::BROKER_AGENT_ID;
use crate::actors::persistence::Persist;
use crate::actors::settle::{no_recipient_text, Reply, Settlement};
use crate::auth::Access;
use crate::db::cursors::{self, Progress};
use crate::db::inbox::Interface;
use crate::db::queries::{self, HistoryQuery};
use crate::models::{NewMessage, StoredMessage};
use crate::protocol::{self, SendFields};

/// The `limit` of a paged request: the default when absent, a 400 when out of range.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    limit_within(limit, DEFAULT_PAGE, MAX_PAGE)
}

/// A `limit` query parameter: `default` when absent, a 400 `invalid_query` outside
/// 1..=`max`.
pub fn limit_within(limit: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`limit` must be between 1 and {max}"),
        ));
    }
    Ok(limit)
}

/// Page size when the request names none.
pub const DEFAULT_PAGE: i64 = 50;
/// Largest page a request may ask for.
pub const MAX_PAGE: i64 = 1000;

#[derive(Deserialize)]
pub struct HistoryParams {
    after_seq: Option<i64>,
    before_seq: Option<i64>,
    limit: Option<i64>,
    #[serde(rename = "type")]
    message_type: Option<String>,
    sender: Option<String>,
    correlation_id: Option<String>,
    /// A request and all its replies.
    thread: Option<String>,
    /// Free-text search over content.
    q: Option<String>,
}

pub async fn history(
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<HistoryParams>,
) -> Result<HttpResponse, ApiError> {
    let params = params.into_inner();
    let limit = page_limit(params.limit)?;
    if params.after_seq.is_some_and(|s| s < 0) || params.before_seq.is_some_and(|s| s < 0) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`after_seq` and `before_seq` must not be negative",
        ));
    }
    let project = projects::load(&state, &path).await?;
    let query = HistoryQuery {
        after_seq: params.after_seq,
        before_seq: params.before_seq,
        limit,
        message_type: params.message_type,
        sender: params.sender,
        correlation_id: params.correlation_id,
        thread: params
            .thread
            .map(|t| {
                Uuid::parse_str(&t).map_err(|_| {
                    ApiError::bad_request("invalid_query", "`thread` must be a message id (UUID)")
                })
            })
            .transpose()?,
        q: params.q.filter(|q| !q.trim().is_empty()),
    };
    let _turn = state.heavy_reads.turn().await?;
    let mut conn = state.pool.get().await?;
    let page =
        queries::history(&mut conn, project.id, &query, state.settings.max_page_bytes).await?;
    drop(conn);
    // Where the next page starts: forward after the last message when reading forward,
    // back before the first otherwise.
    let next = match (page.has_more, query.after_seq.is_some()) {
        (false, _) => None,
        (true, true) => page
            .messages
            .last()
            .map(|m| serde_json::json!({ "after_seq": m.seq })),
        (true, false) => page
            .messages
            .first()
            .map(|m| serde_json::json!({ "before_seq": m.seq })),
    };
    // Serialised from the messages themselves, not from a copy of them as a JSON value.
    super::guards::large_json(HistoryAnswer {
        messages: page.messages,
        head_seq: project.head_seq,
        has_more: page.has_more,
        truncated: page.truncated,
        next,
    })
    .await
}

/// A page of history, as answered.
#[derive(serde::Serialize)]
struct HistoryAnswer {
    messages: Vec<StoredMessage>,
    head_seq: i64,
    has_more: bool,
    truncated: bool,
    next: Option<serde_json::Value>,
}

/// A send over REST: the fields of a WebSocket send frame, plus who is sending, and nothing
/// else. A field the route does not take (a WebSocket frame's `op`, `seqs`, `up_to`, `ids`,
/// a misspelt name) is refused with 400 `invalid_json` naming it, rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    sender_agent_id: Option<String>,
    sender_agent_type: Option<String>,
    /// The sender's type for this message, as in a WebSocket send (overrides
    /// `sender_agent_type`).
    agent_type: Option<String>,
    #[serde(rename = "type")]
    message_type: Option<String>,
    content: Option<String>,
    metadata: Option<serde_json::Value>,
    to: Option<String>,
    to_type: Option<String>,
    priority: Option<i64>,
    ttl_ms: Option<i64>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    client_msg_id: Option<String>,
    expects_reply: Option<bool>,
    timeout_ms: Option<i64>,
    success: Option<bool>,
    error: Option<String>,
    /// A task (docs/PROTOCOL.md, "Tasks"), with its deadlines.
    task: Option<bool>,
    claim_timeout_ms: Option<i64>,
    work_timeout_ms: Option<i64>,
}

impl PublishBody {
    /// The send fields, as a WebSocket send frame would carry them, for the one validation
    /// both paths share.
    fn send_fields(&mut self) -> SendFields {
        SendFields {
            agent_type: self.agent_type.take(),
            message_type: self.message_type.take(),
            content: self.content.take(),
            metadata: self.metadata.take(),
            to: self.to.take(),
            to_type: self.to_type.take(),
            priority: self.priority.take(),
            ttl_ms: self.ttl_ms.take(),
            correlation_id: self.correlation_id.take(),
            reply_to: self.reply_to.take(),
            client_msg_id: self.client_msg_id.take(),
            expects_reply: self.expects_reply.take(),
            timeout_ms: self.timeout_ms.take(),
            success: self.success.take(),
            error: self.error.take(),
            task: self.task.take(),
            claim_timeout_ms: self.claim_timeout_ms.take(),
            work_timeout_ms: self.work_timeout_ms.take(),
            ..SendFields::default()
        }
    }
}

pub async fn publish(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<PublishBody>,
) -> Result<HttpResponse, ApiError> {
    let project = projects::load(&state, &path).await?;
    let access = granted(&req)?;
    let message = body
        .into_inner()
        .into_message(&state, project.id, &access)?;
    joined_sender(&state, &access, &message, Interface::Rest).await?;
    let (stored, _) = store(&state, message).await?;
    Ok(HttpResponse::Created().json(stored))
}

impl PublishBody {
    /// The message this body asks to send, validated like a WebSocket send.
    /// A token bound to an agent sends as that agent only.
    fn into_message(
        mut self,
        state: &AppState,
        project_id: Uuid,
        access: &Access,
    ) -> Result<NewMessage, ApiError> {
        let send = self.send_fields();
        let sender_agent_id =
            super::access::acting_agent(access, "sender_agent_id", self.sender_agent_id)?
                .ok_or_else(|| {
                    ApiError::bad_request("missing_field", "`sender_agent_id` is required")
                })?;
        let sender_agent_type = self.sender_agent_type.ok_or_else(|| {
            ApiError::bad_request("missing_field", "`sender_agent_type` is required")
        })?;
        let sender_agent_type = super::parse_agent_type("sender_agent_type", sender_agent_type)?;
        new_message(
            state,
            project_id,
            sender_agent_id.into_string(),
            sender_agent_type.into_string(),
            send,
        )
    }
}

/// A send by an agent whose identity was checked, validated like a WebSocket send.
pub(super) fn new_message(
    state: &AppState,
    project_id: Uuid,
    sender_agent_id: String,
    sender_agent_type: String,
    send: SendFields,
) -> Result<NewMessage, ApiError> {
    let send = protocol::validate_send(send, &state.settings.send_limits())
        .map_err(|(rejection, _)| rejection)?;
    Ok(send.into_message(project_id, sender_agent_id, sender_agent_type, None))
}

/// A send over HTTP makes its sender a member (joined at the head) and counts as its presence.
pub(super) async fn joined_sender(
    state: &AppState,
    access: &Access,
    message: &NewMessage,
    interface: crate::db::inbox::Interface,
) -> Result<(), ApiError> {
    super::agents::call_as(
        state,
        access,
        message.project_id,
        &super::agents::CallAs::implicit(
            &message.sender_agent_id,
            &message.sender_agent_type,
            interface,
        ),
    )
    .await
    .map(drop)
}

/// Sends a message through the persistence actor (the same path as WebSocket sends) and
/// waits for its commit. Returns the stored message and whether nobody can receive it.
pub async fn store(
    state: &AppState,
    message: NewMessage,
) -> Result<(StoredMessage, bool), ApiError> {
    if let Err(wait) = state.project_limits.check(message.project_id) {
        state.stats.metrics().rate_limited();
        return Err(ApiError::RateLimited(wait.as_millis().max(1) as u64));
    }
    let (tx, rx) = oneshot::channel();
    state
        .persistence
        .do_send(Persist::new(message, Reply::Http(tx)));
    // The persistence actor settles every send; the bound only guards against a broker bug.
    let wait = state.settings.db_timeout() * 3 + Duration::from_secs(1);
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(Settlement::Stored {
            message,
            no_recipient,
        })) => Ok((message, no_recipient)),
        Ok(Ok(Settlement::Failed { rejection, .. })) => Err(rejection.into()),
        Ok(Err(_)) => Err(ApiError::Internal("the persistence actor dropped the send".into())),
        Err(_) => Err(ApiError::Unavailable(
            "no commit within the time limit; the message may still be stored: retry with the same client_msg_id".into(),
        )),
    }
}

/// How a request sent over HTTP ended. Built once per request and consumed at once.
#[allow(clippy::large_enum_variant)]
pub(super) enum Asked {
    /// The first reply, or the broker's timeout response (`timed_out`).
    Answered {
        request: StoredMessage,
        response: StoredMessage,
        timed_out: bool,
    },
    /// Nobody can receive the request: it was stored and dead-lettered.
    NoRecipient(StoredMessage),
}

/// Sends a request (validated with `expects_reply`; its sender already joined) and waits for its first reply or its timeout
/// response. The one handed back counts as delivered and acknowledged for the requester.
/// Shared by `POST …/requests` and MCP's `ask`.
pub(super) async fn ask(
    state: &AppState,
    head_seq: i64,
    message: NewMessage,
) -> Result<Asked, ApiError> {
    let project_id = message.project_id;
    let timeout_ms = message
        .reply_timeout_ms
        .unwrap_or(protocol::DEFAULT_REPLY_TIMEOUT_MS);
    // Held until this handler ends: answered, or dropped because its client disconnected
    // (the server drops a request's handler when its connection closes).
    let _place = state.waiters.acquire(project_id)?;
    // Wait for the reply before the request exists, so it cannot be missed.
    let (tx, rx) = oneshot::channel();
    let channel = state.registry.get_or_start(project_id, head_seq);
    channel
        .send(AwaitReply {
            request_id: message.id,
            tx,
        })
        .await
        .map_err(|e| ApiError::Internal(format!("the project channel did not answer: {e}")))?;
    let _forget = ForgetOnDrop {
        channel,
        request_id: message.id,
    };
    let (request, no_recipient) = store(state, message).await?;
    if no_recipient {
        return Ok(Asked::NoRecipient(request));
    }
    // The broker's own timeout response arrives at the deadline; the margin covers a slow
    // commit of it.
    let wait = Duration::from_millis(timeout_ms as u64) + state.settings.db_timeout() * 2;
    let response = tokio::time::timeout(wait, rx)
        .await
        .map_err(|_| {
            ApiError::Unavailable("no reply and no timeout response were committed in time".into())
        })?
        .map_err(|_| ApiError::Internal("the project channel dropped the wait".into()))?;
    // The reply is handed over in this response: it is delivered to the requester, and no
    // longer owed to it.
    let mut conn = state.pool.get().await?;
    let progress = Progress {
        done: vec![response.seq],
        up_to: None,
    };
    cursors::apply_progress(&mut conn, project_id, &request.sender_agent_id, &progress).await?;
    let timed_out =
        response.sender_agent_id == BROKER_AGENT_ID && response.error.as_deref() == Some("timeout");
    Ok(Asked::Answered {
        request,
        response,
        timed_out,
    })
}

/// `POST /api/projects/{id}/requests`: sends a request and waits for its reply (the HTTP
/// form of sendAndWait). 200 with the reply; 504 with the broker's timeout response when
/// none came in time; 422 when nobody can receive the request.
pub async fn send_and_wait(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<PublishBody>,
) -> Result<HttpResponse, ApiError> {
    let project = projects::load(&state, &path).await?;
    let mut body = body.into_inner();
    body.expects_reply = Some(true);
    let access = granted(&req)?;
    let message = body.into_message(&state, project.id, &access)?;
    joined_sender(&state, &access, &message, Interface::Rest).await?;
    Ok(match ask(&state, project.head_seq, message).await? {
        Asked::NoRecipient(request) => {
            HttpResponse::UnprocessableEntity().json(serde_json::json!({
                "error": no_recipient_text(&request),
                "code": "no_recipient",
                "request": request,
            }))
        }
        Asked::Answered {
            request,
            response,
            timed_out,
        } => {
            let body = serde_json::json!({ "request": request, "response": response });
            if timed_out {
                HttpResponse::GatewayTimeout().json(body)
            } else {
                HttpResponse::Ok().json(body)
            }
        }
    })
}

/// Drops the channel's waiter for a request when its REST caller is gone. (When the reply
/// came, the channel already dropped it; forgetting it again is harmless.)
struct ForgetOnDrop {
    channel: actix::Addr<crate::actors::channel::ChannelActor>,
    request_id: Uuid,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.channel.do_send(ForgetReply {
            request_id: self.request_id,
        });
    }
}

/// One message with its delivery state: who still owes it, and its dead-letter record.
pub async fn show(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (project_raw, message_raw) = path.into_inner();
    let project = projects::load(&state, &project_raw).await?;
    let message_id = super::parse_message_id(&message_raw)?;
    let mut conn = state.pool.get().await?;
    let message = queries::find_message(&mut conn, project.id, message_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no message {message_id} in this project")))?;
    let owed_to = queries::owed_to(&mut conn, &message).await?;
    let dead_letter = queries::dead_letter(&mut conn, message_id).await?;
    let replies = queries::reply_count(&mut conn, project.id, message_id).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "message": message,
        "owed_to": owed_to,
        "replies": replies,
        "dead_letter": dead_letter.map(|(reason, dead_at, retried_as)| serde_json::json!({
            "reason": reason, "dead_at": dead_at, "retried_as": retried_as,
        })),
    })))
}
