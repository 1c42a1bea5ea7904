//! The history API: pages both ways, filters, bounds.

use serde_json::{json, Value};

use crate::helpers::TestApp;

fn seqs(body: &Value) -> Vec<i64> {
    body["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["seq"].as_i64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn history_pages_forwards_and_backwards() {
    let app = TestApp::spawn().await;
    let project = app.create_project("history").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "reviewer").await;
    for n in 1..=25 {
        let (agent, kind) = if n % 5 == 0 {
            (&mut b, "discovery")
        } else {
            (&mut a, "status")
        };
        agent
            .send_ok(json!({"type": kind, "content": format!("message {n}")}))
            .await;
    }
    let base = format!("/api/projects/{project}/messages");

    // Neither bound: the latest page, ascending.
    let (code, body) = app.get_json(&format!("{base}?limit=10")).await;
    assert_eq!(code, 200);
    assert_eq!(seqs(&body), (16..=25).collect::<Vec<_>>());
    assert_eq!(body["head_seq"], 25);
    assert_eq!(body["messages"][0]["content"], "message 16");

    // Scrolling back: the page just before.
    let (_, body) = app
        .get_json(&format!("{base}?limit=10&before_seq=16"))
        .await;
    assert_eq!(seqs(&body), (6..=15).collect::<Vec<_>>());
    let (_, body) = app.get_json(&format!("{base}?limit=10&before_seq=6")).await;
    assert_eq!(seqs(&body), (1..=5).collect::<Vec<_>>());

    // Polling: the first page after a seq.
    let (_, body) = app.get_json(&format!("{base}?limit=10&after_seq=0")).await;
    assert_eq!(seqs(&body), (1..=10).collect::<Vec<_>>());
    let (_, body) = app.get_json(&format!("{base}?after_seq=20")).await;
    assert_eq!(seqs(&body), (21..=25).collect::<Vec<_>>());
    let (_, body) = app.get_json(&format!("{base}?after_seq=25")).await;
    assert_eq!(seqs(&body), Vec::<i64>::new());

    // Filters.
    let (_, body) = app.get_json(&format!("{base}?type=discovery")).await;
    assert_eq!(seqs(&body), vec![5, 10, 15, 20, 25]);
    let (_, body) = app
        .get_json(&format!("{base}?sender=b&after_seq=12&limit=2"))
        .await;
    assert_eq!(seqs(&body), vec![15, 20]);
    let (_, body) = app.get_json(&format!("{base}?sender=nobody")).await;
    assert_eq!(seqs(&body), Vec::<i64>::new());

    // The stored shape of a message.
    let (_, body) = app.get_json(&format!("{base}?after_seq=4&limit=1")).await;
    let m = &body["messages"][0];
    assert_eq!(m["sender_agent_id"], "b");
    assert_eq!(m["message_type"], "discovery");
    assert!(m["delivered_at"].is_null() || m["delivered_at"].is_string());
    assert_eq!(m["read_at"], Value::Null);
    assert!(m["created_at"].is_string());
    assert!(m.get("op").is_none());
}

#[tokio::test]
async fn history_refuses_bad_parameters_and_unknown_projects() {
    let app = TestApp::spawn().await;
    let project = app.create_project("bounds").await;
    let base = format!("/api/projects/{project}/messages");
    for query in [
        "limit=0",
        "limit=1001",
        "limit=99999999999",
        "after_seq=-1",
        "before_seq=-5",
    ] {
        let (code, body) = app.get_json(&format!("{base}?{query}")).await;
        assert_eq!(code, 400, "{query}: {body}");
        assert_eq!(body["code"], "invalid_query");
    }
    let (code, body) = app.get_json(&format!("{base}?limit=ten")).await;
    assert_eq!(code, 400);
    assert_eq!(body["code"], "invalid_query");
    let (code, _) = app.get_json(&format!("{base}?limit=1000")).await;
    assert_eq!(code, 200);

    let (code, body) = app.get_json("/api/projects/not-a-uuid/messages").await;
    assert_eq!(code, 400);
    assert_eq!(body["code"], "invalid_project_id");
    let (code, body) = app
        .get_json(&format!("/api/projects/{}/messages", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(code, 404);
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn projects_are_created_listed_and_shown() {
    let app = TestApp::spawn().await;
    let (code, body) = app.get_json("/healthz").await;
    assert_eq!((code, body["status"].as_str()), (200, Some("ok")));
    // Every response names its request, for the logs; a client's own id is kept.
    let response = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let response = app.http.get(app.url("/healthz")).send().await.expect("GET");
    assert_eq!(response.headers()["x-request-id"].len(), 12);

    let (code, mut created) = app
        .post_json("/api/projects", &json!({"name": "  alpha  "}))
        .await;
    assert_eq!(code, 201);
    // The first token is shown once, with the creation only.
    let token = created.as_object_mut().and_then(|c| c.remove("token"));
    assert!(token.is_some_and(|t| t.as_str().is_some_and(|t| t.starts_with("ab_"))));
    assert_eq!(created["name"], "alpha");
    assert_eq!(created["head_seq"], 0);
    let id = created["id"].as_str().expect("id");
    let (code, shown) = app.get_json(&format!("/api/projects/{id}")).await;
    assert_eq!(code, 200);
    assert_eq!(shown, created);
    let (_, listed) = app.get_json("/api/projects").await;
    assert_eq!(listed["projects"], json!([created]));

    for bad in [
        json!({}),
        json!({"name": "   "}),
        json!({"name": 5}),
        json!({"name": "x".repeat(256)}),
    ] {
        let (code, body) = app.post_json("/api/projects", &bad).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
}
