//! Membership, delivery cursors and what each agent is owed.
//!
//! What an agent is owed: every message of its project with seq above its ack floor that is
//! visible to it (a broadcast it did not send, from its first connection on, or a direct
//! message to it), that has not expired and that it has not acknowledged. The SQL function
//! `agentbus_visible` (migration `2026-11-22-000009_visibility_rule`) is the single definition
//! of the visibility part, and `agentbus_owed` adds expiry to it; every query here, and the
//! expiry sweep, uses one of them; the acknowledged part is the cursor's. The channel applies
//! the same rule to live traffic.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, SmallInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;
use uuid::Uuid;

use crate::db::prepared::PrepareOnce;
use crate::models::StoredMessage;

/// The owed-message condition, over `agent_messages a`, with `$1` the project, `$4` the agent,
/// `$5` the joined seq (broadcasts at or below it are not owed), `$6` the acknowledged seqs
/// above the floor and `$7` the agent's type (for messages addressed to a type).
const OWED: &str = "a.project_id = $1 \
    AND agentbus_owed(a.recipient_agent_id, a.recipient_agent_type, a.sender_agent_id, a.seq, \
                      a.expires_at, $4, $7, $5) \
    AND NOT (a.seq = ANY($6))";

/// The observed-message condition: every message of the project. The agent parameters are
/// bound (the statement's shape is the same as [`OWED`]'s) and unused.
const OBSERVED: &str = "a.project_id = $1 AND $4 = $4 AND $5 = $5 AND $6 = $6 AND $7 = $7";

/// A member's delivery state as stored.
#[derive(QueryableByName, Debug, Clone)]
pub struct MemberCursor {
    #[diesel(sql_type = BigInt)]
    pub ack_floor: i64,
    #[diesel(sql_type = Array<BigInt>)]
    pub acked_above: Vec<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub joined_seq: Option<i64>,
    #[diesel(sql_type = Text)]
    pub agent_type: String,
}

impl MemberCursor {
    /// The joined seq as the owed condition uses it: no broadcast is owed before the first
    /// connection.
    pub fn broadcasts_after(&self) -> i64 {
        self.joined_seq.unwrap_or(i64::MAX)
    }
}

/// Records a connection: creates the member (starting at `head_seq` for broadcasts) or
/// refreshes its type and makes `session_id` the connection whose progress counts.
pub async fn join_member(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    agent_type: &str,
    session_id: Uuid,
    head_seq: i64,
) -> QueryResult<MemberCursor> {
    diesel::sql_query(
        "INSERT INTO members (project_id, agent_id, agent_type, ack_floor, joined_seq, \
                              current_session_id, last_seen_at, interface) \
         VALUES ($1, $2, $3, $4, $4, $5, now(), 'websocket') \
         ON CONFLICT (project_id, agent_id) DO UPDATE SET \
           agent_type = EXCLUDED.agent_type, \
           joined_seq = COALESCE(members.joined_seq, EXCLUDED.joined_seq), \
           current_session_id = EXCLUDED.current_session_id, \
           last_seen_at = now(), interface = 'websocket' \
         RETURNING ack_floor, acked_above, joined_seq, agent_type",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(agent_id)
    .bind::<Text, _>(agent_type)
    .bind::<BigInt, _>(head_seq)
    .bind::<SqlUuid, _>(session_id)
    .prepared()
    .get_result(conn)
    .await
}

/// Replaces what an agent declared it can do.
pub async fn set_capabilities(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    capabilities: &[String],
    description: Option<&str>,
) -> QueryResult<()> {
    diesel::sql_query(
        "UPDATE members SET capabilities = $3, description = $4 WHERE project_id = $1 AND agent_id = $2",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(agent_id)
    .bind::<Array<Text>, _>(capabilities)
    .bind::<Nullable<Text>, _>(description)
    .prepared()
    .execute(conn)
    .await
    .map(drop)
}

pub async fn find_member(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
) -> QueryResult<Option<MemberCursor>> {
    diesel::sql_query(
        "SELECT ack_floor, acked_above, joined_seq, agent_type FROM members \
         WHERE project_id = $1 AND agent_id = $2",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(agent_id)
    .prepared()
    .get_result(conn)
    .await
    .optional()
}

/// Makes the recipients of direct messages members, so the messages are owed to them from
/// the first one on. Runs inside the batch transaction.
pub async fn ensure_recipients(
    conn: &mut AsyncPgConnection,
    projects: &[Uuid],
    agents: &[&str],
    seqs: &[i64],
) -> QueryResult<()> {
    if agents.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "INSERT INTO members (project_id, agent_id, agent_type, ack_floor) \
         SELECT DISTINCT ON (p, a) p, a, 'unknown', s - 1 \
         FROM unnest($1::uuid[], $2::text[], $3::int8[]) AS t(p, a, s) \
         ORDER BY p, a, s \
         ON CONFLICT (project_id, agent_id) DO NOTHING",
    )
    .bind::<Array<SqlUuid>, _>(projects)
    .bind::<Array<Text>, _>(agents)
    .bind::<Array<BigInt>, _>(seqs)
    .prepared()
    .execute(conn)
    .await
    .map(drop)
}

/// Which owed messages to read, and in which order.
#[derive(Debug, Clone)]
pub struct OwedQuery {
    pub project_id: Uuid,
    pub agent_id: String,
    /// Only seqs in `(after, upto]`.
    pub after: i64,
    pub upto: i64,
    pub broadcasts_after: i64,
    pub acked: Vec<i64>,
    /// The agent's type, for messages addressed to a type.
    pub agent_type: String,
    /// Priority first (0 critical first), then seq; otherwise seq only.
    pub by_priority: bool,
    /// Keyset: continue after this (priority, seq) (seq alone when not by priority).
    pub resume: (i16, i64),
    pub limit: i64,
    /// An observer's read: every message of the project in the range, not only those owed
    /// to an agent (the agent fields are ignored).
    pub observer: bool,
}

impl OwedQuery {
    fn condition(&self) -> &'static str {
        if self.observer {
            OBSERVED
        } else {
            OWED
        }
    }
}

/// One page of owed messages.
pub async fn owed_page(
    conn: &mut AsyncPgConnection,
    q: &OwedQuery,
) -> QueryResult<Vec<StoredMessage>> {
    let order = if q.by_priority {
        "AND (a.priority, a.seq) > ($8, $9) ORDER BY a.priority, a.seq"
    } else {
        "AND a.seq > $9 AND $8 = $8 ORDER BY a.seq"
    };
    // Not prepared: it selects `*` (see `db::prepared`).
    diesel::sql_query(format!(
        "SELECT a.* FROM agent_messages a WHERE a.seq > $2 AND a.seq <= $3 AND {} {order} LIMIT $10",
        q.condition()
    ))
    .bind::<SqlUuid, _>(q.project_id)
    .bind::<BigInt, _>(q.after)
    .bind::<BigInt, _>(q.upto)
    .bind::<Text, _>(&q.agent_id)
    .bind::<BigInt, _>(q.broadcasts_after)
    .bind::<Array<BigInt>, _>(&q.acked)
    .bind::<Text, _>(&q.agent_type)
    .bind::<SmallInt, _>(q.resume.0)
    .bind::<BigInt, _>(q.resume.1)
    .bind::<BigInt, _>(q.limit)
    .load(conn)
    .await
}

#[derive(QueryableByName)]
struct PriorityCount {
    #[diesel(sql_type = SmallInt)]
    priority: i16,
    #[diesel(sql_type = BigInt)]
    count: i64,
}

/// How many messages will be delivered from `(after, upto]`, per priority (index 0 =
/// critical): those owed, less those already delivered `max_deliveries` times (manual mode),
/// which go to the dead-letter list instead.
pub async fn owed_counts(
    conn: &mut AsyncPgConnection,
    q: &OwedQuery,
    max_deliveries: Option<i32>,
) -> QueryResult<[i64; 4]> {
    let rows: Vec<PriorityCount> = diesel::sql_query(format!(
        "SELECT a.priority, count(*) AS count FROM agent_messages a \
         WHERE a.seq > $2 AND a.seq <= $3 AND {} \
           AND ($8::int4 IS NULL OR NOT EXISTS (SELECT 1 FROM delivery_attempts d \
                WHERE d.project_id = $1 AND d.agent_id = $4 AND d.seq = a.seq AND d.attempts >= $8)) \
         GROUP BY a.priority",
        q.condition()
    ))
    .bind::<SqlUuid, _>(q.project_id)
    .bind::<BigInt, _>(q.after)
    .bind::<BigInt, _>(q.upto)
    .bind::<Text, _>(&q.agent_id)
    .bind::<BigInt, _>(q.broadcasts_after)
    .bind::<Array<BigInt>, _>(&q.acked)
    .bind::<Text, _>(&q.agent_type)
    .bind::<Nullable<diesel::sql_types::Integer>, _>(max_deliveries)
    .prepared()
    .load(conn)
    .await?;
    let mut counts = [0; 4];
    for row in rows {
        if let Some(slot) = counts.get_mut(row.priority as usize) {
            *slot = row.count;
        }
    }
    Ok(counts)
}

/// Progress of one member: seqs it is done with, and optionally "everything owed up to N".
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub done: Vec<i64>,
    pub up_to: Option<i64>,
}

impl Progress {
    pub fn merge(&mut self, other: Progress) {
        self.done.extend(other.done);
        self.up_to = self.up_to.max(other.up_to);
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty() && self.up_to.is_none()
    }
}

/// Most acknowledged seqs kept above a member's floor. An agent that leaves one message
/// unacknowledged while it acknowledges everything after it would otherwise grow this list
/// (and the cost of every query that reads it) without end. Beyond the bound the highest ones
/// are forgotten: those messages are owed again and delivered again on the agent's next
/// connection, which at-least-once allows; none is ever lost. The `members` table enforces
/// the bound too (migration `2026-12-01-000010_delivery_bounds`).
pub const MAX_ACKED_ABOVE: i64 = 1_000;

/// What applying one member's progress did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The new floor.
    pub ack_floor: i64,
    /// The named seqs that were not acknowledged: no message with that seq is visible to the
    /// agent (above the project's head, or not addressed to it), ascending. Seqs already done
    /// are not listed: acknowledging twice is harmless.
    pub ignored: Vec<i64>,
}

/// Applies progress to a member's cursor: adds the done seqs, then moves the floor up to just
/// below the first message still owed (or to the project's head), keeping only the done seqs
/// above it. A done seq only counts if a message with that seq exists and is visible to the
/// agent: an ack ahead of the message, or of someone else's message, records nothing (see
/// [`Applied::ignored`]). The update only ever adds knowledge (the floor never goes down,
/// done seqs are only forgotten beyond [`MAX_ACKED_ABOVE`]), so reports may arrive late or
/// from a connection that was since replaced. Done messages get their `delivered_at` if they
/// had none. Returns `None` when the agent is not a member.
pub async fn apply_progress(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    progress: &Progress,
) -> QueryResult<Option<Applied>> {
    let advanced = advance_project(conn, project_id, &[(agent_id, progress)]).await?;
    Ok(advanced.into_iter().next().map(|(_, advance)| Applied {
        ack_floor: advance.ack_floor,
        ignored: advance.ignored,
    }))
}

/// [`apply_progress`] for several members of one project (each at most once), with one
/// statement of each kind however many report: the cursors, `delivered_at` (a project's
/// agents mostly cover the same messages) and the delivery counts. Returns the new floors by
/// agent id; agents that are not members are left out.
pub async fn apply_project_progress(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    reports: &[(&str, &Progress)],
) -> QueryResult<Vec<(String, i64)>> {
    let advanced = advance_project(conn, project_id, reports).await?;
    Ok(advanced
        .into_iter()
        .map(|(agent_id, advance)| (agent_id, advance.ack_floor))
        .collect())
}

async fn advance_project(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    reports: &[(&str, &Progress)],
) -> QueryResult<Vec<(String, Advance)>> {
    let advanced = advance_cursors(conn, project_id, reports).await?;
    let progress_of: std::collections::HashMap<&str, &Progress> = reports.iter().copied().collect();
    let mut delivered = Vec::new();
    for (agent_id, advance) in &advanced {
        if let Some(progress) = progress_of.get(agent_id.as_str()) {
            advance.delivered(agent_id, progress, &mut delivered);
        }
    }
    mark_delivered(conn, project_id, &delivered).await?;
    let mut named: Vec<i64> = advanced
        .iter()
        .flat_map(|(_, advance)| advance.recorded.iter().copied())
        .collect();
    named.sort_unstable();
    named.dedup();
    mark_named_delivered(conn, project_id, &named).await?;
    let floors: Vec<(String, i64)> = advanced
        .iter()
        .map(|(agent_id, advance)| (agent_id.clone(), advance.ack_floor))
        .collect();
    settle_attempts(conn, project_id, &floors).await?;
    Ok(advanced)
}

/// A member's cursor after [`advance_cursors`].
#[derive(QueryableByName, Debug)]
struct Advance {
    /// The new floor.
    #[diesel(sql_type = BigInt)]
    ack_floor: i64,
    /// The floor before this progress: `up_to` covers what lies between the two.
    #[diesel(sql_type = BigInt)]
    previous_floor: i64,
    #[diesel(sql_type = Text)]
    agent_type: String,
    /// The member's `joined_seq` (NULL: not connected yet), for what is visible to it.
    #[diesel(sql_type = Nullable<BigInt>)]
    joined_seq: Option<i64>,
    /// The named seqs newly recorded as done (ascending).
    #[diesel(sql_type = Array<BigInt>)]
    recorded: Vec<i64>,
    /// The named seqs that were not (see [`Applied::ignored`]).
    #[diesel(sql_type = Array<BigInt>)]
    ignored: Vec<i64>,
}

impl Advance {
    /// Adds to `out` the range `up_to` says the agent received: everything unexpired between
    /// its previous floor and that seq, of which only what is visible to it counts (see
    /// [`mark_delivered`]). The seqs it named are `recorded`, each already known to be
    /// visible to it.
    fn delivered<'a>(
        &'a self,
        agent_id: &'a str,
        progress: &Progress,
        out: &mut Vec<DeliveredRange<'a>>,
    ) {
        let upto = progress.up_to.unwrap_or(0).min(self.ack_floor);
        if upto > self.previous_floor {
            out.push(DeliveredRange {
                agent_id,
                agent_type: &self.agent_type,
                joined_seq: self.joined_seq,
                after: self.previous_floor,
                upto,
            });
        }
    }
}

/// Seqs `(after, upto]` of a project that `agent_id` received: those of them visible to it
/// count as delivered.
struct DeliveredRange<'a> {
    agent_id: &'a str,
    agent_type: &'a str,
    joined_seq: Option<i64>,
    after: i64,
    upto: i64,
}

/// The statement of [`advance_cursors`]. Members are locked in agent order, so two writers
/// can never wait on each other. A named seq is recorded only if it is above the floor, not
/// acknowledged yet, at or below the head, and the seq of a message visible to the member;
/// one that is none of those nor done already is ignored. Neither the floor nor the seqs are
/// ever incremented or decremented from what the client sent: `up_to` is capped by LEAST, so
/// i64::MAX is the head like any larger-than-head value. The named seqs are looked up in a
/// hash table (`NOT IN` a subquery that does not depend on the row, a hashed subplan), not
/// read through for every message the floor passes; one that was not recorded is not owed
/// to that agent (or does not exist yet), so it changes nothing there.
pub const ADVANCE_CURSORS: &str = "WITH r AS (SELECT * FROM unnest($2::text[], $3::int8[]) AS r(agent_id, up_to)), \
         d AS (SELECT DISTINCT * FROM unnest($4::text[], $5::int8[]) AS d(agent_id, seq)), \
         m AS ( \
           SELECT agent_id, ack_floor, acked_above, joined_seq, agent_type FROM members \
           WHERE project_id = $1 AND agent_id = ANY($2) \
           ORDER BY agent_id FOR UPDATE), \
         done AS (SELECT m.agent_id, x AS seq FROM m, unnest(m.acked_above) AS x), \
         named AS ( \
           SELECT m.agent_id, d.seq, (d.seq <= m.ack_floor OR k.seq IS NOT NULL) AS known, \
             (d.seq > m.ack_floor AND d.seq <= p.head_seq AND k.seq IS NULL \
              AND EXISTS (SELECT 1 FROM agent_messages a WHERE a.project_id = $1 AND a.seq = d.seq \
                AND agentbus_visible(a.recipient_agent_id, a.recipient_agent_type, a.sender_agent_id, \
                                     a.seq, m.agent_id, m.agent_type, m.joined_seq))) AS new \
           FROM m JOIN d ON d.agent_id = m.agent_id \
             LEFT JOIN done k ON k.agent_id = d.agent_id AND k.seq = d.seq, \
             projects p WHERE p.id = $1), \
         base AS ( \
           SELECT m.agent_id, GREATEST(m.ack_floor, LEAST(COALESCE(r.up_to, 0), p.head_seq)) AS floor, \
                  m.ack_floor AS previous_floor, \
                  ARRAY(SELECT n.seq FROM named n WHERE n.agent_id = m.agent_id AND n.new ORDER BY n.seq) \
                    AS recorded, \
                  ARRAY(SELECT n.seq FROM named n WHERE n.agent_id = m.agent_id \
                        AND NOT n.new AND NOT n.known ORDER BY n.seq) AS ignored, \
                  m.acked_above, \
                  COALESCE(m.joined_seq, 9223372036854775807) AS joined, m.agent_type, p.head_seq \
           FROM m JOIN r ON r.agent_id = m.agent_id, projects p WHERE p.id = $1), \
         acked AS (SELECT base.*, base.acked_above || base.recorded AS acked FROM base), \
         nxt AS ( \
           SELECT acked.*, (SELECT min(a.seq) FROM agent_messages a \
              WHERE a.project_id = $1 AND a.seq > acked.floor AND a.seq <= acked.head_seq \
                AND agentbus_owed(a.recipient_agent_id, a.recipient_agent_type, a.sender_agent_id, \
                                  a.seq, a.expires_at, acked.agent_id, acked.agent_type, acked.joined) \
                AND NOT (a.seq = ANY(acked.acked_above)) \
                AND (a.seq, acked.agent_id) NOT IN (SELECT d.seq, d.agent_id FROM d)) AS first_owed \
           FROM acked) \
         UPDATE members SET \
           ack_floor = COALESCE(nxt.first_owed - 1, nxt.head_seq), \
           acked_above = ARRAY(SELECT DISTINCT x FROM unnest(nxt.acked) AS x \
                               WHERE x > COALESCE(nxt.first_owed - 1, nxt.head_seq) \
                               ORDER BY x LIMIT $6), \
           last_seen_at = now() \
         FROM nxt WHERE members.project_id = $1 AND members.agent_id = nxt.agent_id \
         RETURNING members.agent_id, members.ack_floor, nxt.previous_floor, nxt.agent_type, \
                   members.joined_seq, nxt.recorded, nxt.ignored";

/// Moves the cursors of several members of one project (see [`apply_progress`]) in one
/// statement: planning it costs more than running it, so a write cycle plans once per
/// project rather than once per member. Returns the members' new cursors, by agent id;
/// agents that are not members are left out. Each agent appears at most once in `reports`.
async fn advance_cursors(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    reports: &[(&str, &Progress)],
) -> QueryResult<Vec<(String, Advance)>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        agent_id: String,
        #[diesel(embed)]
        advance: Advance,
    }
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let agents: Vec<&str> = reports.iter().map(|(agent, _)| *agent).collect();
    let up_tos: Vec<Option<i64>> = reports.iter().map(|(_, p)| p.up_to).collect();
    let (mut done_agents, mut done_seqs) = (Vec::new(), Vec::new());
    for (agent, progress) in reports {
        for &seq in &progress.done {
            done_agents.push(*agent);
            done_seqs.push(seq);
        }
    }
    let rows: Vec<Row> = diesel::sql_query(ADVANCE_CURSORS)
        .bind::<SqlUuid, _>(project_id)
        .bind::<Array<Text>, _>(&agents)
        .bind::<Array<Nullable<BigInt>>, _>(&up_tos)
        .bind::<Array<Text>, _>(&done_agents)
        .bind::<Array<BigInt>, _>(&done_seqs)
        .bind::<BigInt, _>(MAX_ACKED_ABOVE)
        .prepared()
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(|r| (r.agent_id, r.advance)).collect())
}

/// The statement of [`mark_delivered`].
pub const MARK_DELIVERED: &str = "UPDATE agent_messages a SET delivered_at = now() \
         FROM unnest($2::int8[], $3::int8[]) AS s(after, upto) \
         WHERE a.project_id = $1 AND a.seq > s.after AND a.seq <= s.upto \
           AND a.delivered_at IS NULL \
           AND EXISTS (SELECT 1 \
             FROM unnest($4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[]) \
               AS r(agent, agent_type, after, upto, joined) \
             WHERE a.seq > r.after AND a.seq <= r.upto \
               AND (a.expires_at IS NULL OR a.expires_at > now()) \
               AND agentbus_visible(a.recipient_agent_id, a.recipient_agent_type, \
                                    a.sender_agent_id, a.seq, r.agent, r.agent_type, r.joined))";

/// Sets `delivered_at` on the messages of one project that these ranges say were received
/// (each by an agent it is visible to) and that had none. One statement for all the agents
/// of the project: the ranges' union is scanned once, however many agents cover the same
/// seqs (every agent of a project covers the same broadcasts).
async fn mark_delivered(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    ranges: &[DeliveredRange<'_>],
) -> QueryResult<()> {
    if ranges.is_empty() {
        return Ok(());
    }
    // The union of the ranges as disjoint segments, so no row is read twice.
    let mut spans: Vec<(i64, i64)> = ranges.iter().map(|r| (r.after, r.upto)).collect();
    spans.sort_unstable();
    let mut union: Vec<(i64, i64)> = Vec::with_capacity(spans.len());
    for (after, upto) in spans {
        match union.last_mut() {
            Some(last) if after <= last.1 => last.1 = last.1.max(upto),
            _ => union.push((after, upto)),
        }
    }
    let (span_after, span_upto): (Vec<i64>, Vec<i64>) = union.into_iter().unzip();
    let agents: Vec<&str> = ranges.iter().map(|r| r.agent_id).collect();
    let types: Vec<&str> = ranges.iter().map(|r| r.agent_type).collect();
    let joined: Vec<Option<i64>> = ranges.iter().map(|r| r.joined_seq).collect();
    let afters: Vec<i64> = ranges.iter().map(|r| r.after).collect();
    let uptos: Vec<i64> = ranges.iter().map(|r| r.upto).collect();
    // Planned for its own ranges whatever the transaction asked for: with a generic plan
    // (`db::indexed_plan_transaction`) this statement took 51 instead of 3 ms a call once
    // the table held 300,000 rows (docs/PERFORMANCE.md, third round, fourth sitting). The
    // transaction's own mode is put back afterwards.
    #[derive(QueryableByName)]
    struct Mode {
        #[diesel(sql_type = Text)]
        previous: String,
    }
    let mode: Mode = diesel::sql_query(
        "SELECT current_setting('plan_cache_mode') AS previous, \
                set_config('plan_cache_mode', 'force_custom_plan', true) AS custom",
    )
    .prepared()
    .get_result(conn)
    .await?;
    diesel::sql_query(MARK_DELIVERED)
        .bind::<SqlUuid, _>(project_id)
        .bind::<Array<BigInt>, _>(&span_after)
        .bind::<Array<BigInt>, _>(&span_upto)
        .bind::<Array<Text>, _>(&agents)
        .bind::<Array<Text>, _>(&types)
        .bind::<Array<BigInt>, _>(&afters)
        .bind::<Array<BigInt>, _>(&uptos)
        .bind::<Array<Nullable<BigInt>>, _>(&joined)
        .prepared()
        .execute(conn)
        .await?;
    diesel::sql_query("SELECT set_config('plan_cache_mode', $1, true) AS restored")
        .bind::<Text, _>(&mode.previous)
        .prepared()
        .execute(conn)
        .await
        .map(drop)
}

/// The statement of [`mark_named_delivered`].
pub const MARK_NAMED_DELIVERED: &str = "UPDATE agent_messages SET delivered_at = now() \
         WHERE project_id = $1 AND seq = ANY($2) AND delivered_at IS NULL";

/// Sets `delivered_at` on these messages of one project, acknowledged one by one by an agent
/// each is visible to (so delivered even if it has expired since), if they had none. A
/// lookup by seq each, however many there are.
async fn mark_named_delivered(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    seqs: &[i64],
) -> QueryResult<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    diesel::sql_query(MARK_NAMED_DELIVERED)
        .bind::<SqlUuid, _>(project_id)
        .bind::<Array<BigInt>, _>(seqs)
        .prepared()
        .execute(conn)
        .await
        .map(drop)
}

/// The statement of [`settle_attempts`].
pub const SETTLE_ATTEMPTS: &str =
    "DELETE FROM delivery_attempts d USING unnest($2::text[], $3::int8[]) AS f(agent, floor) \
         WHERE d.project_id = $1 AND d.agent_id = f.agent AND d.seq <= f.floor";

/// Forgets delivery counts at or below each agent's floor: settled history. One statement per
/// project.
async fn settle_attempts(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    floors: &[(String, i64)],
) -> QueryResult<()> {
    if floors.is_empty() {
        return Ok(());
    }
    let (agents, floors): (Vec<&str>, Vec<i64>) =
        floors.iter().map(|(a, f)| (a.as_str(), *f)).unzip();
    diesel::sql_query(SETTLE_ATTEMPTS)
        .bind::<SqlUuid, _>(project_id)
        .bind::<Array<Text>, _>(&agents)
        .bind::<Array<BigInt>, _>(&floors)
        .prepared()
        .execute(conn)
        .await
        .map(drop)
}

/// The statement of [`mark_read`].
pub const MARK_READ: &str = "UPDATE agent_messages SET read_at = now() \
         WHERE project_id = $1 AND id = ANY($3) AND read_at IS NULL \
           AND agentbus_visible(recipient_agent_id, recipient_agent_type, sender_agent_id, seq, $2, \
                 (SELECT agent_type FROM members WHERE project_id = $1 AND agent_id = $2), 0)";

/// Records that `agent_id` read these messages: sets `read_at` of each one it may read (a
/// direct message to it, or a broadcast by someone else, to its type if addressed to a type)
/// that has none yet. Reading is not limited to what came after the agent's first connection
/// (history is there to be read), hence the joined seq 0 given to `agentbus_visible`.
pub async fn mark_read(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    ids: &[Uuid],
) -> QueryResult<usize> {
    diesel::sql_query(MARK_READ)
        .bind::<SqlUuid, _>(project_id)
        .bind::<Text, _>(agent_id)
        .bind::<Array<SqlUuid>, _>(ids)
        .prepared()
        .execute(conn)
        .await
}

pub async fn mark_disconnected(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    session_id: Uuid,
) -> QueryResult<()> {
    diesel::sql_query(
        "UPDATE members SET last_seen_at = now() \
         WHERE project_id = $1 AND agent_id = $2 AND current_session_id = $3",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(agent_id)
    .bind::<SqlUuid, _>(session_id)
    .prepared()
    .execute(conn)
    .await
    .map(drop)
}

/// A member as the agents listing shows it (presence is added by the caller).
#[derive(QueryableByName, Serialize, Debug, Clone)]
pub struct MemberRow {
    #[diesel(sql_type = Text)]
    pub agent_id: String,
    #[diesel(sql_type = Text)]
    pub agent_type: String,
    #[diesel(sql_type = BigInt)]
    pub ack_floor: i64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Timestamptz>)]
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Messages owed: the queue depth.
    #[diesel(sql_type = BigInt)]
    pub queue_depth: i64,
    #[diesel(sql_type = Array<Text>)]
    pub capabilities: Vec<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub description: Option<String>,
    /// How it last called in: `websocket`, `rest`, `mcp` (none: never).
    #[diesel(sql_type = Nullable<Text>)]
    pub interface: Option<String>,
    /// Its last REST/MCP call, for presence.
    #[diesel(sql_type = Nullable<diesel::sql_types::Timestamptz>)]
    pub last_called_at: Option<DateTime<Utc>>,
}

/// The members of a project (those declaring `capability`, when given), with their queues.
pub async fn list_members(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    capability: Option<&str>,
) -> QueryResult<Vec<MemberRow>> {
    diesel::sql_query(
        "SELECT m.agent_id, m.agent_type, m.ack_floor, m.last_seen_at, m.capabilities, m.description, \
           m.interface, m.last_called_at, \
           (SELECT count(*) FROM agent_messages a \
            WHERE a.project_id = m.project_id AND a.seq > m.ack_floor \
              AND agentbus_owed(a.recipient_agent_id, a.recipient_agent_type, a.sender_agent_id, \
                                a.seq, a.expires_at, m.agent_id, m.agent_type, m.joined_seq) \
              AND NOT (a.seq = ANY(m.acked_above))) AS queue_depth \
         FROM members m WHERE m.project_id = $1 AND ($2::text IS NULL OR $2 = ANY(m.capabilities)) \
         ORDER BY m.agent_id",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<Nullable<Text>, _>(capability)
    .prepared()
    .load(conn)
    .await
}

/// How often each of these messages was delivered to `agent_id` (manual mode), by seq.
pub async fn delivery_attempts(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    seqs: &[i64],
) -> QueryResult<std::collections::HashMap<i64, i32>> {
    #[derive(QueryableByName)]
    struct Attempts {
        #[diesel(sql_type = BigInt)]
        seq: i64,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        attempts: i32,
    }
    let rows: Vec<Attempts> = diesel::sql_query(
        "SELECT seq, attempts FROM delivery_attempts \
         WHERE project_id = $1 AND agent_id = $2 AND seq = ANY($3)",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(agent_id)
    .bind::<Array<BigInt>, _>(seqs)
    .prepared()
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.seq, r.attempts)).collect())
}

/// The statement of [`record_attempts`].
pub const RECORD_ATTEMPTS: &str =
    "INSERT INTO delivery_attempts (project_id, agent_id, seq, attempts) \
         SELECT $1, $2, s, count(*) FROM unnest($3::int8[]) AS s GROUP BY s \
         ON CONFLICT (project_id, agent_id, seq) \
         DO UPDATE SET attempts = delivery_attempts.attempts + EXCLUDED.attempts";

/// Counts one more delivery of each of these messages to `agent_id`.
pub async fn record_attempts(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    seqs: &[i64],
) -> QueryResult<()> {
    diesel::sql_query(RECORD_ATTEMPTS)
        .bind::<SqlUuid, _>(project_id)
        .bind::<Text, _>(agent_id)
        .bind::<Array<BigInt>, _>(seqs)
        .prepared()
        .execute(conn)
        .await
        .map(drop)
}

/// The statement of [`give_up`].
pub const GIVE_UP: &str = "INSERT INTO dead_letters (message_id, project_id, reason) \
         SELECT m, $1, 'max_deliveries' FROM unnest($2::uuid[]) AS m \
         ON CONFLICT (message_id) DO NOTHING";

/// Gives up on messages an agent was given the maximum number of times without
/// acknowledging them: they go to the dead-letter list (reason `max_deliveries`) and stop
/// being owed to that agent.
pub async fn give_up(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    messages: &[(Uuid, i64)],
) -> QueryResult<()> {
    let ids: Vec<Uuid> = messages.iter().map(|m| m.0).collect();
    diesel::sql_query(GIVE_UP)
        .bind::<SqlUuid, _>(project_id)
        .bind::<Array<SqlUuid>, _>(&ids)
        .prepared()
        .execute(conn)
        .await?;
    let progress = Progress {
        done: messages.iter().map(|m| m.1).collect(),
        up_to: None,
    };
    // Never acknowledged, so not delivered: the cursor moves, `delivered_at` does not.
    let floors: Vec<(String, i64)> = advance_cursors(conn, project_id, &[(agent_id, &progress)])
        .await?
        .into_iter()
        .map(|(agent_id, advance)| (agent_id, advance.ack_floor))
        .collect();
    settle_attempts(conn, project_id, &floors).await
}
