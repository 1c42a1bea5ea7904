//! SIGTERM under load: everything acknowledged is stored, every stored message was
//! acknowledged, sockets close with 1001, sessions are marked closed, and the process exits 0.

use std::process::Command;
use std::time::{Duration, Instant};

use agentbus::schema::sessions;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::crash::BrokerProcess;
use crate::helpers::{Agent, Event, TestApp};

#[tokio::test]
async fn sigterm_under_load_loses_nothing_acknowledged_and_exits_cleanly() {
    // The harness app creates (and finally drops) the database; the broker process is
    // declared after it, so it is killed before the database is dropped, whatever happens.
    let app = TestApp::spawn().await;
    let database_url = app.database_url.clone();
    let project = app.create_project("shutdown").await;
    app.stop();

    let mut broker = BrokerProcess::start(&database_url);
    let ws = |query: &str| {
        format!(
            "ws://127.0.0.1:{}/ws/agent/messages/{project}?{query}",
            broker.port
        )
    };
    let mut a = Agent::connect(&ws("agent_id=a")).await;
    let mut b = Agent::connect(&ws("agent_id=b")).await;
    for n in 0..300 {
        a.send(json!({"content": format!("m{n}"), "client_msg_id": format!("m{n}")}))
            .await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &broker.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());

    // a hears about every send it made before the close: a receipt or an error.
    let mut receipts: Vec<String> = Vec::new();
    let a_close = loop {
        match a.next_event().await {
            Event::Json(frame) if frame["op"] == "sent" => receipts.push(
                frame["client_msg_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            Event::Json(frame) => assert_eq!(frame["code"], "unavailable", "{frame}"),
            Event::Closed(code) => break code,
        }
    };
    assert_eq!(a_close, Some(CloseCode::Away));
    assert_eq!(b.expect_close().await, Some(CloseCode::Away));

    // The process exits 0, well within its deadline.
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = broker.child.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the broker did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");

    // What was acknowledged is exactly what is stored.
    let mut conn = app.db().await;
    let mut stored: Vec<String> = agentbus::schema::agent_messages::table
        .filter(agentbus::schema::agent_messages::project_id.eq(project))
        .select(agentbus::schema::agent_messages::client_msg_id)
        .load::<Option<String>>(&mut conn)
        .await
        .expect("rows")
        .into_iter()
        .flatten()
        .collect();
    stored.sort();
    receipts.sort();
    assert!(!receipts.is_empty());
    assert_eq!(stored, receipts);
    let open: i64 = sessions::table
        .filter(sessions::disconnected_at.is_null())
        .count()
        .get_result(&mut conn)
        .await
        .expect("count");
    assert_eq!(open, 0, "every session is marked disconnected");
}
