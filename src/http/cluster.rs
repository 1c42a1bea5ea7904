//! `GET /api/cluster` (admin token): the brokers sharing this database, with their sessions
//! and the duties each holds (docs/SCALING.md).

use std::collections::BTreeMap;

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::Utc;
use serde_json::json;

use super::{require_admin, ApiError, AppState};
use crate::db::cluster;

pub async fn show(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state).await?;
    let mut conn = state.pool.get().await?;
    let (nodes, sessions, duties) = cluster::overview(&mut conn).await?;
    let now = Utc::now();
    let mut by_node: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    for s in &sessions {
        by_node.entry(&s.node_id).or_default().push(json!({
            "session_id": s.session_id,
            "project_id": s.project_id,
            "agent_id": s.agent_id,
            "observer": s.agent_id.is_none(),
            "connected_at": s.connected_at,
        }));
    }
    let nodes: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            let silent_ms = (now - n.heartbeat_at).num_milliseconds().max(0);
            let held: Vec<&str> = duties
                .iter()
                .filter(|(_, holder)| holder.as_deref() == Some(n.node_id.as_str()))
                .map(|(duty, _)| duty.as_str())
                .collect();
            json!({
                "node_id": n.node_id,
                "address": n.address,
                "started_at": n.started_at,
                "heartbeat_at": n.heartbeat_at,
                "timeout_ms": n.timeout_ms,
                "alive": silent_ms <= n.timeout_ms,
                "this_node": state.registry.node_id() == Some(n.node_id.as_str()),
                "duties": held,
                "sessions": by_node.remove(n.node_id.as_str()).unwrap_or_default(),
            })
        })
        .collect();
    let duties: BTreeMap<&str, Option<&str>> = duties
        .iter()
        .map(|(duty, holder)| (duty.as_str(), holder.as_deref()))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "node_id": state.registry.node_id(),
        "nodes": nodes,
        "duties": duties,
    })))
}
