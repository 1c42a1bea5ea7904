//! `/api/projects/{id}/dead-letters`: messages that could not reach anyone, and retrying them.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use uuid::Uuid;

use super::messages::{page_limit, store};
use super::{projects, ApiError, AppState};
use crate::db::dead_letters;
use crate::models::NewMessage;

#[derive(Deserialize)]
pub struct ListParams {
    limit: Option<i64>,
}

/// Newest first.
pub async fn list(
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let limit = page_limit(params.limit)?;
    let project = projects::load(&state, &path).await?;
    let _turn = state.heavy_reads.turn().await?;
    let mut conn = state.pool.get().await?;
    let dead = dead_letters::list(&mut conn, project.id, limit).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "dead_letters": dead })))
}

/// Sends a dead letter again: a new message with the same sender, addressing, type, content
/// and priority (and the same time to live / reply timeout, counted afresh), whose metadata
/// names the original in `retry_of`.
pub async fn retry(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (project_raw, message_raw) = path.into_inner();
    let project = projects::load(&state, &project_raw).await?;
    let message_id = super::parse_message_id(&message_raw)?;
    let original = {
        let mut conn = state.pool.get().await?;
        let found = dead_letters::find(&mut conn, project.id, message_id).await?;
        match found {
            None => {
                return Err(ApiError::NotFound(format!(
                    "no dead letter {message_id} in this project"
                )))
            }
            Some((_, Some(retried_as))) => {
                return Err(ApiError::Conflict(format!(
                    "already retried as {retried_as}"
                )));
            }
            Some((message, None)) => message,
        }
    };
    let mut metadata = original.metadata.clone();
    if let Some(map) = metadata.as_object_mut() {
        map.insert("retry_of".into(), serde_json::json!(original.id));
    }
    // A task is retried as a task, with the same terms.
    let task = if original.task {
        let mut conn = state.pool.get().await?;
        crate::db::tasks::terms_of(&mut conn, original.id).await?
    } else {
        None
    };
    let retry = NewMessage {
        id: Uuid::new_v4(),
        project_id: project.id,
        sender_agent_id: original.sender_agent_id,
        sender_agent_type: original.sender_agent_type,
        sender_session_id: None,
        recipient_agent_id: original.recipient_agent_id,
        message_type: original.message_type,
        content: original.content,
        metadata,
        priority: original.priority,
        correlation_id: original.correlation_id,
        reply_to: original.reply_to,
        client_msg_id: None,
        ttl_ms: original
            .expires_at
            .map(|at| (at - original.created_at).num_milliseconds().max(1)),
        recipient_agent_type: original.recipient_agent_type,
        reply_timeout_ms: original
            .reply_deadline
            .filter(|_| original.expects_reply)
            .map(|at| (at - original.created_at).num_milliseconds().max(1)),
        success: original.success,
        error: original.error,
        reply: None,
        timeout_of: None,
        task,
    };
    let (stored, _) = store(&state, retry).await?;
    let mut conn = state.pool.get().await?;
    dead_letters::mark_retried(&mut conn, message_id, stored.id).await?;
    Ok(HttpResponse::Created().json(stored))
}
