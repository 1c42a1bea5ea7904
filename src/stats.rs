//! Counters the broker keeps in memory so that `/api/stats` and `/api/projects/{id}/stats`
//! cost no query per call: messages in and out per project (totals, by type, and a rate over
//! the last seconds), and the persistence actor's batch sizes and commit latencies.
//!
//! `Stats` also holds the broker's Prometheus [`Metrics`] and feeds them from the same calls,
//! so a call site reports once for both `/api/stats` and `/metrics`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

use crate::metrics::{Metrics, BATCH_SIZE_BUCKETS, COMMIT_MS_BUCKETS};
use crate::models::StoredMessage;
use crate::protocol::ErrorCode;

/// Seconds over which rates are averaged.
const RATE_WINDOW_SECS: usize = 10;

/// Shared handle to the broker's counters and metrics. Cloning is cheap.
#[derive(Clone)]
pub struct Stats {
    counters: Arc<Mutex<Counters>>,
    metrics: Metrics,
}

struct Counters {
    started: Instant,
    projects: HashMap<Uuid, ProjectCounters>,
    batches: BatchCounters,
}

#[derive(Default)]
struct ProjectCounters {
    messages_in: u64,
    deliveries: u64,
    by_type: HashMap<String, u64>,
    rate_in: RateWindow,
    rate_out: RateWindow,
}

/// Per-second counts over the last [`RATE_WINDOW_SECS`] seconds.
#[derive(Default)]
struct RateWindow {
    buckets: [u64; RATE_WINDOW_SECS],
    /// The second (since start) the newest bucket counts.
    current: u64,
}

impl RateWindow {
    fn add(&mut self, now_sec: u64, n: u64) {
        self.advance(now_sec);
        self.buckets[(now_sec as usize) % RATE_WINDOW_SECS] += n;
    }

    fn advance(&mut self, now_sec: u64) {
        if now_sec <= self.current {
            return;
        }
        let gap = (now_sec - self.current).min(RATE_WINDOW_SECS as u64);
        for s in 1..=gap {
            self.buckets[((self.current + s) as usize) % RATE_WINDOW_SECS] = 0;
        }
        self.current = now_sec;
    }

    /// Average per second over the completed seconds of the window.
    fn per_second(&mut self, now_sec: u64) -> f64 {
        self.advance(now_sec);
        let current = (now_sec as usize) % RATE_WINDOW_SECS;
        let total: u64 = self
            .buckets
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != current)
            .map(|(_, n)| n)
            .sum();
        let seconds = (now_sec as usize).clamp(1, RATE_WINDOW_SECS - 1);
        total as f64 / seconds as f64
    }
}

#[derive(Default, Clone, Serialize)]
pub struct BatchCounters {
    pub batches: u64,
    pub rows: u64,
    pub failed_batches: u64,
    /// Batches per size bucket (`BATCH_SIZE_BUCKETS`, then one for larger).
    pub size_buckets: [u64; BATCH_SIZE_BUCKETS.len() + 1],
    /// Commits per latency bucket (`COMMIT_MS_BUCKETS`, then one for slower).
    pub commit_ms_buckets: [u64; COMMIT_MS_BUCKETS.len() + 1],
    pub commit_ms_total: f64,
}

/// A project's counters, as served.
#[derive(Serialize, Debug, Clone, Default)]
pub struct ProjectSnapshot {
    pub messages_in: u64,
    pub deliveries: u64,
    pub messages_in_per_second: f64,
    pub deliveries_per_second: f64,
    pub messages_by_type: HashMap<String, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            counters: Arc::new(Mutex::new(Counters {
                started: Instant::now(),
                projects: HashMap::new(),
                batches: BatchCounters::default(),
            })),
            metrics: Metrics::default(),
        }
    }
}

impl Stats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A message committed (a retry is not counted again).
    pub fn record_commit(&self, message: &StoredMessage, duplicate: bool) {
        if duplicate {
            return;
        }
        self.metrics.message_in();
        let mut c = self.lock();
        let now = c.started.elapsed().as_secs();
        let p = c.projects.entry(message.project_id).or_default();
        p.messages_in += 1;
        p.rate_in.add(now, 1);
        match p.by_type.get_mut(&message.message_type) {
            Some(n) => *n += 1,
            None => {
                p.by_type.insert(message.message_type.clone(), 1);
            }
        }
    }

    pub fn record_deliveries(&self, project_id: Uuid, n: u64) {
        if n == 0 {
            return;
        }
        self.metrics.deliveries(n);
        let mut c = self.lock();
        let now = c.started.elapsed().as_secs();
        let p = c.projects.entry(project_id).or_default();
        p.deliveries += n;
        p.rate_out.add(now, n);
    }

    pub fn record_batch(&self, rows: usize, took: Duration, ok: bool) {
        self.metrics.batch(rows, took, ok);
        let mut c = self.lock();
        let b = &mut c.batches;
        if !ok {
            b.failed_batches += 1;
            return;
        }
        b.batches += 1;
        b.rows += rows as u64;
        let size = BATCH_SIZE_BUCKETS
            .iter()
            .position(|&max| rows as u64 <= max)
            .unwrap_or(BATCH_SIZE_BUCKETS.len());
        b.size_buckets[size] += 1;
        let ms = took.as_secs_f64() * 1000.0;
        let latency = COMMIT_MS_BUCKETS
            .iter()
            .position(|&max| ms <= max)
            .unwrap_or(COMMIT_MS_BUCKETS.len());
        b.commit_ms_buckets[latency] += 1;
        b.commit_ms_total += ms;
    }

    /// Bytes of message frames handed to sessions (metrics only).
    pub fn record_delivered_bytes(&self, bytes: usize) {
        self.metrics.delivered_bytes(bytes as u64);
    }

    /// `n` errors with this code: error frames sent, or sends the store failed (metrics only).
    pub fn record_errors(&self, code: ErrorCode, n: usize) {
        self.metrics.errors(code, n as u64);
    }

    /// A WebSocket session started (metrics only).
    pub fn session_started(&self) {
        self.metrics.session_opened();
    }

    /// A WebSocket session stopped (metrics only).
    pub fn session_stopped(&self) {
        self.metrics.session_closed();
    }

    /// How long messages waited at one stage of their way (metrics only).
    pub fn record_waits(
        &self,
        stage: crate::metrics::Stage,
        took: impl IntoIterator<Item = Duration>,
    ) {
        self.metrics.waited(stage, took);
    }

    /// The Prometheus metrics fed by these calls.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn project(&self, project_id: Uuid) -> ProjectSnapshot {
        let mut c = self.lock();
        let now = c.started.elapsed().as_secs();
        c.projects
            .get_mut(&project_id)
            .map(|p| snapshot(p, now))
            .unwrap_or_default()
    }

    pub fn all_projects(&self) -> HashMap<Uuid, ProjectSnapshot> {
        let mut c = self.lock();
        let now = c.started.elapsed().as_secs();
        c.projects
            .iter_mut()
            .map(|(id, p)| (*id, snapshot(p, now)))
            .collect()
    }

    pub fn batches(&self) -> BatchCounters {
        self.lock().batches.clone()
    }

    pub fn uptime(&self) -> Duration {
        self.lock().started.elapsed()
    }
}

fn snapshot(p: &mut ProjectCounters, now: u64) -> ProjectSnapshot {
    ProjectSnapshot {
        messages_in: p.messages_in,
        deliveries: p.deliveries,
        messages_in_per_second: p.rate_in.per_second(now),
        deliveries_per_second: p.rate_out.per_second(now),
        messages_by_type: p.by_type.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_average_the_completed_seconds_and_forget_old_ones() {
        let mut w = RateWindow::default();
        w.add(0, 5);
        w.add(1, 10);
        w.add(2, 20);
        // At second 3, seconds 0..=2 are complete: 35 over 3 s.
        assert!((w.per_second(3) - 35.0 / 3.0).abs() < 1e-9);
        // Long after, nothing is left.
        assert_eq!(w.per_second(100), 0.0);
    }

    #[test]
    fn batches_fall_in_their_buckets() {
        let stats = Stats::default();
        stats.record_batch(1, Duration::from_micros(300), true);
        stats.record_batch(700, Duration::from_millis(7), true);
        stats.record_batch(3, Duration::from_millis(1), false);
        let b = stats.batches();
        assert_eq!((b.batches, b.rows, b.failed_batches), (2, 701, 1));
        assert_eq!(b.size_buckets[0], 1);
        assert_eq!(b.size_buckets[7], 1);
        assert_eq!(b.commit_ms_buckets[0], 1);
        assert_eq!(b.commit_ms_buckets[4], 1);
    }
}
