//! Tokens and isolation: with an admin token configured, nobody reads or writes a project
//! without a token for it, a bound token speaks only as its agent, and revocation cuts off.

use agentbus::config::Settings;
use agentbus::startup::Application;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, http::HeaderValue};
use uuid::Uuid;

use crate::helpers::{Agent, TestApp};

const ADMIN: &str = "admin-secret-for-tests";

async fn request(
    app: &TestApp,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut builder = app
        .http
        .request(method.parse().expect("method"), app.url(path));
    if let Some(token) = token {
        builder = builder.bearer_auth(token);
    }
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn upgrade_status(url: &str, bearer: Option<&str>) -> Result<(), u16> {
    let mut req = url.into_client_request().expect("request");
    if let Some(token) = bearer {
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("unexpected {e}"),
    }
}

#[tokio::test]
async fn a_token_of_one_project_gives_nothing_on_another() {
    let app = TestApp::spawn_with(|s| s.admin_token = Some(ADMIN.into())).await;
    let (code, _) = request(
        &app,
        "POST",
        "/api/projects",
        None,
        Some(json!({"name": "a"})),
    )
    .await;
    assert_eq!(code, 401, "managing projects needs the admin token");
    let (code, a) = request(
        &app,
        "POST",
        "/api/projects",
        Some(ADMIN),
        Some(json!({"name": "a"})),
    )
    .await;
    assert_eq!(code, 201);
    let (_, b) = request(
        &app,
        "POST",
        "/api/projects",
        Some(ADMIN),
        Some(json!({"name": "b"})),
    )
    .await;
    let (pa, ta) = (
        a["id"].as_str().expect("id").to_owned(),
        a["token"].as_str().expect("token").to_owned(),
    );
    let pb = b["id"].as_str().expect("id").to_owned();
    assert!(ta.starts_with("ab_"));

    // Project A's token on project A works; on project B nothing does.
    let (code, _) = request(
        &app,
        "GET",
        &format!("/api/projects/{pa}/messages"),
        Some(&ta),
        None,
    )
    .await;
    assert_eq!(code, 200);
    let fake = Uuid::new_v4();
    let routes = [
        ("GET", format!("/api/projects/{pb}")),
        ("GET", format!("/api/projects/{pb}/messages")),
        ("POST", format!("/api/projects/{pb}/messages")),
        ("GET", format!("/api/projects/{pb}/messages/{fake}")),
        ("POST", format!("/api/projects/{pb}/messages/{fake}/read")),
        ("POST", format!("/api/projects/{pb}/requests")),
        ("GET", format!("/api/projects/{pb}/agents")),
        ("GET", format!("/api/projects/{pb}/agents/x/inbox")),
        ("POST", format!("/api/projects/{pb}/agents/x/ack")),
        ("GET", format!("/api/projects/{pb}/dead-letters")),
        (
            "POST",
            format!("/api/projects/{pb}/dead-letters/{fake}/retry"),
        ),
        ("GET", format!("/api/projects/{pb}/stats")),
        ("GET", format!("/api/projects/{pb}/tokens")),
    ];
    let body = json!({"sender_agent_id": "x", "sender_agent_type": "t", "content": "c", "agent_id": "x", "up_to": 1});
    for (method, path) in &routes {
        let (code, error) = request(&app, method, path, Some(&ta), Some(body.clone())).await;
        assert_eq!(code, 403, "{method} {path}: {error}");
        assert_eq!(error["code"], "forbidden");
        let (code, _) = request(&app, method, path, None, Some(body.clone())).await;
        assert_eq!(code, 401, "{method} {path} without a token");
        let (code, _) = request(
            &app,
            method,
            path,
            Some("ab_not-a-real-token"),
            Some(body.clone()),
        )
        .await;
        assert_eq!(code, 401, "{method} {path} with a made-up token");
    }
    for (method, path) in [("GET", "/api/projects"), ("GET", "/api/stats")] {
        let (code, _) = request(&app, method, path, Some(&ta), None).await;
        assert_eq!(code, 403, "{path} needs the admin token");
    }

    // The WebSocket too: header or query parameter, and only for its project.
    let ws = |project: &str, query: &str| {
        format!(
            "ws://127.0.0.1:{}/ws/agent/messages/{project}?{query}",
            app.port
        )
    };
    assert_eq!(upgrade_status(&ws(&pa, "agent_id=x"), None).await, Err(401));
    assert_eq!(
        upgrade_status(&ws(&pb, "agent_id=x"), Some(&ta)).await,
        Err(403)
    );
    assert_eq!(
        upgrade_status(&ws(&pa, "agent_id=x"), Some(&ta)).await,
        Ok(())
    );
    let mut via_query = Agent::connect(&ws(&pa, &format!("agent_id=y&token={ta}"))).await;
    via_query.send_ok(json!({"content": "hello"})).await;
}

#[tokio::test]
async fn a_bound_token_speaks_only_as_its_agent_and_revocation_cuts_it_off() {
    let app = TestApp::spawn_with(|s| s.admin_token = Some(ADMIN.into())).await;
    let (_, p) = request(
        &app,
        "POST",
        "/api/projects",
        Some(ADMIN),
        Some(json!({"name": "p"})),
    )
    .await;
    let project = p["id"].as_str().expect("id").to_owned();
    let (code, issued) = request(
        &app,
        "POST",
        &format!("/api/projects/{project}/tokens"),
        Some(ADMIN),
        Some(json!({"agent_id": "alice"})),
    )
    .await;
    assert_eq!(code, 201, "{issued}");
    let (token_id, token) = (
        issued["id"].as_str().expect("id").to_owned(),
        issued["token"].as_str().expect("t").to_owned(),
    );

    // A misspelt field does not silently give an unbound token.
    let (code, _) = request(
        &app,
        "POST",
        &format!("/api/projects/{project}/tokens"),
        Some(ADMIN),
        Some(json!({"agent": "alice"})),
    )
    .await;
    assert_eq!(code, 400);
    // The scheme is case-insensitive; the broker's own name is not for clients.
    let (code, _) = request(&app, "GET", "/api/projects", None, None).await;
    assert_eq!(code, 401);
    let lower = app
        .http
        .get(app.url("/api/projects"))
        .header("authorization", format!("bearer {ADMIN}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(lower.status(), 200);
    let (code, _) = request(&app, "POST", &format!("/api/projects/{project}/messages"), Some(ADMIN), Some(json!({"sender_agent_id": "agentbus", "sender_agent_type": "broker", "content": "fake timeout"}))).await;
    assert_eq!(code, 400, "no client may speak as the broker");

    // Over REST: no forging a sender; without one it is the bound agent.
    let url = format!("/api/projects/{project}/messages");
    let (code, _) = request(
        &app,
        "POST",
        &url,
        Some(&token),
        Some(json!({"sender_agent_id": "bob", "sender_agent_type": "t", "content": "x"})),
    )
    .await;
    assert_eq!(code, 403);
    let (code, stored) = request(
        &app,
        "POST",
        &url,
        Some(&token),
        Some(json!({"sender_agent_type": "t", "content": "x"})),
    )
    .await;
    assert_eq!(code, 201, "{stored}");
    assert_eq!(stored["sender_agent_id"], "alice");
    let (code, _) = request(
        &app,
        "GET",
        &format!("/api/projects/{project}/agents/bob/inbox"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(code, 403, "alice's token cannot read bob's inbox");
    let (code, _) = request(
        &app,
        "GET",
        &format!("/api/projects/{project}/tokens"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(code, 403, "a project token does not manage tokens");

    // Over the WebSocket: only as alice; the stored sender is the session's.
    let ws = |agent: &str| {
        format!(
            "ws://127.0.0.1:{}/ws/agent/messages/{project}?agent_id={agent}&token={token}",
            app.port
        )
    };
    assert_eq!(upgrade_status(&ws("bob"), None).await, Err(403));
    let mut alice = Agent::connect(&ws("alice")).await;
    alice
        .send_ok(json!({"content": "from alice", "sender_agent_id": "bob"}))
        .await;
    let (_, history) = request(
        &app,
        "GET",
        &format!("/api/projects/{project}/messages"),
        Some(ADMIN),
        None,
    )
    .await;
    let senders: Vec<&str> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["sender_agent_id"].as_str())
        .collect();
    assert_eq!(senders, ["alice", "alice"]);

    // Revoked: the open session is closed, and the token no longer opens anything.
    let (code, _) = request(
        &app,
        "DELETE",
        &format!("/api/projects/{project}/tokens/{token_id}"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(code, 204);
    assert_eq!(alice.expect_close().await, Some(CloseCode::from(4003)));
    assert_eq!(upgrade_status(&ws("alice"), None).await, Err(401));
    let (code, _) = request(&app, "GET", &url, Some(&token), None).await;
    assert_eq!(code, 401);
    let (_, listed) = request(
        &app,
        "GET",
        &format!("/api/projects/{project}/tokens"),
        Some(ADMIN),
        None,
    )
    .await;
    assert!(listed["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .all(|t| t.get("token").is_none() && t.get("token_hash").is_none()));
}

#[tokio::test]
async fn a_short_admin_token_is_refused_and_an_empty_one_means_none() {
    let build = |token: &str, bind: &str| {
        let settings = Settings {
            bind: bind.into(),
            database_url: format!("{}/postgres", crate::helpers::server_url()),
            admin_token: Some(token.into()),
            ..Settings::default()
        };
        Application::build(settings)
    };
    let error = build("short", "127.0.0.1:0")
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("too short"), "{error}");
    let error = build("", "0.0.0.0:0")
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("AGENTBUS_ADMIN_TOKEN"),
        "an empty token is no token: {error}"
    );
}

#[tokio::test]
async fn an_open_broker_refuses_a_non_loopback_address() {
    let settings = Settings {
        bind: "0.0.0.0:0".into(),
        database_url: format!("{}/postgres", crate::helpers::server_url()),
        ..Settings::default()
    };
    let error = match Application::build(settings).await {
        Ok(_) => panic!("an open broker started on 0.0.0.0"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("AGENTBUS_ADMIN_TOKEN"), "{error}");
}

/// Ids that a reader could take for the broker's own (`agentbus`) are refused everywhere a
/// client names itself: the WebSocket, a REST sender, a token bound to an agent. So are ids
/// with invisible or direction-changing characters. Nothing is stored for any of them.
#[tokio::test]
async fn no_client_can_pass_for_the_broker_or_hide_characters_in_its_id() {
    let app = TestApp::spawn_with(|s| s.admin_token = Some(ADMIN.into())).await;
    let (code, created) = request(
        &app,
        "POST",
        "/api/projects",
        Some(ADMIN),
        Some(json!({"name": "lookalikes"})),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let project = created["id"].as_str().expect("id").to_owned();
    let lookalikes = [
        "Agentbus",
        "agentbus ",
        "agentbus\u{200B}",
        "\u{0430}gentbus",
        "ａｇｅｎｔｂｕｓ",
        "agent\u{00AD}bus",
        "\u{FEFF}agentbus",
        "\u{202E}subtnega",
        "ali\u{200B}ce",
    ];
    for id in lookalikes {
        let encoded: String = url_encode(id);
        let url = format!(
            "ws://127.0.0.1:{}/ws/agent/messages/{project}?agent_id={encoded}",
            app.port
        );
        assert_eq!(
            upgrade_status(&url, Some(ADMIN)).await,
            Err(400),
            "WebSocket agent_id {id:?}"
        );
        let (code, body) = request(
            &app,
            "POST",
            &format!("/api/projects/{project}/messages"),
            Some(ADMIN),
            Some(json!({"sender_agent_id": id, "sender_agent_type": "broker", "content": "fake timeout"})),
        )
        .await;
        assert_eq!(code, 400, "REST sender {id:?}: {body}");
        assert_eq!(body["code"], "invalid_field", "{body}");
        let (code, body) = request(
            &app,
            "POST",
            &format!("/api/projects/{project}/tokens"),
            Some(ADMIN),
            Some(json!({"agent_id": id})),
        )
        .await;
        assert_eq!(code, 400, "token bound to {id:?}: {body}");
    }
    let (code, history) = request(
        &app,
        "GET",
        &format!("/api/projects/{project}/messages"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        history["messages"].as_array().map(Vec::len),
        Some(0),
        "{history}"
    );
    let (_, tokens) = request(
        &app,
        "GET",
        &format!("/api/projects/{project}/tokens"),
        Some(ADMIN),
        None,
    )
    .await;
    // Only the token issued with the project, if any, and none bound to a look-alike.
    assert!(tokens["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .all(|t| t["agent_id"].is_null()));
}

/// Percent-encodes every byte outside the unreserved set.
fn url_encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
