//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! [`Metrics`] owns the registry and the handles of every series. The broker's call sites do
//! not use it directly: they report to [`crate::stats::Stats`], which keeps the counters of
//! `/api/stats` and feeds these metrics from the same calls.
//!
//! | Series | Type | What |
//! | --- | --- | --- |
//! | `agentbus_connections` | gauge | open WebSocket sessions |
//! | `agentbus_messages_in_total` | counter | messages committed (a retry of a stored message is not counted again) |
//! | `agentbus_deliveries_total` | counter | live deliveries to connected sessions |
//! | `agentbus_delivered_bytes_total` | counter | bytes of the message frames of those deliveries |
//! | `agentbus_persistence_batch_rows` | histogram | messages per committed group-commit batch |
//! | `agentbus_persistence_commit_seconds` | histogram | time to get a connection for, write and commit a batch |
//! | `agentbus_persistence_failed_batches_total` | counter | batches the database did not store |
//! | `agentbus_errors_total{code}` | counter | error frames sent to clients, and sends the store failed, by error code |
//! | `agentbus_rate_limited_total` | counter | frames or requests refused by rate limiting |
//! | `agentbus_inbox_waits` | gauge | inbox reads over HTTP (REST `wait_ms`, MCP `check_inbox`) waiting for mail |
//! | `agentbus_message_wait_seconds{stage}` | histogram | how long a message waited at each stage of its way through the broker ([`Stage`]) |

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::protocol::ErrorCode;

/// Upper bounds of the batch-size histogram buckets (rows).
pub const BATCH_SIZE_BUCKETS: [u64; 8] = [1, 2, 5, 10, 50, 100, 500, 1000];
/// Upper bounds of the commit-latency histogram buckets (milliseconds).
pub const COMMIT_MS_BUCKETS: [f64; 10] =
    [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0, 1000.0];

/// Upper bounds of the message-wait histogram buckets (milliseconds).
pub const WAIT_MS_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0, 1000.0,
];

/// The stages of a message's way through the broker, each timed per message (per delivery
/// for [`Stage::Handed`]) in `agentbus_message_wait_seconds{stage}`. What they leave out is
/// the client's side: the frame's way in (socket, parsing) and out (the session's outbox,
/// the socket).
/// The discriminants index [`Stage::ALL`] (and the metric handles kept in that order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// From the send's hand-over to the group commit until its batch starts: the mailbox,
    /// and the batch in flight before it. A send the database refused with others is
    /// written again alone, and waits again.
    Queued = 0,
    /// Its batch's write: a pool connection, the transaction, `COMMIT` and its flush.
    Commit = 1,
    /// From the commit's return until its channel takes the batch up: the channel's mailbox.
    /// (On a node of a cluster, a batch behind other nodes' seqs waits for them after that.)
    Routed = 2,
    /// From routing until the recipient's session takes the frame: the session's mailbox.
    Handed = 3,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Queued, Stage::Commit, Stage::Routed, Stage::Handed];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::Commit => "commit",
            Stage::Routed => "routed",
            Stage::Handed => "handed",
        }
    }
}

/// The media type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Shared handle to the broker's metrics. Cloning is cheap; every clone updates the same
/// series.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    connections: Gauge,
    messages_in: Counter,
    deliveries: Counter,
    delivered_bytes: Counter,
    batch_rows: Histogram,
    commit_seconds: Histogram,
    failed_batches: Counter,
    errors: Family<ErrorLabels, Counter>,
    rate_limited: Counter,
    inbox_waits: Gauge,
    /// By [`Stage`], in [`Stage::ALL`]'s order: handles on the family's series.
    waits: [Histogram; 4],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

fn wait_histogram() -> Histogram {
    Histogram::new(WAIT_MS_BUCKETS.iter().map(|&ms| ms / 1000.0))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentbus");
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket sessions",
            connections.clone(),
        );
        let messages_in = Counter::default();
        registry.register(
            "messages_in",
            "Messages committed (a retry of a stored message is not counted again)",
            messages_in.clone(),
        );
        let deliveries = Counter::default();
        registry.register(
            "deliveries",
            "Live deliveries of committed messages to connected sessions",
            deliveries.clone(),
        );
        let delivered_bytes = Counter::default();
        registry.register_with_unit(
            "delivered",
            "Bytes of the message frames of live deliveries",
            Unit::Bytes,
            delivered_bytes.clone(),
        );
        let batch_rows = Histogram::new(BATCH_SIZE_BUCKETS.iter().map(|&rows| rows as f64));
        registry.register(
            "persistence_batch_rows",
            "Messages per committed group-commit batch",
            batch_rows.clone(),
        );
        let commit_seconds = Histogram::new(COMMIT_MS_BUCKETS.iter().map(|&ms| ms / 1000.0));
        registry.register_with_unit(
            "persistence_commit",
            "Time to get a connection for, write and commit a group-commit batch",
            Unit::Seconds,
            commit_seconds.clone(),
        );
        let failed_batches = Counter::default();
        registry.register(
            "persistence_failed_batches",
            "Group-commit batches the database did not store",
            failed_batches.clone(),
        );
        let errors = Family::default();
        registry.register(
            "errors",
            "Error frames sent to WebSocket clients, and sends the store failed, by error code",
            errors.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Frames or requests refused by rate limiting",
            rate_limited.clone(),
        );
        let inbox_waits = Gauge::default();
        registry.register(
            "inbox_waits",
            "Inbox reads over HTTP waiting for mail",
            inbox_waits.clone(),
        );
        let wait_family: Family<StageLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(wait_histogram);
        registry.register_with_unit(
            "message_wait",
            "How long messages waited at each stage of their way through the broker",
            Unit::Seconds,
            wait_family.clone(),
        );
        let waits = Stage::ALL.map(|stage| {
            wait_family
                .get_or_create(&StageLabels {
                    stage: stage.as_str(),
                })
                .clone()
        });
        Metrics(Arc::new(Inner {
            waits,
            registry,
            connections,
            messages_in,
            deliveries,
            delivered_bytes,
            batch_rows,
            commit_seconds,
            failed_batches,
            errors,
            rate_limited,
            inbox_waits,
        }))
    }
}

impl Metrics {
    pub fn session_opened(&self) {
        self.0.connections.inc();
    }

    pub fn session_closed(&self) {
        self.0.connections.dec();
    }

    pub fn message_in(&self) {
        self.0.messages_in.inc();
    }

    pub fn deliveries(&self, n: u64) {
        self.0.deliveries.inc_by(n);
    }

    pub fn delivered_bytes(&self, n: u64) {
        self.0.delivered_bytes.inc_by(n);
    }

    /// A group-commit batch: its size and commit time if it was stored.
    pub fn batch(&self, rows: usize, took: Duration, ok: bool) {
        if ok {
            self.0.batch_rows.observe(rows as f64);
            self.0.commit_seconds.observe(took.as_secs_f64());
        } else {
            self.0.failed_batches.inc();
        }
    }

    /// `n` errors with this code.
    pub fn errors(&self, code: ErrorCode, n: u64) {
        self.0
            .errors
            .get_or_create(&ErrorLabels {
                code: code.as_str(),
            })
            .inc_by(n);
    }

    pub fn rate_limited(&self) {
        self.0.rate_limited.inc();
    }

    /// Messages that waited `took` at `stage`, one observation each.
    pub fn waited(&self, stage: Stage, took: impl IntoIterator<Item = Duration>) {
        let histogram = &self.0.waits[stage as usize];
        for took in took {
            histogram.observe(took.as_secs_f64());
        }
    }

    /// The gauge of waiting inbox reads, kept by whoever admits them.
    pub fn inbox_waits(&self) -> Gauge {
        self.0.inbox_waits.clone()
    }

    /// Every series, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoding error would be a bug in the crate.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.0.registry) {
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_index_their_own_series() {
        for (index, stage) in Stage::ALL.into_iter().enumerate() {
            assert_eq!(stage as usize, index, "{stage:?}");
        }
    }

    #[test]
    fn series_are_named_and_counted() {
        let metrics = Metrics::default();
        metrics.session_opened();
        metrics.session_opened();
        metrics.session_closed();
        metrics.message_in();
        metrics.deliveries(3);
        metrics.delivered_bytes(300);
        metrics.batch(4, Duration::from_millis(3), true);
        metrics.batch(2, Duration::from_millis(3), false);
        metrics.errors(ErrorCode::InvalidJson, 1);
        metrics.errors(ErrorCode::Unavailable, 5);
        metrics.waited(
            Stage::Queued,
            [Duration::from_micros(50), Duration::from_millis(4)],
        );
        metrics.waited(Stage::Handed, [Duration::from_millis(30)]);
        let text = metrics.encode();
        for line in [
            "agentbus_connections 1",
            "agentbus_messages_in_total 1",
            "agentbus_deliveries_total 3",
            "agentbus_delivered_bytes_total 300",
            "agentbus_persistence_batch_rows_count 1",
            "agentbus_persistence_batch_rows_bucket{le=\"5.0\"} 1",
            "agentbus_persistence_commit_seconds_count 1",
            "agentbus_persistence_failed_batches_total 1",
            "agentbus_errors_total{code=\"invalid_json\"} 1",
            "agentbus_errors_total{code=\"unavailable\"} 5",
            "agentbus_rate_limited_total 0",
            "agentbus_inbox_waits 0",
            "agentbus_message_wait_seconds_count{stage=\"queued\"} 2",
            "agentbus_message_wait_seconds_bucket{le=\"0.0001\",stage=\"queued\"} 1",
            "agentbus_message_wait_seconds_bucket{le=\"0.005\",stage=\"queued\"} 2",
            "agentbus_message_wait_seconds_count{stage=\"commit\"} 0",
            "agentbus_message_wait_seconds_bucket{le=\"0.02\",stage=\"handed\"} 0",
            "agentbus_message_wait_seconds_bucket{le=\"0.05\",stage=\"handed\"} 1",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
    }
}
