//! Members without a socket: joining over REST (explicitly or on the first call as an agent),
//! presence, and the notification watermark.

use diesel_async::RunQueryDsl;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{status, TestApp};

fn contents(body: &Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().expect("content").to_owned())
        .collect()
}

async fn member_count(app: &TestApp) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = app.db().await;
    diesel::sql_query("SELECT count(*) AS n FROM members")
        .get_result::<Count>(&mut conn)
        .await
        .expect("count")
        .n
}

#[tokio::test]
async fn an_agent_joined_over_rest_is_owed_the_broadcasts_after_it_joined_not_before() {
    let app = TestApp::spawn().await;
    let project = app.create_project("join").await;
    let mut ws = app.connect(project, "ws-agent", "coder").await;
    ws.send_ok(status("before")).await;

    let (code, joined) = app
        .post_json(
            &format!("/api/projects/{project}/agents"),
            &json!({"agent_id": "shell-1", "agent_type": "shell", "capabilities": ["bash"], "description": "runs scripts"}),
        )
        .await;
    assert_eq!(code, 200, "{joined}");
    let agent = &joined["agent"];
    assert_eq!(agent["agent_id"], "shell-1");
    assert_eq!(agent["agent_type"], "shell");
    assert_eq!(agent["interface"], "rest");
    assert_eq!(agent["online"], true, "it just called in: {agent}");
    assert_eq!(agent["queue_depth"], 0, "nothing before joining is owed");
    assert_eq!(agent["capabilities"], json!(["bash"]));
    assert_eq!(agent["description"], "runs scripts");

    ws.send_ok(status("after")).await;
    let (code, inbox) = app
        .get_json(&format!("/api/projects/{project}/agents/shell-1/inbox"))
        .await;
    assert_eq!(code, 200, "{inbox}");
    assert_eq!(contents(&inbox), ["after"]);
    assert_eq!(inbox["remaining"], 0);

    // Joining again is idempotent and updates the type; the cursor stays.
    let (code, again) = app
        .post_json(
            &format!("/api/projects/{project}/agents"),
            &json!({"agent_id": "shell-1", "agent_type": "tester"}),
        )
        .await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["agent"]["agent_type"], "tester");
    assert_eq!(again["agent"]["queue_depth"], 1);
    assert_eq!(again["agent"]["capabilities"], json!(["bash"]), "kept");
    let listed = app.member(project, "shell-1").await.expect("listed");
    assert_eq!(listed["agent_type"], "tester");
    let ws_member = app.member(project, "ws-agent").await.expect("listed");
    assert_eq!(ws_member["interface"], "websocket");
    assert_eq!(ws_member["online"], true);
}

#[tokio::test]
async fn the_first_inbox_read_publish_or_request_as_an_agent_makes_it_a_member() {
    let app = TestApp::spawn().await;
    let project = app.create_project("implicit").await;
    let mut ws = app.connect(project, "worker", "codegen").await;

    // An inbox read: a member of the type it names, from now on.
    let (code, inbox) = app
        .get_json(&format!(
            "/api/projects/{project}/agents/reader/inbox?agent_type=watcher"
        ))
        .await;
    assert_eq!(code, 200, "{inbox}");
    assert_eq!(contents(&inbox), Vec::<String>::new());
    let reader = app.member(project, "reader").await.expect("a member");
    assert_eq!(reader["agent_type"], "watcher");
    assert_eq!(reader["interface"], "rest");
    assert_eq!(reader["online"], true);
    ws.send_ok(status("to everyone")).await;
    let (_, inbox) = app
        .get_json(&format!("/api/projects/{project}/agents/reader/inbox"))
        .await;
    assert_eq!(contents(&inbox), ["to everyone"]);
    assert_eq!(
        app.member(project, "reader").await.expect("member")["agent_type"],
        "watcher",
        "a later call without a type keeps it"
    );

    // A publish: the sender is a member with its type, not "unknown", and is owed what
    // follows.
    let (code, sent) = app
        .post_json(
            &format!("/api/projects/{project}/messages"),
            &json!({"sender_agent_id": "script", "sender_agent_type": "scripts", "content": "hi"}),
        )
        .await;
    assert_eq!(code, 201, "{sent}");
    assert_eq!(ws.expect_op("message").await["content"], "hi");
    let script = app.member(project, "script").await.expect("a member");
    assert_eq!(script["agent_type"], "scripts");
    assert_eq!(
        script["queue_depth"], 0,
        "its own broadcast is not owed to it"
    );
    ws.send_ok(status("for the script too")).await;
    let (_, inbox) = app
        .get_json(&format!("/api/projects/{project}/agents/script/inbox"))
        .await;
    assert_eq!(contents(&inbox), ["for the script too"]);

    // A request over REST: the requester joins, and the reply handed back in the response
    // is not left owed in its queue.
    let asking = {
        let app_http = app.http.clone();
        let url = app.url(&format!("/api/projects/{project}/requests"));
        tokio::spawn(async move {
            let response = app_http
                .post(url)
                .json(&json!({"sender_agent_id": "asker", "sender_agent_type": "cli",
                              "content": "what is 6*7?", "to_type": "codegen", "timeout_ms": 30_000}))
                .send()
                .await
                .expect("POST requests");
            (
                response.status().as_u16(),
                response.json::<Value>().await.expect("JSON"),
            )
        })
    };
    let request = loop {
        let frame = ws.expect_op("message").await;
        if frame["expects_reply"] == true {
            break frame;
        }
    };
    ws.send_ok(json!({"content": "42", "reply_to": request["id"], "success": true}))
        .await;
    let (code, answer) = asking.await.expect("the request task");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["response"]["content"], "42");
    let asker = app.member(project, "asker").await.expect("a member");
    assert_eq!(asker["agent_type"], "cli");
    assert_eq!(
        asker["queue_depth"], 0,
        "the reply it was handed is delivered: {asker}"
    );
    let (_, one) = app
        .get_json(&format!(
            "/api/projects/{project}/messages/{}",
            answer["response"]["id"].as_str().expect("id")
        ))
        .await;
    assert!(one["message"]["delivered_at"].is_string(), "{one}");
}

#[tokio::test]
async fn joining_validates_the_agent_like_the_websocket_and_stores_nothing_when_refused() {
    let app = TestApp::spawn_with(|s| s.admin_token = Some("a".repeat(32))).await;
    let admin = format!("Bearer {}", "a".repeat(32));
    let response = app
        .http
        .post(app.url("/api/projects"))
        .header("authorization", &admin)
        .json(&json!({"name": "v"}))
        .send()
        .await
        .expect("create");
    let project: Uuid = response.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let response = app
        .http
        .post(app.url(&format!("/api/projects/{project}/tokens")))
        .header("authorization", &admin)
        .json(&json!({"agent_id": "bound"}))
        .send()
        .await
        .expect("issue");
    assert_eq!(response.status(), 201);
    let bound = response.json::<Value>().await.expect("JSON")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let join = |token: String, body: Value| {
        let request = app
            .http
            .post(app.url(&format!("/api/projects/{project}/agents")))
            .header("authorization", format!("Bearer {token}"))
            .json(&body);
        async move {
            let response = request.send().await.expect("POST agents");
            (
                response.status().as_u16(),
                response.json::<Value>().await.expect("JSON"),
            )
        }
    };
    let admin_token = "a".repeat(32);
    for (body, code) in [
        (json!({"agent_id": "agentbus", "agent_type": "x"}), 400),
        (json!({"agent_id": "ok", "agent_type": "bad type"}), 400),
        (json!({"agent_id": "", "agent_type": "x"}), 400),
        (json!({"agent_type": "x"}), 400),
        (json!({"agent_id": "ok"}), 400),
    ] {
        let (got, error) = join(admin_token.clone(), body.clone()).await;
        assert_eq!(got, code, "{body} -> {error}");
        assert!(error["code"].is_string(), "{error}");
    }
    let (got, error) = join(
        bound.clone(),
        json!({"agent_id": "other", "agent_type": "x"}),
    )
    .await;
    assert_eq!(got, 403, "{error}");
    let (got, _) = join(
        "ab_wrong".into(),
        json!({"agent_id": "x", "agent_type": "x"}),
    )
    .await;
    assert_eq!(got, 401);
    let response = app
        .http
        .get(app.url(&format!("/api/projects/{project}/agents/other/inbox")))
        .header("authorization", format!("Bearer {bound}"))
        .send()
        .await
        .expect("inbox");
    assert_eq!(response.status(), 403);
    assert_eq!(member_count(&app).await, 0, "nothing was stored");

    // The bound token joins as its own agent, even without naming it.
    let (got, joined) = join(bound, json!({"agent_type": "x"})).await;
    assert_eq!(got, 200, "{joined}");
    assert_eq!(joined["agent"]["agent_id"], "bound");
}

#[tokio::test]
async fn notifications_tell_of_new_mail_once_and_then_nothing() {
    let app = TestApp::spawn().await;
    let project = app.create_project("notify").await;
    let mut ws = app.connect(project, "lead", "coordinator").await;
    let (code, _) = app
        .post_json(
            &format!("/api/projects/{project}/agents"),
            &json!({"agent_id": "dev", "agent_type": "backend"}),
        )
        .await;
    assert_eq!(code, 200);
    let notify = |query: &'static str| {
        let url = app.url(&format!(
            "/api/projects/{project}/agents/dev/notifications{query}"
        ));
        let http = app.http.clone();
        async move {
            let response = http.post(url).send().await.expect("POST notifications");
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.expect("JSON"))
        }
    };
    let (code, nothing) = notify("").await;
    assert_eq!(code, 200, "{nothing}");
    assert_eq!(contents(&nothing), Vec::<String>::new());
    assert_eq!(nothing["notified_up_to"], 0);

    ws.send_ok(status("first")).await;
    let urgent = ws
        .send_ok(json!({"content": "urgent", "to": "dev", "priority": 0}))
        .await;
    let (_, peeked) = notify("?peek=true").await;
    assert_eq!(contents(&peeked), ["urgent", "first"], "replay order");
    assert_eq!(peeked["notified_up_to"], 0, "a peek moves nothing");
    let (_, page) = notify("?limit=1").await;
    assert_eq!(contents(&page), ["first"], "the lowest seqs first");
    assert_eq!(page["remaining"], 1);
    let (_, page) = notify("").await;
    assert_eq!(contents(&page), ["urgent"]);
    assert_eq!(page["notified_up_to"], urgent["seq"]);
    assert_eq!(page["remaining"], 0);
    let (_, again) = notify("").await;
    assert_eq!(contents(&again), Vec::<String>::new(), "told once");

    ws.send_ok(status("third")).await;
    let (_, page) = notify("").await;
    assert_eq!(contents(&page), ["third"]);
    // Being told is not being done: everything is still owed.
    let (_, inbox) = app
        .get_json(&format!("/api/projects/{project}/agents/dev/inbox"))
        .await;
    assert_eq!(contents(&inbox), ["urgent", "first", "third"]);
}
