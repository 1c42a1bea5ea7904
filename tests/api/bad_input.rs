//! Bad input gets a clear error, stores nothing, and (but for oversize frames) leaves the
//! connection open.

use agentbus::db::queries;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use uuid::Uuid;

use crate::helpers::{status, Agent, TestApp};

async fn refused_upgrade(url: &str) -> u16 {
    match Agent::connect_raw(url).await {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the upgrade to {url} was accepted"),
    }
}

#[tokio::test]
async fn upgrades_are_refused_before_the_websocket_opens() {
    let app = TestApp::spawn().await;
    let project = app.create_project("upgrade").await;
    let ws = |path: &str| format!("ws://127.0.0.1:{}{path}", app.port);

    assert_eq!(
        refused_upgrade(&ws("/ws/agent/messages/not-a-uuid?agent_id=a")).await,
        400
    );
    assert_eq!(
        refused_upgrade(&ws(&format!(
            "/ws/agent/messages/{}?agent_id=a",
            Uuid::new_v4()
        )))
        .await,
        404
    );
    // Without agent_id the connection is an observer, but agent parameters need one.
    assert_eq!(
        refused_upgrade(&ws(&format!(
            "/ws/agent/messages/{project}?agent_type=coder"
        )))
        .await,
        400
    );
    assert_eq!(
        refused_upgrade(&ws(&format!("/ws/agent/messages/{project}?agent_id="))).await,
        400
    );
    assert_eq!(
        refused_upgrade(&ws(&format!(
            "/ws/agent/messages/{project}?agent_id=a&agent_type=no%20spaces"
        )))
        .await,
        400
    );
    let long = "a".repeat(256);
    assert_eq!(
        refused_upgrade(&ws(&format!(
            "/ws/agent/messages/{project}?agent_id={long}"
        )))
        .await,
        400
    );

    // The JSON error body says why.
    let (code, body) = app
        .get_json(&format!("/ws/agent/messages/{project}?agent_type=coder"))
        .await;
    assert_eq!(code, 400);
    assert_eq!(body["code"], "invalid_query");

    // And a well-formed one is accepted.
    let agent = app.connect(project, "a", "coder").await;
    assert_eq!(agent.welcome["project_id"], project.to_string());
    assert_eq!(agent.welcome["agent_id"], "a");
    assert_eq!(agent.welcome["head_seq"], 0);
}

#[tokio::test]
async fn bad_frames_get_errors_store_nothing_and_keep_the_connection() {
    let app = TestApp::spawn().await;
    let project = app.create_project("frames").await;
    let mut a = app.connect(project, "a", "coder").await;

    let long_id = "k".repeat(65);
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("{not json".into(), "invalid_json", None),
        ("".into(), "invalid_json", None),
        ("[1,2,3]".into(), "invalid_frame", None),
        (
            r#"{"content": 42, "client_msg_id": "k1"}"#.into(),
            "invalid_frame",
            Some("k1"),
        ),
        (
            r#"{"content": "x", "metadata": "flat"}"#.into(),
            "invalid_field",
            None,
        ),
        (r#"{"type": "status"}"#.into(), "missing_field", None),
        (
            r#"{"content": "", "client_msg_id": "k2"}"#.into(),
            "invalid_field",
            Some("k2"),
        ),
        (
            r#"{"content": "x", "priority": 9}"#.into(),
            "invalid_field",
            None,
        ),
        (
            r#"{"content": "x", "priority": "high"}"#.into(),
            "invalid_frame",
            None,
        ),
        (
            r#"{"content": "x", "type": "has space"}"#.into(),
            "invalid_field",
            None,
        ),
        (
            r#"{"content": "x", "ttl_ms": 0}"#.into(),
            "invalid_field",
            None,
        ),
        (
            r#"{"content": "x", "to": ""}"#.into(),
            "invalid_field",
            None,
        ),
        (
            r#"{"content": "x", "reply_to": "not-an-id"}"#.into(),
            "invalid_field",
            None,
        ),
        // Even a client_msg_id that is too long is echoed, so the client can tell which
        // send failed.
        (
            format!(r#"{{"content": "x", "client_msg_id": "{}"}}"#, long_id),
            "invalid_field",
            Some(&long_id),
        ),
        (
            format!(r#"{{"content": "{}"}}"#, "x".repeat(64 * 1024 + 1)),
            "invalid_field",
            None,
        ),
        (
            r#"{"op": "teleport", "content": "x"}"#.into(),
            "unknown_op",
            None,
        ),
    ];
    for (frame, code, client_msg_id) in &cases {
        a.send_text(frame).await;
        let error = a.expect_error(code).await;
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{error}"
        );
        assert_eq!(error["client_msg_id"].as_str(), *client_msg_id, "{error}");
    }
    let error = {
        a.send_text(r#"{"content": "x", "priority": 9}"#).await;
        a.expect_error("invalid_field").await
    };
    assert_eq!(error["field"], "priority");

    a.send_message(Message::binary(vec![0u8, 159, 146, 150]))
        .await;
    a.expect_error("binary_not_supported").await;

    // SQL-looking text and unusual characters are data, stored verbatim.
    let tricky = "'; DROP TABLE agent_messages; -- \u{1F600} \\u0000";
    let receipt = a
        .send_ok(json!({"content": tricky, "metadata": {"q": "' OR 1=1"}}))
        .await;
    assert_eq!(receipt["seq"], 1, "no refused frame used a seq");

    let mut conn = app.db().await;
    let rows = queries::all_messages(&mut conn, project)
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].content, tricky);
    assert_eq!(rows[0].metadata, json!({"q": "' OR 1=1"}));
}

#[tokio::test]
async fn an_oversize_frame_is_refused_and_closes_the_connection() {
    let app = TestApp::spawn().await;
    let project = app.create_project("oversize").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;

    let huge = format!(r#"{{"content": "{}"}}"#, "x".repeat(300 * 1024));
    a.send_text(&huge).await;
    a.expect_error("frame_too_large").await;
    assert_eq!(a.expect_close().await, Some(CloseCode::Size));

    // Others are unaffected and nothing was stored.
    b.send_ok(status("still here")).await;
    let mut conn = app.db().await;
    let rows = queries::all_messages(&mut conn, project)
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].content, "still here");
}

#[tokio::test]
async fn metadata_too_large_or_too_deep_is_refused() {
    let app = TestApp::spawn_with(|s| {
        s.max_metadata_bytes = 1024;
        s.max_metadata_depth = 4;
    })
    .await;
    let project = app.create_project("metadata").await;
    let mut a = app.connect(project, "a", "coder").await;
    a.send(json!({"content": "x", "metadata": {"blob": "z".repeat(2000)}}))
        .await;
    let error = a.expect_error("invalid_field").await;
    assert_eq!(error["field"], "metadata");
    a.send(json!({"content": "x", "metadata": {"a": {"b": {"c": {"d": 1}}}}}))
        .await;
    let error = a.expect_error("invalid_field").await;
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("levels")),
        "{error}"
    );
    let ok = a
        .send_ok(json!({"content": "x", "metadata": {"a": {"b": {"c": 1}}}}))
        .await;
    assert_eq!(ok["seq"], 1, "nothing refused was stored");
}

#[tokio::test]
async fn fragmented_frames_are_reassembled_and_bounded() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let app = TestApp::spawn_with(|s| s.max_frame_bytes = 4 * 1024).await;
    let project = app.create_project("fragments").await;
    let mut a = app.connect(project, "a", "coder").await;
    // One message in three fragments.
    let text = json!({"content": "in three parts"}).to_string();
    let (first, rest) = text.split_at(5);
    let (second, third) = rest.split_at(5);
    a.send_message(Message::Frame(Frame::message(
        first.as_bytes().to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    a.send_message(Message::Frame(Frame::message(
        second.as_bytes().to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await;
    a.send_message(Message::Frame(Frame::message(
        third.as_bytes().to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    assert_eq!(a.expect_op("sent").await["seq"], 1);
    // Fragments that add up to more than the frame limit are refused like one large frame.
    let chunk = "x".repeat(3 * 1024);
    a.send_message(Message::Frame(Frame::message(
        format!("{{\"content\":\"{chunk}").into_bytes(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    a.send_message(Message::Frame(Frame::message(
        format!("{chunk}\"}}").into_bytes(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    // Like one large frame: the error, then 1009.
    a.expect_error("frame_too_large").await;
    assert_eq!(a.expect_close().await, Some(CloseCode::Size));
    let mut conn = app.db().await;
    assert_eq!(
        queries::all_messages(&mut conn, project)
            .await
            .expect("rows")
            .len(),
        1
    );
}

#[tokio::test]
async fn a_connection_that_never_completes_its_request_is_dropped() {
    use tokio::io::AsyncReadExt;
    let app = TestApp::spawn().await;
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    // Half a request line, then nothing: the server's client request timeout (5 s) ends it.
    tokio::io::AsyncWriteExt::write_all(&mut idle, b"GET /ws/agent/messages/")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the idle connection was never closed");
}

#[tokio::test]
async fn a_rest_publish_refuses_fields_it_does_not_take_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let project = app.create_project("strict-body").await;
    for (field, value) in [
        ("op", json!("ack")),
        ("seqs", json!([1])),
        ("up_to", json!(3)),
        ("ids", json!([])),
        ("contnet", json!("typo")),
    ] {
        let mut body =
            json!({"sender_agent_id": "op", "sender_agent_type": "human", "content": "x"});
        body[field] = value;
        for route in ["messages", "requests"] {
            let (code, answer) = app
                .post_json(&format!("/api/projects/{project}/{route}"), &body)
                .await;
            assert_eq!(code, 400, "{route} with {field}: {answer}");
            assert_eq!(answer["code"], "invalid_json", "{route} with {field}");
            assert!(
                answer["error"].as_str().unwrap_or_default().contains(field),
                "the error names {field}: {answer}"
            );
        }
    }
    let (_, history) = app
        .get_json(&format!("/api/projects/{project}/messages"))
        .await;
    assert_eq!(history["messages"], json!([]));
}
