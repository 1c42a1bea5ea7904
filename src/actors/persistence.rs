//! `PersistenceActor`: writes messages to PostgreSQL with group commit.
//!
//! One batch is written at a time. While it is being written, new messages queue up; when the
//! write finishes, everything queued (up to `batch_max_rows`) becomes the next batch. At light
//! load a batch is a single message and is written at once; under load batches grow by
//! themselves. No timer ever holds a message back.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::channel::{Committed, CommittedItem};
use super::registry::ChannelRegistry;
use super::session::{SessionActor, Settled};
use crate::db::queries::{self, Outcome};
use crate::db::DbPool;
use crate::models::{NewMessage, StoredMessage};
use crate::protocol::{self, ErrorCode, Rejection};

/// Who to tell what became of a send.
pub enum Reply {
    /// A WebSocket session: it gets a `sent` receipt (through the channel, in seq order with
    /// its deliveries) or an error frame.
    Session(Addr<SessionActor>),
    /// A REST publish waiting for the commit.
    Http(oneshot::Sender<Settlement>),
}

/// What became of a send.
// Moved once from the persistence actor to the one who waits, never stored in bulk: boxing
// the large variant would only add an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Settlement {
    Stored(StoredMessage),
    Failed {
        rejection: Rejection,
        client_msg_id: Option<String>,
    },
}

impl Reply {
    pub fn settle(self, settlement: Settlement) {
        match self {
            Reply::Session(addr) => {
                let frame = match &settlement {
                    Settlement::Stored(message) => protocol::receipt_frame(message),
                    Settlement::Failed {
                        rejection,
                        client_msg_id,
                    } => protocol::error_frame(rejection, client_msg_id.as_deref()),
                };
                addr.do_send(Settled(frame));
            }
            Reply::Http(tx) => {
                // The HTTP caller may have gone away; there is nobody left to tell.
                let _ = tx.send(settlement);
            }
        }
    }
}

/// Store this message, then route it and settle its sender.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Persist {
    pub message: NewMessage,
    pub reply: Reply,
}

pub struct PersistenceActor {
    pool: DbPool,
    registry: ChannelRegistry,
    /// Messages waiting for the next batch, in arrival order.
    queue: VecDeque<Persist>,
    /// Whether a batch is being written (at most one at a time, so batches commit in order).
    writing: bool,
    /// Most messages in one batch.
    batch_max_rows: usize,
    /// Messages at the head of `queue` that must be written one per transaction: they were in
    /// a batch the database refused, and each must succeed or fail on its own.
    isolate: usize,
}

impl PersistenceActor {
    pub fn new(pool: DbPool, registry: ChannelRegistry, batch_max_rows: usize) -> Self {
        PersistenceActor {
            pool,
            registry,
            queue: VecDeque::new(),
            writing: false,
            batch_max_rows: batch_max_rows.max(1),
            isolate: 0,
        }
    }

    /// Starts writing the next batch unless one is in flight.
    fn write_next_batch(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.queue.is_empty() {
            return;
        }
        self.writing = true;
        let size = if self.isolate > 0 {
            self.isolate -= 1;
            1
        } else {
            self.queue.len().min(self.batch_max_rows)
        };
        let (batch, replies): (Vec<NewMessage>, Vec<Reply>) = self
            .queue
            .drain(..size)
            .map(|p| (p.message, p.reply))
            .unzip();
        let pool = self.pool.clone();
        let started = Instant::now();
        let write = async move {
            let created_at = commit_timestamp();
            let result = match pool.get().await {
                Ok(mut conn) => queries::commit_batch(&mut conn, &batch, created_at)
                    .await
                    .map_err(WriteError::Database),
                Err(e) => Err(WriteError::Pool(e.to_string())),
            };
            (batch, created_at, result)
        };
        ctx.spawn(
            write
                .into_actor(self)
                .map(move |(batch, created_at, result), act, ctx| {
                    act.writing = false;
                    log::debug!(
                        "batch of {} written in {:?}",
                        batch.len(),
                        started.elapsed()
                    );
                    match result {
                        Ok(outcomes) => act.dispatch(batch, replies, outcomes, created_at),
                        Err(WriteError::Database(e)) if batch.len() > 1 && is_data_error(&e) => {
                            // One message the database refuses must not cost the others theirs:
                            // write the batch again, one message per transaction.
                            log::warn!(
                                "a batch of {} was refused ({e}); retrying each message alone",
                                batch.len()
                            );
                            act.isolate += batch.len();
                            for (message, reply) in batch.into_iter().zip(replies).rev() {
                                act.queue.push_front(Persist { message, reply });
                            }
                        }
                        Err(e) => {
                            log::warn!("a batch of {} could not be stored: {e}", batch.len());
                            let rejection = e.rejection();
                            for (message, reply) in batch.into_iter().zip(replies) {
                                reply.settle(Settlement::Failed {
                                    rejection: rejection.clone(),
                                    client_msg_id: message.client_msg_id,
                                });
                            }
                        }
                    }
                    act.write_next_batch(ctx);
                }),
        );
    }

    /// Hands a committed batch to the channels, grouped by project, in seq order.
    fn dispatch(
        &mut self,
        batch: Vec<NewMessage>,
        replies: Vec<Reply>,
        outcomes: Vec<Outcome>,
        created_at: DateTime<Utc>,
    ) {
        let mut resolved: Vec<Option<StoredMessage>> = Vec::with_capacity(batch.len());
        // Per project: the head just before this batch (the first new seq - 1) and the items.
        let mut per_project: HashMap<Uuid, (Option<i64>, Vec<CommittedItem>)> = HashMap::new();
        for ((message, reply), outcome) in batch.into_iter().zip(replies).zip(outcomes) {
            let (settled, client_msg_id) = match outcome {
                Outcome::Stored(seq) => (Some((message.into_stored(seq, created_at), false)), None),
                Outcome::Duplicate(existing) => (Some((*existing, true)), message.client_msg_id),
                Outcome::SameAs(first) => (
                    resolved.get(first).cloned().flatten().map(|m| (m, true)),
                    message.client_msg_id,
                ),
                Outcome::ProjectMissing => (None, message.client_msg_id),
            };
            let Some((stored, duplicate)) = settled else {
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
            let entry = per_project.entry(stored.project_id).or_default();
            if !duplicate && entry.0.is_none() {
                entry.0 = Some(stored.seq - 1);
            }
            // Only a message with a client_msg_id can be the original of a later retry.
            resolved.push(stored.client_msg_id.is_some().then(|| stored.clone()));
            entry.1.push(CommittedItem {
                message: stored,
                duplicate,
                reply,
            });
        }
        for (project_id, (head_before, items)) in per_project {
            if let Some(head_before) = head_before {
                // A channel started here starts before this batch, so that a session joining
                // it now receives the batch live rather than missing it.
                self.registry
                    .get_or_start(project_id, head_before)
                    .do_send(Committed { items });
            } else if let Some(channel) = self.registry.get(project_id) {
                channel.do_send(Committed { items });
            } else {
                // Only retries, and nobody connected to the project: settle them here.
                for item in items {
                    item.reply.settle(Settlement::Stored(item.message));
                }
            }
        }
    }
}

impl Actor for PersistenceActor {
    type Context = Context<Self>;
}

impl Handler<Persist> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, persist: Persist, ctx: &mut Self::Context) {
        self.queue.push_back(persist);
        self.write_next_batch(ctx);
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
