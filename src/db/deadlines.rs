//! Requests and their deadlines: the requests still waiting for a reply (re-armed when the
//! broker starts), and the sweep that dead-letters messages which expired before reaching
//! anyone they were owed to.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::Timestamptz;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::schema::agent_messages;

/// A request still waiting for its reply: (id, project, deadline).
pub type PendingRequest = (Uuid, Uuid, DateTime<Utc>);

/// Every request with a deadline that has no reply yet.
pub async fn pending_requests(conn: &mut AsyncPgConnection) -> QueryResult<Vec<PendingRequest>> {
    agent_messages::table
        .filter(agent_messages::expects_reply.eq(true))
        .filter(agent_messages::replied_at.is_null())
        .filter(agent_messages::reply_deadline.is_not_null())
        .select((
            agent_messages::id,
            agent_messages::project_id,
            agent_messages::reply_deadline.assume_not_null(),
        ))
        .load(conn)
        .await
}

/// How many requests of a project are still waiting for their reply.
pub async fn count_pending(conn: &mut AsyncPgConnection, project_id: Uuid) -> QueryResult<i64> {
    agent_messages::table
        .filter(agent_messages::project_id.eq(project_id))
        .filter(agent_messages::expects_reply.eq(true))
        .filter(agent_messages::replied_at.is_null())
        .count()
        .get_result(conn)
        .await
}

/// Records as dead letters (reason `expired`) the messages that expired in `(from, until]`
/// undelivered although they were owed to a member at expiry. Returns how many were added.
pub async fn sweep_expired(
    conn: &mut AsyncPgConnection,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> QueryResult<usize> {
    // "Was owed to someone" at expiry: visible to a member (`agentbus_owed` without its
    // expiry test, since every row here has expired).
    diesel::sql_query(
        "INSERT INTO dead_letters (message_id, project_id, reason, dead_at) \
         SELECT a.id, a.project_id, 'expired', a.expires_at FROM agent_messages a \
         WHERE a.expires_at IS NOT NULL AND a.delivered_at IS NULL \
           AND a.expires_at > $1 AND a.expires_at <= $2 \
           AND EXISTS (SELECT 1 FROM members m \
             WHERE m.project_id = a.project_id \
               AND agentbus_visible(a.recipient_agent_id, a.recipient_agent_type, \
                     a.sender_agent_id, a.seq, m.agent_id, m.agent_type, m.joined_seq)) \
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind::<Timestamptz, _>(from)
    .bind::<Timestamptz, _>(until)
    .execute(conn)
    .await
}
