//! Settings of a running broker: every one is a command-line flag and an environment variable.

use std::time::Duration;

use clap::Args;

/// Where the broker listens unless told otherwise: loopback only, so a fresh install exposes
/// nothing to the network.
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
/// The database used when `DATABASE_URL` is not set; it is created if it does not exist.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/agentbus";

/// How the broker runs. Built from flags and environment by `agentbus serve`, or directly by
/// tests (`Settings::default()` plus the fields they care about).
#[derive(Args, Clone, Debug)]
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
    /// commit per message, the spec's original design).
    #[arg(long, env = "AGENTBUS_BATCH_MAX_ROWS", default_value_t = 1_000)]
    pub batch_max_rows: usize,

    /// Largest WebSocket frame accepted, in bytes. A larger frame is answered with
    /// `frame_too_large` and the connection is closed (1009), because it cannot be skipped.
    #[arg(long, env = "AGENTBUS_MAX_FRAME_BYTES", default_value_t = 256 * 1024)]
    pub max_frame_bytes: usize,

    /// Largest `content` accepted, in bytes.
    #[arg(long, env = "AGENTBUS_MAX_CONTENT_BYTES", default_value_t = 64 * 1024)]
    pub max_content_bytes: usize,

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

    /// Manual-ack sessions: most messages delivered and not yet acknowledged. Beyond that the
    /// session stops taking live traffic and catches up from the store as acks come back.
    #[arg(long, env = "AGENTBUS_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

    /// Manual-ack sessions: a message delivered this many times without an acknowledgement
    /// goes to the dead-letter list (reason `max_deliveries`) instead of being delivered again.
    #[arg(long, env = "AGENTBUS_MAX_DELIVERIES", default_value_t = 10)]
    pub max_deliveries: u32,

    /// HTTP worker threads (0: one per core).
    #[arg(long, env = "AGENTBUS_WORKERS", default_value_t = 0)]
    pub workers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: DEFAULT_BIND.to_owned(),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            db_pool_size: 8,
            db_timeout_ms: 5_000,
            batch_max_rows: 1_000,
            max_frame_bytes: 256 * 1024,
            max_content_bytes: 64 * 1024,
            heartbeat_interval_ms: 5_000,
            client_timeout_ms: 30_000,
            outbox_max_frames: 4_096,
            outbox_max_bytes: 16 * 1024 * 1024,
            max_pending_sends: 4_096,
            max_in_flight: 256,
            max_deliveries: 10,
            workers: 0,
        }
    }
}

impl Settings {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(1))
    }

    pub fn client_timeout(&self) -> Duration {
        Duration::from_millis(self.client_timeout_ms.max(1))
    }

    pub fn db_timeout(&self) -> Duration {
        Duration::from_millis(self.db_timeout_ms.max(1))
    }
}
