//! The long-poll REST inbox: woken by the channel, empty at its deadline, acknowledged in the
//! same call, bounded, and answered at shutdown.

use std::process::Command;

use serde_json::{json, Value};

use crate::crash::BrokerProcess;
use crate::helpers::{eventually, status, Agent, TestApp, PATIENCE};

fn contents(body: &Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().expect("content").to_owned())
        .collect()
}

async fn get(http: &reqwest::Client, url: String) -> (u16, Value) {
    let response = tokio::time::timeout(PATIENCE * 5, http.get(url).send())
        .await
        .expect("the inbox read hung")
        .expect("GET inbox");
    let code = response.status().as_u16();
    (code, response.json().await.expect("JSON"))
}

/// Waits until the broker on `port` has `n` inbox reads waiting (its `/metrics`).
async fn until_waiting(http: &reqwest::Client, port: u16, n: usize) {
    let line = format!("agentbus_inbox_waits {n}");
    eventually("the reads to be waiting", || async {
        let text = http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().any(|l| l == line).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_waiting_read_is_woken_by_a_websocket_send_and_acknowledges_what_it_returns() {
    let app = TestApp::spawn().await;
    let project = app.create_project("wake").await;
    let mut ws = app.connect(project, "sender", "coder").await;
    let (code, _) = app
        .post_json(
            &format!("/api/projects/{project}/agents"),
            &json!({"agent_id": "poller", "agent_type": "shell"}),
        )
        .await;
    assert_eq!(code, 200);
    let url = app.url(&format!(
        "/api/projects/{project}/agents/poller/inbox?wait_ms=60000&ack=true"
    ));
    let http = app.http.clone();
    let waiting = tokio::spawn(async move { get(&http, url).await });
    until_waiting(&app.http, app.port, 1).await;
    assert!(!waiting.is_finished(), "nothing is owed yet");

    ws.send_ok(status("wake up")).await;
    let (code, body) = waiting.await.expect("the read task");
    assert_eq!(code, 200, "{body}");
    assert_eq!(contents(&body), ["wake up"]);
    assert_eq!(body["remaining"], 0);
    assert_eq!(body["ack_floor"], body["messages"][0]["seq"]);

    // Acknowledged in that call: not returned again, and delivered.
    let (code, again) = get(
        &app.http,
        app.url(&format!("/api/projects/{project}/agents/poller/inbox")),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(contents(&again), Vec::<String>::new());
    let (_, one) = app
        .get_json(&format!(
            "/api/projects/{project}/messages/{}",
            body["messages"][0]["id"].as_str().expect("id")
        ))
        .await;
    assert!(one["message"]["delivered_at"].is_string(), "{one}");

    // A direct message to someone else does not answer the read; one to it does.
    let (code, _) = app
        .post_json(
            &format!("/api/projects/{project}/agents"),
            &json!({"agent_id": "someone-else", "agent_type": "shell"}),
        )
        .await;
    assert_eq!(code, 200);
    let url = app.url(&format!(
        "/api/projects/{project}/agents/poller/inbox?wait_ms=60000&urgent_only=true"
    ));
    let http = app.http.clone();
    let waiting = tokio::spawn(async move { get(&http, url).await });
    until_waiting(&app.http, app.port, 1).await;
    ws.send_ok(json!({"content": "not yours", "to": "someone-else"}))
        .await;
    ws.send_ok(json!({"content": "routine", "to": "poller", "priority": 3}))
        .await;
    ws.send_ok(json!({"content": "urgent", "to": "poller", "priority": 1}))
        .await;
    let (code, body) = waiting.await.expect("the read task");
    assert_eq!(code, 200, "{body}");
    assert_eq!(contents(&body), ["urgent"], "only urgent mail");
    // Without `ack`, what it returned is still owed.
    let (_, all) = get(
        &app.http,
        app.url(&format!("/api/projects/{project}/agents/poller/inbox")),
    )
    .await;
    assert_eq!(contents(&all), ["urgent", "routine"]);
}

#[tokio::test]
async fn a_waiting_read_answers_with_nothing_at_its_deadline() {
    let app = TestApp::spawn().await;
    let project = app.create_project("deadline").await;
    let (code, body) = get(
        &app.http,
        app.url(&format!(
            "/api/projects/{project}/agents/idle/inbox?wait_ms=300"
        )),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(contents(&body), Vec::<String>::new());
    assert_eq!(body["remaining"], 0);
    for bad in ["wait_ms=60001", "wait_ms=-1", "wait_ms=soon", "limit=0"] {
        let (code, body) = get(
            &app.http,
            app.url(&format!("/api/projects/{project}/agents/idle/inbox?{bad}")),
        )
        .await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
}

#[tokio::test]
async fn waiting_reads_are_bounded_and_a_shutdown_answers_them() {
    let app = TestApp::spawn().await;
    let project = app.create_project("bounded").await;
    let database_url = app.database_url.clone();
    app.stop();
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentbus"));
    command
        .args(["serve", "--bind", "127.0.0.1:0", "--workers", "2"])
        .env("DATABASE_URL", &database_url)
        .env("AGENTBUS_MAX_INBOX_WAITS_PER_PROJECT", "3")
        .env("RUST_LOG", "info");
    let mut broker = BrokerProcess::spawn(command);
    let port = broker.port;
    let http = reqwest::Client::new();
    let mut waiting = Vec::new();
    for n in 0..3 {
        let url = format!(
            "http://127.0.0.1:{port}/api/projects/{project}/agents/w{n}/inbox?wait_ms=60000"
        );
        let http = http.clone();
        waiting.push(tokio::spawn(async move { get(&http, url).await }));
    }
    until_waiting(&http, port, 3).await;
    let (code, refused) = get(
        &http,
        format!("http://127.0.0.1:{port}/api/projects/{project}/agents/w9/inbox?wait_ms=60000"),
    )
    .await;
    assert_eq!(code, 429, "{refused}");
    assert!(refused["error"]
        .as_str()
        .is_some_and(|e| e.contains("waiting")));
    // A read that does not wait is not limited.
    let (code, _) = get(
        &http,
        format!("http://127.0.0.1:{port}/api/projects/{project}/agents/w9/inbox"),
    )
    .await;
    assert_eq!(code, 200);
    // A WebSocket agent keeps working meanwhile.
    let mut agent = Agent::connect(&format!(
        "ws://127.0.0.1:{port}/ws/agent/messages/{project}?agent_id=ws"
    ))
    .await;
    agent.send_ok(status("still here")).await;

    let killed = Command::new("kill")
        .args(["-TERM", &broker.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(killed.success());
    for read in waiting {
        let (code, body) = read.await.expect("the read task");
        assert_eq!(code, 200, "answered at shutdown: {body}");
        // The broadcast was sent before, so each waiting read may have been woken by it.
        assert!(contents(&body).len() <= 1, "{body}");
    }
    let exit = tokio::task::spawn_blocking(move || broker.child.wait())
        .await
        .expect("the wait task")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
}
