//! `ChannelActor`: one per project. It knows who is connected (presence) and routes each
//! committed message to its recipients, in seq order.

use std::collections::HashMap;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::persistence::{Reply, Settlement};
use super::session::{Deliver, Replaced, SessionActor};
use crate::models::StoredMessage;
use crate::protocol;

/// A connected session, as its channel sees it.
struct Member {
    session_id: Uuid,
    /// Recorded for routing by agent type and for presence listings.
    #[allow(dead_code)]
    agent_type: String,
    addr: Addr<SessionActor>,
}

pub struct ChannelActor {
    project_id: Uuid,
    /// The newest committed seq this channel has routed (or was started with): a session that
    /// joins now receives live everything after it.
    head_seq: i64,
    /// Connected sessions by agent_id: at most one per agent (a new one takes over).
    members: HashMap<String, Member>,
}

impl ChannelActor {
    pub fn new(project_id: Uuid, head_seq: i64) -> Self {
        ChannelActor {
            project_id,
            head_seq,
            members: HashMap::new(),
        }
    }

    /// Delivers one committed message and settles its send. The message is serialised once;
    /// every recipient gets the same bytes.
    fn route(&mut self, message: StoredMessage, duplicate: bool, reply: Reply, now: DateTime<Utc>) {
        // A seq at or below the head was committed before this channel started, or before a
        // session joined: sessions read it from the store.
        if !duplicate && message.seq > self.head_seq {
            self.head_seq = message.seq;
            let expired = message.expires_at.is_some_and(|at| at <= now);
            if !expired {
                self.deliver(&message);
            }
        }
        reply.settle(Settlement::Stored(message));
    }

    /// Hands a message to its connected recipients: the agent it is addressed to, or every
    /// agent but its sender.
    fn deliver(&self, message: &StoredMessage) {
        let seq = message.seq;
        match &message.recipient_agent_id {
            Some(to) => {
                if let Some(member) = self.members.get(to) {
                    let frame = protocol::message_frame(message);
                    member.addr.do_send(Deliver { frame, seq });
                }
            }
            None => {
                let mut frame = None;
                for (agent_id, member) in &self.members {
                    if *agent_id != message.sender_agent_id {
                        let frame = frame.get_or_insert_with(|| protocol::message_frame(message));
                        member.addr.do_send(Deliver {
                            frame: frame.clone(),
                            seq,
                        });
                    }
                }
            }
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

/// A session joins its project's channel. Answered with the head seq from which the session
/// receives messages live.
#[derive(Message)]
#[rtype(result = "i64")]
pub struct Join {
    pub session_id: Uuid,
    pub agent_id: String,
    pub agent_type: String,
    pub addr: Addr<SessionActor>,
}

impl Handler<Join> for ChannelActor {
    type Result = i64;

    fn handle(&mut self, join: Join, _ctx: &mut Self::Context) -> i64 {
        let member = Member {
            session_id: join.session_id,
            agent_type: join.agent_type,
            addr: join.addr,
        };
        if let Some(previous) = self.members.insert(join.agent_id.clone(), member) {
            log::info!(
                "project {}: agent {:?} reconnected (session {}); closing session {}",
                self.project_id,
                join.agent_id,
                join.session_id,
                previous.session_id
            );
            previous.addr.do_send(Replaced);
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
}

impl Handler<Leave> for ChannelActor {
    type Result = ();

    fn handle(&mut self, leave: Leave, _ctx: &mut Self::Context) {
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
    pub reply: Reply,
}

impl Handler<Committed> for ChannelActor {
    type Result = ();

    fn handle(&mut self, committed: Committed, _ctx: &mut Self::Context) {
        let now = Utc::now();
        for item in committed.items {
            self.route(item.message, item.duplicate, item.reply, now);
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
