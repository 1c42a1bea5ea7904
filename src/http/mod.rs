//! The HTTP surface: REST routes, the WebSocket upgrade, and how extractor failures become
//! JSON errors.

mod agents;
mod console;
mod dead_letters;
mod error;
mod messages;
mod ops;
mod projects;
mod socket;
mod stats;

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpResponse};
use uuid::Uuid;

pub use error::ApiError;
pub use projects::validate_name as validate_project_name;

use crate::actors::cursor::CursorActor;
use crate::actors::persistence::PersistenceActor;
use crate::actors::registry::ChannelRegistry;
use crate::config::Settings;
use crate::db::DbPool;
use crate::stats::Stats;

/// What every route handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: DbPool,
    pub settings: Arc<Settings>,
    pub registry: ChannelRegistry,
    pub persistence: Addr<PersistenceActor>,
    pub cursors: Addr<CursorActor>,
    pub stats: Stats,
    /// Every project's rate limit, shared with the sessions.
    pub project_limits: crate::limits::ProjectLimits,
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
        web::scope("/api")
            .route("/stats", web::get().to(stats::all))
            .route("/projects", web::post().to(projects::create))
            .route("/projects", web::get().to(projects::list))
            .service(web::scope("/projects/{project_id}").configure(project_routes)),
    )
    .default_service(web::to(not_found));
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
        .route("/agents/{agent_id}/inbox", web::get().to(agents::inbox))
        .route("/agents/{agent_id}/ack", web::post().to(agents::ack))
        .route("/dead-letters", web::get().to(dead_letters::list))
        .route(
            "/dead-letters/{message_id}/retry",
            web::post().to(dead_letters::retry),
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

/// A project id from the path: malformed is a 400, not a 404.
fn parse_project_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::bad_request(
            "invalid_project_id",
            format!("{raw:?} is not a project id (UUID)"),
        )
    })
}
