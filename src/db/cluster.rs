//! Several brokers on one database: the node rows and their heartbeats, the sessions each node
//! holds, the duties done once per database, and the notifications nodes send each other.
//!
//! Two notification channels, both only wake-ups (never message bodies):
//! - [`COMMITS`]: one notification per committed batch per project, sent by the batch's own
//!   transaction (see `db::batch`), with the node, the project and the seq range:
//!   `"<node> <project> <first> <last>"`. Every other node's channel of that project reads the
//!   rows by seq.
//! - [`EVENTS`]: everything else, as JSON: a connection taking over an agent (`takeover`,
//!   with the generation that decides which connection survives), a revoked token
//!   (`revoked`), and a node leaving (`left`).
//!
//! A node is dead when its heartbeat is older than the `timeout_ms` it registered with; any
//! node then deletes its row, which removes its sessions (cascade) and frees its duties.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::db::prepared::PrepareOnce;
use crate::models::StoredMessage;
use crate::schema::agent_messages;

/// The notification channel of committed batches.
pub const COMMITS: &str = "agentbus_commits";
/// The notification channel of takeovers, revocations and departures.
pub const EVENTS: &str = "agentbus_cluster";

/// The duties done by one node per database.
pub const DUTIES: &[&str] = &[SWEEP, SEARCH, TIMEOUTS];
/// The dead-letter sweep of expired messages.
pub const SWEEP: &str = "sweep";
/// The full-text search indexer.
pub const SEARCH: &str = "search";
/// Re-arming the request timeouts of nodes that left or died.
pub const TIMEOUTS: &str = "timeouts";

/// What one node tells the others (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ClusterEvent {
    /// A batch committed on `node` holds the seqs `first..=last` of `project`.
    Commits {
        node: String,
        project: Uuid,
        first: i64,
        last: i64,
    },
    /// A connection of `agent` registered with `generation`: every connection of the agent
    /// with a lower generation, on any node, is replaced.
    Takeover {
        node: String,
        project: Uuid,
        agent: String,
        generation: i64,
    },
    /// A token of `project` was revoked: the connections opened with it close.
    Revoked {
        node: String,
        project: Uuid,
        token: Uuid,
    },
    /// `node` left (graceful shutdown): its duties are free.
    Left { node: String },
    /// `node` joined, before accepting any connection: the others follow its commits from
    /// its first one.
    Joined { node: String },
}

impl ClusterEvent {
    /// The node the event comes from.
    pub fn node(&self) -> &str {
        match self {
            ClusterEvent::Commits { node, .. }
            | ClusterEvent::Takeover { node, .. }
            | ClusterEvent::Revoked { node, .. }
            | ClusterEvent::Left { node }
            | ClusterEvent::Joined { node } => node,
        }
    }

    /// Reads a notification of either channel; `None` for anything else.
    pub fn parse(channel: &str, payload: &str) -> Option<ClusterEvent> {
        match channel {
            COMMITS => {
                let mut parts = payload.split(' ');
                let node = parts.next()?.to_owned();
                let project = parts.next()?.parse().ok()?;
                let first = parts.next()?.parse().ok()?;
                let last = parts.next()?.parse().ok()?;
                Some(ClusterEvent::Commits {
                    node,
                    project,
                    first,
                    last,
                })
            }
            EVENTS => serde_json::from_str(payload).ok(),
            _ => None,
        }
    }
}

/// A dedicated connection (never a pooled one: LISTEN belongs to the connection) listening on
/// both channels.
pub async fn listener(database_url: &str) -> anyhow::Result<AsyncPgConnection> {
    let mut conn = AsyncPgConnection::establish(database_url).await?;
    conn.batch_execute(&format!("LISTEN {COMMITS}; LISTEN {EVENTS}"))
        .await?;
    Ok(conn)
}

/// A dedicated connection, apart from the pool.
pub async fn connect(database_url: &str) -> diesel::ConnectionResult<AsyncPgConnection> {
    AsyncPgConnection::establish(database_url).await
}

/// A round trip on the listening connection, to notice a connection that died quietly.
pub async fn ping(conn: &mut AsyncPgConnection) -> QueryResult<()> {
    conn.batch_execute("SELECT 1").await
}

async fn notify(conn: &mut AsyncPgConnection, event: &ClusterEvent) -> QueryResult<()> {
    let payload = serde_json::to_string(event)
        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    diesel::sql_query("SELECT pg_notify($1, $2)")
        .bind::<Text, _>(EVENTS)
        .bind::<Text, _>(payload)
        .execute(conn)
        .await
        .map(drop)
}

/// Tells every node that a token was revoked.
pub async fn notify_revoked(
    conn: &mut AsyncPgConnection,
    node: &str,
    project: Uuid,
    token: Uuid,
) -> QueryResult<()> {
    notify(
        conn,
        &ClusterEvent::Revoked {
            node: node.to_owned(),
            project,
            token,
        },
    )
    .await
}

/// The row of a node as it is stored.
#[derive(Queryable, Selectable, Debug, Clone, Serialize)]
#[diesel(table_name = crate::schema::cluster_nodes, check_for_backend(diesel::pg::Pg))]
pub struct NodeRow {
    pub node_id: String,
    pub address: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub timeout_ms: i64,
}

/// Who holds `node_id` now, if a row has it: its last heartbeat, and whether that is within
/// its timeout (by the database's clock).
pub async fn node_holder(
    conn: &mut AsyncPgConnection,
    node_id: &str,
) -> QueryResult<Option<(DateTime<Utc>, bool)>> {
    #[derive(QueryableByName)]
    struct Holder {
        #[diesel(sql_type = Timestamptz)]
        heartbeat_at: DateTime<Utc>,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        alive: bool,
    }
    let holder: Option<Holder> = diesel::sql_query(
        "SELECT heartbeat_at, heartbeat_at >= now() - timeout_ms * interval '1 millisecond' AS alive \
         FROM cluster_nodes WHERE node_id = $1",
    )
    .bind::<Text, _>(node_id)
    .get_result(conn)
    .await
    .optional()?;
    Ok(holder.map(|h| (h.heartbeat_at, h.alive)))
}

/// Registers a node: a row of an earlier run with the same id (dead, or found stale by the
/// caller) is replaced, its sessions marked disconnected and removed, its duties freed.
pub async fn register_node(
    conn: &mut AsyncPgConnection,
    node_id: &str,
    address: &str,
    timeout_ms: i64,
) -> QueryResult<()> {
    conn.transaction(async |conn| {
        remove_nodes(conn, &[node_id.to_owned()]).await?;
        diesel::sql_query(
            "INSERT INTO cluster_nodes (node_id, address, timeout_ms) VALUES ($1, $2, $3)",
        )
        .bind::<Text, _>(node_id)
        .bind::<Text, _>(address)
        .bind::<BigInt, _>(timeout_ms)
        .execute(conn)
        .await?;
        notify(
            conn,
            &ClusterEvent::Joined {
                node: node_id.to_owned(),
            },
        )
        .await
    })
    .await
}

/// How many other nodes have a row (alive, or dead and not yet removed).
pub async fn other_nodes(conn: &mut AsyncPgConnection, node_id: &str) -> QueryResult<i64> {
    use crate::schema::cluster_nodes;
    cluster_nodes::table
        .filter(cluster_nodes::node_id.ne(node_id))
        .count()
        .get_result(conn)
        .await
}

/// Marks the sessions of these nodes disconnected and deletes the nodes (their session rows
/// go with them, their duties become free).
async fn remove_nodes(conn: &mut AsyncPgConnection, nodes: &[String]) -> QueryResult<()> {
    diesel::sql_query(
        "UPDATE sessions SET disconnected_at = now() WHERE disconnected_at IS NULL \
           AND id IN (SELECT session_id FROM cluster_sessions WHERE node_id = ANY($1))",
    )
    .bind::<Array<Text>, _>(nodes)
    .execute(conn)
    .await?;
    diesel::sql_query(
        "UPDATE members m SET last_seen_at = now() \
         FROM cluster_sessions s \
         WHERE s.node_id = ANY($1) AND m.project_id = s.project_id AND m.agent_id = s.agent_id \
           AND m.current_session_id = s.session_id",
    )
    .bind::<Array<Text>, _>(nodes)
    .execute(conn)
    .await?;
    diesel::sql_query("DELETE FROM cluster_nodes WHERE node_id = ANY($1)")
        .bind::<Array<Text>, _>(nodes)
        .execute(conn)
        .await
        .map(drop)
}

/// A node leaves (graceful shutdown): its sessions are marked disconnected, its row, session
/// rows and duties go, and the others are told.
pub async fn leave(conn: &mut AsyncPgConnection, node_id: &str) -> QueryResult<()> {
    conn.transaction(async |conn| {
        remove_nodes(conn, &[node_id.to_owned()]).await?;
        notify(
            conn,
            &ClusterEvent::Left {
                node: node_id.to_owned(),
            },
        )
        .await
    })
    .await
}

/// The node's heartbeat. `false`: its row is gone (the others declared it dead).
pub async fn heartbeat(conn: &mut AsyncPgConnection, node_id: &str) -> QueryResult<bool> {
    diesel::sql_query("UPDATE cluster_nodes SET heartbeat_at = now() WHERE node_id = $1")
        .bind::<Text, _>(node_id)
        .prepared()
        .execute(conn)
        .await
        .map(|n| n == 1)
}

/// Deletes the nodes whose heartbeat is older than their timeout (marking their sessions
/// disconnected): returns their ids.
pub async fn reap(conn: &mut AsyncPgConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Dead {
        #[diesel(sql_type = Text)]
        node_id: String,
    }
    conn.transaction(async |conn| {
        let dead: Vec<Dead> = diesel::sql_query(
            "SELECT node_id FROM cluster_nodes \
             WHERE heartbeat_at < now() - timeout_ms * interval '1 millisecond' FOR UPDATE",
        )
        .prepared()
        .load(conn)
        .await?;
        let dead: Vec<String> = dead.into_iter().map(|d| d.node_id).collect();
        if !dead.is_empty() {
            remove_nodes(conn, &dead).await?;
        }
        Ok(dead)
    })
    .await
}

/// Takes every duty that is free (no holder, or a holder that is not alive), then returns
/// the duties this node holds.
pub async fn claim_duties(conn: &mut AsyncPgConnection, node_id: &str) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Duty {
        #[diesel(sql_type = Text)]
        duty: String,
    }
    diesel::sql_query(
        "UPDATE cluster_duties d SET node_id = $1, acquired_at = now() \
         WHERE d.node_id IS DISTINCT FROM $1 AND EXISTS (SELECT 1 FROM cluster_nodes me WHERE me.node_id = $1) \
           AND NOT EXISTS (SELECT 1 FROM cluster_nodes n WHERE n.node_id = d.node_id \
             AND n.heartbeat_at >= now() - n.timeout_ms * interval '1 millisecond')",
    )
    .bind::<Text, _>(node_id)
    .prepared()
    .execute(conn)
    .await?;
    let held: Vec<Duty> =
        diesel::sql_query("SELECT duty FROM cluster_duties WHERE node_id = $1 ORDER BY duty")
            .bind::<Text, _>(node_id)
            .prepared()
            .load(conn)
            .await?;
    Ok(held.into_iter().map(|d| d.duty).collect())
}

/// Records a live session of this node and returns its generation. For an agent, the row of
/// its previous connection (on any node) is replaced and every node is told, in the same
/// transaction: the connection with the highest generation is the one that survives.
pub async fn register_session(
    conn: &mut AsyncPgConnection,
    node_id: &str,
    session_id: Uuid,
    project_id: Uuid,
    agent_id: Option<&str>,
) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Generation {
        #[diesel(sql_type = BigInt)]
        generation: i64,
    }
    let Some(agent_id) = agent_id else {
        return diesel::sql_query(
            "INSERT INTO cluster_sessions (session_id, node_id, project_id, generation) \
             VALUES ($1, $2, $3, nextval('cluster_session_generation')) RETURNING generation",
        )
        .bind::<SqlUuid, _>(session_id)
        .bind::<Text, _>(node_id)
        .bind::<SqlUuid, _>(project_id)
        .prepared()
        .get_result::<Generation>(conn)
        .await
        .map(|g| g.generation);
    };
    // The generation of a replacing row is taken under the row's lock, so generations follow
    // the order in which connections of one agent registered, whichever node they are on.
    // The replaced session is marked disconnected here: it is closing (4001), or its node
    // died and nobody else would.
    diesel::sql_query(
        "WITH old AS (SELECT c.session_id FROM cluster_sessions c \
           WHERE c.project_id = $3 AND c.agent_id = $4 AND c.session_id <> $1), \
         gone AS (UPDATE sessions SET disconnected_at = now() \
           WHERE id IN (SELECT session_id FROM old) AND disconnected_at IS NULL RETURNING id), \
         s AS (INSERT INTO cluster_sessions (session_id, node_id, project_id, agent_id, generation) \
           VALUES ($1, $2, $3, $4, nextval('cluster_session_generation')) \
           ON CONFLICT (project_id, agent_id) DO UPDATE SET session_id = EXCLUDED.session_id, \
             node_id = EXCLUDED.node_id, connected_at = now(), \
             generation = nextval('cluster_session_generation') \
           RETURNING generation) \
         SELECT s.generation, pg_notify($5, json_build_object('kind', 'takeover', 'node', $2::text, \
           'project', $3::uuid, 'agent', $4::text, 'generation', s.generation)::text) AS notified \
         FROM s",
    )
    .bind::<SqlUuid, _>(session_id)
    .bind::<Text, _>(node_id)
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(agent_id)
    .bind::<Text, _>(EVENTS)
    .prepared()
    .get_result::<Generation>(conn)
    .await
    .map(|g| g.generation)
}

/// A session ended: its row goes, unless a newer connection of the agent replaced it.
pub async fn unregister_session(conn: &mut AsyncPgConnection, session_id: Uuid) -> QueryResult<()> {
    diesel::sql_query("DELETE FROM cluster_sessions WHERE session_id = $1")
        .bind::<SqlUuid, _>(session_id)
        .prepared()
        .execute(conn)
        .await
        .map(drop)
}

/// The agents of a project connected to other live nodes than `node_id`, with their session.
pub async fn remote_sessions(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    node_id: &str,
) -> QueryResult<Vec<(String, Uuid)>> {
    #[derive(QueryableByName)]
    struct Remote {
        #[diesel(sql_type = Text)]
        agent_id: String,
        #[diesel(sql_type = SqlUuid)]
        session_id: Uuid,
    }
    let rows: Vec<Remote> = diesel::sql_query(
        "SELECT s.agent_id, s.session_id FROM cluster_sessions s \
         JOIN cluster_nodes n ON n.node_id = s.node_id \
         WHERE s.project_id = $1 AND s.agent_id IS NOT NULL AND s.node_id <> $2 \
           AND n.heartbeat_at >= now() - n.timeout_ms * interval '1 millisecond'",
    )
    .bind::<SqlUuid, _>(project_id)
    .bind::<Text, _>(node_id)
    .prepared()
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.agent_id, r.session_id))
        .collect())
}

/// The head seq of each of these projects (those that exist).
pub async fn project_heads(
    conn: &mut AsyncPgConnection,
    projects: &[Uuid],
) -> QueryResult<Vec<(Uuid, i64)>> {
    #[derive(QueryableByName)]
    struct Head {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = BigInt)]
        head_seq: i64,
    }
    let heads: Vec<Head> =
        diesel::sql_query("SELECT id, head_seq FROM projects WHERE id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(projects)
            .prepared()
            .load(conn)
            .await?;
    Ok(heads.into_iter().map(|h| (h.id, h.head_seq)).collect())
}

/// The committed messages of a project with a seq in `(after, upto]`, in seq order, at most
/// `limit`.
pub async fn committed_range(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    after: i64,
    upto: i64,
    limit: i64,
) -> QueryResult<Vec<StoredMessage>> {
    agent_messages::table
        .filter(agent_messages::project_id.eq(project_id))
        .filter(agent_messages::seq.gt(after))
        .filter(agent_messages::seq.le(upto))
        .order(agent_messages::seq.asc())
        .limit(limit)
        .select(StoredMessage::as_select())
        .load(conn)
        .await
}

/// A session as `GET /api/cluster` lists it.
#[derive(Queryable, Debug, Clone, Serialize)]
pub struct SessionRow {
    pub session_id: Uuid,
    pub node_id: String,
    pub project_id: Uuid,
    pub agent_id: Option<String>,
    pub connected_at: DateTime<Utc>,
}

/// Every node (alive or not yet reaped), every session and every duty holder.
pub async fn overview(
    conn: &mut AsyncPgConnection,
) -> QueryResult<(Vec<NodeRow>, Vec<SessionRow>, Vec<(String, Option<String>)>)> {
    use crate::schema::{cluster_duties, cluster_nodes, cluster_sessions};
    let nodes = cluster_nodes::table
        .order(cluster_nodes::node_id)
        .select(NodeRow::as_select())
        .load(conn)
        .await?;
    let sessions = cluster_sessions::table
        .order((cluster_sessions::node_id, cluster_sessions::connected_at))
        .select((
            cluster_sessions::session_id,
            cluster_sessions::node_id,
            cluster_sessions::project_id,
            cluster_sessions::agent_id,
            cluster_sessions::connected_at,
        ))
        .load(conn)
        .await?;
    let duties = cluster_duties::table
        .order(cluster_duties::duty)
        .select((cluster_duties::duty, cluster_duties::node_id))
        .load(conn)
        .await?;
    Ok((nodes, sessions, duties))
}

/// Whether a node with this id has a row (alive or not yet reaped).
pub async fn node_exists(conn: &mut AsyncPgConnection, node_id: &str) -> QueryResult<bool> {
    use crate::schema::cluster_nodes;
    diesel::select(diesel::dsl::exists(
        cluster_nodes::table.filter(cluster_nodes::node_id.eq(node_id)),
    ))
    .get_result(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_notifications_parse() {
        let project = Uuid::new_v4();
        assert_eq!(
            ClusterEvent::parse(COMMITS, &format!("node-a {project} 3 7")),
            Some(ClusterEvent::Commits {
                node: "node-a".into(),
                project,
                first: 3,
                last: 7
            })
        );
        assert_eq!(ClusterEvent::parse(COMMITS, "node-a nope 3 7"), None);
        assert_eq!(ClusterEvent::parse("other", "x"), None);
    }

    #[test]
    fn events_round_trip_as_json() {
        let event = ClusterEvent::Takeover {
            node: "n1".into(),
            project: Uuid::new_v4(),
            agent: "a b".into(),
            generation: 42,
        };
        let text = serde_json::to_string(&event).unwrap();
        assert!(text.contains("\"kind\":\"takeover\""), "{text}");
        assert_eq!(ClusterEvent::parse(EVENTS, &text), Some(event));
    }
}
