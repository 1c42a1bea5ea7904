//! Settings of a running broker: every one is a command-line flag, an environment variable and
//! a key of the TOML file named by `--config` (docs/CONFIGURATION.md). A flag wins over its
//! environment variable, which wins over the file, which wins over the default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::{Deserialize, Serialize};

/// Where the broker listens unless told otherwise: loopback only, so a fresh install exposes
/// nothing to the network.
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
/// The database used when `DATABASE_URL` is not set; it is created if it does not exist.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/agentbus";

/// How the broker runs. Built from flags, environment and file by `agentbus serve`
/// ([`ServeArgs::resolve`]), or directly by tests (`Settings::default()` plus the fields they
/// care about).
///
/// A field's name is its TOML key and its clap argument id; its flag is the name in kebab case.
/// A file may leave any key out (`serde(default)`) and may not name anything else.
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address and port to listen on (port 0 picks a free one).
    #[arg(long, env = "AGENTBUS_BIND", default_value = DEFAULT_BIND)]
    pub bind: String,

    /// PostgreSQL connection URL. The database is created if it does not exist.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// Connections in the database pool. The group-commit writer holds one while a batch is
    /// written; the rest serve history queries and session bookkeeping.
    #[arg(long, env = "AGENTBUS_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: usize,

    /// How long a database operation may wait for a connection (or to connect) before the
    /// request fails with `unavailable`, in milliseconds.
    #[arg(long, env = "AGENTBUS_DB_TIMEOUT_MS", default_value_t = 5_000)]
    pub db_timeout_ms: u64,

    /// Most messages written in one group-commit transaction. 1 turns group commit off (one
    /// commit per message: slow, the baseline `agentbus bench --compare` measures against).
    #[arg(long, env = "AGENTBUS_BATCH_MAX_ROWS", default_value_t = 1_000)]
    pub batch_max_rows: usize,

    /// Group-commit batches written at once, each for different projects (a project's
    /// messages are written by one lane at a time, in seq order). With 2, one lane's commit
    /// (its WAL flush) overlaps the next batch of other projects. Each lane holds a database
    /// connection while it writes. 1 to 16; anything else is clamped.
    #[arg(long, env = "AGENTBUS_COMMIT_LANES", default_value_t = 2)]
    pub commit_lanes: usize,

    /// Largest WebSocket frame accepted, in bytes. A larger frame is answered with
    /// `frame_too_large` and the connection is closed (1009), because it cannot be skipped.
    #[arg(long, env = "AGENTBUS_MAX_FRAME_BYTES", default_value_t = 256 * 1024)]
    pub max_frame_bytes: usize,

    /// Largest `content` accepted, in bytes.
    #[arg(long, env = "AGENTBUS_MAX_CONTENT_BYTES", default_value_t = 64 * 1024)]
    pub max_content_bytes: usize,

    /// Largest `metadata` accepted, in bytes (about the size of its JSON).
    #[arg(long, env = "AGENTBUS_MAX_METADATA_BYTES", default_value_t = 16 * 1024)]
    pub max_metadata_bytes: usize,

    /// Deepest nesting of `metadata` accepted (the object itself is level 1).
    #[arg(long, env = "AGENTBUS_MAX_METADATA_DEPTH", default_value_t = 16)]
    pub max_metadata_depth: usize,

    /// Interval between WebSocket pings sent to each client, in milliseconds.
    #[arg(long, env = "AGENTBUS_HEARTBEAT_INTERVAL_MS", default_value_t = 5_000)]
    pub heartbeat_interval_ms: u64,

    /// A client heard nothing from (no frame, no pong) for this long is disconnected, in
    /// milliseconds.
    #[arg(long, env = "AGENTBUS_CLIENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub client_timeout_ms: u64,

    /// Most frames waiting to be written to one client. A client that falls further behind is
    /// a slow consumer and is disconnected (close code 4008).
    #[arg(long, env = "AGENTBUS_OUTBOX_MAX_FRAMES", default_value_t = 4_096)]
    pub outbox_max_frames: usize,

    /// Most bytes waiting to be written to one client (see `outbox_max_frames`).
    #[arg(long, env = "AGENTBUS_OUTBOX_MAX_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub outbox_max_bytes: usize,

    /// Most sends of one session that may wait for their commit at once; beyond that a send
    /// is refused with `overloaded`, so one client cannot fill the broker's memory.
    #[arg(long, env = "AGENTBUS_MAX_PENDING_SENDS", default_value_t = 4_096)]
    pub max_pending_sends: usize,

    /// Most bytes of sends, from every connection and REST publish together, that may wait
    /// for their commit at once (0: no limit). Beyond that a send is refused with
    /// `unavailable` and a `retry_after_ms` (REST: 503 with `Retry-After`), so a stalled
    /// database cannot make the broker's memory grow without bound.
    #[arg(
        long,
        env = "AGENTBUS_MAX_UNCOMMITTED_BYTES",
        default_value_t = 256 * 1024 * 1024
    )]
    pub max_uncommitted_bytes: usize,

    /// Manual-ack sessions: most messages delivered and not yet acknowledged. Beyond that the
    /// session stops taking live traffic and catches up from the store as acks come back.
    #[arg(long, env = "AGENTBUS_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

    /// Manual-ack sessions: a message delivered this many times without an acknowledgement
    /// goes to the dead-letter list (reason `max_deliveries`) instead of being delivered again.
    #[arg(long, env = "AGENTBUS_MAX_DELIVERIES", default_value_t = 10)]
    pub max_deliveries: u32,

    /// Messages per second one connection may send (token bucket; 0: no limit). A send over
    /// the limit is refused with `rate_limited` and a `retry_after_ms`; the connection stays.
    #[arg(long, env = "AGENTBUS_RATE_PER_SESSION", default_value_t = 1_000)]
    pub rate_per_session: u32,

    /// Messages one connection may send in a burst above its rate.
    #[arg(long, env = "AGENTBUS_BURST_PER_SESSION", default_value_t = 2_000)]
    pub burst_per_session: u32,

    /// Messages per second a whole project may receive, all connections and REST publishes
    /// together (token bucket; 0: no limit).
    #[arg(long, env = "AGENTBUS_RATE_PER_PROJECT", default_value_t = 10_000)]
    pub rate_per_project: u32,

    /// Messages a project may receive in a burst above its rate.
    #[arg(long, env = "AGENTBUS_BURST_PER_PROJECT", default_value_t = 20_000)]
    pub burst_per_project: u32,

    /// Most open WebSocket connections per project (0: no limit).
    #[arg(
        long,
        env = "AGENTBUS_MAX_CONNECTIONS_PER_PROJECT",
        default_value_t = 1_000
    )]
    pub max_connections_per_project: usize,

    /// Most open WebSocket connections per client IP address (0: no limit).
    #[arg(
        long,
        env = "AGENTBUS_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 1_000
    )]
    pub max_connections_per_address: usize,

    /// The admin token. When set, every API call and WebSocket upgrade must present a token
    /// (this one, or a project token); when not set the broker is open, which it refuses to
    /// be on anything but a loopback address.
    #[arg(long, env = "AGENTBUS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// On SIGTERM/SIGINT: how long to wait for sends in flight to commit and for clients to
    /// get their receipts and a 1001 close, before exiting anyway, in milliseconds.
    #[arg(long, env = "AGENTBUS_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,

    /// HTTP worker threads (0: one per core).
    #[arg(long, env = "AGENTBUS_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// An agent that called in over REST or MCP (the CLI included) within this many
    /// milliseconds is listed as online.
    #[arg(long, env = "AGENTBUS_PRESENCE_INTERVAL_MS", default_value_t = 60_000)]
    pub presence_interval_ms: u64,

    /// Most inbox requests that may wait for mail at once (`wait_ms`, `check_inbox` with
    /// `wait_seconds`), over the whole broker (0: no limit). One more is refused with 429.
    #[arg(long, env = "AGENTBUS_MAX_INBOX_WAITS", default_value_t = 4_096)]
    pub max_inbox_waits: usize,

    /// Most inbox requests of one project that may wait at once (0: no limit).
    #[arg(
        long,
        env = "AGENTBUS_MAX_INBOX_WAITS_PER_PROJECT",
        default_value_t = 1_024
    )]
    pub max_inbox_waits_per_project: usize,

    /// Web origins (`scheme://host[:port]`) allowed to call the MCP endpoint, comma-separated.
    /// A request with any other `Origin` header is refused (403); requests without one
    /// (command-line clients) and same-origin loopback requests are always allowed.
    #[arg(long, env = "AGENTBUS_MCP_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub mcp_allowed_origins: Vec<String>,
    /// Longest time a REST request's body may take to arrive, counted from the end of its
    /// headers, in milliseconds. A slower body is answered 408 `body_timeout` and the
    /// connection is closed.
    #[arg(long, env = "AGENTBUS_BODY_TIMEOUT_MS", default_value_t = 5_000)]
    pub body_timeout_ms: u64,

    /// Most `POST /api/projects/{id}/requests` of one project waiting for their reply at
    /// once (0: no limit). Beyond it a request is refused with 429 `too_many_waiters`.
    #[arg(
        long,
        env = "AGENTBUS_MAX_WAITERS_PER_PROJECT",
        default_value_t = 1_000
    )]
    pub max_waiters_per_project: usize,

    /// Most `POST .../requests` waiting for their reply at once, all projects together (0: no
    /// limit). Beyond it a request is refused with 503 `busy`.
    #[arg(long, env = "AGENTBUS_MAX_WAITERS", default_value_t = 4_000)]
    pub max_waiters: usize,

    /// Most bytes of messages in one page of history or of an inbox (about the size of their
    /// JSON). A page stops before the message that would exceed it (it always holds at least
    /// one message) and says where to continue.
    #[arg(long, env = "AGENTBUS_MAX_PAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_page_bytes: usize,

    /// Most history, search and dead-letter reads served at once; the others wait their turn.
    #[arg(long, env = "AGENTBUS_MAX_HEAVY_READS", default_value_t = 4)]
    pub max_heavy_reads: usize,

    /// Longest a history, search or dead-letter read waits for its turn, in milliseconds, before it
    /// is refused with 503 `busy` and a `Retry-After`.
    #[arg(long, env = "AGENTBUS_HEAVY_READ_WAIT_MS", default_value_t = 5_000)]
    pub heavy_read_wait_ms: u64,

    /// This broker's name among the brokers sharing its database (docs/SCALING.md): 1 to 64
    /// characters from `A-Z a-z 0-9 _ - . :`. Unset: `node-` and 8 random hex digits.
    #[arg(long, env = "AGENTBUS_NODE_ID")]
    pub node_id: Option<String>,

    /// How often this broker refreshes its heartbeat row, in milliseconds.
    #[arg(long, env = "AGENTBUS_NODE_HEARTBEAT_MS", default_value_t = 1_000)]
    pub node_heartbeat_ms: u64,

    /// A broker whose heartbeat is older than this (its own setting, in milliseconds) is dead
    /// to the others: its sessions are marked gone and its duties taken over. At least twice
    /// `node_heartbeat_ms`.
    #[arg(long, env = "AGENTBUS_NODE_TIMEOUT_MS", default_value_t = 5_000)]
    pub node_timeout_ms: u64,
    /// A file claim's time to live when it names none, in milliseconds (counted from the
    /// grant, and from each renewal).
    #[arg(
        long,
        env = "AGENTBUS_CLAIM_DEFAULT_TTL_MS",
        default_value_t = 1_800_000
    )]
    pub claim_default_ttl_ms: u64,

    /// Longest time to live a file claim may ask for, or renew to, in milliseconds.
    #[arg(long, env = "AGENTBUS_CLAIM_MAX_TTL_MS", default_value_t = 86_400_000)]
    pub claim_max_ttl_ms: u64,

    /// Longest objection window a file claim may ask for, in milliseconds.
    #[arg(
        long,
        env = "AGENTBUS_CLAIM_MAX_OBJECTION_MS",
        default_value_t = 600_000
    )]
    pub claim_max_objection_ms: u64,

    /// Most paths (exact paths and globs) in one file claim.
    #[arg(long, env = "AGENTBUS_CLAIM_MAX_PATHS", default_value_t = 100)]
    pub claim_max_paths: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: DEFAULT_BIND.to_owned(),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            db_pool_size: 8,
            db_timeout_ms: 5_000,
            batch_max_rows: 1_000,
            commit_lanes: 2,
            max_frame_bytes: 256 * 1024,
            max_content_bytes: 64 * 1024,
            max_metadata_bytes: 16 * 1024,
            max_metadata_depth: 16,
            heartbeat_interval_ms: 5_000,
            client_timeout_ms: 30_000,
            outbox_max_frames: 4_096,
            outbox_max_bytes: 16 * 1024 * 1024,
            max_pending_sends: 4_096,
            max_uncommitted_bytes: 256 * 1024 * 1024,
            max_in_flight: 256,
            max_deliveries: 10,
            rate_per_session: 1_000,
            burst_per_session: 2_000,
            rate_per_project: 10_000,
            burst_per_project: 20_000,
            max_connections_per_project: 1_000,
            max_connections_per_address: 1_000,
            admin_token: None,
            shutdown_timeout_ms: 10_000,
            workers: 0,
            presence_interval_ms: 60_000,
            max_inbox_waits: 4_096,
            max_inbox_waits_per_project: 1_024,
            mcp_allowed_origins: Vec::new(),
            body_timeout_ms: 5_000,
            max_waiters_per_project: 1_000,
            max_waiters: 4_000,
            max_page_bytes: 4 * 1024 * 1024,
            max_heavy_reads: 4,
            heavy_read_wait_ms: 5_000,
            node_id: None,
            node_heartbeat_ms: 1_000,
            node_timeout_ms: 5_000,
            claim_default_ttl_ms: 1_800_000,
            claim_max_ttl_ms: 86_400_000,
            claim_max_objection_ms: 600_000,
            claim_max_paths: 100,
        }
    }
}

/// The arguments of `agentbus serve`: the settings, and a file to read more of them from.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// A TOML file of settings, keyed by setting name (e.g. `bind = "0.0.0.0:8080"`). Flags
    /// and environment variables override it; unknown keys are an error.
    #[arg(long, env = "AGENTBUS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,
}

impl ServeArgs {
    /// The settings to run with: `matches` (those of `serve`) tell which settings came from a
    /// flag or the environment; the others are taken from the file when it sets them.
    pub fn resolve(self, matches: &ArgMatches) -> anyhow::Result<Settings> {
        let Some(path) = &self.config else {
            return Ok(self.settings);
        };
        let file = FileSettings::read(path)?;
        Ok(file.layer_under(self.settings, |key| {
            matches!(
                matches.value_source(key),
                None | Some(ValueSource::DefaultValue)
            )
        }))
    }
}

/// The settings a configuration file sets.
#[derive(Debug)]
pub struct FileSettings {
    /// The keys present in the file, each a field of `Settings`.
    keys: Vec<String>,
    /// The file's values, with defaults for the keys it leaves out.
    values: Settings,
}

impl FileSettings {
    pub fn read(path: &Path) -> anyhow::Result<FileSettings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration file {}", path.display()))?;
        FileSettings::parse(&text)
            .with_context(|| format!("in the configuration file {}", path.display()))
    }

    /// Parses a file's text. An unknown key, or a value of the wrong type, is an error that
    /// names the key and its line.
    pub fn parse(text: &str) -> anyhow::Result<FileSettings> {
        let values: Settings = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let keys = toml::from_str::<toml::Table>(text)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        Ok(FileSettings { keys, values })
    }

    /// The keys the file sets.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(String::as_str)
    }

    /// `settings` with each setting the file sets replaced by the file's value, where
    /// `defaulted` says the setting was not given by a flag or an environment variable.
    pub fn layer_under(&self, settings: Settings, defaulted: impl Fn(&str) -> bool) -> Settings {
        // Field by field, through each side's serialised form, so that a new setting needs
        // no code here.
        let mut merged = serde_json::to_value(settings).expect("settings serialise");
        let from_file = serde_json::to_value(&self.values).expect("settings serialise");
        for key in self.keys.iter().filter(|key| defaulted(key)) {
            merged[key.as_str()] = from_file[key.as_str()].clone();
        }
        serde_json::from_value(merged).expect("settings deserialise from their own form")
    }
}

impl Settings {
    /// The bounds of one send.
    pub fn send_limits(&self) -> crate::protocol::SendLimits {
        crate::protocol::SendLimits {
            max_content_bytes: self.max_content_bytes,
            max_metadata_bytes: self.max_metadata_bytes,
            max_metadata_depth: self.max_metadata_depth,
        }
    }

    /// The bounds of file claims. The default TTL is capped at the maximum.
    pub fn claim_limits(&self) -> crate::domain::claims::ClaimLimits {
        let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX).max(1);
        let max_ttl_ms = ms(self.claim_max_ttl_ms);
        crate::domain::claims::ClaimLimits {
            default_ttl_ms: ms(self.claim_default_ttl_ms).min(max_ttl_ms),
            max_ttl_ms,
            max_objection_ms: ms(self.claim_max_objection_ms),
            max_paths: self.claim_max_paths.max(1),
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(1))
    }

    pub fn client_timeout(&self) -> Duration {
        Duration::from_millis(self.client_timeout_ms.max(1))
    }

    pub fn presence_interval(&self) -> Duration {
        Duration::from_millis(self.presence_interval_ms)
    }

    pub fn db_timeout(&self) -> Duration {
        Duration::from_millis(self.db_timeout_ms.max(1))
    }
}

#[cfg(test)]
mod tests {
    use clap::{Command, FromArgMatches};

    use super::*;

    /// The settings' fields, by name, as a file and clap know them.
    fn setting_names() -> Vec<String> {
        match serde_json::to_value(Settings::default()).unwrap() {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            _ => unreachable!(),
        }
    }

    fn serve_command() -> Command {
        ServeArgs::augment_args(Command::new("serve"))
    }

    /// `agentbus serve ARGS` as `main` resolves it (the environment is the test process's).
    fn resolve(args: &[&str]) -> anyhow::Result<Settings> {
        let matches = serve_command().try_get_matches_from(args)?;
        ServeArgs::from_arg_matches(&matches)?.resolve(&matches)
    }

    /// A configuration file in the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(text: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "agentbus-config-{}.toml",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn every_setting_is_an_argument_of_the_same_id() {
        // `resolve` asks clap where each key of the file came from, by the key.
        let command = serve_command();
        for name in setting_names() {
            assert!(
                command.get_arguments().any(|a| a.get_id() == name.as_str()),
                "setting {name} has no argument of that id"
            );
        }
    }

    #[test]
    fn the_default_settings_are_clap_s_defaults() {
        let matches = serve_command().try_get_matches_from(["serve"]).unwrap();
        let parsed =
            serde_json::to_value(ServeArgs::from_arg_matches(&matches).unwrap().settings).unwrap();
        let defaults = serde_json::to_value(Settings::default()).unwrap();
        for name in setting_names() {
            // A setting given by the environment of the test process is not a default.
            if matches.value_source(&name) == Some(ValueSource::DefaultValue) {
                assert_eq!(parsed[&name], defaults[&name], "default of {name}");
            }
        }
    }

    #[test]
    fn a_file_beats_defaults_and_a_flag_beats_the_file() {
        let file =
            TempFile::new("bind = \"0.0.0.0:9999\"\nbatch_max_rows = 500\nmax_deliveries = 3\n");
        let settings =
            resolve(&["serve", "--config", file.path(), "--batch-max-rows", "7"]).unwrap();
        assert_eq!(settings.bind, "0.0.0.0:9999", "the file beats the default");
        assert_eq!(settings.max_deliveries, 3, "the file beats the default");
        assert_eq!(settings.batch_max_rows, 7, "the flag beats the file");
        assert_eq!(
            settings.max_in_flight,
            Settings::default().max_in_flight,
            "what nobody sets keeps its default"
        );
        // Without a file, flags and defaults only.
        let settings = resolve(&["serve", "--batch-max-rows", "7"]).unwrap();
        assert_eq!(settings.batch_max_rows, 7);
        assert_eq!(settings.bind, DEFAULT_BIND);
    }

    #[test]
    fn an_environment_variable_beats_the_file() {
        // The layering as `resolve` drives it, with `workers` given by the environment: the
        // test cannot set a variable without racing other threads reading the environment
        // (tests/api/ops.rs checks the real thing with the binary).
        let file = FileSettings::parse("workers = 4\nmax_in_flight = 64\n").unwrap();
        let from_env = Settings {
            workers: 2,
            ..Settings::default()
        };
        let settings = file.layer_under(from_env, |key| key != "workers");
        assert_eq!(settings.workers, 2, "the environment beats the file");
        assert_eq!(settings.max_in_flight, 64, "the file beats the default");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_name() {
        let error = FileSettings::parse("bind = \"127.0.0.1:1\"\nbatch_max_row = 5\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `batch_max_row`"), "{error}");
        assert!(error.contains("line 2"), "{error}");
        // A section is a key like any other.
        let error = FileSettings::parse("[server]\nbind = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `server`"), "{error}");
        let error = FileSettings::parse("workers = \"four\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("workers = \"four\""), "{error}");
        let error = FileSettings::parse("workers = -1\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("workers = -1"), "{error}");
        // Through `resolve`, the message names the file too.
        let file = TempFile::new("no_such_setting = true\n");
        let error = format!(
            "{:#}",
            resolve(&["serve", "--config", file.path()]).unwrap_err()
        );
        assert!(error.contains(file.path()), "{error}");
        assert!(error.contains("unknown field `no_such_setting`"), "{error}");
    }

    #[test]
    fn the_example_file_parses_and_shows_every_setting_with_its_default() {
        let example = include_str!("../docs/agentbus.example.toml");
        let file = FileSettings::parse(example).expect("docs/agentbus.example.toml parses");
        let set: Vec<String> = file.keys().map(str::to_owned).collect();
        // Each setting the example does not set is shown commented out, at its default:
        // `# name = value`.
        let names = setting_names();
        let mut shown = Vec::new();
        let uncommented: String = example
            .lines()
            .map(|line| {
                let commented = line.strip_prefix("# ").filter(|rest| {
                    rest.split_once(" = ")
                        .is_some_and(|(key, _)| names.iter().any(|n| n == key))
                });
                match commented {
                    Some(rest) => {
                        shown.push(rest.split_once(" = ").unwrap().0.to_owned());
                        format!("{rest}\n")
                    }
                    None => format!("{line}\n"),
                }
            })
            .collect();
        let all = FileSettings::parse(&uncommented).expect("the commented settings parse");
        let mut keys: Vec<&str> = all.keys().collect();
        keys.sort_unstable();
        let mut sorted_names = names.clone();
        sorted_names.sort_unstable();
        assert_eq!(keys, sorted_names, "the example shows every setting once");
        let defaults = serde_json::to_value(Settings::default()).unwrap();
        let values = serde_json::to_value(&all.values).unwrap();
        for name in &shown {
            assert!(!set.contains(name), "{name} is both set and commented out");
            assert_eq!(
                values[name], defaults[name],
                "the example's default of {name}"
            );
        }
    }
}
