//! The broker killed with SIGKILL loses nothing it acknowledged, and cursors survive.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentbus::protocol::Listening;
use serde_json::{json, Value};

use crate::helpers::{eventually, status, Agent, TestApp, PATIENCE};

/// The `agentbus` binary running `serve` on a free port.
pub struct BrokerProcess {
    pub child: Child,
    pub port: u16,
}

impl BrokerProcess {
    /// `serve` on a free port against this database.
    pub fn start(database_url: &str) -> BrokerProcess {
        BrokerProcess::start_on(database_url, 0)
    }

    /// `serve` on this port (0: a free one) against this database: a broker that restarts
    /// where its clients were.
    pub fn start_on(database_url: &str, port: u16) -> BrokerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agentbus"));
        command
            .args([
                "serve",
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--workers",
                "2",
            ])
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "info");
        BrokerProcess::spawn(command)
    }

    /// Starts the command and waits for its machine-readable `listening` line on stdout;
    /// panics with its log if it exits first.
    pub fn spawn(mut command: Command) -> BrokerProcess {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agentbus binary");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(listening) = Listening::parse(&line) {
                        let _ = tx.send(Ok(listening.port));
                    }
                }
            });
        }
        // Keep draining the log so the broker never blocks on a full pipe; it ends when the
        // broker exits.
        std::thread::spawn(move || {
            let mut log = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.push_str(&line);
                log.push('\n');
            }
            let _ = tx.send(Err(log));
        });
        let started = rx.recv_timeout(PATIENCE);
        if !matches!(started, Ok(Ok(_))) {
            // Not left running (and holding its database) past the test.
            let _ = child.kill();
            let _ = child.wait();
        }
        match started {
            Ok(Ok(port)) => BrokerProcess { child, port },
            Ok(Err(log)) => panic!("the broker exited:\n{log}"),
            Err(_) => panic!("the broker did not report its port"),
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seq(frame: &Value) -> i64 {
    frame["seq"].as_i64().expect("seq")
}

#[tokio::test]
async fn nothing_acknowledged_is_lost_to_sigkill_and_cursors_survive() {
    // The harness app only creates (and finally drops) the database; the brokers under test
    // are separate processes on it, declared after it so that they are killed before the
    // database is dropped, whatever happens.
    let app = TestApp::spawn().await;
    let database_url = app.database_url.clone();
    let project = app.create_project("crash").await;
    app.stop();

    let broker = BrokerProcess::start(&database_url);
    let ws = |port: u16, query: &str| {
        format!("ws://127.0.0.1:{port}/ws/agent/messages/{project}?{query}")
    };
    let b = Agent::connect(&ws(broker.port, "agent_id=b&ack=manual")).await;
    b.close().await;
    let mut a = Agent::connect(&ws(broker.port, "agent_id=a")).await;
    for n in 1..=30 {
        let frame = if n % 4 == 0 {
            json!({"content": format!("m{n}"), "to": "b"})
        } else {
            status(&format!("m{n}"))
        };
        a.send_ok(frame).await;
    }
    // b takes the first ten and acknowledges them.
    let mut b = Agent::connect(&ws(broker.port, "agent_id=b&ack=manual")).await;
    for expected in 1..=10 {
        assert_eq!(seq(&b.expect_op("message").await), expected);
    }
    b.send(json!({"op": "ack", "up_to": 10})).await;
    let http = app.http.clone();
    let agents_url = format!(
        "http://127.0.0.1:{}/api/projects/{project}/agents",
        broker.port
    );
    eventually("b's floor to be recorded", || async {
        let body: Value = http.get(&agents_url).send().await.ok()?.json().await.ok()?;
        let row = body["agents"]
            .as_array()?
            .iter()
            .find(|m| m["agent_id"] == "b")?
            .clone();
        (row["ack_floor"] == 10).then_some(())
    })
    .await;
    b.close().await;

    // 200 more, pipelined, and the broker dies as soon as the last receipt is in.
    for n in 0..200 {
        a.send(json!({"content": format!("burst {n}"), "client_msg_id": format!("burst-{n}")}))
            .await;
    }
    let mut receipts = Vec::new();
    while receipts.len() < 200 {
        let frame = a.expect_op("sent").await;
        receipts.push((frame["id"].as_str().expect("id").to_owned(), seq(&frame)));
    }
    broker.kill();

    let broker = BrokerProcess::start(&database_url);
    // Every acknowledged message is there, with its seq.
    let history: Value = http
        .get(format!(
            "http://127.0.0.1:{}/api/projects/{project}/messages?after_seq=30&limit=1000",
            broker.port
        ))
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("JSON");
    let stored: Vec<(String, i64)> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or_default().to_owned(), seq(m)))
        .collect();
    assert_eq!(stored, receipts);

    // b's cursor survived: it gets exactly what it had not acknowledged.
    let mut b = Agent::connect(&ws(broker.port, "agent_id=b&ack=manual")).await;
    assert_eq!(b.welcome["ack_floor"], 10);
    assert_eq!(b.welcome["replay"], 220);
    let mut expected = 11;
    while expected <= 230 {
        let m = tokio::time::timeout(Duration::from_secs(30), b.expect_op("message"))
            .await
            .expect("replay");
        assert_eq!(seq(&m), expected);
        b.send(json!({"op": "ack", "seqs": [expected]})).await;
        expected += 1;
    }
}
