//! `ClusterActor`: this broker as one node of several on the same PostgreSQL database.
//!
//! - **Heartbeat.** Every `node_heartbeat_ms` the node refreshes its row in `cluster_nodes`.
//!   A node whose heartbeat is older than its `node_timeout_ms` is dead: the next node to tick
//!   deletes its row, which marks its sessions disconnected and removes them, and frees its
//!   duties. A node that finds its own row gone (it was paused longer than its timeout)
//!   registers again and closes its sessions with 1001, since the others no longer count them.
//! - **Duties**, done by one node per database: the dead-letter sweep (`sweep`), the search
//!   indexer (`search`), and re-arming the request timeouts of nodes that left or died
//!   (`timeouts`). Each tick claims the duties whose holder is gone; a node that leaves frees
//!   its duties and says so, and the others claim them at once.
//! - **Notifications** (`db::cluster`), on one dedicated connection: other nodes' commits go
//!   to the project's channel ([`RemoteCommits`]) and wake the search indexer; takeovers and
//!   revocations go to the channel too. A missed notification is caught by the periodic head
//!   check ([`HeadCheck`]).
//!
//! The sessions themselves are registered by their channel (`ChannelActor`'s `Join`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use diesel_async::AsyncPgConnection;
use futures_util::StreamExt;
use uuid::Uuid;

use super::channel::{CloseSessions, HeadCheck, RemoteCommits, Revoked, Takeover};
use super::deadlines::{Duties, Rearm};
use super::registry::ChannelRegistry;
use super::search::{IndexSoon, Indexing};
use crate::db::cluster::{self, ClusterEvent};
use crate::db::DbPool;

/// How long the listener waits before connecting again after its connection failed.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
/// How often the listening connection is checked with a round trip.
const LISTEN_PING: Duration = Duration::from_secs(10);

/// Who this node is, and how it keeps its place in the cluster.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: String,
    /// Where it listens (as started, with the port it got).
    pub address: String,
    pub database_url: String,
    pub heartbeat: Duration,
    pub timeout: Duration,
}

pub struct ClusterActor {
    config: NodeConfig,
    /// Whether other nodes share the database, shared with the channels.
    peers: Arc<AtomicBool>,
    registry: ChannelRegistry,
    deadlines: Recipient<Duties>,
    /// Told to re-arm the deadlines of brokers that left or died: request timeouts, and
    /// claim and task deadlines.
    rearm: Vec<Recipient<Rearm>>,
    indexing: Recipient<Indexing>,
    index_soon: Recipient<IndexSoon>,
    /// The duties this node holds, as of its last tick.
    duties: BTreeSet<String>,
    /// A tick is in flight (they never overlap).
    ticking: bool,
    /// The node's own connection for its ticks (none while a tick holds it, or after it
    /// failed), apart from the pool: the heartbeat never waits for a pooled connection.
    conn: Option<AsyncPgConnection>,
    /// A node left or died since the last tick: the holder of `timeouts` re-arms.
    departed: bool,
}

impl ClusterActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: NodeConfig,
        peers: Arc<AtomicBool>,
        registry: ChannelRegistry,
        deadlines: Recipient<Duties>,
        rearm: Vec<Recipient<Rearm>>,
        indexing: Recipient<Indexing>,
        index_soon: Recipient<IndexSoon>,
    ) -> Self {
        ClusterActor {
            config,
            peers,
            registry,
            deadlines,
            rearm,
            indexing,
            index_soon,
            duties: BTreeSet::new(),
            ticking: false,
            conn: None,
            departed: false,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.ticking {
            return;
        }
        self.ticking = true;
        let config = self.config.clone();
        let channels = self.registry.projects();
        let projects: Vec<Uuid> = channels.iter().map(|(id, _)| *id).collect();
        let conn = self.conn.take();
        let work = async move {
            let mut conn = match conn {
                Some(conn) => conn,
                None => cluster::connect(&config.database_url)
                    .await
                    .map_err(|e| e.to_string())?,
            };
            let work = tick_work(&mut conn, &config, &projects);
            // A connection that hangs is dropped; the next tick opens another.
            match tokio::time::timeout(config.timeout, work).await {
                Ok(Ok(done)) => Ok((conn, done)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("no answer within {:?}", config.timeout)),
            }
        };
        ctx.spawn(work.into_actor(self).map(move |result, act, _ctx| {
            act.ticking = false;
            let (alive, dead, duties, heads, others) = match result {
                Ok((conn, done)) => {
                    act.conn = Some(conn);
                    done
                }
                Err(e) => {
                    log::warn!("node {}: cluster heartbeat failed: {e}", act.config.node_id);
                    return;
                }
            };
            act.after_tick(alive, dead, duties, heads, others, &channels);
        }));
    }
}

/// The heartbeat, the removal of dead nodes, the claim of free duties, the number of other
/// nodes and the heads of the projects whose channels run here, on the node's own connection.
async fn tick_work(
    conn: &mut AsyncPgConnection,
    config: &NodeConfig,
    projects: &[Uuid],
) -> Result<TickResult, String> {
    let alive = cluster::heartbeat(conn, &config.node_id)
        .await
        .map_err(|e| e.to_string())?;
    if !alive {
        cluster::register_node(
            conn,
            &config.node_id,
            &config.address,
            config.timeout.as_millis() as i64,
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    let dead = cluster::reap(conn).await.map_err(|e| e.to_string())?;
    let duties = cluster::claim_duties(conn, &config.node_id)
        .await
        .map_err(|e| e.to_string())?;
    let others = cluster::other_nodes(conn, &config.node_id)
        .await
        .map_err(|e| e.to_string())?;
    let heads = if projects.is_empty() {
        Vec::new()
    } else {
        cluster::project_heads(conn, projects)
            .await
            .map_err(|e| e.to_string())?
    };
    Ok((alive, dead, duties, heads, others))
}

/// What a tick found: alive, the nodes declared dead, the duties held, the project heads and
/// how many other nodes there are.
type TickResult = (bool, Vec<String>, Vec<String>, Vec<(Uuid, i64)>, i64);

impl ClusterActor {
    fn after_tick(
        &mut self,
        alive: bool,
        dead: Vec<String>,
        duties: Vec<String>,
        heads: Vec<(Uuid, i64)>,
        others: i64,
        channels: &[(Uuid, Addr<super::channel::ChannelActor>)],
    ) {
        if !alive {
            log::warn!(
                "node {}: the other nodes declared this node dead (no heartbeat for {:?}); \
                     rejoined, closing its sessions so that their agents reconnect",
                self.config.node_id,
                self.config.timeout
            );
            for channel in self.registry.all() {
                channel.do_send(CloseSessions);
            }
        }
        for node in &dead {
            log::info!(
                "node {}: node {node} declared dead (no heartbeat within its timeout); \
                     its sessions are gone and its duties free",
                self.config.node_id
            );
        }
        self.departed |= !dead.is_empty();
        self.peers.store(others > 0, Ordering::Relaxed);
        self.apply_duties(duties.into_iter().collect());
        for (project, head) in heads {
            if let Some((_, channel)) = channels.iter().find(|(id, _)| *id == project) {
                channel.do_send(HeadCheck { head });
            }
        }
    }

    /// Starts and stops what the duties held now call for.
    fn apply_duties(&mut self, duties: BTreeSet<String>) {
        let held = |set: &BTreeSet<String>, duty: &str| set.contains(duty);
        for duty in duties.difference(&self.duties) {
            log::info!("node {}: took the {duty} duty", self.config.node_id);
        }
        for duty in self.duties.difference(&duties) {
            log::info!(
                "node {}: no longer holds the {duty} duty",
                self.config.node_id
            );
        }
        if held(&duties, cluster::SWEEP) != held(&self.duties, cluster::SWEEP) {
            self.deadlines.do_send(Duties {
                sweep: held(&duties, cluster::SWEEP),
            });
        }
        if held(&duties, cluster::SEARCH) != held(&self.duties, cluster::SEARCH) {
            self.indexing
                .do_send(Indexing(held(&duties, cluster::SEARCH)));
        }
        let timeouts = held(&duties, cluster::TIMEOUTS);
        if timeouts && (!held(&self.duties, cluster::TIMEOUTS) || self.departed) {
            for rearm in &self.rearm {
                rearm.do_send(Rearm);
            }
        }
        self.departed = false;
        self.duties = duties;
    }

    /// Listens to the other nodes for as long as the broker runs, reconnecting as needed.
    fn listen(&self, ctx: &mut Context<Self>) {
        let (config, registry) = (self.config.clone(), self.registry.clone());
        let (index_soon, me) = (self.index_soon.clone(), ctx.address());
        let peers = Arc::clone(&self.peers);
        actix::spawn(async move {
            loop {
                match cluster::listener(&config.database_url).await {
                    Ok(mut conn) => {
                        log::debug!("node {}: listening to the cluster", config.node_id);
                        loop {
                            let next = {
                                let mut stream = std::pin::pin!(conn.notifications_stream());
                                tokio::time::timeout(LISTEN_PING, stream.next()).await
                            };
                            match next {
                                Ok(Some(Ok(notification))) => {
                                    let event = ClusterEvent::parse(
                                        &notification.channel,
                                        &notification.payload,
                                    );
                                    if let Some(event) = event {
                                        if event.node() != config.node_id {
                                            peers.store(true, Ordering::Relaxed);
                                        }
                                        dispatch(
                                            &config.node_id,
                                            &registry,
                                            &index_soon,
                                            &me,
                                            event,
                                        );
                                    }
                                }
                                Ok(Some(Err(e))) => {
                                    log::warn!(
                                        "node {}: cluster notifications failed: {e}",
                                        config.node_id
                                    );
                                    break;
                                }
                                Ok(None) => break,
                                // Quiet for a while: check that the connection still works.
                                Err(_) => {
                                    if let Err(e) = cluster::ping(&mut conn).await {
                                        log::warn!(
                                            "node {}: the listening connection failed: {e}",
                                            config.node_id
                                        );
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => log::warn!(
                        "node {}: cannot listen to the cluster ({e}); retrying",
                        config.node_id
                    ),
                }
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        });
    }
}

/// Hands another node's notification to whoever it concerns here.
fn dispatch(
    node_id: &str,
    registry: &ChannelRegistry,
    index_soon: &Recipient<IndexSoon>,
    me: &Addr<ClusterActor>,
    event: ClusterEvent,
) {
    if event.node() == node_id {
        // This node's own: already handled where it happened.
        return;
    }
    match event {
        ClusterEvent::Commits {
            project,
            first,
            last,
            ..
        } => {
            index_soon.do_send(IndexSoon((last - first + 1).max(0) as usize));
            if let Some(channel) = registry.get(project) {
                channel.do_send(RemoteCommits { upto: last });
            }
        }
        ClusterEvent::Takeover {
            project,
            agent,
            generation,
            ..
        } => {
            if let Some(channel) = registry.get(project) {
                channel.do_send(Takeover {
                    agent_id: agent,
                    generation,
                });
            }
        }
        ClusterEvent::Revoked { project, token, .. } => {
            if let Some(channel) = registry.get(project) {
                channel.do_send(Revoked { token_id: token });
            }
        }
        ClusterEvent::Left { node } => me.do_send(NodeLeft { node_id: node }),
        ClusterEvent::Joined { .. } => {}
    }
}

impl Actor for ClusterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.listen(ctx);
        self.tick(ctx);
        ctx.run_interval(self.config.heartbeat, |act, ctx| act.tick(ctx));
    }
}

/// Another node left gracefully: its duties are free now.
#[derive(Message)]
#[rtype(result = "()")]
struct NodeLeft {
    node_id: String,
}

impl Handler<NodeLeft> for ClusterActor {
    type Result = ();

    fn handle(&mut self, left: NodeLeft, ctx: &mut Self::Context) {
        log::info!("node {}: node {} left", self.config.node_id, left.node_id);
        self.departed = true;
        self.tick(ctx);
    }
}

/// Registers this node at start. A row with the same id that is still alive may be this
/// node's previous run, killed less than its timeout ago: it is waited for until its
/// heartbeat is older than its timeout. A heartbeat that moves meanwhile belongs to another
/// running broker, and starting is refused. Returns whether other nodes share the database.
pub async fn register(pool: &DbPool, config: &NodeConfig) -> anyhow::Result<bool> {
    let mut conn = pool.get().await?;
    let started = tokio::time::Instant::now();
    let mut seen = None;
    while let Some((heartbeat, alive)) = cluster::node_holder(&mut conn, &config.node_id).await? {
        if !alive {
            break;
        }
        if seen.is_some_and(|seen| seen != heartbeat) {
            anyhow::bail!(
                "node id {:?} is used by another running broker on this database; give each \
                 broker its own (--node-id, AGENTBUS_NODE_ID), or leave it unset for a generated one",
                config.node_id
            );
        }
        if started.elapsed() > config.timeout * 3 {
            anyhow::bail!(
                "node id {:?} is held by a row whose heartbeat does not expire",
                config.node_id
            );
        }
        seen = Some(heartbeat);
        log::info!(
            "node id {:?} was alive moments ago (an earlier run of this node?); waiting for its heartbeat to expire",
            config.node_id
        );
        tokio::time::sleep(config.heartbeat).await;
    }
    cluster::register_node(
        &mut conn,
        &config.node_id,
        &config.address,
        config.timeout.as_millis() as i64,
    )
    .await?;
    Ok(cluster::other_nodes(&mut conn, &config.node_id).await? > 0)
}

/// This node leaves: its sessions are marked disconnected, its duties freed, the others told.
pub async fn leave(pool: &DbPool, node_id: &str) {
    let left = match pool.get().await {
        Ok(mut conn) => cluster::leave(&mut conn, node_id)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match left {
        Ok(()) => log::info!("node {node_id} left the cluster"),
        Err(e) => log::warn!("node {node_id}: could not leave the cluster cleanly ({e}); the others will declare it dead"),
    }
}

/// A node id as given: 1 to 64 characters from `A-Z a-z 0-9 _ - . :`.
pub fn check_node_id(node_id: &str) -> anyhow::Result<()> {
    let valid = (1..=64).contains(&node_id.len())
        && node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if !valid {
        anyhow::bail!(
            "invalid node id {node_id:?}: use 1 to 64 characters from A-Z a-z 0-9 _ - . :"
        );
    }
    Ok(())
}

/// A node id for a broker that was given none: `node-` and 8 random hexadecimal digits.
pub fn generated_node_id() -> String {
    format!("node-{}", &Uuid::new_v4().simple().to_string()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked() {
        assert!(check_node_id("node-1").is_ok());
        assert!(check_node_id("eu-west:a.1_b").is_ok());
        assert!(check_node_id(&generated_node_id()).is_ok());
        assert!(check_node_id("").is_err());
        assert!(check_node_id("has space").is_err());
        assert!(check_node_id(&"x".repeat(65)).is_err());
    }
}
