//! The read-only observer: a connection without `agent_id` sees every message of its project
//! (broadcast and direct), from `since` or from the head, is no member and cannot send.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{status, Agent, TestApp};

const ADMIN: &str = "observer-admin-token-0123456789";

async fn observe(app: &TestApp, project: Uuid, query: &str) -> Agent {
    Agent::connect(&app.ws_url(project, query)).await
}

#[tokio::test]
async fn an_observer_sees_every_message_of_its_project_and_none_of_another() {
    let app = TestApp::spawn().await;
    let project = app.create_project("watched").await;
    let other = app.create_project("elsewhere").await;
    let mut watcher = observe(&app, project, "").await;
    assert_eq!(watcher.welcome["observer"], true);
    assert_eq!(watcher.welcome["head_seq"], 0);
    assert_eq!(watcher.welcome["replay"], 0);
    assert_eq!(watcher.welcome.get("agent_id"), None);

    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "reviewer").await;
    let mut x = app.connect(other, "x", "coder").await;
    x.send_ok(status("in the other project")).await;
    a.send_ok(status("to everyone")).await;
    a.send_ok(json!({"content": "just for b", "to": "b"})).await;
    a.send_ok(json!({"content": "for reviewers", "to_type": "reviewer"}))
        .await;
    b.send_ok(json!({"content": "back to a", "to": "a"})).await;

    let mut seen = Vec::new();
    for _ in 0..4 {
        let frame = watcher.expect_op("message").await;
        seen.push((frame["seq"].as_i64(), frame["content"].clone()));
    }
    assert_eq!(
        seen,
        [
            (Some(1), json!("to everyone")),
            (Some(2), json!("just for b")),
            (Some(3), json!("for reviewers")),
            (Some(4), json!("back to a")),
        ]
    );
    // The other project's message never reached it: the next frame is the next message here.
    a.send_ok(status("last")).await;
    assert_eq!(watcher.expect_op("message").await["seq"], 5);
}

#[tokio::test]
async fn an_observer_cannot_send_and_is_no_member() {
    let app = TestApp::spawn().await;
    let project = app.create_project("read-only").await;
    let mut watcher = observe(&app, project, "").await;
    watcher
        .send(json!({"content": "hello", "client_msg_id": "w-1"}))
        .await;
    let refused = watcher.expect_error("observer_read_only").await;
    assert_eq!(refused["client_msg_id"], "w-1");
    watcher.send(json!({"op": "ack", "seqs": [1]})).await;
    watcher.expect_error("observer_read_only").await;
    watcher.send_text("not json").await;
    watcher.expect_error("observer_read_only").await;

    let (code, history) = app
        .get_json(&format!("/api/projects/{project}/messages"))
        .await;
    assert_eq!(code, 200);
    assert_eq!(history["messages"], json!([]), "nothing was stored");
    let (code, agents) = app
        .get_json(&format!("/api/projects/{project}/agents"))
        .await;
    assert_eq!(code, 200);
    assert_eq!(agents["agents"], json!([]), "an observer is not listed");

    // Not a recipient either: a message to a type nobody has is still reported so.
    let mut a = app.connect(project, "a", "coder").await;
    a.send(json!({"content": "anyone?", "to_type": "designer"}))
        .await;
    a.expect_op("sent").await;
    a.expect_error("no_recipient").await;
    assert_eq!(watcher.expect_op("message").await["content"], "anyone?");
}

#[tokio::test]
async fn an_observer_resumes_after_since_then_follows_live() {
    let app = TestApp::spawn().await;
    let project = app.create_project("resume").await;
    let mut a = app.connect(project, "a", "coder").await;
    let _b = app.connect(project, "b", "coder").await;
    for n in 1..=4 {
        a.send_ok(json!({"content": format!("m{n}"), "to": if n % 2 == 0 { "b" } else { "a" }}))
            .await;
    }
    let mut watcher = observe(&app, project, "since=2").await;
    assert_eq!(watcher.welcome["head_seq"], 4);
    assert_eq!(watcher.welcome["replay"], 2);
    assert_eq!(watcher.expect_op("message").await["seq"], 3);
    assert_eq!(watcher.expect_op("message").await["seq"], 4);
    a.send_ok(status("live")).await;
    let live = watcher.expect_op("message").await;
    assert_eq!(
        (live["seq"].as_i64(), live["content"].as_str()),
        (Some(5), Some("live"))
    );

    // Without `since`, nothing before the head is replayed.
    let mut fresh = observe(&app, project, "").await;
    assert_eq!(fresh.welcome["head_seq"], 5);
    assert_eq!(fresh.welcome["replay"], 0);
    a.send_ok(status("after")).await;
    assert_eq!(fresh.expect_op("message").await["seq"], 6);
}

#[tokio::test]
async fn agent_parameters_without_an_agent_id_are_refused() {
    let app = TestApp::spawn().await;
    let project = app.create_project("params").await;
    for query in [
        "agent_type=coder",
        "ack=manual",
        "capabilities=rust",
        "since=-1",
    ] {
        let url = app.ws_url(project, query).replace("ws://", "http://");
        let response = app.http.get(url).send().await.expect("GET");
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["code"], "invalid_query", "{query}");
    }
}

#[tokio::test]
async fn observing_needs_an_unbound_token_when_tokens_are_required() {
    let app = TestApp::spawn_with(|s| s.admin_token = Some(ADMIN.into())).await;
    let created: Value = app
        .http
        .post(app.url("/api/projects"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "guarded"}))
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("JSON");
    let project: Uuid = created["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let unbound = created["token"].as_str().expect("token").to_owned();
    let bound: Value = app
        .http
        .post(app.url(&format!("/api/projects/{project}/tokens")))
        .bearer_auth(ADMIN)
        .json(&json!({"agent_id": "gen-1"}))
        .send()
        .await
        .expect("POST tokens")
        .json()
        .await
        .expect("JSON");
    let bound = bound["token"].as_str().expect("token").to_owned();

    let refusal = |query: String| {
        let url = app.ws_url(project, &query).replace("ws://", "http://");
        let http = app.http.clone();
        async move { http.get(url).send().await.expect("GET").status().as_u16() }
    };
    assert_eq!(refusal(String::new()).await, 401);
    assert_eq!(refusal(format!("token={bound}")).await, 403);

    let mut watcher = observe(&app, project, &format!("token={unbound}")).await;
    assert_eq!(watcher.welcome["observer"], true);
    let mut admin = observe(&app, project, &format!("token={ADMIN}")).await;
    let mut agent =
        Agent::connect(&app.ws_url(project, &format!("agent_id=gen-1&token={bound}"))).await;
    agent.send_ok(status("seen by both")).await;
    assert_eq!(
        watcher.expect_op("message").await["content"],
        "seen by both"
    );
    assert_eq!(admin.expect_op("message").await["content"], "seen by both");
}

#[tokio::test]
async fn a_slow_observer_is_cut_with_4008_and_resumes_with_since_without_a_gap() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    const TOTAL: usize = 10_000;
    let app = TestApp::spawn_with(|s| {
        s.outbox_max_frames = 512;
        s.client_timeout_ms = 120_000;
        // No pings: the slow observer's client answers each ping it reads with a pong, and
        // once the broker has let go of the connection (2 s after the cut) that pong is
        // answered with a reset, which throws away what the client had not read yet, the
        // close frame included. On a loaded machine the test outlasted the 5 s interval.
        s.heartbeat_interval_ms = 600_000;
    })
    .await;
    let project = app.create_project("slow-observer").await;
    // Welcomed, then not read until the broker has given up on it.
    let mut slow = Agent::connect_raw(&app.ws_url(project, ""))
        .await
        .expect("connect");
    let mut fast = observe(&app, project, "").await;
    let mut a = app.connect(project, "a", "coder").await;
    let payload = "x".repeat(200);
    for window in 0..TOTAL / 500 {
        for n in 0..500 {
            a.send(json!({"content": format!("{} {payload}", window * 500 + n)}))
                .await;
        }
        for _ in 0..500 {
            a.expect_op("sent").await;
        }
    }
    // The fast observer saw everything, in order.
    for expected in 1..=TOTAL as i64 {
        assert_eq!(fast.expect_op("message").await["seq"], expected);
    }
    // The slow one: what reached its socket before the cut, in order, then 4008.
    let mut last = 0;
    let code = loop {
        let next = tokio::time::timeout(crate::helpers::PATIENCE, slow.next())
            .await
            .expect("the slow observer's socket hung");
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON");
                if frame["op"] == "message" {
                    let seq = frame["seq"].as_i64().expect("seq");
                    assert_eq!(seq, last + 1, "in order, without a gap");
                    last = seq;
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("the slow observer's socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(4008), "cut as a slow consumer");
    assert!(last < TOTAL as i64, "it was cut before the end");
    // It resumes where it stopped and gets the rest, once each.
    let mut resumed = observe(&app, project, &format!("since={last}")).await;
    assert_eq!(resumed.welcome["replay"], TOTAL as i64 - last);
    for expected in last + 1..=TOTAL as i64 {
        assert_eq!(resumed.expect_op("message").await["seq"], expected);
    }
}
