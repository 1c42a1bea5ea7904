//! Connection lifecycle: takeover, heartbeats, session rows.

use agentbus::schema::sessions;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{eventually, status, Agent, TestApp, PATIENCE};

#[tokio::test]
async fn a_second_connection_of_an_agent_takes_over() {
    let app = TestApp::spawn().await;
    let project = app.create_project("takeover").await;
    let mut old = app.connect(project, "worker", "coder").await;
    // The takeover, and so the old connection's close, happens after this moment.
    let before_takeover = chrono::Utc::now();
    let mut new = app.connect(project, "worker", "coder").await;
    assert_ne!(old.session_id(), new.session_id());
    assert_eq!(old.expect_close().await, Some(CloseCode::from(4001)));

    let mut other = app.connect(project, "other", "coder").await;
    other.send_ok(status("who gets this?")).await;
    assert_eq!(new.expect_op("message").await["content"], "who gets this?");

    // Both connections have a session row; the replaced one is marked disconnected.
    let old_id = old.session_id();
    let disconnected = eventually("the replaced session to be marked disconnected", || async {
        let mut conn = app.db().await;
        let at: Option<chrono::DateTime<chrono::Utc>> = sessions::table
            .find(old_id)
            .select(sessions::disconnected_at)
            .first(&mut conn)
            .await
            .ok()?;
        at
    })
    .await;
    let recorded = chrono::Utc::now();
    assert!(
        before_takeover <= disconnected && disconnected <= recorded,
        "disconnected at {disconnected}, not between the takeover ({before_takeover}) and \
         the moment it was read back ({recorded})"
    );
    let mut conn = app.db().await;
    let rows: i64 = sessions::table
        .filter(sessions::agent_id.eq("worker"))
        .filter(sessions::disconnected_at.is_null())
        .count()
        .get_result(&mut conn)
        .await
        .expect("count");
    assert_eq!(rows, 1, "only the new connection is open");
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_the_client_timeout() {
    let app = TestApp::spawn_with(|s| {
        s.heartbeat_interval_ms = 100;
        s.client_timeout_ms = 500;
    })
    .await;
    let project = app.create_project("heartbeat").await;

    // A peer that never reads never answers pings.
    let mut silent = Agent::connect_raw(&app.ws_url(project, "agent_id=silent"))
        .await
        .expect("connect");
    eventually("the broker to give up on the silent peer", || async {
        let mut conn = app.db().await;
        let closed: i64 = sessions::table
            .filter(sessions::agent_id.eq("silent"))
            .filter(sessions::disconnected_at.is_not_null())
            .count()
            .get_result(&mut conn)
            .await
            .ok()?;
        (closed == 1).then_some(())
    })
    .await;
    // What it sent before giving up ends with a close frame saying why.
    let code = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(frame)) = silent.next().await {
            if let Message::Close(close) = frame {
                return close.map(|c| c.code);
            }
        }
        None
    })
    .await
    .expect("the socket ends");
    assert_eq!(code, Some(CloseCode::from(4002)));

    // A peer that answers pings stays connected well past the timeout.
    let mut lively = app.connect(project, "lively", "coder").await;
    let mut pinged = 0;
    while pinged < 10 {
        if let Some(Ok(Message::Ping(_))) = tokio::time::timeout(PATIENCE, lively.raw_next())
            .await
            .expect("a ping")
        {
            pinged += 1;
        }
    }
    lively
        .send_ok(status("still connected after 10 heartbeats"))
        .await;
}
