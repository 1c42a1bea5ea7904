//! The workload driver: agents on real WebSockets that send, receive, reply and time
//! everything, exactly as clients of the protocol would.
//!
//! Every agent has three tasks: a sender (paced by its window or by the rate), a receiver
//! (receipts, deliveries, replies) and a writer that owns the socket's write half, so that a
//! receiver can answer a request without waiting for the sender's window. Each message
//! carries, in its metadata, its number `n` and its send time `t` (nanoseconds since the run
//! started, on this process's monotonic clock), so a recipient can tell which message it got
//! and how long it took.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use super::broker::BrokerTarget;
use super::brokerstats::{self, BatchSizes, StageWait};
use super::cli::Mode;
use super::procstat::CpuSample;
use crate::db::queries;

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Longest wait for a connection and its welcome.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections opened at once while setting up.
pub(super) const CONNECT_CONCURRENCY: usize = 16;
/// How often the run's progress is looked at.
const POLL: Duration = Duration::from_millis(5);
/// Anomalies kept, per agent, as examples (all are counted).
pub(super) const EXAMPLES: usize = 5;

/// What to run: the workload part of the options (reported as it is, see `WorkloadReport`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Workload {
    pub projects: usize,
    pub agents: usize,
    pub messages: usize,
    pub size: usize,
    pub mode: Mode,
    pub window: usize,
    pub rate: Option<f64>,
    pub connections: usize,
    #[serde(skip)]
    pub settle: Duration,
    pub fault_drop_every: Option<u64>,
}

impl Workload {
    /// The agent that agent `sender`'s message `n` goes to in direct and request modes: the
    /// others of its project, round robin.
    pub fn target(&self, sender: usize, n: usize) -> usize {
        (sender + 1 + n % (self.agents - 1)) % self.agents
    }

    /// How many agents receive one message of the workload (replies have one recipient).
    pub fn recipients_per_message(&self) -> u64 {
        match self.mode {
            Mode::Broadcast => self.agents as u64 - 1,
            Mode::Direct | Mode::Request => 1,
        }
    }

    /// Messages the workload stores when everything goes well (requests and their replies).
    pub fn expected_messages(&self) -> u64 {
        let sends = (self.projects * self.agents * self.messages) as u64;
        match self.mode {
            Mode::Request => 2 * sends,
            _ => sends,
        }
    }

    /// Deliveries the workload makes when everything goes well.
    pub fn expected_deliveries(&self) -> u64 {
        let sends = (self.projects * self.agents * self.messages) as u64;
        match self.mode {
            Mode::Request => 2 * sends,
            _ => sends * self.recipients_per_message(),
        }
    }
}

/// Words the content is made of: prose-like, so that indexes on the content (full-text
/// search) cost what they would cost with real agents' messages.
const WORDS: [&str; 24] = [
    "agent",
    "status",
    "build",
    "passed",
    "reviewing",
    "config",
    "parser",
    "module",
    "tests",
    "failing",
    "retry",
    "deploy",
    "branch",
    "merged",
    "request",
    "changes",
    "found",
    "issue",
    "latency",
    "cache",
    "schema",
    "migration",
    "done",
    "next",
];

/// `size` bytes of text (ASCII, nothing to escape in JSON).
pub fn content(size: usize) -> String {
    let mut text = String::with_capacity(size + 16);
    let mut i = 0;
    while text.len() < size {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(WORDS[(i * 7 + i / WORDS.len()) % WORDS.len()]);
        i += 1;
    }
    text.truncate(size);
    // Content must not end with a space only because it was cut there.
    if text.ends_with(' ') {
        text.pop();
        text.push('.');
    }
    text
}

/// An agent id of the workload: `a0`, `a1`, …
pub fn agent_id(index: usize) -> String {
    format!("a{index}")
}

pub(super) fn parse_agent_id(id: &str) -> Option<usize> {
    id.strip_prefix('a')?.parse().ok()
}

/// The client_msg_id of agent's own message `n`.
pub fn original_cmid(n: usize) -> String {
    format!("o{n}")
}

/// The client_msg_id of the reply to `requester`'s request `n`.
pub fn reply_cmid(requester: usize, n: usize) -> String {
    format!("r{requester}.{n}")
}

/// What a `sent` receipt said (or, in the JetStream run, a publish ack).
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    /// The message's id. Nil in the JetStream run: its acks name a message by its stream
    /// sequence alone.
    pub id: Uuid,
    /// The message's seq in its project (JetStream: its sequence in the run's stream).
    pub seq: i64,
}

/// A reply this agent sent and had acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct ReplyReceipt {
    pub requester: usize,
    pub n: usize,
    pub receipt: Receipt,
}

/// Counters shared by every task of a run (of the JetStream run too).
pub(super) struct Progress {
    pub(super) t0: Instant,
    /// Sends handed to a writer (messages and replies).
    pub(super) issued: AtomicU64,
    /// Sends answered with a receipt or an error.
    pub(super) settled: AtomicU64,
    /// Deliveries owed for the acknowledged messages.
    pub(super) owed: AtomicU64,
    /// Deliveries seen (those the fault injection ignores included).
    pub(super) seen: AtomicU64,
    pub(super) senders_done: AtomicUsize,
    /// When the last receipt and the last delivery arrived (ns since t0).
    pub(super) last_receipt_ns: AtomicU64,
    pub(super) last_delivery_ns: AtomicU64,
}

impl Progress {
    pub(super) fn new() -> Self {
        Progress {
            t0: Instant::now(),
            issued: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            owed: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            senders_done: AtomicUsize::new(0),
            last_receipt_ns: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
        }
    }

    pub(super) fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    pub(super) fn snapshot(&self) -> (u64, u64, u64, usize) {
        (
            self.issued.load(Ordering::SeqCst),
            self.settled.load(Ordering::SeqCst),
            self.seen.load(Ordering::SeqCst),
            self.senders_done.load(Ordering::SeqCst),
        )
    }

    /// Whether every send was answered and every owed delivery seen. The counters are read
    /// in an order that cannot report completion early: a reply is issued before the
    /// delivery that caused it is counted as seen, and a delivery is owed before its
    /// message counts as settled, so reading seen, then settled, then issued, then owed
    /// sees every send and delivery that the seen count depends on.
    pub(super) fn complete(&self, agents: usize) -> bool {
        if self.senders_done.load(Ordering::SeqCst) < agents {
            return false;
        }
        let seen = self.seen.load(Ordering::SeqCst);
        let settled = self.settled.load(Ordering::SeqCst);
        let issued = self.issued.load(Ordering::SeqCst);
        let owed = self.owed.load(Ordering::SeqCst);
        settled == issued && seen >= owed
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Everything one agent saw, for the verifier and the report.
pub struct AgentOutcome {
    pub project: usize,
    pub agent: usize,
    /// Receipts of this agent's messages, by message number.
    pub receipts: Vec<Option<Receipt>>,
    /// Receipts of the replies this agent sent.
    pub reply_receipts: Vec<ReplyReceipt>,
    /// How many times each message of the project was received, by `sender * messages + n`.
    pub received: Vec<u8>,
    /// How many times the reply to each of this agent's requests was received, by `n`.
    pub replies_received: Vec<u8>,
    /// Error frames received (refused sends).
    pub errors: u64,
    pub error_examples: Vec<String>,
    /// Anything that must not happen: a message from another project or from itself, a
    /// misaddressed or unknown message, seqs out of order, the connection closing.
    pub anomalies: u64,
    pub anomaly_examples: Vec<String>,
    /// Deliveries deliberately ignored (--fault-drop-every).
    pub fault_dropped: u64,
    pub receipt_latency: Histogram<u64>,
    pub delivery_latency: Histogram<u64>,
    pub round_trip: Histogram<u64>,
}

impl AgentOutcome {
    pub(super) fn new(project: usize, agent: usize, w: &Workload) -> Self {
        AgentOutcome {
            project,
            agent,
            receipts: vec![None; w.messages],
            reply_receipts: Vec::new(),
            received: vec![0; w.agents * w.messages],
            replies_received: vec![0; w.messages],
            errors: 0,
            error_examples: Vec::new(),
            anomalies: 0,
            anomaly_examples: Vec::new(),
            fault_dropped: 0,
            receipt_latency: histogram(),
            delivery_latency: histogram(),
            round_trip: histogram(),
        }
    }

    pub(super) fn anomaly(&mut self, what: impl FnOnce() -> String) {
        self.anomalies += 1;
        if self.anomaly_examples.len() < EXAMPLES {
            let text = what();
            self.anomaly_examples.push(format!(
                "project {} {}: {text}",
                self.project,
                agent_id(self.agent)
            ));
        }
    }
}

/// The result of driving one run.
pub struct DriveResult {
    pub project_ids: Vec<Uuid>,
    pub agents: Vec<AgentOutcome>,
    /// Messages received by the idle connections (must be none), and how many of them were
    /// closed by the broker.
    pub idle_received: u64,
    pub idle_closed: u64,
    pub issued: u64,
    pub settled: u64,
    /// Seconds from the start to the last receipt, and to the last delivery.
    pub receipts_elapsed: f64,
    pub deliveries_elapsed: f64,
    /// The run ended because nothing happened for the settle time, not because everything
    /// arrived.
    pub stalled: bool,
    /// The broker process exited during the run.
    pub broker_died: bool,
    pub cpu: CpuSample,
    pub wall: f64,
    /// The broker's memory at the end: (RSS, peak RSS) in MiB.
    pub broker_memory: Option<(f64, f64)>,
    /// The broker's persistence batches during the run, if it exposes them.
    pub batch_sizes: Option<BatchSizes>,
    /// How long the run's messages waited at each stage inside the broker, if it exposes it.
    pub waits: Option<BTreeMap<String, StageWait>>,
}

/// The frames the driver reads. Only the fields it needs; the rest (content included) is
/// skipped by the parser.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    seq: Option<i64>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    project_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sender_agent_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    metadata: Option<Meta>,
    code: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Meta {
    /// The message's number, for its sender.
    n: Option<usize>,
    /// When it was sent (or scheduled), ns since the run started.
    t: Option<u64>,
    /// A reply: the number of the request it answers.
    re: Option<usize>,
}

/// Creates the projects of a run in the broker's database.
async fn create_projects(
    database_url: &str,
    label: &str,
    count: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let mut conn = AsyncPgConnection::establish(database_url)
        .await
        .with_context(|| format!("connecting to the broker's database {database_url}"))?;
    let mut ids = Vec::with_capacity(count);
    for p in 0..count {
        let project = queries::create_project(&mut conn, &format!("bench-{label}-{p}"))
            .await
            .context("creating a benchmark project")?;
        ids.push(project.id);
    }
    Ok(ids)
}

/// Opens a connection and reads its welcome.
async fn connect(url: String) -> anyhow::Result<Ws> {
    let attempt = async {
        // Nagle's algorithm off, as agents' libraries do (Node's `ws`, Python's asyncio):
        // with it a small frame can wait for the broker's delayed ACK of the previous one.
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    anyhow::ensure!(
                        text.contains(r#""op":"welcome""#),
                        "the first frame of {url} is not a welcome: {text}"
                    );
                    return Ok(ws);
                }
                Some(Ok(Message::Close(reason))) => {
                    anyhow::bail!("{url} was closed before its welcome: {reason:?}")
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e).with_context(|| format!("reading from {url}")),
                None => anyhow::bail!("{url} ended before its welcome"),
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .with_context(|| format!("no welcome from {url} within {CONNECT_TIMEOUT:?}"))?
}

/// Opens many connections, a few at a time, in order.
async fn connect_all(urls: Vec<String>) -> anyhow::Result<Vec<Ws>> {
    futures_util::stream::iter(urls.into_iter().map(connect))
        .buffered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Drives one run against `target`. `alive` tells whether the broker process still runs.
pub async fn drive(
    target: &BrokerTarget,
    w: &Workload,
    label: &str,
    alive: &mut (dyn FnMut() -> bool + Send),
) -> anyhow::Result<DriveResult> {
    let with_idle = usize::from(w.connections > 0);
    let project_ids = create_projects(&target.database_url, label, w.projects + with_idle).await?;
    let ws_url = |base: &str, project: Uuid, agent: &str| {
        format!("{base}/ws/agent/messages/{project}?agent_id={agent}&agent_type=bench")
    };
    let mut urls = Vec::new();
    for &project in &project_ids[..w.projects] {
        for a in 0..w.agents {
            let base = target.ws_base_for(urls.len());
            urls.push(ws_url(base, project, &agent_id(a)));
        }
    }
    let agent_sockets = connect_all(urls).await?;
    let idle_sockets = if w.connections > 0 {
        let idle_project = project_ids[w.projects];
        connect_all(
            (0..w.connections)
                .map(|i| ws_url(target.ws_base_for(i), idle_project, &format!("idle-{i}")))
                .collect(),
        )
        .await?
    } else {
        Vec::new()
    };
    log::info!(
        "{label}: {} agents and {} idle connections ready",
        agent_sockets.len(),
        idle_sockets.len()
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut idle_tasks = Vec::new();
    for ws in idle_sockets {
        idle_tasks.push(tokio::spawn(idle_connection(ws, stop_rx.clone())));
    }

    let batches_before = brokerstats::read(&target.ws_base).await;
    let waits_before = brokerstats::read_waits(&target.ws_base).await;
    let cpu_before = CpuSample::take(target.pid);
    let progress = Arc::new(Progress::new());
    let content: Arc<str> = content(w.size).into();
    let w = Arc::new(w.clone());
    let total_agents = w.projects * w.agents;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut writers = Vec::new();
    let mut writer_inputs = Vec::new();
    for (index, ws) in agent_sockets.into_iter().enumerate() {
        let (project, agent) = (index / w.agents, index % w.agents);
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        writers.push(tokio::spawn(writer(sink, rx)));
        let ctx = AgentCtx {
            project,
            agent,
            global: index,
            total_agents,
            project_id: project_ids[project].to_string(),
            w: w.clone(),
            progress: progress.clone(),
            window: Arc::new(Semaphore::new(w.window)),
            sent_at: Arc::new((0..w.messages).map(|_| AtomicU64::new(0)).collect()),
            content: content.clone(),
            out: tx.clone(),
        };
        writer_inputs.push(tx);
        receivers.push(tokio::spawn(receive(ctx.clone(), stream, stop_rx.clone())));
        senders.push(tokio::spawn(send(ctx)));
    }

    let (stalled, broker_died) = wait_until_done(&progress, total_agents, w.settle, alive).await;
    let wall = progress.t0.elapsed().as_secs_f64();
    let cpu_after = CpuSample::take(target.pid);
    let broker_memory = target.pid.and_then(super::procstat::memory_mib);
    let batch_sizes = match (batches_before, brokerstats::read(&target.ws_base).await) {
        (Some(before), Some(after)) => BatchSizes::between(&before, &after),
        _ => None,
    };
    let waits = match (waits_before, brokerstats::read_waits(&target.ws_base).await) {
        (Some(before), Some(after)) => Some(brokerstats::waits_between(&before, &after)),
        _ => None,
    };

    let _ = stop_tx.send(true);
    for sender in &senders {
        sender.abort();
    }
    let mut agents = Vec::with_capacity(receivers.len());
    for receiver in receivers {
        agents.push(receiver.await.context("an agent's receiver failed")?);
    }
    // Close every connection politely, then stop whatever is left.
    for tx in writer_inputs {
        let _ = tx.send(Message::Close(None));
    }
    for writer in writers {
        if tokio::time::timeout(Duration::from_secs(2), writer)
            .await
            .is_err()
        {
            log::debug!("a writer did not finish in time");
        }
    }
    let (mut idle_received, mut idle_closed) = (0, 0);
    for task in idle_tasks {
        let (received, closed) = task.await.unwrap_or((0, true));
        idle_received += received;
        idle_closed += u64::from(closed);
    }

    let ns = |v: &AtomicU64| v.load(Ordering::SeqCst) as f64 / 1e9;
    Ok(DriveResult {
        project_ids: project_ids[..w.projects].to_vec(),
        agents,
        idle_received,
        idle_closed,
        issued: progress.issued.load(Ordering::SeqCst),
        settled: progress.settled.load(Ordering::SeqCst),
        receipts_elapsed: ns(&progress.last_receipt_ns),
        deliveries_elapsed: ns(&progress.last_delivery_ns),
        stalled,
        broker_died,
        cpu: cpu_before.until(&cpu_after),
        wall,
        broker_memory,
        batch_sizes,
        waits,
    })
}

/// Waits until everything arrived, or nothing happened for `settle`, or the broker died.
/// Returns (stalled, broker died).
pub(super) async fn wait_until_done(
    progress: &Progress,
    agents: usize,
    settle: Duration,
    alive: &mut (dyn FnMut() -> bool + Send),
) -> (bool, bool) {
    let mut last = progress.snapshot();
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        if progress.complete(agents) {
            return (false, false);
        }
        let now = progress.snapshot();
        if !alive() {
            return (false, true);
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= settle {
            return (true, false);
        }
    }
}

/// What an agent's tasks share.
#[derive(Clone)]
struct AgentCtx {
    project: usize,
    agent: usize,
    /// Index among all agents of the run (for spreading the rate).
    global: usize,
    total_agents: usize,
    /// The project's id as it appears in frames.
    project_id: String,
    w: Arc<Workload>,
    progress: Arc<Progress>,
    /// Sends (in request mode: requests) that may still be waiting for their answer.
    window: Arc<Semaphore>,
    /// When each of this agent's messages was sent (or scheduled), ns since t0.
    sent_at: Arc<Vec<AtomicU64>>,
    content: Arc<str>,
    out: mpsc::UnboundedSender<Message>,
}

/// Writes frames to the socket in the order they are queued, flushing once per burst.
async fn writer(mut sink: SplitSink<Ws, Message>, mut frames: mpsc::UnboundedReceiver<Message>) {
    while let Some(frame) = frames.recv().await {
        let closing = matches!(frame, Message::Close(_));
        if sink.feed(frame).await.is_err() {
            return;
        }
        if !closing {
            while let Ok(frame) = frames.try_recv() {
                let closing = matches!(frame, Message::Close(_));
                if sink.feed(frame).await.is_err() {
                    return;
                }
                if closing {
                    break;
                }
            }
        }
        if sink.flush().await.is_err() || closing {
            return;
        }
    }
}

/// Message type of the workload's messages, and of the replies of request mode. Plain
/// direct messages: the workload does not use the broker's own request/reply feature.
const MESSAGE_TYPE: &str = "bench";
const REPLY_TYPE: &str = "bench-reply";

/// A send frame. `to` is the recipient's agent id for direct messages.
fn send_frame(
    message_type: &str,
    content: &str,
    meta: &str,
    to: Option<&str>,
    client_msg_id: &str,
) -> String {
    let to = to.map(|t| format!(r#","to":"{t}""#)).unwrap_or_default();
    format!(
        r#"{{"type":"{message_type}","content":"{content}","metadata":{{{meta}}}{to},"client_msg_id":"{client_msg_id}"}}"#
    )
}

/// The frame of an agent's message `n` sent at `t`, to `to` (direct) or to all.
pub fn original_frame(content: &str, n: usize, t: u64, to: Option<usize>) -> String {
    send_frame(
        MESSAGE_TYPE,
        content,
        &format!(r#""n":{n},"t":{t}"#),
        to.map(agent_id).as_deref(),
        &original_cmid(n),
    )
}

/// The frame of the reply to `requester`'s request `n`, which was sent at `t`.
pub fn reply_frame(content: &str, requester: usize, n: usize, t: u64) -> String {
    send_frame(
        REPLY_TYPE,
        content,
        &format!(r#""re":{n},"t":{t}"#),
        Some(&agent_id(requester)),
        &reply_cmid(requester, n),
    )
}

/// Sends the agent's messages: as fast as its window allows, or on the rate's schedule.
async fn send(ctx: AgentCtx) {
    let w = &ctx.w;
    let p = &ctx.progress;
    // Each agent sends every `interval`, the agents' schedules offset so that the total is
    // evenly spread.
    let schedule = w.rate.map(|rate| {
        let interval = ctx.total_agents as f64 / rate;
        let offset = ctx.global as f64 / rate;
        (interval, offset)
    });
    for n in 0..w.messages {
        let origin = match schedule {
            Some((interval, offset)) => {
                let at = Duration::from_secs_f64(offset + n as f64 * interval);
                tokio::time::sleep_until((p.t0 + at).into()).await;
                Some(at.as_nanos() as u64)
            }
            None => None,
        };
        match ctx.window.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return,
        }
        let t = origin.unwrap_or_else(|| p.now_ns());
        ctx.sent_at[n].store(t, Ordering::SeqCst);
        let to = match w.mode {
            Mode::Broadcast => None,
            Mode::Direct | Mode::Request => Some(w.target(ctx.agent, n)),
        };
        let frame = original_frame(&ctx.content, n, t, to);
        p.issued.fetch_add(1, Ordering::SeqCst);
        if ctx.out.send(Message::text(frame)).is_err() {
            return;
        }
    }
    p.senders_done.fetch_add(1, Ordering::SeqCst);
}

/// Reads everything that arrives for the agent until told to stop.
async fn receive(
    ctx: AgentCtx,
    mut stream: SplitStream<Ws>,
    mut stop: watch::Receiver<bool>,
) -> AgentOutcome {
    let mut out = AgentOutcome::new(ctx.project, ctx.agent, &ctx.w);
    let mut state = ReceiveState {
        last_seq: 0,
        deliveries: 0,
        reply_sent_at: if ctx.w.mode == Mode::Request {
            vec![0; ctx.w.agents * ctx.w.messages]
        } else {
            Vec::new()
        },
        own_id: agent_id(ctx.agent),
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => on_text(&ctx, &mut out, &mut state, text.as_str()),
                Some(Ok(Message::Close(reason))) => {
                    out.anomaly(|| format!("the broker closed the connection: {reason:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    out.anomaly(|| format!("the connection failed: {e}"));
                    break;
                }
                None => {
                    out.anomaly(|| "the connection ended".to_owned());
                    break;
                }
            },
        }
    }
    out
}

struct ReceiveState {
    last_seq: i64,
    /// Deliveries received so far (for --fault-drop-every).
    deliveries: u64,
    /// When each reply this agent sent was sent, by `requester * messages + n`.
    reply_sent_at: Vec<u64>,
    own_id: String,
}

pub(super) fn micros(ns: u64) -> u64 {
    (ns / 1_000).max(1)
}

fn on_text(ctx: &AgentCtx, out: &mut AgentOutcome, state: &mut ReceiveState, text: &str) {
    let p = &ctx.progress;
    let w = &ctx.w;
    let now = p.now_ns();
    let frame: Frame = match serde_json::from_str(text) {
        Ok(frame) => frame,
        Err(e) => {
            return out.anomaly(|| format!("unreadable frame ({e}): {text:.200}"));
        }
    };
    match frame.op.as_ref() {
        "sent" => on_receipt(ctx, out, state, &frame, now),
        "error" => {
            p.settled.fetch_add(1, Ordering::SeqCst);
            out.errors += 1;
            if out.error_examples.len() < EXAMPLES {
                out.error_examples.push(format!(
                    "project {} {}: send {} refused: {}: {}",
                    ctx.project,
                    state.own_id,
                    frame.client_msg_id.as_deref().unwrap_or("?"),
                    frame.code.as_deref().unwrap_or("?"),
                    frame.error.as_deref().unwrap_or("")
                ));
            }
            // A refused message of ours frees its place in the window.
            if frame
                .client_msg_id
                .as_deref()
                .is_some_and(|c| c.starts_with('o'))
            {
                ctx.window.add_permits(1);
            }
        }
        "message" => {
            state.deliveries += 1;
            if w.fault_drop_every
                .is_some_and(|every| state.deliveries.is_multiple_of(every))
            {
                // Deliberately ignored: the verifier must notice.
                out.fault_dropped += 1;
                p.seen.fetch_add(1, Ordering::SeqCst);
                return;
            }
            on_delivery(ctx, out, state, &frame, now, text);
            p.last_delivery_ns.fetch_max(now, Ordering::SeqCst);
            p.seen.fetch_add(1, Ordering::SeqCst);
        }
        other => out.anomaly(|| format!("unexpected {other:?} frame: {text:.200}")),
    }
}

fn on_receipt(
    ctx: &AgentCtx,
    out: &mut AgentOutcome,
    state: &mut ReceiveState,
    frame: &Frame,
    now: u64,
) {
    let p = &ctx.progress;
    let w = &ctx.w;
    let receipt = match (
        frame.id.as_deref().and_then(|id| Uuid::parse_str(id).ok()),
        frame.seq,
    ) {
        (Some(id), Some(seq)) => Receipt { id, seq },
        _ => {
            p.settled.fetch_add(1, Ordering::SeqCst);
            return out.anomaly(|| "a receipt without id or seq".to_owned());
        }
    };
    let cmid = frame.client_msg_id.as_deref().unwrap_or("");
    if let Some(n) = cmid
        .strip_prefix('o')
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n < w.messages)
    {
        if out.receipts[n].replace(receipt).is_some() {
            out.anomaly(|| format!("a second receipt for message {n}"));
        }
        let sent = ctx.sent_at[n].load(Ordering::SeqCst);
        out.receipt_latency
            .saturating_record(micros(now.saturating_sub(sent)));
        p.owed
            .fetch_add(w.recipients_per_message(), Ordering::SeqCst);
        if w.mode != Mode::Request {
            ctx.window.add_permits(1);
        }
    } else if let Some((requester, n)) = cmid
        .strip_prefix('r')
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(r, n)| Some((r.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
        .filter(|&(r, n)| r < w.agents && n < w.messages)
    {
        let sent = state.reply_sent_at[requester * w.messages + n];
        out.receipt_latency
            .saturating_record(micros(now.saturating_sub(sent)));
        out.reply_receipts.push(ReplyReceipt {
            requester,
            n,
            receipt,
        });
        p.owed.fetch_add(1, Ordering::SeqCst);
    } else {
        out.anomaly(|| format!("a receipt for an unknown send {cmid:?}"));
    }
    p.last_receipt_ns.fetch_max(now, Ordering::SeqCst);
    p.settled.fetch_add(1, Ordering::SeqCst);
}

fn on_delivery(
    ctx: &AgentCtx,
    out: &mut AgentOutcome,
    state: &mut ReceiveState,
    frame: &Frame,
    now: u64,
    text: &str,
) {
    let w = &ctx.w;
    let p = &ctx.progress;
    if frame.project_id.as_deref() != Some(ctx.project_id.as_str()) {
        return out.anomaly(|| format!("a message of another project: {text:.200}"));
    }
    let Some(sender) = frame
        .sender_agent_id
        .as_deref()
        .and_then(parse_agent_id)
        .filter(|&s| s < w.agents)
    else {
        return out.anomaly(|| format!("a message from an unknown sender: {text:.200}"));
    };
    if sender == ctx.agent {
        return out.anomaly(|| format!("its own message was delivered to it: {text:.200}"));
    }
    let seq = frame.seq.unwrap_or(0);
    if seq <= state.last_seq {
        out.anomaly(|| format!("seq {seq} arrived after seq {}", state.last_seq));
    }
    state.last_seq = state.last_seq.max(seq);
    let (Some(n), Some(t)) = (
        frame
            .metadata
            .as_ref()
            .and_then(|m| m.n.or(m.re))
            .filter(|&n| n < w.messages),
        frame.metadata.as_ref().and_then(|m| m.t),
    ) else {
        return out.anomaly(|| format!("a message without its bench metadata: {text:.200}"));
    };
    let is_reply = frame.metadata.as_ref().is_some_and(|m| m.re.is_some());
    let to = frame.to.as_deref();
    if is_reply {
        // A reply to our request n comes from the agent the request went to.
        if to != Some(state.own_id.as_str()) || w.target(ctx.agent, n) != sender {
            return out.anomaly(|| format!("a misaddressed reply: {text:.200}"));
        }
        let count = &mut out.replies_received[n];
        *count = count.saturating_add(1);
        if *count == 1 {
            out.round_trip
                .saturating_record(micros(now.saturating_sub(t)));
            ctx.window.add_permits(1);
        }
        out.delivery_latency
            .saturating_record(micros(now.saturating_sub(t)));
        return;
    }
    let addressed_right = match w.mode {
        Mode::Broadcast => to.is_none(),
        Mode::Direct | Mode::Request => {
            to == Some(state.own_id.as_str()) && w.target(sender, n) == ctx.agent
        }
    };
    if !addressed_right {
        return out.anomaly(|| format!("a misaddressed message: {text:.200}"));
    }
    let count = &mut out.received[sender * w.messages + n];
    *count = count.saturating_add(1);
    out.delivery_latency
        .saturating_record(micros(now.saturating_sub(t)));
    if w.mode == Mode::Request && *count == 1 {
        // Answer at once, carrying the request's send time so the requester gets the
        // round trip.
        let frame = reply_frame(&ctx.content, sender, n, t);
        state.reply_sent_at[sender * w.messages + n] = p.now_ns();
        p.issued.fetch_add(1, Ordering::SeqCst);
        let _ = ctx.out.send(Message::text(frame));
    }
}

/// An idle connection: reads (so pings are answered) and counts anything it is sent.
/// Returns (messages received, closed by the broker).
async fn idle_connection(mut ws: Ws, mut stop: watch::Receiver<bool>) -> (u64, bool) {
    let mut received = 0;
    let closed = loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break false,
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(_))) => received += 1,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break true,
                Some(Ok(_)) => {}
            },
        }
    };
    if !closed {
        let _ = ws.close(None).await;
    }
    (received, closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(agents: usize) -> Workload {
        Workload {
            projects: 1,
            agents,
            messages: 10,
            size: 1,
            mode: Mode::Direct,
            window: 1,
            rate: None,
            connections: 0,
            settle: Duration::from_secs(1),
            fault_drop_every: None,
        }
    }

    #[test]
    fn direct_targets_go_round_robin_to_the_others() {
        let w = workload(3);
        let targets: Vec<usize> = (0..4).map(|n| w.target(0, n)).collect();
        assert_eq!(targets, vec![1, 2, 1, 2]);
        assert!((0..3).all(|s| (0..10).all(|n| w.target(s, n) != s)));
    }

    #[test]
    fn frames_are_valid_json() {
        let frame = send_frame("bench", "xx", r#""n":1,"t":2"#, Some("a1"), "o1");
        let value: serde_json::Value = serde_json::from_str(&frame).expect("JSON");
        assert_eq!(value["to"], "a1");
        assert_eq!(value["metadata"]["t"], 2);
        assert_eq!(parse_agent_id("a12"), Some(12));
        for size in [1, 5, 6, 200, 1000] {
            assert_eq!(content(size).len(), size);
        }
    }
}
