//! `agentbus bench` against brokers it spawns itself: tiny runs that must verify, count
//! exactly, and fail loudly when a delivery is lost. No test here asserts a speed.

use std::process::{Command, Output};

use serde_json::Value;

use crate::helpers::server_url;

/// Runs the real binary's `bench --spawn --json` with these extra arguments.
fn bench(extra: &[&str]) -> (Output, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .arg("bench")
        .args(["--database-server", &server_url(), "--json"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run agentbus bench");
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON report ({e}); stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, report)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_tiny_broadcast_run_is_verified_and_counted_exactly() {
    let (output, report) = bench(&[
        "--spawn",
        "--projects",
        "2",
        "--agents",
        "3",
        "--messages",
        "20",
    ]);
    assert!(
        output.status.success(),
        "bench failed:\n{}",
        stderr(&output)
    );
    assert_eq!(report["ok"], true, "{report:#}");
    let run = &report["runs"][0];
    assert_eq!(run["name"], "broker");
    assert_small_broadcast_verified(run);
    // The broker's own account of where each message waited: every send queued, committed
    // and routed once, every delivery handed to its session once.
    let waits = &run["broker_waits"];
    for (stage, count) in [
        ("queued", 120),
        ("commit", 120),
        ("routed", 120),
        ("handed", 240),
    ] {
        assert_eq!(waits[stage]["count"], count, "{stage}: {waits:#}");
        assert!(waits[stage]["mean_ms"].as_f64().is_some(), "{waits:#}");
    }
}

/// A verified run of 2 projects x 3 agents x 20 broadcasts, each to the 2 other agents of its
/// project: everything acknowledged, delivered once and stored (for JetStream: in the stream
/// read back), nothing else.
fn assert_small_broadcast_verified(run: &Value) {
    assert_eq!(run["messages_acked"], 120, "{run:#}");
    assert_eq!(run["deliveries"], 240, "{run:#}");
    let v = &run["verification"];
    assert_eq!(v["expected_deliveries"], 240);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicated"], 0);
    assert_eq!(v["anomalies"], 0);
    assert_eq!(v["db_rows"], 120);
    assert_eq!(v["db_matching"], 120);
    assert_eq!(run["latency"]["receipt_us"]["count"], 120);
    assert_eq!(run["latency"]["delivery_us"]["count"], 240);
}

#[test]
fn a_request_run_at_a_fixed_rate_counts_requests_and_replies() {
    let (output, report) = bench(&[
        "--spawn",
        "--projects",
        "2",
        "--agents",
        "3",
        "--messages",
        "20",
        "--mode",
        "request",
        "--rate",
        "500",
        "--connections",
        "3",
    ]);
    assert!(
        output.status.success(),
        "bench failed:\n{}",
        stderr(&output)
    );
    let run = &report["runs"][0];
    // 120 requests and their 120 replies, each delivered once.
    assert_eq!(run["messages_acked"], 240);
    assert_eq!(run["deliveries"], 240);
    assert_eq!(run["latency"]["round_trip_us"]["count"], 120);
    assert_eq!(run["verification"]["idle_received"], 0);
    assert_eq!(run["verification"]["db_matching"], 240);
}

#[test]
fn a_deliberately_ignored_delivery_is_reported_as_lost_and_fails_the_run() {
    let (output, report) = bench(&[
        "--spawn",
        "--projects",
        "2",
        "--agents",
        "3",
        "--messages",
        "20",
        "--fault-drop-every",
        "7",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("VERIFICATION FAILED"), "{err}");
    assert!(
        err.contains("lost"),
        "the failure must name the loss:\n{err}"
    );
    assert_eq!(report["ok"], false);
    // Each of the 6 agents receives 40 deliveries and ignores every 7th: 5 each.
    let v = &report["runs"][0]["verification"];
    assert_eq!(v["lost"], 30);
    assert_eq!(v["delivered_once"], 210);
    // What was acknowledged is still all in PostgreSQL.
    assert_eq!(v["db_matching"], 120);
}

#[test]
fn compare_runs_the_broker_one_commit_per_message_and_the_raw_ceiling() {
    let (output, report) = bench(&[
        "--compare",
        "--projects",
        "1",
        "--agents",
        "2",
        "--messages",
        "10",
    ]);
    assert!(
        output.status.success(),
        "bench failed:\n{}",
        stderr(&output)
    );
    let names: Vec<&str> = report["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["broker", "batch-1", "raw-pg"]);
    for run in report["runs"].as_array().expect("runs") {
        assert_eq!(run["ok"], true, "{run:#}");
        assert_eq!(run["messages_acked"], 20);
    }
    assert_eq!(report["runs"][1]["batch_max_rows"], 1);
    assert!(report["ratios"]["broker_vs_batch1"].as_f64().is_some());
    assert!(report["ratios"]["raw_vs_batch1"].as_f64().is_some());
}

/// The JetStream run needs a nats-server to start: missing, the test says so and fails
/// (`.ci/run` installs Debian's `nats-server`), rather than passing without having run.
fn require_nats_server() {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("nats-server").is_file()))
        .unwrap_or(false)
        || std::path::Path::new("/usr/sbin/nats-server").is_file();
    assert!(
        found,
        "nats-server is not installed (not on PATH, nor at /usr/sbin/nats-server): the \
         JetStream comparison cannot run. Install it (Debian: apt-get install nats-server; \
         .ci/run does)."
    );
}

#[test]
fn jetstream_runs_the_same_workload_verified_and_compared_with_the_broker() {
    require_nats_server();
    // --jetstream without a URL: the bench starts its own nats-server on a free port.
    let (output, report) = bench(&[
        "--spawn",
        "--jetstream",
        "--projects",
        "2",
        "--agents",
        "3",
        "--messages",
        "20",
        "--window",
        "8",
    ]);
    assert!(
        output.status.success(),
        "bench failed:\n{}",
        stderr(&output)
    );
    assert_eq!(report["ok"], true, "{report:#}");
    let names: Vec<&str> = report["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    // The broker's run keeps its place: scripts read runs[0].
    assert_eq!(names, ["broker", "jetstream"]);
    let run = &report["runs"][1];
    assert_eq!(run["kind"], "jetstream");
    assert_eq!(run["ok"], true, "{run:#}");
    assert_small_broadcast_verified(run);
    // The spawned nats-server's CPU and memory, from /proc.
    assert!(
        run["resources"]["broker_cpu_s"].as_f64().is_some(),
        "{run:#}"
    );
    assert!(report["target"]
        .as_str()
        .is_some_and(|t| t.contains("JetStream")));
    let ratios = &report["ratios"]["broker_vs_jetstream"];
    for ratio in [
        "messages_per_s",
        "deliveries_per_s",
        "delivery_p50",
        "delivery_p99",
    ] {
        assert!(ratios[ratio].as_f64().is_some(), "{ratio}: {report:#}");
    }
}
