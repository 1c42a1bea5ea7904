//! `/api/projects/{id}/claims`: file claims over REST (docs/PROTOCOL.md, "File claims"). A
//! claim with an objection window answers when the window closes, like sendAndWait.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use uuid::Uuid;

use super::agents::{call_as, CallAs};
use super::socket::DEFAULT_AGENT_TYPE;
use super::{granted, projects, ApiError, AppState};
use crate::actors::coordination::Caller;
use crate::db::claims::{ListFilter, Releaser};
use crate::db::inbox::Interface;
use crate::domain::claims::ClaimState;
use crate::models::Project;
use crate::protocol::coordination::{Answer, Refused};

/// Entries of a list of claims or tasks when the request names no `limit`, and the most.
pub const DEFAULT_LIST: i64 = 100;
pub const MAX_LIST: i64 = 1000;

/// The agent a call acts as: the body's (or the bound token's), validated, joined to the
/// project as a member (like any REST call as an agent) and counted as its presence.
pub(super) async fn acting_agent(
    state: &AppState,
    req: &HttpRequest,
    project_id: Uuid,
    agent_id: Option<String>,
    agent_type: Option<&str>,
) -> Result<String, ApiError> {
    let access = granted(req)?;
    let agent = super::access::acting_agent(&access, "agent_id", agent_id)?
        .ok_or_else(|| ApiError::bad_request("missing_field", "`agent_id` is required"))?
        .into_string();
    let agent_type = agent_type.unwrap_or(DEFAULT_AGENT_TYPE);
    call_as(
        state,
        &access,
        project_id,
        &CallAs::implicit(&agent, agent_type, Interface::Rest),
    )
    .await?;
    Ok(agent)
}

/// The HTTP status of a refusal.
fn status_of(why: Refused) -> StatusCode {
    match why {
        Refused::NotFound => StatusCode::NOT_FOUND,
        Refused::Forbidden => StatusCode::FORBIDDEN,
        Refused::Conflict
        | Refused::Objected
        | Refused::ClaimDecided
        | Refused::NotHeld
        | Refused::AlreadyClaimed
        | Refused::NotHolder
        | Refused::TaskClosed => StatusCode::CONFLICT,
    }
}

/// An answer as a response: `ok` with its body, or a refusal's status with
/// `{"error", "code"}` and the claim or task it is about.
pub(super) fn respond(answer: Answer, ok: StatusCode) -> HttpResponse {
    let mut body = serde_json::json!({ "seq": answer.seq });
    if let Some(claim) = &answer.claim {
        body["claim"] = serde_json::json!(claim);
        body["conflicts"] = serde_json::json!(answer.conflicts);
        body["objections"] = serde_json::json!(answer.objections);
        body["merged"] = serde_json::json!(answer.merged);
    }
    if let Some(task) = &answer.task {
        body["task"] = serde_json::json!(task);
    }
    match answer.refused {
        None => HttpResponse::build(ok).json(body),
        Some((why, text)) => {
            body["error"] = serde_json::json!(text);
            body["code"] = serde_json::json!(why.as_str());
            HttpResponse::build(status_of(why)).json(body)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    agent_id: Option<String>,
    agent_type: Option<String>,
    paths: Option<Vec<String>>,
    shared: Option<bool>,
    ttl_ms: Option<i64>,
    objection_ms: Option<i64>,
    reason: Option<String>,
}

/// `POST …/claims`: 201 granted (at once, or when the objection window closed), 409
/// `conflict` or `objected`.
pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<ClaimBody>,
) -> Result<HttpResponse, ApiError> {
    let project = projects::load(&state, &path).await?;
    let body = body.into_inner();
    let paths = body.paths.ok_or_else(|| {
        ApiError::bad_request(
            "missing_field",
            "`paths` is required: a list of paths or globs, e.g. [\"src/api/**\"]",
        )
    })?;
    let coordination = &state.coordination;
    let spec = coordination.spec(
        &paths,
        body.shared.unwrap_or(false),
        body.ttl_ms,
        body.objection_ms,
        body.reason,
    )?;
    let agent = acting_agent(
        &state,
        &req,
        project.id,
        body.agent_id,
        body.agent_type.as_deref(),
    )
    .await?;
    // A claim that waits for its window holds a place among the waiting requests.
    let _place = match spec.objection_ms {
        Some(_) => Some(state.waiters.acquire(project.id)?),
        None => None,
    };
    let caller = Caller {
        project_id: project.id,
        agent_id: &agent,
    };
    let answer = coordination.claim(caller, &spec).await?;
    let answer = coordination.decided(answer).await?;
    Ok(respond(answer, StatusCode::CREATED))
}

#[derive(Deserialize)]
pub struct ListParams {
    state: Option<String>,
    agent_id: Option<String>,
    limit: Option<i64>,
}

/// `GET …/claims`: the claims held now (pending or granted), or with `state=` others.
pub async fn list(
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let project = projects::load(&state, &path).await?;
    let params = params.into_inner();
    let limit = super::messages::limit_within(params.limit, DEFAULT_LIST, MAX_LIST)?;
    let (active_only, wanted) = match params.state.as_deref() {
        None | Some("active") => (true, None),
        Some("all") => (false, None),
        Some(raw) => match ClaimState::parse(raw) {
            Some(s) => (false, Some(s)),
            None => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "`state` must be active, all, pending, granted, refused, objected, \
                         released or expired, not {raw:?}"
                    ),
                ))
            }
        },
    };
    let filter = ListFilter {
        active_only,
        state: wanted,
        agent_id: params.agent_id.as_deref(),
        limit,
    };
    let claims = state.coordination.list_claims(project.id, &filter).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "claims": claims })))
}

/// The project and the claim id of a `…/claims/{claim_id}` path: the project must exist and
/// the id be a UUID.
async fn claim_path(
    state: &AppState,
    (project_raw, claim_raw): (String, String),
) -> Result<(Project, Uuid), ApiError> {
    let project = projects::load(state, &project_raw).await?;
    let id = Uuid::parse_str(&claim_raw)
        .map_err(|_| ApiError::bad_request("invalid_field", "the claim id must be a UUID"))?;
    Ok((project, id))
}

/// `GET …/claims/{claim_id}`: one claim, with its objections.
pub async fn show(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (project, id) = claim_path(&state, path.into_inner()).await?;
    let (claim, objections) = state
        .coordination
        .get_claim(project.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no claim {id} in this project")))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"claim": claim, "objections": objections})))
}

#[derive(Deserialize)]
pub struct ReleaseParams {
    agent_id: Option<String>,
    force: Option<bool>,
    reason: Option<String>,
}

/// `DELETE …/claims/{claim_id}?agent_id=A` releases A's claim; `?force=true&reason=R`
/// releases anyone's (the admin token or an unbound project token).
pub async fn release(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    params: web::Query<ReleaseParams>,
) -> Result<HttpResponse, ApiError> {
    let (project, id) = claim_path(&state, path.into_inner()).await?;
    let params = params.into_inner();
    let force = params.force.unwrap_or(false);
    let access = granted(&req)?;
    if force && access.bound_agent().is_some() {
        return Err(ApiError::Forbidden(
            "a token bound to an agent cannot release other agents' claims by force".into(),
        ));
    }
    let agent = match (params.agent_id, force) {
        (None, true) => None,
        (given, _) => Some(acting_agent(&state, &req, project.id, given, None).await?),
    };
    let by = Releaser {
        agent_id: agent.as_deref(),
        force,
        reason: params.reason.as_deref(),
    };
    let answer = state.coordination.release(project.id, id, &by).await?;
    Ok(respond(answer, StatusCode::OK))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectionBody {
    agent_id: Option<String>,
    agent_type: Option<String>,
    reason: Option<String>,
}

/// `POST …/claims/{claim_id}/objections`: 201, the claim refused as objected.
pub async fn object(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Json<ObjectionBody>,
) -> Result<HttpResponse, ApiError> {
    let (project, id) = claim_path(&state, path.into_inner()).await?;
    let body = body.into_inner();
    let reason = body
        .reason
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("missing_field", "`reason` is required: say why you object")
        })?;
    let agent = acting_agent(
        &state,
        &req,
        project.id,
        body.agent_id,
        body.agent_type.as_deref(),
    )
    .await?;
    let caller = Caller {
        project_id: project.id,
        agent_id: &agent,
    };
    let answer = state.coordination.object(caller, id, reason).await?;
    Ok(respond(answer, StatusCode::CREATED))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    agent_id: Option<String>,
    ttl_ms: Option<i64>,
}

/// `POST …/claims/{claim_id}/renew`: the claim now expires `ttl_ms` from now.
pub async fn renew(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Json<RenewBody>,
) -> Result<HttpResponse, ApiError> {
    let (project, id) = claim_path(&state, path.into_inner()).await?;
    let body = body.into_inner();
    let agent = acting_agent(&state, &req, project.id, body.agent_id, None).await?;
    let caller = Caller {
        project_id: project.id,
        agent_id: &agent,
    };
    let answer = state.coordination.renew(caller, id, body.ttl_ms).await?;
    Ok(respond(answer, StatusCode::OK))
}
