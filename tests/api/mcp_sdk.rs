//! The official MCP SDKs (Python `mcp`, TypeScript `@modelcontextprotocol/sdk`) against a
//! real broker: each lists the tools, sends to a WebSocket agent, reads what it sent, asks it
//! and gets its reply, waits for mail and gets it, and finds nothing at a short deadline.
//! Needs tests/mcp/python/.venv and tests/mcp/ts/node_modules (see .ci/run).

use std::path::Path;

use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::helpers::{Agent, Event, TestApp, PATIENCE};

/// A WebSocket agent that replies to every request and answers "please-send" with a direct
/// message, until told to stop; returns the contents it received.
fn peer(
    mut agent: Agent,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            let event = tokio::select! {
                event = agent.next_event() => event,
                _ = &mut stopped => break,
            };
            let frame = match event {
                Event::Json(frame) => frame,
                Event::Closed(_) => break,
            };
            if frame["op"] != "message" {
                continue;
            }
            let content = frame["content"].as_str().unwrap_or_default().to_owned();
            if frame["expects_reply"] == true {
                agent
                    .send(json!({"content": format!("pong:{content}"), "reply_to": frame["id"], "success": true}))
                    .await;
            } else if content == "please-send" {
                agent
                    .send(json!({"content": "woken", "to": frame["sender_agent_id"]}))
                    .await;
            }
            got.push(content);
        }
        got
    });
    (stop, task)
}

async fn run_sdk(program: &str, script: &str, agent_id: &str) {
    let app = TestApp::spawn().await;
    let project = app.create_project(&format!("sdk-{agent_id}")).await;
    let peer_agent = app.connect(project, "peer", "operator").await;
    let (code, _) = app
        .post_json(
            &format!("/api/projects/{project}/agents"),
            &json!({"agent_id": agent_id, "agent_type": "coder"}),
        )
        .await;
    assert_eq!(code, 200);
    let (code, _) = app
        .post_json(
            &format!("/api/projects/{project}/messages"),
            &json!({"sender_agent_id": "peer", "sender_agent_type": "operator", "content": "from-ws", "to": agent_id}),
        )
        .await;
    assert_eq!(code, 201);
    let (stop, received) = peer(peer_agent);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp");
    let program = if program.contains('/') {
        root.join(program)
    } else {
        program.into()
    };
    let mut child = Command::new(&program)
        .arg(root.join(script))
        .env(
            "AGENTBUS_MCP_URL",
            app.url(&format!(
                "/mcp/{project}?agent_id={agent_id}&agent_type=coder"
            )),
        )
        .env("AGENTBUS_PEER", "peer")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "could not run {}: {e} (see .ci/run for the install)",
                program.display()
            )
        });
    // Bounded, to catch a hang: the script's own waits add up to well under a minute.
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > PATIENCE * 8 {
            let _ = child.kill();
            panic!("{script} hung");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let output = child.wait_with_output().expect("the script's output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script} failed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}): {stdout}\n{stderr}"));
    assert!(
        ["2025-06-18", "2025-03-26"].contains(&seen["protocol"].as_str().unwrap_or_default()),
        "{seen}"
    );
    assert_eq!(
        seen["tools"],
        json!([
            "send_message",
            "check_inbox",
            "ask",
            "reply",
            "list_agents",
            "search_messages",
            "read_thread",
            "claim_files",
            "release_files",
            "list_claims",
            "object_claim",
            "list_tasks",
            "claim_task",
            "complete_task"
        ])
    );
    assert!(seen["sent"]["seq"].as_i64().is_some(), "{seen}");
    assert_eq!(seen["inbox"], json!(["from-ws"]), "{seen}");
    assert_eq!(
        seen["second"],
        json!([]),
        "the first check acknowledged it: {seen}"
    );
    assert_eq!(
        seen["ask"],
        json!({"is_error": false, "reply": "pong:ping"}),
        "{seen}"
    );
    assert_eq!(seen["woken"], json!(["woken"]), "{seen}");
    assert_eq!(seen["empty"], json!([]), "{seen}");
    let _ = stop.send(());
    let received = received.await.expect("the peer task");
    assert!(received.contains(&"from-sdk".to_owned()), "{received:?}");
    let member = app.member(project, agent_id).await.expect("a member");
    assert_eq!(member["interface"], "mcp");
}

#[tokio::test]
async fn the_python_sdk_talks_to_a_websocket_agent() {
    run_sdk("python/.venv/bin/python", "python/sdk_test.py", "py-agent").await;
}

#[tokio::test]
async fn the_typescript_sdk_talks_to_a_websocket_agent() {
    run_sdk("node", "ts/sdk_test.mjs", "ts-agent").await;
}
