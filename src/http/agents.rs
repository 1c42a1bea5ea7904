//! Members of a project and their queues, for agents that do not hold a socket and for the
//! console: `/api/projects/{id}/agents...` and read receipts over REST.

use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::messages::page_limit;
use super::{granted, projects, ApiError, AppState};
use crate::actors::channel::Presence;
use crate::db::cursors::{self, OwedQuery, Progress};
use crate::db::paging;
use crate::protocol::{self, MAX_ACK_SEQS};

/// A token bound to an agent acts for that agent only.
fn speaks_as(req: &actix_web::HttpRequest, agent_id: &str) -> Result<(), ApiError> {
    match granted(req)?.bound_agent() {
        Some(bound) if bound != agent_id => Err(ApiError::Forbidden(format!(
            "this token speaks only as agent {bound:?}"
        ))),
        _ => Ok(()),
    }
}

#[derive(Serialize)]
struct AgentView {
    agent_id: String,
    agent_type: String,
    online: bool,
    /// The connected session, when online.
    session_ids: Vec<Uuid>,
    last_seen_at: Option<DateTime<Utc>>,
    ack_floor: i64,
    /// How many messages the agent is owed.
    queue_depth: i64,
    capabilities: Vec<String>,
    description: Option<String>,
}

#[derive(Deserialize)]
pub struct ListParams {
    /// Only agents that declared this capability.
    capability: Option<String>,
}

pub async fn list(
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let project = projects::load(&state, &path).await?;
    let online: HashMap<String, Uuid> = match state.registry.get(project.id) {
        Some(channel) => channel
            .send(Presence)
            .await
            .map_err(|e| ApiError::Internal(format!("the project channel did not answer: {e}")))?,
        None => HashMap::new(),
    };
    let mut conn = state.pool.get().await?;
    let members =
        cursors::list_members(&mut conn, project.id, params.capability.as_deref()).await?;
    let agents: Vec<AgentView> = members
        .into_iter()
        .map(|m| {
            let session = online.get(&m.agent_id).copied();
            AgentView {
                online: session.is_some(),
                session_ids: session.into_iter().collect(),
                agent_id: m.agent_id,
                agent_type: m.agent_type,
                last_seen_at: m.last_seen_at,
                ack_floor: m.ack_floor,
                queue_depth: m.queue_depth,
                capabilities: m.capabilities,
                description: m.description,
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "agents": agents })))
}

/// A page of an inbox, as answered.
#[derive(Serialize)]
struct InboxAnswer {
    agent_id: String,
    ack_floor: i64,
    messages: Vec<crate::models::StoredMessage>,
    has_more: bool,
    truncated: bool,
    next: Option<serde_json::Value>,
}

#[derive(Deserialize)]
pub struct InboxParams {
    limit: Option<i64>,
    /// Continue after this message of the delivery order (the `next` of a page that stopped
    /// at the byte budget): both or neither.
    after_priority: Option<i16>,
    after_seq: Option<i64>,
}

/// What an agent is owed, in delivery order (priority, then seq).
pub async fn inbox(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    params: web::Query<InboxParams>,
) -> Result<HttpResponse, ApiError> {
    let (project_raw, agent_id) = path.into_inner();
    speaks_as(&req, &agent_id)?;
    let limit = page_limit(params.limit)?;
    let resume = match (params.after_priority, params.after_seq) {
        (None, None) => (-1, 0),
        (Some(priority), Some(seq)) => (priority, seq),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "give both `after_priority` and `after_seq`, or neither",
            ))
        }
    };
    let project = projects::load(&state, &project_raw).await?;
    let _turn = state.heavy_reads.turn().await?;
    let mut conn = state.pool.get().await?;
    let member = cursors::find_member(&mut conn, project.id, &agent_id)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "{agent_id:?} is not a member of project {}",
                project.id
            ))
        })?;
    let query = OwedQuery {
        project_id: project.id,
        agent_id: agent_id.clone(),
        agent_type: member.agent_type.clone(),
        after: member.ack_floor,
        upto: i64::MAX,
        broadcasts_after: member.broadcasts_after(),
        acked: member.acked_above.clone(),
        by_priority: true,
        resume,
        // One more than the page, to know whether there is more.
        limit: limit + 1,
    };
    let (mut messages, truncated) =
        paging::owed_page_within(&mut conn, &query, state.settings.max_page_bytes).await?;
    drop(conn);
    let beyond_limit = messages.len() as i64 > limit;
    messages.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let has_more = truncated || beyond_limit;
    // Stopped at the budget before `limit` messages (not merely before the one beyond).
    let truncated = truncated && (messages.len() as i64) < limit;
    let next = messages
        .last()
        .filter(|_| has_more)
        .map(|m| serde_json::json!({ "after_priority": m.priority, "after_seq": m.seq }));
    // Serialised from the messages themselves, not from a copy of them as a JSON value.
    super::guards::large_json(InboxAnswer {
        agent_id,
        ack_floor: member.ack_floor,
        messages,
        has_more,
        truncated,
        next,
    })
    .await
}

#[derive(Deserialize)]
pub struct AckBody {
    seqs: Option<Vec<i64>>,
    up_to: Option<i64>,
}

/// Acknowledges messages of an agent's inbox, with the same rules as the `ack` frame.
pub async fn ack(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Json<AckBody>,
) -> Result<HttpResponse, ApiError> {
    let (project_raw, agent_id) = path.into_inner();
    speaks_as(&req, &agent_id)?;
    let body = body.into_inner();
    let seqs = body.seqs.unwrap_or_default();
    if seqs.is_empty() && body.up_to.is_none() {
        return Err(ApiError::bad_request(
            "missing_field",
            "give `seqs` and/or `up_to`",
        ));
    }
    if seqs.len() > MAX_ACK_SEQS || seqs.iter().chain(body.up_to.iter()).any(|&s| s < 1) {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("`seqs` must be 1 to {MAX_ACK_SEQS} seqs, each at least 1"),
        ));
    }
    let project = projects::load(&state, &project_raw).await?;
    let mut conn = state.pool.get().await?;
    let progress = Progress {
        done: seqs,
        up_to: body.up_to,
    };
    let floor = cursors::apply_progress(&mut conn, project.id, &agent_id, &progress)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "{agent_id:?} is not a member of project {}",
                project.id
            ))
        })?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "agent_id": agent_id, "ack_floor": floor })))
}

#[derive(Deserialize)]
pub struct ReadBody {
    agent_id: Option<String>,
}

/// A read receipt over REST: `agent_id` read this message.
pub async fn read(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Json<ReadBody>,
) -> Result<HttpResponse, ApiError> {
    let (project_raw, message_raw) = path.into_inner();
    let agent_id = body.into_inner().agent_id.ok_or_else(|| {
        ApiError::bad_request("missing_field", "`agent_id` (the reader) is required")
    })?;
    protocol::check_agent_id("agent_id", &agent_id)?;
    speaks_as(&req, &agent_id)?;
    let message_id = super::parse_message_id(&message_raw)?;
    let project = projects::load(&state, &project_raw).await?;
    let mut conn = state.pool.get().await?;
    let marked = cursors::mark_read(&mut conn, project.id, &agent_id, &[message_id]).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "marked": marked == 1 })))
}
