//! The hot path: storing a group-commit batch in one transaction, whatever its size.
//!
//! In order, inside the transaction:
//! 1. retries are recognised by their client_msg_id (they get the original back): by the
//!    unique index, and when it objects by looking them up (see [`commit_batch`]);
//! 2. replies are linked to the request they answer and addressed to its sender;
//! 3. each project's seqs are allocated (`UPDATE projects SET head_seq = head_seq + n`), so a
//!    batch that rolls back gives its numbers back and seqs stay dense; the row lock taken
//!    there makes seq order equal commit order;
//! 4. the rows go in with one `INSERT ... SELECT FROM unnest(...)`: one bind parameter per
//!    column however many rows (a multi-row VALUES list hits PostgreSQL's 65535-parameter
//!    limit at a few thousand rows);
//! 5. bookkeeping that only some batches need: recipients of direct messages become members,
//!    answered requests are marked, sends that nobody can receive are flagged, and requests
//!    nobody can receive are dead-lettered.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Bool, Int2, Int4, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::db::prepared::PrepareOnce;
use crate::models::{NewMessage, ReplyLink, StoredMessage};
use crate::schema::dead_letters;

/// What became of one message of a batch.
#[derive(Debug)]
pub enum Outcome {
    /// Stored now with this seq. `no_recipient`: nobody can receive it (see
    /// `ErrorCode::NoRecipient`).
    Stored { seq: i64, no_recipient: bool },
    /// A retry: a message with the same (project, sender, client_msg_id) was already stored;
    /// this is that message, and nothing new was written. `no_recipient`: it is a request
    /// that was dead-lettered for want of a recipient, which the retry is told again.
    Duplicate {
        message: Box<StoredMessage>,
        no_recipient: bool,
    },
    /// A retry of the message at this earlier index of the same batch.
    SameAs(usize),
    /// The project does not exist (any more); nothing was written.
    ProjectMissing,
    /// The broker's timeout response to a request that was answered meanwhile: not stored.
    Skipped,
}

#[derive(QueryableByName)]
struct Head {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = BigInt)]
    head_seq: i64,
}

/// The unique index that recognises a retried send.
const RETRY_INDEX: &str = "idx_agent_messages_client_msg_id";

/// Stores a batch and returns one outcome per message, in batch order. Replies in the batch
/// are completed in place (recipient, reply link) before they are stored.
///
/// Retries of messages stored by an earlier batch are rare (a client resending after a lost
/// connection), so the batch is first written assuming there are none, without looking for
/// them: the unique index on (project, sender, client_msg_id) is the arbiter. If it objects,
/// that transaction rolls back (its seqs with it) and the batch is written again, looking
/// up every client_msg_id first.
pub async fn commit_batch(
    conn: &mut AsyncPgConnection,
    batch: &mut [NewMessage],
    created_at: DateTime<Utc>,
) -> QueryResult<Vec<Outcome>> {
    commit_batch_on(conn, batch, created_at, None).await
}

/// [`commit_batch`] by a broker node: with `node`, the transaction also notifies the other
/// nodes of each project's new seqs (`db::cluster::COMMITS`), delivered with the commit.
pub async fn commit_batch_on(
    conn: &mut AsyncPgConnection,
    batch: &mut [NewMessage],
    created_at: DateTime<Utc>,
    node: Option<&str>,
) -> QueryResult<Vec<Outcome>> {
    let mut attempt = 1;
    loop {
        let batch_ref = &mut *batch;
        let result = match store_batch(conn, batch_ref, created_at, false, node).await {
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                info,
            )) if info.constraint_name() == Some(RETRY_INDEX) => {
                store_batch(conn, batch, created_at, true, node).await
            }
            result => result,
        };
        match result {
            // Brokers sharing the database lock rows of the same projects and members in
            // their own orders; PostgreSQL breaks the rare cycle by aborting one transaction,
            // which gave everything back: it is written again.
            Err(e) if is_deadlock(&e) && attempt < DEADLOCK_ATTEMPTS => {
                log::info!(
                    "a batch was aborted to break a deadlock with another broker; writing it again"
                );
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// How many times a batch is written when PostgreSQL aborts it to break a deadlock.
const DEADLOCK_ATTEMPTS: usize = 5;

/// PostgreSQL aborted the transaction to break a deadlock (SQLSTATE 40P01).
fn is_deadlock(e: &diesel::result::Error) -> bool {
    matches!(e, diesel::result::Error::DatabaseError(_, info) if info.message().contains("deadlock detected"))
}

/// [`commit_batch`] in one transaction; `look_for_retries`: whether to look up the batch's
/// client_msg_ids among the stored messages first.
async fn store_batch(
    conn: &mut AsyncPgConnection,
    batch: &mut [NewMessage],
    created_at: DateTime<Utc>,
    look_for_retries: bool,
    node: Option<&str>,
) -> QueryResult<Vec<Outcome>> {
    // Other brokers commit to the same projects: a batch for several projects locks their
    // head rows in id order first (below), which the pipelined path does not do.
    if !look_for_retries && is_plain(batch) && (node.is_none() || single_project(batch)) {
        return store_plain_batch(conn, batch, created_at, node).await;
    }
    crate::db::generic_plan_transaction(conn, async move |conn| {
        let claimed = claim_timeouts(conn, batch, created_at).await?;
        // Linking is idempotent: run again on a rewritten batch, it finds the same requests.
        let links = link_replies(conn, batch, created_at, &claimed).await?;
        let batch = &*batch;
        let existing = if look_for_retries {
            find_retries(conn, batch).await?
        } else {
            HashMap::new()
        };

        let (mut plan, new_per_project) = plan_outcomes(batch, &existing, &links.skipped);

        // Allocate seqs: each project's new messages get head+1 ..= head+n, in batch order.
        let mut next_seq: HashMap<Uuid, i64> = HashMap::with_capacity(new_per_project.len());
        if !new_per_project.is_empty() {
            let (ids, counts): (Vec<Uuid>, Vec<i64>) =
                new_per_project.iter().map(|(k, v)| (*k, *v)).unzip();
            if node.is_some() && ids.len() > 1 {
                // Other brokers commit to the same projects: their head rows are locked in
                // one order (by id) by every broker, so two batches never wait on each other
                // in a cycle. The lock is the one the UPDATE below takes (NO KEY UPDATE),
                // which leaves foreign-key checks (the search indexer's progress rows) alone.
                diesel::sql_query(
                    "SELECT id FROM projects WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
                )
                .bind::<Array<SqlUuid>, _>(&ids)
                .prepared()
                .execute(conn)
                .await?;
            }
            let heads = advance_heads(&*conn, &ids, &counts, node).await?;
            for head in heads {
                let n = new_per_project[&head.id];
                next_seq.insert(head.id, head.head_seq - n + 1);
            }
        }

        // Assign seqs and gather the columns of the rows to insert.
        let mut cols = Columns::with_capacity(batch.len());
        for (msg, outcome) in batch.iter().zip(plan.iter_mut()) {
            if let Outcome::Stored { seq, .. } = outcome {
                match next_seq.get_mut(&msg.project_id) {
                    Some(next) => {
                        *seq = *next;
                        *next += 1;
                        cols.push(msg, *seq, created_at);
                    }
                    None => *outcome = Outcome::ProjectMissing,
                }
            }
        }
        if cols.id.is_empty() {
            return Ok(plan);
        }
        cols.insert(&*conn, INSERT_WITH_SEQS, created_at).await?;
        crate::db::tasks::open_committed(conn, batch, &plan, created_at).await?;
        cols.ensure_recipients(conn).await?;
        mark_answered(conn, &links.answered, created_at).await?;
        flag_unreachable(conn, batch, &mut plan, created_at).await?;
        Ok(plan)
    })
    .await
}

/// What becomes of each message of a batch before anything is written, and how many new
/// messages each project gets: a retry of a message stored earlier (`existing`) or earlier
/// in the same batch gets that message, a skipped timeout response nothing, and every other
/// message is to be stored (its seq still 0).
fn plan_outcomes<'b>(
    batch: &'b [NewMessage],
    existing: &HashMap<(Uuid, &'b str, &'b str), (StoredMessage, bool)>,
    skipped: &[usize],
) -> (Vec<Outcome>, HashMap<Uuid, i64>) {
    // The first occurrence of each client_msg_id within the batch (a client may retry before
    // its first attempt committed).
    let mut first_in_batch: HashMap<(Uuid, &str, &str), usize> = HashMap::new();
    let mut plan: Vec<Outcome> = Vec::with_capacity(batch.len());
    let mut new_per_project: HashMap<Uuid, i64> = HashMap::new();
    for (index, msg) in batch.iter().enumerate() {
        if skipped.contains(&index) {
            plan.push(Outcome::Skipped);
            continue;
        }
        if let Some(cmid) = msg.client_msg_id.as_deref() {
            let key = (msg.project_id, msg.sender_agent_id.as_str(), cmid);
            if let Some((stored, no_recipient)) = existing.get(&key) {
                plan.push(Outcome::Duplicate {
                    message: Box::new(stored.clone()),
                    no_recipient: *no_recipient,
                });
                continue;
            }
            if let Some(&first) = first_in_batch.get(&key) {
                plan.push(Outcome::SameAs(first));
                continue;
            }
            first_in_batch.insert(key, index);
        }
        *new_per_project.entry(msg.project_id).or_default() += 1;
        plan.push(Outcome::Stored {
            seq: 0,
            no_recipient: false,
        });
    }
    (plan, new_per_project)
}

/// Moves each project's `head_seq` on by its count and returns the new heads. With `node`,
/// PostgreSQL also notifies the other nodes of each project's new seqs (node, project, seq
/// range) when the transaction commits, and not before. On a shared connection, so that it
/// can be pipelined ([`store_plain_batch`]).
async fn advance_heads(
    mut conn: &AsyncPgConnection,
    ids: &[Uuid],
    counts: &[i64],
    node: Option<&str>,
) -> QueryResult<Vec<Head>> {
    match node {
        None => {
            diesel::sql_query(
                "UPDATE projects AS p SET head_seq = p.head_seq + c.n \
                 FROM unnest($1::uuid[], $2::int8[]) AS c(id, n) \
                 WHERE p.id = c.id RETURNING p.id, p.head_seq",
            )
            .bind::<Array<SqlUuid>, _>(ids)
            .bind::<Array<BigInt>, _>(counts)
            .prepared()
            .load(&mut conn)
            .await
        }
        Some(node) => {
            diesel::sql_query(
                "WITH h AS (UPDATE projects AS p SET head_seq = p.head_seq + c.n \
                   FROM unnest($1::uuid[], $2::int8[]) AS c(id, n) \
                   WHERE p.id = c.id RETURNING p.id, p.head_seq, c.n) \
                 SELECT h.id, h.head_seq, pg_notify($3, $4 || ' ' || h.id || ' ' || \
                   (h.head_seq - h.n + 1) || ' ' || h.head_seq) AS notified FROM h",
            )
            .bind::<Array<SqlUuid>, _>(ids)
            .bind::<Array<BigInt>, _>(counts)
            .bind::<Text, _>(crate::db::cluster::COMMITS)
            .bind::<Text, _>(node)
            .prepared()
            .load(&mut conn)
            .await
        }
    }
}

/// Runs one constant statement on a shared connection (to be pipelined).
async fn run_on(mut conn: &AsyncPgConnection, sql: &'static str) -> QueryResult<usize> {
    diesel::sql_query(sql).prepared().execute(&mut conn).await
}

/// Whether every message of the batch is for one project.
fn single_project(batch: &[NewMessage]) -> bool {
    batch
        .first()
        .is_none_or(|first| batch.iter().all(|m| m.project_id == first.project_id))
}

/// Whether a batch holds only plain broadcasts: no direct or typed message, no request, reply,
/// timeout response, correlation id or task. Such a batch needs nothing but its seqs and its
/// rows, and is written by [`store_plain_batch`].
fn is_plain(batch: &[NewMessage]) -> bool {
    batch.iter().all(|m| {
        m.timeout_of.is_none()
            && m.reply_to.is_none()
            && m.reply.is_none()
            && m.correlation_id.is_none()
            && m.recipient_agent_id.is_none()
            && m.recipient_agent_type.is_none()
            && m.reply_timeout_ms.is_none()
            && m.task.is_none()
    })
}

/// A batch of plain broadcasts in one round trip: `BEGIN`, `SET LOCAL` (generic plans, see
/// [`crate::db::generic_plan_transaction`]), the head update, the insert and `COMMIT` are
/// sent together and PostgreSQL runs them in order. Each row's seq is its project's new head
/// minus the number of that project's rows after it in the batch, which the insert reads
/// back from the row the update just wrote; so the seqs are those [`store_batch`] would give.
/// If a statement fails, the transaction is aborted and `COMMIT` rolls it back; the error is
/// returned as [`store_batch`] would return it (a retry's unique violation, a deadlock, a
/// refused value), and what the caller does with it is the same.
///
/// At one message per batch (light load) this is three round trips fewer per message.
///
/// Unlike diesel-async's own transactions, this one is not tracked by the connection's
/// transaction manager, so a future dropped half-way could return the connection to the
/// pool inside it. Once a connection has prepared the five statements, the first poll sends
/// all of them, `COMMIT` included, so only a connection's first plain batch has that window,
/// and the persistence actor drops a write only when it stops with the process.
async fn store_plain_batch(
    conn: &mut AsyncPgConnection,
    batch: &[NewMessage],
    created_at: DateTime<Utc>,
    node: Option<&str>,
) -> QueryResult<Vec<Outcome>> {
    let (mut plan, new_per_project) = plan_outcomes(batch, &HashMap::new(), &[]);
    if new_per_project.is_empty() {
        return Ok(plan);
    }
    // How many of its project's new rows come after each row, carried in the seq column.
    let mut left = new_per_project.clone();
    let mut cols = Columns::with_capacity(batch.len());
    for (msg, outcome) in batch.iter().zip(&plan) {
        if let Outcome::Stored { .. } = outcome {
            let after = left.entry(msg.project_id).or_default();
            *after -= 1;
            cols.push(msg, *after, created_at);
        }
    }
    let (ids, counts): (Vec<Uuid>, Vec<i64>) =
        new_per_project.iter().map(|(k, v)| (*k, *v)).unzip();
    let shared: &AsyncPgConnection = conn;
    // Polled in this order, so sent in this order (each statement's Parse too, the first
    // time a connection runs it).
    let (begin, generic, heads, inserted, commit) = futures_util::join!(
        run_on(shared, "BEGIN"),
        run_on(shared, "SET LOCAL plan_cache_mode = force_generic_plan"),
        advance_heads(shared, &ids, &counts, node),
        cols.insert(shared, INSERT_FROM_HEADS, created_at),
        run_on(shared, "COMMIT"),
    );
    // The first failure is the one to report: a later statement only failed because the
    // transaction was aborted by then (and `COMMIT` then rolled it back).
    begin?;
    generic?;
    let heads = heads?;
    inserted?;
    commit?;
    let heads: HashMap<Uuid, i64> = heads.into_iter().map(|h| (h.id, h.head_seq)).collect();
    let mut row = 0;
    for (msg, outcome) in batch.iter().zip(plan.iter_mut()) {
        if let Outcome::Stored { seq, .. } = outcome {
            match heads.get(&msg.project_id) {
                Some(head) => *seq = head - cols.seq[row],
                // A project deleted meanwhile: its rows had no head to join, none was stored.
                None => *outcome = Outcome::ProjectMissing,
            }
            row += 1;
        }
    }
    Ok(plan)
}

/// Messages already stored under the client_msg_ids this batch carries, by
/// (project, sender, client_msg_id).
/// The messages stored earlier that sends of this batch retry, by (project, sender,
/// client_msg_id), each with whether it was dead-lettered as `no_recipient`.
async fn find_retries<'b>(
    conn: &mut AsyncPgConnection,
    batch: &'b [NewMessage],
) -> QueryResult<HashMap<(Uuid, &'b str, &'b str), (StoredMessage, bool)>> {
    let mut keys: Vec<(Uuid, &str, &str)> = Vec::new();
    for msg in batch {
        if let Some(cmid) = &msg.client_msg_id {
            keys.push((msg.project_id, &msg.sender_agent_id, cmid));
        }
    }
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let projects: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
    let senders: Vec<&str> = keys.iter().map(|k| k.1).collect();
    let cmids: Vec<&str> = keys.iter().map(|k| k.2).collect();
    let found: Vec<StoredMessage> = diesel::sql_query(
        // One index probe per key, whatever the plan: `LIMIT 1` keeps the lateral subquery
        // from being flattened into a join the planner might run as a scan of the table.
        // Not prepared: it selects `*` (see `db::prepared`), and it only runs for retries.
        "SELECT m.* FROM unnest($1::uuid[], $2::text[], $3::text[]) AS k(project_id, sender, cmid) \
         CROSS JOIN LATERAL (SELECT * FROM agent_messages a \
           WHERE a.project_id = k.project_id AND a.sender_agent_id = k.sender \
             AND a.client_msg_id = k.cmid LIMIT 1) AS m",
    )
    .bind::<Array<SqlUuid>, _>(&projects)
    .bind::<Array<Text>, _>(&senders)
    .bind::<Array<Text>, _>(&cmids)
    .load(conn)
    .await?;
    // Retries of requests are told again that nobody could receive them (the first answer
    // may have been lost with its connection). Rare: only requests among the retries.
    let requests: Vec<Uuid> = found
        .iter()
        .filter(|m| m.expects_reply)
        .map(|m| m.id)
        .collect();
    let unreachable: HashSet<Uuid> = if requests.is_empty() {
        HashSet::new()
    } else {
        dead_letters::table
            .filter(dead_letters::message_id.eq_any(&requests))
            .filter(dead_letters::reason.eq("no_recipient"))
            .select(dead_letters::message_id)
            .load::<Uuid>(conn)
            .await?
            .into_iter()
            .collect()
    };
    let mut by_key = HashMap::with_capacity(found.len());
    for message in found {
        if let Some(&key) = keys.iter().find(|k| {
            k.0 == message.project_id
                && k.1 == message.sender_agent_id
                && Some(k.2) == message.client_msg_id.as_deref()
        }) {
            let no_recipient = unreachable.contains(&message.id);
            by_key.insert(key, (message, no_recipient));
        }
    }
    Ok(by_key)
}

/// A request, as replies need it.
#[derive(QueryableByName, Debug)]
struct Request {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    project_id: Uuid,
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    sender_agent_id: String,
    #[diesel(sql_type = Nullable<Text>)]
    correlation_id: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    reply_deadline: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    replied_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Links {
    /// Requests answered by this batch.
    answered: Vec<Uuid>,
    /// Indexes of timeout responses whose request was answered meanwhile.
    skipped: Vec<usize>,
}

/// How many of the newest requests sharing a correlation id a reply by correlation id is
/// matched against: the newest of them sent by another agent than the replier is the one it
/// answers. Bounded so that the single commit path does the same work however many requests
/// share an id (see docs/PROTOCOL.md, "Request and reply").
pub const CORRELATION_CANDIDATES: i64 = 16;

/// Claims the requests that the batch's timeout responses answer: sets their `replied_at`
/// now, under their row lock, unless a reply (or another timeout response, on this broker or
/// another one sharing the database) did first. Returns the requests claimed: a timeout
/// response for any other request is not stored. Taking the row lock first is what makes a
/// request time out once however many brokers try: the second claim waits for the first
/// transaction and then finds `replied_at` set.
async fn claim_timeouts(
    conn: &mut AsyncPgConnection,
    batch: &[NewMessage],
    at: DateTime<Utc>,
) -> QueryResult<HashSet<Uuid>> {
    let ids: Vec<Uuid> = batch.iter().filter_map(|m| m.timeout_of).collect();
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
    }
    let claimed: Vec<Claimed> = diesel::sql_query(
        "UPDATE agent_messages SET replied_at = $2 \
         WHERE id = ANY($1) AND expects_reply AND replied_at IS NULL RETURNING id",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
    .bind::<Timestamptz, _>(at)
    .prepared()
    .load(conn)
    .await?;
    Ok(claimed.into_iter().map(|c| c.id).collect())
}

/// Completes the replies of a batch: a message whose `reply_to` (or, failing that, whose
/// `correlation_id`) names a request becomes a direct message to the requester, whatever
/// its own `to` said, with the request's seq, the time since the request and whether the
/// deadline had passed.
async fn link_replies(
    conn: &mut AsyncPgConnection,
    batch: &mut [NewMessage],
    created_at: DateTime<Utc>,
    claimed: &HashSet<Uuid>,
) -> QueryResult<Links> {
    let mut ids: Vec<Uuid> = Vec::new();
    // Each (project, correlation id) once: many messages of a batch may carry the same one.
    let mut correlations: Vec<(Uuid, &str)> = Vec::new();
    for msg in batch.iter() {
        if let Some(id) = msg.timeout_of.or(msg.reply_to) {
            ids.push(id);
        } else if let (Some(c), None) = (&msg.correlation_id, msg.reply_timeout_ms) {
            correlations.push((msg.project_id, c));
        }
    }
    correlations.sort_unstable();
    correlations.dedup();
    if ids.is_empty() && correlations.is_empty() {
        return Ok(Links::default());
    }
    let (correlation_projects, correlation_ids): (Vec<Uuid>, Vec<&str>) =
        correlations.into_iter().unzip();
    // By id, one probe of the primary key each. By correlation id, only the newest
    // `CORRELATION_CANDIDATES` requests of the project with that id, read newest first from
    // `idx_agent_messages_request_correlation` (`LIMIT` in a lateral subquery keeps it one
    // bounded index scan per id): however many requests share an id, a match costs the same.
    let mut requests: Vec<Request> = diesel::sql_query(
        "SELECT id, project_id, seq, sender_agent_id, correlation_id, created_at, reply_deadline, replied_at \
         FROM agent_messages WHERE expects_reply AND id = ANY($1) \
         UNION \
         SELECT r.id, r.project_id, r.seq, r.sender_agent_id, r.correlation_id, r.created_at, \
                r.reply_deadline, r.replied_at \
         FROM unnest($2::uuid[], $3::text[]) AS k(project_id, correlation_id) \
         CROSS JOIN LATERAL (SELECT a.id, a.project_id, a.seq, a.sender_agent_id, \
             a.correlation_id, a.created_at, a.reply_deadline, a.replied_at FROM agent_messages a \
           WHERE a.expects_reply AND a.project_id = k.project_id \
             AND a.correlation_id = k.correlation_id \
           ORDER BY a.seq DESC LIMIT $4) AS r",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
    .bind::<Array<SqlUuid>, _>(&correlation_projects)
    .bind::<Array<Text>, _>(&correlation_ids)
    .bind::<BigInt, _>(CORRELATION_CANDIDATES)
    .prepared()
    .load(conn)
    .await?;
    requests.sort_unstable_by_key(|r| (r.project_id, r.seq));
    if requests.is_empty() {
        return Ok(Links::default());
    }
    let mut links = Links::default();
    for (index, msg) in batch.iter_mut().enumerate() {
        let request = if let Some(id) = msg.timeout_of.or(msg.reply_to) {
            requests
                .iter()
                .find(|r| r.id == id && r.project_id == msg.project_id)
        } else if msg.reply_timeout_ms.is_none() {
            // The newest request with this correlation id from someone else, among the newest
            // `CORRELATION_CANDIDATES` with that id.
            msg.correlation_id.as_deref().and_then(|c| {
                requests.iter().rev().find(|r| {
                    r.project_id == msg.project_id
                        && r.correlation_id.as_deref() == Some(c)
                        && r.sender_agent_id != msg.sender_agent_id
                })
            })
        } else {
            None
        };
        let Some(request) = request else { continue };
        let is_timeout = msg.timeout_of.is_some();
        // Answered before this batch (a `replied_at` this batch's own claim set does not
        // count).
        let answered_before = request.replied_at.is_some() && !claimed.contains(&request.id);
        if is_timeout && (!claimed.contains(&request.id) || links.answered.contains(&request.id)) {
            links.skipped.push(index);
            continue;
        }
        msg.recipient_agent_id = Some(request.sender_agent_id.clone());
        msg.recipient_agent_type = None;
        msg.reply_to = Some(request.id);
        if msg.correlation_id.is_none() {
            msg.correlation_id = request.correlation_id.clone();
        }
        msg.reply = Some(ReplyLink {
            in_reply_to_seq: request.seq,
            duration_ms: (created_at - request.created_at).num_milliseconds(),
            late: !is_timeout
                && request
                    .reply_deadline
                    .is_some_and(|deadline| created_at > deadline),
        });
        if !answered_before && !links.answered.contains(&request.id) {
            links.answered.push(request.id);
        }
    }
    Ok(links)
}

/// Requests answered by this batch (first reply, or the broker's timeout response).
async fn mark_answered(
    conn: &mut AsyncPgConnection,
    answered: &[Uuid],
    at: DateTime<Utc>,
) -> QueryResult<()> {
    if answered.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "UPDATE agent_messages SET replied_at = $2 WHERE id = ANY($1) AND replied_at IS NULL",
    )
    .bind::<Array<SqlUuid>, _>(answered)
    .bind::<Timestamptz, _>(at)
    .prepared()
    .execute(conn)
    .await
    .map(drop)
}

/// Flags new sends that nobody can receive: a direct message to an agent that never
/// connected, a message to a type no member has, a request broadcast to a project with no
/// other member. Such requests are dead-lettered at once (and count as answered, so no
/// timeout follows).
async fn flag_unreachable(
    conn: &mut AsyncPgConnection,
    batch: &[NewMessage],
    plan: &mut [Outcome],
    created_at: DateTime<Utc>,
) -> QueryResult<()> {
    let (mut index, mut projects, mut kinds, mut targets, mut senders) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, (msg, outcome)) in batch.iter().zip(plan.iter()).enumerate() {
        if !matches!(outcome, Outcome::Stored { .. }) || msg.reply.is_some() {
            continue;
        }
        let (kind, target) = match (&msg.recipient_agent_id, &msg.recipient_agent_type) {
            (Some(agent), _) => ("agent", agent.as_str()),
            (None, Some(agent_type)) => ("type", agent_type.as_str()),
            (None, None) if msg.reply_timeout_ms.is_some() => ("all", ""),
            (None, None) => continue,
        };
        index.push(i as i32);
        projects.push(msg.project_id);
        kinds.push(kind);
        targets.push(target);
        senders.push(msg.sender_agent_id.as_str());
    }
    if index.is_empty() {
        return Ok(());
    }
    #[derive(QueryableByName)]
    struct Unreachable {
        #[diesel(sql_type = Int4)]
        i: i32,
    }
    let unreachable: Vec<Unreachable> = diesel::sql_query(
        "SELECT t.i FROM unnest($1::int4[], $2::uuid[], $3::text[], $4::text[], $5::text[]) \
           AS t(i, p, kind, target, sender) \
         WHERE NOT EXISTS (SELECT 1 FROM members m \
           WHERE m.project_id = t.p AND m.joined_seq IS NOT NULL \
             AND (m.agent_id <> t.sender OR t.kind = 'agent') \
             AND ((t.kind = 'agent' AND m.agent_id = t.target) \
               OR (t.kind = 'type' AND m.agent_type = t.target) \
               OR t.kind = 'all'))",
    )
    .bind::<Array<Int4>, _>(&index)
    .bind::<Array<SqlUuid>, _>(&projects)
    .bind::<Array<Text>, _>(&kinds)
    .bind::<Array<Text>, _>(&targets)
    .bind::<Array<Text>, _>(&senders)
    .prepared()
    .load(conn)
    .await?;
    let mut dead: Vec<Uuid> = Vec::new();
    let mut dead_projects: Vec<Uuid> = Vec::new();
    for Unreachable { i } in unreachable {
        let i = i as usize;
        if let Outcome::Stored { no_recipient, .. } = &mut plan[i] {
            *no_recipient = true;
        }
        if batch[i].reply_timeout_ms.is_some() {
            dead.push(batch[i].id);
            dead_projects.push(batch[i].project_id);
        }
    }
    if !dead.is_empty() {
        diesel::sql_query(
            "INSERT INTO dead_letters (message_id, project_id, reason, dead_at) \
             SELECT m, p, 'no_recipient', $3 FROM unnest($1::uuid[], $2::uuid[]) AS t(m, p)",
        )
        .bind::<Array<SqlUuid>, _>(&dead)
        .bind::<Array<SqlUuid>, _>(&dead_projects)
        .bind::<Timestamptz, _>(created_at)
        .prepared()
        .execute(conn)
        .await?;
        mark_answered(conn, &dead, created_at).await?;
    }
    Ok(())
}

/// The columns [`Columns`] inserts, in the order of its bind parameters, `seq` third
/// (`$3`), then `created_at` (`$24`, one value for the batch).
macro_rules! message_columns {
    () => {
        "id, project_id, seq, sender_agent_id, sender_agent_type, sender_session_id, \
         recipient_agent_id, message_type, content, metadata, priority, correlation_id, \
         reply_to, client_msg_id, expires_at, recipient_agent_type, expects_reply, \
         reply_deadline, in_reply_to_seq, success, error, duration_ms, late"
    };
}

/// [`Columns`]' arrays as a relation `u` with the column names of [`message_columns`].
macro_rules! message_rows {
    () => {
        concat!(
            "unnest($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::text[], $6::uuid[], \
             $7::text[], $8::text[], $9::text[], $10::jsonb[], $11::int2[], $12::text[], \
             $13::uuid[], $14::text[], $15::timestamptz[], $16::text[], $17::bool[], \
             $18::timestamptz[], $19::int8[], $20::bool[], $21::text[], $22::int8[], \
             $23::bool[]) AS u(",
            message_columns!(),
            ")"
        )
    };
}

/// The rows with the seqs `Columns::seq` holds.
const INSERT_WITH_SEQS: &str = concat!(
    "INSERT INTO agent_messages (",
    message_columns!(),
    ", created_at) SELECT u.*, $24 FROM ",
    message_rows!()
);

/// The rows of [`store_plain_batch`]: `Columns::seq` holds how many of its project's new rows
/// come after each row, and its seq is the project's `head_seq`, as this transaction's head
/// update left it, minus that.
const INSERT_FROM_HEADS: &str = concat!(
    "INSERT INTO agent_messages (",
    message_columns!(),
    ", created_at) SELECT u.id, u.project_id, p.head_seq - u.seq, u.sender_agent_id, \
       u.sender_agent_type, u.sender_session_id, u.recipient_agent_id, u.message_type, \
       u.content, u.metadata, u.priority, u.correlation_id, u.reply_to, u.client_msg_id, \
       u.expires_at, u.recipient_agent_type, u.expects_reply, u.reply_deadline, \
       u.in_reply_to_seq, u.success, u.error, u.duration_ms, u.late, $24 FROM ",
    message_rows!(),
    " JOIN projects p ON p.id = u.project_id"
);

/// The columns of the rows a batch inserts, one vector per column (borrowed from the batch).
struct Columns<'a> {
    id: Vec<Uuid>,
    project_id: Vec<Uuid>,
    seq: Vec<i64>,
    sender_agent_id: Vec<&'a str>,
    sender_agent_type: Vec<&'a str>,
    sender_session_id: Vec<Option<Uuid>>,
    recipient_agent_id: Vec<Option<&'a str>>,
    message_type: Vec<&'a str>,
    content: Vec<&'a str>,
    metadata: Vec<&'a serde_json::Value>,
    priority: Vec<i16>,
    correlation_id: Vec<Option<&'a str>>,
    reply_to: Vec<Option<Uuid>>,
    client_msg_id: Vec<Option<&'a str>>,
    expires_at: Vec<Option<DateTime<Utc>>>,
    recipient_agent_type: Vec<Option<&'a str>>,
    expects_reply: Vec<bool>,
    reply_deadline: Vec<Option<DateTime<Utc>>>,
    in_reply_to_seq: Vec<Option<i64>>,
    success: Vec<Option<bool>>,
    error: Vec<Option<&'a str>>,
    duration_ms: Vec<Option<i64>>,
    late: Vec<bool>,
}

impl<'a> Columns<'a> {
    fn with_capacity(n: usize) -> Self {
        Columns {
            id: Vec::with_capacity(n),
            project_id: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            sender_agent_id: Vec::with_capacity(n),
            sender_agent_type: Vec::with_capacity(n),
            sender_session_id: Vec::with_capacity(n),
            recipient_agent_id: Vec::with_capacity(n),
            message_type: Vec::with_capacity(n),
            content: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            priority: Vec::with_capacity(n),
            correlation_id: Vec::with_capacity(n),
            reply_to: Vec::with_capacity(n),
            client_msg_id: Vec::with_capacity(n),
            expires_at: Vec::with_capacity(n),
            recipient_agent_type: Vec::with_capacity(n),
            expects_reply: Vec::with_capacity(n),
            reply_deadline: Vec::with_capacity(n),
            in_reply_to_seq: Vec::with_capacity(n),
            success: Vec::with_capacity(n),
            error: Vec::with_capacity(n),
            duration_ms: Vec::with_capacity(n),
            late: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, msg: &'a NewMessage, seq: i64, created_at: DateTime<Utc>) {
        self.id.push(msg.id);
        self.project_id.push(msg.project_id);
        self.seq.push(seq);
        self.sender_agent_id.push(&msg.sender_agent_id);
        self.sender_agent_type.push(&msg.sender_agent_type);
        self.sender_session_id.push(msg.sender_session_id);
        self.recipient_agent_id
            .push(msg.recipient_agent_id.as_deref());
        self.message_type.push(&msg.message_type);
        self.content.push(&msg.content);
        self.metadata.push(&msg.metadata);
        self.priority.push(msg.priority);
        self.correlation_id.push(msg.correlation_id.as_deref());
        self.reply_to.push(msg.reply_to);
        self.client_msg_id.push(msg.client_msg_id.as_deref());
        self.expires_at.push(
            msg.ttl_ms
                .map(|ttl| created_at + chrono::Duration::milliseconds(ttl)),
        );
        self.recipient_agent_type
            .push(msg.recipient_agent_type.as_deref());
        self.expects_reply.push(msg.reply_timeout_ms.is_some());
        self.reply_deadline.push(
            msg.reply_timeout_ms
                .map(|ms| created_at + chrono::Duration::milliseconds(ms)),
        );
        self.in_reply_to_seq
            .push(msg.reply.as_ref().map(|r| r.in_reply_to_seq));
        self.success.push(msg.success);
        self.error.push(msg.error.as_deref());
        self.duration_ms
            .push(msg.reply.as_ref().map(|r| r.duration_ms));
        self.late.push(msg.reply.as_ref().is_some_and(|r| r.late));
    }

    /// The recipients of this batch's direct messages become members, owed those messages.
    async fn ensure_recipients(&self, conn: &mut AsyncPgConnection) -> QueryResult<()> {
        let (mut projects, mut agents, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        for ((project, to), seq) in self
            .project_id
            .iter()
            .zip(&self.recipient_agent_id)
            .zip(&self.seq)
        {
            if let Some(to) = to {
                projects.push(*project);
                agents.push(*to);
                seqs.push(*seq);
            }
        }
        crate::db::cursors::ensure_recipients(conn, &projects, &agents, &seqs).await
    }

    /// Inserts the rows with `sql`, one of [`INSERT_WITH_SEQS`] and [`INSERT_FROM_HEADS`]
    /// (they differ only in what `self.seq` holds). On a shared connection, so that the
    /// pipelined path can send it with the rest of its transaction.
    async fn insert(
        &self,
        mut conn: &AsyncPgConnection,
        sql: &'static str,
        created_at: DateTime<Utc>,
    ) -> QueryResult<usize> {
        diesel::sql_query(sql)
            .bind::<Array<SqlUuid>, _>(&self.id)
            .bind::<Array<SqlUuid>, _>(&self.project_id)
            .bind::<Array<BigInt>, _>(&self.seq)
            .bind::<Array<Text>, _>(&self.sender_agent_id)
            .bind::<Array<Text>, _>(&self.sender_agent_type)
            .bind::<Array<Nullable<SqlUuid>>, _>(&self.sender_session_id)
            .bind::<Array<Nullable<Text>>, _>(&self.recipient_agent_id)
            .bind::<Array<Text>, _>(&self.message_type)
            .bind::<Array<Text>, _>(&self.content)
            .bind::<Array<Jsonb>, _>(&self.metadata)
            .bind::<Array<Int2>, _>(&self.priority)
            .bind::<Array<Nullable<Text>>, _>(&self.correlation_id)
            .bind::<Array<Nullable<SqlUuid>>, _>(&self.reply_to)
            .bind::<Array<Nullable<Text>>, _>(&self.client_msg_id)
            .bind::<Array<Nullable<Timestamptz>>, _>(&self.expires_at)
            .bind::<Array<Nullable<Text>>, _>(&self.recipient_agent_type)
            .bind::<Array<Bool>, _>(&self.expects_reply)
            .bind::<Array<Nullable<Timestamptz>>, _>(&self.reply_deadline)
            .bind::<Array<Nullable<BigInt>>, _>(&self.in_reply_to_seq)
            .bind::<Array<Nullable<Bool>>, _>(&self.success)
            .bind::<Array<Nullable<Text>>, _>(&self.error)
            .bind::<Array<Nullable<BigInt>>, _>(&self.duration_ms)
            .bind::<Array<Bool>, _>(&self.late)
            .bind::<Timestamptz, _>(created_at)
            .prepared()
            .execute(&mut conn)
            .await
    }
}
