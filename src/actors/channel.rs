//! `ChannelActor`: one per project. It knows who is connected (presence) and routes each
//! committed message to its recipients, in seq order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::inbox::{InboxWaiters, Wake};
use super::settle::{Reply, Settlement};
use crate::db::{cluster, DbPool};
use crate::metrics::Stage;
use crate::models::StoredMessage;
use crate::protocol;
use crate::stats::Stats;

/// A connected session, as its channel sees it.
struct Member {
    session_id: Uuid,
    /// The token the session connected with, so revoking it closes the session.
    token_id: Option<Uuid>,
    /// For messages addressed to a type.
    agent_type: String,
    /// Its registration's generation (see [`Takeover`]); 0 when not registered.
    generation: i64,
    session: Recipient<ToSession>,
}

/// Most messages read from the store in one step when catching up with other nodes' commits.
const REMOTE_PAGE: i64 = 500;
/// How long a failed read of other nodes' commits waits before it is tried again.
const REMOTE_RETRY: Duration = Duration::from_millis(200);

/// What a channel needs to follow the commits of other brokers on the same database: this
/// node's id and the pool to read their rows from (see [`RemoteCommits`]).
#[derive(Clone)]
pub struct ClusterLink {
    pub node_id: String,
    pub pool: DbPool,
    /// Whether other nodes share the database (kept by the cluster actor). Alone, a channel
    /// routes exactly as a single broker does: its commits are the only ones, so nothing is
    /// ever read back.
    pub peers: Arc<AtomicBool>,
}

impl ClusterLink {
    pub fn new(node_id: String, pool: DbPool) -> Self {
        ClusterLink {
            node_id,
            pool,
            peers: Arc::default(),
        }
    }

    /// Whether other nodes share the database now.
    pub fn has_peers(&self) -> bool {
        self.peers.load(Ordering::Relaxed)
    }
}

/// How a channel keeps up with commits made elsewhere (other nodes): the newest seq known to
/// be committed, the read in flight, and the local batches waiting behind a gap.
#[derive(Default)]
struct Remote {
    /// Every seq up to this one is committed (known from notifications, head checks, or the
    /// local batches' own `head_before`).
    known_head: i64,
    /// A read of committed rows is in flight.
    fetching: bool,
    /// Local batches that arrived while earlier seqs (committed by other nodes) were still
    /// to be routed: routed in order once the gap is filled.
    held: VecDeque<(Option<i64>, Vec<CommittedItem>)>,
    /// The project head seen by the previous periodic check, when it was ahead of this
    /// channel (see [`HeadCheck`]).
    suspected: Option<i64>,
    /// The newest takeover generation announced per agent: a connection registered with a
    /// lower one is stale.
    generations: HashMap<String, i64>,
}

pub struct ChannelActor {
    project_id: Uuid,
    /// The newest committed seq this channel has routed (or was started with): a session that
    /// joins now receives live everything after it.
    head_seq: i64,
    /// Connected sessions by agent_id: at most one per agent (a new one takes over).
    members: HashMap<String, Member>,
    /// Read-only observers by session id: each receives every message of the project. They
    /// are no members: not in the presence list, not counted as recipients.
    observers: HashMap<Uuid, Member>,
    /// REST callers waiting for the first reply to a request (sendAndWait), by request id.
    reply_waiters: HashMap<Uuid, oneshot::Sender<StoredMessage>>,
    /// Inbox reads over HTTP waiting for something to be owed to their agent.
    inbox_waiters: InboxWaiters,
    stats: Stats,
    /// Other brokers on the same database, when there may be any.
    cluster: Option<ClusterLink>,
    remote: Remote,
}

impl ChannelActor {
    pub fn new(project_id: Uuid, head_seq: i64, stats: Stats) -> Self {
        ChannelActor {
            project_id,
            head_seq,
            members: HashMap::new(),
            observers: HashMap::new(),
            reply_waiters: HashMap::new(),
            inbox_waiters: InboxWaiters::default(),
            stats,
            cluster: None,
            remote: Remote {
                known_head: head_seq,
                ..Remote::default()
            },
        }
    }

    /// A channel that also follows other nodes' commits and registers its sessions.
    pub fn clustered(mut self, link: ClusterLink) -> Self {
        self.cluster = Some(link);
        self
    }

    /// The link to the other nodes, when there are any now.
    fn peers(&self) -> Option<&ClusterLink> {
        self.cluster.as_ref().filter(|link| link.has_peers())
    }

    /// Someone here may receive a message: a session, an observer, a REST caller waiting for
    /// a reply or an inbox read waiting for mail. Without anyone, other nodes' commits are
    /// not read at all: the channel only moves its head past them.
    fn interested(&self) -> bool {
        !self.members.is_empty()
            || !self.observers.is_empty()
            || !self.reply_waiters.is_empty()
            || !self.inbox_waiters.is_empty()
    }

    /// Routes a batch of one project and records the deliveries.
    fn route_batch(&mut self, items: Vec<CommittedItem>) {
        let now = Utc::now();
        let (mut count, mut bytes) = (0, 0);
        for item in items {
            let (n, b) = self.route(item, now);
            count += n;
            bytes += b;
        }
        // Once per batch: the counters sit behind a lock shared by every channel.
        self.stats.record_deliveries(self.project_id, count);
        self.stats.record_delivered_bytes(bytes);
    }

    /// Routes, in seq order, what can be routed now: local batches whose predecessors were
    /// routed, and the commits of other nodes, read from the store a page at a time.
    fn advance(&mut self, ctx: &mut Context<Self>) {
        loop {
            if self.remote.fetching {
                return;
            }
            let target = match self.remote.held.front() {
                Some((Some(before), _)) if *before > self.head_seq => *before,
                Some(_) => {
                    if let Some((_, items)) = self.remote.held.pop_front() {
                        self.route_batch(items);
                    }
                    continue;
                }
                None if self.remote.known_head > self.head_seq => self.remote.known_head,
                None => return,
            };
            let Some(link) = self.peers().cloned().filter(|_| self.interested()) else {
                // Nobody here to deliver to: sessions that join later read these from the
                // store, up to the head they are given.
                self.head_seq = target;
                continue;
            };
            self.remote.fetching = true;
            let (project_id, after) = (self.project_id, self.head_seq);
            let upto = target.min(after + REMOTE_PAGE);
            let read = async move {
                let mut conn = link.pool.get().await.map_err(|e| e.to_string())?;
                cluster::committed_range(&mut conn, project_id, after, upto, REMOTE_PAGE)
                    .await
                    .map_err(|e| e.to_string())
            };
            ctx.spawn(read.into_actor(self).map(move |read, act, ctx| {
                act.remote.fetching = false;
                match read {
                    Ok(messages) => {
                        let complete = messages.last().is_some_and(|m| m.seq >= upto);
                        let items = messages
                            .into_iter()
                            .map(|message| CommittedItem {
                                message,
                                duplicate: false,
                                no_recipient: false,
                                reply: Reply::Broker,
                            })
                            .collect();
                        act.route_batch(items);
                        if !complete && act.head_seq < upto {
                            // Committed seqs are never missing; a project deleted meanwhile
                            // is the one way here. Nothing more can come: move on.
                            log::warn!(
                                "project {}: seqs up to {upto} not found in the store",
                                act.project_id
                            );
                            act.head_seq = upto;
                        }
                        act.advance(ctx);
                    }
                    Err(e) => {
                        log::warn!(
                            "project {}: reading other nodes' commits failed ({e}); retrying",
                            act.project_id
                        );
                        ctx.run_later(REMOTE_RETRY, |act, ctx| act.advance(ctx));
                    }
                }
            }));
            return;
        }
    }

    /// Delivers one committed message and settles its send. The message is serialised once;
    /// every recipient gets the same bytes. Returns (deliveries, bytes delivered).
    fn route(&mut self, item: CommittedItem, now: DateTime<Utc>) -> (u64, usize) {
        let CommittedItem {
            message,
            duplicate,
            no_recipient,
            reply,
        } = item;
        // A seq at or below the head was committed before this channel started, or before a
        // session joined: sessions read it from the store.
        let mut delivered = (0, 0);
        if !duplicate && message.seq > self.head_seq {
            self.head_seq = message.seq;
            let expired = message.expires_at.is_some_and(|at| at <= now);
            if !expired {
                delivered = self.deliver(&message);
                self.inbox_waiters.wake_for(&message);
            }
            self.observe(&message);
            if let Some(waiter) = message
                .reply_to
                .and_then(|id| self.reply_waiters.remove(&id))
            {
                let _ = waiter.send(message.clone());
            }
        }
        reply.settle(Settlement::Stored {
            message,
            no_recipient,
        });
        delivered
    }

    /// Hands a message to its connected recipients: the agent it is addressed to, every
    /// agent of the type it is addressed to, or every agent; never its sender (unless it
    /// addressed itself by name). The frame is serialised once, for all of them. Returns
    /// (deliveries, bytes delivered).
    fn deliver(&self, message: &StoredMessage) -> (u64, usize) {
        let seq = message.seq;
        if let Some(to) = &message.recipient_agent_id {
            let Some(member) = self.members.get(to) else {
                return (0, 0);
            };
            let frame = protocol::message_frame(message);
            let bytes = frame.len();
            member.session.do_send(ToSession::Deliver {
                frame,
                seq,
                routed: Instant::now(),
            });
            return (1, bytes);
        }
        let mut frame = None;
        let mut count = 0;
        let routed = Instant::now();
        for (agent_id, member) in &self.members {
            let addressed = match &message.recipient_agent_type {
                Some(agent_type) => member.agent_type == *agent_type,
                None => true,
            };
            if addressed && *agent_id != message.sender_agent_id {
                let frame = frame.get_or_insert_with(|| protocol::message_frame(message));
                member.session.do_send(ToSession::Deliver {
                    frame: frame.clone(),
                    seq,
                    routed,
                });
                count += 1;
            }
        }
        (count, frame.map_or(0, |f| f.len() * count as usize))
    }
}

impl ChannelActor {
    /// Hands a committed message to every observer (whoever it was addressed to, expired or
    /// not: observers see what the project's history holds).
    fn observe(&self, message: &StoredMessage) {
        if self.observers.is_empty() {
            return;
        }
        let frame = protocol::message_frame(message);
        let routed = Instant::now();
        for observer in self.observers.values() {
            observer.session.do_send(ToSession::Deliver {
                frame: frame.clone(),
                seq: message.seq,
                routed,
            });
        }
    }
}

impl Actor for ChannelActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        log::debug!(
            "channel of project {} started at seq {}",
            self.project_id,
            self.head_seq
        );
        // Other nodes may have committed since the head this channel was started with was
        // read, before it could hear of it.
        if let Some(link) = self.peers().cloned() {
            let project_id = self.project_id;
            let read = async move {
                let mut conn = link.pool.get().await.ok()?;
                cluster::project_heads(&mut conn, &[project_id]).await.ok()
            };
            ctx.spawn(read.into_actor(self).map(|heads, act, ctx| {
                if let Some(&(_, head)) = heads.as_deref().and_then(|h| h.first()) {
                    if head > act.remote.known_head {
                        act.remote.known_head = head;
                        act.advance(ctx);
                    }
                }
            }));
        }
    }
}

/// What a channel tells one of its sessions.
#[derive(Message)]
#[rtype(result = "()")]
pub enum ToSession {
    /// A committed message for this session's client, live.
    Deliver {
        /// The message frame, serialised once for all its recipients.
        frame: ByteString,
        seq: i64,
        /// When the channel routed it ([`Stage::Handed`] is the wait from then on).
        routed: Instant,
    },
    /// Another connection of the same agent took over (close 4001).
    Replaced,
    /// The broker is shutting down: settle what was sent, then close with 1001.
    Drain,
    /// The token this session connected with was revoked (close 4003).
    TokenRevoked,
}

/// A session joins its project's channel. Answered with the head seq from which the session
/// receives messages live.
#[derive(Message)]
#[rtype(result = "i64")]
pub struct Join {
    pub session_id: Uuid,
    pub token_id: Option<Uuid>,
    pub agent_id: String,
    pub agent_type: String,
    /// A read-only observer: it receives every message and takes over from nobody.
    pub observer: bool,
    pub session: Recipient<ToSession>,
}

impl Handler<Join> for ChannelActor {
    type Result = ResponseActFuture<Self, i64>;

    fn handle(&mut self, join: Join, _ctx: &mut Self::Context) -> Self::Result {
        let Some(link) = self.cluster.clone() else {
            return Box::pin(actix::fut::ready(self.admit(join, 0)));
        };
        // Registered first (the row other nodes see, and the generation that decides which
        // connection of the agent survives), admitted once registered.
        let agent = (!join.observer).then(|| join.agent_id.clone());
        let (session_id, project_id) = (join.session_id, self.project_id);
        let register = async move {
            let mut conn = link.pool.get().await.map_err(|e| e.to_string())?;
            cluster::register_session(
                &mut conn,
                &link.node_id,
                session_id,
                project_id,
                agent.as_deref(),
            )
            .await
            .map_err(|e| e.to_string())
        };
        Box::pin(register.into_actor(self).map(move |registered, act, _ctx| {
            let generation = registered.unwrap_or_else(|e| {
                log::warn!("session {session_id}: not registered with the cluster: {e}");
                0
            });
            act.admit(join, generation)
        }))
    }
}

impl ChannelActor {
    /// Adds a session; a connection of the same agent with a lower generation is replaced
    /// (this one, if it is the older). Returns the head from which it receives live.
    fn admit(&mut self, join: Join, generation: i64) -> i64 {
        let member = Member {
            session_id: join.session_id,
            token_id: join.token_id,
            agent_type: join.agent_type,
            generation,
            session: join.session,
        };
        if join.observer {
            self.observers.insert(join.session_id, member);
            return self.head_seq;
        }
        let newest = self
            .remote
            .generations
            .get(&join.agent_id)
            .copied()
            .unwrap_or(0)
            .max(self.members.get(&join.agent_id).map_or(0, |m| m.generation));
        if generation != 0 && generation < newest {
            log::info!(
                "project {}: session {} of agent {:?} is older than its newest connection; replaced",
                self.project_id,
                join.session_id,
                join.agent_id
            );
            member.session.do_send(ToSession::Replaced);
            return self.head_seq;
        }
        if let Some(previous) = self.members.insert(join.agent_id.clone(), member) {
            log::info!(
                "project {}: agent {:?} reconnected (session {}); closing session {}",
                self.project_id,
                join.agent_id,
                join.session_id,
                previous.session_id
            );
            previous.session.do_send(ToSession::Replaced);
        }
        self.head_seq
    }

    /// An observer's row goes from the cluster's table.
    fn unregister(&self, session_id: Uuid, ctx: &mut Context<Self>) {
        let Some(link) = self.cluster.clone() else {
            return;
        };
        ctx.spawn(
            async move {
                let removed = match link.pool.get().await {
                    Ok(mut conn) => cluster::unregister_session(&mut conn, session_id)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = removed {
                    log::warn!("session {session_id}: cluster row not removed: {e}");
                }
            }
            .into_actor(self),
        );
    }
}

/// A session left (closed, timed out, replaced).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub session_id: Uuid,
    pub agent_id: String,
    pub observer: bool,
}

impl Handler<Leave> for ChannelActor {
    type Result = ();

    fn handle(&mut self, leave: Leave, ctx: &mut Self::Context) {
        if leave.observer {
            // An agent's session removes its own row with its disconnect bookkeeping.
            self.unregister(leave.session_id, ctx);
            self.observers.remove(&leave.session_id);
            return;
        }
        // A session replaced by a newer one must not remove its successor.
        if self
            .members
            .get(&leave.agent_id)
            .is_some_and(|m| m.session_id == leave.session_id)
        {
            self.members.remove(&leave.agent_id);
        }
    }
}

/// Messages of this project whose batch committed, in seq order, each with the sender to
/// settle.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Committed {
    /// The seq just before the first new message of the items (`None`: only retries).
    pub head_before: Option<i64>,
    pub items: Vec<CommittedItem>,
    /// When their commit returned ([`Stage::Routed`] is the wait from then on).
    pub committed: Instant,
}

pub struct CommittedItem {
    pub message: StoredMessage,
    /// A retry of a message stored earlier: only its sender is told (again).
    pub duplicate: bool,
    /// Nobody can receive it: the sender is warned.
    pub no_recipient: bool,
    pub reply: Reply,
}

impl Handler<Committed> for ChannelActor {
    type Result = ();

    fn handle(&mut self, committed: Committed, ctx: &mut Self::Context) {
        let Committed {
            head_before,
            items,
            committed,
        } = committed;
        let waited = committed.elapsed();
        self.stats
            .record_waits(Stage::Routed, std::iter::repeat_n(waited, items.len()));
        let gap = head_before.is_some_and(|before| before > self.head_seq);
        let gap = gap && self.peers().is_some();
        if !gap && self.remote.held.is_empty() && !self.remote.fetching {
            // The usual case, and the only one with a single broker: straight from memory.
            return self.route_batch(items);
        }
        // Other nodes committed seqs before these: they are routed first, from the store.
        if let Some(before) = head_before {
            self.remote.known_head = self.remote.known_head.max(before);
        }
        self.remote.held.push_back((head_before, items));
        self.advance(ctx);
    }
}

/// Other nodes committed seqs of this project up to `upto` (a notification): route them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteCommits {
    pub upto: i64,
}

impl Handler<RemoteCommits> for ChannelActor {
    type Result = ();

    fn handle(&mut self, remote: RemoteCommits, ctx: &mut Self::Context) {
        if remote.upto > self.remote.known_head {
            self.remote.known_head = remote.upto;
            self.advance(ctx);
        }
    }
}

/// The project's head as the periodic check read it, in case a notification was missed. A
/// head beyond the channel's may be a local batch on its way here, so it counts only once a
/// later check finds the channel still behind it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HeadCheck {
    pub head: i64,
}

impl Handler<HeadCheck> for ChannelActor {
    type Result = ();

    fn handle(&mut self, check: HeadCheck, ctx: &mut Self::Context) {
        if self.peers().is_none() {
            self.remote.suspected = None;
            return;
        }
        if let Some(suspected) = self.remote.suspected.take() {
            if suspected > self.head_seq.max(self.remote.known_head) {
                log::debug!(
                    "project {}: catching up to seq {suspected} (no notification seen)",
                    self.project_id
                );
                self.remote.known_head = suspected;
                self.advance(ctx);
            }
        }
        if check.head > self.head_seq {
            self.remote.suspected = Some(check.head);
        }
    }
}

/// A connection of `agent_id` registered with `generation` (on another node): a connection
/// of the agent here with a lower generation is replaced (close 4001).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Takeover {
    pub agent_id: String,
    pub generation: i64,
}

impl Handler<Takeover> for ChannelActor {
    type Result = ();

    fn handle(&mut self, takeover: Takeover, _ctx: &mut Self::Context) {
        let newest = self
            .remote
            .generations
            .entry(takeover.agent_id.clone())
            .or_insert(0);
        *newest = (*newest).max(takeover.generation);
        if self
            .members
            .get(&takeover.agent_id)
            .is_some_and(|m| m.generation < takeover.generation)
        {
            if let Some(previous) = self.members.remove(&takeover.agent_id) {
                log::info!(
                    "project {}: agent {:?} connected to another node; closing session {}",
                    self.project_id,
                    takeover.agent_id,
                    previous.session_id
                );
                previous.session.do_send(ToSession::Replaced);
            }
        }
    }
}

/// Every session of this channel closes with 1001 (after settling its sends), as at a
/// shutdown, but waiting inbox reads are left alone: this node was declared dead by the
/// others while it still ran, so its sessions are no longer known to the cluster.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSessions;

impl Handler<CloseSessions> for ChannelActor {
    type Result = ();

    fn handle(&mut self, _: CloseSessions, _ctx: &mut Self::Context) {
        for member in self.members.values().chain(self.observers.values()) {
            member.session.do_send(ToSession::Drain);
        }
    }
}

/// A REST caller waits for the first reply to a request it is about to send.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AwaitReply {
    pub request_id: Uuid,
    pub tx: oneshot::Sender<StoredMessage>,
}

impl Handler<AwaitReply> for ChannelActor {
    type Result = ();

    fn handle(&mut self, wait: AwaitReply, _ctx: &mut Self::Context) {
        // Waiters whose caller gave up are dropped as new ones arrive.
        self.reply_waiters.retain(|_, tx| !tx.is_closed());
        self.reply_waiters.insert(wait.request_id, wait.tx);
    }
}

/// An inbox read over HTTP waits until something may be owed to `agent_id` (woken once; see
/// [`super::inbox`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct WaitInbox {
    pub agent_id: String,
    pub agent_type: String,
    pub tx: oneshot::Sender<Wake>,
}

impl Handler<WaitInbox> for ChannelActor {
    type Result = ();

    fn handle(&mut self, wait: WaitInbox, _ctx: &mut Self::Context) {
        self.inbox_waiters
            .add(wait.agent_id, wait.agent_type, wait.tx);
    }
}

/// The REST caller waiting for this request's reply is gone (its client disconnected): its
/// waiter is dropped now. The request itself stays stored and can still be answered.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetReply {
    pub request_id: Uuid,
}

impl Handler<ForgetReply> for ChannelActor {
    type Result = ();

    fn handle(&mut self, forget: ForgetReply, _ctx: &mut Self::Context) {
        self.reply_waiters.remove(&forget.request_id);
    }
}

/// The broker is shutting down: every session settles its sends and closes. Answered with
/// the number of sessions told.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct DrainAll;

impl Handler<DrainAll> for ChannelActor {
    type Result = usize;

    fn handle(&mut self, _: DrainAll, _ctx: &mut Self::Context) -> usize {
        for member in self.members.values().chain(self.observers.values()) {
            member.session.do_send(ToSession::Drain);
        }
        // Waiting inbox reads answer now (with nothing), and so does every later one.
        self.inbox_waiters.drain();
        self.members.len() + self.observers.len()
    }
}

/// A token was revoked: the sessions that connected with it are closed (4003).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Revoked {
    pub token_id: Uuid,
}

impl Handler<Revoked> for ChannelActor {
    type Result = ();

    fn handle(&mut self, revoked: Revoked, _ctx: &mut Self::Context) {
        for member in self.members.values().chain(self.observers.values()) {
            if member.token_id == Some(revoked.token_id) {
                member.session.do_send(ToSession::TokenRevoked);
            }
        }
    }
}

/// Which agents are connected now, with their session ids.
#[derive(Message)]
#[rtype(result = "HashMap<String, Uuid>")]
pub struct Presence;

impl Handler<Presence> for ChannelActor {
    type Result = MessageResult<Presence>;

    fn handle(&mut self, _: Presence, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.members
                .iter()
                .map(|(agent_id, member)| (agent_id.clone(), member.session_id))
                .collect(),
        )
    }
}
