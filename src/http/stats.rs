//! `/api/stats` and `/api/projects/{id}/stats`: counters kept in memory, plus a few cheap
//! indexed counts.

use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use serde_json::json;
use uuid::Uuid;

use super::{projects, ApiError, AppState};
use crate::actors::channel::Presence;
use crate::db::{cursors, dead_letters, deadlines};
use crate::metrics::{BATCH_SIZE_BUCKETS, COMMIT_MS_BUCKETS};

fn persistence_json(state: &AppState) -> serde_json::Value {
    let b = state.stats.batches();
    json!({
        "batches": b.batches,
        "rows": b.rows,
        "failed_batches": b.failed_batches,
        "mean_batch_size": if b.batches > 0 { b.rows as f64 / b.batches as f64 } else { 0.0 },
        "batch_size_buckets": {"le": BATCH_SIZE_BUCKETS, "counts": b.size_buckets},
        "mean_commit_ms": if b.batches > 0 { b.commit_ms_total / b.batches as f64 } else { 0.0 },
        "commit_ms_buckets": {"le": COMMIT_MS_BUCKETS, "counts": b.commit_ms_buckets},
    })
}

pub async fn project(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = projects::load(&state, &path).await?;
    let connected = match state.registry.get(project.id) {
        Some(channel) => channel.send(Presence).await.map(|p| p.len()).unwrap_or(0),
        None => 0,
    };
    let mut conn = state.pool.get().await?;
    let members = cursors::list_members(&mut conn, project.id, None).await?;
    let queue_depth: HashMap<&str, i64> = members
        .iter()
        .map(|m| (m.agent_id.as_str(), m.queue_depth))
        .collect();
    let pending_requests = deadlines::count_pending(&mut conn, project.id).await?;
    let dead = dead_letters::count(&mut conn, project.id).await?;
    Ok(HttpResponse::Ok().json(json!({
        "project_id": project.id,
        "head_seq": project.head_seq,
        "since_start": state.stats.project(project.id),
        "connected_sessions": connected,
        "members": members.len(),
        "queue_depth": queue_depth,
        "pending_requests": pending_requests,
        "dead_letters": dead,
        "persistence": persistence_json(&state),
    })))
}

pub async fn all(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    super::require_admin(&req, &state).await?;
    let projects: HashMap<Uuid, _> = state.stats.all_projects();
    let messages_in: u64 = projects.values().map(|p| p.messages_in).sum();
    let deliveries: u64 = projects.values().map(|p| p.deliveries).sum();
    Ok(HttpResponse::Ok().json(json!({
        "uptime_seconds": state.stats.uptime().as_secs(),
        "messages_in": messages_in,
        "deliveries": deliveries,
        "messages_in_per_second": projects.values().map(|p| p.messages_in_per_second).sum::<f64>(),
        "deliveries_per_second": projects.values().map(|p| p.deliveries_per_second).sum::<f64>(),
        "projects": projects,
        "persistence": persistence_json(&state),
    })))
}
