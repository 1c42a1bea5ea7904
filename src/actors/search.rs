//! `SearchIndexActor`: writes the full-text documents of committed messages, off the commit
//! path (see `db::search`).
//!
//! Told by the persistence actor that something was committed ([`IndexSoon`]), it indexes
//! what was committed since, at most every [`INDEX_EVERY`], in one statement of up to
//! [`PER_PASS`] messages per project; while a pass comes back full it goes on at once. Under
//! load that turns thousands of small index insertions per second into a few large ones; at
//! rest it does nothing. It also runs once at start, for what was stored before.
//!
//! With several brokers on one database, only the one holding the `search` duty indexes
//! ([`Indexing`]); it is told of the other nodes' commits by their notifications.

use std::time::Duration;

use actix::prelude::*;

use crate::db::search::{self, IndexPass};
use crate::db::DbPool;

/// How long a stored message may wait for its document. Searches do not depend on it (they
/// read the unindexed tail directly), only how much tail there is to read.
const INDEX_EVERY: Duration = Duration::from_millis(50);
/// Most messages per project in one pass (one transaction).
const PER_PASS: i64 = 5_000;

pub struct SearchIndexActor {
    pool: DbPool,
    /// A pass is in flight; the next one starts when it is done.
    indexing: bool,
    /// Something may be left to index: messages were committed since the last pass started,
    /// or a pass failed.
    pending: bool,
    /// This broker is the one that indexes (one per database).
    active: bool,
}

impl SearchIndexActor {
    pub fn new(pool: DbPool) -> Self {
        SearchIndexActor {
            pool,
            indexing: false,
            pending: true,
            active: false,
        }
    }

    fn index(&mut self, ctx: &mut Context<Self>) {
        if self.indexing || !self.pending || !self.active {
            return;
        }
        self.indexing = true;
        self.pending = false;
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
                    act.pending = true;
                    act.index(ctx)
                }
                Ok(IndexPass { documents, .. }) => {
                    if documents > 0 {
                        log::trace!("indexed {documents} messages for search");
                    }
                }
                // Nothing is lost: the next pass starts where this one would have.
                Err(e) => {
                    act.pending = true;
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

/// Messages were committed: index them soon.
#[derive(Message)]
#[rtype(result = "()")]
pub struct IndexSoon;

impl Handler<IndexSoon> for SearchIndexActor {
    type Result = ();

    fn handle(&mut self, _: IndexSoon, _ctx: &mut Self::Context) {
        self.pending = true;
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
            self.pending = true;
        }
        self.active = active;
        self.index(ctx);
    }
}
