//! The MCP endpoint over raw HTTP: the handshake, sessions, tools, and every refusal before
//! any JSON-RPC (nothing stored).

use diesel_async::RunQueryDsl;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{status, TestApp};

const ACCEPT: &str = "application/json, text/event-stream";

struct Mcp<'a> {
    app: &'a TestApp,
    url: String,
    session: Option<String>,
    next_id: i64,
}

impl<'a> Mcp<'a> {
    fn new(app: &'a TestApp, project: Uuid, query: &str) -> Self {
        Mcp {
            app,
            url: app.url(&format!("/mcp/{project}?{query}")),
            session: None,
            next_id: 1,
        }
    }

    async fn post_raw(
        &self,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self
            .app
            .http
            .post(&self.url)
            .header("accept", ACCEPT)
            .json(body);
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        for (k, v) in extra {
            request = request.header(*k, *v);
        }
        let response = request.send().await.expect("POST /mcp");
        let code = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON")
        };
        (code, headers, value)
    }

    async fn initialize(&mut self, version: &str) -> Value {
        let (code, headers, body) = self
            .post_raw(
                &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                    "protocolVersion": version, "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"}}}),
                &[],
            )
            .await;
        assert_eq!(code, 200, "{body}");
        self.session = Some(
            headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .expect("a session id")
                .to_owned(),
        );
        let (code, _, ack) = self
            .post_raw(
                &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
                &[],
            )
            .await;
        assert_eq!(code, 202, "{ack}");
        body
    }

    async fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let (code, _, body) = self
            .post_raw(
                &json!({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}),
                &[],
            )
            .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["id"], self.next_id);
        body
    }

    async fn tool(&mut self, name: &str, arguments: Value) -> Value {
        let body = self
            .request("tools/call", json!({"name": name, "arguments": arguments}))
            .await;
        body["result"].clone()
    }
}

async fn count(app: &TestApp, table: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = app.db().await;
    diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
        .get_result::<Count>(&mut conn)
        .await
        .expect("count")
        .n
}

#[tokio::test]
async fn the_handshake_negotiates_the_version_and_sessions_are_required_and_end() {
    let app = TestApp::spawn().await;
    let project = app.create_project("mcp").await;
    let mut mcp = Mcp::new(&app, project, "agent_id=claude&agent_type=coder");
    let init = mcp.initialize("2025-03-26").await;
    assert_eq!(init["result"]["protocolVersion"], "2025-03-26");
    assert_eq!(init["result"]["serverInfo"]["name"], "agentbus");
    assert!(init["result"]["capabilities"]["tools"].is_object());
    let mut newer = Mcp::new(&app, project, "agent_id=claude&agent_type=coder");
    let init = newer.initialize("2099-01-01").await;
    assert_eq!(
        init["result"]["protocolVersion"], "2025-06-18",
        "the newest spoken here"
    );

    // Joined on its first call, listed with its interface.
    let member = app.member(project, "claude").await.expect("a member");
    assert_eq!(member["interface"], "mcp");
    assert_eq!(member["agent_type"], "coder");
    assert_eq!(member["online"], true);

    let pong = mcp.request("ping", json!({})).await;
    assert_eq!(pong["result"], json!({}));
    let unknown = mcp.request("server/discover", json!({})).await;
    assert_eq!(unknown["error"]["code"], -32601);

    // A batch (2025-03-26).
    let (code, _, batch) = mcp
        .post_raw(
            &json!([{"jsonrpc": "2.0", "id": 50, "method": "ping"},
                    {"jsonrpc": "2.0", "method": "notifications/whatever"},
                    {"jsonrpc": "2.0", "id": 51, "method": "nope"}]),
            &[],
        )
        .await;
    assert_eq!(code, 200, "{batch}");
    assert_eq!(batch.as_array().map(Vec::len), Some(2), "{batch}");
    assert_eq!(batch[1]["error"]["code"], -32601);
    // Not in 2025-06-18.
    let (code, _, refused) = newer
        .post_raw(&json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]), &[])
        .await;
    assert_eq!(code, 200);
    assert_eq!(refused["error"]["code"], -32600);
    let (code, _, bad_version) = newer
        .post_raw(
            &json!({"jsonrpc": "2.0", "id": 2, "method": "ping"}),
            &[("mcp-protocol-version", "1999-01-01")],
        )
        .await;
    assert_eq!(code, 400, "{bad_version}");
    let (code, _, parse) = {
        let response = app
            .http
            .post(&mcp.url)
            .header("mcp-session-id", mcp.session.clone().expect("session"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .expect("POST");
        (
            response.status().as_u16(),
            (),
            response.json::<Value>().await.expect("JSON"),
        )
    };
    assert_eq!(code, 400);
    assert_eq!(parse["error"]["code"], -32700);
    let huge = app
        .http
        .post(&mcp.url)
        .header("mcp-session-id", mcp.session.clone().expect("session"))
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .expect("POST");
    assert_eq!(huge.status(), 400, "a body over 1 MiB is refused");

    // Without a session id: 400; with an unknown one: 404; another agent's: 404.
    let no_session = Mcp::new(&app, project, "agent_id=claude&agent_type=coder");
    let (code, _, body) = no_session
        .post_raw(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            &[],
        )
        .await;
    assert_eq!(code, 400, "{body}");
    let mut unknown = Mcp::new(&app, project, "agent_id=claude&agent_type=coder");
    unknown.session = Some("0123456789abcdef".into());
    let (code, _, _) = unknown
        .post_raw(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            &[],
        )
        .await;
    assert_eq!(code, 404);
    let mut thief = Mcp::new(&app, project, "agent_id=other&agent_type=coder");
    thief.session = mcp.session.clone();
    let (code, _, _) = thief
        .post_raw(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            &[],
        )
        .await;
    assert_eq!(code, 404, "a session belongs to its agent");

    // GET offers no stream; DELETE ends the session.
    let get = app
        .http
        .get(&mcp.url)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("GET");
    assert_eq!(get.status(), 405);
    let delete = app
        .http
        .delete(&mcp.url)
        .header("mcp-session-id", mcp.session.clone().expect("session"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(delete.status(), 200);
    let (code, _, _) = mcp
        .post_raw(&json!({"jsonrpc": "2.0", "id": 9, "method": "ping"}), &[])
        .await;
    assert_eq!(code, 404, "ended");
}

#[tokio::test]
async fn the_tools_send_read_ask_reply_list_search_and_thread() {
    let app = TestApp::spawn().await;
    let project = app.create_project("tools").await;
    let mut ws = app.connect(project, "human", "operator").await;
    let mut mcp = Mcp::new(&app, project, "agent_id=bot&agent_type=coder");
    mcp.initialize("2025-06-18").await;

    let tools = mcp.request("tools/list", json!({})).await;
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "send_message",
            "check_inbox",
            "ask",
            "reply",
            "list_agents",
            "search_messages",
            "read_thread",
            "claim_files",
            "release_files",
            "list_claims",
            "object_claim",
            "list_tasks",
            "claim_task",
            "complete_task"
        ]
    );
    let bytes = tools["result"].to_string().len();
    assert!(bytes / 4 < 2_500, "tools/list is {bytes} bytes");

    let sent = mcp
        .tool("send_message", json!({"content": "hello humans"}))
        .await;
    assert_eq!(sent["isError"], false, "{sent}");
    let delivered = ws.expect_op("message").await;
    assert_eq!(delivered["content"], "hello humans");
    assert_eq!(delivered["sender_agent_id"], "bot");
    assert_eq!(sent["structuredContent"]["seq"], delivered["seq"]);

    ws.send_ok(json!({"content": "do the thing", "to": "bot", "priority": 1}))
        .await;
    let inbox = mcp.tool("check_inbox", json!({})).await;
    assert_eq!(
        inbox["structuredContent"]["messages"][0]["content"],
        "do the thing"
    );
    let text = inbox["content"][0]["text"].as_str().expect("text");
    assert!(
        text.starts_with("#") && text.contains("human → bot: do the thing"),
        "{text}"
    );
    let again = mcp.tool("check_inbox", json!({"wait_seconds": 0.2})).await;
    assert_eq!(
        again["structuredContent"]["messages"],
        json!([]),
        "acknowledged by the first"
    );

    // A request from the WebSocket agent, answered with reply.
    let request = ws
        .send_ok(
            json!({"content": "status?", "to": "bot", "expects_reply": true, "timeout_ms": 30_000}),
        )
        .await;
    let inbox = mcp.tool("check_inbox", json!({"peek": true})).await;
    assert_eq!(
        inbox["structuredContent"]["messages"][0]["id"],
        request["id"]
    );
    let replied = mcp
        .tool(
            "reply",
            json!({"message_id": request["id"], "content": "all green", "success": true}),
        )
        .await;
    assert_eq!(replied["isError"], false, "{replied}");
    let reply = ws.expect_op("message").await;
    assert_eq!(reply["reply_to"], request["id"]);
    assert_eq!(reply["content"], "all green");

    // ask to nobody: a result the model can act on.
    let nobody = mcp
        .tool(
            "ask",
            json!({"content": "anyone?", "to": "ghost", "timeout_seconds": 5}),
        )
        .await;
    assert_eq!(nobody["isError"], true, "{nobody}");
    let bad = mcp.tool("check_inbox", json!({"wait_seconds": 99})).await;
    assert_eq!(bad["isError"], true);
    assert!(bad["content"][0]["text"]
        .as_str()
        .is_some_and(|t| t.contains("wait_seconds")));

    let agents = mcp.tool("list_agents", json!({})).await;
    let listed = agents["structuredContent"]["agents"]
        .as_array()
        .expect("agents");
    assert!(listed
        .iter()
        .any(|a| a["agent_id"] == "bot" && a["interface"] == "mcp" && a["online"] == true));
    let found = mcp
        .tool("search_messages", json!({"sender": "human"}))
        .await;
    assert!(!found["structuredContent"]["messages"]
        .as_array()
        .expect("messages")
        .is_empty());
    let thread = mcp
        .tool("read_thread", json!({"message_id": request["id"]}))
        .await;
    assert_eq!(thread["structuredContent"]["message"]["id"], request["id"]);
    assert_eq!(
        thread["structuredContent"]["replies"][0]["content"],
        "all green"
    );
    let unknown = mcp
        .request("tools/call", json!({"name": "rm_rf", "arguments": {}}))
        .await;
    assert_eq!(unknown["error"]["code"], -32602);
    ws.send_ok(status("bye")).await;
}

#[tokio::test]
async fn refusals_come_before_any_json_rpc_and_store_nothing() {
    let admin = "b".repeat(32);
    let app = TestApp::spawn_with(|s| s.admin_token = Some("b".repeat(32))).await;
    let create = |name: &'static str| {
        let request = app
            .http
            .post(app.url("/api/projects"))
            .header("authorization", format!("Bearer {admin}"))
            .json(&json!({"name": name}));
        async move {
            request
                .send()
                .await
                .expect("create")
                .json::<Value>()
                .await
                .expect("JSON")
        }
    };
    let mine = create("mine").await;
    let theirs = create("theirs").await;
    let project: Uuid = mine["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let other_token = theirs["token"].as_str().expect("token").to_owned();
    let response = app
        .http
        .post(app.url(&format!("/api/projects/{project}/tokens")))
        .header("authorization", format!("Bearer {admin}"))
        .json(&json!({"agent_id": "bound"}))
        .send()
        .await
        .expect("issue");
    let bound = response.json::<Value>().await.expect("JSON")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}});
    let attempt = |query: String, headers: Vec<(&'static str, String)>| {
        let mut request = app
            .http
            .post(app.url(&format!("/mcp/{project}?{query}")))
            .header("accept", ACCEPT)
            .json(&init);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        async move {
            let response = request.send().await.expect("POST /mcp");
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.expect("a JSON error"))
        }
    };
    type Case = (&'static str, String, Vec<(&'static str, String)>, u16);
    let cases: Vec<Case> = vec![
        ("no token", "agent_id=a".into(), vec![], 401),
        (
            "another project's token",
            "agent_id=a".into(),
            vec![("authorization", format!("Bearer {other_token}"))],
            403,
        ),
        (
            "a bound token, another agent",
            "agent_id=a".into(),
            vec![("authorization", format!("Bearer {bound}"))],
            403,
        ),
        (
            "a foreign origin",
            "agent_id=a".into(),
            vec![
                ("authorization", format!("Bearer {admin}")),
                ("origin", "https://evil.example".into()),
            ],
            403,
        ),
        (
            "a foreign host",
            "agent_id=a".into(),
            vec![
                ("authorization", format!("Bearer {admin}")),
                ("host", format!("evil.example:{}", app.port)),
            ],
            403,
        ),
        (
            "the broker's own id",
            "agent_id=agentbus".into(),
            vec![("authorization", format!("Bearer {admin}"))],
            400,
        ),
        (
            "no agent",
            String::new(),
            vec![("authorization", format!("Bearer {admin}"))],
            400,
        ),
    ];
    for (what, query, headers, expected) in cases {
        let (code, body) = attempt(query, headers).await;
        assert_eq!(code, expected, "{what}: {body}");
        assert!(
            body["code"].is_string() && body.get("jsonrpc").is_none(),
            "{what}: {body}"
        );
    }
    let unknown_project = app
        .http
        .post(app.url(&format!("/mcp/{}?agent_id=a", Uuid::new_v4())))
        .header("authorization", format!("Bearer {admin}"))
        .json(&init)
        .send()
        .await
        .expect("POST");
    assert_eq!(unknown_project.status(), 404);
    // Refused before the body is read: a huge body without a token is a 401, not a 400.
    let huge = app
        .http
        .post(app.url(&format!("/mcp/{project}?agent_id=a")))
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .expect("POST");
    assert_eq!(huge.status(), 401);
    assert_eq!(count(&app, "members").await, 0, "nothing stored");
    assert_eq!(count(&app, "agent_messages").await, 0);

    // Allowed: the bound token as its agent (no agent_id needed), and the broker's own
    // loopback origin.
    let (code, body) = attempt(
        String::new(),
        vec![
            ("authorization", format!("Bearer {bound}")),
            ("origin", format!("http://127.0.0.1:{}", app.port)),
        ],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(count(&app, "members").await, 1);
}

/// Round after round, a waiting inbox read is woken by a WebSocket send and an MCP
/// `send_message` reaches the WebSocket agent. The times are printed, never asserted
/// (`cargo test --test api repeatedly -- --nocapture`; more runs: `AGENTBUS_TEST_ROUNDS`).
#[tokio::test]
async fn a_waiting_read_wakes_and_an_mcp_send_arrives_repeatedly() {
    let rounds: usize = std::env::var("AGENTBUS_TEST_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    use std::time::{Duration, Instant};
    let app = TestApp::spawn().await;
    let project = app.create_project("measure").await;
    let mut ws = app.connect(project, "ws", "operator").await;
    let mut mcp = Mcp::new(&app, project, "agent_id=bot&agent_type=coder");
    mcp.initialize("2025-06-18").await;
    let metrics = app.url("/metrics");
    let summary = |mut samples: Vec<Duration>| {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms",
            ms(samples[samples.len() / 2]),
            ms(samples[samples.len() * 95 / 100]),
            ms(samples[samples.len() - 1])
        )
    };
    let mut wake = Vec::new();
    for _ in 0..rounds {
        let url = app.url(&format!(
            "/api/projects/{project}/agents/bot/inbox?wait_ms=60000&ack=true"
        ));
        let http = app.http.clone();
        let read = tokio::spawn(async move {
            let body: Value = http
                .get(url)
                .send()
                .await
                .expect("GET")
                .json()
                .await
                .expect("JSON");
            (Instant::now(), body)
        });
        crate::helpers::eventually("the read to wait", || async {
            let text = app
                .http
                .get(&metrics)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .any(|l| l == "agentbus_inbox_waits 1")
                .then_some(())
        })
        .await;
        let sent = Instant::now();
        ws.send_ok(json!({"content": "wake", "to": "bot"})).await;
        let (returned, body) = read.await.expect("read");
        assert_eq!(body["messages"][0]["content"], "wake");
        wake.push(returned - sent);
    }
    let mut round_trip = Vec::new();
    for n in 0..rounds {
        let started = Instant::now();
        mcp.tool(
            "send_message",
            json!({"content": format!("m{n}"), "to": "ws"}),
        )
        .await;
        loop {
            let frame = ws.next_json().await;
            if frame["op"] == "message" && frame["content"] == format!("m{n}") {
                break;
            }
        }
        round_trip.push(started.elapsed());
    }
    println!(
        "long-poll wake-up (WebSocket send -> inbox read returns): {}",
        summary(wake)
    );
    println!(
        "MCP send_message -> WebSocket delivery: {}",
        summary(round_trip)
    );
}

#[tokio::test]
async fn the_claim_and_task_tools() {
    let app = TestApp::spawn().await;
    let project = app.create_project("coordination-tools").await;
    let mut lead = app.connect(project, "lead", "lead").await;
    let mut fe = Mcp::new(&app, project, "agent_id=fe-1&agent_type=frontend");
    fe.initialize("2025-06-18").await;
    let mut be = Mcp::new(&app, project, "agent_id=be-1&agent_type=backend");
    be.initialize("2025-06-18").await;

    // Claims: granted, listed, refused to another agent with the holder named.
    let granted = fe
        .tool(
            "claim_files",
            json!({"paths": ["web/src/**"], "reason": "component Z", "ttl_seconds": 600}),
        )
        .await;
    assert_eq!(granted["isError"], false, "{granted}");
    let claim_id = granted["structuredContent"]["claim"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let text = granted["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("fe-1 holds (until") && text.contains("web/src/**"),
        "{text}"
    );
    let listed = be.tool("list_claims", json!({})).await;
    assert_eq!(
        listed["structuredContent"]["claims"][0]["id"],
        claim_id.as_str()
    );
    let refused = be
        .tool("claim_files", json!({"paths": ["web/src/app.tsx"]}))
        .await;
    assert_eq!(refused["isError"], true, "{refused}");
    assert_eq!(refused["structuredContent"]["code"], "conflict");
    assert!(
        refused["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("conflicts with fe-1"),
        "{refused}"
    );
    // An objection to a claim that is not pending is refused; bad arguments are a tool error.
    let late = be
        .tool(
            "object_claim",
            json!({"claim_id": claim_id, "reason": "no"}),
        )
        .await;
    assert_eq!(late["structuredContent"]["code"], "claim_decided", "{late}");
    let bad = be.tool("claim_files", json!({"paths": ["../x"]})).await;
    assert_eq!(bad["isError"], true);
    assert!(
        bad["content"][0]["text"].as_str().unwrap().contains(".."),
        "{bad}"
    );
    let released = fe.tool("release_files", json!({})).await;
    assert_eq!(
        released["structuredContent"]["released"][0]["state"], "released",
        "{released}"
    );
    assert_eq!(
        be.tool("list_claims", json!({})).await["structuredContent"]["claims"],
        json!([])
    );

    // Tasks: offered to the frontend type, taken once, completed; the result reaches the lead.
    lead.send_ok(json!({"content": "Need frontend specialist for component Z", "to_type": "frontend", "task": true}))
        .await;
    let open = fe.tool("list_tasks", json!({})).await;
    let task = open["structuredContent"]["tasks"][0].clone();
    assert_eq!(task["state"], "open", "{open}");
    let task_id = task["id"].as_str().unwrap().to_owned();
    let inbox = fe.tool("check_inbox", json!({})).await;
    assert!(
        inbox["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("claim_task"),
        "{inbox}"
    );
    let not_offered = be.tool("claim_task", json!({"task_id": task_id})).await;
    assert_eq!(
        not_offered["structuredContent"]["code"], "forbidden",
        "{not_offered}"
    );
    let taken = fe.tool("claim_task", json!({"task_id": task_id})).await;
    assert_eq!(taken["isError"], false, "{taken}");
    assert_eq!(taken["structuredContent"]["task"]["holder"], "fe-1");
    let done = fe
        .tool(
            "complete_task",
            json!({"task_id": task_id, "result": "component Z is in web/src/z.tsx"}),
        )
        .await;
    assert_eq!(done["structuredContent"]["task"]["state"], "done", "{done}");
    let until = crate::helpers::deadline();
    let result = loop {
        let frame = lead.next_json_until(until).await;
        if frame["metadata"]["event"] == "done" {
            break frame;
        }
    };
    assert_eq!(result["to"], "lead");
    assert_eq!(result["success"], true);
    assert_eq!(result["reply_to"], task_id.as_str());
    assert!(result["content"]
        .as_str()
        .unwrap()
        .contains("component Z is in web/src/z.tsx"));
}
