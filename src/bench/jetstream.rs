//! The NATS JetStream run of `agentbus bench --jetstream`: the broadcast workload of the
//! other runs, against NATS JetStream, measured and verified the same way, so that the broker
//! can be compared with a durable broker built for throughput in one command.
//!
//! How the workload maps onto JetStream:
//!
//! - One stream per run, `AGENTBUS_BENCH_<label>`: file storage, one replica, subjects
//!   `agentbus-bench.<label>.>`. Agent `a` of project `p` publishes on
//!   `agentbus-bench.<label>.p<p>.a<a>`.
//! - Every agent has a connection of its own (as every agent has its own WebSocket). It
//!   publishes with asynchronous publish acks, at most `--window` unacknowledged (or on the
//!   `--rate` schedule), and consumes its project (`agentbus-bench.<label>.p<p>.*`) with an
//!   ordered push consumer. JetStream has no "everyone but the sender": the agent's own
//!   messages reach it too and are skipped, so deliveries are messages × (agents − 1), as in
//!   agentbus broadcast.
//! - The payload is the same `--size` bytes of content. The message's number and send time
//!   travel in headers (`Bench-N`, `Bench-T`), as they travel in the metadata of agentbus
//!   messages; `Nats-Msg-Id` is set, so the stream deduplicates retries as agentbus does on
//!   `client_msg_id`.
//! - A publish ack means the message is in the stream's file store. nats-server does not
//!   fsync each message (it syncs its files periodically), whereas an agentbus receipt
//!   follows a PostgreSQL COMMIT: the comparison is against a broker that promises less.
//!
//! Verification is the broker runs' (see [`verify`]): every acknowledged message delivered
//! exactly once to each other agent of its project, in stream order, nothing from another
//! project; then the stream is read back, as the broker runs read PostgreSQL back: every
//! acknowledged message is there with the sequence its ack gave, and nothing else.
//!
//! The NATS server is one this run starts (`nats-server -js` on a free port of 127.0.0.1, a
//! fresh store directory, killed and deleted afterwards), or one given by URL, on which the
//! run's stream is deleted afterwards.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::push::{Ordered, OrderedConfig};
use async_nats::jetstream::context::{Context, ContextBuilder, PublishAckFuture, PublishError};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::{Client, HeaderValue};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::cli::Mode;
use super::driver::{
    agent_id, content, micros, wait_until_done, AgentOutcome, DriveResult, Progress, Receipt,
    Workload, CONNECT_CONCURRENCY, CONNECT_TIMEOUT, EXAMPLES,
};
use super::procstat::{self, CpuSample};
use super::report::RunReport;
use super::verify::{self, StoreFindings, Verification};

/// The run's name in the report.
pub const RUN_NAME: &str = "jetstream";
/// How long a spawned nats-server may take to report its port.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a publish waits for its ack, and an API request for its answer. Longer than any
/// sane --settle-ms: a run that stalls is ended by the settle time, not by this.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of a spawned nats-server's log kept to explain a failure.
const LOG_TAIL: usize = 20;
/// Where Debian's `nats-server` package installs the server, which is not on every user's
/// PATH.
const DEBIAN_NATS_SERVER: &str = "/usr/sbin/nats-server";
/// The headers that carry a message's number and send time.
const HEADER_N: &str = "Bench-N";
const HEADER_T: &str = "Bench-T";

/// Where the JetStream run's server is.
pub enum NatsTarget {
    /// Start one (`--jetstream` without a URL).
    Spawn,
    /// A running server with JetStream, e.g. `nats://127.0.0.1:4222`.
    Url(String),
}

/// A `nats-server -js` this benchmark started, with its own store directory. Killed, and
/// its directory deleted, when dropped.
pub struct NatsServer {
    child: Child,
    dir: PathBuf,
    url: String,
    version: String,
}

/// The nats-server executable: on PATH, else where Debian puts it.
fn find_nats_server() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let debian = PathBuf::from(DEBIAN_NATS_SERVER);
        debian.is_file().then_some(debian)
    })
}

impl NatsServer {
    /// Starts `nats-server -js` on a free port of 127.0.0.1 with a fresh store directory and
    /// waits for the ports file that names its port (`-p -1` picks a free port;
    /// `--ports_file_dir` is how nats-server 2.9 tells which).
    pub fn start() -> anyhow::Result<NatsServer> {
        let exe = find_nats_server().context(
            "nats-server is not installed (not on PATH, nor at /usr/sbin/nats-server), and \
             --jetstream without a URL starts one: install it (Debian: apt-get install \
             nats-server) or give the URL of a running server with JetStream, e.g. \
             --jetstream nats://127.0.0.1:4222",
        )?;
        let version = Command::new(&exe)
            .arg("--version")
            .output()
            .ok()
            .map(|o| {
                // "nats-server: v2.9.10"
                let out = String::from_utf8_lossy(&o.stdout);
                let out = out.trim();
                out.strip_prefix("nats-server: ").unwrap_or(out).to_owned()
            })
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "agentbus-bench-nats-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(dir.join("store"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("nats-server.log"))
            .with_context(|| format!("creating the nats-server log in {}", dir.display()))?;
        let spawned = Command::new(&exe)
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
            .arg(dir.join("store"))
            .arg("--ports_file_dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("the nats-server log")?)
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).with_context(|| format!("starting {}", exe.display()));
            }
        };
        let mut server = NatsServer {
            child,
            dir,
            url: String::new(),
            version,
        };
        let started = Instant::now();
        loop {
            if let Some(url) = server.url_from_ports_file() {
                server.url = url;
                return Ok(server);
            }
            if !server.is_running() {
                anyhow::bail!(
                    "nats-server exited before it listened; its log ends with:\n{}",
                    server.log_tail()
                );
            }
            if started.elapsed() >= START_TIMEOUT {
                anyhow::bail!(
                    "nats-server did not report its port within {START_TIMEOUT:?}; its log ends with:\n{}",
                    server.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client URL in the ports file (`nats-server_<pid>.ports`, JSON
    /// `{"nats":["nats://127.0.0.1:PORT"]}`), once it is written in full.
    fn url_from_ports_file(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Ports {
            nats: Vec<String>,
        }
        let entries = std::fs::read_dir(&self.dir).ok()?;
        let path = entries
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "ports"))?;
        let ports: Ports = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        ports.nats.into_iter().next()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines nats-server logged.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("nats-server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            log::warn!("deleting {}: {e}", self.dir.display());
        }
    }
}

/// The run's names: its stream, the subjects of its projects and agents.
struct Names {
    label: String,
}

impl Names {
    fn stream(&self) -> String {
        format!("AGENTBUS_BENCH_{}", self.label)
    }

    fn prefix(&self) -> String {
        format!("agentbus-bench.{}.", self.label)
    }

    fn project_filter(&self, project: usize) -> String {
        format!("{}p{project}.*", self.prefix())
    }

    fn agent_subject(&self, project: usize, agent: usize) -> String {
        format!("{}p{project}.{}", self.prefix(), agent_id(agent))
    }

    /// (project, agent) of a subject of this run.
    fn parse(&self, subject: &str) -> Option<(usize, usize)> {
        let rest = subject.strip_prefix(&self.prefix())?.strip_prefix('p')?;
        let (project, agent) = rest.split_once('.')?;
        Some((project.parse().ok()?, super::driver::parse_agent_id(agent)?))
    }
}

/// Runs the workload against JetStream and verifies it. Returns the run's report and a
/// description of the server for the report's target.
pub async fn run(target: &NatsTarget, w: &Workload) -> anyhow::Result<(RunReport, String)> {
    anyhow::ensure!(
        w.mode == Mode::Broadcast && w.connections == 0,
        "the JetStream run measures the broadcast workload only, without --connections"
    );
    let (mut spawned, url, described) = match target {
        NatsTarget::Spawn => {
            let server = tokio::task::spawn_blocking(NatsServer::start).await??;
            let url = server.url.clone();
            let described = format!(
                "JetStream (nats-server {}) spawned on {url}",
                server.version
            );
            (Some(server), url, described)
        }
        NatsTarget::Url(url) => (None, url.clone(), format!("JetStream on {url}")),
    };
    log::info!("{RUN_NAME}: {described}");
    let names = Arc::new(Names {
        label: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
    });
    let admin = connect(&url, "agentbus-bench admin").await?;
    let js = context(admin.clone(), w);
    js.create_stream(StreamConfig {
        name: names.stream(),
        subjects: vec![format!("{}>", names.prefix())],
        storage: StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating the stream {} on {url}", names.stream()))?;

    let result = async {
        let pid = spawned.as_ref().map(NatsServer::pid);
        let run = {
            let mut alive = || spawned.as_mut().is_none_or(NatsServer::is_running);
            drive(&url, w, &names, pid, &mut alive).await?
        };
        let verification = verify_stream(&admin, &js, &names, w, &run).await?;
        let mut report = RunReport::from_drive(RUN_NAME, None, &run, verification);
        report.kind = "jetstream";
        if run.broker_died {
            if let Some(server) = &spawned {
                report.verification.failures.push(format!(
                    "nats-server's log ends with:\n{}",
                    server.log_tail()
                ));
            }
        }
        Ok::<_, anyhow::Error>(report)
    }
    .await;
    if spawned.is_none() {
        // A server that outlives the run keeps nothing of it.
        if let Err(e) = js.delete_stream(names.stream()).await {
            log::warn!("deleting the stream {} on {url}: {e}", names.stream());
        }
    }
    drop(admin);
    drop(spawned);
    result.map(|report| (report, described))
}

async fn connect(url: &str, name: &str) -> anyhow::Result<Client> {
    let connecting = async_nats::ConnectOptions::new().name(name).connect(url);
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .with_context(|| format!("no connection to {url} within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// A JetStream context whose in-flight acks are bounded by the window (ours is the bound
/// that matters; this one only must never be lower).
fn context(client: Client, w: &Workload) -> Context {
    ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .max_ack_inflight(w.window.max(1))
        .backpressure_on_inflight(true)
        .build(client)
}

/// An agent, connected and subscribed before the clock starts.
struct Agent {
    client: Client,
    js: Context,
    messages: Ordered,
}

async fn set_up_agent(
    url: String,
    names: Arc<Names>,
    w: Arc<Workload>,
    index: usize,
) -> anyhow::Result<Agent> {
    let (project, agent) = (index / w.agents, index % w.agents);
    let client = connect(
        &url,
        &format!("agentbus-bench p{project} {}", agent_id(agent)),
    )
    .await?;
    let js = context(client.clone(), &w);
    let consumer = js
        .create_consumer_on_stream(
            OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: names.project_filter(project),
                ..Default::default()
            },
            names.stream(),
        )
        .await
        .with_context(|| format!("creating the consumer of project {project}"))?;
    let messages = consumer
        .messages()
        .await
        .context("subscribing to an ordered consumer")?;
    Ok(Agent {
        client,
        js,
        messages,
    })
}

/// What an agent's tasks share.
struct AgentCtx {
    project: usize,
    agent: usize,
    /// Index among all agents of the run (for spreading the rate).
    global: usize,
    total_agents: usize,
    w: Arc<Workload>,
    names: Arc<Names>,
    progress: Arc<Progress>,
}

/// Drives the workload: every agent publishes and consumes until everything arrived, or
/// nothing happened for the settle time, or the server died.
async fn drive(
    url: &str,
    w: &Workload,
    names: &Arc<Names>,
    pid: Option<u32>,
    alive: &mut (dyn FnMut() -> bool + Send),
) -> anyhow::Result<DriveResult> {
    let shared = Arc::new(w.clone());
    let total_agents = w.projects * w.agents;
    let agents: Vec<Agent> = futures_util::stream::iter(
        (0..total_agents).map(|i| set_up_agent(url.to_owned(), names.clone(), shared.clone(), i)),
    )
    .buffered(CONNECT_CONCURRENCY)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<anyhow::Result<_>>()?;
    log::info!("{RUN_NAME}: {total_agents} agents ready");

    let cpu_before = CpuSample::take(pid);
    let progress = Arc::new(Progress::new());
    let template = PublishMessage::build().payload(content(w.size).into());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut publishers = Vec::new();
    let mut consumers = Vec::new();
    let mut clients = Vec::new();
    for (index, agent) in agents.into_iter().enumerate() {
        let ctx = Arc::new(AgentCtx {
            project: index / w.agents,
            agent: index % w.agents,
            global: index,
            total_agents,
            w: shared.clone(),
            names: names.clone(),
            progress: progress.clone(),
        });
        consumers.push(tokio::spawn(consume(
            ctx.clone(),
            agent.messages,
            stop_rx.clone(),
        )));
        publishers.push(tokio::spawn(publish(
            ctx,
            agent.js,
            template.clone(),
            stop_rx.clone(),
        )));
        clients.push(agent.client);
    }

    let (stalled, broker_died) = wait_until_done(&progress, total_agents, w.settle, alive).await;
    let wall = progress.t0.elapsed().as_secs_f64();
    let cpu_after = CpuSample::take(pid);
    let broker_memory = pid.and_then(procstat::memory_mib);

    let _ = stop_tx.send(true);
    let mut outcomes = Vec::with_capacity(total_agents);
    for (publisher, consumer) in publishers.into_iter().zip(consumers) {
        let sent = publisher.await.context("an agent's publisher failed")?;
        let received = consumer.await.context("an agent's consumer failed")?;
        outcomes.push(merge(sent, received));
    }
    drop(clients);

    let ns = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::SeqCst) as f64 / 1e9;
    Ok(DriveResult {
        // JetStream projects are subjects, not rows.
        project_ids: Vec::new(),
        agents: outcomes,
        idle_received: 0,
        idle_closed: 0,
        issued: progress.issued.load(Ordering::SeqCst),
        settled: progress.settled.load(Ordering::SeqCst),
        receipts_elapsed: ns(&progress.last_receipt_ns),
        deliveries_elapsed: ns(&progress.last_delivery_ns),
        stalled,
        broker_died,
        cpu: cpu_before.until(&cpu_after),
        wall,
        broker_memory,
        batch_sizes: None,
        waits: None,
    })
}

/// One agent's outcome from what its publisher (acks) and its consumer (deliveries) saw.
fn merge(sent: AgentOutcome, mut received: AgentOutcome) -> AgentOutcome {
    received.receipts = sent.receipts;
    received.receipt_latency = sent.receipt_latency;
    received.errors = sent.errors;
    received.error_examples = sent.error_examples;
    received.anomalies += sent.anomalies;
    received.anomaly_examples.extend(sent.anomaly_examples);
    received.anomaly_examples.truncate(EXAMPLES);
    received
}

/// When message `n` is due on the rate's schedule (ns since t0), once it is; `None` at once
/// in open loop.
async fn due(schedule: Option<(f64, f64)>, n: usize, t0: Instant) -> Option<u64> {
    let (interval, offset) = schedule?;
    let at = Duration::from_secs_f64(offset + n as f64 * interval);
    tokio::time::sleep_until((t0 + at).into()).await;
    Some(at.as_nanos() as u64)
}

/// Publishes the agent's messages, at most `--window` waiting for their ack, and records the
/// acks, until all are acknowledged or it is told to stop.
async fn publish(
    ctx: Arc<AgentCtx>,
    js: Context,
    template: PublishMessage,
    mut stop: watch::Receiver<bool>,
) -> AgentOutcome {
    let (w, p) = (&ctx.w, &ctx.progress);
    let mut out = AgentOutcome::new(ctx.project, ctx.agent, w);
    // The same schedule as the WebSocket agents': every `interval`, offset per agent.
    let schedule = w
        .rate
        .map(|rate| (ctx.total_agents as f64 / rate, ctx.global as f64 / rate));
    let subject = ctx.names.agent_subject(ctx.project, ctx.agent);
    let mut sent_at = vec![0u64; w.messages];
    let mut in_flight = FuturesUnordered::new();
    let mut n = 0;
    loop {
        if n == w.messages && in_flight.is_empty() {
            break;
        }
        let may_send = n < w.messages && in_flight.len() < w.window;
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some((done, ack)) = in_flight.next(), if !in_flight.is_empty() => {
                on_ack(&ctx, &mut out, done, sent_at[done], ack);
            }
            origin = due(schedule, n, p.t0), if may_send => {
                let t = origin.unwrap_or_else(|| p.now_ns());
                sent_at[n] = t;
                let message = template
                    .clone()
                    .message_id(format!("p{}.{}.o{n}", ctx.project, agent_id(ctx.agent)))
                    .header(HEADER_N, HeaderValue::from(n as u64))
                    .header(HEADER_T, HeaderValue::from(t));
                p.issued.fetch_add(1, Ordering::SeqCst);
                match js.send_publish(subject.clone(), message).await {
                    Ok(ack) => {
                        let number = n;
                        in_flight.push(async move { (number, awaited(ack).await) });
                    }
                    Err(e) => on_ack(&ctx, &mut out, n, t, Err(e)),
                }
                n += 1;
                if n == w.messages {
                    p.senders_done.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
    out
}

async fn awaited(ack: PublishAckFuture) -> Result<PublishAck, PublishError> {
    ack.await
}

/// Records the ack (or the failure) of message `n`, sent at `sent`.
fn on_ack(
    ctx: &AgentCtx,
    out: &mut AgentOutcome,
    n: usize,
    sent: u64,
    ack: Result<PublishAck, PublishError>,
) {
    let p = &ctx.progress;
    let now = p.now_ns();
    match ack {
        Ok(ack) => {
            if ack.duplicate {
                out.anomaly(|| format!("message {n} was acknowledged as a duplicate"));
            }
            let receipt = Receipt {
                id: uuid::Uuid::nil(),
                seq: i64::try_from(ack.sequence).unwrap_or(i64::MAX),
            };
            if out.receipts[n].replace(receipt).is_some() {
                out.anomaly(|| format!("a second ack for message {n}"));
            }
            out.receipt_latency
                .saturating_record(micros(now.saturating_sub(sent)));
            p.owed
                .fetch_add(ctx.w.recipients_per_message(), Ordering::SeqCst);
            p.last_receipt_ns.fetch_max(now, Ordering::SeqCst);
        }
        Err(e) => {
            out.errors += 1;
            if out.error_examples.len() < EXAMPLES {
                out.error_examples.push(format!(
                    "project {} {}: publish of message {n} failed: {e}",
                    ctx.project,
                    agent_id(ctx.agent)
                ));
            }
        }
    }
    p.settled.fetch_add(1, Ordering::SeqCst);
}

/// Reads the agent's project from its ordered consumer until told to stop.
async fn consume(
    ctx: Arc<AgentCtx>,
    mut messages: Ordered,
    mut stop: watch::Receiver<bool>,
) -> AgentOutcome {
    let mut out = AgentOutcome::new(ctx.project, ctx.agent, &ctx.w);
    let mut last_seq = 0;
    let mut deliveries = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            next = messages.next() => match next {
                Some(Ok(message)) => {
                    on_message(&ctx, &mut out, &mut last_seq, &mut deliveries, &message);
                }
                // The ordered consumer recreates itself after these (a missed heartbeat, a
                // gap): what it then delivers is still checked for order and exactly once.
                Some(Err(e)) => log::warn!(
                    "{RUN_NAME}: project {} {}: ordered consumer: {e}",
                    ctx.project,
                    agent_id(ctx.agent)
                ),
                None => {
                    out.anomaly(|| "the consumer ended".to_owned());
                    break;
                }
            },
        }
    }
    out
}

fn header_u64(message: &async_nats::Message, name: &str) -> Option<u64> {
    message.headers.as_ref()?.get(name)?.as_str().parse().ok()
}

fn on_message(
    ctx: &AgentCtx,
    out: &mut AgentOutcome,
    last_seq: &mut u64,
    deliveries: &mut u64,
    message: &async_nats::jetstream::Message,
) {
    let (w, p) = (&ctx.w, &ctx.progress);
    let now = p.now_ns();
    let subject = message.subject.as_str();
    let Some((project, sender)) = ctx.names.parse(subject).filter(|&(_, s)| s < w.agents) else {
        return out.anomaly(|| format!("a message on an unknown subject {subject:?}"));
    };
    let seq = match message.info() {
        Ok(info) => info.stream_sequence,
        Err(e) => return out.anomaly(|| format!("a message without its stream sequence: {e}")),
    };
    if seq <= *last_seq {
        out.anomaly(|| format!("stream sequence {seq} arrived after {last_seq}"));
    }
    *last_seq = (*last_seq).max(seq);
    if sender == ctx.agent && project == ctx.project {
        // Its own message: JetStream delivers to every consumer of the subject.
        return;
    }
    *deliveries += 1;
    if w.fault_drop_every
        .is_some_and(|every| deliveries.is_multiple_of(every))
    {
        // Deliberately ignored: the verifier must notice.
        out.fault_dropped += 1;
        p.seen.fetch_add(1, Ordering::SeqCst);
        return;
    }
    record_delivery(ctx, out, project, sender, message, now);
    p.last_delivery_ns.fetch_max(now, Ordering::SeqCst);
    p.seen.fetch_add(1, Ordering::SeqCst);
}

fn record_delivery(
    ctx: &AgentCtx,
    out: &mut AgentOutcome,
    project: usize,
    sender: usize,
    message: &async_nats::Message,
    now: u64,
) {
    let w = &ctx.w;
    if project != ctx.project {
        return out.anomaly(|| format!("a message of another project on {}", message.subject));
    }
    let (Some(n), Some(t)) = (
        header_u64(message, HEADER_N)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n < w.messages),
        header_u64(message, HEADER_T),
    ) else {
        return out
            .anomaly(|| format!("a message without its bench headers on {}", message.subject));
    };
    let count = &mut out.received[sender * w.messages + n];
    *count = count.saturating_add(1);
    out.delivery_latency
        .saturating_record(micros(now.saturating_sub(t)));
}

/// A message read back from the stream.
#[derive(PartialEq, Eq, Clone, Copy)]
struct Stored {
    project: usize,
    sender: usize,
    n: usize,
}

/// The deliveries the agents recorded, then the stream read back: every acknowledged
/// message is in it with the sequence its ack gave, the stream's sequences are dense, and
/// nothing is stored that was not acknowledged.
async fn verify_stream(
    admin: &Client,
    js: &Context,
    names: &Names,
    w: &Workload,
    run: &DriveResult,
) -> anyhow::Result<Verification> {
    let mut v = Verification::default();
    let deliveries = verify::check_deliveries(w, run, &mut v);
    let mut store = StoreFindings::default();

    let mut acked: HashMap<u64, Stored> = HashMap::new();
    for agent in &run.agents {
        for (n, receipt) in agent.receipts.iter().enumerate() {
            if let Some(receipt) = receipt {
                let stored = Stored {
                    project: agent.project,
                    sender: agent.agent,
                    n,
                };
                if acked.insert(receipt.seq as u64, stored).is_some() {
                    store.wrong.add(|| {
                        format!("two messages were acknowledged as sequence {}", receipt.seq)
                    });
                }
            }
        }
    }

    let mut stream = js
        .get_stream(names.stream())
        .await
        .context("looking the run's stream up")?;
    let expected = stream
        .info()
        .await
        .context("reading the run's stream's state")?
        .state
        .messages;
    v.db_rows = expected;
    let mut read = 0u64;
    if expected > 0 {
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_subject: admin.new_inbox(),
                ..Default::default()
            })
            .await
            .context("creating a consumer to read the stream back")?;
        let mut messages = consumer
            .messages()
            .await
            .context("subscribing to read the stream back")?;
        while read < expected {
            let message = match tokio::time::timeout(w.settle, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => {
                    log::warn!("{RUN_NAME}: reading the stream back: {e}");
                    continue;
                }
                Ok(None) | Err(_) => break,
            };
            read += 1;
            let seq = match message.info() {
                Ok(info) => info.stream_sequence,
                Err(e) => {
                    store
                        .wrong
                        .add(|| format!("a message read back without its sequence: {e}"));
                    continue;
                }
            };
            if seq != read {
                store
                    .wrong
                    .add(|| format!("sequences are not dense: message {read} has sequence {seq}"));
            }
            let stored = names
                .parse(message.subject.as_str())
                .and_then(|(project, sender)| {
                    let n = header_u64(&message, HEADER_N)?;
                    Some(Stored {
                        project,
                        sender,
                        n: usize::try_from(n).ok()?,
                    })
                });
            match (acked.remove(&seq), stored) {
                (Some(a), Some(s)) if a == s => v.db_matching += 1,
                (Some(a), _) => store.wrong.add(|| {
                    format!(
                        "project {}: {}'s message {} was acknowledged as sequence {seq}, which holds {} ({:?})",
                        a.project,
                        agent_id(a.sender),
                        a.n,
                        message.subject,
                        message.headers.as_ref().and_then(|h| h.get(HEADER_N)).map(|n| n.as_str().to_owned())
                    )
                }),
                (None, _) => store.extra.add(|| {
                    format!(
                        "sequence {seq} ({}) is stored but was never acknowledged",
                        message.subject
                    )
                }),
            }
        }
    }
    if read < expected {
        store.wrong.add(|| {
            format!(
                "the stream holds {expected} messages but only {read} could be read back within {:?}",
                w.settle
            )
        });
    }
    for (seq, a) in acked {
        store.missing.add(|| {
            format!(
                "project {}: {}'s message {} (sequence {seq}) was acknowledged but is not in the stream",
                a.project,
                agent_id(a.sender),
                a.n
            )
        });
    }
    verify::finish(w, run, &mut v, deliveries, store, "the stream");
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_their_project_and_agent() {
        let names = Names {
            label: "0123abcd".to_owned(),
        };
        let subject = names.agent_subject(3, 12);
        assert_eq!(subject, "agentbus-bench.0123abcd.p3.a12");
        assert_eq!(names.parse(&subject), Some((3, 12)));
        assert_eq!(names.project_filter(3), "agentbus-bench.0123abcd.p3.*");
        assert_eq!(names.parse("agentbus-bench.ffffffff.p3.a12"), None);
        assert_eq!(names.parse("agentbus-bench.0123abcd.p3.b1"), None);
    }
}
