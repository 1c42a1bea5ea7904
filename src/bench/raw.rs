//! The raw PostgreSQL ceiling: the rows the workload would store, written with the broker's
//! own [`commit_batch`](crate::db::batch::commit_batch) in batches of 500, with no broker,
//! no WebSocket and no delivery. No broker can persist faster than this on this machine.

use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use super::broker::{drop_database, fresh_database_url};
use super::cli::Mode;
use super::driver::{agent_id, content, original_frame, reply_frame, Workload};
use super::procstat::CpuSample;
use super::verify::{self, Verification};
use crate::db::{self, batch, queries};
use crate::models::NewMessage;
use crate::protocol::{self, ClientOp};

/// Rows per transaction.
pub const RAW_BATCH: usize = 500;

pub struct RawResult {
    pub rows: u64,
    pub elapsed: f64,
    pub cpu: CpuSample,
    pub verification: Verification,
}

/// Writes the workload's rows into a fresh database on `server`, which is dropped afterwards.
pub async fn run(server: &str, w: &Workload) -> anyhow::Result<RawResult> {
    let (url, name) = fresh_database_url(server);
    let result = run_on(&url, w).await;
    if let Err(e) = drop_database(server, &name).await {
        log::warn!("{e:#}");
    }
    result
}

async fn run_on(url: &str, w: &Workload) -> anyhow::Result<RawResult> {
    db::ensure_database_exists(url).await?;
    let migrate_url = url.to_owned();
    tokio::task::spawn_blocking(move || db::run_migrations(&migrate_url)).await??;
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut project_ids = Vec::with_capacity(w.projects);
    for p in 0..w.projects {
        project_ids.push(
            queries::create_project(&mut conn, &format!("bench-raw-{p}"))
                .await?
                .id,
        );
    }
    let mut rows = rows(w, &project_ids)?;
    let cpu_before = CpuSample::take(None);
    let started = Instant::now();
    for chunk in rows.chunks_mut(RAW_BATCH) {
        batch::commit_batch(&mut conn, chunk, Utc::now())
            .await
            .context("writing a batch")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_before.until(&CpuSample::take(None));
    let verification = verify::verify_raw(&mut conn, &project_ids, rows.len() as u64).await?;
    Ok(RawResult {
        rows: rows.len() as u64,
        elapsed,
        cpu,
        verification,
    })
}

/// The rows of the workload, in the order a broker would receive them: message `n` of every
/// agent of every project, then message `n + 1`; each reply right after its request. Each row
/// is made from the very frame the driver sends, by the broker's own parsing and validation.
fn rows(w: &Workload, project_ids: &[Uuid]) -> anyhow::Result<Vec<NewMessage>> {
    let content = content(w.size);
    let row = |project: Uuid, sender: usize, frame: String| -> anyhow::Result<NewMessage> {
        let ClientOp::Send(fields) = protocol::parse_client_frame(&frame)
            .map_err(|(r, _)| anyhow::anyhow!("the bench's own frame is refused: {}", r.message))?
        else {
            anyhow::bail!("the bench's own frame is not a send: {frame}");
        };
        let send = protocol::validate_send(fields, &protocol::SendLimits::UNBOUNDED)
            .map_err(|(r, _)| anyhow::anyhow!("the bench's own frame is refused: {}", r.message))?;
        Ok(send.into_message(project, agent_id(sender), "bench".to_owned(), None))
    };
    let mut rows = Vec::with_capacity(w.expected_messages() as usize);
    for n in 0..w.messages {
        for &project in project_ids {
            for a in 0..w.agents {
                let t = rows.len() as u64;
                match w.mode {
                    Mode::Broadcast => {
                        rows.push(row(project, a, original_frame(&content, n, t, None))?)
                    }
                    Mode::Direct => rows.push(row(
                        project,
                        a,
                        original_frame(&content, n, t, Some(w.target(a, n))),
                    )?),
                    Mode::Request => {
                        let to = w.target(a, n);
                        rows.push(row(project, a, original_frame(&content, n, t, Some(to)))?);
                        rows.push(row(project, to, reply_frame(&content, a, n, t))?);
                    }
                }
            }
        }
    }
    Ok(rows)
}
