//! `/api/projects`: create, list, show.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::{parse_project_id, ApiError, AppState};
use crate::db::queries;
use crate::models::Project;

/// Longest project name, in characters.
const MAX_NAME_CHARS: usize = 255;

#[derive(Deserialize)]
pub struct CreateProject {
    name: Option<String>,
}

pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<CreateProject>,
) -> Result<HttpResponse, ApiError> {
    // The admin token was checked (`guards::admin_access`) before the body was read.
    if !super::granted(&req)?.is_admin() {
        return Err(ApiError::Forbidden("this needs the admin token".into()));
    }
    let name = body.into_inner().name.unwrap_or_default();
    let name = validate_name(&name)?;
    let mut conn = state.pool.get().await?;
    let (project, token) = queries::create_project_with_token(&mut conn, name).await?;
    let mut body = serde_json::to_value(&project).map_err(|e| ApiError::Internal(e.to_string()))?;
    // The project's first token, shown this once: only its hash is kept.
    body["token"] = serde_json::json!(token);
    Ok(HttpResponse::Created().json(body))
}

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if !super::granted(&req)?.is_admin() {
        return Err(ApiError::Forbidden("this needs the admin token".into()));
    }
    let mut conn = state.pool.get().await?;
    let projects = queries::list_projects(&mut conn).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "projects": projects })))
}

pub async fn show(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = load(&state, &path).await?;
    Ok(HttpResponse::Ok().json(project))
}

/// The project named by a path segment, or the right error.
pub async fn load(state: &AppState, raw_id: &str) -> Result<Project, ApiError> {
    let id = parse_project_id(raw_id)?;
    let mut conn = state.pool.get().await?;
    queries::find_project(&mut conn, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no project {id}")))
}

pub fn validate_name(name: &str) -> Result<&str, ApiError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`name` is required and must not be blank",
        ));
    }
    if trimmed.chars().count() > MAX_NAME_CHARS || trimmed.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!(
                "`name` must be at most {MAX_NAME_CHARS} characters, without control characters"
            ),
        ));
    }
    Ok(trimmed)
}
