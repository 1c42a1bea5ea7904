//! Request/reply, addressing by type, capabilities, dead letters, debugging queries, stats.

use std::time::{Duration, Instant};

use diesel_async::RunQueryDsl;
use serde_json::{json, Value};

use crate::helpers::{eventually, status, Agent, TestApp};

fn seq(frame: &Value) -> i64 {
    frame["seq"].as_i64().expect("seq")
}

#[tokio::test]
async fn a_request_to_a_type_reaches_every_agent_of_it_and_replies_reach_only_the_requester() {
    let app = TestApp::spawn().await;
    let project = app.create_project("rr").await;
    let mut coordinator = app.connect(project, "coord", "coordinator").await;
    let mut g1 = app.connect(project, "gen-1", "codegen").await;
    let mut g2 = app.connect(project, "gen-2", "codegen").await;
    let mut reviewer = app.connect(project, "rev", "reviewer").await;

    let request = coordinator
        .send_ok(json!({
            "type": "task_assignment", "content": "implement component Z", "to_type": "codegen",
            "expects_reply": true, "timeout_ms": 60_000, "priority": 1,
        }))
        .await;
    let request_id = request["id"].as_str().expect("id").to_owned();
    let mut got = Vec::new();
    for agent in [&mut g1, &mut g2] {
        let m = agent.expect_op("message").await;
        assert_eq!(m["id"], request["id"]);
        assert_eq!(m["to_type"], "codegen");
        assert_eq!(m["expects_reply"], true);
        assert_eq!(
            m["correlation_id"], request_id,
            "a request is correlated by its own id"
        );
        assert!(m["reply_deadline"].is_string());
        got.push(m);
    }

    // The reply names someone else in `to`: it goes to the requester all the same.
    g1.send_ok(json!({"type": "result_report", "content": "done", "reply_to": request_id, "success": true, "to": "rev"}))
        .await;
    let reply = coordinator.expect_op("message").await;
    assert_eq!(reply["reply_to"], request_id);
    assert_eq!(reply["to"], "coord");
    assert_eq!(reply["success"], true);
    assert_eq!(reply["in_reply_to_seq"], seq(&request));
    assert!(reply["duration_ms"].as_i64().is_some_and(|d| d >= 0));
    assert!(reply.get("late").is_none(), "not late: {reply}");
    // Correlated by correlation id alone works too.
    g2.send_ok(json!({"type": "response", "content": "also done", "correlation_id": request_id, "success": false, "error": "conflict"}))
        .await;
    let second = coordinator.expect_op("message").await;
    assert_eq!(second["reply_to"], request_id);
    assert_eq!(second["error"], "conflict");

    // Neither the request nor the replies reached the reviewer: its next frame is this.
    coordinator.send_ok(status("everyone")).await;
    assert_eq!(reviewer.expect_op("message").await["content"], "everyone");

    // The thread query returns the request and its replies; the single-message view says so.
    let (_, thread) = app
        .get_json(&format!(
            "/api/projects/{project}/messages?thread={request_id}"
        ))
        .await;
    let seqs: Vec<i64> = thread["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(seq)
        .collect();
    assert_eq!(seqs, [seq(&request), seq(&request) + 1, seq(&request) + 2]);
    let (_, one) = app
        .get_json(&format!("/api/projects/{project}/messages/{request_id}"))
        .await;
    assert_eq!(one["replies"], 2);
    assert!(one["message"]["replied_at"].is_string());
}

#[tokio::test]
async fn an_unanswered_request_times_out_and_a_late_reply_is_still_delivered() {
    let app = TestApp::spawn().await;
    let project = app.create_project("timeout").await;
    let mut coordinator = app.connect(project, "coord", "coordinator").await;
    let mut worker = app.connect(project, "worker", "codegen").await;

    let sent_at = Instant::now();
    let request = coordinator
        .send_ok(json!({"type": "request", "content": "anyone?", "to": "worker", "expects_reply": true, "timeout_ms": 300}))
        .await;
    let request_id = request["id"].as_str().expect("id").to_owned();
    worker.expect_op("message").await;
    let timeout = coordinator.expect_op("message").await;
    assert!(
        sent_at.elapsed() >= Duration::from_millis(300),
        "not before the deadline"
    );
    assert_eq!(timeout["sender_agent_id"], "agentbus");
    assert_eq!(timeout["message_type"], "response");
    assert_eq!(
        (timeout["success"].as_bool(), timeout["error"].as_str()),
        (Some(false), Some("timeout"))
    );
    assert_eq!(timeout["reply_to"], request_id);
    assert_eq!(timeout["in_reply_to_seq"], seq(&request));

    worker
        .send_ok(json!({"content": "sorry, here it is", "reply_to": request_id, "success": true}))
        .await;
    let late = coordinator.expect_op("message").await;
    assert_eq!(late["content"], "sorry, here it is");
    assert_eq!(late["late"], true);
}

#[tokio::test]
async fn a_pending_timeout_survives_a_broker_restart() {
    let first = TestApp::spawn().await;
    let database_url = first.database_url.clone();
    let project = first.create_project("restart").await;
    let mut coordinator = first.connect(project, "coord", "coordinator").await;
    let worker = first.connect(project, "worker", "codegen").await;
    worker.close().await;
    let request = coordinator
        .send_ok(json!({"content": "long job", "to": "worker", "expects_reply": true, "timeout_ms": 2_500}))
        .await;
    coordinator.close().await;

    // Stop the broker (keeping its database), and check no response exists yet.
    let second = TestApp::spawn_on(&database_url, |_| {}).await;
    first.stop();
    eventually("the first broker to stop", || async {
        first
            .http
            .get(first.url("/healthz"))
            .send()
            .await
            .err()
            .map(|_| ())
    })
    .await;
    let mut conn = second.db().await;
    let responses: i64 = diesel::sql_query(format!(
        "SELECT count(*) AS count FROM agent_messages WHERE reply_to = '{}'",
        request["id"].as_str().expect("id")
    ))
    .get_result::<Count>(&mut conn)
    .await
    .expect("count")
    .count;
    assert_eq!(responses, 0, "the deadline has not passed yet");

    // The coordinator comes back to the second broker and gets the timeout response.
    let mut coordinator = second.connect(project, "coord", "coordinator").await;
    let timeout = coordinator.expect_op("message").await;
    assert_eq!(timeout["reply_to"], request["id"]);
    assert_eq!(timeout["error"], "timeout");
    drop(first);
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    count: i64,
}

/// The seqs a history search for `q` (already URL-encoded) returns, up to 100.
async fn search_seqs(app: &TestApp, project: uuid::Uuid, q: &str) -> Vec<i64> {
    let (status, body) = app
        .get_json(&format!("/api/projects/{project}/messages?q={q}&limit=100"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["messages"]
        .as_array()
        .map(|m| m.iter().map(seq).collect())
        .unwrap_or_default()
}

/// Until the broker's search indexer has indexed every stored message.
async fn all_indexed(app: &TestApp) {
    eventually("the search indexer to catch up", || async {
        let mut conn = app.db().await;
        (agentbus::db::search::index_lag(&mut conn).await.ok() == Some(0)).then_some(())
    })
    .await;
}

/// How many search documents the project has (one per stored message once indexed).
async fn documents(conn: &mut diesel_async::AsyncPgConnection, project: uuid::Uuid) -> i64 {
    let indexed: Count = diesel::sql_query(format!(
        "SELECT count(*) AS count FROM message_search WHERE project_id = '{project}'"
    ))
    .get_result(conn)
    .await
    .expect("count documents");
    indexed.count
}

#[tokio::test]
async fn rest_send_and_wait_returns_the_reply_or_times_out() {
    let app = TestApp::spawn().await;
    let project = app.create_project("rest-rr").await;
    let mut worker = app.connect(project, "worker", "codegen").await;
    let url = app.url(&format!("/api/projects/{project}/requests"));
    let http = app.http.clone();
    let asking = tokio::spawn(async move {
        let response = http
            .post(url)
            .json(&json!({"sender_agent_id": "op", "sender_agent_type": "operator", "to": "worker",
                          "type": "capability_query", "content": "what can you do?", "timeout_ms": 10_000}))
            .send()
            .await
            .expect("POST");
        (
            response.status().as_u16(),
            response.json::<Value>().await.expect("JSON"),
        )
    });
    let request = worker.expect_op("message").await;
    assert_eq!(request["expects_reply"], true);
    worker
        .send_ok(json!({"type": "capability_response", "content": "rust, sql", "reply_to": request["id"], "success": true}))
        .await;
    let (code, body) = asking.await.expect("task");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["response"]["content"], "rust, sql");
    assert_eq!(body["request"]["id"], request["id"]);

    let (code, body) = app
        .post_json(
            &format!("/api/projects/{project}/requests"),
            &json!({"sender_agent_id": "op", "sender_agent_type": "operator", "to": "worker", "content": "quick", "timeout_ms": 200}),
        )
        .await;
    assert_eq!(code, 504, "{body}");
    assert_eq!(body["response"]["error"], "timeout");

    let (code, body) = app
        .post_json(
            &format!("/api/projects/{project}/requests"),
            &json!({"sender_agent_id": "op", "sender_agent_type": "operator", "to": "ghost", "content": "hello?"}),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["code"], "no_recipient");
}

#[tokio::test]
async fn unknown_recipients_are_reported_and_requests_to_nobody_are_dead_lettered() {
    let app = TestApp::spawn().await;
    let project = app.create_project("nobody").await;
    let mut a = app.connect(project, "a", "coordinator").await;

    a.send_ok(json!({"content": "anyone called ghost?", "to": "ghost", "client_msg_id": "g1"}))
        .await;
    let warning = a.expect_error("no_recipient").await;
    assert_eq!(warning["client_msg_id"], "g1");
    a.send_ok(json!({"content": "for the designers", "to_type": "designer"}))
        .await;
    a.expect_error("no_recipient").await;
    let request = a
        .send_ok(json!({"content": "design this", "to_type": "designer", "expects_reply": true, "timeout_ms": 200}))
        .await;
    let warning = a.expect_error("no_recipient").await;
    assert!(warning["error"]
        .as_str()
        .is_some_and(|e| e.contains("dead-lettered")));
    // The dead-lettered request is closed at once: no timeout will follow.
    let (_, one) = app
        .get_json(&format!(
            "/api/projects/{project}/messages/{}",
            request["id"].as_str().expect("id")
        ))
        .await;
    assert!(one["message"]["replied_at"].is_string(), "{one}");
    assert_eq!(one["dead_letter"]["reason"], "no_recipient");
    // A plain broadcast needs no recipient: no warning.
    a.send_ok(status("just saying")).await;

    let (_, dead) = app
        .get_json(&format!("/api/projects/{project}/dead-letters"))
        .await;
    let dead = dead["dead_letters"].as_array().expect("list").clone();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], "no_recipient");
    assert_eq!(dead[0]["message"]["id"], request["id"]);
    let (code, body) = app
        .post_json(
            "/api/projects/00000000-0000-0000-0000-000000000000/dead-letters/x/retry",
            &json!({}),
        )
        .await;
    assert_eq!(code, 404, "{body}");
}

#[tokio::test]
async fn expired_undelivered_messages_become_dead_letters_and_can_be_retried() {
    let app = TestApp::spawn().await;
    let project = app.create_project("expiry").await;
    let z = app.connect(project, "z", "tester").await;
    z.close().await;
    let mut a = app.connect(project, "a", "coordinator").await;
    // The retry keeps this TTL: long enough for z to reconnect after the retry on a loaded
    // machine, short enough for the sweep to dead-letter the original soon.
    let expiring = a
        .send_ok(json!({"type": "escalation", "content": "urgent", "to": "z", "ttl_ms": 2_000}))
        .await;
    let id = expiring["id"].as_str().expect("id").to_owned();

    let dead = eventually("the expired message to be dead-lettered", || async {
        let (_, body) = app
            .get_json(&format!("/api/projects/{project}/dead-letters"))
            .await;
        body["dead_letters"]
            .as_array()
            .and_then(|d| d.iter().next().cloned())
    })
    .await;
    assert_eq!(dead["reason"], "expired");
    assert_eq!(dead["message"]["id"], id);

    let (code, retried) = app
        .post_json(
            &format!("/api/projects/{project}/dead-letters/{id}/retry"),
            &json!({}),
        )
        .await;
    assert_eq!(code, 201, "{retried}");
    assert_eq!(retried["metadata"]["retry_of"], id);
    assert_eq!(retried["to"], "z");
    let (code, _) = app
        .post_json(
            &format!("/api/projects/{project}/dead-letters/{id}/retry"),
            &json!({}),
        )
        .await;
    assert_eq!(code, 409, "a dead letter is retried once");
    let mut z = app.connect(project, "z", "tester").await;
    let got = z.expect_op("message").await;
    assert_eq!(got["id"], retried["id"]);
    assert_eq!(got["content"], "urgent");
}

#[tokio::test]
async fn capabilities_are_stored_filterable_and_refreshed_on_reconnect() {
    let app = TestApp::spawn().await;
    let project = app.create_project("caps").await;
    let alpha = Agent::connect(&app.ws_url(
        project,
        "agent_id=alpha&agent_type=codegen&capabilities=rust,sql",
    ))
    .await;
    let mut beta = app.connect(project, "beta", "frontend").await;
    beta.send(
        json!({"op": "hello", "capabilities": ["react", "css"], "description": "UI specialist"}),
    )
    .await;
    beta.send(json!({"op": "hello", "capabilities": ["not ok"]}))
        .await;
    beta.expect_error("invalid_field").await;

    let agents = |capability: &'static str| {
        let app = &app;
        async move {
            let (_, body) = app
                .get_json(&format!(
                    "/api/projects/{project}/agents?capability={capability}"
                ))
                .await;
            body["agents"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m["agent_id"].as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }
    };
    assert_eq!(agents("rust").await, ["alpha"]);
    eventually("beta's hello to be stored", || async {
        (agents("react").await == ["beta"]).then_some(())
    })
    .await;
    let (_, body) = app
        .get_json(&format!("/api/projects/{project}/agents"))
        .await;
    let beta_row = body["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["agent_id"] == "beta").cloned());
    assert_eq!(beta_row.expect("beta")["description"], "UI specialist");

    alpha.close().await;
    let _alpha =
        Agent::connect(&app.ws_url(project, "agent_id=alpha&agent_type=codegen&capabilities=go"))
            .await;
    assert_eq!(agents("go").await, ["alpha"]);
    assert!(agents("rust").await.is_empty());
}

#[tokio::test]
async fn search_and_thread_queries_use_indexes() {
    let app = TestApp::spawn().await;
    let project = app.create_project("search").await;
    let mut a = app.connect(project, "a", "coder").await;
    a.send_ok(json!({"type": "discovery", "content": "found a bug in the API endpoint"}))
        .await;
    a.send_ok(status("running the test suite")).await;
    a.send_ok(json!({"type": "coordination", "content": "about to modify config.yaml", "correlation_id": "cfg"})).await;

    let search = |q: &'static str| {
        let app = &app;
        async move {
            let (_, body) = app
                .get_json(&format!("/api/projects/{project}/messages?q={q}"))
                .await;
            body["messages"]
                .as_array()
                .map(|m| m.iter().map(seq).collect::<Vec<_>>())
                .unwrap_or_default()
        }
    };
    assert_eq!(search("bug").await, [1]);
    assert_eq!(
        search("API%20bug").await,
        [1],
        "every word must appear, in any order"
    );
    assert_eq!(search("config.yaml").await, [3]);
    assert!(search("nothing").await.is_empty());
    let (_, body) = app
        .get_json(&format!(
            "/api/projects/{project}/messages?correlation_id=cfg"
        ))
        .await;
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(1));

    // With a realistic amount of history, the plans the API's queries get use the indexes.
    let mut conn = app.db().await;
    diesel::sql_query(format!(
        "INSERT INTO agent_messages (project_id, seq, sender_agent_id, sender_agent_type, message_type, content) \
         SELECT '{project}', 3 + n, 'filler', 'coder', 'status', 'routine progress report number ' || n \
         FROM generate_series(1, 50000) AS n"
    ))
    .execute(&mut conn)
    .await
    .expect("filler rows");
    diesel::sql_query(format!(
        "UPDATE projects SET head_seq = 50003 WHERE id = '{project}'"
    ))
    .execute(&mut conn)
    .await
    .expect("head");
    // Index them as the broker's search indexer does. The broker's own indexer may be
    // running a pass at the same moment, in which case this one does nothing (one pass at a
    // time): go on until nothing is left.
    eventually("the filler rows to be indexed", || async {
        let mut conn = app.db().await;
        agentbus::db::search::index_pending(&mut conn, 100_000)
            .await
            .expect("index");
        (agentbus::db::search::index_lag(&mut conn).await.ok() == Some(0)).then_some(())
    })
    .await;
    diesel::sql_query("ANALYZE agent_messages, message_search")
        .execute(&mut conn)
        .await
        .expect("analyze");
    // The search of db::queries::history (after it indexed the project's tail).
    let plan = explain(
        &mut conn,
        &format!(
            "SELECT * FROM agent_messages WHERE project_id = '{project}' \
             AND seq = ANY(ARRAY(SELECT s.seq FROM message_search s WHERE s.project_id = '{project}' \
               AND s.document @@ '''bug'''::tsquery)) \
             ORDER BY seq + 0 DESC LIMIT 50"
        ),
    )
    .await;
    assert!(plan.contains("idx_message_search_document"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    let any = uuid::Uuid::new_v4();
    let plan = explain(
        &mut conn,
        &format!(
            "SELECT * FROM agent_messages WHERE project_id = '{project}' \
             AND (id = '{any}' OR reply_to = '{any}') ORDER BY seq DESC LIMIT 50"
        ),
    )
    .await;
    assert!(
        plan.contains("idx_agent_messages_reply_to") && plan.contains("agent_messages_pkey"),
        "{plan}"
    );
    // And the API still finds the needle among them.
    assert_eq!(search("bug").await, [1]);
}

/// Storing a message does not index it; the broker's search indexer does, shortly after.
/// A search finds messages either way: unindexed ones are read directly.
#[tokio::test]
async fn the_search_indexer_catches_up_and_search_never_misses() {
    let app = TestApp::spawn().await;
    let project = app.create_project("indexer").await;
    let mut a = app.connect(project, "a", "coder").await;
    for n in 0..30 {
        a.send_ok(json!({"type": "status", "content": format!("step {n} of the migration")}))
            .await;
    }
    a.send_ok(json!({"type": "discovery", "content": "the flaky test is a race"}))
        .await;
    let app = &app;
    let found = |q: &'static str| async move { search_seqs(app, project, q).await.len() };
    // Whatever the indexer has done so far, every message is found.
    assert_eq!(found("migration").await, 30);
    assert_eq!(found("flaky%20race").await, 1);
    all_indexed(app).await;
    let mut conn = app.db().await;
    assert_eq!(
        documents(&mut conn, project).await,
        31,
        "one document per stored message"
    );
    assert_eq!(found("migration").await, 30);
    assert_eq!(found("flaky%20race").await, 1);
    assert_eq!(found("nowhere").await, 0);
}

/// Words are runs of letters and digits, so a file name is found by its parts. A backlog the
/// indexer was never told of (rows written behind the broker's back, with more content than
/// one pass reads) is indexed in passes of bounded size, and a search indexes its project's
/// rest itself before it looks.
#[tokio::test]
async fn search_splits_words_at_punctuation_and_indexes_a_backlog_in_bounded_passes() {
    let app = TestApp::spawn().await;
    let project = app.create_project("words").await;
    let mut a = app.connect(project, "a", "coder").await;
    a.send_ok(json!({"type": "coordination", "content": "About to modify src/config.yaml (retries_max=3)"}))
        .await;
    let found = |q: &'static str| search_seqs(&app, project, q);
    for q in [
        "yaml",
        "config.yaml",
        "SRC%2Fconfig",
        "retries",
        "max%203",
        "modify%20about",
    ] {
        assert_eq!(found(q).await, [1], "{q}");
    }
    for q in ["configyaml", "config.json", "...", "retries_min"] {
        assert!(found(q).await.is_empty(), "{q}");
    }
    all_indexed(&app).await;

    // The document the broker wrote (in tsvector's binary form): its distinct words.
    let mut conn = app.db().await;
    #[derive(diesel::QueryableByName)]
    struct Doc {
        #[diesel(sql_type = diesel::sql_types::Text)]
        document: String,
    }
    let doc: Doc = diesel::sql_query(format!(
        "SELECT document::text AS document FROM message_search WHERE project_id = '{project}' AND seq = 1"
    ))
    .get_result(&mut conn)
    .await
    .expect("document");
    assert_eq!(
        doc.document,
        "'3' 'about' 'config' 'max' 'modify' 'retries' 'src' 'to' 'yaml'"
    );

    // 300 messages of 40 kB (12 MB in all) stored behind the broker's back.
    const ROWS: i64 = 300;
    const BYTES: i64 = 40_000;
    diesel::sql_query(format!(
        "WITH filler AS (INSERT INTO agent_messages (project_id, seq, sender_agent_id, sender_agent_type, message_type, content) \
           SELECT '{project}', 1 + n, 'filler', 'coder', 'status', \
                  'needle' || n || ' ' || repeat('hay ', {BYTES} / 4) \
           FROM generate_series(1, {ROWS}) AS n) \
         UPDATE projects SET head_seq = 1 + {ROWS} WHERE id = '{project}'"
    ))
    .execute(&mut conn)
    .await
    .expect("backlog");
    let first = agentbus::db::search::index_pending(&mut conn, 100_000)
        .await
        .expect("index");
    let most = agentbus::db::search::PASS_CONTENT_BYTES / BYTES + 1;
    assert!(
        first.more && first.documents >= 1 && first.documents <= most,
        "one pass reads at most its byte budget: {first:?}"
    );
    // The search indexes what is left of its project, then finds the last one.
    assert_eq!(found("NEEDLE300").await, [1 + ROWS]);
    assert_eq!(
        agentbus::db::search::index_lag(&mut conn).await.ok(),
        Some(0)
    );
    assert_eq!(
        documents(&mut conn, project).await,
        1 + ROWS,
        "every stored message has its document"
    );
    assert_eq!(
        found("hay").await.len(),
        100,
        "a page of the 300 that hold it"
    );
}

async fn explain(conn: &mut diesel_async::AsyncPgConnection, query: &str) -> String {
    #[derive(diesel::QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
        line: String,
    }
    let lines: Vec<Line> = diesel::sql_query(format!("EXPLAIN {query}"))
        .load(conn)
        .await
        .expect("explain");
    lines
        .into_iter()
        .map(|l| l.line)
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn stats_count_what_went_through() {
    let app = TestApp::spawn().await;
    let project = app.create_project("stats").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;
    for n in 0..5 {
        a.send_ok(json!({"type": if n % 2 == 0 { "status" } else { "discovery" }, "content": "x"}))
            .await;
    }
    for _ in 0..5 {
        b.expect_op("message").await;
    }
    let (code, body) = app
        .get_json(&format!("/api/projects/{project}/stats"))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["since_start"]["messages_in"], 5);
    assert_eq!(body["since_start"]["deliveries"], 5);
    assert_eq!(
        body["since_start"]["messages_by_type"],
        json!({"status": 3, "discovery": 2})
    );
    assert_eq!(body["connected_sessions"], 2);
    assert_eq!(body["members"], 2);
    assert!(body["persistence"]["batches"]
        .as_u64()
        .is_some_and(|n| n >= 1));
    let (code, all) = app.get_json("/api/stats").await;
    assert_eq!(code, 200);
    assert_eq!(all["messages_in"], 5);
}

#[tokio::test]
async fn a_message_never_acknowledged_is_dead_lettered_after_the_delivery_limit() {
    let app = TestApp::spawn_with(|s| s.max_deliveries = 2).await;
    let project = app.create_project("limit").await;
    let url = app.ws_url(project, "agent_id=b&ack=manual");
    Agent::connect(&url).await.close().await;
    let mut a = app.connect(project, "a", "coder").await;
    let poison = a.send_ok(status("nobody ever acks me")).await;
    let fine = a.send_ok(status("I get acked")).await;

    for attempt in 1..=2 {
        let mut b = Agent::connect(&url).await;
        assert_eq!(b.welcome["replay"], 3 - attempt, "attempt {attempt}");
        let first = b.expect_op("message").await;
        assert_eq!(first["id"], poison["id"]);
        if attempt == 1 {
            assert_eq!(b.expect_op("message").await["id"], fine["id"]);
            b.send(json!({"op": "ack", "seqs": [seq(&fine)]})).await;
            eventually("the ack to be recorded", || async {
                let row = app.member(project, "b").await?;
                (row["queue_depth"] == 1).then_some(())
            })
            .await;
        }
        // Wait until the broker counted this delivery before leaving.
        eventually("the delivery to be counted", || async {
            let mut conn = app.db().await;
            let n: i64 = diesel::sql_query(format!(
                "SELECT COALESCE(max(attempts), 0)::int8 AS count FROM delivery_attempts WHERE seq = {}",
                seq(&poison)
            ))
            .get_result::<Count>(&mut conn)
            .await
            .ok()?
            .count;
            (n == attempt).then_some(())
        })
        .await;
        b.close().await;
    }

    // Delivered twice without an ack: not a third time.
    let mut b = Agent::connect(&url).await;
    assert_eq!(b.welcome["replay"], 0);
    let dead = eventually("the dead letter", || async {
        let (_, body) = app
            .get_json(&format!("/api/projects/{project}/dead-letters"))
            .await;
        body["dead_letters"]
            .as_array()
            .and_then(|d| d.iter().next().cloned())
    })
    .await;
    assert_eq!(dead["reason"], "max_deliveries");
    assert_eq!(dead["message"]["id"], poison["id"]);
    a.send_ok(status("next")).await;
    assert_eq!(b.expect_op("message").await["content"], "next");
}

#[tokio::test]
async fn a_retry_of_a_dead_lettered_request_is_told_again_that_nobody_can_receive_it() {
    let app = TestApp::spawn().await;
    let project = app.create_project("retry-dead").await;
    let mut a = app.connect(project, "a", "coordinator").await;
    let request = json!({"content": "hello?", "to": "ghost", "expects_reply": true,
                         "timeout_ms": 60_000, "client_msg_id": "r-1"});
    a.send(request.clone()).await;
    let first = a.expect_op("sent").await;
    let warning = a.expect_error("no_recipient").await;
    assert_eq!(warning["client_msg_id"], "r-1");
    // The same send again (as after a lost connection): the same message, and the warning.
    a.send(request.clone()).await;
    let again = a.expect_op("sent").await;
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["seq"], first["seq"]);
    let warning = a.expect_error("no_recipient").await;
    assert_eq!(warning["client_msg_id"], "r-1");
    assert!(
        warning["error"]
            .as_str()
            .unwrap_or_default()
            .contains("dead-lettered"),
        "{warning}"
    );
    // A retry of a request that did reach someone draws no warning.
    let _b = app.connect(project, "b", "reviewer").await;
    let reachable = json!({"content": "review?", "to": "b", "expects_reply": true,
                           "timeout_ms": 60_000, "client_msg_id": "r-2"});
    a.send_ok(reachable.clone()).await;
    a.send_ok(reachable).await;
    a.send_ok(status("nothing else came in between")).await;
}
