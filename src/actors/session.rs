//! `SessionActor`: one per WebSocket connection. It parses and validates the client's frames,
//! forwards sends to the persistence actor, keeps the connection alive with pings, and writes
//! everything the broker has for the client to the socket, in order, through a bounded outbox.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::web::Bytes;
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use bytestring::ByteString;
use uuid::Uuid;

use super::channel::{ChannelActor, Join, Leave};
use super::persistence::{Persist, PersistenceActor, Reply};
use crate::config::Settings;
use crate::db::{queries, DbPool};
use crate::models::NewMessage;
use crate::protocol::{self, close_code, ClientOp, ErrorCode, Rejection, ServerFrame};

/// Most frames handed to the socket in one write step.
const WRITE_BATCH: usize = 64;
/// How long a closing session waits for its close frame to be written before it stops anyway
/// (a dead peer never drains its socket).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Who a session is: fixed at connect time, from the authenticated upgrade request.
#[derive(Debug, Clone)]
pub struct Identity {
    pub session_id: Uuid,
    pub project_id: Uuid,
    pub agent_id: String,
    pub agent_type: String,
}

/// What the session needs from the rest of the broker.
#[derive(Clone)]
pub struct SessionDeps {
    pub channel: Addr<ChannelActor>,
    pub persistence: Addr<PersistenceActor>,
    pub pool: DbPool,
    pub settings: Arc<Settings>,
}

/// A frame waiting to be written to the socket.
enum Outgoing {
    Text(ByteString),
    Ping,
    Pong(Bytes),
    Close(CloseReason),
}

pub struct SessionActor {
    identity: Identity,
    deps: SessionDeps,
    /// The write half of the WebSocket. Only the write pump uses it, one step at a time.
    ws: actix_ws::Session,
    /// When the client was last heard from (any frame, pongs included).
    last_heard: Instant,
    /// Frames for the client, in the order they must arrive. Bounded by
    /// `outbox_max_frames`/`outbox_max_bytes`: a client that reads too slowly is disconnected
    /// rather than allowed to grow the broker's memory.
    outbox: VecDeque<Outgoing>,
    outbox_bytes: usize,
    /// Whether a write step is in flight. There is never more than one, which is what keeps
    /// frames in order.
    writing: bool,
    /// Sends forwarded for storage whose receipt (or error) has not come back yet.
    pending_sends: usize,
    /// Set once a close frame is queued: nothing more is accepted or sent.
    closing: bool,
}

impl SessionActor {
    pub fn new(identity: Identity, deps: SessionDeps, ws: actix_ws::Session) -> Self {
        SessionActor {
            identity,
            deps,
            ws,
            last_heard: Instant::now(),
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            writing: false,
            pending_sends: 0,
            closing: false,
        }
    }

    /// Queues a text frame for the client.
    fn push_text(&mut self, frame: ByteString, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        let settings = &self.deps.settings;
        if self.outbox.len() >= settings.outbox_max_frames
            || self.outbox_bytes + frame.len() > settings.outbox_max_bytes
        {
            log::warn!(
                "session {}: slow consumer ({} frames, {} bytes queued); disconnecting",
                self.identity.session_id,
                self.outbox.len(),
                self.outbox_bytes
            );
            self.outbox.clear();
            self.outbox_bytes = 0;
            self.close(
                ctx,
                close_code::SLOW_CONSUMER,
                "slow consumer: outgoing queue full",
            );
            return;
        }
        self.outbox_bytes += frame.len();
        self.outbox.push_back(Outgoing::Text(frame));
        self.pump(ctx);
    }

    fn push_control(&mut self, item: Outgoing, ctx: &mut Context<Self>) {
        if !self.closing {
            self.outbox.push_back(item);
            self.pump(ctx);
        }
    }

    /// Queues a close frame, then stops once it is written (or after a grace period).
    fn close(&mut self, ctx: &mut Context<Self>, code: u16, description: &str) {
        if self.closing {
            return;
        }
        self.outbox.push_back(Outgoing::Close(CloseReason {
            code: CloseCode::from(code),
            description: Some(description.to_owned()),
        }));
        self.closing = true;
        self.pump(ctx);
        ctx.run_later(CLOSE_GRACE, |_, ctx| ctx.stop());
    }

    /// Writes the head of the outbox to the socket. A single write step is in flight at a
    /// time and takes frames from the front of the queue, so the client receives frames in
    /// exactly the order they were queued; when the step finishes, the next one starts.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.outbox.is_empty() {
            return;
        }
        self.writing = true;
        let mut step = Vec::with_capacity(self.outbox.len().min(WRITE_BATCH));
        while step.len() < WRITE_BATCH {
            let Some(item) = self.outbox.pop_front() else {
                break;
            };
            if let Outgoing::Text(text) = &item {
                self.outbox_bytes -= text.len();
            }
            let last = matches!(item, Outgoing::Close(_));
            step.push(item);
            if last {
                break;
            }
        }
        let mut ws = self.ws.clone();
        let write = async move {
            for item in step {
                match item {
                    Outgoing::Text(text) => ws.text(text).await?,
                    Outgoing::Ping => ws.ping(b"").await?,
                    Outgoing::Pong(payload) => ws.pong(&payload).await?,
                    Outgoing::Close(reason) => {
                        ws.close(Some(reason)).await?;
                        return Ok(true);
                    }
                }
            }
            Ok::<bool, actix_ws::Closed>(false)
        };
        ctx.spawn(write.into_actor(self).map(|result, act, ctx| {
            act.writing = false;
            match result {
                Ok(false) => act.pump(ctx),
                // Closed by us, or the connection is gone.
                Ok(true) | Err(_) => ctx.stop(),
            }
        }));
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if self.last_heard.elapsed() > self.deps.settings.client_timeout() {
            log::info!(
                "session {}: nothing heard for {:?}; closing",
                self.identity.session_id,
                self.last_heard.elapsed()
            );
            self.close(ctx, close_code::HEARTBEAT_TIMEOUT, "heartbeat timeout");
        } else {
            self.push_control(Outgoing::Ping, ctx);
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let op = match protocol::parse_client_frame(text) {
            Ok(op) => op,
            Err((rejection, client_msg_id)) => {
                return self.reject(&rejection, client_msg_id.as_deref(), ctx);
            }
        };
        match op {
            ClientOp::Send(fields) => {
                let send =
                    match protocol::validate_send(fields, self.deps.settings.max_content_bytes) {
                        Ok(send) => send,
                        Err((rejection, client_msg_id)) => {
                            return self.reject(&rejection, client_msg_id.as_deref(), ctx)
                        }
                    };
                if self.pending_sends >= self.deps.settings.max_pending_sends {
                    let rejection = Rejection::new(
                        ErrorCode::Overloaded,
                        format!(
                            "{} sends are already waiting for their commit; wait for receipts",
                            self.pending_sends
                        ),
                    );
                    return self.reject(&rejection, send.client_msg_id.as_deref(), ctx);
                }
                let identity = &self.identity;
                let message = NewMessage {
                    id: Uuid::new_v4(),
                    project_id: identity.project_id,
                    sender_agent_id: identity.agent_id.clone(),
                    sender_agent_type: send
                        .agent_type
                        .unwrap_or_else(|| identity.agent_type.clone()),
                    sender_session_id: Some(identity.session_id),
                    recipient_agent_id: send.to,
                    message_type: send.message_type,
                    content: send.content,
                    metadata: send.metadata,
                    priority: send.priority,
                    correlation_id: send.correlation_id,
                    reply_to: send.reply_to,
                    client_msg_id: send.client_msg_id,
                    ttl_ms: send.ttl_ms,
                };
                self.pending_sends += 1;
                self.deps.persistence.do_send(Persist {
                    message,
                    reply: Reply::Session(ctx.address()),
                });
            }
        }
    }

    fn reject(
        &mut self,
        rejection: &Rejection,
        client_msg_id: Option<&str>,
        ctx: &mut Context<Self>,
    ) {
        self.push_text(protocol::error_frame(rejection, client_msg_id), ctx);
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.deps.settings.heartbeat_interval(), |act, ctx| {
            act.heartbeat(ctx)
        });
        let join = Join {
            session_id: self.identity.session_id,
            agent_id: self.identity.agent_id.clone(),
            agent_type: self.identity.agent_type.clone(),
            addr: ctx.address(),
        };
        // Wait for the channel before handling anything else, so the welcome is the first
        // frame and no delivery can precede it.
        ctx.wait(self.deps.channel.send(join).into_actor(self).map(
            |joined, act, ctx| match joined {
                Ok(head_seq) => {
                    let welcome = ServerFrame::Welcome {
                        session_id: act.identity.session_id,
                        project_id: act.identity.project_id,
                        agent_id: &act.identity.agent_id,
                        agent_type: &act.identity.agent_type,
                        head_seq,
                    }
                    .encode();
                    act.push_text(welcome, ctx);
                }
                Err(_) => act.close(ctx, 1011, "the project channel is not running"),
            },
        ));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.deps.channel.do_send(Leave {
            session_id: self.identity.session_id,
            agent_id: self.identity.agent_id.clone(),
        });
        let pool = self.deps.pool.clone();
        let session_id = self.identity.session_id;
        actix::spawn(async move {
            let marked = match pool.get().await {
                Ok(mut conn) => queries::mark_session_disconnected(&mut conn, session_id)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = marked {
                log::warn!("session {session_id}: could not record the disconnect: {e}");
            }
        });
        log::info!("session {} closed", self.identity.session_id);
    }
}

impl StreamHandler<Result<AggregatedMessage, ProtocolError>> for SessionActor {
    fn handle(&mut self, item: Result<AggregatedMessage, ProtocolError>, ctx: &mut Self::Context) {
        if self.closing {
            return;
        }
        self.last_heard = Instant::now();
        match item {
            Ok(AggregatedMessage::Text(text)) => self.on_text(&text, ctx),
            Ok(AggregatedMessage::Binary(_)) => {
                let rejection = Rejection::new(
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not part of the protocol; send JSON as text frames",
                );
                self.reject(&rejection, None, ctx);
            }
            Ok(AggregatedMessage::Ping(payload)) => self.push_control(Outgoing::Pong(payload), ctx),
            Ok(AggregatedMessage::Pong(_)) => {}
            Ok(AggregatedMessage::Close(reason)) => {
                log::debug!(
                    "session {}: client closed ({reason:?})",
                    self.identity.session_id
                );
                self.close(ctx, 1000, "bye");
            }
            Err(ProtocolError::Overflow) => {
                let rejection = Rejection::new(
                    ErrorCode::FrameTooLarge,
                    format!(
                        "frames are limited to {} bytes",
                        self.deps.settings.max_frame_bytes
                    ),
                );
                self.reject(&rejection, None, ctx);
                self.close(ctx, 1009, "frame too large");
            }
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                self.close(ctx, 1007, "text frames must be valid UTF-8");
            }
            Err(e) => {
                log::info!("session {}: protocol error: {e}", self.identity.session_id);
                self.close(ctx, 1002, "protocol error");
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // The client's half of the connection ended.
        ctx.stop();
    }
}

/// A committed message for this client.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver(pub ByteString);

impl Handler<Deliver> for SessionActor {
    type Result = ();

    fn handle(&mut self, deliver: Deliver, ctx: &mut Self::Context) {
        self.push_text(deliver.0, ctx);
    }
}

/// The outcome of one of this session's sends: a `sent` receipt or an error frame.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Settled(pub ByteString);

impl Handler<Settled> for SessionActor {
    type Result = ();

    fn handle(&mut self, settled: Settled, ctx: &mut Self::Context) {
        self.pending_sends = self.pending_sends.saturating_sub(1);
        self.push_text(settled.0, ctx);
    }
}

/// Another connection of the same agent took over.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replaced;

impl Handler<Replaced> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Replaced, ctx: &mut Self::Context) {
        self.close(
            ctx,
            close_code::REPLACED,
            "replaced by a newer connection of this agent",
        );
    }
}
