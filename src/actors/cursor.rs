//! `CursorActor`: records delivery progress (ack floors, done seqs, `delivered_at`) and read
//! receipts, in group-commit fashion like the persistence actor: while one write is in
//! flight, reports accumulate and are merged per member, so a busy agent costs one statement
//! per write cycle, not one per message.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use diesel_async::AsyncConnection;
use uuid::Uuid;

use crate::db::cursors::{self, Progress};
use crate::db::DbPool;

/// How long to wait before writing again after the database refused a write.
const RETRY_AFTER: Duration = Duration::from_millis(500);

type MemberKey = (Uuid, String);

pub struct CursorActor {
    pool: DbPool,
    /// Progress not written yet, merged per member.
    progress: HashMap<MemberKey, Progress>,
    /// Read receipts not written yet, per member.
    reads: HashMap<MemberKey, Vec<Uuid>>,
    /// Whether a write is in flight (or a retry is scheduled).
    writing: bool,
}

impl CursorActor {
    pub fn new(pool: DbPool) -> Self {
        CursorActor {
            pool,
            progress: HashMap::new(),
            reads: HashMap::new(),
            writing: false,
        }
    }

    fn write_next(&mut self, ctx: &mut Context<Self>) {
        if self.writing || (self.progress.is_empty() && self.reads.is_empty()) {
            return;
        }
        self.writing = true;
        let progress = std::mem::take(&mut self.progress);
        let reads = std::mem::take(&mut self.reads);
        let pool = self.pool.clone();
        let write = async move {
            let result = match pool.get().await {
                Ok(mut conn) => write_all(&mut conn, &progress, &reads)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (progress, reads, result)
        };
        ctx.spawn(
            write
                .into_actor(self)
                .map(|(progress, reads, result), act, ctx| {
                    match result {
                        Ok(()) => {
                            act.writing = false;
                            act.write_next(ctx);
                        }
                        Err(e) => {
                            // Nothing is lost: the reports go back in the queue and are written once
                            // the database answers again.
                            log::warn!("delivery progress not recorded yet ({e}); retrying");
                            for (key, p) in progress {
                                act.progress.entry(key).or_default().merge(p);
                            }
                            for (key, ids) in reads {
                                act.reads.entry(key).or_default().extend(ids);
                            }
                            ctx.run_later(RETRY_AFTER, |act, ctx| {
                                act.writing = false;
                                act.write_next(ctx);
                            });
                        }
                    }
                }),
        );
    }
}

async fn write_all(
    conn: &mut diesel_async::AsyncPgConnection,
    progress: &HashMap<MemberKey, Progress>,
    reads: &HashMap<MemberKey, Vec<Uuid>>,
) -> diesel::QueryResult<()> {
    conn.transaction(async |conn| {
        for ((project_id, agent_id), p) in progress {
            cursors::apply_progress(conn, *project_id, agent_id, p).await?;
        }
        for ((project_id, agent_id), ids) in reads {
            cursors::mark_read(conn, *project_id, agent_id, ids).await?;
        }
        Ok(())
    })
    .await
}

impl Actor for CursorActor {
    type Context = Context<Self>;
}

/// An agent is done with these messages (written to it in auto mode, acknowledged in manual
/// mode).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReportProgress {
    pub project_id: Uuid,
    pub agent_id: String,
    pub progress: Progress,
}

impl Handler<ReportProgress> for CursorActor {
    type Result = ();

    fn handle(&mut self, report: ReportProgress, ctx: &mut Self::Context) {
        if report.progress.is_empty() {
            return;
        }
        self.progress
            .entry((report.project_id, report.agent_id))
            .or_default()
            .merge(report.progress);
        self.write_next(ctx);
    }
}

/// An agent read these messages.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MarkRead {
    pub project_id: Uuid,
    pub agent_id: String,
    pub ids: Vec<Uuid>,
}

impl Handler<MarkRead> for CursorActor {
    type Result = ();

    fn handle(&mut self, read: MarkRead, ctx: &mut Self::Context) {
        self.reads
            .entry((read.project_id, read.agent_id))
            .or_default()
            .extend(read.ids);
        self.write_next(ctx);
    }
}
