//! What a benchmark reports: one [`RunReport`] per run, printed as a table, as JSON or as
//! CSV.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::brokerstats::{BatchSizes, StageWait};
use super::driver::{DriveResult, Workload};
use super::raw::{RawResult, RAW_BATCH};
use super::verify::Verification;
use crate::metrics::{Stage, WAIT_MS_BUCKETS};

/// Percentiles of one latency, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Option<Latency> {
        (!h.is_empty()).then(|| Latency {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    /// Send → `sent` receipt (the message is durable).
    pub receipt_us: Option<Latency>,
    /// Send → the message frame at each recipient.
    pub delivery_us: Option<Latency>,
    /// Request mode: request sent → reply received.
    pub round_trip_us: Option<Latency>,
}

/// The broker process's resources during the measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct Resources {
    /// CPU seconds used by the broker, by every `postgres` process, and by this benchmark.
    pub broker_cpu_s: Option<f64>,
    pub postgres_cpu_s: Option<f64>,
    pub bench_cpu_s: Option<f64>,
    /// Broker CPU as a percentage of one core over the run.
    pub broker_cpu_pct: Option<f64>,
    pub broker_rss_mib: Option<f64>,
    pub broker_peak_rss_mib: Option<f64>,
}

/// One run: the broker as configured, the broker with group commit off, the raw ceiling, or
/// NATS JetStream.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// `broker`, `batch-1`, `raw-pg` or `jetstream`.
    pub name: String,
    /// `broker` (over WebSockets), `raw` (commit_batch, no broker) or `jetstream` (the same
    /// workload against NATS JetStream; its "broker" resources are nats-server's).
    pub kind: &'static str,
    /// The spawned broker's `--batch-max-rows` (null: its default or not spawned), or the
    /// raw ceiling's batch size.
    pub batch_max_rows: Option<usize>,
    pub ok: bool,
    pub messages_acked: u64,
    pub deliveries: u64,
    /// Seconds from the start to the last receipt (raw: to the last commit).
    pub elapsed_s: f64,
    pub messages_per_s: f64,
    pub deliveries_per_s: Option<f64>,
    pub latency: Latencies,
    pub resources: Resources,
    /// Rows per persistence batch, when the broker exposes its counters (null otherwise).
    pub batch_sizes: Option<BatchSizes>,
    /// How long messages waited at each stage inside the broker (`queued`, `commit`,
    /// `routed`, `handed`), from its `/metrics`; null for a broker without them.
    pub broker_waits: Option<BTreeMap<String, StageWait>>,
    pub verification: Verification,
}

/// The name of the JetStream run (see [`super::jetstream`]).
const JETSTREAM: &str = super::jetstream::RUN_NAME;

/// `a ÷ b`, when both are known and `b` is not zero.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

impl RunReport {
    pub fn from_drive(
        name: &str,
        batch_max_rows: Option<usize>,
        run: &DriveResult,
        verification: Verification,
    ) -> RunReport {
        let mut receipt = Histogram::<u64>::new_from(&run.agents[0].receipt_latency);
        let mut delivery = receipt.clone();
        let mut round_trip = receipt.clone();
        for agent in &run.agents {
            // Histograms of the same bounds always add.
            let _ = receipt.add(&agent.receipt_latency);
            let _ = delivery.add(&agent.delivery_latency);
            let _ = round_trip.add(&agent.round_trip);
        }
        let deliveries = verification.delivered_once;
        RunReport {
            name: name.to_owned(),
            kind: "broker",
            batch_max_rows,
            ok: verification.failures.is_empty(),
            messages_acked: verification.acknowledged,
            deliveries,
            elapsed_s: run.receipts_elapsed,
            messages_per_s: rate(verification.acknowledged, run.receipts_elapsed),
            deliveries_per_s: Some(rate(deliveries, run.deliveries_elapsed)),
            latency: Latencies {
                receipt_us: Latency::of(&receipt),
                delivery_us: Latency::of(&delivery),
                round_trip_us: Latency::of(&round_trip),
            },
            resources: Resources {
                broker_cpu_s: run.cpu.broker,
                postgres_cpu_s: run.cpu.postgres,
                bench_cpu_s: run.cpu.bench,
                broker_cpu_pct: run
                    .cpu
                    .broker
                    .filter(|_| run.wall > 0.0)
                    .map(|s| 100.0 * s / run.wall),
                broker_rss_mib: run.broker_memory.map(|m| m.0),
                broker_peak_rss_mib: run.broker_memory.map(|m| m.1),
            },
            batch_sizes: run.batch_sizes.clone(),
            broker_waits: run.waits.clone(),
            verification,
        }
    }

    pub fn from_raw(raw: RawResult) -> RunReport {
        RunReport {
            name: "raw-pg".to_owned(),
            kind: "raw",
            batch_max_rows: Some(RAW_BATCH),
            ok: raw.verification.failures.is_empty(),
            messages_acked: raw.rows,
            deliveries: 0,
            elapsed_s: raw.elapsed,
            messages_per_s: rate(raw.rows, raw.elapsed),
            deliveries_per_s: None,
            latency: Latencies {
                receipt_us: None,
                delivery_us: None,
                round_trip_us: None,
            },
            resources: Resources {
                broker_cpu_s: None,
                postgres_cpu_s: raw.cpu.postgres,
                bench_cpu_s: raw.cpu.bench,
                broker_cpu_pct: None,
                broker_rss_mib: None,
                broker_peak_rss_mib: None,
            },
            batch_sizes: Some(BatchSizes {
                batches: raw.rows.div_ceil(RAW_BATCH as u64),
                rows: raw.rows,
                mean_rows: raw.rows as f64 / raw.rows.div_ceil(RAW_BATCH as u64).max(1) as f64,
            }),
            broker_waits: None,
            verification: raw.verification,
        }
    }
}

/// The workload as reported: as given, and what it should produce.
#[derive(Debug, Serialize)]
pub struct WorkloadReport {
    #[serde(flatten)]
    pub workload: Workload,
    pub expected_messages: u64,
    pub expected_deliveries: u64,
}

impl WorkloadReport {
    pub fn of(w: &Workload) -> Self {
        WorkloadReport {
            workload: w.clone(),
            expected_messages: w.expected_messages(),
            expected_deliveries: w.expected_deliveries(),
        }
    }
}

/// agentbus (the `broker` run) ÷ JetStream (the `jetstream` run). Above 1 the broker
/// moves more per second, or (latencies) takes longer.
#[derive(Debug, Serialize)]
pub struct JetStreamRatios {
    pub messages_per_s: Option<f64>,
    pub deliveries_per_s: Option<f64>,
    /// Send → delivery p50 and p99.
    pub delivery_p50: Option<f64>,
    pub delivery_p99: Option<f64>,
}

/// Ratios of a `--compare` invocation, and of one with `--jetstream` and a broker run.
#[derive(Debug, Serialize)]
pub struct Ratios {
    /// messages/s of the broker as configured ÷ the broker with one commit per message.
    pub broker_vs_batch1: Option<f64>,
    /// The raw ceiling ÷ the broker with one commit per message.
    pub raw_vs_batch1: Option<f64>,
    /// The broker as configured ÷ the raw ceiling (the share of the ceiling it reaches).
    pub broker_vs_raw: Option<f64>,
    /// The broker as configured ÷ NATS JetStream, when both ran (`--jetstream`).
    pub broker_vs_jetstream: Option<JetStreamRatios>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub failures: Vec<String>,
    pub workload: WorkloadReport,
    pub target: String,
    pub runs: Vec<RunReport>,
    pub ratios: Option<Ratios>,
}

impl Report {
    pub fn new(target: String, w: &Workload, runs: Vec<RunReport>, compare: bool) -> Report {
        let failures: Vec<String> = runs
            .iter()
            .flat_map(|r| {
                r.verification
                    .failures
                    .iter()
                    .map(move |f| format!("{}: {f}", r.name))
            })
            .collect();
        let run = |name: &str| runs.iter().find(|r| r.name == name);
        let jetstream = run(JETSTREAM);
        let ratios = (compare || jetstream.is_some()).then(|| {
            let find = |name: &str| run(name).map(|r| r.messages_per_s);
            let (broker, batch1, raw) = (find("broker"), find("batch-1"), find("raw-pg"));
            let broker_vs_jetstream = run("broker").zip(jetstream).map(|(b, j)| {
                let delivery = |r: &RunReport, q: fn(&Latency) -> u64| {
                    r.latency.delivery_us.as_ref().map(|l| q(l) as f64)
                };
                JetStreamRatios {
                    messages_per_s: ratio(Some(b.messages_per_s), Some(j.messages_per_s)),
                    deliveries_per_s: ratio(b.deliveries_per_s, j.deliveries_per_s),
                    delivery_p50: ratio(delivery(b, |l| l.p50), delivery(j, |l| l.p50)),
                    delivery_p99: ratio(delivery(b, |l| l.p99), delivery(j, |l| l.p99)),
                }
            });
            Ratios {
                broker_vs_batch1: ratio(broker, batch1),
                raw_vs_batch1: ratio(raw, batch1),
                broker_vs_raw: ratio(broker, raw),
                broker_vs_jetstream,
            }
        });
        Report {
            ok: failures.is_empty(),
            failures,
            workload: WorkloadReport::of(w),
            target,
            runs,
            ratios,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serialises")
    }

    pub fn to_csv(&self) -> String {
        let mut out = String::from(CSV_HEADER);
        out.push('\n');
        let w = &self.workload.workload;
        for r in &self.runs {
            let lat = |l: &Option<Latency>| match l {
                Some(l) => format!("{},{},{},{},{}", l.p50, l.p90, l.p99, l.p999, l.max),
                None => ",,,,".to_owned(),
            };
            let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
            let fields = [
                r.name.clone(),
                format!("{:?}", w.mode).to_lowercase(),
                w.projects.to_string(),
                w.agents.to_string(),
                w.messages.to_string(),
                w.size.to_string(),
                w.window.to_string(),
                w.rate.map(|r| r.to_string()).unwrap_or_default(),
                w.connections.to_string(),
                r.batch_max_rows.map(|b| b.to_string()).unwrap_or_default(),
                r.messages_acked.to_string(),
                r.deliveries.to_string(),
                format!("{:.4}", r.elapsed_s),
                format!("{:.1}", r.messages_per_s),
                r.deliveries_per_s
                    .map(|d| format!("{d:.1}"))
                    .unwrap_or_default(),
                lat(&r.latency.receipt_us),
                lat(&r.latency.delivery_us),
                lat(&r.latency.round_trip_us),
                opt(r.resources.broker_cpu_s),
                opt(r.resources.postgres_cpu_s),
                opt(r.resources.bench_cpu_s),
                opt(r.resources.broker_peak_rss_mib),
                r.ok.to_string(),
            ];
            out.push_str(&fields.join(","));
            out.push('\n');
        }
        out
    }

    pub fn to_table(&self) -> String {
        let w = &self.workload.workload;
        let mut out = format!(
            "agentbus bench: {} projects x {} agents x {} messages of {} B, {}, {}, {} idle connections; broker {}\n\n",
            w.projects,
            w.agents,
            w.messages,
            w.size,
            format!("{:?}", w.mode).to_lowercase(),
            match w.rate {
                Some(r) => format!("fixed rate {r} msg/s"),
                None => format!("open loop (window {})", w.window),
            },
            w.connections,
            self.target
        );
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        let mut row = |label: &str, f: &dyn Fn(&RunReport) -> String| {
            rows.push((label.to_owned(), self.runs.iter().map(f).collect()));
        };
        let int = |v: f64| group_thousands(v.round() as u64);
        let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
        let na = || "n/a".to_owned();
        let opt1 = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(na);
        row(
            "group commit (batch max rows)",
            &|r| match (r.kind, r.batch_max_rows) {
                ("jetstream", _) => na(),
                ("raw", Some(b)) => format!("{b} fixed"),
                (_, Some(b)) => b.to_string(),
                (_, None) => "default".to_owned(),
            },
        );
        row("messages acknowledged", &|r| int(r.messages_acked as f64));
        row("deliveries (exactly once)", &|r| match r.kind {
            "raw" => na(),
            _ => int(r.deliveries as f64),
        });
        row("elapsed s", &|r| format!("{:.3}", r.elapsed_s));
        row("messages/s", &|r| int(r.messages_per_s));
        row("deliveries/s", &|r| {
            r.deliveries_per_s.map(int).unwrap_or_else(na)
        });
        type Pick = fn(&Latencies) -> &Option<Latency>;
        let lat_rows: [(&str, Pick); 3] = [
            ("send -> receipt", |l| &l.receipt_us),
            ("send -> delivery", |l| &l.delivery_us),
            ("request round trip", |l| &l.round_trip_us),
        ];
        for (label, pick) in lat_rows {
            if self.runs.iter().all(|r| pick(&r.latency).is_none()) {
                continue;
            }
            for (q, get) in [
                ("p50", (|l: &Latency| l.p50) as fn(&Latency) -> u64),
                ("p90", |l| l.p90),
                ("p99", |l| l.p99),
                ("p99.9", |l| l.p999),
                ("max", |l| l.max),
            ] {
                row(&format!("{label} {q} ms"), &|r| {
                    pick(&r.latency)
                        .as_ref()
                        .map(|l| ms(get(l)))
                        .unwrap_or_else(na)
                });
            }
        }
        row("broker CPU s (% of a core)", &|r| match (
            r.resources.broker_cpu_s,
            r.resources.broker_cpu_pct,
        ) {
            (Some(s), Some(p)) => format!("{s:.2} ({p:.0}%)"),
            _ => na(),
        });
        row("postgres CPU s", &|r| opt1(r.resources.postgres_cpu_s));
        row("bench CPU s", &|r| opt1(r.resources.bench_cpu_s));
        row("broker RSS MiB (peak)", &|r| match (
            r.resources.broker_rss_mib,
            r.resources.broker_peak_rss_mib,
        ) {
            (Some(now), Some(peak)) => format!("{now:.0} ({peak:.0})"),
            _ => na(),
        });
        row("persistence batch rows (mean)", &|r| {
            r.batch_sizes
                .as_ref()
                .map(|b| format!("{:.1} ({} batches)", b.mean_rows, b.batches))
                .unwrap_or_else(na)
        });
        row(
            "broker waits ms, mean (p99 ≤)",
            &|r| match &r.broker_waits {
                Some(waits) if !waits.is_empty() => Stage::ALL
                    .iter()
                    .filter_map(|stage| {
                        let w = waits.get(stage.as_str())?;
                        let p99 = w.p99_ms_at_most.map_or_else(
                            || format!(">{}", WAIT_MS_BUCKETS[WAIT_MS_BUCKETS.len() - 1]),
                            |ms| format!("{ms}"),
                        );
                        Some(format!("{} {:.2} ({p99})", stage.as_str(), w.mean_ms))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => na(),
            },
        );
        row("verified", &|r| {
            if r.ok && r.kind == "jetstream" {
                format!("OK ({} in stream)", r.verification.db_rows)
            } else if r.ok {
                format!("OK ({} rows in PG)", r.verification.db_rows)
            } else {
                "FAILED".to_owned()
            }
        });
        let label_width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..self.runs.len())
            .map(|i| {
                rows.iter()
                    .map(|(_, v)| v[i].len())
                    .chain([self.runs[i].name.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        out.push_str(&format!("{:label_width$}", ""));
        for (run, width) in self.runs.iter().zip(&widths) {
            out.push_str(&format!("  {:>width$}", run.name));
        }
        out.push('\n');
        for (label, values) in &rows {
            out.push_str(&format!("{label:label_width$}"));
            for (value, width) in values.iter().zip(&widths) {
                out.push_str(&format!("  {value:>width$}"));
            }
            out.push('\n');
        }
        let x = |v: Option<f64>| v.map(|v| format!("{v:.2}x")).unwrap_or_else(na);
        let compared = self
            .runs
            .iter()
            .any(|r| r.name == "batch-1" || r.name == "raw-pg");
        if let Some(r) = self.ratios.as_ref().filter(|_| compared) {
            out.push_str(&format!(
                "\nmessages/s against batch-1 (one commit per message): broker {}, raw ceiling {}; broker reaches {} of the raw ceiling\n",
                x(r.broker_vs_batch1),
                x(r.raw_vs_batch1),
                r.broker_vs_raw
                    .map(|v| format!("{:.0}%", 100.0 * v))
                    .unwrap_or_else(na)
            ));
        }
        if let Some(j) = self
            .ratios
            .as_ref()
            .and_then(|r| r.broker_vs_jetstream.as_ref())
        {
            out.push_str(&format!(
                "\nbroker against JetStream (above 1x: the broker moves more per second, or takes longer): messages/s {}, deliveries/s {}, send -> delivery p50 {}, p99 {}\n",
                x(j.messages_per_s),
                x(j.deliveries_per_s),
                x(j.delivery_p50),
                x(j.delivery_p99)
            ));
        }
        let in_store = if self.runs.iter().any(|r| r.kind == "jetstream") {
            "in PostgreSQL (JetStream: in its stream)"
        } else {
            "in PostgreSQL"
        };
        if self.failures.is_empty() {
            out.push_str(&format!("\nverification: every expected delivery arrived exactly once, nothing was misrouted, every acknowledged message is {in_store} with its seq\n"));
        } else {
            out.push_str("\nVERIFICATION FAILED:\n");
            for f in &self.failures {
                out.push_str(&format!("  - {f}\n"));
            }
        }
        out
    }
}

const CSV_HEADER: &str = "run,mode,projects,agents,messages,size,window,rate,connections,\
batch_max_rows,messages_acked,deliveries,elapsed_s,messages_per_s,deliveries_per_s,\
receipt_p50_us,receipt_p90_us,receipt_p99_us,receipt_p999_us,receipt_max_us,\
delivery_p50_us,delivery_p90_us,delivery_p99_us,delivery_p999_us,delivery_max_us,\
rtt_p50_us,rtt_p90_us,rtt_p99_us,rtt_p999_us,rtt_max_us,\
broker_cpu_s,postgres_cpu_s,bench_cpu_s,broker_peak_rss_mib,ok";

/// 12345678 → "12,345,678".
fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1_000), "1,000");
        assert_eq!(group_thousands(12_345_678), "12,345,678");
    }

    #[test]
    fn the_csv_header_and_rows_have_the_same_width() {
        let header_fields = CSV_HEADER.split(',').count();
        // 15 plain fields, three latencies of five, 4 resources and ok.
        assert_eq!(header_fields, 15 + 3 * 5 + 4 + 1);
    }
}
