//! Coordination: file claims and tasks.
//!
//! - [`Coordination`] is the service every interface calls (WebSocket frames, REST, MCP):
//!   it validates a request, has the database decide it (`db::claims`, `db::tasks`: one
//!   transaction, conditional updates), stores the notices the decision queued as ordinary
//!   messages from `agentbus` (through the group commit, so they get dense seqs and are
//!   routed like any message), and arms the deadlines the decision created.
//! - [`CoordinationActor`] keeps those deadlines: the end of a claim's objection window, a
//!   claim's expiry, a task's claim and work deadlines. They live in PostgreSQL and are
//!   re-armed when the broker starts, those passed meanwhile at once; each fires through a
//!   conditional update, so it changes its claim or task at most once, and a notice whose
//!   message was not stored before a crash is stored at the next start (the outbox).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::persistence::Persist;
use super::settle::{Reply, Settlement};
use crate::db::claims::{self as claim_db, ClaimDeadline, Decision, Releaser};
use crate::db::outbox::{self, Pending};
use crate::db::tasks::{self as task_db, TaskDeadline};
use crate::db::timers;
use crate::db::DbPool;
use crate::domain::claims::{check_reason, check_ttl, Claim, ClaimLimits, ClaimSpec, ClaimState};
use crate::domain::notice::COORDINATION_TYPE;
use crate::domain::tasks::{check_result, Task, TaskState};
use crate::domain::BROKER_AGENT_ID;
use crate::models::{NewMessage, StoredMessage};
use crate::protocol::coordination::{invalid, Answer, CoordinationOp, Refused};
use crate::protocol::{ErrorCode, Rejection};

/// The agent type of the broker's own messages.
const BROKER_AGENT_TYPE: &str = "broker";
/// How long a failed store of notices waits before it is tried again.
const RETRY_OUTBOX: Duration = Duration::from_secs(1);
/// The shortest wait before a deadline that the database says is not due yet is tried again
/// (its clock may be a little behind this one's).
const MIN_REARM: Duration = Duration::from_millis(20);

/// A deadline the actor keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Deadline {
    ClaimWindow,
    ClaimExpiry,
    TaskUnclaimed,
    TaskWork,
}

/// Arm a deadline (or arm it again: a deadline that changed nothing is harmless).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Arm {
    pub deadline: Deadline,
    pub id: Uuid,
    pub at: DateTime<Utc>,
}

/// Wake me when this pending claim is decided (or it was decided already).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AwaitDecision {
    pub claim_id: Uuid,
    pub tx: oneshot::Sender<()>,
}

/// This pending claim was decided by a request (objection, withdrawal).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Decided(pub Uuid);

/// Notices could not be stored: try the outbox again shortly.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RetryOutbox;

pub struct CoordinationActor {
    pool: DbPool,
    persistence: Recipient<Persist>,
    timers: BinaryHeap<Reverse<(DateTime<Utc>, Deadline, Uuid)>>,
    armed: Option<SpawnHandle>,
    waiters: HashMap<Uuid, Vec<oneshot::Sender<()>>>,
    /// An outbox flush is running, and whether another was asked for meanwhile.
    flushing: bool,
    flush_again: bool,
    db_timeout: Duration,
}

impl CoordinationActor {
    pub fn new(pool: DbPool, persistence: Recipient<Persist>, db_timeout: Duration) -> Self {
        CoordinationActor {
            pool,
            persistence,
            timers: BinaryHeap::new(),
            armed: None,
            waiters: HashMap::new(),
            flushing: false,
            flush_again: false,
            db_timeout,
        }
    }

    fn push(&mut self, arm: Arm, ctx: &mut Context<Self>) {
        let earliest = self.timers.peek().map(|Reverse((at, _, _))| *at);
        self.timers.push(Reverse((arm.at, arm.deadline, arm.id)));
        if earliest.is_none_or(|e| arm.at < e) {
            self.arm(ctx);
        }
    }

    fn arm(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.armed.take() {
            ctx.cancel_future(handle);
        }
        let Some(Reverse((at, _, _))) = self.timers.peek() else {
            return;
        };
        let wait = (*at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        self.armed = Some(ctx.run_later(wait, |act, ctx| {
            act.armed = None;
            act.fire(ctx);
        }));
    }

    fn fire(&mut self, ctx: &mut Context<Self>) {
        let now = Utc::now();
        while let Some(Reverse((at, deadline, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.reach(deadline, id, ctx);
        }
        self.arm(ctx);
    }

    /// A deadline is reached: the database decides whether it changes anything.
    fn reach(&mut self, deadline: Deadline, id: Uuid, ctx: &mut Context<Self>) {
        let (pool, persistence, wait) =
            (self.pool.clone(), self.persistence.clone(), self.db_timeout);
        let work = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let due = match deadline {
                Deadline::ClaimWindow => claim_due(
                    claim_db::grant_due(&mut conn, id).await,
                    Deadline::ClaimExpiry,
                ),
                Deadline::ClaimExpiry => claim_due(claim_db::expire_due(&mut conn, id).await, None),
                Deadline::TaskUnclaimed => task_due(task_db::unclaimed_due(&mut conn, id).await),
                Deadline::TaskWork => task_due(task_db::work_due(&mut conn, id).await),
            }?;
            drop(conn);
            if let Fired::Done { pending, .. } = &due {
                publish(&pool, &persistence, pending.clone(), wait).await?;
            }
            Ok::<_, String>(due)
        };
        ctx.spawn(work.into_actor(self).map(move |result, act, ctx| {
            match result {
                Ok(Fired::Done { next, .. }) => {
                    if let Some(arm) = next {
                        act.push(arm, ctx);
                    }
                }
                Ok(Fired::Later(at)) => {
                    let floor =
                        Utc::now() + chrono::Duration::from_std(MIN_REARM).unwrap_or_default();
                    act.push(
                        Arm {
                            deadline,
                            id,
                            at: at.max(floor),
                        },
                        ctx,
                    );
                }
                Ok(Fired::Settled) => {}
                Err(e) => {
                    log::warn!("{deadline:?} of {id} not handled ({e}); trying again");
                    act.push(
                        Arm {
                            deadline,
                            id,
                            at: Utc::now()
                                + chrono::Duration::from_std(RETRY_OUTBOX).unwrap_or_default(),
                        },
                        ctx,
                    );
                }
            }
            if deadline == Deadline::ClaimWindow {
                act.wake(id);
            }
        }));
    }

    fn wake(&mut self, claim_id: Uuid) {
        for tx in self.waiters.remove(&claim_id).unwrap_or_default() {
            let _ = tx.send(());
        }
    }

    /// Stores what the outbox holds (after a crash, or a failed store).
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing {
            self.flush_again = true;
            return;
        }
        self.flushing = true;
        let (pool, persistence, wait) =
            (self.pool.clone(), self.persistence.clone(), self.db_timeout);
        let work = async move {
            let waiting = {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                outbox::waiting(&mut conn, 1000)
                    .await
                    .map_err(|e| e.to_string())?
            };
            let n = waiting.len();
            publish(&pool, &persistence, waiting, wait).await?;
            Ok::<_, String>(n)
        };
        ctx.spawn(work.into_actor(self).map(|result, act, ctx| {
            act.flushing = false;
            match result {
                Ok(n) => {
                    if n > 0 {
                        log::info!("stored {n} coordination notice(s) from the outbox");
                    }
                    if n == 1000 || std::mem::take(&mut act.flush_again) {
                        act.flush(ctx);
                    }
                }
                Err(e) => {
                    log::warn!("coordination notices not stored ({e}); trying again");
                    ctx.run_later(RETRY_OUTBOX, |act, ctx| act.flush(ctx));
                }
            }
        }));
    }
}

/// What a deadline did.
enum Fired {
    Done {
        pending: Vec<Pending>,
        /// The deadline this one led to (a granted claim's expiry).
        next: Option<Arm>,
    },
    Later(DateTime<Utc>),
    Settled,
}

/// What a deadline did, from what the database found; `next` is the deadline the changed
/// row waits for now, if any.
fn fired<T>(
    due: diesel::QueryResult<timers::Due<T>>,
    next: impl FnOnce(&T) -> Option<Arm>,
) -> Result<Fired, String> {
    Ok(match due.map_err(|e| e.to_string())? {
        timers::Due::Done(row, pending) => Fired::Done {
            next: next(&row),
            pending,
        },
        timers::Due::Later(at) => Fired::Later(at),
        timers::Due::Settled => Fired::Settled,
    })
}

fn claim_due(
    due: diesel::QueryResult<claim_db::Due>,
    next: impl Into<Option<Deadline>>,
) -> Result<Fired, String> {
    let next = next.into();
    fired(due, |claim| {
        next.zip(claim.expires_at).map(|(deadline, at)| Arm {
            deadline,
            id: claim.id,
            at,
        })
    })
}

fn task_due(due: diesel::QueryResult<task_db::Due>) -> Result<Fired, String> {
    fired(due, task_deadline)
}

/// The deadline a task waits for in its state, if any.
fn task_deadline(task: &Task) -> Option<Arm> {
    match task.state {
        TaskState::Open => task.claim_deadline.map(|at| Arm {
            deadline: Deadline::TaskUnclaimed,
            id: task.id,
            at,
        }),
        TaskState::Claimed => task.work_deadline.map(|at| Arm {
            deadline: Deadline::TaskWork,
            id: task.id,
            at,
        }),
        _ => None,
    }
}

impl Actor for CoordinationActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Re-arm every deadline (from before a restart), then store what the outbox holds,
        // before anything else is handled.
        let load = self.load_deadlines();
        ctx.wait(load);
    }
}

impl CoordinationActor {
    /// Arms every pending claim and task deadline stored in PostgreSQL, then stores what the
    /// outbox holds. Arming one twice is harmless: each decision is a conditional update that
    /// happens once, whichever broker makes it.
    fn load_deadlines(&mut self) -> impl ActorFuture<Self, Output = ()> + 'static {
        let pool = self.pool.clone();
        let load = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let claims = claim_db::deadlines(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            let tasks = task_db::deadlines(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((claims, tasks))
        };
        load.into_actor(self).map(|loaded, act, ctx| {
            match loaded {
                Ok((claims, tasks)) => {
                    let n = claims.len() + tasks.len();
                    if n > 0 {
                        log::info!("re-armed {n} claim and task deadline(s)");
                    }
                    for (id, kind, at) in claims {
                        let deadline = match kind {
                            ClaimDeadline::Window => Deadline::ClaimWindow,
                            ClaimDeadline::Expiry => Deadline::ClaimExpiry,
                        };
                        act.timers.push(Reverse((at, deadline, id)));
                    }
                    for (id, kind, at) in tasks {
                        let deadline = match kind {
                            TaskDeadline::Unclaimed => Deadline::TaskUnclaimed,
                            TaskDeadline::Work => Deadline::TaskWork,
                        };
                        act.timers.push(Reverse((at, deadline, id)));
                    }
                    act.arm(ctx);
                }
                Err(e) => log::error!(
                    "claim and task deadlines not loaded ({e}); they will not fire until restart"
                ),
            }
            act.flush(ctx);
        })
    }
}

/// Another broker on the database left or died (this broker holds the `timeouts` duty): its
/// claim and task deadlines, and any notice it left in the outbox, are taken over.
impl Handler<super::deadlines::Rearm> for CoordinationActor {
    type Result = ();

    fn handle(&mut self, _: super::deadlines::Rearm, ctx: &mut Self::Context) {
        let load = self.load_deadlines();
        ctx.spawn(load);
    }
}

impl Handler<Arm> for CoordinationActor {
    type Result = ();

    fn handle(&mut self, arm: Arm, ctx: &mut Self::Context) {
        self.push(arm, ctx);
    }
}

impl Handler<AwaitDecision> for CoordinationActor {
    type Result = ();

    fn handle(&mut self, wait: AwaitDecision, _ctx: &mut Self::Context) {
        self.waiters.entry(wait.claim_id).or_default().push(wait.tx);
    }
}

impl Handler<Decided> for CoordinationActor {
    type Result = ();

    fn handle(&mut self, decided: Decided, _ctx: &mut Self::Context) {
        self.wake(decided.0);
    }
}

impl Handler<RetryOutbox> for CoordinationActor {
    type Result = ();

    fn handle(&mut self, _: RetryOutbox, ctx: &mut Self::Context) {
        ctx.run_later(RETRY_OUTBOX, |act, ctx| act.flush(ctx));
    }
}

/// The message that stores a notice: from `agentbus`, type `coordination`, with the notice's
/// id as its `client_msg_id` (so it is stored once however often it is handed over).
fn notice_message(pending: &Pending) -> NewMessage {
    let n = &pending.notice;
    NewMessage {
        id: Uuid::new_v4(),
        project_id: pending.project_id,
        sender_agent_id: BROKER_AGENT_ID.to_owned(),
        sender_agent_type: BROKER_AGENT_TYPE.to_owned(),
        sender_session_id: None,
        recipient_agent_id: n.to.clone(),
        message_type: COORDINATION_TYPE.to_owned(),
        content: n.content.clone(),
        metadata: n.metadata.clone(),
        priority: n.priority,
        correlation_id: None,
        reply_to: n.reply_to,
        client_msg_id: Some(pending.id.to_string()),
        ttl_ms: None,
        recipient_agent_type: n.to_type.clone(),
        reply_timeout_ms: None,
        success: n.success,
        error: n.error.clone(),
        reply: None,
        timeout_of: None,
        task: None,
    }
}

/// Stores notices as messages, in order, and removes each from the outbox once stored.
async fn publish(
    pool: &DbPool,
    persistence: &Recipient<Persist>,
    pending: Vec<Pending>,
    db_timeout: Duration,
) -> Result<Vec<StoredMessage>, String> {
    let mut stored = Vec::with_capacity(pending.len());
    for notice in pending {
        let (tx, rx) = oneshot::channel();
        persistence
            .send(Persist::new(notice_message(&notice), Reply::Http(tx)))
            .await
            .map_err(|e| format!("the persistence actor did not take the notice: {e}"))?;
        let message = match tokio::time::timeout(db_timeout * 3 + Duration::from_secs(1), rx).await
        {
            Ok(Ok(Settlement::Stored { message, .. })) => message,
            Ok(Ok(Settlement::Failed { rejection, .. })) => return Err(rejection.message),
            Ok(Err(_)) => return Err("the persistence actor dropped the notice".into()),
            Err(_) => return Err("no commit of the notice in time".into()),
        };
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        outbox::done(&mut conn, notice.id)
            .await
            .map_err(|e| e.to_string())?;
        stored.push(message);
    }
    Ok(stored)
}

/// Who asks: an agent of a project.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub project_id: Uuid,
    pub agent_id: &'a str,
}

/// The coordination service (see the module doc). Cheap to clone.
#[derive(Clone)]
pub struct Coordination {
    pool: DbPool,
    persistence: Recipient<Persist>,
    actor: Addr<CoordinationActor>,
    limits: ClaimLimits,
    db_timeout: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> Rejection {
    log::warn!("coordination: database unavailable: {e}");
    Rejection::new(
        ErrorCode::Unavailable,
        "the database is unavailable; nothing was changed, retry later",
    )
}

impl Coordination {
    pub fn new(
        pool: DbPool,
        persistence: Recipient<Persist>,
        actor: Addr<CoordinationActor>,
        limits: ClaimLimits,
        db_timeout: Duration,
    ) -> Coordination {
        Coordination {
            pool,
            persistence,
            actor,
            limits,
            db_timeout,
        }
    }

    pub fn limits(&self) -> &ClaimLimits {
        &self.limits
    }

    async fn conn(
        &self,
    ) -> Result<
        diesel_async::pooled_connection::deadpool::Object<diesel_async::AsyncPgConnection>,
        Rejection,
    > {
        self.pool.get().await.map_err(unavailable)
    }

    /// Stores the notices of a decision; the seq of the first is the answer's. A failed store
    /// leaves them in the outbox, stored shortly after: the decision stands either way.
    async fn announce(&self, pending: Vec<Pending>) -> Option<i64> {
        match publish(&self.pool, &self.persistence, pending, self.db_timeout).await {
            Ok(stored) => stored.first().map(|m| m.seq),
            Err(e) => {
                log::warn!("coordination notices not stored yet ({e}); they stay in the outbox");
                self.actor.do_send(RetryOutbox);
                None
            }
        }
    }

    /// Runs one WebSocket coordination frame for a connected agent.
    pub async fn run(&self, caller: Caller<'_>, op: CoordinationOp) -> Result<Answer, Rejection> {
        match op {
            CoordinationOp::Claim {
                paths,
                shared,
                ttl_ms,
                objection_ms,
                reason,
            } => {
                let spec = self.spec(&paths, shared, ttl_ms, objection_ms, reason)?;
                self.claim(caller, &spec).await
            }
            CoordinationOp::Object { claim_id, reason } => {
                self.object(caller, claim_id, reason).await
            }
            CoordinationOp::Release { claim_id } => {
                let by = Releaser {
                    agent_id: Some(caller.agent_id),
                    force: false,
                    reason: None,
                };
                self.release(caller.project_id, claim_id, &by).await
            }
            CoordinationOp::Renew { claim_id, ttl_ms } => {
                self.renew(caller, claim_id, ttl_ms).await
            }
            CoordinationOp::ClaimTask { task_id } => self.claim_task(caller, task_id).await,
            CoordinationOp::CompleteTask {
                task_id,
                success,
                result,
            } => self.complete_task(caller, task_id, success, result).await,
            CoordinationOp::ReleaseTask { task_id } => self.release_task(caller, task_id).await,
            CoordinationOp::CancelTask { task_id, reason } => {
                self.cancel_task(caller, task_id, reason).await
            }
        }
    }

    /// Validates a claim request against the configured limits.
    pub fn spec(
        &self,
        paths: &[String],
        shared: bool,
        ttl_ms: Option<i64>,
        objection_ms: Option<i64>,
        reason: Option<String>,
    ) -> Result<ClaimSpec, Rejection> {
        ClaimSpec::new(paths, shared, ttl_ms, objection_ms, reason, &self.limits)
            .map_err(|e| invalid(e.field, e.message))
    }

    /// Decides a claim: granted (or merged), pending (announced), or refused.
    pub async fn claim(&self, caller: Caller<'_>, spec: &ClaimSpec) -> Result<Answer, Rejection> {
        let decision = {
            let mut conn = self.conn().await?;
            claim_db::claim(&mut conn, caller.project_id, caller.agent_id, spec)
                .await
                .map_err(unavailable)?
        };
        let (decision, pending) = decision;
        let seq = self.announce(pending).await;
        let mut answer = Answer {
            seq,
            ..Answer::done("claim")
        };
        match decision {
            Decision::Granted { claim, merged } => {
                self.arm_claim(&claim);
                answer.merged = merged;
                answer.claim = Some(claim);
            }
            Decision::Pending { claim } => {
                self.arm_claim(&claim);
                answer.claim = Some(claim);
            }
            Decision::Refused { claim, conflicts } => {
                let holders = conflicts
                    .iter()
                    .map(|c| c.holder.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                answer = answer.refuse(
                    Refused::Conflict,
                    format!("these paths are claimed by {holders}: see `conflicts`"),
                );
                answer.claim = Some(claim);
                answer.conflicts = conflicts;
            }
        }
        Ok(answer)
    }

    fn arm_claim(&self, claim: &Claim) {
        let arm = match claim.state {
            ClaimState::Pending => claim.decide_at.map(|at| (Deadline::ClaimWindow, at)),
            ClaimState::Granted => claim.expires_at.map(|at| (Deadline::ClaimExpiry, at)),
            _ => None,
        };
        if let Some((deadline, at)) = arm {
            self.actor.do_send(Arm {
                deadline,
                id: claim.id,
                at,
            });
        }
    }

    /// Waits until a pending claim is decided (at the latest shortly after its window), then
    /// answers its outcome: granted, or refused as objected (or withdrawn). `seq` is then the
    /// seq of the decision's notice when it can be read.
    pub async fn decided(&self, answer: Answer) -> Result<Answer, Rejection> {
        let Some(claim) = answer
            .claim
            .as_ref()
            .filter(|c| c.state == ClaimState::Pending)
        else {
            return Ok(answer);
        };
        let (project_id, claim_id) = (claim.project_id, claim.id);
        let window = claim
            .decide_at
            .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::ZERO);
        let (tx, rx) = oneshot::channel();
        self.actor
            .send(AwaitDecision { claim_id, tx })
            .await
            .map_err(|e| unavailable(format!("the coordination actor did not answer: {e}")))?;
        // Decided before the wait was registered: the claim is read again below anyway.
        let still_pending = {
            let mut conn = self.conn().await?;
            claim_db::find(&mut conn, project_id, claim_id)
                .await
                .map_err(unavailable)?
                .is_some_and(|c| c.state == ClaimState::Pending)
        };
        if still_pending {
            let _ = tokio::time::timeout(window + self.db_timeout * 2, rx).await;
        }
        let mut conn = self.conn().await?;
        let Some(claim) = claim_db::find(&mut conn, project_id, claim_id)
            .await
            .map_err(unavailable)?
        else {
            return Err(unavailable("the claim disappeared"));
        };
        let objections: Vec<_> = claim_db::objections(&mut conn, &[claim_id])
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        let seq = decision_seq(&mut conn, project_id, claim_id).await;
        let mut out = Answer {
            seq: seq.or(answer.seq),
            objections,
            ..Answer::done("claim")
        };
        out = match claim.state {
            ClaimState::Granted | ClaimState::Expired | ClaimState::Pending => out,
            ClaimState::Objected => {
                let who = out
                    .objections
                    .iter()
                    .map(|o| format!("{}: {}", o.agent_id, o.reason))
                    .collect::<Vec<_>>()
                    .join("; ");
                out.refuse(Refused::Objected, format!("objected by {who}"))
            }
            ClaimState::Released | ClaimState::Refused => out.refuse(
                Refused::NotHeld,
                "the claim was withdrawn before its window closed",
            ),
        };
        out.claim = Some(claim);
        Ok(out)
    }

    /// Another agent objects to a pending claim: it is refused at once.
    pub async fn object(
        &self,
        caller: Caller<'_>,
        claim_id: Uuid,
        reason: String,
    ) -> Result<Answer, Rejection> {
        let reason = check_reason("reason", Some(reason))
            .map_err(|e| invalid(e.field, e.message))?
            .ok_or_else(|| Rejection {
                field: Some("reason"),
                ..Rejection::new(
                    ErrorCode::MissingField,
                    "`reason` is required: say why you object",
                )
            })?;
        let outcome = {
            let mut conn = self.conn().await?;
            claim_db::object(
                &mut conn,
                caller.project_id,
                claim_id,
                caller.agent_id,
                &reason,
            )
            .await
            .map_err(unavailable)?
        };
        let answer = Answer::done("object");
        Ok(match outcome {
            Ok((claim, objection, pending)) => {
                let seq = self.announce(pending).await;
                self.actor.do_send(Decided(claim.id));
                Answer {
                    seq,
                    claim: Some(claim),
                    objections: vec![objection],
                    ..answer
                }
            }
            Err(claim_db::Refusal::NotFound) => answer.refuse(
                Refused::NotFound,
                format!("no claim {claim_id} in this project"),
            ),
            Err(claim_db::Refusal::NotYours(claim)) => Answer {
                claim: Some(claim),
                ..answer.refuse(
                    Refused::Forbidden,
                    "this is your own claim: release it instead of objecting",
                )
            },
            Err(claim_db::Refusal::WrongState(claim)) => Answer {
                ..answer.refuse(
                    Refused::ClaimDecided,
                    format!(
                        "the claim is {} and its objection window is over{}",
                        claim.state.as_str(),
                        claim
                            .decide_at
                            .map(|at| format!(" (it closed at {at})"))
                            .unwrap_or_else(|| " (it had none)".into())
                    ),
                )
            }
            .with_claim(claim),
        })
    }

    /// Releases a claim (the agent's own, or any with `force`).
    pub async fn release(
        &self,
        project_id: Uuid,
        claim_id: Uuid,
        by: &Releaser<'_>,
    ) -> Result<Answer, Rejection> {
        let reason = check_reason("reason", by.reason.map(str::to_owned))
            .map_err(|e| invalid(e.field, e.message))?;
        let by = Releaser {
            reason: reason.as_deref(),
            ..*by
        };
        let outcome = {
            let mut conn = self.conn().await?;
            claim_db::release(&mut conn, project_id, claim_id, &by)
                .await
                .map_err(unavailable)?
        };
        let answer = Answer::done("release");
        Ok(match outcome {
            Ok((claim, pending)) => {
                let seq = self.announce(pending).await;
                self.actor.do_send(Decided(claim.id));
                Answer {
                    seq,
                    ..answer.with_claim(claim)
                }
            }
            Err(refusal) => refuse_claim(answer, refusal, claim_id, "release"),
        })
    }

    /// Extends a granted claim of the caller to `ttl_ms` (or the default) from now.
    pub async fn renew(
        &self,
        caller: Caller<'_>,
        claim_id: Uuid,
        ttl_ms: Option<i64>,
    ) -> Result<Answer, Rejection> {
        let ttl = check_ttl(ttl_ms, &self.limits).map_err(|e| invalid(e.field, e.message))?;
        let outcome = {
            let mut conn = self.conn().await?;
            claim_db::renew(&mut conn, caller.project_id, claim_id, caller.agent_id, ttl)
                .await
                .map_err(unavailable)?
        };
        let answer = Answer::done("renew");
        Ok(match outcome {
            Ok(claim) => {
                self.arm_claim(&claim);
                answer.with_claim(claim)
            }
            Err(refusal) => refuse_claim(answer, refusal, claim_id, "renew"),
        })
    }

    /// One claim, with its objections.
    pub async fn get_claim(
        &self,
        project_id: Uuid,
        claim_id: Uuid,
    ) -> Result<Option<(Claim, Vec<crate::domain::claims::Objection>)>, Rejection> {
        let mut conn = self.conn().await?;
        let Some(claim) = claim_db::find(&mut conn, project_id, claim_id)
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let objections = claim_db::objections(&mut conn, &[claim_id])
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        Ok(Some((claim, objections)))
    }

    /// A project's claims.
    pub async fn list_claims(
        &self,
        project_id: Uuid,
        filter: &claim_db::ListFilter<'_>,
    ) -> Result<Vec<Claim>, Rejection> {
        let mut conn = self.conn().await?;
        claim_db::list(&mut conn, project_id, filter)
            .await
            .map_err(unavailable)
    }

    fn arm_task(&self, task: &Task) {
        if let Some(arm) = task_deadline(task) {
            self.actor.do_send(arm);
        }
    }

    /// Claims a task: the first claim wins.
    pub async fn claim_task(&self, caller: Caller<'_>, task_id: Uuid) -> Result<Answer, Rejection> {
        let outcome = {
            let mut conn = self.conn().await?;
            task_db::claim(&mut conn, caller.project_id, task_id, caller.agent_id)
                .await
                .map_err(unavailable)?
        };
        let answer = Answer::done("claim_task");
        Ok(match outcome {
            Ok((task, _changed, pending)) => {
                let seq = self.announce(pending).await;
                self.arm_task(&task);
                Answer {
                    seq,
                    task: Some(task),
                    ..answer
                }
            }
            Err(refusal) => refuse_task(answer, refusal, task_id),
        })
    }

    /// The holder finishes its task.
    pub async fn complete_task(
        &self,
        caller: Caller<'_>,
        task_id: Uuid,
        success: bool,
        result: Option<String>,
    ) -> Result<Answer, Rejection> {
        let result = check_result("result", result).map_err(|e| invalid("result", e))?;
        let outcome = {
            let mut conn = self.conn().await?;
            task_db::complete(
                &mut conn,
                caller.project_id,
                task_id,
                caller.agent_id,
                success,
                result.as_deref(),
            )
            .await
            .map_err(unavailable)?
        };
        self.moved(Answer::done("complete_task"), outcome, task_id)
            .await
    }

    /// The holder gives its task back.
    pub async fn release_task(
        &self,
        caller: Caller<'_>,
        task_id: Uuid,
    ) -> Result<Answer, Rejection> {
        let outcome = {
            let mut conn = self.conn().await?;
            task_db::release(&mut conn, caller.project_id, task_id, caller.agent_id)
                .await
                .map_err(unavailable)?
        };
        self.moved(Answer::done("release_task"), outcome, task_id)
            .await
    }

    /// The sender cancels its task.
    pub async fn cancel_task(
        &self,
        caller: Caller<'_>,
        task_id: Uuid,
        reason: Option<String>,
    ) -> Result<Answer, Rejection> {
        let reason = check_result("reason", reason).map_err(|e| invalid("reason", e))?;
        let outcome = {
            let mut conn = self.conn().await?;
            task_db::cancel(
                &mut conn,
                caller.project_id,
                task_id,
                caller.agent_id,
                reason.as_deref(),
            )
            .await
            .map_err(unavailable)?
        };
        self.moved(Answer::done("cancel_task"), outcome, task_id)
            .await
    }

    async fn moved(
        &self,
        answer: Answer,
        outcome: Result<task_db::Moved, task_db::Refusal>,
        task_id: Uuid,
    ) -> Result<Answer, Rejection> {
        Ok(match outcome {
            Ok((task, pending)) => {
                let seq = self.announce(pending).await;
                self.arm_task(&task);
                Answer {
                    seq,
                    task: Some(task),
                    ..answer
                }
            }
            Err(refusal) => refuse_task(answer, refusal, task_id),
        })
    }

    /// One task of a project.
    pub async fn get_task(
        &self,
        project_id: Uuid,
        task_id: Uuid,
    ) -> Result<Option<Task>, Rejection> {
        let mut conn = self.conn().await?;
        task_db::find(&mut conn, project_id, task_id)
            .await
            .map_err(unavailable)
    }

    /// A project's tasks, newest first.
    pub async fn list_tasks(
        &self,
        project_id: Uuid,
        state: Option<TaskState>,
        limit: i64,
    ) -> Result<Vec<Task>, Rejection> {
        let mut conn = self.conn().await?;
        task_db::list(&mut conn, project_id, state, limit)
            .await
            .map_err(unavailable)
    }
}

/// The seq of the notice that decided a claim (granted, objected...), if it is stored yet.
async fn decision_seq(
    conn: &mut diesel_async::AsyncPgConnection,
    project_id: Uuid,
    claim_id: Uuid,
) -> Option<i64> {
    claim_db::notice_seq(conn, project_id, claim_id)
        .await
        .ok()
        .flatten()
}

impl Answer {
    fn with_claim(mut self, claim: Claim) -> Answer {
        self.claim = Some(claim);
        self
    }
}

fn refuse_claim(answer: Answer, refusal: claim_db::Refusal, claim_id: Uuid, what: &str) -> Answer {
    match refusal {
        claim_db::Refusal::NotFound => answer.refuse(
            Refused::NotFound,
            format!("no claim {claim_id} in this project"),
        ),
        claim_db::Refusal::NotYours(claim) => {
            let holder = claim.agent_id.clone();
            answer
                .refuse(
                    Refused::Forbidden,
                    format!("this claim is {holder}'s: only its holder may {what} it (or an admin, by force)"),
                )
                .with_claim(claim)
        }
        claim_db::Refusal::WrongState(claim) => {
            let state = match claim.state {
                ClaimState::Granted => "expired",
                other => other.as_str(),
            };
            answer
                .refuse(
                    Refused::NotHeld,
                    format!("the claim is not held any more: it is {state}"),
                )
                .with_claim(claim)
        }
    }
}

fn refuse_task(answer: Answer, refusal: task_db::Refusal, task_id: Uuid) -> Answer {
    let (why, text, task) = match refusal {
        task_db::Refusal::NotFound => (
            Refused::NotFound,
            format!(
                "no task {task_id} in this project (a task is a message sent with \"task\": true)"
            ),
            None,
        ),
        task_db::Refusal::NotYours(task) => {
            let text = if answer.action == "cancel_task" {
                format!(
                    "only its sender ({}) may cancel this task",
                    task.sender_agent_id
                )
            } else {
                "this task was not offered to you (it names another agent or type)".to_owned()
            };
            (Refused::Forbidden, text, Some(task))
        }
        task_db::Refusal::AlreadyClaimed(task) => (
            Refused::AlreadyClaimed,
            format!(
                "already claimed by {}",
                task.holder.as_deref().unwrap_or("another agent")
            ),
            Some(task),
        ),
        task_db::Refusal::NotHolder(task) => (
            Refused::NotHolder,
            match (&task.state, &task.holder) {
                (TaskState::Claimed, Some(holder)) => format!("the task is held by {holder}"),
                _ => "the task is open: claim it first".to_owned(),
            },
            Some(task),
        ),
        task_db::Refusal::Closed(task) => (
            Refused::TaskClosed,
            format!("the task is {}", task.state.as_str()),
            Some(task),
        ),
    };
    let mut answer = answer.refuse(why, text);
    answer.task = task;
    answer
}
