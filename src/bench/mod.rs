//! `agentbus bench`: drives a broker over real WebSockets exactly as agents would, measures
//! throughput, latency and the broker's resources, and verifies every run.
//!
//! - [`cli`]: the options.
//! - [`broker`]: the broker under test (spawned on a fresh database, or already running).
//! - [`driver`]: the agents: send, receive, reply, time.
//! - [`verify`]: exactly-once delivery, routing, and every acknowledged message in
//!   PostgreSQL with its seq.
//! - [`raw`]: the raw PostgreSQL ceiling (`commit_batch` with no broker).
//! - [`jetstream`]: the same workload against NATS JetStream (`--jetstream`), for comparison.
//! - [`report`]: the table, JSON and CSV.
//! - [`procstat`]: CPU and memory from /proc.
//! - [`brokerstats`]: the broker's persistence batch sizes, when it exposes them.
//!
//! `docs/PERFORMANCE.md` has the measurements and how they were made.

pub mod broker;
pub mod brokerstats;
pub mod cli;
pub mod driver;
pub mod jetstream;
pub mod procstat;
pub mod raw;
pub mod report;
pub mod verify;

use std::time::Duration;

pub use cli::{BenchArgs, Mode};

use broker::{drop_database, fresh_database_url, normalise_target, BrokerTarget, SpawnedBroker};
use driver::Workload;
use report::{Report, RunReport};

/// `agentbus bench`: runs the benchmark the options describe and prints its report. When
/// any run lost, duplicated or misrouted anything, it says so on stderr and the process
/// exits with status 1 (other errors are returned, as for every command).
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(&args))?;
    if args.json {
        println!("{}", report.to_json());
    } else if args.csv {
        print!("{}", report.to_csv());
    } else {
        print!("{}", report.to_table());
    }
    if !report.ok {
        let _ = std::io::Write::flush(&mut std::io::stdout());
        eprintln!(
            "agentbus bench: VERIFICATION FAILED:\n  - {}",
            report.failures.join("\n  - ")
        );
        std::process::exit(1);
    }
    Ok(())
}

fn workload(args: &BenchArgs) -> Workload {
    Workload {
        projects: args.projects,
        agents: args.agents,
        messages: args.messages,
        size: args.size,
        mode: args.mode,
        window: args.window,
        rate: args.rate,
        connections: args.connections,
        settle: Duration::from_millis(args.settle_ms),
        fault_drop_every: args.fault_drop_every,
    }
}

/// Every run the options ask for, in order, with its report.
pub async fn measure(args: &BenchArgs) -> anyhow::Result<Report> {
    let w = workload(args);
    let mut runs = Vec::new();
    let broker_target = if args.spawns() {
        let mut extra = args.broker_args.clone();
        if let Some(rows) = args.batch_max_rows {
            extra.extend(["--batch-max-rows".to_owned(), rows.to_string()]);
        }
        runs.push(spawned_run(args, &w, "broker", &extra, args.batch_max_rows).await?);
        if args.compare {
            let mut extra = args.broker_args.clone();
            extra.extend(["--batch-max-rows".to_owned(), "1".to_owned()]);
            runs.push(spawned_run(args, &w, "batch-1", &extra, Some(1)).await?);
            log::info!("raw-pg: writing the same rows with commit_batch, no broker");
            let raw = raw::run(&args.database_server, &w).await?;
            runs.push(RunReport::from_raw(raw));
        }
        Some(format!("spawned on {}", args.database_server))
    } else if let Some(target) = args.target.as_deref() {
        let target = BrokerTarget {
            ws_base: normalise_target(target),
            more_nodes: Vec::new(),
            database_url: args.database_url.clone(),
            pid: args.pid,
        };
        let label = uuid::Uuid::new_v4().simple().to_string();
        let run = driver::drive(&target, &w, &label[..8], &mut || true).await?;
        let verification = verify::verify(&target.database_url, &w, &run).await?;
        runs.push(RunReport::from_drive("broker", None, &run, verification));
        Some(target.ws_base)
    } else {
        None
    };
    // Last, so that the runs before it keep their places in the report.
    let jetstream_target = match args.jetstream_target() {
        Some(nats) => {
            log::info!(
                "{}: the same workload against NATS JetStream",
                jetstream::RUN_NAME
            );
            let (run, described) = jetstream::run(&nats, &w).await?;
            runs.push(run);
            Some(described)
        }
        None => None,
    };
    let target = match (broker_target, jetstream_target) {
        (Some(broker), Some(nats)) => format!("{broker}; {nats}"),
        (Some(only), None) | (None, Some(only)) => only,
        (None, None) => {
            anyhow::bail!("nothing to measure: give --target, --spawn, --compare or --jetstream")
        }
    };
    Ok(Report::new(target, &w, runs, args.compare))
}

/// Spawns a broker on a fresh database, runs the workload against it, verifies, and cleans
/// up (broker stopped, database dropped) whatever happened.
async fn spawned_run(
    args: &BenchArgs,
    w: &Workload,
    name: &str,
    extra: &[String],
    batch_max_rows: Option<usize>,
) -> anyhow::Result<RunReport> {
    let (database_url, db_name) = fresh_database_url(&args.database_server);
    log::info!("{name}: starting a broker on {database_url}");
    let started = {
        let (url, extra, nodes) = (database_url.clone(), extra.to_vec(), args.nodes);
        tokio::task::spawn_blocking(move || broker::start_nodes(&url, &extra, nodes)).await?
    };
    let result = match started {
        Ok((mut broker, mut more)) => {
            let mut target = broker.target();
            target.more_nodes = more.iter().map(|b| b.target().ws_base).collect();
            let result = async {
                let run = {
                    let mut alive =
                        || broker.is_running() && more.iter_mut().all(SpawnedBroker::is_running);
                    driver::drive(&target, w, name, &mut alive).await?
                };
                let verification = verify::verify(&database_url, w, &run).await?;
                let mut report = RunReport::from_drive(name, batch_max_rows, &run, verification);
                if run.broker_died {
                    report.verification.failures.push(format!(
                        "the broker's log ends with:\n{}",
                        broker.log_tail()
                    ));
                }
                Ok::<_, anyhow::Error>(report)
            }
            .await;
            broker.stop();
            result
        }
        Err(e) => Err(e),
    };
    if let Err(e) = drop_database(&args.database_server, &db_name).await {
        log::warn!("{e:#}");
    }
    result
}
