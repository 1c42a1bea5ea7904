//! `/api/projects/{id}/messages`: history, and publishing over REST through the same path as
//! WebSocket sends.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{projects, ApiError, AppState};
use crate::actors::persistence::{Persist, Reply, Settlement};
use crate::db::queries::{self, HistoryQuery};
use crate::models::NewMessage;
use crate::protocol::{self, SendFields};

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
}

pub async fn history(
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<HistoryParams>,
) -> Result<HttpResponse, ApiError> {
    let params = params.into_inner();
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
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
    };
    let mut conn = state.pool.get().await?;
    let messages = queries::history(&mut conn, project.id, &query).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "messages": messages,
        "head_seq": project.head_seq,
    })))
}

/// A send over REST: the fields of a WebSocket send frame, plus who is sending.
#[derive(Deserialize)]
pub struct PublishBody {
    sender_agent_id: Option<String>,
    sender_agent_type: Option<String>,
    #[serde(flatten)]
    send: SendFields,
}

pub async fn publish(
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<PublishBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let sender_agent_id = body
        .sender_agent_id
        .ok_or_else(|| ApiError::bad_request("missing_field", "`sender_agent_id` is required"))?;
    protocol::check_agent_id("sender_agent_id", &sender_agent_id)?;
    let sender_agent_type = body
        .sender_agent_type
        .ok_or_else(|| ApiError::bad_request("missing_field", "`sender_agent_type` is required"))?;
    protocol::check_identifier(
        "sender_agent_type",
        &sender_agent_type,
        protocol::MAX_TYPE_CHARS,
    )?;
    let send = protocol::validate_send(body.send, state.settings.max_content_bytes)
        .map_err(|(rejection, _)| rejection)?;
    let project = projects::load(&state, &path).await?;

    let message = NewMessage {
        id: Uuid::new_v4(),
        project_id: project.id,
        sender_agent_id,
        sender_agent_type: send.agent_type.unwrap_or(sender_agent_type),
        sender_session_id: None,
        recipient_agent_id: send.to,
        message_type: send.message_type,
        content: send.content,
        metadata: send.metadata,
        priority: send.priority,
        correlation_id: send.correlation_id,
        reply_to: send.reply_to,
        client_msg_id: send.client_msg_id,
        ttl_ms: send.ttl_ms,
    };
    let (tx, rx) = oneshot::channel();
    state.persistence.do_send(Persist {
        message,
        reply: Reply::Http(tx),
    });
    // The persistence actor settles every send; the bound only guards against a broker bug.
    let wait = state.settings.db_timeout() * 3 + Duration::from_secs(1);
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(Settlement::Stored(stored))) => Ok(HttpResponse::Created().json(stored)),
        Ok(Ok(Settlement::Failed { rejection, .. })) => Err(rejection.into()),
        Ok(Err(_)) => Err(ApiError::Internal(
            "the persistence actor dropped the send".into(),
        )),
        Err(_) => Err(ApiError::Unavailable(
            "no commit within the time limit".into(),
        )),
    }
}
