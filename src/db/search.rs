//! Full-text search, kept off the commit path.
//!
//! Storing a message does not index its words: the search indexer (`SearchIndexActor`)
//! copies the documents of newly committed messages into `message_search` in large batches
//! shortly afterwards, and records per project how far it got. A search looks in the index
//! for what is indexed and tokenises the remaining tail directly, so it finds every stored
//! message whatever the indexer's lag; the lag only decides how much of the tail is read.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::db::prepared::PrepareOnce;

/// The advisory lock key an indexing pass holds for its transaction (fixed, arbitrary).
const INDEXER_LOCK: i64 = 0x0061_6765_6e74_6275;

/// What one indexing pass did.
#[derive(QueryableByName, Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexPass {
    /// Documents written.
    #[diesel(sql_type = BigInt)]
    pub documents: i64,
    /// Some project has more to index than one pass takes.
    #[diesel(sql_type = Bool)]
    pub more: bool,
}

/// Indexes up to `per_project` not-yet-indexed messages of every project, in one statement
/// (so in one transaction, and atomic with the progress it records). Safe to run from several
/// brokers at once: a pass that finds another one running (its transaction-level advisory
/// lock) does nothing, and progress only moves forward. A pass whose snapshot is taken just
/// before another commits, and its lock just after, indexes that range again: harmless, since
/// a search collects matching seqs and returns each message once.
pub async fn index_pending(
    conn: &mut AsyncPgConnection,
    per_project: i64,
) -> QueryResult<IndexPass> {
    // The LIMIT keeps the lateral subquery from being flattened into a join, which the
    // planner would run as a scan of the whole table; this way each project is one range of
    // the (project_id, seq) index.
    // Everything up to a project's committed head_seq is stored (seqs are allocated in the
    // transaction that inserts the rows), so (indexed_seq, upto] has no holes. PostgreSQL runs
    // every data-modifying CTE once, referenced or not.
    diesel::sql_query(
        "WITH lag AS MATERIALIZED ( \
           SELECT p.id, COALESCE(s.indexed_seq, 0) AS after, \
                  LEAST(p.head_seq, COALESCE(s.indexed_seq, 0) + $1) AS upto \
           FROM projects p LEFT JOIN message_search_progress s ON s.project_id = p.id \
           WHERE p.head_seq > COALESCE(s.indexed_seq, 0) \
             AND pg_try_advisory_xact_lock($2)), \
         documents AS ( \
           INSERT INTO message_search (project_id, seq, document) \
           SELECT a.project_id, a.seq, to_tsvector('simple', a.content) \
           FROM lag CROSS JOIN LATERAL ( \
             SELECT project_id, seq, content FROM agent_messages \
             WHERE project_id = lag.id AND seq > lag.after AND seq <= lag.upto \
             ORDER BY seq LIMIT $1) AS a \
           RETURNING 1), \
         progress AS ( \
           INSERT INTO message_search_progress (project_id, indexed_seq) \
           SELECT id, upto FROM lag \
           ON CONFLICT (project_id) DO UPDATE \
             SET indexed_seq = GREATEST(message_search_progress.indexed_seq, EXCLUDED.indexed_seq)) \
         SELECT (SELECT count(*) FROM documents) AS documents, \
                COALESCE((SELECT bool_or(upto - after >= $1) FROM lag), false) AS more",
    )
    .bind::<BigInt, _>(per_project)
    .bind::<BigInt, _>(INDEXER_LOCK)
    .prepared()
    .get_result(conn)
    .await
}

/// The project's messages up to this seq have their search document.
pub async fn indexed_seq(conn: &mut AsyncPgConnection, project_id: Uuid) -> QueryResult<i64> {
    use crate::schema::message_search_progress::dsl as p;
    let seq = p::message_search_progress
        .filter(p::project_id.eq(project_id))
        .select(p::indexed_seq)
        .first::<i64>(conn)
        .await
        .optional()?;
    Ok(seq.unwrap_or(0))
}

/// How many stored messages are not indexed yet, over all projects.
pub async fn index_lag(conn: &mut AsyncPgConnection) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Lag {
        #[diesel(sql_type = BigInt)]
        lag: i64,
    }
    let lag: Lag = diesel::sql_query(
        "SELECT COALESCE(sum(p.head_seq - COALESCE(s.indexed_seq, 0)), 0)::int8 AS lag \
         FROM projects p LEFT JOIN message_search_progress s ON s.project_id = p.id",
    )
    .get_result(conn)
    .await?;
    Ok(lag.lag)
}
