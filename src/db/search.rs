//! Full-text search, kept off the commit path.
//!
//! Storing a message does not index its words: the search indexer (`SearchIndexActor`)
//! writes the documents of newly committed messages into `message_search` in large batches
//! shortly afterwards, and records per project how far it got. The words are found by the
//! broker ([`crate::domain::words`]), so PostgreSQL only stores a document and adds it to
//! the GIN index. A search first indexes whatever of its project the indexer has not reached
//! yet ([`index_project`]), then looks in the index alone: it finds every message stored
//! before it began, whatever the indexer's lag; the lag only decides how much the search
//! indexes itself.

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::db::prepared::PrepareOnce;
use crate::domain::words;

/// The advisory lock key an indexing pass holds for its transaction (fixed, arbitrary).
const INDEXER_LOCK: i64 = 0x0061_6765_6e74_6275;

/// The most content one pass reads, in bytes (it holds it in memory to find the words): a
/// pass stops at the message that crosses it, and the next one goes on from there.
pub const PASS_CONTENT_BYTES: i64 = 8 * 1024 * 1024;

/// PostgreSQL's `tsvector` (its type OIDs are fixed), written in its binary format.
#[derive(diesel::sql_types::SqlType, diesel::query_builder::QueryId)]
#[diesel(postgres_type(oid = 3614, array_oid = 3643))]
pub struct TsVector;

/// A search document: distinct words sorted by their bytes, no positions
/// ([`words::document`]). Sent in binary, so PostgreSQL only checks it (`tsvectorrecv`)
/// instead of parsing a literal: the text form took it 8 µs a document.
#[derive(Debug, diesel::expression::AsExpression)]
#[diesel(sql_type = TsVector)]
pub struct Document(pub Vec<String>);

impl diesel::serialize::ToSql<TsVector, diesel::pg::Pg> for Document {
    fn to_sql<'b>(
        &'b self,
        out: &mut diesel::serialize::Output<'b, '_, diesel::pg::Pg>,
    ) -> diesel::serialize::Result {
        use std::io::Write;
        // The lexeme count, then each lexeme NUL-terminated with its count of positions (0).
        // Lexemes are alphanumeric (no NUL) and at most words::MAX_WORD_BYTES long.
        let count = i32::try_from(self.0.len())?;
        out.write_all(&count.to_be_bytes())?;
        for word in &self.0 {
            out.write_all(word.as_bytes())?;
            out.write_all(&[0, 0, 0])?;
        }
        Ok(diesel::serialize::IsNull::No)
    }
}

/// What one indexing pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexPass {
    /// Documents written.
    pub documents: i64,
    /// Some project has more to index than one pass takes.
    pub more: bool,
}

/// One message a pass indexes, and its project's range.
#[derive(QueryableByName)]
struct Pending {
    #[diesel(sql_type = SqlUuid)]
    project_id: Uuid,
    /// The end of the project's range in this pass.
    #[diesel(sql_type = BigInt)]
    upto: i64,
    /// Every message of the project's range is in this pass (none stopped at the byte budget).
    #[diesel(sql_type = Bool)]
    whole: bool,
    /// The project's range holds more than a pass takes.
    #[diesel(sql_type = Bool)]
    full: bool,
    /// Some message of this pass's ranges did not fit in the byte budget.
    #[diesel(sql_type = Bool)]
    cut: bool,
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    content: Option<String>,
}

/// Indexes up to `per_project` not-yet-indexed messages of every project (and at most
/// [`PASS_CONTENT_BYTES`] of content in all), in one transaction with the progress it records.
/// Safe to run from several brokers at once: a pass that finds another one running (its
/// transaction-level advisory lock) does nothing, and progress only moves forward. A pass
/// whose snapshot is taken just before another commits, and its lock just after, indexes that
/// range again: harmless, since a search collects matching seqs and returns each message once.
pub async fn index_pending(
    conn: &mut AsyncPgConnection,
    per_project: i64,
) -> QueryResult<IndexPass> {
    conn.transaction(async |conn| pass(conn, per_project, None).await)
        .await
}

/// Indexes everything of one project stored so far, in passes of up to `per_project`
/// messages, waiting for a pass of the indexer that holds the lock: what a search does first.
pub async fn index_project(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    per_project: i64,
) -> QueryResult<i64> {
    // Most searches find their project indexed: one read, no transaction, no lock.
    #[derive(QueryableByName)]
    struct Behind {
        #[diesel(sql_type = Bool)]
        behind: bool,
    }
    let behind: Option<Behind> = diesel::sql_query(
        "SELECT p.head_seq > COALESCE(s.indexed_seq, 0) AS behind \
         FROM projects p LEFT JOIN message_search_progress s ON s.project_id = p.id \
         WHERE p.id = $1",
    )
    .bind::<SqlUuid, _>(project_id)
    .prepared()
    .get_result(conn)
    .await
    .optional()?;
    if !behind.is_some_and(|b| b.behind) {
        return Ok(0);
    }
    let mut documents = 0;
    loop {
        let done = conn
            .transaction(async |conn| {
                diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                    .bind::<BigInt, _>(INDEXER_LOCK)
                    .prepared()
                    .execute(conn)
                    .await?;
                pass(conn, per_project, Some(project_id)).await
            })
            .await?;
        documents += done.documents;
        if !done.more {
            return Ok(documents);
        }
    }
}

/// One pass, inside the caller's transaction: read the pending messages' content, find their
/// words, write their documents and the progress.
async fn pass(
    conn: &mut AsyncPgConnection,
    per_project: i64,
    project: Option<Uuid>,
) -> QueryResult<IndexPass> {
    // The LIMIT keeps the lateral subquery from being flattened into a join, which the
    // planner would run as a scan of the whole table; this way each project is one range of
    // the (project_id, seq) index. Everything up to a project's committed head_seq is stored
    // (seqs are allocated in the transaction that inserts the rows), so (indexed_seq, upto]
    // has no holes; a range with no row at all (there is none) still moves on. The sizes are
    // read first, without the content (`octet_length` reads a stored value's header), so that
    // only what fits in the byte budget is fetched. The advisory lock is reentrant: a search
    // that waited for it takes it again here.
    let pending: Vec<Pending> = diesel::sql_query(
        "WITH lag AS MATERIALIZED ( \
           SELECT p.id, COALESCE(s.indexed_seq, 0) AS after, \
                  LEAST(p.head_seq, COALESCE(s.indexed_seq, 0) + $1) AS upto \
           FROM projects p LEFT JOIN message_search_progress s ON s.project_id = p.id \
           WHERE p.head_seq > COALESCE(s.indexed_seq, 0) \
             AND ($3::uuid IS NULL OR p.id = $3) \
             AND pg_try_advisory_xact_lock($2)), \
         sized AS ( \
           SELECT lag.id, lag.upto, lag.upto - lag.after >= $1 AS full, a.seq, \
                  sum(COALESCE(a.len, 0)) OVER (ORDER BY lag.id, a.seq) \
                    - COALESCE(a.len, 0) AS before \
           FROM lag LEFT JOIN LATERAL ( \
             SELECT seq, octet_length(content)::int8 AS len FROM agent_messages \
             WHERE project_id = lag.id AND seq > lag.after AND seq <= lag.upto \
             ORDER BY seq LIMIT $1) AS a ON true), \
         marked AS ( \
           SELECT *, bool_and(before < $4) OVER (PARTITION BY id) AS whole, \
                  bool_or(before >= $4) OVER () AS cut FROM sized) \
         SELECT k.id AS project_id, k.upto, k.whole, k.full, k.cut, k.seq, m.content \
         FROM marked k LEFT JOIN agent_messages m ON m.project_id = k.id AND m.seq = k.seq \
         WHERE k.before < $4 \
         ORDER BY k.id, k.seq",
    )
    .bind::<BigInt, _>(per_project)
    .bind::<BigInt, _>(INDEXER_LOCK)
    .bind::<Nullable<SqlUuid>, _>(project)
    .bind::<BigInt, _>(PASS_CONTENT_BYTES)
    .prepared()
    .load(conn)
    .await?;
    if pending.is_empty() {
        return Ok(IndexPass::default());
    }

    let (mut doc_projects, mut doc_seqs, mut documents) = (Vec::new(), Vec::new(), Vec::new());
    let (mut progress_projects, mut progress_seqs) = (Vec::<Uuid>::new(), Vec::<i64>::new());
    let mut more = false;
    for row in &pending {
        if let (Some(seq), Some(content)) = (row.seq, &row.content) {
            doc_projects.push(row.project_id);
            doc_seqs.push(seq);
            documents.push(Document(words::document(content)));
        }
        // How far the project got: its whole range, or up to its last message that fitted.
        let reached = if row.whole {
            row.upto
        } else {
            row.seq.unwrap_or(0)
        };
        more |= row.full || row.cut;
        if progress_projects.last() == Some(&row.project_id) {
            if let Some(last) = progress_seqs.last_mut() {
                *last = (*last).max(reached);
            }
        } else {
            progress_projects.push(row.project_id);
            progress_seqs.push(reached);
        }
    }
    let written = documents.len();
    diesel::sql_query(
        "WITH documents AS ( \
           INSERT INTO message_search (project_id, seq, document) \
           SELECT * FROM unnest($1::uuid[], $2::int8[], $3::tsvector[])) \
         INSERT INTO message_search_progress (project_id, indexed_seq) \
         SELECT * FROM unnest($4::uuid[], $5::int8[]) \
         ON CONFLICT (project_id) DO UPDATE \
           SET indexed_seq = GREATEST(message_search_progress.indexed_seq, EXCLUDED.indexed_seq)",
    )
    .bind::<Array<SqlUuid>, _>(doc_projects)
    .bind::<Array<BigInt>, _>(doc_seqs)
    .bind::<Array<TsVector>, _>(documents)
    .bind::<Array<SqlUuid>, _>(progress_projects)
    .bind::<Array<BigInt>, _>(progress_seqs)
    .prepared()
    .execute(conn)
    .await?;
    Ok(IndexPass {
        documents: i64::try_from(written).unwrap_or(i64::MAX),
        more,
    })
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
