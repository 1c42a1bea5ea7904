//! A stopped database: sends fail with an error frame (never a false receipt), the sockets
//! stay open, and everything works again once the database is back, with no loss and no
//! duplicate.

use std::time::Duration;

use agentbus::db::queries;
use serde_json::json;

use crate::helpers::{TestApp, PATIENCE};
use crate::pg_cluster::PgCluster;

#[tokio::test]
async fn sends_fail_cleanly_while_the_database_is_down_and_recover_after() {
    let cluster = PgCluster::start();
    let app = TestApp::spawn_on(&cluster.url("agentbus"), |s| s.db_timeout_ms = 1_000).await;
    let project = app.create_project("outage").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;
    a.send_ok(json!({"content": "before", "client_msg_id": "m-0"}))
        .await;
    assert_eq!(b.expect_op("message").await["content"], "before");

    cluster.halt();
    let frame = json!({"content": "during", "client_msg_id": "m-1"});
    a.send(frame.clone()).await;
    let error = a.expect_error("unavailable").await;
    assert_eq!(error["client_msg_id"], "m-1");
    // The REST side says so too.
    let (code, body) = app.get_json("/api/projects").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["code"], "unavailable");

    cluster.resume();
    // The client retries with the same client_msg_id until the broker can store it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let receipt = loop {
        a.send(frame.clone()).await;
        let reply = a.next_json().await;
        match reply["op"].as_str() {
            Some("sent") => break reply,
            Some("error") if reply["code"] == "unavailable" => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the broker never recovered"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => panic!("unexpected frame {reply}"),
        }
    };
    assert_eq!(receipt["seq"], 2, "the failed attempts left no hole");
    assert_eq!(b.expect_op("message").await["content"], "during");
    // One more, to show b got "during" exactly once.
    a.send_ok(json!({"content": "after"})).await;
    assert_eq!(b.expect_op("message").await["content"], "after");

    let mut conn = app.db().await;
    let rows = queries::all_messages(&mut conn, project)
        .await
        .expect("rows");
    let contents: Vec<&str> = rows.iter().map(|r| r.content.as_str()).collect();
    assert_eq!(contents, ["before", "during", "after"]);
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
    app.stop();
}
