//! `PersistenceActor`: writes messages to PostgreSQL with group commit.
//!
//! Messages are written in **lanes** (`commit_lanes`, [`CommitLanes`]), each writing one
//! batch at a time on its own connection; a project's messages go to one lane while any of
//! them is outstanding, so each project's batches commit, and are routed, in seq order. While
//! a lane's batch is being written, new messages for it queue up; when the write finishes,
//! everything queued (up to `batch_max_rows`) becomes its next batch. At light load a batch
//! is a single message and is written at once; under load batches grow by themselves. No
//! timer ever holds a message back. With several lanes, one lane's `COMMIT` (its WAL flush)
//! and the next batch of other projects overlap instead of taking turns.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use uuid::Uuid;

use super::channel::CommittedItem;
use super::deadlines::TrackRequest;
use super::lanes::{CommitLanes, SPREAD_MIN_ROWS};
use super::registry::ChannelRegistry;
use super::search::IndexSoon;
use super::settle::{Reply, Settlement};
use crate::db::batch::{self, Outcome};
use crate::db::DbPool;
use crate::limits::CommitBudget;
use crate::metrics::Stage;
use crate::models::{NewMessage, StoredMessage};
use crate::protocol::{ErrorCode, Rejection};
use crate::stats::Stats;

/// Store this message, then route it and settle its sender.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Persist {
    pub message: NewMessage,
    pub reply: Reply,
    /// What the message holds while it waits ([`NewMessage::held_bytes`]), counted by the
    /// sender ([`Persist::new`]) rather than by the one actor that writes every project.
    pub held_bytes: usize,
    /// When the sender handed it over, for the time it waits for its batch
    /// ([`Stage::Queued`]).
    pub arrived: Instant,
}

impl Persist {
    pub fn new(message: NewMessage, reply: Reply) -> Self {
        Persist {
            held_bytes: message.held_bytes(),
            message,
            reply,
            arrived: Instant::now(),
        }
    }
}

pub struct PersistenceActor {
    pool: DbPool,
    registry: ChannelRegistry,
    /// The lanes, each with its queue and at most one batch in flight.
    lanes: Vec<Lane>,
    /// Which lane each project with messages outstanding writes on.
    assigned: CommitLanes,
    /// The bytes held by the messages queued or being written, and the bound on them (one
    /// budget for all lanes).
    budget: CommitBudget,
    /// Most messages in one batch.
    batch_max_rows: usize,
    /// Where what a commit sets in motion goes.
    follow_ups: FollowUps,
    stats: Stats,
    /// This broker's node id, and whether other nodes share the database: while they do,
    /// each commit notifies them of its seqs.
    node: Option<(String, Arc<AtomicBool>)>,
}

/// One commit lane.
#[derive(Default)]
struct Lane {
    /// Messages waiting for the lane's next batch, in arrival order, with the bytes each holds.
    queue: VecDeque<(Persist, usize)>,
    /// Whether a batch is being written (at most one per lane, so a project's batches commit
    /// in order).
    writing: bool,
    /// Messages at the head of `queue` that must be written one per transaction: they were in
    /// a batch the database refused, and each must succeed or fail on its own.
    isolate: usize,
}

/// Where the persistence actor hands what a commit sets in motion. The deadline and the
/// coordination actors send to the persistence actor too: they are started from its
/// start-up with its address (`startup.rs`), so all three are built complete.
pub struct FollowUps {
    /// Committed requests, to have their reply timeout armed.
    pub requests: Recipient<TrackRequest>,
    /// Told after each commit how many messages there are to index for search.
    pub search: Recipient<IndexSoon>,
    /// Committed tasks with a claim deadline, to have it armed.
    pub tasks: Recipient<super::coordination::Arm>,
}

impl PersistenceActor {
    pub fn new(
        pool: DbPool,
        registry: ChannelRegistry,
        follow_ups: FollowUps,
        stats: Stats,
        batch_max_rows: usize,
        max_uncommitted_bytes: usize,
        commit_lanes: usize,
    ) -> Self {
        let assigned = CommitLanes::new(commit_lanes);
        PersistenceActor {
            follow_ups,
            stats,
            pool,
            registry,
            lanes: (0..assigned.lanes()).map(|_| Lane::default()).collect(),
            assigned,
            budget: CommitBudget::new(max_uncommitted_bytes),
            batch_max_rows: batch_max_rows.max(1),
            node: None,
        }
    }

    /// Commits as this node: while `peers` says other nodes share the database, every batch
    /// notifies them. (Alone, nothing is notified; a node that joins catches up with what it
    /// missed before it was heard of by its periodic head check.)
    pub fn on_node(mut self, node_id: String, peers: Arc<AtomicBool>) -> Self {
        self.node = Some((node_id, peers));
        self
    }

    /// A lane about to write a large batch while another lane is idle hands about half of
    /// its projects, with their queued messages in order, to the idle lane; returns that lane.
    /// None of the lane's messages is being written now, so none of its projects has a batch
    /// in flight.
    fn spread(&mut self, lane: usize) -> Option<usize> {
        let this = self.lanes.get(lane)?;
        if this.isolate > 0 || this.queue.len() < SPREAD_MIN_ROWS.min(self.batch_max_rows) {
            return None;
        }
        let idle = (0..self.lanes.len())
            .find(|&l| l != lane && !self.lanes[l].writing && self.lanes[l].queue.is_empty())?;
        let mut queued: Vec<(Uuid, usize)> = Vec::new();
        let mut index: HashMap<Uuid, usize> = HashMap::new();
        for (persist, _) in &this.queue {
            let project = persist.message.project_id;
            let at = *index.entry(project).or_insert_with(|| {
                queued.push((project, 0));
                queued.len() - 1
            });
            queued[at].1 += 1;
        }
        let moving: HashSet<Uuid> = self.assigned.spread(&queued, idle).into_iter().collect();
        if moving.is_empty() {
            return None;
        }
        let (go, stay): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.lanes[lane].queue)
            .into_iter()
            .partition(|(persist, _)| moving.contains(&persist.message.project_id));
        self.lanes[lane].queue = stay;
        self.lanes[idle].queue = go;
        Some(idle)
    }

    /// Starts writing the lane's next batch unless one is in flight.
    fn write_next_batch(&mut self, lane: usize, ctx: &mut Context<Self>) {
        if self.lanes.get(lane).is_some_and(|l| !l.writing) {
            if let Some(other) = self.spread(lane) {
                self.write_next_batch(other, ctx);
            }
        }
        let Some(this) = self.lanes.get_mut(lane) else {
            return;
        };
        if this.writing || this.queue.is_empty() {
            return;
        }
        this.writing = true;
        let size = if this.isolate > 0 {
            this.isolate -= 1;
            1
        } else {
            this.queue.len().min(self.batch_max_rows)
        };
        let mut sizes = Vec::with_capacity(size);
        let mut arrivals = Vec::with_capacity(size);
        let (mut batch, replies): (Vec<NewMessage>, Vec<Reply>) = this
            .queue
            .drain(..size)
            .map(|(p, bytes)| {
                sizes.push(bytes);
                arrivals.push(p.arrived);
                (p.message, p.reply)
            })
            .unzip();
        let pool = self.pool.clone();
        let node = self
            .node
            .as_ref()
            .filter(|(_, peers)| peers.load(Ordering::Relaxed))
            .map(|(id, _)| id.clone());
        let started = Instant::now();
        self.stats.record_waits(
            Stage::Queued,
            arrivals
                .iter()
                .map(|arrived| started.saturating_duration_since(*arrived)),
        );
        let write = async move {
            let created_at = commit_timestamp();
            let result = match pool.get().await {
                Ok(mut conn) => {
                    batch::commit_batch_on(&mut conn, &mut batch, created_at, node.as_deref())
                        .await
                        .map_err(WriteError::Database)
                }
                Err(e) => Err(WriteError::Pool(e.to_string())),
            };
            (batch, created_at, result)
        };
        ctx.spawn(
            write
                .into_actor(self)
                .map(move |(batch, created_at, result), act, ctx| {
                    act.lanes[lane].writing = false;
                    // Settled now, unless written again below: then they keep their bytes.
                    let held: usize = sizes.iter().sum();
                    act.stats
                        .record_batch(batch.len(), started.elapsed(), result.is_ok());
                    log::debug!(
                        "batch of {} written in {:?}",
                        batch.len(),
                        started.elapsed()
                    );
                    match result {
                        Ok(outcomes) => {
                            act.stats.record_waits(
                                Stage::Commit,
                                std::iter::repeat_n(started.elapsed(), batch.len()),
                            );
                            act.budget.release(held);
                            act.settle(&batch);
                            act.follow_ups.search.do_send(IndexSoon(batch.len()));
                            act.dispatch(batch, replies, outcomes, created_at)
                        }
                        Err(WriteError::Database(e)) if batch.len() > 1 && is_data_error(&e) => {
                            // One message the database refuses must not cost the others theirs:
                            // write the batch again, one message per transaction.
                            log::warn!(
                                "a batch of {} was refused ({e}); retrying each message alone",
                                batch.len()
                            );
                            act.lanes[lane].isolate += batch.len();
                            // Still waiting for their commit: they keep their bytes and lane.
                            for (((message, reply), bytes), arrived) in batch
                                .into_iter()
                                .zip(replies)
                                .zip(sizes)
                                .zip(arrivals)
                                .rev()
                            {
                                act.lanes[lane].queue.push_front((
                                    Persist {
                                        message,
                                        reply,
                                        held_bytes: bytes,
                                        arrived,
                                    },
                                    bytes,
                                ));
                            }
                        }
                        Err(e) => {
                            act.budget.release(held);
                            act.settle(&batch);
                            log::warn!("a batch of {} could not be stored: {e}", batch.len());
                            let rejection = e.rejection();
                            act.stats.record_errors(rejection.code, batch.len());
                            for (message, reply) in batch.into_iter().zip(replies) {
                                reply.settle(Settlement::Failed {
                                    rejection: rejection.clone(),
                                    client_msg_id: message.client_msg_id,
                                });
                            }
                        }
                    }
                    act.write_next_batch(lane, ctx);
                }),
        );
    }

    /// A batch's messages are no longer outstanding on their lane.
    fn settle(&mut self, batch: &[NewMessage]) {
        let mut run: Option<(Uuid, usize)> = None;
        for message in batch {
            match &mut run {
                Some((project, n)) if *project == message.project_id => *n += 1,
                _ => {
                    if let Some((project, n)) = run.take() {
                        self.assigned.settle(project, n);
                    }
                    run = Some((message.project_id, 1));
                }
            }
        }
        if let Some((project, n)) = run {
            self.assigned.settle(project, n);
        }
    }

    fn track_request(&self, request: &StoredMessage) {
        if let Some(deadline) = request.reply_deadline {
            self.follow_ups.requests.do_send(TrackRequest {
                request_id: request.id,
                project_id: request.project_id,
                deadline,
            });
        }
    }

    /// Hands a committed batch to the channels, grouped by project, in seq order.
    fn dispatch(
        &mut self,
        batch: Vec<NewMessage>,
        replies: Vec<Reply>,
        outcomes: Vec<Outcome>,
        created_at: DateTime<Utc>,
    ) {
        // The messages a later retry in this same batch refers to (rare): only those are kept.
        let originals: HashSet<usize> = outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Outcome::SameAs(first) => Some(*first),
                _ => None,
            })
            .collect();
        let mut resolved: Vec<Option<StoredMessage>> = Vec::with_capacity(batch.len());
        // Per project: the head just before this batch (the first new seq - 1) and the items.
        let mut per_project: HashMap<Uuid, (Option<i64>, Vec<CommittedItem>)> = HashMap::new();
        for (index, ((message, reply), outcome)) in
            batch.into_iter().zip(replies).zip(outcomes).enumerate()
        {
            let (settled, client_msg_id) = match outcome {
                Outcome::Stored { seq, no_recipient } => {
                    let claim_timeout = message.task.and_then(|t| t.claim_timeout_ms);
                    let stored = message.into_stored(seq, created_at);
                    if let Some(ms) = claim_timeout {
                        self.follow_ups.tasks.do_send(super::coordination::Arm {
                            deadline: super::coordination::Deadline::TaskUnclaimed,
                            id: stored.id,
                            at: created_at + chrono::Duration::milliseconds(ms),
                        });
                    }
                    if stored.expects_reply && !no_recipient {
                        self.track_request(&stored);
                    }
                    (Some((stored, false, no_recipient)), None)
                }
                Outcome::Duplicate {
                    message: existing,
                    no_recipient,
                } => (Some((*existing, true, no_recipient)), message.client_msg_id),
                Outcome::SameAs(first) => (
                    resolved
                        .get(first)
                        .cloned()
                        .flatten()
                        .map(|m| (m, true, false)),
                    message.client_msg_id,
                ),
                Outcome::ProjectMissing => (None, message.client_msg_id),
                Outcome::Skipped => {
                    resolved.push(None);
                    continue;
                }
            };
            let Some((stored, duplicate, no_recipient)) = settled else {
                resolved.push(None);
                reply.settle(Settlement::Failed {
                    rejection: Rejection::new(
                        ErrorCode::ProjectNotFound,
                        "the project no longer exists",
                    ),
                    client_msg_id,
                });
                continue;
            };
            self.stats.record_commit(&stored, duplicate);
            let entry = per_project.entry(stored.project_id).or_default();
            if !duplicate && entry.0.is_none() {
                entry.0 = Some(stored.seq - 1);
            }
            resolved.push(originals.contains(&index).then(|| stored.clone()));
            entry.1.push(CommittedItem {
                message: stored,
                duplicate,
                no_recipient,
                reply,
            });
        }
        let committed = Instant::now();
        for (project_id, (head_before, items)) in per_project {
            self.registry
                .route(project_id, head_before, items, committed);
        }
    }
}

impl Actor for PersistenceActor {
    type Context = Context<Self>;
}

impl Handler<Persist> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, persist: Persist, ctx: &mut Self::Context) {
        let bytes = persist.held_bytes;
        // The broker's own timeout responses are never refused: they settle requests.
        let exempt = matches!(persist.reply, Reply::Broker);
        if let Err(wait) = self.budget.admit(bytes, exempt) {
            let ms = wait.as_millis().max(1) as u64;
            let rejection = Rejection {
                retry_after_ms: Some(ms),
                ..Rejection::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the broker already holds {} bytes of sends waiting for their commit \
                         (max_uncommitted_bytes {}); nothing was stored, retry in {ms} ms",
                        self.budget.held(),
                        self.budget.limit()
                    ),
                )
            };
            self.stats.record_errors(rejection.code, 1);
            persist.reply.settle(Settlement::Failed {
                rejection,
                client_msg_id: persist.message.client_msg_id,
            });
            return;
        }
        let lane = self.assigned.assign(persist.message.project_id);
        self.lanes[lane].queue.push_back((persist, bytes));
        self.write_next_batch(lane, ctx);
    }
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("no database connection: {0}")]
    Pool(String),
    #[error("{0}")]
    Database(DieselError),
}

impl WriteError {
    fn rejection(&self) -> Rejection {
        match self {
            WriteError::Database(e) if is_data_error(e) => Rejection::new(
                ErrorCode::InvalidField,
                format!("the database refused this message: {e}"),
            ),
            _ => Rejection::new(
                ErrorCode::Unavailable,
                "the database is unavailable; nothing was stored, retry with the same client_msg_id",
            ),
        }
    }
}

/// An error about the data (a constraint, a value the column refuses), as opposed to the
/// database being unreachable.
fn is_data_error(e: &DieselError) -> bool {
    matches!(
        e,
        DieselError::DatabaseError(
            DatabaseErrorKind::UniqueViolation
                | DatabaseErrorKind::ForeignKeyViolation
                | DatabaseErrorKind::NotNullViolation
                | DatabaseErrorKind::CheckViolation,
            _
        )
    )
}

/// Now, at the database's precision (microseconds), so the time a client is told is exactly
/// the time stored.
fn commit_timestamp() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}
