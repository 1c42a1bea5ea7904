//! `CursorActor`: records delivery progress (ack floors, done seqs, `delivered_at`) and read
//! receipts, in group-commit fashion like the persistence actor: while one write is in
//! flight, reports accumulate and are merged per member, so a busy agent costs one statement
//! per write cycle, not one per message.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use crate::db::cursors::{self, Progress};
use crate::db::DbPool;

/// Pause between two writes, so reports coalesce: under load each member then costs a few
/// statements per second, however many messages it receives. Progress is recorded
/// asynchronously in any case (see docs/PROTOCOL.md); this bounds how far behind it may lag,
/// and so how much may be delivered again after a crash.
const COALESCE_FOR: Duration = Duration::from_millis(100);
/// How long to wait before writing again after the database refused a write.
const RETRY_AFTER: Duration = Duration::from_millis(500);

type MemberKey = (Uuid, String);

pub struct CursorActor {
    pool: DbPool,
    /// Progress not written yet, merged per member.
    progress: HashMap<MemberKey, Progress>,
    /// Read receipts not written yet, per member.
    reads: HashMap<MemberKey, Vec<Uuid>>,
    /// Manual-mode deliveries to count, per member.
    attempts: HashMap<MemberKey, Vec<i64>>,
    /// Messages to give up on (dead-letter), per member: (id, seq).
    give_ups: HashMap<MemberKey, Vec<(Uuid, i64)>>,
    /// Whether a write is in flight (or a retry is scheduled).
    writing: bool,
}

impl CursorActor {
    pub fn new(pool: DbPool) -> Self {
        CursorActor {
            pool,
            progress: HashMap::new(),
            reads: HashMap::new(),
            attempts: HashMap::new(),
            give_ups: HashMap::new(),
            writing: false,
        }
    }

    fn write_next(&mut self, ctx: &mut Context<Self>) {
        if self.writing
            || (self.progress.is_empty()
                && self.reads.is_empty()
                && self.attempts.is_empty()
                && self.give_ups.is_empty())
        {
            return;
        }
        self.writing = true;
        let work = Pending {
            progress: std::mem::take(&mut self.progress),
            reads: std::mem::take(&mut self.reads),
            attempts: std::mem::take(&mut self.attempts),
            give_ups: std::mem::take(&mut self.give_ups),
        };
        let pool = self.pool.clone();
        let write = async move {
            let result = match pool.get().await {
                Ok(mut conn) => write_all(&mut conn, &work).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (work, result)
        };
        ctx.spawn(write.into_actor(self).map(|(work, result), act, ctx| {
            match result {
                Ok(()) => {
                    // A short pause lets reports pile up: under load one statement then
                    // covers many deliveries per member instead of a few.
                    ctx.run_later(COALESCE_FOR, |act, ctx| {
                        act.writing = false;
                        act.write_next(ctx);
                    });
                }
                Err(e) => {
                    // Nothing is lost: the reports go back in the queue and are written once
                    // the database answers again.
                    log::warn!("delivery progress not recorded yet ({e}); retrying");
                    for (key, p) in work.progress {
                        act.progress.entry(key).or_default().merge(p);
                    }
                    for (key, ids) in work.reads {
                        act.reads.entry(key).or_default().extend(ids);
                    }
                    for (key, seqs) in work.attempts {
                        act.attempts.entry(key).or_default().extend(seqs);
                    }
                    for (key, messages) in work.give_ups {
                        act.give_ups.entry(key).or_default().extend(messages);
                    }
                    ctx.run_later(RETRY_AFTER, |act, ctx| {
                        act.writing = false;
                        act.write_next(ctx);
                    });
                }
            }
        }));
    }
}

/// One write cycle's worth of reports.
struct Pending {
    progress: HashMap<MemberKey, Progress>,
    reads: HashMap<MemberKey, Vec<Uuid>>,
    attempts: HashMap<MemberKey, Vec<i64>>,
    give_ups: HashMap<MemberKey, Vec<(Uuid, i64)>>,
}

async fn write_all(
    conn: &mut diesel_async::AsyncPgConnection,
    work: &Pending,
) -> diesel::QueryResult<()> {
    // Generic index plans: planning these statements cost more than running them, at every
    // cycle of every project (see the function's doc).
    crate::db::indexed_plan_transaction(conn, async |conn| {
        for ((project_id, agent_id), seqs) in &work.attempts {
            cursors::record_attempts(conn, *project_id, agent_id, seqs).await?;
        }
        // One statement of each kind per project, whatever the number of its members that
        // reported.
        let mut reports: HashMap<Uuid, Vec<(&str, &Progress)>> = HashMap::new();
        for ((project_id, agent_id), p) in &work.progress {
            reports
                .entry(*project_id)
                .or_default()
                .push((agent_id.as_str(), p));
        }
        for (project_id, reports) in &reports {
            cursors::apply_project_progress(conn, *project_id, reports).await?;
        }
        for ((project_id, agent_id), messages) in &work.give_ups {
            cursors::give_up(conn, *project_id, agent_id, messages).await?;
        }
        for ((project_id, agent_id), ids) in &work.reads {
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

/// Manual mode: these messages were handed to the agent once more.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordAttempts {
    pub project_id: Uuid,
    pub agent_id: String,
    pub seqs: Vec<i64>,
}

impl Handler<RecordAttempts> for CursorActor {
    type Result = ();

    fn handle(&mut self, record: RecordAttempts, ctx: &mut Self::Context) {
        if record.seqs.is_empty() {
            return;
        }
        self.attempts
            .entry((record.project_id, record.agent_id))
            .or_default()
            .extend(record.seqs);
        self.write_next(ctx);
    }
}

/// Manual mode: these messages (id, seq) reached the delivery limit without an ack.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GiveUp {
    pub project_id: Uuid,
    pub agent_id: String,
    pub messages: Vec<(Uuid, i64)>,
}

impl Handler<GiveUp> for CursorActor {
    type Result = ();

    fn handle(&mut self, give_up: GiveUp, ctx: &mut Self::Context) {
        if give_up.messages.is_empty() {
            return;
        }
        self.give_ups
            .entry((give_up.project_id, give_up.agent_id))
            .or_default()
            .extend(give_up.messages);
        self.write_next(ctx);
    }
}
