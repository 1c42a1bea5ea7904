//! File claims in PostgreSQL. Every decision is one transaction: claims of a project are
//! decided one at a time under a transaction-scoped advisory lock (so two agents racing for
//! the same path from two connections, or two brokers, get one grant), and every later
//! change of state is a conditional `UPDATE … WHERE state = … RETURNING`, so it happens at
//! most once. Each decision queues its notice in the outbox in the same transaction.
//!
//! Times are the database's `now()` (the transaction's start), so one clock decides
//! expiries and windows.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::outbox::{self, Pending};
use super::timers;
use crate::domain::claims::{
    conflict, stored_paths, Claim, ClaimEvent, ClaimShape, ClaimSpec, ClaimState, Conflict,
    Objection,
};

const COLUMNS: &str =
    "id, project_id, agent_id, paths, shared, reason, state, ttl_ms, created_at, \
    decide_at, granted_at, expires_at, ended_at, ended_by, end_reason";

/// Held now: pending, or granted and not expired.
const ACTIVE: &str = "(state = 'pending' OR (state = 'granted' AND expires_at > now()))";

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    project_id: Uuid,
    #[diesel(sql_type = Text)]
    agent_id: String,
    #[diesel(sql_type = Array<Text>)]
    paths: Vec<String>,
    #[diesel(sql_type = Bool)]
    shared: bool,
    #[diesel(sql_type = Nullable<Text>)]
    reason: Option<String>,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    ttl_ms: i64,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    decide_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    granted_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    expires_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    ended_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    ended_by: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    end_reason: Option<String>,
}

impl From<Row> for Claim {
    fn from(r: Row) -> Claim {
        Claim {
            id: r.id,
            project_id: r.project_id,
            agent_id: r.agent_id,
            paths: r.paths,
            shared: r.shared,
            reason: r.reason,
            // The table's CHECK constraint allows only the known states.
            state: ClaimState::parse(&r.state).unwrap_or(ClaimState::Expired),
            ttl_ms: r.ttl_ms,
            created_at: r.created_at,
            decide_at: r.decide_at,
            granted_at: r.granted_at,
            expires_at: r.expires_at,
            ended_at: r.ended_at,
            ended_by: r.ended_by,
            end_reason: r.end_reason,
        }
    }
}

fn claims(rows: Vec<Row>) -> Vec<Claim> {
    rows.into_iter().map(Claim::from).collect()
}

/// How a claim request was decided.
#[derive(Debug)]
pub enum Decision {
    /// Granted now; `merged`: into the agent's existing claim of the same mode.
    Granted { claim: Claim, merged: bool },
    /// Announced: pending until its window closes.
    Pending { claim: Claim },
    /// Refused: it conflicts with these claims of other agents.
    Refused {
        claim: Claim,
        conflicts: Vec<Conflict>,
    },
}

/// Serialises the claim decisions of one project (until the transaction ends).
async fn lock_project(conn: &mut AsyncPgConnection, project_id: Uuid) -> QueryResult<()> {
    diesel::sql_query(
        "SELECT pg_advisory_xact_lock(hashtextextended('agentbus.claims:' || $1::text, 0))",
    )
    .bind::<SqlUuid, _>(project_id)
    .execute(conn)
    .await
    .map(drop)
}

async fn active(conn: &mut AsyncPgConnection, project_id: Uuid) -> QueryResult<Vec<Claim>> {
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM claims WHERE project_id = $1 AND {ACTIVE} ORDER BY created_at, id"
    ))
    .bind::<SqlUuid, _>(project_id)
    .load(conn)
    .await?;
    Ok(claims(rows))
}

/// Decides a claim of `agent_id` and queues its notice. Returns the decision and the notices
/// to store.
pub async fn claim(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    spec: &ClaimSpec,
) -> QueryResult<(Decision, Vec<Pending>)> {
    conn.transaction(async |conn| {
        lock_project(conn, project_id).await?;
        let held = active(conn, project_id).await?;
        let mine = ClaimShape {
            agent_id,
            shared: spec.shared,
            paths: &spec.paths,
        };
        let conflicts: Vec<Conflict> = held
            .iter()
            .filter_map(|theirs| {
                let paths = stored_paths(&theirs.paths);
                conflict(
                    &mine,
                    &ClaimShape {
                        agent_id: &theirs.agent_id,
                        shared: theirs.shared,
                        paths: &paths,
                    },
                )
                .map(|pairs| Conflict::new(theirs, pairs))
            })
            .collect();
        let paths = spec.path_strings();
        if !conflicts.is_empty() {
            let claim = insert(conn, project_id, agent_id, &paths, spec, "refused").await?;
            let event = ClaimEvent::Refused {
                conflicts: conflicts.clone(),
            };
            let notice = notify(conn, &claim, &event).await?;
            return Ok((Decision::Refused { claim, conflicts }, vec![notice]));
        }
        if spec.objection_ms.is_some() {
            let claim = insert(conn, project_id, agent_id, &paths, spec, "pending").await?;
            let notice = notify(conn, &claim, &ClaimEvent::Announced).await?;
            return Ok((Decision::Pending { claim }, vec![notice]));
        }
        // The same agent claiming again, in the same mode: one claim, extended.
        let own = held
            .iter()
            .filter(|c| {
                c.agent_id == agent_id && c.shared == spec.shared && c.state == ClaimState::Granted
            })
            .max_by_key(|c| c.created_at);
        let (claim, merged) = match own {
            Some(own) => {
                let paths = crate::domain::claims::merged(&own.paths, &spec.paths);
                let row: Row = diesel::sql_query(format!(
                    "UPDATE claims SET paths = $2, ttl_ms = $3, reason = COALESCE($4, reason), \
                       expires_at = GREATEST(expires_at, now() + $3 * interval '1 millisecond') \
                     WHERE id = $1 RETURNING {COLUMNS}"
                ))
                .bind::<SqlUuid, _>(own.id)
                .bind::<Array<Text>, _>(&paths)
                .bind::<BigInt, _>(spec.ttl_ms)
                .bind::<Nullable<Text>, _>(spec.reason.as_deref())
                .get_result(conn)
                .await?;
                (Claim::from(row), true)
            }
            None => (
                insert(conn, project_id, agent_id, &paths, spec, "granted").await?,
                false,
            ),
        };
        let notice = notify(conn, &claim, &ClaimEvent::Granted { merged }).await?;
        Ok((Decision::Granted { claim, merged }, vec![notice]))
    })
    .await
}

async fn insert(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    paths: &[String],
    spec: &ClaimSpec,
    state: &str,
) -> QueryResult<Claim> {
    let row: Row = diesel::sql_query(format!(
        "INSERT INTO claims (id, project_id, agent_id, paths, shared, reason, state, ttl_ms, \
           decide_at, granted_at, expires_at, ended_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
           CASE WHEN $7 = 'pending' THEN now() + $9 * interval '1 millisecond' END, \
           CASE WHEN $7 = 'granted' THEN now() END, \
           CASE WHEN $7 = 'granted' THEN now() + $8 * interval '1 millisecond' END, \
           CASE WHEN $7 = 'refused' THEN now() END) \
         RETURNING {COLUMNS}"
    ))
    .bind::<SqlUuid, _>(Uuid::new_v4())
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(agent_id)
    .bind::<Array<Text>, _>(paths)
    .bind::<Bool, _>(spec.shared)
    .bind::<Nullable<Text>, _>(spec.reason.as_deref())
    .bind::<Text, _>(state)
    .bind::<BigInt, _>(spec.ttl_ms)
    .bind::<BigInt, _>(spec.objection_ms.unwrap_or(0))
    .get_result(conn)
    .await?;
    Ok(row.into())
}

/// Queues the notice of an event of `claim`, and remembers it as the claim's latest.
async fn notify(
    conn: &mut AsyncPgConnection,
    claim: &Claim,
    event: &ClaimEvent,
) -> QueryResult<Pending> {
    let pending = outbox::push(conn, claim.project_id, claim.notice(event)).await?;
    diesel::sql_query("UPDATE claims SET notice_id = $2 WHERE id = $1")
        .bind::<SqlUuid, _>(claim.id)
        .bind::<SqlUuid, _>(pending.id)
        .execute(conn)
        .await?;
    Ok(pending)
}

/// The seq of the latest notice about a claim, once it is stored as a message.
pub async fn notice_seq(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    claim_id: Uuid,
) -> QueryResult<Option<i64>> {
    #[derive(QueryableByName)]
    struct Seq {
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    let seq: Option<Seq> = diesel::sql_query(
        "SELECT a.seq FROM claims c JOIN agent_messages a ON a.project_id = c.project_id \
           AND a.sender_agent_id = $3 AND a.client_msg_id = c.notice_id::text \
         WHERE c.project_id = $1 AND c.id = $2",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<SqlUuid, _>(claim_id)
    .bind::<Text, _>(crate::domain::BROKER_AGENT_ID)
    .get_result(conn)
    .await
    .optional()?;
    Ok(seq.map(|s| s.seq))
}

/// One claim of a project.
pub async fn find(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    claim_id: Uuid,
) -> QueryResult<Option<Claim>> {
    let row: Option<Row> = diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM claims WHERE project_id = $1 AND id = $2"
    ))
    .bind::<SqlUuid, _>(project_id)
    .bind::<SqlUuid, _>(claim_id)
    .get_result(conn)
    .await
    .optional()?;
    Ok(row.map(Claim::from))
}

/// What a claim's deadline found: the claim granted or expired, or why not.
pub type Due = timers::Due<Claim>;

/// The objection window of a pending claim closed with no objection: it is granted, its TTL
/// counted from now.
pub async fn grant_due(conn: &mut AsyncPgConnection, claim_id: Uuid) -> QueryResult<Due> {
    conn.transaction(async |conn| {
        let row: Option<Row> = diesel::sql_query(format!(
            "UPDATE claims SET state = 'granted', granted_at = now(), \
               expires_at = now() + ttl_ms * interval '1 millisecond' \
             WHERE id = $1 AND state = 'pending' AND decide_at <= now() RETURNING {COLUMNS}"
        ))
        .bind::<SqlUuid, _>(claim_id)
        .get_result(conn)
        .await
        .optional()?;
        match row {
            Some(row) => {
                let claim = Claim::from(row);
                let event = ClaimEvent::Granted { merged: false };
                let notice = notify(conn, &claim, &event).await?;
                Ok(Due::Done(claim, vec![notice]))
            }
            None => later(conn, claim_id, ClaimState::Pending).await,
        }
    })
    .await
}

/// A granted claim reached its expiry.
pub async fn expire_due(conn: &mut AsyncPgConnection, claim_id: Uuid) -> QueryResult<Due> {
    conn.transaction(async |conn| {
        let row: Option<Row> = diesel::sql_query(format!(
            "UPDATE claims SET state = 'expired', ended_at = expires_at \
             WHERE id = $1 AND state = 'granted' AND expires_at <= now() RETURNING {COLUMNS}"
        ))
        .bind::<SqlUuid, _>(claim_id)
        .get_result(conn)
        .await
        .optional()?;
        match row {
            Some(row) => {
                let claim = Claim::from(row);
                let notice = notify(conn, &claim, &ClaimEvent::Expired).await?;
                Ok(Due::Done(claim, vec![notice]))
            }
            None => later(conn, claim_id, ClaimState::Granted).await,
        }
    })
    .await
}

/// Why a deadline changed nothing: still in `state` with a later deadline, or settled.
async fn later(
    conn: &mut AsyncPgConnection,
    claim_id: Uuid,
    state: ClaimState,
) -> QueryResult<Due> {
    timers::later(
        conn,
        "SELECT CASE WHEN state = 'pending' THEN decide_at ELSE expires_at END AS at \
         FROM claims WHERE id = $1 AND state = $2",
        claim_id,
        state.as_str(),
    )
    .await
}

/// Why a change asked by an agent was not made.
#[derive(Debug)]
pub enum Refusal {
    NotFound,
    /// The claim is the asking agent's own (objections), or another agent's (release, renew).
    NotYours(Claim),
    /// Not in a state that allows it (decided, ended, expired).
    WrongState(Claim),
}

/// An objection to a pending claim, before its window closes: the claim is refused at once.
pub async fn object(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    claim_id: Uuid,
    agent_id: &str,
    reason: &str,
) -> QueryResult<Result<(Claim, Objection, Vec<Pending>), Refusal>> {
    conn.transaction(async |conn| {
        let row: Option<Row> = diesel::sql_query(format!(
            "UPDATE claims SET state = 'objected', ended_at = now(), ended_by = $3, end_reason = $4 \
             WHERE id = $2 AND project_id = $1 AND state = 'pending' AND decide_at > now() \
               AND agent_id <> $3 RETURNING {COLUMNS}"
        ))
        .bind::<SqlUuid, _>(project_id)
        .bind::<SqlUuid, _>(claim_id)
        .bind::<Text, _>(agent_id)
        .bind::<Text, _>(reason)
        .get_result(conn)
        .await
        .optional()?;
        let Some(row) = row else {
            return Ok(Err(match find(conn, project_id, claim_id).await? {
                None => Refusal::NotFound,
                Some(c) if c.agent_id == agent_id => Refusal::NotYours(c),
                Some(c) => Refusal::WrongState(c),
            }));
        };
        let claim = Claim::from(row);
        #[derive(QueryableByName)]
        struct Made {
            #[diesel(sql_type = Timestamptz)]
            created_at: DateTime<Utc>,
        }
        let made: Made = diesel::sql_query(
            "INSERT INTO claim_objections (claim_id, agent_id, reason) VALUES ($1, $2, $3) \
             RETURNING created_at",
        )
        .bind::<SqlUuid, _>(claim_id)
        .bind::<Text, _>(agent_id)
        .bind::<Text, _>(reason)
        .get_result(conn)
        .await?;
        let objection = Objection {
            agent_id: agent_id.to_owned(),
            reason: reason.to_owned(),
            created_at: made.created_at,
        };
        let event = ClaimEvent::Objected {
            objection: objection.clone(),
        };
        let notice = notify(conn, &claim, &event).await?;
        Ok(Ok((claim, objection, vec![notice])))
    })
    .await
}

/// Who releases a claim.
pub struct Releaser<'a> {
    /// The agent asking (its own claims), or who is named as releasing by force.
    pub agent_id: Option<&'a str>,
    /// Any agent's claim (the admin token, or an unbound project token).
    pub force: bool,
    pub reason: Option<&'a str>,
}

/// Releases a held claim (or withdraws a pending one).
pub async fn release(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    claim_id: Uuid,
    by: &Releaser<'_>,
) -> QueryResult<Result<(Claim, Vec<Pending>), Refusal>> {
    conn.transaction(async |conn| {
        let row: Option<Row> = diesel::sql_query(format!(
            "UPDATE claims SET state = 'released', ended_at = now(), ended_by = $3, end_reason = $5 \
             WHERE id = $2 AND project_id = $1 AND {ACTIVE} AND ($4 OR agent_id = $3) \
             RETURNING {COLUMNS}"
        ))
        .bind::<SqlUuid, _>(project_id)
        .bind::<SqlUuid, _>(claim_id)
        .bind::<Nullable<Text>, _>(by.agent_id)
        .bind::<Bool, _>(by.force)
        .bind::<Nullable<Text>, _>(by.reason)
        .get_result(conn)
        .await
        .optional()?;
        let Some(row) = row else {
            return Ok(Err(match find(conn, project_id, claim_id).await? {
                None => Refusal::NotFound,
                Some(c) if !c.is_active(Utc::now()) || by.force => Refusal::WrongState(c),
                Some(c) if Some(c.agent_id.as_str()) != by.agent_id => Refusal::NotYours(c),
                Some(c) => Refusal::WrongState(c),
            }));
        };
        let claim = Claim::from(row);
        let forced = by.force && by.agent_id != Some(claim.agent_id.as_str());
        let notice =
            notify(conn, &claim, &ClaimEvent::Released { forced }).await?;
        Ok(Ok((claim, vec![notice])))
    })
    .await
}

/// Extends a granted claim: it now expires `ttl_ms` from now.
pub async fn renew(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    claim_id: Uuid,
    agent_id: &str,
    ttl_ms: i64,
) -> QueryResult<Result<Claim, Refusal>> {
    let row: Option<Row> = diesel::sql_query(format!(
        "UPDATE claims SET ttl_ms = $4, expires_at = now() + $4 * interval '1 millisecond' \
         WHERE id = $2 AND project_id = $1 AND agent_id = $3 AND state = 'granted' \
           AND expires_at > now() RETURNING {COLUMNS}"
    ))
    .bind::<SqlUuid, _>(project_id)
    .bind::<SqlUuid, _>(claim_id)
    .bind::<Text, _>(agent_id)
    .bind::<BigInt, _>(ttl_ms)
    .get_result(conn)
    .await
    .optional()?;
    if let Some(row) = row {
        return Ok(Ok(row.into()));
    }
    Ok(Err(match find(conn, project_id, claim_id).await? {
        None => Refusal::NotFound,
        Some(c) if c.agent_id != agent_id => Refusal::NotYours(c),
        Some(c) => Refusal::WrongState(c),
    }))
}

/// Which claims a listing shows.
pub struct ListFilter<'a> {
    /// Only claims held now (pending, or granted and unexpired); otherwise every state.
    pub active_only: bool,
    /// Only claims in this state.
    pub state: Option<ClaimState>,
    pub agent_id: Option<&'a str>,
    pub limit: i64,
}

/// A project's claims: held ones oldest first; with `active_only` false, the newest first.
pub async fn list(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    filter: &ListFilter<'_>,
) -> QueryResult<Vec<Claim>> {
    let (condition, order) = if filter.active_only {
        (ACTIVE, "created_at, id")
    } else {
        ("TRUE", "created_at DESC, id DESC")
    };
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM claims WHERE project_id = $1 AND ($2::text IS NULL OR agent_id = $2) \
           AND ($3::text IS NULL OR state = $3) AND {condition} ORDER BY {order} LIMIT $4"
    ))
    .bind::<SqlUuid, _>(project_id)
    .bind::<Nullable<Text>, _>(filter.agent_id)
    .bind::<Nullable<Text>, _>(filter.state.map(ClaimState::as_str))
    .bind::<BigInt, _>(filter.limit)
    .load(conn)
    .await?;
    Ok(claims(rows))
}

/// The objections to these claims, by claim.
pub async fn objections(
    conn: &mut AsyncPgConnection,
    claim_ids: &[Uuid],
) -> QueryResult<Vec<(Uuid, Objection)>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = SqlUuid)]
        claim_id: Uuid,
        #[diesel(sql_type = Text)]
        agent_id: String,
        #[diesel(sql_type = Text)]
        reason: String,
        #[diesel(sql_type = Timestamptz)]
        created_at: DateTime<Utc>,
    }
    if claim_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT claim_id, agent_id, reason, created_at FROM claim_objections \
         WHERE claim_id = ANY($1) ORDER BY created_at",
    )
    .bind::<Array<SqlUuid>, _>(claim_ids)
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.claim_id,
                Objection {
                    agent_id: r.agent_id,
                    reason: r.reason,
                    created_at: r.created_at,
                },
            )
        })
        .collect())
}

/// A deadline a claim is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimDeadline {
    /// The end of a pending claim's objection window.
    Window,
    /// A granted claim's expiry.
    Expiry,
}

/// Every claim deadline still to come (or passed while no broker ran), to re-arm at start-up.
pub async fn deadlines(
    conn: &mut AsyncPgConnection,
) -> QueryResult<Vec<(Uuid, ClaimDeadline, DateTime<Utc>)>> {
    timers::load(
        conn,
        "SELECT id, 0 AS kind, decide_at AS at FROM claims WHERE state = 'pending' \
         UNION ALL SELECT id, 1, expires_at FROM claims WHERE state = 'granted'",
        ClaimDeadline::Window,
        ClaimDeadline::Expiry,
    )
    .await
}
