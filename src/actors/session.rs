//! `SessionActor`: one per WebSocket connection. It parses and validates the client's frames,
//! forwards sends to the persistence actor, keeps the connection alive with pings, and writes
//! everything the broker has for the client to the socket, in order, through a bounded outbox.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::web::Bytes;
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use bytestring::ByteString;
use uuid::Uuid;

use super::acks;
use super::channel::{ChannelActor, Join, Leave};
use super::cursor::{CursorActor, GiveUp, MarkRead, RecordAttempts, ReportProgress};
use super::feed::{Feed, Live, StoreRange};
use super::persistence::{Persist, PersistenceActor, Reply};
use crate::config::Settings;
use crate::db::cursors::{self, MemberCursor, OwedQuery, Progress};
use crate::db::{queries, DbPool};
use crate::frames::{Oversize, Refusal};
use crate::limits::{ConnectionPermit, ProjectLimits, SessionLimit};
use crate::models::{NewMessage, StoredMessage};
use crate::protocol::{self, close_code, AckMode, ClientOp, ErrorCode, Rejection, ServerFrame};

/// Most frames handed to the socket in one write step.
const WRITE_BATCH: usize = 64;
/// Most messages read from the store in one page (replay and catch-up).
const STORE_PAGE: usize = 256;
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
    pub persistence: Addr<PersistenceActor>,
    pub cursors: Addr<CursorActor>,
    pub pool: DbPool,
    pub settings: Arc<Settings>,
    pub stats: crate::stats::Stats,
    pub project_limits: ProjectLimits,
    /// File claims and tasks (`claim`, `claim_task` … frames).
    pub coordination: super::coordination::Coordination,
}

/// A frame waiting to be written to the socket.
enum Outgoing {
    /// A delivered message: once written it counts as done in auto mode.
    Message {
        frame: ByteString,
        seq: i64,
    },
    Text(ByteString),
    /// A ping carrying its sequence number: the pong that answers it proves the client's
    /// WebSocket received every frame written before it.
    Ping(u64),
    /// Only ever the first frame of a write step, taken from `SessionActor::pong`; never
    /// queued in the outbox.
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
    /// The answer to the client's most recent ping, not written yet. One at most, outside
    /// the outbox: a newer ping replaces it (RFC 6455 §5.5.3 lets an endpoint answer only the
    /// most recent ping), so a client that pings without reading costs one pong, not one per
    /// ping.
    pong: Option<Bytes>,
    /// Why the reading side stopped early, if it did (a frame header over the limit).
    refusal: Refusal,
    /// Whether a write step is in flight. There is never more than one, which is what keeps
    /// frames in order.
    writing: bool,
    /// Sends forwarded for storage whose receipt (or error) has not come back yet.
    pending_sends: usize,
    /// This connection's rate limit.
    limit: SessionLimit,
    /// Its place among the connections of its project and address, freed when it stops.
    _permit: ConnectionPermit,
    /// Set once a close frame is queued: nothing more is accepted or sent.
    closing: bool,
    /// Closing once the pending sends settle (the broker shuts down, or the client closed):
    /// no new sends are taken; the code and reason of the close to send then.
    draining: Option<(u16, &'static str)>,
    /// Auto mode: messages written to the socket whose receipt the client has not confirmed
    /// yet, in write order. They become done when a pong answers a ping written after them;
    /// if the connection dies first, they are delivered again on the next connection.
    unconfirmed: VecDeque<i64>,
    /// Pings written and not answered yet: (ping number, how many of `unconfirmed` were
    /// written before it).
    pings: VecDeque<(u64, usize)>,
    /// Number of the next ping, and whether one is queued but not written yet.
    next_ping: u64,
    ping_queued: bool,
    delivery: DeliveryOptions,
    /// Where messages come from right now: the store (the replay at connect, or a catch-up
    /// after live traffic had to be skipped) or the channel, live.
    feed: Feed,
    /// A store page is being read.
    loading: bool,
    /// Manual mode: messages queued or written but not acknowledged yet.
    in_flight: BTreeSet<i64>,
    /// Auto mode, once live: every owed message up to this seq was queued before live
    /// delivery began (see `on_pong`).
    live_from: Option<i64>,
    /// Manual mode: messages queued since the delivery counts were last reported.
    attempted: Vec<i64>,
}

/// What a write step put on the socket, for bookkeeping once it completes.
enum Written {
    Message(i64),
    Ping(u64),
}

impl SessionActor {
    pub fn new(
        identity: Identity,
        deps: SessionDeps,
        delivery: DeliveryOptions,
        ws: actix_ws::Session,
        permit: ConnectionPermit,
        refusal: Refusal,
    ) -> Self {
        let limit = SessionLimit::new(
            deps.settings.rate_per_session,
            deps.settings.burst_per_session,
        );
        SessionActor {
            identity,
            deps,
            ws,
            last_heard: Instant::now(),
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            pong: None,
            refusal,
            writing: false,
            pending_sends: 0,
            limit,
            _permit: permit,
            closing: false,
            draining: None,
            unconfirmed: VecDeque::new(),
            pings: VecDeque::new(),
            next_ping: 0,
            ping_queued: false,
            delivery,
            feed: Feed::default(),
            loading: false,
            in_flight: BTreeSet::new(),
            attempted: Vec::new(),
            live_from: None,
        }
    }

    /// The store query for a range, with room for `limit` messages.
    fn owed_query(&self, range: &StoreRange, limit: usize) -> OwedQuery {
        let replay_all = self.delivery.since.is_some();
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
                self.delivery.cursor.broadcasts_after()
            },
            acked: if replay_all {
                Vec::new()
            } else {
                self.delivery.cursor.acked_above.clone()
            },
            by_priority: range.by_priority,
            resume: range.resume,
            limit: limit as i64,
        }
    }

    /// How many more messages may be queued for the client now.
    fn room(&self) -> usize {
        let settings = &self.deps.settings;
        if self.outbox_bytes >= settings.outbox_max_bytes / 2 {
            return 0;
        }
        let outbox_room = (settings.outbox_max_frames / 2).saturating_sub(self.outbox.len());
        match self.delivery.ack {
            AckMode::Auto => outbox_room.min(
                self.unconfirmed_cap()
                    .saturating_sub(self.unconfirmed.len()),
            ),
            AckMode::Manual => {
                outbox_room.min(settings.max_in_flight.saturating_sub(self.in_flight.len()))
            }
        }
    }

    /// Auto mode: most messages written and not yet confirmed by a pong. Each costs only its
    /// seq, so the bound is generous: it only stops a client that never answers pings.
    fn unconfirmed_cap(&self) -> usize {
        self.deps.settings.outbox_max_frames.saturating_mul(16)
    }

    /// Reads the next page of the store range if there is room for it.
    fn fetch_more(&mut self, ctx: &mut Context<Self>) {
        if self.loading || self.closing {
            return;
        }
        let Some(range) = self.feed.reading() else {
            return;
        };
        let limit = self.room().min(STORE_PAGE);
        // Wait for room for a worthwhile page (a quarter of the window) rather than reading
        // the store once per acknowledgement, unless the client has nothing left to read.
        let worthwhile = match self.delivery.ack {
            AckMode::Manual => (self.deps.settings.max_in_flight / 4).clamp(1, STORE_PAGE),
            AckMode::Auto => 1,
        };
        if limit == 0
            || (limit < worthwhile && !(self.in_flight.is_empty() && self.outbox.is_empty()))
        {
            return;
        }
        self.loading = true;
        let query = self.owed_query(range, limit);
        let manual = self.delivery.ack == AckMode::Manual;
        let pool = self.deps.pool.clone();
        let read = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let page = cursors::owed_page(&mut conn, &query)
                .await
                .map_err(|e| e.to_string())?;
            // Manual mode: how often each was delivered already, for the delivery limit.
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
        ctx.spawn(read.into_actor(self).map(move |page, act, ctx| {
            act.loading = false;
            match page {
                Ok((page, attempts)) => act.on_store_page(page, attempts, limit, ctx),
                Err(e) => {
                    log::warn!(
                        "session {}: reading owed messages failed: {e}",
                        act.identity.session_id
                    );
                    act.close(ctx, 1011, "the store is unavailable; reconnect to resume");
                }
            }
        }));
    }

    fn on_store_page(
        &mut self,
        page: Vec<StoredMessage>,
        attempts: HashMap<i64, i32>,
        limit: usize,
        ctx: &mut Context<Self>,
    ) {
        let mut exhausted = page.len() < limit;
        if self.feed.reading().is_none() {
            return;
        }
        let max_deliveries = self.deps.settings.max_deliveries as i32;
        // Half the outbox's byte bound for the store, so large messages are paced rather
        // than overflowing it; at least one message always goes.
        let byte_budget = self.deps.settings.outbox_max_bytes / 2;
        let mut resume = None;
        let mut given_up = Vec::new();
        for message in &page {
            if attempts
                .get(&message.seq)
                .is_some_and(|&n| n >= max_deliveries)
            {
                given_up.push((message.id, message.seq));
            } else {
                let frame = protocol::message_frame(message);
                if !self.outbox.is_empty() && self.outbox_bytes + frame.len() > byte_budget {
                    // The rest of the page is read again once the client has drained.
                    exhausted = false;
                    break;
                }
                self.queue_message(frame, message.seq, ctx);
            }
            resume = Some((message.priority, message.seq));
        }
        if let Some(resume) = resume {
            self.feed.advance(resume);
        }
        if !given_up.is_empty() {
            log::info!(
                "session {}: {} message(s) reached the delivery limit; dead-lettered",
                self.identity.session_id,
                given_up.len()
            );
            self.deps.cursors.do_send(GiveUp {
                project_id: self.identity.project_id,
                agent_id: self.identity.agent_id.clone(),
                messages: given_up,
            });
        }
        self.flush_attempts();
        if exhausted {
            // Live messages skipped meanwhile are read next, in seq order; then live.
            if let Some(upto) = self.feed.range_done() {
                self.went_live(upto);
            }
        }
        self.fetch_more(ctx);
    }

    /// Queues a message for the client and tracks it until it is done.
    fn queue_message(&mut self, frame: ByteString, seq: i64, ctx: &mut Context<Self>) {
        if self.delivery.ack == AckMode::Manual {
            self.in_flight.insert(seq);
            self.attempted.push(seq);
        }
        self.feed.queued(seq);
        self.push(Outgoing::Message { frame, seq }, ctx);
    }

    /// A live message from the channel.
    fn on_live(&mut self, frame: ByteString, seq: i64, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        match self.feed.live(seq) {
            Live::Deliver => {}
            // Delivering from the store: this one is read from there in its turn.
            Live::FromStore => return,
            // Already read from the store.
            Live::Queued => return,
        }
        let full = match self.delivery.ack {
            AckMode::Manual => self.in_flight.len() >= self.deps.settings.max_in_flight,
            // A client that never confirms receipt must not make the broker remember ever
            // more messages for it; a full outbox is caught when the frame is queued.
            AckMode::Auto => self.unconfirmed.len() >= self.unconfirmed_cap(),
        };
        if full {
            if self.delivery.ack == AckMode::Manual {
                // The window is full: stop taking live traffic and catch up from the store as
                // acknowledgements come back.
                self.feed.fall_behind(seq);
                return;
            }
            // Auto mode: only what was written counts as done, so the client recovers the rest
            // when it reconnects.
            return self.slow_consumer(ctx);
        }
        self.queue_message(frame, seq, ctx);
        self.flush_attempts();
    }

    /// Greets the client, then replays what it is owed up to the channel's head.
    fn welcome(&mut self, range: StoreRange, counts: [i64; 4], ctx: &mut Context<Self>) {
        let welcome = ServerFrame::Welcome {
            session_id: self.identity.session_id,
            project_id: self.identity.project_id,
            agent_id: &self.identity.agent_id,
            agent_type: &self.identity.agent_type,
            head_seq: range.upto,
            ack: self.delivery.ack,
            ack_floor: self.delivery.cursor.ack_floor,
            replay: counts.iter().sum(),
            replay_by_priority: counts,
        }
        .encode();
        self.push_text(welcome, ctx);
        self.feed = Feed::replay(range.after, range.upto);
        self.fetch_more(ctx);
    }

    /// Manual mode: reports the deliveries made since the last report, to be counted.
    fn flush_attempts(&mut self) {
        if !self.attempted.is_empty() {
            self.deps.cursors.do_send(RecordAttempts {
                project_id: self.identity.project_id,
                agent_id: self.identity.agent_id.clone(),
                seqs: std::mem::take(&mut self.attempted),
            });
        }
    }

    /// Takes no more sends; closes with `code` once every pending send has its receipt (or
    /// error), so the client learns the fate of everything it sent.
    fn drain(&mut self, ctx: &mut Context<Self>, code: u16, reason: &'static str) {
        if self.draining.is_none() {
            self.draining = Some((code, reason));
            // Every send is settled within the database timeouts; this only guards the close.
            let limit = self.deps.settings.db_timeout() * 3;
            ctx.run_later(limit, move |act, ctx| act.close(ctx, code, reason));
        }
        if self.pending_sends == 0 {
            self.close(ctx, code, reason);
        }
    }

    /// A frame (or fragmented message) over `max_frame_bytes`: it cannot be skipped, so the
    /// connection closes with 1009 once what was sent before is settled.
    fn frame_too_large(&mut self, oversize: Option<Oversize>, ctx: &mut Context<Self>) {
        if self.closing {
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
        self.drain(ctx, 1009, "frame too large");
    }

    fn slow_consumer(&mut self, ctx: &mut Context<Self>) {
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
    }

    fn report(&self, progress: Progress) {
        if !progress.is_empty() {
            self.deps.cursors.do_send(ReportProgress {
                project_id: self.identity.project_id,
                agent_id: self.identity.agent_id.clone(),
                progress,
            });
        }
    }

    fn on_ack(&mut self, seqs: Vec<i64>, up_to: Option<i64>, ctx: &mut Context<Self>) {
        // An ack covers what this session delivered and is waiting to hear about, nothing
        // else: a replay goes by priority, so lower seqs may still be on their way, and a seq
        // acknowledged before it was delivered (or before it existed) must still be delivered.
        let outcome = match self.delivery.ack {
            AckMode::Manual => acks::take_in_flight(&mut self.in_flight, &seqs, up_to),
            AckMode::Auto => acks::confirm_early(&self.unconfirmed, &seqs, up_to),
        };
        if !outcome.ignored.is_empty() {
            self.deps.stats.record_errors(ErrorCode::AckIgnored, 1);
            self.push_text(protocol::ack_ignored_frame(&outcome.ignored), ctx);
        }
        self.report(Progress {
            done: outcome.done,
            up_to: None,
        });
        self.fetch_more(ctx);
    }

    /// Queues a text frame for the client.
    fn push_text(&mut self, frame: ByteString, ctx: &mut Context<Self>) {
        self.push(Outgoing::Text(frame), ctx);
    }

    fn push(&mut self, item: Outgoing, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        let len = match &item {
            Outgoing::Message { frame, .. } | Outgoing::Text(frame) => frame.len(),
            _ => 0,
        };
        let settings = &self.deps.settings;
        if self.outbox.len() >= settings.outbox_max_frames
            || self.outbox_bytes + len > settings.outbox_max_bytes
        {
            return self.slow_consumer(ctx);
        }
        self.outbox_bytes += len;
        self.outbox.push_back(item);
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
        if self.writing || (self.outbox.is_empty() && self.pong.is_none()) {
            return;
        }
        self.writing = true;
        let mut step = Vec::with_capacity(self.outbox.len().min(WRITE_BATCH) + 1);
        // A pong goes first: it answers a ping the client sent, whatever is queued.
        step.extend(self.pong.take().map(Outgoing::Pong));
        while step.len() < WRITE_BATCH {
            let Some(item) = self.outbox.pop_front() else {
                break;
            };
            if let Outgoing::Text(text) | Outgoing::Message { frame: text, .. } = &item {
                self.outbox_bytes -= text.len();
            }
            let last = matches!(item, Outgoing::Close(_));
            step.push(item);
            if last {
                break;
            }
        }
        let mut ws = self.ws.clone();
        let auto = self.delivery.ack == AckMode::Auto;
        let write = async move {
            let mut written = Vec::new();
            for item in step {
                match item {
                    Outgoing::Message { frame, seq } => {
                        ws.text(frame).await?;
                        if auto {
                            written.push(Written::Message(seq));
                        }
                    }
                    Outgoing::Text(text) => ws.text(text).await?,
                    Outgoing::Ping(id) => {
                        ws.ping(&id.to_be_bytes()).await?;
                        written.push(Written::Ping(id));
                    }
                    Outgoing::Pong(payload) => ws.pong(&payload).await?,
                    Outgoing::Close(reason) => {
                        ws.close(Some(reason)).await?;
                        return Ok((written, true));
                    }
                }
            }
            Ok::<_, actix_ws::Closed>((written, false))
        };
        ctx.spawn(write.into_actor(self).map(|result, act, ctx| {
            act.writing = false;
            match result {
                Ok((written, closed)) => {
                    act.on_written(written, ctx);
                    if closed {
                        ctx.stop();
                    } else {
                        act.pump(ctx);
                        act.fetch_more(ctx);
                    }
                }
                // The connection is gone.
                Err(_) => ctx.stop(),
            }
        }));
    }

    /// Queues a numbered ping (unless one is already waiting to be written).
    fn ping(&mut self, ctx: &mut Context<Self>) {
        if !self.ping_queued {
            self.ping_queued = true;
            self.next_ping += 1;
            self.push_control(Outgoing::Ping(self.next_ping), ctx);
        }
    }

    /// Bookkeeping after a write step: auto-mode messages wait for the client to confirm
    /// receipt, which the next ping asks for.
    fn on_written(&mut self, written: Vec<Written>, ctx: &mut Context<Self>) {
        let mut wrote_messages = false;
        for item in written {
            match item {
                Written::Message(seq) => {
                    self.unconfirmed.push_back(seq);
                    wrote_messages = true;
                }
                Written::Ping(id) => {
                    self.ping_queued = false;
                    self.pings.push_back((id, self.unconfirmed.len()));
                }
            }
        }
        if wrote_messages {
            self.ping(ctx);
        }
    }

    /// A pong: every message written before the ping it answers has reached the client.
    fn on_pong(&mut self, payload: &[u8]) {
        let Ok(bytes) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        let answered = u64::from_be_bytes(bytes);
        let mut confirmed = 0;
        while let Some(&(id, count)) = self.pings.front() {
            if id > answered {
                break;
            }
            confirmed = confirmed.max(count);
            self.pings.pop_front();
        }
        if confirmed == 0 {
            return;
        }
        let mut done: Vec<i64> = self.unconfirmed.drain(..confirmed).collect();
        for ping in &mut self.pings {
            ping.1 -= confirmed;
        }
        // Delivered live, in seq order, after everything owed before it: the newest such
        // message confirmed means every owed message up to it is done, which lets the floor
        // move without listing each seq (and without the store scanning them again).
        let mut up_to = None;
        if let Some(live_from) = self.live_from {
            if let Some(&newest) = done.iter().filter(|&&seq| seq > live_from).max() {
                up_to = Some(newest);
                done.retain(|&seq| seq <= live_from);
            }
        }
        self.report(Progress { done, up_to });
    }

    /// Live delivery starts: every message owed up to `upto` has been queued already.
    fn went_live(&mut self, upto: i64) {
        let skipped_some = self
            .delivery
            .since
            .is_some_and(|since| since > self.delivery.cursor.ack_floor);
        // Auto mode only (manual acks come in any order), and not after a `since` that
        // skipped owed messages: those are still owed.
        if self.delivery.ack == AckMode::Auto && !skipped_some {
            self.live_from = Some(upto);
        }
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
            self.ping(ctx);
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
                if self.draining.is_some() {
                    let rejection = Rejection::new(
                        ErrorCode::Unavailable,
                        "this connection is closing; nothing was stored, send again after reconnecting",
                    );
                    return self.reject(&rejection, send.client_msg_id.as_deref(), ctx);
                }
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
                let message = NewMessage::from_send(
                    send,
                    identity.project_id,
                    identity.agent_id.clone(),
                    identity.agent_type.clone(),
                    Some(identity.session_id),
                );
                self.pending_sends += 1;
                self.deps
                    .persistence
                    .do_send(Persist::new(message, Reply::Session(ctx.address())));
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
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.deps.stats.session_started();
        ctx.run_interval(self.deps.settings.heartbeat_interval(), |act, ctx| {
            act.heartbeat(ctx)
        });
        let join = Join {
            session_id: self.identity.session_id,
            token_id: self.identity.token_id,
            agent_id: self.identity.agent_id.clone(),
            agent_type: self.identity.agent_type.clone(),
            addr: ctx.address(),
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
                        after: act.delivery.since.unwrap_or(act.delivery.cursor.ack_floor),
                        upto: head_seq,
                        by_priority: true,
                        resume: (-1, 0),
                    });
                    let query = range.as_ref().map(|range| act.owed_query(range, 0));
                    let max_deliveries = (act.delivery.ack == AckMode::Manual)
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
                        _ => act.close(
                            ctx,
                            1011,
                            "the broker could not load this agent's queue; reconnect",
                        ),
                    })
                }),
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.deps.stats.session_stopped();
        self.deps.channel.do_send(Leave {
            session_id: self.identity.session_id,
            agent_id: self.identity.agent_id.clone(),
        });
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
                    session.and(member).map_err(|e| e.to_string())
                }
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
            Ok(AggregatedMessage::Ping(payload)) => {
                // Copied: the payload is a slice of the connection's read buffer, which it
                // would otherwise keep alive.
                self.pong = Some(Bytes::copy_from_slice(&payload));
                self.pump(ctx);
            }
            Ok(AggregatedMessage::Pong(payload)) => self.on_pong(&payload),
            Ok(AggregatedMessage::Close(reason)) => {
                log::debug!(
                    "session {}: client closed ({reason:?})",
                    self.identity.session_id
                );
                // Answer with the receipts of what it already sent, then close.
                self.drain(ctx, 1000, "bye");
            }
            // The decoder's own check, behind the frame guard of the upgrade.
            Err(ProtocolError::Overflow) => self.frame_too_large(None, ctx),
            // The connection cannot be read any further, but what the client sent before
            // still gets its receipts before the close.
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                self.drain(ctx, 1007, "text frames must be valid UTF-8");
            }
            Err(e) => {
                log::info!("session {}: protocol error: {e}", self.identity.session_id);
                self.drain(ctx, 1002, "protocol error");
            }
        }
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
        if self.pending_sends > 0 && self.draining.is_none() {
            self.drain(ctx, 1000, "bye");
        } else if self.draining.is_none() {
            ctx.stop();
        }
    }
}

/// A committed message for this client, live from its channel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    /// The message frame, serialised once for all its recipients.
    pub frame: ByteString,
    pub seq: i64,
}

impl Handler<Deliver> for SessionActor {
    type Result = ();

    fn handle(&mut self, deliver: Deliver, ctx: &mut Self::Context) {
        self.on_live(deliver.frame, deliver.seq, ctx);
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
        if let (Some((code, reason)), 0) = (self.draining, self.pending_sends) {
            self.close(ctx, code, reason);
        }
    }
}

/// A notice for the client that settles nothing (a `no_recipient` warning after a receipt).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Notify(pub ByteString);

impl Handler<Notify> for SessionActor {
    type Result = ();

    fn handle(&mut self, notify: Notify, ctx: &mut Self::Context) {
        self.push_text(notify.0, ctx);
    }
}

/// The broker is shutting down: settle what was sent, then close with 1001.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

impl Handler<Drain> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut Self::Context) {
        self.drain(ctx, 1001, "the broker is shutting down");
    }
}

/// The token this session connected with was revoked.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TokenRevoked;

impl Handler<TokenRevoked> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: TokenRevoked, ctx: &mut Self::Context) {
        self.close(
            ctx,
            close_code::TOKEN_REVOKED,
            "the token of this connection was revoked",
        );
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
