//! Rate limits: a burst passes, a flood is refused with `rate_limited` and a retry-after,
//! nobody is disconnected.

use std::time::Duration;

use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn sends_over_the_rate_are_refused_with_a_retry_after_and_the_connection_stays() {
    let app = TestApp::spawn_with(|s| {
        s.rate_per_session = 5;
        s.burst_per_session = 5;
    })
    .await;
    let project = app.create_project("limits").await;
    let mut a = app.connect(project, "a", "coder").await;
    for n in 0..8 {
        a.send(json!({"content": format!("m{n}"), "client_msg_id": format!("m{n}")}))
            .await;
    }
    let (mut sent, mut limited) = (0, Vec::new());
    while sent + limited.len() < 8 {
        let frame = a.next_json().await;
        match frame["op"].as_str() {
            Some("sent") => sent += 1,
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                limited.push(frame);
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(sent, 5, "the burst passes");
    assert_eq!(limited.len(), 3);
    let wait = limited[0]["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms");
    assert!((1..=1000).contains(&wait), "{wait}");
    assert!(
        limited[0]["client_msg_id"].is_string(),
        "the client can tell which send to retry"
    );

    // Still connected; after the advised wait a send goes through.
    tokio::time::sleep(Duration::from_millis(wait)).await;
    a.send_ok(json!({"content": "later"})).await;
    let (_, metrics) = {
        let response = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        (response.status(), response.text().await.expect("text"))
    };
    assert!(
        metrics.contains("agentbus_rate_limited_total 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_project_over_its_rate_gets_429_over_rest() {
    let app = TestApp::spawn_with(|s| {
        s.rate_per_project = 2;
        s.burst_per_project = 2;
    })
    .await;
    let project = app.create_project("project-limit").await;
    let url = format!("/api/projects/{project}/messages");
    let body = json!({"sender_agent_id": "op", "sender_agent_type": "operator", "content": "x"});
    assert_eq!(app.post_json(&url, &body).await.0, 201);
    assert_eq!(app.post_json(&url, &body).await.0, 201);
    let response = app
        .http
        .post(app.url(&url))
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let error: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(error["code"], "rate_limited");
    // Another project is not affected.
    let other = app.create_project("other").await;
    let (code, _) = app
        .post_json(&format!("/api/projects/{other}/messages"), &body)
        .await;
    assert_eq!(code, 201);
}

#[tokio::test]
async fn connections_beyond_the_project_limit_are_refused_until_one_leaves() {
    let app = TestApp::spawn_with(|s| s.max_connections_per_project = 2).await;
    let project = app.create_project("crowded").await;
    let a = app.connect(project, "a", "coder").await;
    let _b = app.connect(project, "b", "coder").await;
    match crate::helpers::Agent::connect_raw(&app.ws_url(project, "agent_id=c")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429)
        }
        other => panic!(
            "a third connection was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    // Another project has its own count.
    let elsewhere = app.create_project("quiet").await;
    app.connect(elsewhere, "c", "coder").await;
    a.close().await;
    crate::helpers::eventually("a's place to be freed", || async {
        crate::helpers::Agent::connect_raw(&app.ws_url(project, "agent_id=c"))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}
