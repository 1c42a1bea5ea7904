//! Operations endpoints: `/readyz` (can this broker serve traffic?) and `/metrics`
//! (Prometheus). `/healthz` (is the process alive?) is in the route table.

use actix_web::http::header::ContentType;
use actix_web::{web, HttpResponse};
use diesel::migration::MigrationSource;
use serde_json::json;

use super::AppState;
use crate::db::{self, DbPool, MIGRATIONS};
use crate::metrics;

/// 200 `{"status": "ready", "node_id": ...}` when the database answers within the database
/// timeout and every migration this binary embeds is applied; 503 `{"status": "not_ready",
/// "reason": ..., "node_id": ...}` otherwise. The node id is also in the `X-Agentbus-Node`
/// header. Costs a pool connection and two small queries.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let timeout = state.settings.db_timeout();
    let verdict = match tokio::time::timeout(timeout, check(&state.pool)).await {
        Ok(verdict) => verdict,
        Err(_) => Err(format!(
            "the database did not answer within {} ms",
            timeout.as_millis()
        )),
    };
    let node = state.registry.node_id().unwrap_or_default().to_owned();
    match verdict {
        Ok(()) => HttpResponse::Ok()
            .insert_header((NODE_HEADER, node.clone()))
            .json(json!({"status": "ready", "node_id": node})),
        Err(reason) => {
            log::warn!("not ready: {reason}");
            HttpResponse::ServiceUnavailable()
                .insert_header(("Cache-Control", "no-store"))
                .insert_header((NODE_HEADER, node.clone()))
                .json(json!({"status": "not_ready", "reason": reason, "node_id": node}))
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

/// The header of `/readyz` naming the node that answered (docs/SCALING.md).
pub const NODE_HEADER: &str = "X-Agentbus-Node";

/// Every metric, in the OpenMetrics text format, which Prometheus scrapes natively, with the
/// node's id as an info metric (`agentbus_node_info{node_id="…"} 1`).
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let mut body = state.stats.metrics().encode();
    if let Some(node) = state.registry.node_id() {
        let info = format!(
            "# HELP agentbus_node This broker's node id among the brokers sharing its database.\n\
             # TYPE agentbus_node info\nagentbus_node_info{{node_id=\"{node}\"}} 1\n"
        );
        match body.rfind("# EOF") {
            Some(end) => body.insert_str(end, &info),
            None => body.push_str(&info),
        }
    }
    HttpResponse::Ok()
        .insert_header(ContentType(
            metrics::CONTENT_TYPE.parse().expect("a valid media type"),
        ))
        .insert_header(("Cache-Control", "no-store"))
        .body(body)
}
