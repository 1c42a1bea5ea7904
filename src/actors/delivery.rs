//! The delivery core of one WebSocket session: everything the session decides about what to
//! write, when, and what it means once written, as a plain state machine without I/O.
//!
//! `SessionActor` owns the socket, the database and the timers; this struct owns the
//! decisions. The actor feeds it *events* and carries out the *actions* it asks for, and
//! nothing else. That split exists because the decisions are where the protocol's promises
//! live (frames in order, a message done only once the client has it, a bounded outbox, the
//! seam between store and live, receipts before the close) and because their edge cases
//! are interleavings (a page that comes back after the close, an ack while the window is
//! full, a takeover while sends are settling) that an end-to-end test can only hit by luck.
//! Here each of them is a few method calls in a unit test.
//!
//! ## Phases
//!
//! The connection is in one [`Phase`]:
//!
//! - **joining**: the session is joining its channel and counting what is owed. Nothing is
//!   written yet, since the welcome must be the first frame; a live message that arrives
//!   meanwhile is remembered and read from the store after the replay.
//! - **open**: messages are delivered and sends are taken.
//! - **draining** `{code, reason}`: the client closed, sent a frame that ends the connection,
//!   or the broker is shutting down. No new send is taken; messages are still delivered; the
//!   close with `code` is queued once the last pending send is settled (its receipt or
//!   error is written first), or when the drain guard expires.
//! - **closing**: a close frame is queued. Nothing more is queued or accepted; the frames
//!   ahead of the close are written, then the session stops (or after a grace period, if
//!   the peer never reads). Replacement (4001), revocation (4003), heartbeat timeout (4002)
//!   and slow consumers (4008) go here at once, even while draining.
//!
//! Two smaller machines run beside it. The **write pump** is idle or writing exactly one
//! step (at most [`WRITE_BATCH`] frames from the head of the outbox): a single step in
//! flight is what keeps frames in order, and what a step wrote is only booked once the step
//! completed. The **store reader** is idle or loading one page of the range the [`Feed`]
//! reads (the replay at connect, or a catch-up after live traffic was skipped); a page is
//! only asked for when there is room for a worthwhile one.
//!
//! ## Events and actions
//!
//! Events are method calls: [`open`](Delivery::open), [`live`](Delivery::live),
//! [`store_page`](Delivery::store_page), [`written`](Delivery::written),
//! [`client_ping`](Delivery::client_ping), [`pong`](Delivery::pong), [`ack`](Delivery::ack),
//! [`take_send`](Delivery::take_send), [`settled`](Delivery::settled),
//! [`text`](Delivery::text), [`drain`](Delivery::drain), [`close`](Delivery::close),
//! [`heartbeat`](Delivery::heartbeat), [`input_ended`](Delivery::input_ended) and the
//! expiry of the guards. Each may queue [`Action`]s, which the actor takes with
//! [`next_action`](Delivery::next_action) after every event: a write step, a store page to
//! read, progress to report, delivery attempts to record, messages given up, timers to
//! arm, stop. Time comes in as an argument (`now`), never read here, so the heartbeat can be
//! tested without waiting.
//!
//! ## Confirmation
//!
//! In auto mode a message is done once a pong answers a ping written after it: written
//! messages wait in `unconfirmed`, each written ping remembers how many of them were written
//! before it, and a pong confirms that many. In manual mode a message is done when the client
//! acknowledges it; at most `max_in_flight` are delivered and not acknowledged, and when
//! that window is full live traffic is skipped and caught up from the store as acks come
//! back. Frames dropped by a slow-consumer close were never written, so they never count as
//! done: those messages stay owed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytestring::ByteString;
use uuid::Uuid;

use super::acks;
use super::feed::{Feed, Live, StoreRange};
use crate::config::Settings;
use crate::db::cursors::Progress;
use crate::models::StoredMessage;
use crate::protocol::{self, AckMode, CloseCode};

/// Most frames handed to the socket in one write step.
pub const WRITE_BATCH: usize = 64;
/// Most messages read from the store in one page (replay and catch-up).
pub const STORE_PAGE: usize = 256;

/// The bounds a session delivers within (from the broker's settings).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most frames waiting to be written to the client.
    pub outbox_max_frames: usize,
    /// Most bytes waiting to be written to the client.
    pub outbox_max_bytes: usize,
    /// Manual mode: most messages delivered and not acknowledged.
    pub max_in_flight: usize,
    /// Manual mode: a message already delivered this many times is given up.
    pub max_deliveries: i32,
    /// Most sends forwarded for storage and not settled yet.
    pub max_pending_sends: usize,
    /// How long the client may stay silent before the heartbeat closes the connection.
    pub client_timeout: Duration,
}

impl Limits {
    pub fn new(settings: &Settings) -> Limits {
        Limits {
            outbox_max_frames: settings.outbox_max_frames,
            outbox_max_bytes: settings.outbox_max_bytes,
            max_in_flight: settings.max_in_flight,
            max_deliveries: i32::try_from(settings.max_deliveries).unwrap_or(i32::MAX),
            max_pending_sends: settings.max_pending_sends,
            client_timeout: settings.client_timeout(),
        }
    }
}

/// How a session delivers, fixed at connect time.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Only for log lines.
    pub session_id: Uuid,
    pub ack: AckMode,
    /// A read-only observer: what it is given is nobody's progress.
    pub observer: bool,
    /// The replay starts above messages that stay owed (`since` above the ack floor), so
    /// confirmations cannot move the floor past them.
    pub skips_owed: bool,
    pub limits: Limits,
}

/// Where the connection is in its life (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Joining the channel and counting what is owed: nothing written yet. `missed_upto`:
    /// the highest live seq that arrived meanwhile (0 if none).
    Joining { missed_upto: i64 },
    /// Delivering and taking sends.
    Open,
    /// Taking no new sends; closes with `code` once the pending ones are settled.
    Draining {
        code: CloseCode,
        reason: &'static str,
    },
    /// A close frame with `code` is queued; `drained` if the close ended a drain.
    Closing { code: CloseCode, drained: bool },
}

/// The write pump: at most one write step in flight.
#[derive(Debug)]
enum Pump {
    Idle,
    /// A step is being written; what it holds is booked once it completed.
    Writing {
        written: Vec<Written>,
        /// The step ends with the close frame: the session stops once it is written.
        closes: bool,
    },
}

/// What a write step put on the socket that matters once it completed.
#[derive(Debug, Clone, Copy)]
enum Written {
    /// An auto-mode message, now waiting for a pong.
    Message(i64),
    Ping(u64),
}

/// The store reader: at most one page read at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    Idle,
    /// A page of at most `limit` messages was asked for; fewer means the range is done.
    Loading {
        limit: usize,
    },
}

/// What is delivered and not done yet, by ack mode.
#[derive(Debug)]
enum Window {
    Auto {
        /// Written to the socket, not yet confirmed by a pong, in write order. If the
        /// connection dies first, they are delivered again on the next one.
        unconfirmed: VecDeque<i64>,
        /// Pings written and not answered yet: (number, how many of `unconfirmed` were
        /// written before it).
        pings: VecDeque<(u64, usize)>,
        /// Once live: every owed message up to this seq was queued before live delivery
        /// began (see [`Delivery::pong`]).
        live_from: Option<i64>,
    },
    Manual {
        /// Queued or written, not acknowledged yet.
        in_flight: BTreeSet<i64>,
        /// Queued since the delivery counts were last reported.
        attempted: Vec<i64>,
    },
}

/// A frame waiting in the outbox.
#[derive(Debug)]
enum Outgoing {
    /// A delivered message.
    Message {
        frame: ByteString,
        seq: i64,
    },
    Text(ByteString),
    /// A numbered ping: the pong that answers it proves the client's WebSocket received
    /// every frame written before it.
    Ping(u64),
    Close(CloseCode, &'static str),
}

/// A frame of a write step, for the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(ByteString),
    /// A ping whose payload is this number, 8 bytes big-endian.
    Ping(u64),
    /// The answer to the client's most recent ping, with its payload.
    Pong(Vec<u8>),
    /// Always the last frame of the last step.
    Close(CloseCode, &'static str),
}

/// What the session must do, in the order asked.
#[derive(Debug)]
pub enum Action {
    /// Write these frames, in order, as one step; call [`Delivery::written`] once they all
    /// are (or stop if the socket failed).
    Write(Vec<Frame>),
    /// Read at most `limit` owed messages of `range`; hand them to [`Delivery::store_page`]
    /// (or call [`Delivery::store_failed`]).
    ReadStore { range: StoreRange, limit: usize },
    /// These messages are done: record the progress.
    Report(Progress),
    /// Manual mode: these seqs were handed to the client once more.
    RecordAttempts(Vec<i64>),
    /// These messages (id, seq) reached the delivery limit: dead-letter them for this agent.
    GiveUp(Vec<(Uuid, i64)>),
    /// A drain began: call [`Delivery::drain_expired`] once the sends should have settled.
    GuardDrain,
    /// A close frame was queued: stop after a grace period even if it is never written.
    GuardClose,
    /// The close frame was written, or the client's input ended with nothing left to do.
    Stop,
}

/// Why a send is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendRefused {
    /// The connection is draining or closing.
    Closing,
    /// This many sends are already waiting for their commit.
    Overloaded { pending: usize },
}

/// An owed message read from the store.
pub trait Owed {
    fn id(&self) -> Uuid;
    fn seq(&self) -> i64;
    fn priority(&self) -> i16;
    /// Its `message` frame (only built for what is queued).
    fn frame(&self) -> ByteString;
}

impl Owed for StoredMessage {
    fn id(&self) -> Uuid {
        self.id
    }
    fn seq(&self) -> i64 {
        self.seq
    }
    fn priority(&self) -> i16 {
        self.priority
    }
    fn frame(&self) -> ByteString {
        protocol::message_frame(self)
    }
}

/// The delivery state of one session (see the module documentation).
#[derive(Debug)]
pub struct Delivery {
    session_id: Uuid,
    observer: bool,
    skips_owed: bool,
    limits: Limits,
    phase: Phase,
    pump: Pump,
    reader: Reader,
    window: Window,
    /// Where messages come from right now: the store or the channel.
    feed: Feed,
    /// Frames for the client, in the order they must arrive, bounded by
    /// `outbox_max_frames`/`outbox_max_bytes`: a client that reads too slowly is
    /// disconnected rather than allowed to grow the broker's memory.
    outbox: VecDeque<Outgoing>,
    outbox_bytes: usize,
    /// The answer to the client's most recent ping, not written yet. One at most, outside
    /// the outbox: a newer ping replaces it (RFC 6455 §5.5.3 lets an endpoint answer only
    /// the most recent ping), so a client that pings without reading costs one pong.
    pong: Option<Vec<u8>>,
    /// The number of the last ping queued, and the one in the outbox now, if any (one at
    /// most).
    last_ping: u64,
    queued_ping: Option<u64>,
    /// Sends forwarded for storage whose receipt (or error) has not come back yet.
    pending_sends: usize,
    /// When the client was last heard from (any frame, pongs included).
    last_heard: Instant,
    actions: VecDeque<Action>,
}

impl Delivery {
    pub fn new(setup: Setup, now: Instant) -> Delivery {
        let window = match setup.ack {
            AckMode::Auto => Window::Auto {
                unconfirmed: VecDeque::new(),
                pings: VecDeque::new(),
                live_from: None,
            },
            AckMode::Manual => Window::Manual {
                in_flight: BTreeSet::new(),
                attempted: Vec::new(),
            },
        };
        Delivery {
            session_id: setup.session_id,
            observer: setup.observer,
            skips_owed: setup.skips_owed,
            limits: setup.limits,
            phase: Phase::Joining { missed_upto: 0 },
            pump: Pump::Idle,
            reader: Reader::Idle,
            window,
            feed: Feed::default(),
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            pong: None,
            last_ping: 0,
            queued_ping: None,
            pending_sends: 0,
            last_heard: now,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, in the order asked.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    #[cfg(test)]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// A close frame is queued: nothing the client sends is handled any more.
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    #[cfg(test)]
    pub fn pending_sends(&self) -> usize {
        self.pending_sends
    }

    // --- Events ------------------------------------------------------------------------

    /// Joined, and the owed messages counted: greets the client with `welcome`, then replays
    /// what is owed in `(after, head]`.
    pub fn open(&mut self, welcome: ByteString, after: i64, head: i64) {
        let Phase::Joining { missed_upto } = self.phase else {
            return;
        };
        self.phase = Phase::Open;
        self.text(welcome);
        self.feed = Feed::replay(after, head);
        if missed_upto > head {
            // Arrived before the welcome: read from the store after the replay.
            self.feed.live(missed_upto);
        }
        self.fetch_more();
    }

    /// A live message from the channel.
    pub fn live(&mut self, frame: ByteString, seq: i64) {
        match &mut self.phase {
            Phase::Joining { missed_upto } => {
                *missed_upto = (*missed_upto).max(seq);
                return;
            }
            Phase::Closing { .. } => return,
            Phase::Open | Phase::Draining { .. } => {}
        }
        match self.feed.live(seq) {
            Live::Deliver => {}
            // Delivering from the store: this one is read from there in its turn.
            Live::FromStore => return,
            // Already read from the store.
            Live::Queued => return,
        }
        let unconfirmed_cap = self.unconfirmed_cap();
        match &self.window {
            // The window is full: stop taking live traffic and catch up from the store as
            // acknowledgements come back.
            Window::Manual { in_flight, .. } if in_flight.len() >= self.limits.max_in_flight => {
                return self.feed.fall_behind(seq);
            }
            // A client that never confirms receipt must not make the broker remember ever
            // more messages for it. Only what was confirmed counts as done, so it recovers
            // the rest when it reconnects. (A full outbox is caught when the frame is
            // queued.)
            Window::Auto { unconfirmed, .. } if unconfirmed.len() >= unconfirmed_cap => {
                return self.slow_consumer();
            }
            _ => {}
        }
        self.queue_message(frame, seq);
        self.flush_attempts();
    }

    /// A page of the store range came back, in the range's order, with how often each of
    /// its messages was delivered already (manual mode).
    pub fn store_page<M: Owed>(&mut self, page: &[M], attempts: &HashMap<i64, i32>) {
        let Reader::Loading { limit } = std::mem::replace(&mut self.reader, Reader::Idle) else {
            return;
        };
        // Closed meanwhile: nothing of it is queued, so nothing of it counts.
        if self.is_closing() || self.feed.reading().is_none() {
            return;
        }
        let mut exhausted = page.len() < limit;
        // Half the outbox's byte bound for the store, so large messages are paced rather
        // than overflowing it; at least one message always goes.
        let byte_budget = self.limits.outbox_max_bytes / 2;
        let mut resume = None;
        let mut given_up = Vec::new();
        for message in page {
            let seq = message.seq();
            if attempts
                .get(&seq)
                .is_some_and(|&n| n >= self.limits.max_deliveries)
            {
                given_up.push((message.id(), seq));
            } else {
                let frame = message.frame();
                if !self.outbox.is_empty() && self.outbox_bytes + frame.len() > byte_budget {
                    // The rest of the page is read again once the client has drained.
                    exhausted = false;
                    break;
                }
                if !self.queue_message(frame, seq) {
                    // The outbox overflowed: the connection is closing.
                    exhausted = false;
                    break;
                }
            }
            resume = Some((message.priority(), seq));
        }
        if let Some(resume) = resume {
            self.feed.advance(resume);
        }
        if !given_up.is_empty() {
            log::info!(
                "session {}: {} message(s) reached the delivery limit; dead-lettered",
                self.session_id,
                given_up.len()
            );
            self.actions.push_back(Action::GiveUp(given_up));
        }
        self.flush_attempts();
        if exhausted {
            // Live messages skipped meanwhile are read next, in seq order; then live.
            if let Some(upto) = self.feed.range_done() {
                self.went_live(upto);
            }
        }
        self.fetch_more();
    }

    /// The store page could not be read.
    pub fn store_failed(&mut self) {
        self.reader = Reader::Idle;
        self.close(
            CloseCode::InternalError,
            "the store is unavailable; reconnect to resume",
        );
    }

    /// The write step in flight completed: every frame of it is on the socket.
    pub fn written(&mut self) {
        let Pump::Writing { written, closes } = std::mem::replace(&mut self.pump, Pump::Idle)
        else {
            return;
        };
        let mut wrote_messages = false;
        for item in written {
            match item {
                Written::Message(seq) => {
                    if let Window::Auto { unconfirmed, .. } = &mut self.window {
                        unconfirmed.push_back(seq);
                        wrote_messages = true;
                    }
                }
                Written::Ping(id) => {
                    self.queued_ping = None;
                    if let Window::Auto {
                        unconfirmed, pings, ..
                    } = &mut self.window
                    {
                        pings.push_back((id, unconfirmed.len()));
                    }
                }
            }
        }
        if closes {
            self.actions.push_back(Action::Stop);
            return;
        }
        // Auto mode: the written messages wait for the client to confirm receipt, which the
        // next ping asks for.
        if wrote_messages {
            self.ping();
        }
        self.pump();
        self.fetch_more();
    }

    /// The client sent a ping: answer it (only the most recent one, if several wait).
    pub fn client_ping(&mut self, payload: &[u8]) {
        if self.is_closing() {
            return;
        }
        // Copied: the payload is a slice of the connection's read buffer, which it would
        // otherwise keep alive.
        self.pong = Some(payload.to_vec());
        self.pump();
    }

    /// A pong: every message written before the ping it answers has reached the client.
    pub fn pong(&mut self, payload: &[u8]) {
        if self.is_closing() {
            return;
        }
        let Ok(bytes) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        let answered = u64::from_be_bytes(bytes);
        let Window::Auto {
            unconfirmed,
            pings,
            live_from,
        } = &mut self.window
        else {
            return;
        };
        let mut confirmed = 0;
        while let Some(&(id, count)) = pings.front() {
            if id > answered {
                break;
            }
            confirmed = confirmed.max(count);
            pings.pop_front();
        }
        if confirmed == 0 {
            return;
        }
        let mut done: Vec<i64> = unconfirmed.drain(..confirmed).collect();
        for ping in pings.iter_mut() {
            ping.1 -= confirmed;
        }
        // Delivered live, in seq order, after everything owed before it: the newest such
        // message confirmed means every owed message up to it is done, which lets the floor
        // move without listing each seq (and without the store scanning them again).
        let mut up_to = None;
        if let Some(live_from) = *live_from {
            if let Some(&newest) = done.iter().filter(|&&seq| seq > live_from).max() {
                up_to = Some(newest);
                done.retain(|&seq| seq <= live_from);
            }
        }
        self.report(Progress { done, up_to });
    }

    /// An `ack` frame. It covers what this session delivered and is waiting to hear about,
    /// nothing else: a replay goes by priority, so lower seqs may still be on their way, and
    /// a seq acknowledged before it was delivered (or before it existed) must still be
    /// delivered. Returns whether some seqs were left out (an `ack_ignored` frame is queued).
    pub fn ack(&mut self, seqs: &[i64], up_to: Option<i64>) -> bool {
        if self.is_closing() {
            return false;
        }
        let outcome = match &mut self.window {
            Window::Manual { in_flight, .. } => acks::take_in_flight(in_flight, seqs, up_to),
            Window::Auto { unconfirmed, .. } => acks::confirm_early(unconfirmed, seqs, up_to),
        };
        let ignored = !outcome.ignored.is_empty();
        if ignored {
            self.text(protocol::ack_ignored_frame(&outcome.ignored));
        }
        self.report(Progress {
            done: outcome.done,
            up_to: None,
        });
        self.fetch_more();
        ignored
    }

    /// The client wants to send: counts the send as pending until [`settled`](Self::settled),
    /// unless the connection is closing or too many are pending already.
    pub fn take_send(&mut self) -> Result<(), SendRefused> {
        match self.phase {
            Phase::Draining { .. } | Phase::Closing { .. } => Err(SendRefused::Closing),
            _ if self.pending_sends >= self.limits.max_pending_sends => {
                Err(SendRefused::Overloaded {
                    pending: self.pending_sends,
                })
            }
            _ => {
                self.pending_sends += 1;
                Ok(())
            }
        }
    }

    /// One of this session's sends is settled: its receipt or error frame is queued, and after
    /// it a notice about it if there is one (`no_recipient`). The
    /// last one settled ends a drain.
    pub fn settled(&mut self, frame: ByteString, notice: Option<ByteString>) {
        self.pending_sends = self.pending_sends.saturating_sub(1);
        self.text(frame);
        if let Some(notice) = notice {
            self.text(notice);
        }
        if let (Phase::Draining { code, reason }, 0) = (self.phase, self.pending_sends) {
            self.close(code, reason);
        }
    }

    /// Queues a text frame for the client (a receipt, an error, a notice).
    pub fn text(&mut self, frame: ByteString) {
        self.push(Outgoing::Text(frame));
    }

    /// Takes no more sends; closes with `code` once every pending send has its receipt (or
    /// error), so the client learns the fate of everything it sent.
    pub fn drain(&mut self, code: CloseCode, reason: &'static str) {
        let (code, reason) = match self.phase {
            Phase::Closing { .. } => return,
            Phase::Draining { code, reason } => (code, reason),
            Phase::Joining { .. } | Phase::Open => {
                self.phase = Phase::Draining { code, reason };
                // Every send is settled within the database timeouts; this only guards the
                // close.
                self.actions.push_back(Action::GuardDrain);
                (code, reason)
            }
        };
        if self.pending_sends == 0 {
            self.close(code, reason);
        }
    }

    /// The drain guard expired: close now, settled or not.
    pub fn drain_expired(&mut self) {
        if let Phase::Draining { code, reason } = self.phase {
            self.close(code, reason);
        }
    }

    /// Queues a close frame after what is queued; nothing more is queued or taken after it.
    pub fn close(&mut self, code: CloseCode, reason: &'static str) {
        let drained = match self.phase {
            Phase::Closing { .. } => return,
            Phase::Draining { .. } => true,
            Phase::Joining { .. } | Phase::Open => false,
        };
        self.outbox.push_back(Outgoing::Close(code, reason));
        self.phase = Phase::Closing { code, drained };
        self.pump();
        self.actions.push_back(Action::GuardClose);
    }

    /// A client frame arrived.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The heartbeat ticked: close a client silent for longer than the client timeout, else
    /// ping it.
    pub fn heartbeat(&mut self, now: Instant) {
        let silent = now.saturating_duration_since(self.last_heard);
        if silent > self.limits.client_timeout {
            if !self.is_closing() {
                log::info!(
                    "session {}: nothing heard for {silent:?}; closing",
                    self.session_id
                );
            }
            self.close(CloseCode::HeartbeatTimeout, "heartbeat timeout");
        } else {
            self.ping();
        }
    }

    /// The client's half of the connection ended. Receipts still owed for its sends are
    /// written if the other half still carries them (if not, the write fails and the session
    /// stops); a drain under way finishes; otherwise the session stops.
    pub fn input_ended(&mut self) {
        if matches!(
            self.phase,
            Phase::Draining { .. } | Phase::Closing { drained: true, .. }
        ) {
            return;
        }
        if self.pending_sends > 0 {
            self.drain(CloseCode::Normal, "bye");
        } else {
            self.actions.push_back(Action::Stop);
        }
    }

    // --- Internals -----------------------------------------------------------------------

    /// Auto mode: most messages written and not yet confirmed by a pong. Each costs only its
    /// seq, so the bound is generous: it only stops a client that never answers pings.
    fn unconfirmed_cap(&self) -> usize {
        self.limits.outbox_max_frames.saturating_mul(16)
    }

    /// How many more messages may be queued for the client now.
    fn room(&self) -> usize {
        if self.outbox_bytes >= self.limits.outbox_max_bytes / 2 {
            return 0;
        }
        let outbox_room = (self.limits.outbox_max_frames / 2).saturating_sub(self.outbox.len());
        match &self.window {
            Window::Auto { unconfirmed, .. } => {
                outbox_room.min(self.unconfirmed_cap().saturating_sub(unconfirmed.len()))
            }
            Window::Manual { in_flight, .. } => {
                outbox_room.min(self.limits.max_in_flight.saturating_sub(in_flight.len()))
            }
        }
    }

    /// Asks for the next page of the store range if there is room for it.
    fn fetch_more(&mut self) {
        if self.reader != Reader::Idle || self.is_closing() {
            return;
        }
        let Some(range) = self.feed.reading() else {
            return;
        };
        let limit = self.room().min(STORE_PAGE);
        // Wait for room for a worthwhile page (a quarter of the window) rather than reading
        // the store once per acknowledgement, unless the client has nothing left to read.
        let (worthwhile, nothing_left) = match &self.window {
            Window::Manual { in_flight, .. } => (
                (self.limits.max_in_flight / 4).clamp(1, STORE_PAGE),
                in_flight.is_empty() && self.outbox.is_empty(),
            ),
            Window::Auto { .. } => (1, self.outbox.is_empty()),
        };
        if limit == 0 || (limit < worthwhile && !nothing_left) {
            return;
        }
        let range = range.clone();
        self.reader = Reader::Loading { limit };
        self.actions.push_back(Action::ReadStore { range, limit });
    }

    /// Queues a message for the client and tracks it until it is done. False if it could not
    /// be queued: the outbox overflowed, and the connection is closing.
    fn queue_message(&mut self, frame: ByteString, seq: i64) -> bool {
        if self.is_closing() {
            return false;
        }
        // Manual mode: handed to the connection, it counts as a delivery even if it is the
        // frame that overflows the outbox. A message too large for the outbox then reaches
        // the delivery limit like any other message that makes a client fail, instead of
        // closing every connection of the agent with 4008 for ever.
        if let Window::Manual {
            in_flight,
            attempted,
        } = &mut self.window
        {
            in_flight.insert(seq);
            attempted.push(seq);
        }
        self.feed.queued(seq);
        self.push(Outgoing::Message { frame, seq })
    }

    /// Manual mode: reports the deliveries made since the last report, to be counted.
    fn flush_attempts(&mut self) {
        if let Window::Manual { attempted, .. } = &mut self.window {
            if !attempted.is_empty() {
                let seqs = std::mem::take(attempted);
                self.actions.push_back(Action::RecordAttempts(seqs));
            }
        }
    }

    /// Live delivery starts: every message owed up to `upto` has been queued already.
    fn went_live(&mut self, upto: i64) {
        // Auto mode only (manual acks come in any order), and not after a `since` that
        // skipped owed messages: those are still owed.
        if let Window::Auto { live_from, .. } = &mut self.window {
            if !self.skips_owed {
                *live_from = Some(upto);
            }
        }
    }

    fn report(&mut self, progress: Progress) {
        // An observer has no cursor: what it was given is nobody's progress.
        if !progress.is_empty() && !self.observer {
            self.actions.push_back(Action::Report(progress));
        }
    }

    /// Queues a frame within the outbox's bounds; a client that lets them fill up is a slow
    /// consumer. False if it was not queued.
    fn push(&mut self, item: Outgoing) -> bool {
        if self.is_closing() {
            return false;
        }
        let len = match &item {
            Outgoing::Message { frame, .. } | Outgoing::Text(frame) => frame.len(),
            Outgoing::Ping(_) | Outgoing::Close(..) => 0,
        };
        if self.outbox.len() >= self.limits.outbox_max_frames
            || self.outbox_bytes + len > self.limits.outbox_max_bytes
        {
            self.slow_consumer();
            return false;
        }
        self.outbox_bytes += len;
        self.outbox.push_back(item);
        self.pump();
        true
    }

    /// Queues a numbered ping, unless one is waiting to be written already.
    fn ping(&mut self) {
        if self.queued_ping.is_none() && !self.is_closing() {
            self.last_ping += 1;
            self.queued_ping = Some(self.last_ping);
            self.outbox.push_back(Outgoing::Ping(self.last_ping));
            self.pump();
        }
    }

    /// Drops everything queued and closes with 4008. What was dropped was never written, so
    /// none of it counts as done.
    fn slow_consumer(&mut self) {
        log::warn!(
            "session {}: slow consumer ({} frames, {} bytes queued); disconnecting",
            self.session_id,
            self.outbox.len(),
            self.outbox_bytes
        );
        self.outbox.clear();
        self.outbox_bytes = 0;
        self.queued_ping = None;
        self.close(
            CloseCode::SlowConsumer,
            "slow consumer: outgoing queue full",
        );
    }

    /// Starts the next write step if none is in flight: a pending pong first (it answers a
    /// ping the client sent, whatever is queued), then frames from the head of the outbox,
    /// up to [`WRITE_BATCH`] and never past a close. A single step in flight, taking from the
    /// front, is what makes the client receive frames in exactly the order they were queued.
    fn pump(&mut self) {
        if matches!(self.pump, Pump::Writing { .. })
            || (self.outbox.is_empty() && self.pong.is_none())
        {
            return;
        }
        let mut step = Vec::with_capacity(self.outbox.len().min(WRITE_BATCH) + 1);
        let mut written = Vec::new();
        let mut closes = false;
        step.extend(self.pong.take().map(Frame::Pong));
        while step.len() < WRITE_BATCH {
            let Some(item) = self.outbox.pop_front() else {
                break;
            };
            match item {
                Outgoing::Message { frame, seq } => {
                    self.outbox_bytes -= frame.len();
                    if matches!(self.window, Window::Auto { .. }) {
                        written.push(Written::Message(seq));
                    }
                    step.push(Frame::Text(frame));
                }
                Outgoing::Text(frame) => {
                    self.outbox_bytes -= frame.len();
                    step.push(Frame::Text(frame));
                }
                Outgoing::Ping(id) => {
                    written.push(Written::Ping(id));
                    step.push(Frame::Ping(id));
                }
                Outgoing::Close(code, reason) => {
                    step.push(Frame::Close(code, reason));
                    closes = true;
                    break;
                }
            }
        }
        self.pump = Pump::Writing { written, closes };
        self.actions.push_back(Action::Write(step));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn limits() -> Limits {
        Limits {
            outbox_max_frames: 16,
            outbox_max_bytes: 1 << 20,
            max_in_flight: 4,
            max_deliveries: 3,
            max_pending_sends: 8,
            client_timeout: TIMEOUT,
        }
    }

    /// An owed message of the test store; its frame is `m{seq}`, padded with dots to `size`.
    #[derive(Debug, Clone)]
    struct Msg {
        seq: i64,
        priority: i16,
        size: usize,
    }

    fn owed(seq: i64, priority: i16) -> Msg {
        Msg {
            seq,
            priority,
            size: 0,
        }
    }

    fn frame(seq: i64, size: usize) -> ByteString {
        let mut text = format!("m{seq}");
        while text.len() < size {
            text.push('.');
        }
        ByteString::from(text)
    }

    impl Owed for Msg {
        fn id(&self) -> Uuid {
            Uuid::from_u128(self.seq as u128)
        }
        fn seq(&self) -> i64 {
            self.seq
        }
        fn priority(&self) -> i16 {
            self.priority
        }
        fn frame(&self) -> ByteString {
            frame(self.seq, self.size)
        }
    }

    fn text(s: &str) -> Frame {
        Frame::Text(ByteString::from(s))
    }

    fn ping_payload(n: u64) -> [u8; 8] {
        n.to_be_bytes()
    }

    /// One session's core, with a simulated store, socket and cursor writer: it records every
    /// action and checks the invariants the actor relies on (one write step and one page read
    /// at a time, at most `WRITE_BATCH` frames a step).
    struct Harness {
        d: Delivery,
        t0: Instant,
        /// What the store owes this session.
        store: Vec<Msg>,
        /// How often each seq was delivered already.
        attempts: HashMap<i64, i32>,
        /// The write step in flight.
        step: Option<Vec<Frame>>,
        /// Every frame written so far, in order.
        wire: Vec<Frame>,
        /// The page read in flight.
        read: Option<(StoreRange, usize)>,
        reports: Vec<Progress>,
        recorded: Vec<i64>,
        given_up: Vec<i64>,
        drain_guards: usize,
        close_guards: usize,
        stopped: bool,
    }

    impl Harness {
        fn new(ack: AckMode) -> Harness {
            Harness::with(ack, limits())
        }

        fn with(ack: AckMode, limits: Limits) -> Harness {
            let t0 = Instant::now();
            let setup = Setup {
                session_id: Uuid::nil(),
                ack,
                observer: false,
                skips_owed: false,
                limits,
            };
            Harness {
                d: Delivery::new(setup, t0),
                t0,
                store: Vec::new(),
                attempts: HashMap::new(),
                step: None,
                wire: Vec::new(),
                read: None,
                reports: Vec::new(),
                recorded: Vec::new(),
                given_up: Vec::new(),
                drain_guards: 0,
                close_guards: 0,
                stopped: false,
            }
        }

        /// Takes the actions the core asked for.
        fn collect(&mut self) {
            while let Some(action) = self.d.next_action() {
                match action {
                    Action::Write(frames) => {
                        assert!(self.step.is_none(), "a second write step in flight");
                        assert!(!frames.is_empty() && frames.len() <= WRITE_BATCH);
                        self.step = Some(frames);
                    }
                    Action::ReadStore { range, limit } => {
                        assert!(self.read.is_none(), "a second page read in flight");
                        assert!((1..=STORE_PAGE).contains(&limit));
                        self.read = Some((range, limit));
                    }
                    Action::Report(progress) => self.reports.push(progress),
                    Action::RecordAttempts(seqs) => self.recorded.extend(seqs),
                    Action::GiveUp(messages) => {
                        self.given_up.extend(messages.iter().map(|&(_, seq)| seq))
                    }
                    Action::GuardDrain => self.drain_guards += 1,
                    Action::GuardClose => self.close_guards += 1,
                    Action::Stop => self.stopped = true,
                }
            }
        }

        /// Joined: the welcome, then the replay of `(after, head]`.
        fn open(&mut self, after: i64, head: i64) {
            self.d.open(ByteString::from_static("welcome"), after, head);
            self.collect();
        }

        /// Opens with nothing to replay and goes live.
        fn open_live(&mut self) {
            self.open(0, 0);
            self.serve();
            self.flush();
        }

        /// Completes the write step in flight, if any.
        fn write_step(&mut self) -> bool {
            let Some(frames) = self.step.take() else {
                return false;
            };
            self.wire.extend(frames);
            self.d.written();
            self.collect();
            true
        }

        /// Completes write steps until none is left.
        fn flush(&mut self) {
            while self.write_step() {}
        }

        /// Answers the page read in flight from the store, as `cursors::owed_page` does: the
        /// range's seqs after its resume point, in the range's order, at most `limit`.
        fn serve(&mut self) {
            let (range, limit) = self.read.take().expect("a page was asked for");
            let mut page: Vec<Msg> = self
                .store
                .iter()
                .filter(|m| m.seq > range.after && m.seq <= range.upto)
                .filter(|m| {
                    if range.by_priority {
                        (m.priority, m.seq) > range.resume
                    } else {
                        m.seq > range.resume.1
                    }
                })
                .cloned()
                .collect();
            if range.by_priority {
                page.sort_by_key(|m| (m.priority, m.seq));
            } else {
                page.sort_by_key(|m| m.seq);
            }
            page.truncate(limit);
            self.d.store_page(&page, &self.attempts);
            self.collect();
        }

        /// A message committed: in the store, then live from the channel.
        fn commit(&mut self, seq: i64) {
            self.store.push(owed(seq, 2));
            self.d.live(frame(seq, 0), seq);
            self.collect();
        }

        fn ack(&mut self, seqs: &[i64], up_to: Option<i64>) -> bool {
            let ignored = self.d.ack(seqs, up_to);
            self.collect();
            ignored
        }

        fn pong(&mut self, n: u64) {
            self.d.pong(&ping_payload(n));
            self.collect();
        }

        fn settle(&mut self, receipt: &str) {
            self.d.settled(ByteString::from(receipt.to_owned()), None);
            self.collect();
        }

        fn close(&mut self, code: CloseCode, reason: &'static str) {
            self.d.close(code, reason);
            self.collect();
        }

        fn drain(&mut self, code: CloseCode, reason: &'static str) {
            self.d.drain(code, reason);
            self.collect();
        }

        /// The seqs of the messages written so far, in order.
        fn delivered(&self) -> Vec<i64> {
            self.wire
                .iter()
                .filter_map(|f| match f {
                    Frame::Text(t) => t.strip_prefix('m')?.trim_end_matches('.').parse().ok(),
                    _ => None,
                })
                .collect()
        }

        /// The close frames written so far.
        fn closes(&self) -> Vec<CloseCode> {
            self.wire
                .iter()
                .filter_map(|f| match f {
                    Frame::Close(code, _) => Some(*code),
                    _ => None,
                })
                .collect()
        }

        /// Every seq reported done, and the highest `up_to` reported.
        fn done(&self) -> (Vec<i64>, Option<i64>) {
            let mut all = Progress::default();
            for progress in &self.reports {
                all.merge(progress.clone());
            }
            (all.done, all.up_to)
        }

        /// The frames written since the welcome, without pings.
        fn after_welcome(&self) -> Vec<Frame> {
            self.wire
                .iter()
                .skip_while(|f| **f != text("welcome"))
                .skip(1)
                .filter(|f| !matches!(f, Frame::Ping(_)))
                .cloned()
                .collect()
        }
    }

    #[test]
    fn takeover_while_draining_closes_at_once_with_4001_and_settles_nothing_after() {
        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        assert_eq!(h.d.take_send(), Ok(()));
        assert_eq!(h.d.take_send(), Ok(()));
        // The client closes with two sends pending: no close until they are settled.
        h.drain(CloseCode::Normal, "bye");
        assert_eq!(
            h.d.phase(),
            Phase::Draining {
                code: CloseCode::Normal,
                reason: "bye"
            }
        );
        assert_eq!(h.drain_guards, 1);
        assert!(h.step.is_none(), "nothing to write yet");
        assert_eq!(h.d.take_send(), Err(SendRefused::Closing));
        // One receipt is being written when another connection of the agent takes over.
        h.settle("sent 1");
        assert!(h.step.is_some());
        h.close(
            CloseCode::Replaced,
            "replaced by a newer connection of this agent",
        );
        assert_eq!(
            h.d.phase(),
            Phase::Closing {
                code: CloseCode::Replaced,
                drained: true
            }
        );
        assert_eq!(h.close_guards, 1);
        // The second send settles after the takeover: nothing more is written or closed.
        h.settle("sent 2");
        h.commit(1);
        h.drain(CloseCode::GoingAway, "the broker is shutting down");
        h.d.drain_expired();
        h.collect();
        h.flush();
        assert_eq!(
            h.after_welcome(),
            [
                text("sent 1"),
                Frame::Close(
                    CloseCode::Replaced,
                    "replaced by a newer connection of this agent"
                )
            ]
        );
        assert_eq!(CloseCode::Replaced.code(), 4001);
        assert_eq!(h.close_guards, 1, "one close");
        assert!(h.stopped, "stops once the close is written");
        assert_eq!(h.d.pending_sends(), 0);
    }

    #[test]
    fn draining_takes_no_new_sends_and_closes_once_the_last_pending_send_is_settled() {
        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        h.d.take_send().expect("open");
        h.d.take_send().expect("open");
        h.drain(CloseCode::GoingAway, "the broker is shutting down");
        assert_eq!(h.d.take_send(), Err(SendRefused::Closing));
        // Messages are still delivered while the sends settle.
        h.commit(1);
        h.settle("sent 1");
        h.flush();
        assert!(h.closes().is_empty(), "one send still pending");
        assert!(!h.d.is_closing());
        h.settle("sent 2");
        h.flush();
        assert_eq!(
            h.after_welcome(),
            [
                text("m1"),
                text("sent 1"),
                text("sent 2"),
                Frame::Close(CloseCode::GoingAway, "the broker is shutting down")
            ]
        );
        assert!(h.stopped);
        // The guard fires later: nothing happens.
        h.d.drain_expired();
        h.collect();
        assert!(h.step.is_none());
        assert_eq!(h.close_guards, 1);
    }

    #[test]
    fn the_notice_of_the_last_send_of_a_drain_follows_its_receipt_before_the_close() {
        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        h.d.take_send().expect("open");
        h.drain(CloseCode::Normal, "bye");
        h.d.settled(
            ByteString::from_static("sent 1"),
            Some(ByteString::from_static("no_recipient 1")),
        );
        h.collect();
        h.flush();
        assert_eq!(
            h.after_welcome(),
            [
                text("sent 1"),
                text("no_recipient 1"),
                Frame::Close(CloseCode::Normal, "bye")
            ]
        );
    }

    #[test]
    fn a_drain_with_nothing_pending_closes_at_once_and_its_guard_closes_an_unsettled_one() {
        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        h.drain(CloseCode::MessageTooBig, "frame too large");
        h.flush();
        assert_eq!(h.closes(), [CloseCode::MessageTooBig]);

        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        h.d.take_send().expect("open");
        h.drain(CloseCode::Normal, "bye");
        h.d.drain_expired();
        h.collect();
        h.flush();
        assert_eq!(h.closes(), [CloseCode::Normal]);
        assert_eq!(
            h.d.phase(),
            Phase::Closing {
                code: CloseCode::Normal,
                drained: true
            }
        );
    }

    #[test]
    fn the_end_of_the_client_input_drains_pending_sends_or_stops() {
        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        h.d.take_send().expect("open");
        h.d.input_ended();
        h.collect();
        assert!(!h.stopped);
        h.settle("sent");
        h.flush();
        assert_eq!(
            h.after_welcome(),
            [text("sent"), Frame::Close(CloseCode::Normal, "bye")]
        );
        assert!(h.stopped);

        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        h.d.input_ended();
        h.collect();
        assert!(h.stopped, "nothing left to do");
    }

    #[test]
    fn sends_beyond_the_pending_bound_are_refused_as_overloaded() {
        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        for _ in 0..8 {
            h.d.take_send().expect("within the bound");
        }
        assert_eq!(h.d.take_send(), Err(SendRefused::Overloaded { pending: 8 }));
        h.settle("sent");
        assert_eq!(h.d.take_send(), Ok(()));
    }

    #[test]
    fn a_slow_consumer_is_closed_with_4008_and_nothing_it_was_not_written_counts() {
        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        h.commit(1);
        h.flush();
        h.pong(1);
        assert_eq!(h.done(), (vec![], Some(1)));
        // 2 is being written when the client stops reading; 3..=18 fill the outbox (16).
        for seq in 2..=18 {
            h.commit(seq);
        }
        assert!(!h.d.is_closing());
        h.commit(19);
        assert_eq!(
            h.d.phase(),
            Phase::Closing {
                code: CloseCode::SlowConsumer,
                drained: false
            }
        );
        // What was in flight is written; the queued frames are dropped, the close follows.
        h.flush();
        assert_eq!(h.delivered(), [1, 2]);
        assert_eq!(
            h.after_welcome(),
            [
                text("m1"),
                text("m2"),
                Frame::Close(
                    CloseCode::SlowConsumer,
                    "slow consumer: outgoing queue full"
                )
            ]
        );
        assert_eq!(CloseCode::SlowConsumer.code(), 4008);
        assert!(h.stopped);
        // Not even 2 counts: no ping followed it, and a late pong is ignored. 2..=19 stay
        // owed, for the next connection.
        h.pong(u64::MAX);
        assert_eq!(h.done(), (vec![], Some(1)));
    }

    #[test]
    fn a_message_too_large_for_the_outbox_closes_with_4008_and_counts_as_one_delivery() {
        let mut h = Harness::with(
            AckMode::Manual,
            Limits {
                outbox_max_bytes: 100,
                ..limits()
            },
        );
        h.store = vec![
            Msg {
                seq: 1,
                priority: 2,
                size: 120,
            },
            owed(2, 2),
        ];
        h.open(0, 2);
        h.serve();
        assert!(h.d.is_closing());
        h.flush();
        assert_eq!(h.closes(), [CloseCode::SlowConsumer]);
        assert!(h.delivered().is_empty());
        // 1 was handed to the connection (so it reaches the delivery limit in the end); 2,
        // after it in the page, never was.
        assert_eq!(h.recorded, [1]);
    }

    #[test]
    fn receipts_past_the_byte_bound_close_a_manual_consumer_with_4008() {
        let mut h = Harness::with(
            AckMode::Manual,
            Limits {
                outbox_max_bytes: 100,
                ..limits()
            },
        );
        h.open_live();
        h.settle("a receipt of forty bytes, being written");
        // The client does not read: receipts pile up in the outbox.
        h.settle(&"r".repeat(60));
        h.settle(&"s".repeat(40));
        assert!(!h.d.is_closing(), "exactly 100 bytes queued");
        h.settle("t");
        assert!(h.d.is_closing());
        h.commit(1);
        h.flush();
        assert_eq!(h.closes(), [CloseCode::SlowConsumer]);
        assert!(h.delivered().is_empty());
        assert!(h.recorded.is_empty(), "no delivery was made");
    }

    #[test]
    fn auto_mode_closes_a_client_that_never_confirms_with_4008() {
        // 16 × outbox_max_frames messages may wait for their pong.
        let mut h = Harness::with(
            AckMode::Auto,
            Limits {
                outbox_max_frames: 2,
                ..limits()
            },
        );
        h.open_live();
        for seq in 1..=32 {
            h.commit(seq);
            h.flush();
        }
        assert!(!h.d.is_closing());
        h.commit(33);
        h.flush();
        assert_eq!(h.closes(), [CloseCode::SlowConsumer]);
        assert_eq!(h.delivered(), (1..=32).collect::<Vec<_>>());
    }

    #[test]
    fn a_full_manual_window_falls_behind_and_catches_up_from_the_store_in_seq_order() {
        let mut h = Harness::new(AckMode::Manual);
        h.open_live();
        for seq in 1..=7 {
            h.commit(seq);
        }
        h.flush();
        // The window holds 4: 5, 6 and 7 wait in the store.
        assert_eq!(h.delivered(), [1, 2, 3, 4]);
        assert!(h.read.is_none(), "no room yet");
        // An ack ahead of delivery records nothing, and says so.
        assert!(h.ack(&[6], None));
        h.flush();
        assert!(matches!(h.wire.last(), Some(Frame::Text(t)) if t.contains("ack_ignored")));
        assert!(h.reports.is_empty());
        assert!(h.read.is_none());
        // One ack makes room for one (a quarter of a window of 4).
        assert!(!h.ack(&[1], None));
        let (range, limit) = h.read.clone().expect("catch-up");
        assert_eq!(
            (range.after, range.upto, range.by_priority, limit),
            (4, 5, false, 1)
        );
        // 8 is committed while the page is read: it is read from the store in its turn.
        h.commit(8);
        h.serve();
        h.flush();
        assert_eq!(h.delivered(), [1, 2, 3, 4, 5]);
        h.ack(&[], Some(3));
        while h.read.is_some() {
            h.serve();
            h.flush();
            if h.read.is_none() {
                h.ack(&[], Some(i64::MAX));
            }
        }
        assert_eq!(h.delivered(), [1, 2, 3, 4, 5, 6, 7, 8]);
        // Caught up: live again.
        h.commit(9);
        h.flush();
        assert!(h.read.is_none());
        assert_eq!(h.delivered(), (1..=9).collect::<Vec<_>>());
        assert_eq!(h.recorded, (1..=9).collect::<Vec<_>>(), "one delivery each");
        let (done, up_to) = h.done();
        assert_eq!(done, (1..=8).collect::<Vec<_>>());
        assert_eq!(up_to, None, "manual acks never move the floor wholesale");
    }

    #[test]
    fn a_store_page_that_arrives_after_the_close_does_nothing() {
        let mut h = Harness::new(AckMode::Manual);
        h.store = vec![owed(1, 2), owed(2, 0), owed(3, 2)];
        h.attempts.insert(3, 3);
        h.open(0, 3);
        assert!(h.read.is_some(), "the replay is being read");
        h.close(
            CloseCode::TokenRevoked,
            "the token of this connection was revoked",
        );
        h.serve();
        h.commit(4);
        h.flush();
        assert!(h.delivered().is_empty());
        assert!(h.recorded.is_empty(), "nothing was handed to the client");
        assert!(h.given_up.is_empty(), "left for the next connection");
        assert!(h.read.is_none(), "no further page");
        assert_eq!(h.closes(), [CloseCode::TokenRevoked]);
        assert!(h.stopped);
    }

    #[test]
    fn the_replay_goes_by_priority_gives_up_at_the_delivery_limit_then_goes_live() {
        let mut h = Harness::new(AckMode::Manual);
        h.store = vec![owed(1, 2), owed(2, 0), owed(3, 2), owed(4, 1)];
        h.attempts.insert(3, 3);
        h.attempts.insert(1, 2);
        h.open(0, 4);
        // Committed before the replay is done: follows it.
        h.commit(5);
        h.serve();
        h.flush();
        while h.read.is_some() {
            h.serve();
            h.flush();
        }
        assert_eq!(h.delivered(), [2, 4, 1, 5]);
        assert_eq!(h.given_up, [3]);
        assert_eq!(h.recorded, [2, 4, 1, 5]);
        h.commit(6);
        h.flush();
        assert_eq!(h.delivered(), [2, 4, 1, 5], "the window (4) is full");
        h.ack(&[2], None);
        while h.read.is_some() {
            h.serve();
            h.flush();
        }
        assert_eq!(h.delivered(), [2, 4, 1, 5, 6]);
    }

    #[test]
    fn large_messages_are_paced_by_half_the_byte_bound() {
        let mut h = Harness::with(
            AckMode::Auto,
            Limits {
                outbox_max_bytes: 100,
                ..limits()
            },
        );
        h.store = (1..=5)
            .map(|seq| Msg {
                seq,
                priority: 2,
                size: 30,
            })
            .collect();
        h.open(0, 5);
        // The welcome is being written: the page fills the outbox to half its bytes only.
        h.serve();
        assert_eq!(h.d.outbox_bytes, 30, "the second would pass 50 bytes");
        h.flush();
        while h.read.is_some() {
            h.serve();
            h.flush();
        }
        assert_eq!(h.delivered(), [1, 2, 3, 4, 5]);
        assert!(!h.d.is_closing());
    }

    #[test]
    fn a_live_message_before_the_welcome_is_read_from_the_store_after_the_replay() {
        let mut h = Harness::new(AckMode::Auto);
        h.store = vec![owed(1, 2)];
        h.commit(2);
        assert!(h.step.is_none(), "the welcome comes first");
        h.open(0, 1);
        while h.read.is_some() {
            h.serve();
            h.flush();
        }
        h.flush();
        assert_eq!(h.wire.first(), Some(&text("welcome")));
        assert_eq!(h.delivered(), [1, 2]);
    }

    #[test]
    fn a_pong_confirms_only_the_messages_written_before_the_ping_it_answers() {
        let mut h = Harness::new(AckMode::Auto);
        h.store = vec![owed(1, 2), owed(2, 0)];
        h.open(0, 2);
        h.serve();
        // The replay is written (2 first, by priority), then ping 1.
        h.write_step();
        h.write_step();
        assert_eq!(h.step, Some(vec![Frame::Ping(1)]));
        // 3 is committed while ping 1 is being written: it goes after it.
        h.commit(3);
        h.flush();
        assert_eq!(h.delivered(), [2, 1, 3]);
        assert!(h.wire.contains(&Frame::Ping(2)));
        // 4 is written, its ping not yet.
        h.commit(4);
        h.write_step();
        assert_eq!(h.step, Some(vec![Frame::Ping(3)]));
        // A pong that is no answer to a ping of ours confirms nothing.
        h.d.pong(b"hello");
        h.pong(0);
        assert!(h.reports.is_empty());
        h.pong(1);
        assert_eq!(h.done(), (vec![2, 1], None), "the replay, by seq");
        // Ping 2 followed 3, which was delivered live: the floor moves up to it.
        h.pong(2);
        assert_eq!(h.done(), (vec![2, 1], Some(3)));
        h.pong(2);
        assert_eq!(h.reports.len(), 2, "answered already");
        // 4 was written before ping 3, which is not written yet: not confirmed.
        h.pong(3);
        assert_eq!(h.done(), (vec![2, 1], Some(3)));
        h.write_step();
        h.pong(3);
        assert_eq!(h.done(), (vec![2, 1], Some(4)));
    }

    #[test]
    fn an_ack_in_auto_mode_confirms_only_what_was_written() {
        let mut h = Harness::new(AckMode::Auto);
        h.open_live();
        h.commit(1);
        h.flush();
        h.commit(2);
        assert!(h.ack(&[1, 2], None), "2 is not written yet");
        assert_eq!(h.done(), (vec![1], None));
    }

    #[test]
    fn a_newer_client_ping_replaces_the_pending_pong_which_goes_first() {
        let mut h = Harness::new(AckMode::Auto);
        h.open(0, 0);
        // The welcome is being written: pings wait, queued text waits behind the pong.
        h.d.text(ByteString::from_static("notice"));
        for payload in [b"a", b"b", b"c"] {
            h.d.client_ping(payload);
        }
        h.collect();
        h.write_step();
        assert_eq!(
            h.step,
            Some(vec![Frame::Pong(b"c".to_vec()), text("notice")])
        );
        h.flush();
        let pongs = h
            .wire
            .iter()
            .filter(|f| matches!(f, Frame::Pong(_)))
            .count();
        assert_eq!(pongs, 1);
    }

    #[test]
    fn a_pong_is_outside_the_outbox_bound() {
        let mut h = Harness::new(AckMode::Manual);
        h.open(0, 0);
        // The welcome is being written; the outbox is full (16 frames).
        for n in 0..16 {
            h.d.text(ByteString::from(format!("notice {n}")));
        }
        for _ in 0..1000 {
            h.d.client_ping(b"p");
        }
        h.collect();
        assert!(!h.d.is_closing());
        h.flush();
        assert_eq!(h.wire.get(1), Some(&Frame::Pong(b"p".to_vec())));
    }

    #[test]
    fn the_heartbeat_pings_a_client_heard_from_in_time_and_closes_a_silent_one_with_4002() {
        let mut h = Harness::new(AckMode::Manual);
        h.open_live();
        h.d.heartbeat(h.t0 + TIMEOUT);
        h.collect();
        h.d.heartbeat(h.t0 + TIMEOUT);
        h.collect();
        h.flush();
        assert_eq!(
            h.wire
                .iter()
                .filter(|f| matches!(f, Frame::Ping(_)))
                .count(),
            1,
            "one ping queued at a time"
        );
        assert!(!h.d.is_closing(), "silent for exactly the timeout");
        let heard = h.t0 + Duration::from_secs(10);
        h.d.heard(heard);
        h.d.heartbeat(heard + TIMEOUT);
        h.collect();
        assert!(!h.d.is_closing());
        h.flush();
        h.d.heartbeat(heard + TIMEOUT + Duration::from_millis(1));
        h.collect();
        h.flush();
        assert_eq!(h.closes(), [CloseCode::HeartbeatTimeout]);
        assert_eq!(CloseCode::HeartbeatTimeout.code(), 4002);
        assert!(h.stopped);
    }

    #[test]
    fn observers_report_no_progress() {
        let mut h = Harness::new(AckMode::Auto);
        h.d.observer = true;
        h.open_live();
        h.commit(1);
        h.flush();
        h.pong(u64::MAX);
        assert!(h.reports.is_empty());
        assert_eq!(h.delivered(), [1]);
    }
}
