//! Sending, routing, receipts and what is stored.

use std::collections::HashSet;

use agentbus::db::queries;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::helpers::{status, TestApp};

#[tokio::test]
async fn a_broadcast_reaches_the_other_agents_of_its_project_only() {
    let app = TestApp::spawn().await;
    let p1 = app.create_project("one").await;
    let p2 = app.create_project("two").await;
    let mut a = app.connect(p1, "a", "coder").await;
    let mut b = app.connect(p1, "b", "reviewer").await;
    let mut c = app.connect(p1, "c", "tester").await;
    let mut x = app.connect(p2, "x", "coder").await;
    let mut y = app.connect(p2, "y", "coder").await;

    // The spec's frame, unchanged.
    a.send(json!({"agent_type":"coder","type":"status","content":"now running session Y","metadata":{"session":"Y"}}))
        .await;
    // The sender's next frame is its receipt: it was not delivered its own broadcast.
    let receipt = a.expect_op("sent").await;
    assert_eq!(receipt["seq"], 1);

    for agent in [&mut b, &mut c] {
        let message = agent.expect_op("message").await;
        assert_eq!(message["id"], receipt["id"]);
        assert_eq!(message["seq"], 1);
        assert_eq!(message["sender_agent_id"], "a");
        assert_eq!(message["sender_agent_type"], "coder");
        assert_eq!(message["message_type"], "status");
        assert_eq!(message["content"], "now running session Y");
        assert_eq!(message["metadata"], json!({"session": "Y"}));
        assert_eq!(message["to"], Value::Null);
        assert_eq!(message["priority"], 2);
        assert_eq!(message["project_id"], p1.to_string());
    }

    // Another project is a separate world: x's next frame is y's message, not a's.
    y.send_ok(status("in project two")).await;
    let seen = x.expect_op("message").await;
    assert_eq!(seen["content"], "in project two");
    assert_eq!(seen["seq"], 1, "each project has its own sequence");
}

#[tokio::test]
async fn the_receipt_and_the_stored_row_agree_on_every_column() {
    let app = TestApp::spawn().await;
    let project = app.create_project("rows").await;
    let mut a = app.connect(project, "a", "coordinator").await;
    let mut b = app.connect(project, "b", "codegen").await;

    let first = a.send_ok(status("plain")).await;
    let reply_to = first["id"].as_str().expect("id").to_owned();
    let receipt = a
        .send_ok(json!({
            "type": "task_assignment",
            "content": "build component Z",
            "metadata": {"component": "Z", "nested": {"list": [1, 2, 3]}},
            "to": "b",
            "priority": 0,
            "ttl_ms": 60000,
            "correlation_id": "corr-1",
            "reply_to": reply_to,
            "client_msg_id": "c-42",
        }))
        .await;
    assert_eq!(receipt["client_msg_id"], "c-42");
    assert_eq!(receipt["seq"], 2);
    let delivered = b.expect_op("message").await;
    assert_eq!(delivered["content"], "plain");
    let delivered = b.expect_op("message").await;
    assert_eq!(delivered["to"], "b");
    assert_eq!(delivered["correlation_id"], "corr-1");

    let mut conn = app.db().await;
    let rows = queries::all_messages(&mut conn, project)
        .await
        .expect("read rows");
    assert_eq!(rows.len(), 2);
    let row = &rows[1];
    assert_eq!(row.id.to_string(), receipt["id"].as_str().expect("id"));
    assert_eq!(row.project_id, project);
    assert_eq!(row.seq, 2);
    assert_eq!(row.sender_agent_id, "a");
    // No agent_type in the frame: the connection's type is used.
    assert_eq!(row.sender_agent_type, "coordinator");
    assert_eq!(row.sender_session_id, Some(a.session_id()));
    assert_eq!(row.recipient_agent_id.as_deref(), Some("b"));
    assert_eq!(row.message_type, "task_assignment");
    assert_eq!(row.content, "build component Z");
    assert_eq!(
        row.metadata,
        json!({"component": "Z", "nested": {"list": [1, 2, 3]}})
    );
    assert_eq!(row.priority, 0);
    assert_eq!(row.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(row.reply_to.map(|r| r.to_string()), Some(reply_to));
    assert_eq!(row.client_msg_id.as_deref(), Some("c-42"));
    let created_at: DateTime<Utc> = receipt["created_at"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("created_at");
    assert_eq!(row.created_at, created_at);
    assert_eq!(
        row.expires_at,
        Some(created_at + chrono::Duration::milliseconds(60000))
    );
    assert_eq!(row.read_at, None);
    // b's socket confirmed receipt of its direct message: delivered_at is set.
    let id = row.id;
    let delivered_at = crate::helpers::eventually("delivered_at of the direct message", || async {
        let mut conn = app.db().await;
        let rows = queries::all_messages(&mut conn, project).await.ok()?;
        rows.into_iter().find(|r| r.id == id)?.delivered_at
    })
    .await;
    assert!(delivered_at >= row.created_at);
    assert_eq!(rows[0].recipient_agent_id, None);
    assert_eq!(rows[0].metadata, json!({}));
}

#[tokio::test]
async fn a_direct_message_reaches_only_its_recipient() {
    let app = TestApp::spawn().await;
    let project = app.create_project("direct").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;
    let mut c = app.connect(project, "c", "coder").await;

    a.send_ok(json!({"type": "request", "content": "need a frontend agent", "to": "b"}))
        .await;
    let got = b.expect_op("message").await;
    assert_eq!(got["content"], "need a frontend agent");
    assert_eq!(got["to"], "b");

    a.send_ok(status("everyone")).await;
    // c's first frame is the broadcast: the direct message never reached it.
    assert_eq!(c.expect_op("message").await["content"], "everyone");
    assert_eq!(b.expect_op("message").await["content"], "everyone");
}

#[tokio::test]
async fn concurrent_senders_get_dense_gap_free_seqs() {
    const AGENTS: usize = 5;
    const PER_AGENT: usize = 100;
    let app = TestApp::spawn().await;
    let project = app.create_project("dense").await;

    let mut tasks = Vec::new();
    for i in 0..AGENTS {
        let mut agent = app.connect(project, &format!("agent-{i}"), "coder").await;
        tasks.push(tokio::spawn(async move {
            agent.send_pipelined(&i.to_string(), PER_AGENT).await
        }));
    }
    let mut all = HashSet::new();
    for task in tasks {
        let seqs = task.await.expect("sender task");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one sender's receipts arrive in seq order"
        );
        all.extend(seqs);
    }
    let total = (AGENTS * PER_AGENT) as i64;
    assert_eq!(all, (1..=total).collect::<HashSet<_>>());

    let mut conn = app.db().await;
    let rows = queries::all_messages(&mut conn, project)
        .await
        .expect("rows");
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    let project_row = queries::find_project(&mut conn, project)
        .await
        .expect("query")
        .expect("project");
    assert_eq!(project_row.head_seq, total);
}

#[tokio::test]
async fn a_retried_send_is_stored_once_and_gets_the_original_receipt() {
    let app = TestApp::spawn().await;
    let project = app.create_project("retry").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;

    let frame =
        json!({"type": "discovery", "content": "found a bug in the API", "client_msg_id": "once"});
    let first = a.send_ok(frame.clone()).await;
    // Retried after a reconnect, as a client does when its receipt was lost.
    a.close().await;
    let mut a = app.connect(project, "a", "coder").await;
    let again = a.send_ok(frame.clone()).await;
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["seq"], first["seq"]);
    // Twice in a row without waiting: one of them is a retry inside the same batch or the next.
    a.send(json!({"content": "x", "client_msg_id": "twin"}))
        .await;
    a.send(json!({"content": "x", "client_msg_id": "twin"}))
        .await;
    let t1 = a.expect_op("sent").await;
    let t2 = a.expect_op("sent").await;
    assert_eq!(t1["id"], t2["id"]);

    // A retry among new messages (pipelined, so most likely one batch): the new ones are
    // stored with dense seqs, the retry gets the original.
    a.send(json!({"content": "p1", "client_msg_id": "p1"}))
        .await;
    a.send(frame.clone()).await;
    a.send(json!({"content": "p2", "client_msg_id": "p2"}))
        .await;
    let mut receipts = std::collections::HashMap::new();
    for _ in 0..3 {
        let receipt = a.expect_op("sent").await;
        receipts.insert(
            receipt["client_msg_id"].as_str().map(str::to_owned),
            receipt,
        );
    }
    let seq_of = |cmid: &str| receipts[&Some(cmid.to_owned())]["seq"].as_i64();
    assert_eq!(seq_of("once"), first["seq"].as_i64());
    assert_eq!((seq_of("p1"), seq_of("p2")), (Some(3), Some(4)));

    for expected in ["found a bug in the API", "x", "p1", "p2"] {
        assert_eq!(b.expect_op("message").await["content"], expected);
    }
    let mut conn = app.db().await;
    let rows = queries::all_messages(&mut conn, project)
        .await
        .expect("rows");
    assert_eq!(rows.len(), 4);
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

#[tokio::test]
async fn a_rest_publish_reaches_websocket_agents() {
    let app = TestApp::spawn().await;
    let project = app.create_project("rest").await;
    let mut b = app.connect(project, "b", "coder").await;

    let (status_code, stored) = app
        .post_json(
            &format!("/api/projects/{project}/messages"),
            &json!({
                "sender_agent_id": "operator",
                "sender_agent_type": "human",
                "type": "coordination",
                "content": "about to modify config.yaml, any objections?",
            }),
        )
        .await;
    assert_eq!(status_code, 201, "{stored}");
    assert_eq!(stored["seq"], 1);
    assert_eq!(stored["sender_session_id"], Value::Null);
    let message = b.expect_op("message").await;
    assert_eq!(message["id"], stored["id"]);
    assert_eq!(message["sender_agent_id"], "operator");
    assert_eq!(message["sender_agent_type"], "human");
    assert_eq!(message["message_type"], "coordination");

    let (code, body) = app
        .post_json(
            &format!("/api/projects/{project}/messages"),
            &json!({"sender_agent_id": "op", "content": "x"}),
        )
        .await;
    assert_eq!(code, 400);
    assert_eq!(body["code"], "missing_field");
}

#[tokio::test]
async fn a_direct_message_to_oneself_is_delivered_without_a_no_recipient_warning() {
    let app = TestApp::spawn().await;
    let project = app.create_project("self").await;
    let mut a = app.connect(project, "a", "coder").await;
    a.send(json!({"content": "note to self", "to": "a", "client_msg_id": "n-1"}))
        .await;
    // Receipt and delivery, in either order, and nothing else.
    let mut ops = Vec::new();
    for _ in 0..2 {
        let frame = a.next_json().await;
        ops.push(frame["op"].as_str().unwrap_or_default().to_owned());
        if frame["op"] == "message" {
            assert_eq!(frame["content"], "note to self");
        }
    }
    ops.sort();
    assert_eq!(ops, ["message", "sent"]);
    a.send_ok(status("next")).await;
}
