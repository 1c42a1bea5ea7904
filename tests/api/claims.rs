//! File claims: the conflict rule over real connections, objection windows (also across a
//! broker restart), exact expiry, races settled by the database, tokens, and bad input.

use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::crash::BrokerProcess;
use crate::helpers::{deadline, eventually, fetch_json, Agent, TestApp, PATIENCE};

/// A connected agent that keeps the messages it passed over while waiting for an answer:
/// the broker's notices of a decision can arrive before the answer to the request.
pub struct Peer {
    pub agent: Agent,
    seen: Vec<Value>,
}

impl Peer {
    pub async fn connect(app: &TestApp, project: Uuid, agent_id: &str, agent_type: &str) -> Peer {
        Peer::from(app.connect(project, agent_id, agent_type).await)
    }

    pub async fn send(&mut self, frame: Value) {
        self.agent.send(frame).await;
    }

    /// The next frame with this `op`, keeping the messages delivered meanwhile.
    pub async fn next_op(&mut self, op: &str) -> Value {
        let until = deadline();
        loop {
            let frame = self.agent.next_json_until(until).await;
            if frame["op"] == op {
                return frame;
            }
            assert_eq!(frame["op"], "message", "expected {op}, got {frame}");
            self.seen.push(frame);
        }
    }

    /// The next error frame, which must have this code.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let frame = self.next_op("error").await;
        assert_eq!(frame["code"], code, "{frame}");
        frame
    }

    /// The coordination notice of this event about this claim (or task), among the messages
    /// kept or those to come.
    pub async fn notice(&mut self, event: &str, about: &str, id: &str) -> Value {
        let is_it = |frame: &Value| {
            frame["op"] == "message"
                && frame["message_type"] == "coordination"
                && frame["metadata"]["event"] == event
                && frame["metadata"][about]["id"] == id
        };
        let found = match self.seen.iter().position(is_it) {
            Some(at) => self.seen.remove(at),
            None => {
                let until = deadline();
                loop {
                    let frame = self.agent.next_json_until(until).await;
                    if is_it(&frame) {
                        break frame;
                    }
                    self.seen.push(frame);
                }
            }
        };
        assert_eq!(found["sender_agent_id"], "agentbus");
        found
    }

    /// Sends a `claim` frame and returns its `claim_result`.
    pub async fn claim(&mut self, frame: Value) -> Value {
        let mut frame = frame;
        frame["op"] = json!("claim");
        self.send(frame).await;
        self.next_op("claim_result").await
    }
}

impl From<Agent> for Peer {
    fn from(agent: Agent) -> Peer {
        Peer {
            agent,
            seen: Vec::new(),
        }
    }
}

fn id(v: &Value) -> String {
    v["claim"]["id"].as_str().expect("claim id").to_owned()
}

pub fn time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a timestamp: {v}"))
}

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

async fn held(app: &TestApp, project: Uuid) -> Vec<Value> {
    let (status, body) = app
        .get_json(&format!("/api/projects/{project}/claims"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["claims"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn exclusive_claims_conflict_on_the_same_path_and_on_overlapping_globs() {
    let app = TestApp::spawn().await;
    let project = app.create_project("claims").await;
    let mut a = Peer::connect(&app, project, "a", "coder").await;
    let mut b = Peer::connect(&app, project, "b", "coder").await;

    let granted = a.claim(json!({"paths": ["src/api/**"], "reason": "refactoring the API", "client_msg_id": "c1"}),
    )
    .await;
    assert_eq!(granted["ok"], true, "{granted}");
    assert_eq!(granted["action"], "claim");
    assert_eq!(granted["client_msg_id"], "c1");
    assert_eq!(granted["claim"]["state"], "granted");
    assert_eq!(granted["claim"]["shared"], false);
    let a_claim = id(&granted);
    // Granted is a stored notice, which every member receives.
    let notice = b.notice("granted", "claim", &a_claim).await;
    assert_eq!(notice["seq"], granted["seq"]);
    assert!(
        notice["content"]
            .as_str()
            .unwrap()
            .contains("refactoring the API"),
        "{notice}"
    );

    // The same path under the glob, and an overlapping glob: refused, the holder named.
    for paths in [
        json!(["src/api/users.rs"]),
        json!(["src/*/users.rs", "README.md"]),
    ] {
        let refused = b.claim(json!({"paths": paths})).await;
        assert_eq!(refused["ok"], false, "{refused}");
        assert_eq!(refused["code"], "conflict");
        assert_eq!(refused["claim"]["state"], "refused");
        let conflict = &refused["conflicts"][0];
        assert_eq!(conflict["holder"], "a");
        assert_eq!(conflict["claim_id"], a_claim.as_str());
        assert_eq!(conflict["reason"], "refactoring the API");
        assert_eq!(conflict["overlapping"][0][1], "src/api/**");
        // The refusal is stored too, addressed to the claimant only.
        let told = b.notice("refused", "claim", &id(&refused)).await;
        assert_eq!(told["to"], "b");
        assert_eq!(told["metadata"]["conflicts"][0]["holder"], "a");
    }
    // Elsewhere in the tree: granted.
    let docs = b.claim(json!({"paths": ["docs/*.md"]})).await;
    assert_eq!(docs["ok"], true, "{docs}");
    let listed: Vec<String> = held(&app, project)
        .await
        .iter()
        .map(|c| c["agent_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ["a", "b"]);
}

#[tokio::test]
async fn shared_claims_coexist_and_an_exclusive_one_meets_them() {
    let app = TestApp::spawn().await;
    let project = app.create_project("shared").await;
    let mut a = Peer::connect(&app, project, "a", "coder").await;
    let mut b = Peer::connect(&app, project, "b", "coder").await;
    let mut c = Peer::connect(&app, project, "c", "coder").await;
    let first = a
        .claim(json!({"paths": ["docs/*.md"], "shared": true}))
        .await;
    assert_eq!(
        (first["ok"].clone(), first["claim"]["shared"].clone()),
        (json!(true), json!(true)),
        "{first}"
    );
    let second = b.claim(json!({"paths": ["docs/**"], "shared": true})).await;
    assert_eq!(second["ok"], true, "{second}");
    // Exclusive against shared: a conflict with both holders.
    let exclusive = c.claim(json!({"paths": ["docs/PROTOCOL.md"]})).await;
    assert_eq!(exclusive["code"], "conflict", "{exclusive}");
    let mut holders: Vec<&str> = exclusive["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["holder"].as_str().unwrap())
        .collect();
    holders.sort_unstable();
    assert_eq!(holders, ["a", "b"]);
    // Shared against another agent's exclusive: a conflict too.
    let exclusive = c.claim(json!({"paths": ["src/main.rs"]})).await;
    assert_eq!(exclusive["ok"], true);
    let shared = a.claim(json!({"paths": ["src/**"], "shared": true})).await;
    assert_eq!(shared["code"], "conflict", "{shared}");
    assert_eq!(shared["conflicts"][0]["holder"], "c");
}

#[tokio::test]
async fn the_same_agent_claiming_again_extends_its_claim() {
    let app = TestApp::spawn().await;
    let project = app.create_project("again").await;
    let mut a = Peer::connect(&app, project, "a", "coder").await;
    let first = a
        .claim(json!({"paths": ["src/a.rs"], "ttl_ms": 60_000}))
        .await;
    let again = a
        .claim(json!({"paths": ["src/a.rs", "src/b.rs"], "ttl_ms": 600_000}))
        .await;
    assert_eq!(again["ok"], true, "{again}");
    assert_eq!(again["merged"], true);
    assert_eq!(id(&again), id(&first), "one claim, extended");
    assert_eq!(again["claim"]["paths"], json!(["src/a.rs", "src/b.rs"]));
    assert!(
        time(&again["claim"]["expires_at"])
            > time(&first["claim"]["expires_at"]) + chrono::Duration::seconds(500)
    );
    // Its own claims never conflict with it: an exclusive claim over its shared one is fine.
    let shared = a.claim(json!({"paths": ["src/**"], "shared": true})).await;
    assert_eq!(
        (shared["ok"].clone(), shared["merged"].clone()),
        (json!(true), Value::Null),
        "{shared}"
    );
    assert_eq!(held(&app, project).await.len(), 2);
}

#[tokio::test]
async fn a_released_path_can_be_claimed() {
    let app = TestApp::spawn().await;
    let project = app.create_project("release").await;
    let mut a = Peer::connect(&app, project, "a", "coder").await;
    let mut b = Peer::connect(&app, project, "b", "coder").await;
    let mine = a.claim(json!({"paths": ["Cargo.toml"]})).await;
    assert_eq!(
        b.claim(json!({"paths": ["Cargo.toml"]})).await["code"],
        "conflict"
    );
    // Only its holder may release it.
    b.send(json!({"op": "release", "claim_id": id(&mine)}))
        .await;
    let refused = b.next_op("claim_result").await;
    assert_eq!(
        (refused["ok"].clone(), refused["code"].clone()),
        (json!(false), json!("forbidden")),
        "{refused}"
    );
    a.send(json!({"op": "release", "claim_id": id(&mine)}))
        .await;
    let released = a.next_op("claim_result").await;
    assert_eq!(released["ok"], true, "{released}");
    assert_eq!(released["claim"]["state"], "released");
    b.notice("released", "claim", &id(&mine)).await;
    let theirs = b.claim(json!({"paths": ["Cargo.toml"]})).await;
    assert_eq!(theirs["ok"], true, "{theirs}");
    // Released again: not held any more.
    a.send(json!({"op": "release", "claim_id": id(&mine)}))
        .await;
    assert_eq!(a.next_op("claim_result").await["code"], "not_held");
}

#[tokio::test]
async fn expiry_is_exact_held_before_free_after() {
    let app = TestApp::spawn().await;
    let project = app.create_project("expiry").await;
    let mut a = Peer::connect(&app, project, "a", "coder").await;
    let mut watcher = Peer::connect(&app, project, "w", "watcher").await;
    let granted = a.claim(json!({"paths": ["lib.rs"], "ttl_ms": 1500})).await;
    let expires_at = time(&granted["claim"]["expires_at"]);
    let claim_id = id(&granted);
    // Ask repeatedly around the expiry: listed whenever the answer came before it, never
    // listed when the question was asked after it.
    let (mut seen_held, mut seen_free) = (false, false);
    let until = tokio::time::Instant::now() + PATIENCE;
    while !seen_free || Utc::now() < expires_at + chrono::Duration::milliseconds(200) {
        assert!(
            tokio::time::Instant::now() < until,
            "the claim never expired"
        );
        let asked = Utc::now();
        let listed = held(&app, project)
            .await
            .iter()
            .any(|c| c["id"] == claim_id.as_str());
        let answered = Utc::now();
        if answered < expires_at {
            assert!(listed, "lapsed before its expires_at");
            seen_held = true;
        }
        if asked > expires_at {
            assert!(!listed, "reported held after its expires_at");
            seen_free = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_held && seen_free);
    let expired = watcher.notice("expired", "claim", &claim_id).await;
    assert!(time(&expired["created_at"]) >= expires_at);
    assert_eq!(expired["metadata"]["claim"]["state"], "expired");
    // Free for another agent.
    let mut b = Peer::connect(&app, project, "b", "coder").await;
    assert_eq!(b.claim(json!({"paths": ["lib.rs"]})).await["ok"], true);
}

#[tokio::test]
async fn a_claim_is_renewed_by_its_holder_only() {
    let app = TestApp::spawn().await;
    let project = app.create_project("renew").await;
    let mut a = Peer::connect(&app, project, "a", "coder").await;
    let mut b = Peer::connect(&app, project, "b", "coder").await;
    let granted = a.claim(json!({"paths": ["x"], "ttl_ms": 2000})).await;
    a.send(json!({"op": "renew", "claim_id": id(&granted), "ttl_ms": 600_000}))
        .await;
    let renewed = a.next_op("claim_result").await;
    assert_eq!(renewed["ok"], true, "{renewed}");
    assert_eq!(renewed["action"], "renew");
    assert!(
        time(&renewed["claim"]["expires_at"])
            > time(&granted["claim"]["expires_at"]) + chrono::Duration::seconds(500)
    );
    b.send(json!({"op": "renew", "claim_id": id(&granted)}))
        .await;
    assert_eq!(b.next_op("claim_result").await["code"], "forbidden");
    // Past its first expiry it is still held: the renewal counts.
    let (_, row) = app
        .get_json(&format!("/api/projects/{project}/claims/{}", id(&granted)))
        .await;
    assert_eq!(row["claim"]["state"], "granted");
    assert_eq!(row["claim"]["ttl_ms"], 600_000);
}

#[tokio::test]
async fn one_objection_refuses_a_pending_claim() {
    let app = TestApp::spawn().await;
    let project = app.create_project("objection").await;
    let mut a = Peer::connect(&app, project, "a", "coder").await;
    let mut b = Peer::connect(&app, project, "b", "reviewer").await;
    let mut c = Peer::connect(&app, project, "c", "coder").await;
    let pending = a.claim(json!({"paths": ["config.yaml"], "objection_ms": 30_000, "reason": "About to modify config.yaml"})).await;
    assert_eq!(pending["ok"], true, "{pending}");
    assert_eq!(pending["claim"]["state"], "pending");
    let claim_id = id(&pending);
    let announced = b.notice("announced", "claim", &claim_id).await;
    assert_eq!(announced["priority"], 1);
    assert_eq!(
        announced["metadata"]["claim"]["decide_at"],
        pending["claim"]["decide_at"]
    );
    // Pending counts for conflicts.
    assert_eq!(
        c.claim(json!({"paths": ["*.yaml"]})).await["code"],
        "conflict"
    );
    // Its claimant cannot object to it.
    a.send(json!({"op": "object", "claim_id": claim_id, "reason": "no"}))
        .await;
    assert_eq!(a.next_op("claim_result").await["code"], "forbidden");
    b.send(
        json!({"op": "object", "claim_id": claim_id, "reason": "the release freezes config today"}),
    )
    .await;
    let objected = b.next_op("claim_result").await;
    assert_eq!(objected["ok"], true, "{objected}");
    assert_eq!(objected["claim"]["state"], "objected");
    assert_eq!(
        objected["objections"][0]["reason"],
        "the release freezes config today"
    );
    let told = a.notice("objected", "claim", &claim_id).await;
    assert_eq!(told["metadata"]["objections"][0]["agent_id"], "b");
    assert!(told["content"]
        .as_str()
        .unwrap()
        .contains("the release freezes config today"));
    // Decided: a second objection is too late, and the path is free.
    c.send(json!({"op": "object", "claim_id": claim_id, "reason": "me too"}))
        .await;
    assert_eq!(c.next_op("claim_result").await["code"], "claim_decided");
    assert_eq!(c.claim(json!({"paths": ["config.yaml"]})).await["ok"], true);
}

#[tokio::test]
async fn a_rest_claim_with_a_window_answers_the_objection() {
    let app = TestApp::spawn().await;
    let project = app.create_project("rest-objection").await;
    let mut b = Peer::connect(&app, project, "b", "reviewer").await;
    let http = app.http.clone();
    let url = app.url(&format!("/api/projects/{project}/claims"));
    let waiting = tokio::spawn(async move {
        let response = http
            .post(url)
            .json(&json!({"agent_id": "a", "paths": ["schema.sql"], "objection_ms": 30_000}))
            .send()
            .await
            .expect("POST claims");
        (
            response.status().as_u16(),
            response.json::<Value>().await.expect("JSON"),
        )
    });
    let announced = {
        let until = deadline();
        loop {
            let frame = b.agent.next_json_until(until).await;
            if frame["metadata"]["event"] == "announced" {
                break frame;
            }
        }
    };
    let claim_id = announced["metadata"]["claim"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, objected) = app
        .post_json(
            &format!("/api/projects/{project}/claims/{claim_id}/objections"),
            &json!({"agent_id": "b", "reason": "migration in flight"}),
        )
        .await;
    assert_eq!(status, 201, "{objected}");
    let (status, body) = waiting.await.expect("the claim's request");
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "objected");
    assert_eq!(body["objections"][0]["reason"], "migration in flight");
    assert_eq!(body["claim"]["state"], "objected");
    assert!(body["seq"].as_i64().unwrap() > announced["seq"].as_i64().unwrap());
}

#[tokio::test]
async fn an_unopposed_claim_is_granted_at_its_deadline_not_before() {
    let app = TestApp::spawn().await;
    let project = app.create_project("window").await;
    let mut w = Peer::connect(&app, project, "w", "watcher").await;
    let started = Utc::now();
    let (status, body) = app
        .post_json(
            &format!("/api/projects/{project}/claims"),
            &json!({"agent_id": "a", "paths": ["Makefile"], "objection_ms": 1200}),
        )
        .await;
    let answered = Utc::now();
    assert_eq!(status, 201, "{body}");
    let decide_at = time(&body["claim"]["decide_at"]);
    assert!(answered >= decide_at, "answered before the window closed");
    assert!(
        decide_at
            >= started + chrono::Duration::milliseconds(1200) - chrono::Duration::milliseconds(50)
    );
    assert_eq!(body["claim"]["state"], "granted");
    assert!(time(&body["claim"]["granted_at"]) >= decide_at);
    let claim_id = id(&body);
    w.notice("announced", "claim", &claim_id).await;
    let granted = w.notice("granted", "claim", &claim_id).await;
    assert!(time(&granted["created_at"]) >= decide_at);
    assert_eq!(granted["seq"], body["seq"]);
}

#[tokio::test]
async fn two_agents_racing_for_the_same_path_get_one_grant() {
    let app = TestApp::spawn().await;
    let project = app.create_project("race").await;
    let mut a = Peer::connect(&app, project, "a", "coder").await;
    let mut b = Peer::connect(&app, project, "b", "coder").await;
    for round in 0..10 {
        let path = format!("src/race{round}.rs");
        let frame = json!({"op": "claim", "paths": [path]});
        // Both frames are on the wire before either answer is read.
        a.send(frame.clone()).await;
        b.send(frame).await;
        let (ra, rb) = (
            a.next_op("claim_result").await,
            b.next_op("claim_result").await,
        );
        let grants = [&ra, &rb].iter().filter(|r| r["ok"] == true).count();
        assert_eq!(grants, 1, "round {round}: {ra} / {rb}");
        let loser = if ra["ok"] == true { &rb } else { &ra };
        assert_eq!(loser["code"], "conflict");
    }
    let mut conn = app.db().await;
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    // Each path is held by exactly one granted claim (an agent's later grants merge into its
    // first one).
    let granted: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM claims, unnest(paths) AS p WHERE state = 'granted'",
    )
    .get_result(&mut conn)
    .await
    .expect("count");
    assert_eq!(granted.n, 10);
}

const ADMIN: &str = "admin-secret-for-claims";

async fn token_for(app: &TestApp, project: &str, agent: Option<&str>) -> String {
    let body = agent.map(|a| json!({"agent_id": a}));
    let (status, issued) = request(
        app,
        "POST",
        &format!("/api/projects/{project}/tokens"),
        Some(ADMIN),
        body,
    )
    .await;
    assert_eq!(status, 201, "{issued}");
    issued["token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn bound_tokens_claim_as_their_agent_and_an_admin_releases_by_force() {
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
    let (alice, bob) = (
        token_for(&app, &project, Some("alice")).await,
        token_for(&app, &project, Some("bob")).await,
    );
    let claims = format!("/api/projects/{project}/claims");

    // A bound token claims as its agent, and only as its agent.
    let (status, mine) = request(
        &app,
        "POST",
        &claims,
        Some(&alice),
        Some(json!({"paths": ["src/**"], "reason": "big refactor"})),
    )
    .await;
    assert_eq!(status, 201, "{mine}");
    assert_eq!(mine["claim"]["agent_id"], "alice");
    let (status, _) = request(
        &app,
        "POST",
        &claims,
        Some(&alice),
        Some(json!({"agent_id": "bob", "paths": ["docs/**"]})),
    )
    .await;
    assert_eq!(status, 403);
    let claim_id = mine["claim"]["id"].as_str().unwrap().to_owned();
    let one = format!("{claims}/{claim_id}");
    // Bob's token can neither release it as alice, nor as bob, nor by force.
    for query in ["?agent_id=alice", "", "?force=true&reason=mine%20now"] {
        let (status, body) =
            request(&app, "DELETE", &format!("{one}{query}"), Some(&bob), None).await;
        assert_eq!(status, 403, "{query}: {body}");
    }
    // Still held.
    let (_, row) = request(&app, "GET", &one, Some(&bob), None).await;
    assert_eq!(row["claim"]["state"], "granted");
    // The admin releases it by force, with a reason the notice carries.
    let (status, released) = request(
        &app,
        "DELETE",
        &format!("{one}?force=true&reason=alice%20is%20gone"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{released}");
    assert_eq!(released["claim"]["state"], "released");
    assert_eq!(released["claim"]["end_reason"], "alice is gone");
    let (_, history) = request(
        &app,
        "GET",
        &format!("/api/projects/{project}/messages?type=coordination"),
        Some(ADMIN),
        None,
    )
    .await;
    let last = history["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["metadata"]["event"], "released");
    assert!(
        last["content"].as_str().unwrap().contains("by force"),
        "{last}"
    );
    assert!(
        last["content"].as_str().unwrap().contains("alice is gone"),
        "{last}"
    );
    // Now bob may take it.
    let (status, _) = request(
        &app,
        "POST",
        &claims,
        Some(&bob),
        Some(json!({"paths": ["src/main.rs"]})),
    )
    .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn bad_claims_get_clear_errors_and_store_nothing() {
    let app = TestApp::spawn_with(|s| {
        s.claim_max_paths = 5;
        s.claim_max_ttl_ms = 60_000;
        s.claim_max_objection_ms = 10_000;
    })
    .await;
    let project = app.create_project("bad").await;
    let claims = format!("/api/projects/{project}/claims");
    let too_many: Vec<String> = (0..6).map(|i| format!("f{i}")).collect();
    for (body, code, says) in [
        (
            json!({"agent_id": "a", "paths": []}),
            "invalid_field",
            "at least one path",
        ),
        (json!({"agent_id": "a"}), "missing_field", "paths"),
        (
            json!({"agent_id": "a", "paths": ["/etc/passwd"]}),
            "invalid_field",
            "absolute",
        ),
        (
            json!({"agent_id": "a", "paths": ["src/../../x"]}),
            "invalid_field",
            "..",
        ),
        (
            json!({"agent_id": "a", "paths": too_many}),
            "invalid_field",
            "at most 5",
        ),
        (
            json!({"agent_id": "a", "paths": ["x"], "ttl_ms": 0}),
            "invalid_field",
            "ttl_ms",
        ),
        (
            json!({"agent_id": "a", "paths": ["x"], "ttl_ms": 60_001}),
            "invalid_field",
            "ttl_ms",
        ),
        (
            json!({"agent_id": "a", "paths": ["x"], "objection_ms": 10_001}),
            "invalid_field",
            "objection_ms",
        ),
        (
            json!({"agent_id": "a", "paths": ["x"], "objection_window": 5}),
            "invalid_json",
            "objection_window",
        ),
        (
            json!({"agent_id": "agentbus", "paths": ["x"]}),
            "invalid_field",
            "agentbus",
        ),
    ] {
        let (status, answer) = app.post_json(&claims, &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["code"], code, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(says),
            "{body}: {answer}"
        );
    }
    // Objections to an unknown claim, and to a decided one.
    let unknown = Uuid::new_v4();
    let (status, answer) = app
        .post_json(
            &format!("{claims}/{unknown}/objections"),
            &json!({"agent_id": "b", "reason": "no"}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].clone()),
        (404, json!("not_found")),
        "{answer}"
    );
    let (status, answer) = app
        .post_json(
            &format!("{claims}/not-a-uuid/objections"),
            &json!({"agent_id": "b", "reason": "no"}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].clone()),
        (400, json!("invalid_field")),
        "{answer}"
    );
    // Over WebSocket: error frames naming the field; the connection stays open.
    let mut a = Peer::connect(&app, project, "a", "coder").await;
    a.send(json!({"op": "claim", "paths": ["../up"], "client_msg_id": "bad-1"}))
        .await;
    let error = a.expect_error("invalid_field").await;
    assert_eq!(
        (error["field"].clone(), error["client_msg_id"].clone()),
        (json!("paths"), json!("bad-1"))
    );
    a.send(json!({"op": "claim", "paths": "src"})).await;
    a.expect_error("invalid_frame").await;
    a.send(json!({"op": "object", "claim_id": unknown, "reason": "x"}))
        .await;
    assert_eq!(a.next_op("claim_result").await["code"], "not_found");
    // Nothing was stored: no message, no claim.
    let (_, project_row) = app.get_json(&format!("/api/projects/{project}")).await;
    assert_eq!(project_row["head_seq"], 0, "{project_row}");
    let (_, all) = app.get_json(&format!("{claims}?state=all")).await;
    assert_eq!(all["claims"], json!([]));

    // A decided claim takes no objection.
    let granted = a.claim(json!({"paths": ["ok.rs"]})).await;
    let (status, answer) = app
        .post_json(
            &format!("{claims}/{}/objections", id(&granted)),
            &json!({"agent_id": "b", "reason": "late"}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].clone()),
        (409, json!("claim_decided")),
        "{answer}"
    );
}

#[tokio::test]
async fn an_objection_window_survives_a_broker_restart_and_is_decided_once() {
    let app = TestApp::spawn().await;
    let database_url = app.database_url.clone();
    let project = app.create_project("restart").await;
    app.stop();

    let first = BrokerProcess::start(&database_url);
    let port = first.port;
    let ws =
        format!("ws://127.0.0.1:{port}/ws/agent/messages/{project}?agent_id=a&agent_type=coder");
    let mut a = Peer::from(Agent::connect(&ws).await);
    let pending = a
        .claim(json!({"paths": ["deploy.yaml"], "objection_ms": 2500}))
        .await;
    assert_eq!(pending["claim"]["state"], "pending", "{pending}");
    let decide_at = time(&pending["claim"]["decide_at"]);
    let claim_id = id(&pending);
    drop(a);
    // Killed inside the window: nothing could decide it yet.
    first.kill();
    assert!(
        Utc::now() < decide_at,
        "the broker was killed after the window"
    );

    let _second = BrokerProcess::start_on(&database_url, port);
    let http = app.http.clone();
    let base = format!("http://127.0.0.1:{port}/api/projects/{project}");
    let notices = eventually("the claim to be granted after the restart", || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let body = fetch_json(&http, &format!("{base}/messages?type=coordination")).await?;
            let notices = body["messages"].as_array()?.clone();
            notices
                .iter()
                .any(|m| m["metadata"]["event"] == "granted")
                .then_some(notices)
        }
    })
    .await;
    let events: Vec<&str> = notices
        .iter()
        .map(|m| m["metadata"]["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["announced", "granted"], "decided once");
    assert!(notices
        .iter()
        .all(|m| m["metadata"]["claim"]["id"] == claim_id.as_str()));
    let granted = &notices[1];
    assert!(time(&granted["created_at"]) >= decide_at);
    let claim_row: Value = http
        .get(format!("{base}/claims/{claim_id}"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(claim_row["claim"]["state"], "granted");
    assert!(time(&claim_row["claim"]["granted_at"]) >= decide_at);
}

#[tokio::test]
async fn the_claim_commands_exit_with_what_happened() {
    use crate::cli::cli;
    let app = TestApp::spawn().await;
    let project = app.create_project("cli-claims").await;
    let out = cli(
        &app,
        project,
        "shell-a",
        &[
            "claim",
            "src/api/**",
            "--ttl",
            "45m",
            "--reason",
            "API work",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let line = out.lines()[0].to_owned();
    assert!(
        line.contains("shell-a holds src/api/** (exclusive) until"),
        "{line}"
    );
    assert!(line.ends_with(": API work"), "{line}");
    let claim_id = line.split(' ').next().unwrap().to_owned();

    // Held by another agent: exit 4, the holder named on stderr.
    let out = cli(&app, project, "shell-b", &["claim", "src/api/users.rs"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains("shell-a holds src/api/** (exclusive)"),
        "{out:?}"
    );
    assert!(out.stderr.contains("API work"), "{out:?}");

    // Objected: exit 5. The objection comes from a WebSocket agent watching the project.
    let mut reviewer = Peer::connect(&app, project, "reviewer", "reviewer").await;
    let env = crate::cli::env_for(&app, &project.to_string(), "shell-b");
    let waiting = tokio::spawn(crate::cli::run(
        crate::cli::agentbus(&["claim", "docs/**", "--objection-window", "30s"], &env),
        None,
    ));
    let announced = {
        let until = deadline();
        loop {
            let frame = reviewer.agent.next_json_until(until).await;
            if frame["metadata"]["event"] == "announced" {
                break frame;
            }
        }
    };
    reviewer
        .send(json!({"op": "object", "claim_id": announced["metadata"]["claim"]["id"], "reason": "docs freeze"}))
        .await;
    assert_eq!(reviewer.next_op("claim_result").await["ok"], true);
    let out = waiting.await.expect("the claim command");
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.contains("reviewer objected: docs freeze"),
        "{out:?}"
    );

    // Listing: held claims only, one line each; --all shows the refused ones too.
    let out = cli(&app, project, "shell-b", &["claims"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.lines().len(), 1, "{out:?}");
    let out = cli(&app, project, "shell-b", &["claims", "--all", "--json"]).await;
    assert_eq!(out.json()["claims"].as_array().unwrap().len(), 3, "{out:?}");

    // Only its holder releases it; then nothing is held (exit 1).
    let out = cli(&app, project, "shell-b", &["release", &claim_id]).await;
    assert_eq!(out.code, 3, "{out:?}");
    let out = cli(&app, project, "shell-a", &["release", "--all"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.lines()[0].contains("released"), "{out:?}");
    let out = cli(&app, project, "shell-a", &["claims"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    // Bad input: refused by the broker (exit 3), or by the command line (exit 2).
    let out = cli(&app, project, "shell-a", &["claim", "/etc/passwd"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.error_line().contains("absolute"), "{out:?}");
    let out = cli(&app, project, "shell-a", &["claim", "x", "--ttl", "soon"]).await;
    assert_eq!(out.code, 2, "{out:?}");
}

/// A throwaway directory, removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn git(dir: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run git")
}

#[tokio::test]
async fn the_guard_refuses_a_commit_touching_another_agents_claim() {
    let app = TestApp::spawn().await;
    let project = app.create_project("guard").await;
    let dir =
        TempDir(std::env::temp_dir().join(format!("agentbus-guard-{}", Uuid::new_v4().simple())));
    std::fs::create_dir_all(dir.0.join("src/api")).expect("mkdir");
    let repo = dir.0.as_path();
    assert!(git(repo, &["init", "-q"], &[]).status.success());
    // The install line of docs/AGENTS.md, with the binary under test.
    let hook = repo.join(".git/hooks/pre-commit");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\nexec {} guard\n", env!("CARGO_BIN_EXE_agentbus")),
    )
    .expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let env = crate::cli::env_for(&app, &project.to_string(), "committer");

    // Another agent holds src/api/** exclusively.
    let mut holder = Peer::connect(&app, project, "api-owner", "coder").await;
    let held = holder
        .claim(json!({"paths": ["src/api/**"], "reason": "rewriting the router"}))
        .await;
    assert_eq!(held["ok"], true);
    std::fs::write(repo.join("src/api/routes.rs"), "fn main() {}\n").expect("write");
    std::fs::write(repo.join("README.md"), "hello\n").expect("write");
    assert!(git(repo, &["add", "."], &env).status.success());
    let refused = git(repo, &["commit", "-q", "-m", "touch the router"], &env);
    assert!(!refused.status.success(), "the commit went through");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("src/api/routes.rs: held by api-owner"),
        "{said}"
    );
    assert!(said.contains("rewriting the router"), "{said}");
    assert!(!said.contains("README.md"), "{said}");
    assert!(
        git(repo, &["rev-parse", "--verify", "HEAD"], &env)
            .stdout
            .is_empty(),
        "nothing committed"
    );

    // Paths nobody holds go through; so does everything once the claim is released.
    assert!(
        git(repo, &["rm", "-q", "--cached", "src/api/routes.rs"], &env)
            .status
            .success()
    );
    let only_readme = git(repo, &["commit", "-q", "-m", "readme"], &env);
    assert!(
        only_readme.status.success(),
        "{}",
        String::from_utf8_lossy(&only_readme.stderr)
    );
    holder
        .send(json!({"op": "release", "claim_id": id(&held)}))
        .await;
    assert_eq!(holder.next_op("claim_result").await["ok"], true);
    assert!(git(repo, &["add", "."], &env).status.success());
    let allowed = git(repo, &["commit", "-q", "-m", "touch the router"], &env);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    // The committing agent's own claims never block it.
    let mine = crate::cli::cli(&app, project, "committer", &["claim", "src/api/**"]).await;
    assert_eq!(mine.code, 0, "{mine:?}");
    std::fs::write(repo.join("src/api/routes.rs"), "fn main() { }\n").expect("write");
    assert!(git(repo, &["commit", "-q", "-am", "again"], &env)
        .status
        .success());
}
