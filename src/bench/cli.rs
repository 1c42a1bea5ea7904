//! The options of `agentbus bench`, and the checks that reject a workload that cannot run.

use clap::{Args, ValueEnum};

/// Where the PostgreSQL server of the benchmark's throwaway databases is, by default.
pub const DEFAULT_DATABASE_SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// How agents address their messages.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every message goes to every other agent of its project.
    Broadcast,
    /// Every message goes to one other agent of the project, round robin.
    Direct,
    /// A direct message that its recipient answers with a direct reply: measures the round
    /// trip. Replies are messages too (counted, persisted and verified).
    Request,
}

/// Drive a broker over real WebSockets, as agents would, measure it and verify that nothing
/// was lost, duplicated or misrouted.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// A running broker to measure, e.g. ws://127.0.0.1:8080. Its database (--database-url)
    /// must be reachable: projects are created in it and every message is checked there.
    #[arg(
        long,
        conflicts_with = "spawn",
        required_unless_present_any = ["spawn", "compare", "jetstream"]
    )]
    pub target: Option<String>,

    /// The database of the --target broker.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = crate::config::DEFAULT_DATABASE_URL
    )]
    pub database_url: String,

    /// Start the broker binary itself (this executable, `serve --bind 127.0.0.1:0`) on a
    /// fresh database `bench_<uuid>`, dropped afterwards.
    #[arg(long)]
    pub spawn: bool,

    /// The PostgreSQL server on which --spawn and --compare create their databases.
    #[arg(long, env = "AGENTBUS_BENCH_DATABASE_SERVER", default_value = DEFAULT_DATABASE_SERVER)]
    pub database_server: String,

    /// Run the same workload against (1) the broker as configured, (2) a broker with
    /// --batch-max-rows 1 (one commit per message) and (3) the raw PostgreSQL ceiling (the
    /// same rows through `commit_batch` in batches of 500, no broker). Implies --spawn.
    #[arg(long, conflicts_with = "target")]
    pub compare: bool,

    /// Also run the same workload against NATS JetStream, as the last run, `jetstream`
    /// (src/bench/jetstream.rs): one file-storage stream, each agent publishing with async
    /// acks (at most --window outstanding) and consuming its project with an ordered push
    /// consumer, verified like the broker runs. With --spawn, --target or --compare the report
    /// adds agentbus/JetStream ratios; alone, only JetStream is measured. Without a URL it
    /// starts its own `nats-server -js` (from PATH or /usr/sbin) on a free port with a fresh
    /// store, killed and deleted afterwards; with one (nats://HOST:PORT) it uses that server
    /// and deletes the run's stream afterwards. Broadcast mode only, no --connections.
    #[arg(long, value_name = "URL", num_args = 0..=1)]
    pub jetstream: Option<Option<String>>,

    /// `--batch-max-rows` of the spawned broker (run 1 of --compare); its own default if
    /// absent.
    #[arg(long)]
    pub batch_max_rows: Option<usize>,

    /// Spawned brokers sharing the run's database (docs/SCALING.md); agents are spread over
    /// them round robin, so most deliveries cross nodes. CPU, memory and batch figures are
    /// those of the first node.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,

    /// More flags for the spawned broker's `serve`, one per occurrence
    /// (e.g. --broker-arg=--workers=1).
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    pub broker_args: Vec<String>,

    /// Projects, each with its own agents.
    #[arg(long, default_value_t = 4)]
    pub projects: usize,

    /// Agents per project; each sends --messages messages.
    #[arg(long, default_value_t = 5)]
    pub agents: usize,

    /// Messages sent by each agent.
    #[arg(long, default_value_t = 500)]
    pub messages: usize,

    /// Bytes of content per message.
    #[arg(long, default_value_t = 200)]
    pub size: usize,

    /// How messages are addressed.
    #[arg(long, value_enum, default_value_t = Mode::Broadcast)]
    pub mode: Mode,

    /// Open loop (the default): most sends per agent waiting for their receipt (in request
    /// mode: requests waiting for their reply). Keep it at most the broker's
    /// max_pending_sends (4096), or sends are refused with `overloaded`.
    #[arg(long, default_value_t = 256)]
    pub window: usize,

    /// Fixed total rate in messages per second, spread evenly over all agents, instead of
    /// as fast as possible. Latencies are measured from each message's scheduled send time,
    /// so a broker that falls behind cannot hide it (no coordinated omission).
    #[arg(long)]
    pub rate: Option<f64>,

    /// Extra idle connections, in a project of their own: they send nothing and must receive
    /// nothing.
    #[arg(long, default_value_t = 0)]
    pub connections: usize,

    /// Process id of the --target broker, to report its CPU and memory from /proc.
    #[arg(long)]
    pub pid: Option<u32>,

    /// How long without any progress ends a run that has not received everything, in
    /// milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub settle_ms: u64,

    /// Print the result as JSON.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,

    /// Print the result as CSV, one line per run, header first.
    #[arg(long)]
    pub csv: bool,

    /// FOR THE TEST SUITE ONLY: the bench deliberately ignores every Nth delivery each agent
    /// receives, so the verifier must report them as lost and the run must fail.
    #[arg(long, hide_short_help = true)]
    pub fault_drop_every: Option<u64>,
}

impl BenchArgs {
    /// The JetStream run's server, if --jetstream asks for one.
    pub fn jetstream_target(&self) -> Option<super::jetstream::NatsTarget> {
        use super::jetstream::NatsTarget;
        self.jetstream.as_ref().map(|url| match url {
            Some(url) if !url.is_empty() => NatsTarget::Url(url.clone()),
            _ => NatsTarget::Spawn,
        })
    }

    /// Whether this invocation starts its own brokers.
    pub fn spawns(&self) -> bool {
        self.spawn || self.compare
    }

    /// Rejects workloads that cannot run, with a message that says why.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.projects >= 1, "--projects must be at least 1");
        anyhow::ensure!(self.agents >= 1, "--agents must be at least 1");
        anyhow::ensure!(self.messages >= 1, "--messages must be at least 1");
        anyhow::ensure!(
            self.size >= 1,
            "--size must be at least 1 (content cannot be empty)"
        );
        anyhow::ensure!(self.window >= 1, "--window must be at least 1");
        anyhow::ensure!(self.nodes >= 1, "--nodes must be at least 1");
        anyhow::ensure!(
            self.nodes == 1 || (self.spawns() && !self.compare),
            "--nodes spreads agents over brokers it spawns: use it with --spawn (not --compare)"
        );
        if self.mode != Mode::Broadcast {
            anyhow::ensure!(
                self.agents >= 2,
                "--mode {:?} needs at least 2 agents per project",
                self.mode
            );
        }
        if self.jetstream.is_some() {
            anyhow::ensure!(
                self.mode == Mode::Broadcast && self.connections == 0,
                "--jetstream measures the broadcast workload only (--mode broadcast, no \
                 --connections)"
            );
        }
        if let Some(rate) = self.rate {
            anyhow::ensure!(
                rate.is_finite() && rate > 0.0,
                "--rate must be a positive number"
            );
        }
        if let Some(n) = self.fault_drop_every {
            anyhow::ensure!(n >= 1, "--fault-drop-every must be at least 1");
        }
        if self
            .broker_args
            .iter()
            .any(|a| a.starts_with("--batch-max-rows"))
        {
            anyhow::bail!("give the broker's batch size with --batch-max-rows, not --broker-arg");
        }
        if !self.spawns() {
            anyhow::ensure!(
                self.batch_max_rows.is_none() && self.broker_args.is_empty(),
                "--batch-max-rows and --broker-arg configure a spawned broker (--spawn)"
            );
        }
        Ok(())
    }
}
