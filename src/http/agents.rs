//! Members of a project and their queues, for agents that do not hold a socket and for the
//! console: `/api/projects/{id}/agents...` and read receipts over REST.

use std::collections::HashMap;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::messages::page_limit;
use super::socket::DEFAULT_AGENT_TYPE;
use super::{granted, projects, ApiError, AppState};
use crate::actors::channel::Presence;
use crate::actors::inbox::{self as inbox_actor, InboxError, InboxPage, InboxRead};
use crate::auth::Access;
use crate::db::cursors::{self, Progress};
use crate::db::inbox::{self, Interface, Joining, MemberState};
use crate::protocol::{self, AckRequest};

/// A token bound to an agent acts for that agent only.
fn speaks_as(req: &actix_web::HttpRequest, agent_id: &str) -> Result<(), ApiError> {
    bound_check(&granted(req)?, agent_id)
}

/// Refuses to act as `agent_id` with a token bound to another agent.
pub(super) fn bound_check(access: &Access, agent_id: &str) -> Result<(), ApiError> {
    Ok(access.speak_as(agent_id)?)
}

/// A call made as an agent over HTTP: who, and what it says about itself.
pub(super) struct CallAs<'a> {
    pub agent_id: &'a str,
    pub agent_type: &'a str,
    pub interface: Interface,
    pub explicit: bool,
    pub capabilities: Option<&'a [String]>,
    pub description: Option<&'a str>,
}

impl<'a> CallAs<'a> {
    /// A call that acts as the agent without asking to join (an inbox read, a send, an MCP
    /// tool call): it joins implicitly, with nothing to update but its presence.
    pub fn implicit(agent_id: &'a str, agent_type: &'a str, interface: Interface) -> Self {
        CallAs {
            agent_id,
            agent_type,
            interface,
            explicit: false,
            capabilities: None,
            description: None,
        }
    }
}

/// Validates the agent's identity as the WebSocket upgrade does, then makes it a member
/// (joined at the head) or refreshes it, recording the call as its presence.
pub(super) async fn call_as(
    state: &AppState,
    access: &Access,
    project_id: Uuid,
    call: &CallAs<'_>,
) -> Result<MemberState, ApiError> {
    protocol::check_agent_id("agent_id", call.agent_id)?;
    protocol::check_identifier("agent_type", call.agent_type, protocol::MAX_TYPE_CHARS)?;
    if let Some(capabilities) = call.capabilities {
        protocol::check_capabilities(capabilities)?;
    }
    if call
        .description
        .is_some_and(|d| d.chars().count() > protocol::MAX_DESCRIPTION_CHARS)
    {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!(
                "`description` is longer than {} characters",
                protocol::MAX_DESCRIPTION_CHARS
            ),
        ));
    }
    bound_check(access, call.agent_id)?;
    let mut conn = state.pool.get().await?;
    inbox::join(
        &mut conn,
        &Joining {
            project_id,
            agent_id: call.agent_id,
            agent_type: call.agent_type,
            interface: call.interface,
            explicit: call.explicit,
            capabilities: call.capabilities,
            description: call.description,
        },
    )
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no project {project_id}")))
}

#[derive(Serialize)]
pub(super) struct AgentView {
    pub agent_id: String,
    pub agent_type: String,
    /// Connected by WebSocket now, or called in over REST/MCP within the presence interval.
    pub online: bool,
    /// How it last called in: `websocket`, `rest`, `mcp` (none: never).
    pub interface: Option<String>,
    /// The connected session, when online.
    pub session_ids: Vec<Uuid>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub ack_floor: i64,
    /// How many messages the agent is owed.
    pub queue_depth: i64,
    pub capabilities: Vec<String>,
    pub description: Option<String>,
}

/// The members of a project as the listing shows them, with presence.
pub(super) async fn agent_views(
    state: &AppState,
    project_id: Uuid,
    capability: Option<&str>,
) -> Result<Vec<AgentView>, ApiError> {
    let online: HashMap<String, Uuid> = match state.registry.get(project_id) {
        Some(channel) => channel
            .send(Presence)
            .await
            .map_err(|e| ApiError::Internal(format!("the project channel did not answer: {e}")))?,
        None => HashMap::new(),
    };
    let mut conn = state.pool.get().await?;
    let members = cursors::list_members(&mut conn, project_id, capability).await?;
    let recent = Utc::now()
        - chrono::Duration::from_std(state.settings.presence_interval())
            .unwrap_or(chrono::Duration::MAX);
    Ok(members
        .into_iter()
        .map(|m| {
            let session = online.get(&m.agent_id).copied();
            AgentView {
                online: session.is_some() || m.last_called_at.is_some_and(|at| at >= recent),
                interface: m.interface,
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
        .collect())
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
    let agents = agent_views(&state, project.id, params.capability.as_deref()).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "agents": agents })))
}

#[derive(Deserialize)]
pub struct JoinBody {
    agent_id: Option<String>,
    agent_type: Option<String>,
    capabilities: Option<Vec<String>>,
    description: Option<String>,
}

/// `POST …/agents`: an agent joins without a socket (idempotent; updates its type,
/// capabilities and description). Broadcasts are owed to it from now on.
pub async fn join(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<JoinBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let access = granted(&req)?;
    let agent_id = super::access::acting_agent(&access, "agent_id", body.agent_id)?
        .ok_or_else(|| ApiError::bad_request("missing_field", "`agent_id` is required"))?
        .into_string();
    let agent_type = body
        .agent_type
        .ok_or_else(|| ApiError::bad_request("missing_field", "`agent_type` is required"))?;
    let project = projects::load(&state, &path).await?;
    call_as(
        &state,
        &access,
        project.id,
        &CallAs {
            agent_id: &agent_id,
            agent_type: &agent_type,
            interface: Interface::Rest,
            explicit: true,
            capabilities: body.capabilities.as_deref(),
            description: body.description.as_deref(),
        },
    )
    .await?;
    let agent = agent_views(&state, project.id, None)
        .await?
        .into_iter()
        .find(|a| a.agent_id == agent_id)
        .ok_or_else(|| ApiError::Internal("a joined member is not listed".into()))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "agent": agent })))
}

/// Longest an inbox read may wait for mail.
pub const MAX_WAIT_MS: u64 = 60_000;

#[derive(Deserialize)]
pub struct InboxParams {
    limit: Option<i64>,
    /// Wait up to this long for something to be owed (0: answer at once).
    wait_ms: Option<u64>,
    /// Acknowledge what is returned.
    ack: Option<bool>,
    /// Only priority 0–1.
    urgent_only: Option<bool>,
    /// The agent's type if this call makes it a member.
    agent_type: Option<String>,
    /// Continue after this message of the delivery order (the `next` of a page that stopped
    /// at the byte budget): both or neither.
    after_priority: Option<i16>,
    after_seq: Option<i64>,
}

/// Reads an inbox, waiting within the broker's bounds on waiting reads. Shared by the REST
/// inbox and MCP's `check_inbox`.
/// `head_seq`: a seq known to be committed in the project.
pub(super) async fn read_inbox(
    state: &AppState,
    head_seq: i64,
    read: InboxRead,
) -> Result<InboxPage, ApiError> {
    let _permit = if read.wait.is_zero() {
        None
    } else {
        Some(
            state
                .inbox_waits
                .acquire(read.project_id)
                .map_err(|scope| {
                    ApiError::TooManyConnections(format!(
                "too many inbox reads are waiting for this {scope}; retry later or without waiting"
            ))
                })?,
        )
    };
    // If the channel starts now, it learns every commit after this head.
    let channel = state.registry.get_or_start(read.project_id, head_seq);
    Ok(inbox_actor::read(&state.pool, &channel, &read).await?)
}

impl From<InboxError> for ApiError {
    fn from(e: InboxError) -> Self {
        match e {
            InboxError::NotAMember => ApiError::NotFound(e.to_string()),
            InboxError::Pool(e) => e.into(),
            InboxError::Database(e) => e.into(),
            InboxError::Channel(e) => {
                ApiError::Internal(format!("the project channel did not answer: {e}"))
            }
        }
    }
}

/// What an agent is owed, in delivery order (priority, then seq); optionally waited for and
/// acknowledged. The call makes the agent a member if it is not one.
pub async fn inbox(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    params: web::Query<InboxParams>,
) -> Result<HttpResponse, ApiError> {
    let (project_raw, agent_id) = path.into_inner();
    let params = params.into_inner();
    let limit = page_limit(params.limit)?;
    let resume = match (params.after_priority, params.after_seq) {
        (None, None) => None,
        (Some(priority), Some(seq)) => Some((priority, seq)),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "give both `after_priority` and `after_seq`, or neither",
            ))
        }
    };
    let wait_ms = params.wait_ms.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`wait_ms` must be between 0 and {MAX_WAIT_MS}"),
        ));
    }
    let project = projects::load(&state, &project_raw).await?;
    let agent_type = params.agent_type.as_deref().unwrap_or(DEFAULT_AGENT_TYPE);
    call_as(
        &state,
        &granted(&req)?,
        project.id,
        &CallAs::implicit(&agent_id, agent_type, Interface::Rest),
    )
    .await?;
    let page = read_inbox(
        &state,
        project.head_seq,
        InboxRead {
            project_id: project.id,
            agent_id: agent_id.clone(),
            limit,
            urgent_only: params.urgent_only.unwrap_or(false),
            ack: params.ack.unwrap_or(false),
            wait: Duration::from_millis(wait_ms),
            max_bytes: state.settings.max_page_bytes,
            resume,
        },
    )
    .await?;
    let has_more = page.truncated || (page.messages.len() as i64 >= limit && page.remaining > 0);
    // Acknowledged messages are no longer owed: the next page starts at the front again.
    let next = page
        .messages
        .last()
        .filter(|_| has_more && !params.ack.unwrap_or(false))
        .map(|m| serde_json::json!({ "after_priority": m.priority, "after_seq": m.seq }));
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "agent_id": agent_id,
        "ack_floor": page.ack_floor,
        "messages": page.messages,
        "remaining": page.remaining,
        "has_more": has_more,
        "truncated": page.truncated,
        "next": next,
    })))
}

#[derive(Deserialize)]
pub struct NotificationParams {
    limit: Option<i64>,
    /// Look without moving the watermark.
    peek: Option<bool>,
    /// The agent's type if this call makes it a member.
    agent_type: Option<String>,
}

/// What is new since the agent was last told: owed messages above its notification
/// watermark, which then moves to the highest seq returned (unless `peek`).
pub(super) async fn notify(
    state: &AppState,
    project_id: Uuid,
    agent_id: &str,
    limit: i64,
    peek: bool,
) -> Result<(inbox::OwedPage, i64), ApiError> {
    let mut conn = state.pool.get().await?;
    let member = inbox::member_state(&mut conn, project_id, agent_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{agent_id:?} is not a member")))?;
    let page = inbox::unnotified(&mut conn, project_id, agent_id, &member, limit).await?;
    let highest = page.messages.iter().map(|m| m.seq).max();
    let notified = match highest {
        Some(seq) if !peek => inbox::advance_notified(&mut conn, project_id, agent_id, seq).await?,
        _ => member.notified_seq,
    };
    Ok((page, notified))
}

pub async fn notifications(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    params: web::Query<NotificationParams>,
) -> Result<HttpResponse, ApiError> {
    let (project_raw, agent_id) = path.into_inner();
    let params = params.into_inner();
    let limit = page_limit(params.limit)?;
    let project = projects::load(&state, &project_raw).await?;
    call_as(
        &state,
        &granted(&req)?,
        project.id,
        &CallAs::implicit(
            &agent_id,
            params.agent_type.as_deref().unwrap_or(DEFAULT_AGENT_TYPE),
            Interface::Rest,
        ),
    )
    .await?;
    let (page, notified) = notify(
        &state,
        project.id,
        &agent_id,
        limit,
        params.peek.unwrap_or(false),
    )
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "agent_id": agent_id,
        "messages": page.messages,
        "notified_up_to": notified,
        "remaining": page.remaining,
    })))
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
    let AckRequest { seqs, up_to } = AckRequest::new(body.seqs, body.up_to)?;
    let project = projects::load(&state, &project_raw).await?;
    let mut conn = state.pool.get().await?;
    let progress = Progress { done: seqs, up_to };
    let applied = cursors::apply_progress(&mut conn, project.id, &agent_id, &progress)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "{agent_id:?} is not a member of project {}",
                project.id
            ))
        })?;
    // `ignored`: named seqs of no message owed to this agent (not stored yet, or not
    // addressed to it); nothing was recorded for them.
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "agent_id": agent_id,
        "ack_floor": applied.ack_floor,
        "ignored": applied.ignored,
    })))
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
    let agent_id = super::parse_agent_id("agent_id", agent_id)?.into_string();
    speaks_as(&req, &agent_id)?;
    let message_id = super::parse_message_id(&message_raw)?;
    let project = projects::load(&state, &project_raw).await?;
    let mut conn = state.pool.get().await?;
    let marked = cursors::mark_read(&mut conn, project.id, &agent_id, &[message_id]).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "marked": marked == 1 })))
}
