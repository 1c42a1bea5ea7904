//! The broker under test: a `serve` process this benchmark starts on a fresh database (and
//! stops, and whose database it drops), or a broker that is already running.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use uuid::Uuid;

use crate::protocol::Listening;

/// How long a spawned broker may take to report its port.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of the spawned broker's log kept to explain a failure.
const LOG_TAIL: usize = 20;

/// Where the broker under test is.
pub struct BrokerTarget {
    /// `ws://host:port`, without a trailing slash.
    pub ws_base: String,
    /// Its database.
    pub database_url: String,
    /// Its process, for CPU and memory figures.
    pub pid: Option<u32>,
}

/// A broker process started by the benchmark. Killed when dropped.
pub struct SpawnedBroker {
    child: Child,
    port: u16,
    database_url: String,
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl SpawnedBroker {
    /// Starts this executable's `serve` on a free port of 127.0.0.1, on `database_url`
    /// (which the broker creates), and waits for its "listening" line.
    pub fn start(database_url: &str, extra_args: &[String]) -> anyhow::Result<SpawnedBroker> {
        let exe = std::env::current_exe().context("finding the agentbus executable")?;
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--database-url",
                database_url,
                // A benchmark measures capacity: the per-connection and per-project rate
                // limits would measure themselves instead. `--broker-arg` can set them back.
                "--rate-per-session",
                "0",
                "--rate-per-project",
                "0",
                "--max-connections-per-project",
                "0",
                "--max-connections-per-address",
                "0",
            ])
            .args(extra_args)
            // Start-up lines are logged at info; per-connection lines are few.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the broker")?;
        let stdout = child.stdout.take().context("the broker's stdout")?;
        let stderr = child.stderr.take().context("the broker's stderr")?;
        let log_tail = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        // The port, from the machine-readable line on stdout; stdout is drained afterwards
        // so the broker never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(listening) = Listening::parse(&line) {
                    let _ = tx.send(listening.port);
                }
            }
        });
        {
            let log_tail = log_tail.clone();
            // Keep the end of the log for error messages, draining it all.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut tail = log_tail.lock().unwrap_or_else(|p| p.into_inner());
                    if tail.len() == LOG_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        let mut broker = SpawnedBroker {
            child,
            port: 0,
            database_url: database_url.to_owned(),
            log_tail,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(port) => broker.port = port,
            Err(_) => anyhow::bail!(
                "the broker did not report its port within {START_TIMEOUT:?}; its log ends with:\n{}",
                broker.log_tail()
            ),
        }
        Ok(broker)
    }

    pub fn target(&self) -> BrokerTarget {
        BrokerTarget {
            ws_base: format!("ws://127.0.0.1:{}", self.port),
            database_url: self.database_url.clone(),
            pid: Some(self.child.id()),
        }
    }

    /// The last lines the broker logged.
    pub fn log_tail(&self) -> String {
        let tail = self.log_tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh database name on `server`: `bench_<uuid>`.
pub fn fresh_database_url(server: &str) -> (String, String) {
    let name = format!("bench_{}", Uuid::new_v4().simple());
    (format!("{}/{name}", server.trim_end_matches('/')), name)
}

/// Drops a database this benchmark created (terminating any connection left to it).
pub async fn drop_database(server: &str, name: &str) -> anyhow::Result<()> {
    crate::db::drop_database(server, name).await
}

/// `ws://host:port` from what the user gave (`ws://host:port/`, `host:port`).
pub fn normalise_target(target: &str) -> String {
    let trimmed = target.trim_end_matches('/');
    if trimmed.starts_with("ws://") || trimmed.starts_with("wss://") {
        trimmed.to_owned()
    } else {
        format!("ws://{trimmed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_targets() {
        assert_eq!(normalise_target("ws://h:1/"), "ws://h:1");
        assert_eq!(normalise_target("h:1"), "ws://h:1");
    }
}
