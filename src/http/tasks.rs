//! `/api/projects/{id}/tasks`: tasks over REST (docs/PROTOCOL.md, "Tasks"). A task is sent
//! like any message, with `"task": true` (`POST …/messages`); these routes list tasks and
//! move them: claim, complete, release, cancel.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use uuid::Uuid;

use super::claims::{acting_agent, respond, DEFAULT_LIST, MAX_LIST};
use super::{projects, ApiError, AppState};
use crate::actors::coordination::Caller;
use crate::domain::tasks::TaskState;

#[derive(Deserialize)]
pub struct ListParams {
    state: Option<String>,
    limit: Option<i64>,
}

/// `GET …/tasks?state=`: the project's tasks, newest first.
pub async fn list(
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let project = projects::load(&state, &path).await?;
    let params = params.into_inner();
    let limit = super::messages::limit_within(params.limit, DEFAULT_LIST, MAX_LIST)?;
    let wanted = match params.state.as_deref() {
        None | Some("all") => None,
        Some(raw) => Some(TaskState::parse(raw).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!(
                    "`state` must be open, claimed, done, failed, canceled, unclaimed or all, \
                     not {raw:?}"
                ),
            )
        })?),
    };
    let tasks = state
        .coordination
        .list_tasks(project.id, wanted, limit)
        .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "tasks": tasks })))
}

fn task_id(raw: &str) -> Result<Uuid, ApiError> {
    super::parse_message_id(raw)
}

/// `GET …/tasks/{message_id}`.
pub async fn show(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (project_raw, task_raw) = path.into_inner();
    let project = projects::load(&state, &project_raw).await?;
    let id = task_id(&task_raw)?;
    let task = state
        .coordination
        .get_task(project.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no task {id} in this project")))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "task": task })))
}

/// The body of every task move; each move reads the fields it needs.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    agent_id: Option<String>,
    agent_type: Option<String>,
    /// `complete`: the result (or, with `success: false`, the error).
    result: Option<String>,
    success: Option<bool>,
    /// `cancel`: why.
    reason: Option<String>,
}

/// `POST …/tasks/{message_id}/{claim|complete|release|cancel}`.
pub async fn act(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let (project_raw, task_raw, action) = path.into_inner();
    let project = projects::load(&state, &project_raw).await?;
    let id = task_id(&task_raw)?;
    if !matches!(action.as_str(), "claim" | "complete" | "release" | "cancel") {
        return Err(ApiError::NotFound("no such route".into()));
    }
    // No body is an empty one (a bound token needs no `agent_id`).
    let body: MoveBody = if body.iter().all(u8::is_ascii_whitespace) {
        MoveBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))?
    };
    if action != "complete" && (body.result.is_some() || body.success.is_some()) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`result` and `success` are for complete",
        ));
    }
    if action != "cancel" && body.reason.is_some() {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`reason` is for cancel",
        ));
    }
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
    let coordination = &state.coordination;
    let answer = match action.as_str() {
        "claim" => coordination.claim_task(caller, id).await?,
        "complete" => {
            coordination
                .complete_task(caller, id, body.success.unwrap_or(true), body.result)
                .await?
        }
        "release" => coordination.release_task(caller, id).await?,
        _ => coordination.cancel_task(caller, id, body.reason).await?,
    };
    Ok(respond(answer, StatusCode::OK))
}
