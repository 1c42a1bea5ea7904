//! `ChannelActor`: one per project. It knows who is connected (presence) and routes each
//! committed message to its recipients, in seq order.

use std::collections::HashMap;

use actix::prelude::*;
use bytestring::ByteString;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::inbox::{InboxWaiters, Wake};
use super::settle::{Reply, Settlement};
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
    session: Recipient<ToSession>,
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
            member.session.do_send(ToSession::Deliver { frame, seq });
            return (1, bytes);
        }
        let mut frame = None;
        let mut count = 0;
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
        for observer in self.observers.values() {
            observer.session.do_send(ToSession::Deliver {
                frame: frame.clone(),
                seq: message.seq,
            });
        }
    }
}

impl Actor for ChannelActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        log::debug!(
            "channel of project {} started at seq {}",
            self.project_id,
            self.head_seq
        );
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
    type Result = i64;

    fn handle(&mut self, join: Join, _ctx: &mut Self::Context) -> i64 {
        let member = Member {
            session_id: join.session_id,
            token_id: join.token_id,
            agent_type: join.agent_type,
            session: join.session,
        };
        if join.observer {
            self.observers.insert(join.session_id, member);
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

    fn handle(&mut self, leave: Leave, _ctx: &mut Self::Context) {
        if leave.observer {
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
    pub items: Vec<CommittedItem>,
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

    fn handle(&mut self, committed: Committed, _ctx: &mut Self::Context) {
        let now = Utc::now();
        let (mut count, mut bytes) = (0, 0);
        for item in committed.items {
            let (n, b) = self.route(item, now);
            count += n;
            bytes += b;
        }
        // Once per batch: the counters sit behind a lock shared by every channel.
        self.stats.record_deliveries(self.project_id, count);
        self.stats.record_delivered_bytes(bytes);
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
