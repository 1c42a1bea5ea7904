//! `/api/projects/{id}/tokens`: issuing, listing and revoking project tokens (admin only).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use uuid::Uuid;

use super::{granted, projects, ApiError, AppState};
use crate::actors::channel::Revoked;

fn require_admin(req: &HttpRequest) -> Result<(), ApiError> {
    if granted(req)?.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "managing tokens needs the admin token".into(),
        ))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    /// Bind the token to this agent id.
    agent_id: Option<String>,
}

pub async fn issue(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req)?;
    let project = projects::load(&state, &path).await?;
    // An empty body issues an unbound token; anything else must be exactly this shape, so
    // a misspelt `agent_id` cannot silently yield an unbound token.
    let body: IssueBody = if body.iter().all(u8::is_ascii_whitespace) {
        IssueBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))?
    };
    let agent_id = body
        .agent_id
        .map(|id| super::parse_agent_id("agent_id", id))
        .transpose()?;
    let mut conn = state.pool.get().await?;
    let (id, token) = crate::db::tokens::issue(&mut conn, project.id, agent_id.as_deref()).await?;
    Ok(HttpResponse::Created().json(serde_json::json!({
        "id": id,
        "project_id": project.id,
        "agent_id": agent_id,
        "token": token,
    })))
}

pub async fn list(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req)?;
    let project = projects::load(&state, &path).await?;
    let mut conn = state.pool.get().await?;
    let tokens = crate::db::tokens::list(&mut conn, project.id).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "tokens": tokens })))
}

/// Revokes a token and closes the sessions that connected with it.
pub async fn revoke(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req)?;
    let (project_raw, token_raw) = path.into_inner();
    let project = projects::load(&state, &project_raw).await?;
    let token_id = Uuid::parse_str(&token_raw)
        .map_err(|_| ApiError::bad_request("invalid_field", "the token id must be a UUID"))?;
    let mut conn = state.pool.get().await?;
    if !crate::db::tokens::revoke(&mut conn, project.id, token_id).await? {
        return Err(ApiError::NotFound(format!(
            "no active token {token_id} in this project"
        )));
    }
    if let Some(channel) = state.registry.get(project.id) {
        channel.do_send(Revoked { token_id });
    }
    Ok(HttpResponse::NoContent().finish())
}
