//! `DeadlineActor`: what happens at a given time rather than in answer to a message.
//!
//! - Request timeouts: every committed request is tracked until its deadline; then the
//!   broker sends the requester a `response` with `success: false, error: "timeout"`, unless
//!   a reply was committed first (the commit path checks, atomically). Pending requests live
//!   in PostgreSQL, so the timeouts are re-armed when the broker starts again.
//! - The dead-letter sweep: messages that expired before reaching any recipient they were
//!   owed to are recorded in `dead_letters` with reason `expired`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use diesel::sql_types::{Timestamptz, Uuid as SqlUuid};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use super::persistence::{Persist, PersistenceActor, Reply};
use crate::db::DbPool;
use crate::models::NewMessage;

/// How often expired messages are swept into the dead-letter list.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The sender of the broker's own messages.
pub const BROKER_AGENT_ID: &str = crate::domain::BROKER_AGENT_ID;
pub const BROKER_AGENT_TYPE: &str = "broker";

pub struct DeadlineActor {
    pool: DbPool,
    /// Where timeout responses are sent to be stored (set once both actors run).
    persistence: Option<Addr<PersistenceActor>>,
    /// Requests by deadline (earliest first).
    timers: BinaryHeap<Reverse<(DateTime<Utc>, Uuid, Uuid)>>,
    /// The wake-up for the earliest deadline.
    armed: Option<SpawnHandle>,
    /// Messages that expired at or before this time have been swept.
    swept_until: DateTime<Utc>,
    sweeping: bool,
}

impl DeadlineActor {
    pub fn new(pool: DbPool) -> Self {
        DeadlineActor {
            pool,
            persistence: None,
            timers: BinaryHeap::new(),
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
        let Some(persistence) = self.persistence.clone() else {
            // Not wired yet: try again shortly.
            self.armed = Some(ctx.run_later(Duration::from_millis(50), |act, ctx| act.fire(ctx)));
            return;
        };
        let now = Utc::now();
        while let Some(Reverse((deadline, request_id, project_id))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            persistence.do_send(Persist::new(
                timeout_response(project_id, request_id),
                Reply::Broker,
            ));
        }
        self.arm(ctx);
    }

    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        let pool = self.pool.clone();
        let (from, until) = (self.swept_until, Utc::now());
        let sweep = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            // "Was owed to someone" at expiry: visible to a member (`agentbus_owed` without
            // its expiry test, since every row here has expired).
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
            .execute(&mut conn)
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

#[derive(QueryableByName)]
struct PendingRequest {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    project_id: Uuid,
    #[diesel(sql_type = Timestamptz)]
    reply_deadline: DateTime<Utc>,
}

impl Actor for DeadlineActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Re-arm the timeouts of requests still waiting (from before a restart).
        let pool = self.pool.clone();
        let load = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            diesel::sql_query(
                "SELECT id, project_id, reply_deadline FROM agent_messages \
                 WHERE expects_reply AND replied_at IS NULL AND reply_deadline IS NOT NULL",
            )
            .load::<PendingRequest>(&mut conn)
            .await
            .map_err(|e| e.to_string())
        };
        ctx.wait(load.into_actor(self).map(|pending, act, ctx| {
            match pending {
                Ok(pending) => {
                    if !pending.is_empty() {
                        log::info!("re-armed {} pending request timeout(s)", pending.len());
                    }
                    for r in pending {
                        act.timers.push(Reverse((r.reply_deadline, r.id, r.project_id)));
                    }
                    act.arm(ctx);
                }
                Err(e) => log::error!("pending requests not loaded ({e}); their timeouts will not fire until restart"),
            }
        }));
        ctx.run_interval(SWEEP_EVERY, |act, ctx| act.sweep(ctx));
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

/// Wires the persistence actor in (the two refer to each other).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachPersistence(pub Addr<PersistenceActor>);

impl Handler<AttachPersistence> for DeadlineActor {
    type Result = ();

    fn handle(&mut self, attach: AttachPersistence, _ctx: &mut Self::Context) {
        self.persistence = Some(attach.0);
    }
}
