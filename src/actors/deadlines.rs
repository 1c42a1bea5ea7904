//! `DeadlineActor`: what happens at a given time rather than in answer to a message.
//!
//! - Request timeouts: every committed request is tracked until its deadline; then the
//!   broker sends the requester a `response` with `success: false, error: "timeout"`, unless
//!   a reply was committed first (the commit path checks, atomically). Pending requests live
//!   in PostgreSQL, so the timeouts are re-armed when the broker starts again.
//! - The dead-letter sweep: messages that expired before reaching any recipient they were
//!   owed to are recorded in `dead_letters` with reason `expired`.
//!
//! With several brokers on one database, each tracks the requests it committed, and re-arms
//! every pending request when it starts; the node holding the `timeouts` duty also re-arms
//! them whenever a node leaves or dies, so a dead node's requests still time out. A request
//! armed on several nodes still times out once: the commit claims the request first (see
//! `db::batch`). The sweep runs on the node holding the `sweep` duty only ([`Duties`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::persistence::Persist;
use super::settle::Reply;
use crate::db::{deadlines, DbPool};
use crate::models::NewMessage;

/// How often expired messages are swept into the dead-letter list.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The sender of the broker's own messages.
pub const BROKER_AGENT_ID: &str = crate::domain::BROKER_AGENT_ID;
pub const BROKER_AGENT_TYPE: &str = "broker";

pub struct DeadlineActor {
    pool: DbPool,
    /// Where timeout responses are sent to be stored.
    persistence: Recipient<Persist>,
    /// Requests by deadline (earliest first).
    timers: BinaryHeap<Reverse<(DateTime<Utc>, Uuid, Uuid)>>,
    /// The requests in `timers`, so that re-arming does not arm one twice.
    armed_ids: HashSet<Uuid>,
    /// Whether this broker runs the sweep (one broker per database does).
    sweeps: bool,
    /// The wake-up for the earliest deadline.
    armed: Option<SpawnHandle>,
    /// Messages that expired at or before this time have been swept.
    swept_until: DateTime<Utc>,
    sweeping: bool,
}

impl DeadlineActor {
    pub fn new(pool: DbPool, persistence: Recipient<Persist>) -> Self {
        DeadlineActor {
            pool,
            persistence,
            timers: BinaryHeap::new(),
            armed_ids: HashSet::new(),
            sweeps: false,
            armed: None,
            swept_until: DateTime::<Utc>::UNIX_EPOCH,
            sweeping: false,
        }
    }

    fn arm(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.armed.take() {
            ctx.cancel_future(handle);
        }
        let Some(Reverse((deadline, _, _))) = self.timers.peek() else {
            return;
        };
        let wait = (*deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        self.armed = Some(ctx.run_later(wait, |act, ctx| {
            act.armed = None;
            act.fire(ctx);
        }));
    }

    fn fire(&mut self, ctx: &mut Context<Self>) {
        let now = Utc::now();
        while let Some(Reverse((deadline, request_id, project_id))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            self.armed_ids.remove(&request_id);
            self.persistence.do_send(Persist::new(
                timeout_response(project_id, request_id),
                Reply::Broker,
            ));
        }
        self.arm(ctx);
    }

    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping || !self.sweeps {
            return;
        }
        self.sweeping = true;
        let pool = self.pool.clone();
        let (from, until) = (self.swept_until, Utc::now());
        let sweep = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            deadlines::sweep_expired(&mut conn, from, until)
                .await
                .map_err(|e| e.to_string())
        };
        ctx.spawn(sweep.into_actor(self).map(move |result, act, _| {
            act.sweeping = false;
            match result {
                Ok(n) => {
                    act.swept_until = until;
                    if n > 0 {
                        log::info!("{n} expired undelivered message(s) dead-lettered");
                    }
                }
                Err(e) => log::warn!("dead-letter sweep failed ({e}); will retry"),
            }
        }));
    }
}

/// The broker's answer to a request nobody answered in time.
fn timeout_response(project_id: Uuid, request_id: Uuid) -> NewMessage {
    NewMessage {
        id: Uuid::new_v4(),
        project_id,
        sender_agent_id: BROKER_AGENT_ID.to_owned(),
        sender_agent_type: BROKER_AGENT_TYPE.to_owned(),
        sender_session_id: None,
        // Addressed to the requester when the batch links it to its request.
        recipient_agent_id: None,
        message_type: "response".to_owned(),
        content: "no reply before the request's deadline".to_owned(),
        metadata: serde_json::json!({}),
        priority: 1,
        correlation_id: None,
        reply_to: Some(request_id),
        client_msg_id: None,
        ttl_ms: None,
        recipient_agent_type: None,
        reply_timeout_ms: None,
        success: Some(false),
        error: Some("timeout".to_owned()),
        reply: None,
        timeout_of: Some(request_id),
        task: None,
    }
}

impl Actor for DeadlineActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Re-arm the timeouts of requests still waiting (from before a restart).
        self.rearm(ctx);
        ctx.run_interval(SWEEP_EVERY, |act, ctx| act.sweep(ctx));
    }
}

impl DeadlineActor {
    /// Arms every pending request that is not armed yet, from PostgreSQL.
    fn rearm(&mut self, ctx: &mut Context<Self>) {
        let pool = self.pool.clone();
        let load = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            deadlines::pending_requests(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        ctx.wait(load.into_actor(self).map(|pending, act, ctx| {
            match pending {
                Ok(pending) => {
                    if !pending.is_empty() {
                        log::info!("re-armed {} pending request timeout(s)", pending.len());
                    }
                    for (id, project_id, deadline) in pending {
                        if act.armed_ids.insert(id) {
                            act.timers.push(Reverse((deadline, id, project_id)));
                        }
                    }
                    act.arm(ctx);
                }
                Err(e) => log::error!("pending requests not loaded ({e}); their timeouts will not fire until restart"),
            }
        }));
    }
}

/// Which duties of the deadline actor this broker holds (see `db::cluster`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Duties {
    /// The dead-letter sweep of expired messages.
    pub sweep: bool,
}

impl Handler<Duties> for DeadlineActor {
    type Result = ();

    fn handle(&mut self, duties: Duties, _ctx: &mut Self::Context) {
        self.sweeps = duties.sweep;
    }
}

/// Arm every pending request again (a node that may have been tracking some is gone).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Rearm;

impl Handler<Rearm> for DeadlineActor {
    type Result = ();

    fn handle(&mut self, _: Rearm, ctx: &mut Self::Context) {
        self.rearm(ctx);
    }
}

/// Arm the timeout of a committed request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TrackRequest {
    pub request_id: Uuid,
    pub project_id: Uuid,
    pub deadline: DateTime<Utc>,
}

impl Handler<TrackRequest> for DeadlineActor {
    type Result = ();

    fn handle(&mut self, track: TrackRequest, ctx: &mut Self::Context) {
        if !self.armed_ids.insert(track.request_id) {
            return;
        }
        let earliest = self.timers.peek().map(|Reverse((d, _, _))| *d);
        self.timers.push(Reverse((
            track.deadline,
            track.request_id,
            track.project_id,
        )));
        if earliest.is_none_or(|d| track.deadline < d) {
            self.arm(ctx);
        }
    }
}
