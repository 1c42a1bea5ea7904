//! `SessionActor`: one per WebSocket connection. It parses and validates the client's frames,
//! forwards sends to the persistence actor, and carries out what its [`Delivery`] core
//! decides: the write steps (one at a time, in order), the store reads of the replay and
//! catch-up, the progress reports and the timers. The decisions themselves (the outbox and
//! its bounds, flow control, confirmation, draining and closing) live in
//! [`super::delivery`], without I/O; this actor only feeds it events and executes its
//! actions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::{AggregatedMessage, CloseCode as WsCloseCode, CloseReason, ProtocolError};
use bytestring::ByteString;
use uuid::Uuid;

use super::channel::{ChannelActor, Join, Leave, ToSession};
use super::cursor::{CursorActor, GiveUp, MarkRead, RecordAttempts, ReportProgress};
use super::delivery::{Action, Delivery, Frame, Limits, SendRefused, Setup};
use super::feed::StoreRange;
use super::persistence::Persist;
use super::settle::{no_recipient_text, Reply, Settled, Settlement};
use crate::config::Settings;
use crate::db::cursors::{self, MemberCursor, OwedQuery};
use crate::db::{queries, DbPool};
use crate::frames::{Oversize, Refusal};
use crate::limits::{ConnectionPermit, ProjectLimits, SessionLimit};
use crate::metrics::Stage;
use crate::protocol::{self, AckMode, ClientOp, CloseCode, ErrorCode, Rejection, ServerFrame};

/// How long a closing session waits for its close frame to be written before it stops anyway
/// (a dead peer never drains its socket).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Who a session is: fixed at connect time, from the authenticated upgrade request.
#[derive(Debug, Clone)]
pub struct Identity {
    pub session_id: Uuid,
    /// The project token it connected with (none on an open broker or with the admin token).
    pub token_id: Option<Uuid>,
    pub project_id: Uuid,
    pub agent_id: String,
    pub agent_type: String,
    /// A read-only observer (connected without `agent_id`): it receives every message of the
    /// project, is no member (no cursor, nothing owed to it, not in the agent list) and
    /// cannot send. `agent_id` and `agent_type` are empty.
    pub observer: bool,
}

/// How the session delivers, chosen at connect time.
#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    pub ack: AckMode,
    /// Replay from this seq instead of the agent's ack floor (`?since=`).
    pub since: Option<i64>,
    /// The member's stored cursor when it connected.
    pub cursor: MemberCursor,
}

/// What the session needs from the rest of the broker.
#[derive(Clone)]
pub struct SessionDeps {
    pub channel: Addr<ChannelActor>,
    pub persistence: Recipient<Persist>,
    pub cursors: Addr<CursorActor>,
    pub pool: DbPool,
    pub settings: Arc<Settings>,
    pub stats: crate::stats::Stats,
    pub project_limits: ProjectLimits,
    /// File claims and tasks (`claim`, `claim_task` … frames).
    pub coordination: super::coordination::Coordination,
}

pub struct SessionActor {
    identity: Identity,
    deps: SessionDeps,
    options: DeliveryOptions,
    /// The decisions: what to write, when, and what it means once written.
    delivery: Delivery,
    /// The write half of the WebSocket. Only the write steps use it, one at a time.
    ws: actix_ws::Session,
    /// Why the reading side stopped early, if it did (a frame header over the limit).
    refusal: Refusal,
    /// This connection's rate limit.
    limit: SessionLimit,
    /// Its place among the connections of its project and address, freed when it stops.
    _permit: ConnectionPermit,
}

impl SessionActor {
    pub fn new(
        identity: Identity,
        deps: SessionDeps,
        options: DeliveryOptions,
        ws: actix_ws::Session,
        permit: ConnectionPermit,
        refusal: Refusal,
    ) -> Self {
        let limit = SessionLimit::new(
            deps.settings.rate_per_session,
            deps.settings.burst_per_session,
        );
        let delivery = Delivery::new(
            Setup {
                session_id: identity.session_id,
                ack: options.ack,
                observer: identity.observer,
                skips_owed: options
                    .since
                    .is_some_and(|since| since > options.cursor.ack_floor),
                limits: Limits::new(&deps.settings),
            },
            Instant::now(),
        );
        SessionActor {
            identity,
            deps,
            options,
            delivery,
            ws,
            refusal,
            limit,
            _permit: permit,
        }
    }

    /// The store query for a range, with room for `limit` messages.
    fn owed_query(&self, range: &StoreRange, limit: usize) -> OwedQuery {
        let replay_all = self.options.since.is_some();
        OwedQuery {
            project_id: self.identity.project_id,
            agent_id: self.identity.agent_id.clone(),
            agent_type: self.identity.agent_type.clone(),
            after: range.after,
            upto: range.upto,
            // `since` replays the whole visible history from that seq, acknowledged or not.
            broadcasts_after: if replay_all {
                -1
            } else {
                self.options.cursor.broadcasts_after()
            },
            acked: if replay_all {
                Vec::new()
            } else {
                self.options.cursor.acked_above.clone()
            },
            by_priority: range.by_priority,
            resume: range.resume,
            limit: limit as i64,
            observer: self.identity.observer,
        }
    }

    /// Carries out what the delivery core asked for since the last call. Every event handed
    /// to the core is followed by this.
    fn execute(&mut self, ctx: &mut Context<Self>) {
        while let Some(action) = self.delivery.next_action() {
            match action {
                Action::Write(frames) => self.write(frames, ctx),
                Action::ReadStore { range, limit } => self.read_store(&range, limit, ctx),
                Action::Report(progress) => self.deps.cursors.do_send(ReportProgress {
                    project_id: self.identity.project_id,
                    agent_id: self.identity.agent_id.clone(),
                    progress,
                }),
                Action::RecordAttempts(seqs) => self.deps.cursors.do_send(RecordAttempts {
                    project_id: self.identity.project_id,
                    agent_id: self.identity.agent_id.clone(),
                    seqs,
                }),
                Action::GiveUp(messages) => self.deps.cursors.do_send(GiveUp {
                    project_id: self.identity.project_id,
                    agent_id: self.identity.agent_id.clone(),
                    messages,
                }),
                Action::GuardDrain => {
                    let limit = self.deps.settings.db_timeout() * 3;
                    ctx.run_later(limit, |act, ctx| {
                        act.delivery.drain_expired();
                        act.execute(ctx);
                    });
                }
                Action::GuardClose => {
                    ctx.run_later(CLOSE_GRACE, |_, ctx| ctx.stop());
                }
                Action::Stop => ctx.stop(),
            }
        }
    }

    /// Writes one step of frames; the core hears when it is done. The connection is gone if
    /// a write fails.
    fn write(&mut self, frames: Vec<Frame>, ctx: &mut Context<Self>) {
        let mut ws = self.ws.clone();
        let write = async move {
            for frame in frames {
                match frame {
                    Frame::Text(text) => ws.text(text).await?,
                    Frame::Ping(id) => ws.ping(&id.to_be_bytes()).await?,
                    Frame::Pong(payload) => ws.pong(&payload).await?,
                    Frame::Close(code, reason) => {
                        let reason = CloseReason {
                            code: WsCloseCode::from(code.code()),
                            description: Some(reason.to_owned()),
                        };
                        ws.close(Some(reason)).await?;
                        break;
                    }
                }
            }
            Ok::<_, actix_ws::Closed>(())
        };
        ctx.spawn(write.into_actor(self).map(|result, act, ctx| match result {
            Ok(()) => {
                act.delivery.written();
                act.execute(ctx);
            }
            Err(_) => ctx.stop(),
        }));
    }

    /// Reads a page of owed messages (and, in manual mode, how often each was delivered
    /// already, for the delivery limit) and hands it to the core.
    fn read_store(&mut self, range: &StoreRange, limit: usize, ctx: &mut Context<Self>) {
        let query = self.owed_query(range, limit);
        let manual = self.options.ack == AckMode::Manual;
        let pool = self.deps.pool.clone();
        let read = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let page = cursors::owed_page(&mut conn, &query)
                .await
                .map_err(|e| e.to_string())?;
            let attempts = if manual && !page.is_empty() {
                let seqs: Vec<i64> = page.iter().map(|m| m.seq).collect();
                cursors::delivery_attempts(&mut conn, query.project_id, &query.agent_id, &seqs)
                    .await
                    .map_err(|e| e.to_string())?
            } else {
                Default::default()
            };
            Ok::<_, String>((page, attempts))
        };
        ctx.spawn(read.into_actor(self).map(|page, act, ctx| {
            match page {
                Ok((page, attempts)) => act.delivery.store_page(&page, &attempts),
                Err(e) => {
                    log::warn!(
                        "session {}: reading owed messages failed: {e}",
                        act.identity.session_id
                    );
                    act.delivery.store_failed();
                }
            }
            act.execute(ctx);
        }));
    }

    /// Greets the client, then replays what it is owed up to the channel's head.
    fn welcome(&mut self, range: StoreRange, counts: [i64; 4], ctx: &mut Context<Self>) {
        let welcome = if self.identity.observer {
            ServerFrame::ObserverWelcome {
                observer: true,
                session_id: self.identity.session_id,
                project_id: self.identity.project_id,
                head_seq: range.upto,
                replay: counts.iter().sum(),
            }
            .encode()
        } else {
            self.agent_welcome(&range, counts)
        };
        self.delivery.open(welcome, range.after, range.upto);
        self.execute(ctx);
    }

    fn agent_welcome(&self, range: &StoreRange, counts: [i64; 4]) -> ByteString {
        ServerFrame::Welcome {
            session_id: self.identity.session_id,
            project_id: self.identity.project_id,
            agent_id: &self.identity.agent_id,
            agent_type: &self.identity.agent_type,
            head_seq: range.upto,
            ack: self.options.ack,
            ack_floor: self.options.cursor.ack_floor,
            replay: counts.iter().sum(),
            replay_by_priority: counts,
        }
        .encode()
    }

    /// A frame (or fragmented message) over `max_frame_bytes`: it cannot be skipped, so the
    /// connection closes with 1009 once what was sent before is settled.
    fn frame_too_large(&mut self, oversize: Option<Oversize>, ctx: &mut Context<Self>) {
        if self.delivery.is_closing() {
            return;
        }
        let limit = self.deps.settings.max_frame_bytes;
        let message = match oversize {
            Some(Oversize::Frame { declared }) => {
                format!("a frame declared {declared} bytes; frames are limited to {limit} bytes")
            }
            Some(Oversize::Message { total }) => format!(
                "a fragmented message reached {total} bytes; messages are limited to {limit} bytes"
            ),
            None => format!("frames are limited to {limit} bytes"),
        };
        self.reject(
            &Rejection::new(ErrorCode::FrameTooLarge, message),
            None,
            ctx,
        );
        self.delivery
            .drain(CloseCode::MessageTooBig, "frame too large");
        self.execute(ctx);
    }

    fn on_ack(&mut self, seqs: Vec<i64>, up_to: Option<i64>, ctx: &mut Context<Self>) {
        if self.delivery.ack(&seqs, up_to) {
            self.deps.stats.record_errors(ErrorCode::AckIgnored, 1);
        }
        self.execute(ctx);
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        if self.identity.observer {
            let client_msg_id = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("client_msg_id")?.as_str().map(str::to_owned));
            let rejection = Rejection::new(
                ErrorCode::ObserverReadOnly,
                "this connection is a read-only observer (no agent_id): connect with an agent_id to send, acknowledge or mark read",
            );
            return self.reject(&rejection, client_msg_id.as_deref(), ctx);
        }
        let op = match protocol::parse_client_frame(text) {
            Ok(op) => op,
            Err((rejection, client_msg_id)) => {
                return self.reject(&rejection, client_msg_id.as_deref(), ctx);
            }
        };
        match op {
            ClientOp::Send(fields) => {
                let send = match protocol::validate_send(fields, &self.deps.settings.send_limits())
                {
                    Ok(send) => send,
                    Err((rejection, client_msg_id)) => {
                        return self.reject(&rejection, client_msg_id.as_deref(), ctx)
                    }
                };
                let limited = self
                    .limit
                    .check()
                    .map_err(|wait| ("connection", wait))
                    .and_then(|()| {
                        self.deps
                            .project_limits
                            .check(self.identity.project_id)
                            .map_err(|wait| ("project", wait))
                    });
                if let Err((scope, wait)) = limited {
                    self.deps.stats.metrics().rate_limited();
                    let rejection = Rejection::rate_limited(scope, wait);
                    return self.reject(&rejection, send.client_msg_id.as_deref(), ctx);
                }
                match self.delivery.take_send() {
                    Ok(()) => {}
                    Err(SendRefused::Closing) => {
                        let rejection = Rejection::new(
                            ErrorCode::Unavailable,
                            "this connection is closing; nothing was stored, send again after reconnecting",
                        );
                        return self.reject(&rejection, send.client_msg_id.as_deref(), ctx);
                    }
                    Err(SendRefused::Overloaded { pending }) => {
                        let rejection = Rejection::new(
                            ErrorCode::Overloaded,
                            format!(
                                "{pending} sends are already waiting for their commit; wait for receipts"
                            ),
                        );
                        return self.reject(&rejection, send.client_msg_id.as_deref(), ctx);
                    }
                }
                let identity = &self.identity;
                let message = send.into_message(
                    identity.project_id,
                    identity.agent_id.clone(),
                    identity.agent_type.clone(),
                    Some(identity.session_id),
                );
                self.deps.persistence.do_send(Persist::new(
                    message,
                    Reply::Session(ctx.address().recipient()),
                ));
            }
            ClientOp::Ack { seqs, up_to } => self.on_ack(seqs, up_to, ctx),
            ClientOp::Hello {
                capabilities,
                description,
            } => {
                let pool = self.deps.pool.clone();
                let (project_id, agent_id) =
                    (self.identity.project_id, self.identity.agent_id.clone());
                actix::spawn(async move {
                    let stored = match pool.get().await {
                        Ok(mut conn) => cursors::set_capabilities(
                            &mut conn,
                            project_id,
                            &agent_id,
                            &capabilities,
                            description.as_deref(),
                        )
                        .await
                        .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = stored {
                        log::warn!("capabilities of {agent_id:?} not stored: {e}");
                    }
                });
            }
            ClientOp::Read { ids } => self.deps.cursors.do_send(MarkRead {
                project_id: self.identity.project_id,
                agent_id: self.identity.agent_id.clone(),
                ids,
            }),
            ClientOp::Coordination { op, client_msg_id } => {
                self.on_coordination(op, client_msg_id, ctx)
            }
        }
    }

    /// A claim or task frame: answered with a `claim_result`/`task_result` (or an error).
    fn on_coordination(
        &mut self,
        op: protocol::coordination::CoordinationOp,
        client_msg_id: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        if let Err(wait) = self.limit.check() {
            self.deps.stats.metrics().rate_limited();
            let rejection = Rejection::rate_limited("connection", wait);
            return self.reject(&rejection, client_msg_id.as_deref(), ctx);
        }
        let coordination = self.deps.coordination.clone();
        let (project_id, agent_id) = (self.identity.project_id, self.identity.agent_id.clone());
        let run = async move {
            let caller = super::coordination::Caller {
                project_id,
                agent_id: &agent_id,
            };
            coordination.run(caller, op).await
        };
        ctx.spawn(run.into_actor(self).map(move |answer, act, ctx| {
            let frame = match answer {
                Ok(answer) => {
                    protocol::coordination::result_frame(&answer, client_msg_id.as_deref())
                }
                Err(rejection) => {
                    act.deps.stats.record_errors(rejection.code, 1);
                    protocol::error_frame(&rejection, client_msg_id.as_deref())
                }
            };
            act.push_text(frame, ctx);
        }));
    }

    fn reject(
        &mut self,
        rejection: &Rejection,
        client_msg_id: Option<&str>,
        ctx: &mut Context<Self>,
    ) {
        self.deps.stats.record_errors(rejection.code, 1);
        self.push_text(protocol::error_frame(rejection, client_msg_id), ctx);
    }

    /// Queues a text frame for the client.
    fn push_text(&mut self, frame: ByteString, ctx: &mut Context<Self>) {
        self.delivery.text(frame);
        self.execute(ctx);
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.deps.stats.session_started();
        ctx.run_interval(self.deps.settings.heartbeat_interval(), |act, ctx| {
            act.delivery.heartbeat(Instant::now());
            act.execute(ctx);
        });
        let join = Join {
            session_id: self.identity.session_id,
            token_id: self.identity.token_id,
            agent_id: self.identity.agent_id.clone(),
            agent_type: self.identity.agent_type.clone(),
            observer: self.identity.observer,
            session: ctx.address().recipient(),
        };
        // Wait for the channel, then count what is owed, before handling anything else: the
        // welcome is the first frame, and live messages that arrive meanwhile wait in the
        // mailbox, to be skipped and read from the store after the replay.
        ctx.wait(
            self.deps
                .channel
                .send(join)
                .into_actor(self)
                .then(|joined, act, _ctx| {
                    let range = joined.ok().map(|head_seq| StoreRange {
                        after: act.options.since.unwrap_or(act.options.cursor.ack_floor),
                        upto: head_seq,
                        by_priority: true,
                        resume: (-1, 0),
                    });
                    let query = range.as_ref().map(|range| act.owed_query(range, 0));
                    let max_deliveries = (act.options.ack == AckMode::Manual)
                        .then_some(act.deps.settings.max_deliveries as i32);
                    let pool = act.deps.pool.clone();
                    async move {
                        let mut conn = pool.get().await.ok()?;
                        cursors::owed_counts(&mut conn, &query?, max_deliveries)
                            .await
                            .ok()
                    }
                    .into_actor(act)
                    .map(move |counts, act, ctx| match (range, counts) {
                        (Some(range), Some(counts)) => act.welcome(range, counts, ctx),
                        _ => {
                            act.delivery.close(
                                CloseCode::InternalError,
                                "the broker could not load this agent's queue; reconnect",
                            );
                            act.execute(ctx);
                        }
                    })
                }),
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.deps.stats.session_stopped();
        self.deps.channel.do_send(Leave {
            session_id: self.identity.session_id,
            agent_id: self.identity.agent_id.clone(),
            observer: self.identity.observer,
        });
        log::info!("session {} closed", self.identity.session_id);
        if self.identity.observer {
            // No session row and no member to mark.
            return;
        }
        let pool = self.deps.pool.clone();
        let session_id = self.identity.session_id;
        let (project_id, agent_id) = (self.identity.project_id, self.identity.agent_id.clone());
        actix::spawn(async move {
            let marked = match pool.get().await {
                Ok(mut conn) => {
                    let session = queries::mark_session_disconnected(&mut conn, session_id).await;
                    let member =
                        cursors::mark_disconnected(&mut conn, project_id, &agent_id, session_id)
                            .await;
                    // No longer one of this node's live sessions (see `db::cluster`).
                    let cluster =
                        crate::db::cluster::unregister_session(&mut conn, session_id).await;
                    session.and(member).and(cluster).map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = marked {
                log::warn!("session {session_id}: could not record the disconnect: {e}");
            }
        });
    }
}

impl StreamHandler<Result<AggregatedMessage, ProtocolError>> for SessionActor {
    fn handle(&mut self, item: Result<AggregatedMessage, ProtocolError>, ctx: &mut Self::Context) {
        if self.delivery.is_closing() {
            return;
        }
        self.delivery.heard(Instant::now());
        match item {
            Ok(AggregatedMessage::Text(text)) => self.on_text(&text, ctx),
            Ok(AggregatedMessage::Binary(_)) => {
                let rejection = Rejection::new(
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not part of the protocol; send JSON as text frames",
                );
                self.reject(&rejection, None, ctx);
            }
            Ok(AggregatedMessage::Ping(payload)) => self.delivery.client_ping(&payload),
            Ok(AggregatedMessage::Pong(payload)) => self.delivery.pong(&payload),
            Ok(AggregatedMessage::Close(reason)) => {
                log::debug!(
                    "session {}: client closed ({reason:?})",
                    self.identity.session_id
                );
                // Answer with the receipts of what it already sent, then close.
                self.delivery.drain(CloseCode::Normal, "bye");
            }
            // The decoder's own check, behind the frame guard of the upgrade.
            Err(ProtocolError::Overflow) => self.frame_too_large(None, ctx),
            // The connection cannot be read any further, but what the client sent before
            // still gets its receipts before the close.
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                self.delivery
                    .drain(CloseCode::InvalidPayload, "text frames must be valid UTF-8");
            }
            Err(e) => {
                log::info!("session {}: protocol error: {e}", self.identity.session_id);
                self.delivery
                    .drain(CloseCode::ProtocolError, "protocol error");
            }
        }
        self.execute(ctx);
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // The connection was cut at a frame header over the limit, after every frame before
        // it was handled.
        if let Some(oversize) = self.refusal.get() {
            return self.frame_too_large(Some(oversize), ctx);
        }
        // The client's half of the connection ended. Receipts still owed for its sends are
        // written if the other half still carries them; otherwise the write fails and the
        // session stops.
        self.delivery.input_ended();
        self.execute(ctx);
    }
}

impl Handler<ToSession> for SessionActor {
    type Result = ();

    fn handle(&mut self, event: ToSession, ctx: &mut Self::Context) {
        match event {
            ToSession::Deliver { frame, seq, routed } => {
                self.deps
                    .stats
                    .record_waits(Stage::Handed, [routed.elapsed()]);
                self.delivery.live(frame, seq)
            }
            ToSession::Replaced => self.delivery.close(
                CloseCode::Replaced,
                "replaced by a newer connection of this agent",
            ),
            ToSession::Drain => self
                .delivery
                .drain(CloseCode::GoingAway, "the broker is shutting down"),
            ToSession::TokenRevoked => self.delivery.close(
                CloseCode::TokenRevoked,
                "the token of this connection was revoked",
            ),
        }
        self.execute(ctx);
    }
}

impl Handler<Settled> for SessionActor {
    type Result = ();

    /// The outcome of one of this session's sends: its `sent` receipt (and a `no_recipient`
    /// warning after it when nobody can receive the message), or an error frame.
    fn handle(&mut self, Settled(settlement): Settled, ctx: &mut Self::Context) {
        let (answer, notice) = match settlement {
            Settlement::Stored {
                message,
                no_recipient,
            } => {
                let notice = no_recipient.then(|| {
                    let warning =
                        Rejection::new(ErrorCode::NoRecipient, no_recipient_text(&message));
                    protocol::error_frame(&warning, message.client_msg_id.as_deref())
                });
                (protocol::receipt_frame(&message), notice)
            }
            Settlement::Failed {
                rejection,
                client_msg_id,
            } => (
                protocol::error_frame(&rejection, client_msg_id.as_deref()),
                None,
            ),
        };
        self.delivery.settled(answer, notice);
        self.execute(ctx);
    }
}
