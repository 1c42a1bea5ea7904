//! `SearchIndexActor`: writes the full-text documents of committed messages, off the commit
//! path (see `db::search`).
//!
//! Told by the persistence actor that something was committed ([`IndexSoon`]), it indexes
//! what was committed since in one pass (a transaction: read the content, find the words in
//! the broker, write the documents) of up to [`PER_PASS`] messages per project;
//! while a pass comes back full it goes on at once. A pass starts once [`INDEX_ROWS`]
//! messages wait (checked every [`INDEX_EVERY`]), or [`INDEX_WITHIN`] after the first of
//! them was committed. Under load that turns thousands of small index insertions per second
//! into a few large ones, every 50 ms as before; at light load it is one pass a second
//! instead of one per message or two (each pass costs PostgreSQL about half a millisecond,
//! mostly planning, whatever it indexes); at rest it does nothing. It also runs once at
//! start, for what was stored before.
//!
//! With several brokers on one database, only the one holding the `search` duty indexes
//! ([`Indexing`]); it is told of the other nodes' commits by their notifications.

use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::db::search::{self, IndexPass};
use crate::db::DbPool;

/// How often the indexer looks whether a pass is due. Searches do not depend on how soon a
/// message gets its document (a search indexes its project's unindexed tail itself), only
/// how much of it a search has to index.
const INDEX_EVERY: Duration = Duration::from_millis(50);
/// Messages waiting that make a pass due at the next look. Under load (hundreds of messages
/// per 50 ms) passes stay 50 ms apart: longer passes stall the commits behind them more
/// (docs/PERFORMANCE.md, second round).
const INDEX_ROWS: usize = 200;
/// The longest a committed message waits for its pass, however few wait with it.
const INDEX_WITHIN: Duration = Duration::from_secs(1);
/// Most messages per project in one pass (one transaction).
const PER_PASS: i64 = 5_000;

pub struct SearchIndexActor {
    pool: DbPool,
    /// A pass is in flight; the next one starts when it is done.
    indexing: bool,
    /// When the next pass is due, if something may be left to index: messages were
    /// committed since the last pass started, or a pass failed.
    due: Option<Instant>,
    /// Messages committed since the last pass started (as told: a lower bound of what waits).
    waiting: usize,
    /// This broker is the one that indexes (one per database).
    active: bool,
}

impl SearchIndexActor {
    pub fn new(pool: DbPool) -> Self {
        SearchIndexActor {
            pool,
            indexing: false,
            due: Some(Instant::now()),
            waiting: 0,
            active: false,
        }
    }

    /// Makes a pass due by `at`, unless one is due sooner.
    fn due_by(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }

    fn index(&mut self, ctx: &mut Context<Self>) {
        if self.indexing || !self.active || self.due.is_none_or(|due| due > Instant::now()) {
            return;
        }
        self.indexing = true;
        self.due = None;
        self.waiting = 0;
        let pool = self.pool.clone();
        let pass = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            search::index_pending(&mut conn, PER_PASS)
                .await
                .map_err(|e| e.to_string())
        };
        ctx.spawn(pass.into_actor(self).map(|result, act, ctx| {
            act.indexing = false;
            match result {
                Ok(IndexPass { more: true, .. }) => {
                    act.due_by(Instant::now());
                    act.index(ctx)
                }
                Ok(IndexPass { documents, .. }) => {
                    if documents > 0 {
                        log::trace!("indexed {documents} messages for search");
                    }
                }
                // Nothing is lost: the next pass starts where this one would have.
                Err(e) => {
                    act.due_by(Instant::now() + INDEX_WITHIN);
                    log::warn!("search indexing failed ({e}); retrying");
                }
            }
        }));
    }
}

impl Actor for SearchIndexActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(INDEX_EVERY, |act, ctx| act.index(ctx));
    }
}

/// This many messages were committed: index them soon.
#[derive(Message)]
#[rtype(result = "()")]
pub struct IndexSoon(pub usize);

impl Handler<IndexSoon> for SearchIndexActor {
    type Result = ();

    fn handle(&mut self, IndexSoon(rows): IndexSoon, _ctx: &mut Self::Context) {
        let now = Instant::now();
        self.waiting = self.waiting.saturating_add(rows);
        self.due_by(if self.waiting >= INDEX_ROWS {
            now
        } else {
            now + INDEX_WITHIN
        });
    }
}

/// Whether this broker indexes (it holds the `search` duty). Taking the duty over indexes
/// whatever the previous holder left.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Indexing(pub bool);

impl Handler<Indexing> for SearchIndexActor {
    type Result = ();

    fn handle(&mut self, Indexing(active): Indexing, ctx: &mut Self::Context) {
        if active && !self.active {
            self.due_by(Instant::now());
        }
        self.active = active;
        self.index(ctx);
    }
}
