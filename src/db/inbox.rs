//! Members that call in without a socket: joining over REST or MCP (explicitly, or implicitly
//! on their first call), their presence, what they are owed, and the notification watermark.
//!
//! What a member is owed is defined in [`super::cursors`]; this module reads it through the
//! same queries.

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::cursors::{self, MemberCursor, OwedQuery};
use crate::db::prepared::PrepareOnce;
use crate::models::StoredMessage;

/// How a member calls in, as stored in `members.interface`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    Rest,
    Mcp,
}

impl Interface {
    pub fn as_str(self) -> &'static str {
        match self {
            Interface::Rest => "rest",
            Interface::Mcp => "mcp",
        }
    }
}

/// What a call as an agent says about it.
#[derive(Debug, Clone)]
pub struct Joining<'a> {
    pub project_id: Uuid,
    pub agent_id: &'a str,
    pub agent_type: &'a str,
    pub interface: Interface,
    /// An explicit join (`POST …/agents`) sets the type of an existing member; an implicit
    /// one (any other call) sets it only on a new member or one of type `unknown` (made by a
    /// direct message naming it).
    pub explicit: bool,
    /// Replaced when given.
    pub capabilities: Option<&'a [String]>,
    pub description: Option<&'a str>,
}

/// A member's delivery state and its notification watermark.
#[derive(QueryableByName, Debug, Clone)]
pub struct MemberState {
    #[diesel(embed)]
    pub cursor: MemberCursor,
    #[diesel(sql_type = BigInt)]
    pub notified_seq: i64,
}

/// Makes the agent a member (joined at the project's committed head: broadcasts after it are
/// owed to it, not those before) or refreshes it, and records the call as its presence.
/// `None` when the project does not exist.
pub async fn join(
    conn: &mut AsyncPgConnection,
    joining: &Joining<'_>,
) -> QueryResult<Option<MemberState>> {
    diesel::sql_query(
        "INSERT INTO members (project_id, agent_id, agent_type, ack_floor, joined_seq, \
                              interface, last_called_at, last_seen_at, capabilities, description) \
         SELECT p.id, $2, $3, p.head_seq, p.head_seq, $4, now(), now(), COALESCE($6, '{}'), $7 \
         FROM projects p WHERE p.id = $1 \
         ON CONFLICT (project_id, agent_id) DO UPDATE SET \
           agent_type = CASE WHEN $5 OR members.agent_type = 'unknown' \
                             THEN EXCLUDED.agent_type ELSE members.agent_type END, \
           joined_seq = COALESCE(members.joined_seq, EXCLUDED.joined_seq), \
           interface = EXCLUDED.interface, \
           last_called_at = now(), \
           last_seen_at = now(), \
           capabilities = COALESCE($6, members.capabilities), \
           description = COALESCE($7, members.description) \
         RETURNING ack_floor, acked_above, joined_seq, agent_type, notified_seq",
    )
    .bind::<SqlUuid, _>(joining.project_id)
    .bind::<Text, _>(joining.agent_id)
    .bind::<Text, _>(joining.agent_type)
    .bind::<Text, _>(joining.interface.as_str())
    .bind::<Bool, _>(joining.explicit)
    .bind::<Nullable<Array<Text>>, _>(joining.capabilities)
    .bind::<Nullable<Text>, _>(joining.description)
    .prepared()
    .get_result(conn)
    .await
    .optional()
}

/// A member's state now. `None` when it is no member.
pub async fn member_state(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
) -> QueryResult<Option<MemberState>> {
    diesel::sql_query(
        "SELECT ack_floor, acked_above, joined_seq, agent_type, notified_seq FROM members \
         WHERE project_id = $1 AND agent_id = $2",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(agent_id)
    .prepared()
    .get_result(conn)
    .await
    .optional()
}

/// The owed-messages query of a member, for seqs above `after`.
fn owed_query(
    project_id: Uuid,
    agent_id: &str,
    cursor: &MemberCursor,
    after: i64,
    by_priority: bool,
    limit: i64,
) -> OwedQuery {
    OwedQuery {
        project_id,
        agent_id: agent_id.to_owned(),
        agent_type: cursor.agent_type.clone(),
        after,
        upto: i64::MAX,
        broadcasts_after: cursor.broadcasts_after(),
        acked: cursor.acked_above.clone(),
        by_priority,
        resume: if by_priority { (-1, 0) } else { (0, after) },
        limit,
        observer: false,
    }
}

/// Priorities that count as urgent (`urgent_only`): critical (0) and high (1).
pub const URGENT_PRIORITIES: usize = 2;

/// Which page of an inbox to read, and how large it may be.
#[derive(Debug, Clone, Copy)]
pub struct PageBounds {
    /// Most messages.
    pub limit: i64,
    /// Only priority 0–1.
    pub urgent_only: bool,
    /// Continue after this (priority, seq) of the delivery order.
    pub resume: Option<(i16, i64)>,
    /// Most bytes of messages (at least one message is returned).
    pub max_bytes: usize,
}

/// One page of what a member is owed, in replay order (priority, then seq).
#[derive(Debug, Clone)]
pub struct OwedPage {
    pub messages: Vec<StoredMessage>,
    /// How many more are owed after this page (of the urgent ones, with `urgent_only`). When
    /// the page continues from a point of the delivery order (`resume`), those before that
    /// point count too.
    pub remaining: i64,
    /// The page stopped at its byte budget before its `limit`.
    pub truncated: bool,
}

/// The first `limit` messages the member is owed, in replay order; only urgent ones (priority
/// 0–1) with `urgent_only`. The page also stops before the message that would take it over
/// `max_bytes` (it always holds one message, however large; see [`super::paging`]).
pub async fn owed_page(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    cursor: &MemberCursor,
    page: &PageBounds,
) -> QueryResult<OwedPage> {
    let PageBounds {
        limit,
        urgent_only,
        resume,
        max_bytes,
    } = *page;
    let mut query = owed_query(project_id, agent_id, cursor, cursor.ack_floor, true, limit);
    if let Some(resume) = resume {
        query.resume = resume;
    }
    let counts = cursors::owed_counts(conn, &query, None).await?;
    let owed: i64 = if urgent_only {
        counts[..URGENT_PRIORITIES].iter().sum()
    } else {
        counts.iter().sum()
    };
    if owed == 0 {
        return Ok(OwedPage {
            messages: Vec::new(),
            remaining: 0,
            truncated: false,
        });
    }
    // In replay order the urgent messages come first: a page no longer than their count
    // holds only them (one that arrived meanwhile could push a later one in: filtered).
    let query = OwedQuery {
        limit: limit.min(owed),
        ..query
    };
    let (mut messages, truncated) =
        super::paging::owed_page_within(conn, &query, max_bytes).await?;
    if urgent_only {
        messages.retain(|m| (m.priority as usize) < URGENT_PRIORITIES);
    }
    Ok(OwedPage {
        remaining: (owed - messages.len() as i64).max(0),
        messages,
        truncated,
    })
}

/// What the member is owed above its notification watermark: the `limit` lowest seqs of it,
/// returned in replay order, so that the watermark can move to the highest seq returned
/// without passing over one not returned. `remaining`: how many more are owed above that.
pub async fn unnotified(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    state: &MemberState,
    limit: i64,
) -> QueryResult<OwedPage> {
    let after = state.notified_seq.max(state.cursor.ack_floor);
    let query = owed_query(project_id, agent_id, &state.cursor, after, false, limit);
    let mut messages = cursors::owed_page(conn, &query).await?;
    let upto = messages.last().map_or(after, |m| m.seq);
    let rest = OwedQuery {
        after: upto,
        resume: (0, upto),
        ..query
    };
    let remaining: i64 = cursors::owed_counts(conn, &rest, None).await?.iter().sum();
    messages.sort_by_key(|m| (m.priority, m.seq));
    Ok(OwedPage {
        messages,
        remaining,
        truncated: false,
    })
}

/// Moves the notification watermark up to `seq` (never down). Returns the watermark.
pub async fn advance_notified(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: &str,
    seq: i64,
) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        notified_seq: i64,
    }
    let row: Row = diesel::sql_query(
        "UPDATE members SET notified_seq = GREATEST(notified_seq, $3) \
         WHERE project_id = $1 AND agent_id = $2 RETURNING notified_seq",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(agent_id)
    .bind::<BigInt, _>(seq)
    .prepared()
    .get_result(conn)
    .await?;
    Ok(row.notified_seq)
}
