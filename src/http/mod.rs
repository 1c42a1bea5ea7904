//! The HTTP surface: REST routes, the WebSocket upgrade, and how extractor failures become
//! JSON errors.

mod access;
mod agents;
mod claims;
mod cluster;
mod console;
mod dead_letters;
mod error;
pub mod guards;
mod mcp;
mod mcp_coordination;
mod mcp_tools;
mod messages;
mod ops;
mod projects;
mod socket;
mod stats;
mod tasks;
mod tokens;

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpResponse};
use uuid::Uuid;

pub use error::ApiError;
pub use mcp::McpSessions;
pub use projects::validate_name as validate_project_name;

use crate::actors::cursor::CursorActor;
use crate::actors::persistence::Persist;
use crate::actors::registry::ChannelRegistry;
use crate::auth;
use crate::config::Settings;
use crate::db::DbPool;
use crate::stats::Stats;

/// What every route handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: DbPool,
    pub settings: Arc<Settings>,
    pub registry: ChannelRegistry,
    pub persistence: actix::Recipient<Persist>,
    pub cursors: Addr<CursorActor>,
    pub stats: Stats,
    /// Every project's rate limit, shared with the sessions.
    pub project_limits: crate::limits::ProjectLimits,
    /// Open connections per project and per address.
    pub connection_limits: crate::limits::ConnectionLimits,
    /// Inbox reads waiting for mail, over the broker and per project.
    pub inbox_waits: crate::actors::inbox::WaitLimits,
    /// REST requests waiting for their reply, per project and in all.
    pub waiters: guards::Waiters,
    /// History, search and dead-letter reads served at once.
    pub heavy_reads: guards::HeavyReads,
    /// Open MCP sessions.
    pub mcp_sessions: McpSessions,
    /// File claims and tasks.
    pub coordination: crate::actors::coordination::Coordination,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(1024 * 1024)
            .error_handler(|err, _| {
                ApiError::bad_request("invalid_json", format!("invalid JSON body: {err}")).into()
            }),
    )
    .app_data(web::QueryConfig::default().error_handler(|err, _| {
        ApiError::bad_request("invalid_query", format!("invalid query string: {err}")).into()
    }))
    .route("/healthz", web::get().to(healthz))
    .route("/readyz", web::get().to(ops::readyz))
    .route("/metrics", web::get().to(ops::metrics))
    .configure(console::routes)
    .route(
        "/ws/agent/messages/{project_id}",
        web::get().to(socket::connect),
    )
    .service(
        web::resource("/mcp/{project_id}")
            .route(web::post().to(mcp::post))
            .route(web::get().to(mcp::get))
            .route(web::delete().to(mcp::delete)),
    )
    .service(
        web::scope("/api")
            .route("/stats", web::get().to(stats::all))
            .route("/cluster", web::get().to(cluster::show))
            .service(
                web::resource("/projects")
                    .wrap(actix_web::middleware::from_fn(guards::admin_access))
                    .route(web::post().to(projects::create))
                    .route(web::get().to(projects::list))
                    .default_service(web::to(not_found)),
            )
            .service(
                web::scope("/projects/{project_id}")
                    .wrap(actix_web::middleware::from_fn(project_access))
                    .configure(project_routes),
            ),
    )
    .default_service(web::to(not_found));
}

/// Logs one line per request, with a request id (the client's `X-Request-Id`, or a new one)
/// that is also returned in the response. The query string is not logged: it may carry a
/// token. A 500's detail is logged here, with the request id, and its body replaced by a
/// generic sentence naming the request id.
pub async fn log_request(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::new_v4().simple().to_string()[..12].to_owned());
    let (method, path) = (req.method().clone(), req.path().to_owned());
    let started = std::time::Instant::now();
    let mut response = next.call(req).await?.map_into_boxed_body();
    let internal = response
        .response()
        .extensions()
        .get::<error::InternalDetail>()
        .cloned();
    if let Some(error::InternalDetail(detail)) = internal {
        log::error!("request {id} {method} {path}: internal error: {detail}");
        response = response.into_response(
            HttpResponse::InternalServerError()
                .json(error::internal_body(&id))
                .map_into_boxed_body(),
        );
    }
    log::info!(
        "request {id} {method} {path} -> {} in {:.1} ms",
        response.status().as_u16(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&id) {
        response.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("x-request-id"),
            value,
        );
    }
    Ok(response)
}

/// Checks the credentials of every request under `/api/projects/{project_id}`: the admin
/// token, or a token of that project. The access is left in the request's extensions.
/// Refusals are answered here (not returned as errors), so that the middleware around sees a
/// response and the body is never read.
async fn project_access(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::HttpMessage;
    match check_project_access(&req).await {
        Ok(access) => {
            req.extensions_mut().insert(access);
            next.call(req)
                .await
                .map(actix_web::dev::ServiceResponse::map_into_boxed_body)
        }
        Err(e) => Ok(req.error_response(e)),
    }
}

async fn check_project_access(
    req: &actix_web::dev::ServiceRequest,
) -> Result<auth::Access, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("no application state".into()))?;
    let project_id = parse_project_id(req.match_info().get("project_id").unwrap_or_default())?;
    let token = access::presented_token(req.request());
    let access = access::authenticate(
        &state.pool,
        state.settings.admin_token.as_deref(),
        token.as_deref(),
    )
    .await?;
    if !access.allows_project(project_id) {
        return Err(ApiError::Forbidden(
            "this token is for another project".into(),
        ));
    }
    Ok(access)
}

/// The admin token (or an open broker) is required. (`/api/projects` checks it in
/// `guards::admin_access`, before the body is read.)
pub async fn require_admin(req: &actix_web::HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let token = access::presented_token(req);
    let access = access::authenticate(
        &state.pool,
        state.settings.admin_token.as_deref(),
        token.as_deref(),
    )
    .await?;
    if access.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden("this needs the admin token".into()))
    }
}

/// The access a project route was granted (by `project_access`). Missing means the route
/// is not behind that check: refuse rather than assume.
pub fn granted(req: &actix_web::HttpRequest) -> Result<auth::Access, ApiError> {
    use actix_web::HttpMessage;
    req.extensions()
        .get::<auth::Access>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("a project route without an access check".into()))
}

/// Everything under `/api/projects/{project_id}`.
fn project_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("", web::get().to(projects::show))
        .route("/stats", web::get().to(stats::project))
        .route("/messages", web::get().to(messages::history))
        .route("/messages", web::post().to(messages::publish))
        .route("/messages/{message_id}", web::get().to(messages::show))
        .route("/messages/{message_id}/read", web::post().to(agents::read))
        .route("/requests", web::post().to(messages::send_and_wait))
        .route("/agents", web::get().to(agents::list))
        .route("/agents", web::post().to(agents::join))
        .route("/agents/{agent_id}/inbox", web::get().to(agents::inbox))
        .route(
            "/agents/{agent_id}/notifications",
            web::post().to(agents::notifications),
        )
        .route("/agents/{agent_id}/ack", web::post().to(agents::ack))
        .route("/claims", web::get().to(claims::list))
        .route("/claims", web::post().to(claims::create))
        .route("/claims/{claim_id}", web::get().to(claims::show))
        .route("/claims/{claim_id}", web::delete().to(claims::release))
        .route(
            "/claims/{claim_id}/objections",
            web::post().to(claims::object),
        )
        .route("/claims/{claim_id}/renew", web::post().to(claims::renew))
        .route("/tasks", web::get().to(tasks::list))
        .route("/tasks/{message_id}", web::get().to(tasks::show))
        .route("/tasks/{message_id}/{action}", web::post().to(tasks::act))
        .route("/dead-letters", web::get().to(dead_letters::list))
        .route(
            "/dead-letters/{message_id}/retry",
            web::post().to(dead_letters::retry),
        )
        .service(
            web::resource("/tokens")
                .wrap(actix_web::middleware::from_fn(guards::admin_only))
                .route(web::get().to(tokens::list))
                .route(web::post().to(tokens::issue))
                .default_service(web::to(not_found)),
        )
        .service(
            web::resource("/tokens/{token_id}")
                .wrap(actix_web::middleware::from_fn(guards::admin_only))
                .route(web::delete().to(tokens::revoke))
                .default_service(web::to(not_found)),
        );
}

/// Unknown paths and methods get a JSON error like every other route.
async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}

/// The process is alive and serving HTTP; says nothing of the database (see `/readyz`).
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// A message id from the path: malformed is a 400, not a 404.
fn parse_message_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_request("invalid_field", "the message id must be a UUID"))
}

/// An agent id from a request, parsed once at the edge: 400 `invalid_field` naming `field`
/// if it breaks a rule (see [`AgentId`](crate::domain::AgentId)).
fn parse_agent_id(field: &'static str, raw: String) -> Result<crate::domain::AgentId, ApiError> {
    crate::domain::AgentId::parse(field, raw)
        .map_err(|e| crate::protocol::Rejection::invalid(field, e.0).into())
}

/// An agent type from a request, parsed once at the edge (400 `invalid_field`).
fn parse_agent_type(
    field: &'static str,
    raw: String,
) -> Result<crate::domain::AgentType, ApiError> {
    crate::domain::AgentType::parse(field, raw)
        .map_err(|e| crate::protocol::Rejection::invalid(field, e.0).into())
}

/// A project id from the path: malformed is a 400, not a 404.
fn parse_project_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::bad_request(
            "invalid_project_id",
            format!("{raw:?} is not a project id (UUID)"),
        )
    })
}
