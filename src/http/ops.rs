//! Operations endpoints: `/readyz` (can this broker serve traffic?) and `/metrics`
//! (Prometheus). `/healthz` (is the process alive?) is in the route table.

use actix_web::http::header::ContentType;
use actix_web::{web, HttpResponse};
use diesel::migration::MigrationSource;
use serde_json::json;

use super::AppState;
use crate::db::{self, DbPool, MIGRATIONS};
use crate::metrics;

/// 200 `{"status": "ready"}` when the database answers within the database timeout and every
/// migration this binary embeds is applied; 503 `{"status": "not_ready", "reason": ...}`
/// otherwise. Costs a pool connection and two small queries.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let timeout = state.settings.db_timeout();
    let verdict = match tokio::time::timeout(timeout, check(&state.pool)).await {
        Ok(verdict) => verdict,
        Err(_) => Err(format!(
            "the database did not answer within {} ms",
            timeout.as_millis()
        )),
    };
    match verdict {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(reason) => {
            log::warn!("not ready: {reason}");
            HttpResponse::ServiceUnavailable()
                .insert_header(("Cache-Control", "no-store"))
                .json(json!({"status": "not_ready", "reason": reason}))
        }
    }
}

async fn check(pool: &DbPool) -> Result<(), String> {
    let mut conn = pool
        .get()
        .await
        .map_err(|e| format!("no database connection: {e}"))?;
    db::ops::ping(&mut conn)
        .await
        .map_err(|e| format!("the database did not answer: {e}"))?;
    let applied = db::ops::applied_migrations(&mut conn)
        .await
        .map_err(|e| format!("cannot read the applied migrations: {e}"))?;
    let embedded = MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
        .map_err(|e| format!("cannot list the embedded migrations: {e}"))?;
    let pending: Vec<String> = embedded
        .iter()
        .map(|m| m.name())
        .filter(|name| !applied.contains(&name.version().to_string()))
        .map(|name| name.to_string())
        .collect();
    if pending.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "migrations not applied: {} (run `agentbus migrate`)",
            pending.join(", ")
        ))
    }
}

/// Every metric, in the OpenMetrics text format, which Prometheus scrapes natively.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(ContentType(
            metrics::CONTENT_TYPE.parse().expect("a valid media type"),
        ))
        .insert_header(("Cache-Control", "no-store"))
        .body(state.stats.metrics().encode())
}
