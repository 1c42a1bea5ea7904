//! The console in a real browser (feature `browser-tests`): a broker with a project full of
//! agent traffic, and `tests/console/e2e.mjs` driving headless Chromium through it.
//!
//! Needs Node.js, `npm ci` in `tests/console` and `/usr/bin/chromium` (see docs/CONSOLE.md).
//! The script asks this side to act with `@@ ` lines on its stdout; see the script's header.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::helpers::{Agent, TestApp};

/// The whole browser run, generous: it only catches a hung browser.
const SCRIPT_LIMIT: Duration = Duration::from_secs(180);
/// Filler ahead of the conversation, so the first page (100) is not the whole history.
const FILLER: usize = 130;

#[tokio::test]
async fn the_console_shows_the_traffic_of_a_project_and_sends_as_the_operator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/console/e2e.mjs");
    assert!(
        root.join("tests/console/node_modules/playwright-core")
            .is_dir(),
        "run `npm ci` in tests/console first (see docs/CONSOLE.md)"
    );
    let artefacts = root.join("target/test-artefacts");
    std::fs::create_dir_all(&artefacts).expect("create target/test-artefacts");
    let screenshot = artefacts.join("console.png");
    let _ = std::fs::remove_file(&screenshot);

    // The agents sit unread while the browser works: keep the broker from timing them out.
    let app = TestApp::spawn_with(|s| s.client_timeout_ms = 600_000).await;
    let project = app.create_project("console e2e").await;
    let mut alpha = app.connect(project, "alpha", "planner").await;
    let mut beta = app.connect(project, "beta", "coder").await;
    populate(&app, project, &mut alpha, &mut beta).await;

    let mut script = Script(
        Command::new("node")
            .arg(&script)
            .arg(app.url(""))
            .arg(project.to_string())
            .arg(&artefacts)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node (is Node.js installed?)"),
    );
    let lines = read_lines(&mut script.0);
    let status = tokio::time::timeout(
        SCRIPT_LIMIT,
        follow_script(lines, &mut script.0, &mut alpha, &mut beta),
    )
    .await
    .unwrap_or_else(|_| panic!("the browser test did not finish within {SCRIPT_LIMIT:?}"));
    assert!(
        status.success(),
        "the browser test failed ({status}); its output is above, screenshots in {}",
        artefacts.display()
    );
    assert!(screenshot.is_file(), "no screenshot");
}

/// The Node script, ended (by its own handle) if the test fails or times out before it exits.
struct Script(Child);

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The project the script looks at: filler over REST, then a conversation between the two
/// agents with replies, priorities, an unknown type, long content and content with markup.
async fn populate(app: &TestApp, project: Uuid, alpha: &mut Agent, beta: &mut Agent) {
    for n in 1..=FILLER {
        let (status, body) = app
            .post_json(
                &format!("/api/projects/{project}/messages"),
                &json!({
                    "sender_agent_id": "alpha",
                    "sender_agent_type": "planner",
                    "type": "heartbeat",
                    "content": format!("alive, tick {n}"),
                    "metadata": {"tick": n},
                }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    alpha
        .send_ok(json!({"type": "coordination", "content": "Plan: beta takes the tokenizer, I take the parser.", "metadata": {"phase": 1}}))
        .await;
    let ask = alpha
        .send_ok(json!({
            "type": "request", "to": "beta", "correlation_id": "c-tokenizer",
            "content": "Can you take the tokenizer?", "expects_reply": true, "timeout_ms": 86_400_000,
            "metadata": {"ticket": "T-1"},
        }))
        .await;
    beta.send_ok(json!({
        "type": "response", "to": "alpha", "correlation_id": "c-tokenizer",
        "reply_to": ask["id"], "content": "Yes, starting now.",
        "metadata": {"ticket": "T-1", "eta_minutes": 30},
    }))
    .await;
    beta.send_ok(json!({"type": "status_update", "content": "tokenizer: 50% done", "metadata": {"progress": 0.5}}))
        .await;
    alpha
        .send_ok(json!({"type": "escalation", "priority": 0, "content": "CI is red on main: every build fails since 10:02.", "metadata": {"build": 4812}}))
        .await;
    beta.send_ok(json!({"type": "error_report", "priority": 1, "content": "tokenizer tests: 3 failures in unicode escapes", "metadata": {"failed": ["esc_u", "esc_x", "esc_oct"]}}))
        .await;
    alpha
        .send_ok(json!({"type": "deploy_note", "priority": 3, "content": "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script> is just text", "metadata": {}}))
        .await;
    let report = (1..=12)
        .map(|n| format!("step {n}: checked module {n} of the tokenizer, all green"))
        .collect::<Vec<_>>()
        .join("\n");
    beta.send_ok(json!({"type": "result_report", "content": report, "metadata": {"modules": 12}}))
        .await;
    alpha
        .send_ok(json!({"type": "request", "to": "beta", "content": "Could you review PR 12 when you are done?", "expects_reply": true, "timeout_ms": 86_400_000, "metadata": {"pr": 12}}))
        .await;
}

enum Line {
    Text(String),
    Closed,
}

/// The script's stdout, line by line, read on a thread of its own.
fn read_lines(child: &mut Child) -> mpsc::UnboundedReceiver<Line> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(line) => {
                    if tx.send(Line::Text(line)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(Line::Closed);
    });
    rx
}

/// Does what the script asks until its stdout closes, then waits for it to exit.
async fn follow_script(
    mut lines: mpsc::UnboundedReceiver<Line>,
    child: &mut Child,
    alpha: &mut Agent,
    beta: &mut Agent,
) -> std::process::ExitStatus {
    let mut beta = Some(beta);
    while let Some(Line::Text(line)) = lines.recv().await {
        let Some(request) = line.strip_prefix("@@ ") else {
            println!("{line}");
            continue;
        };
        println!("console e2e asks: {request}");
        let (verb, rest) = request.split_once(' ').unwrap_or((request, ""));
        match verb {
            "SEND_LIVE" => {
                alpha
                    .send_ok(json!({"type": "result_report", "content": "parser done: live from alpha", "metadata": {"live": true}}))
                    .await;
            }
            "EXPECT" => {
                let (agent, content) = rest.split_once(' ').expect("EXPECT agent content");
                assert_eq!(agent, "beta", "the script only writes to beta");
                let beta = beta.as_deref_mut().expect("beta is still connected");
                let message = next_message_with(beta, content).await;
                assert_eq!(message["sender_agent_id"], "operator");
                assert_eq!(message["sender_agent_type"], "operator");
                assert_eq!(message["to"], "beta");
                assert_eq!(message["message_type"], "task_assignment");
                assert_eq!(message["priority"], 1);
            }
            "DISCONNECT" => {
                assert_eq!(rest, "beta", "the script only disconnects beta");
                // A clean close, as an agent that leaves would do it.
                let beta = beta.take().expect("beta is connected");
                close_agent(beta).await;
            }
            "SKIP" => println!("skipped in the browser test: {rest}"),
            other => panic!("the script asked for an unknown action {other:?}"),
        }
    }
    loop {
        match child.try_wait().expect("wait for node") {
            Some(status) => return status,
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Reads `agent`'s frames until a message with this content, passing over the broadcasts and
/// receipts queued before it.
async fn next_message_with(agent: &mut Agent, content: &str) -> Value {
    loop {
        let frame = agent.next_json().await;
        if frame["op"] == "message" && frame["content"] == content {
            return frame;
        }
    }
}

async fn close_agent(agent: &mut Agent) {
    agent
        .send_message(tokio_tungstenite::tungstenite::Message::Close(None))
        .await;
    // The broker answers the close: drain until the connection is gone.
    let _ = agent.expect_close().await;
}
