//! Several brokers on one database (docs/SCALING.md): the real binary, three nodes on one
//! fresh database, agents spread over them, and every guarantee of docs/PROTOCOL.md checked
//! across nodes, including when a node is killed with SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

use crate::helpers::{eventually, status, Agent, Event, TestApp, PATIENCE};

/// How often the test nodes heartbeat, and how long without one before they are dead.
const HEARTBEAT_MS: u64 = 200;
const TIMEOUT_MS: u64 = 1_500;
const ADMIN_TOKEN: &str = "cluster-test-admin-token-0123456789abcdef";

/// One `agentbus serve` process of the cluster.
struct Node {
    child: Child,
    port: u16,
    node_id: String,
    log: Arc<Mutex<String>>,
}

impl Node {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn ws(&self, project: Uuid, query: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/ws/agent/messages/{project}?{query}",
            self.port
        )
    }

    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` nodes serving one database, named `node-1` … `node-n`, each started once the previous
/// one listens; `admin`: whether they require tokens.
struct Cluster {
    nodes: Vec<Node>,
    database_url: String,
    admin: bool,
}

impl Cluster {
    fn start(database_url: &str, n: usize, admin: bool) -> Cluster {
        let mut cluster = Cluster {
            nodes: Vec::new(),
            database_url: database_url.to_owned(),
            admin,
        };
        for i in 1..=n {
            let node = cluster.spawn(&format!("node-{i}"));
            cluster.nodes.push(node);
        }
        cluster
    }

    /// Starts one more node on the cluster's database and learns its port from the JSON line
    /// `serve` prints once it listens.
    fn spawn(&self, node_id: &str) -> Node {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agentbus"));
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--workers", "2"])
            .args(["--node-id", node_id])
            .env("DATABASE_URL", &self.database_url)
            .env("AGENTBUS_NODE_HEARTBEAT_MS", HEARTBEAT_MS.to_string())
            .env("AGENTBUS_NODE_TIMEOUT_MS", TIMEOUT_MS.to_string())
            .env("AGENTBUS_RATE_PER_SESSION", "0")
            .env("AGENTBUS_RATE_PER_PROJECT", "0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.admin {
            command.env("AGENTBUS_ADMIN_TOKEN", ADMIN_TOKEN);
        }
        let mut child = command.spawn().expect("start the agentbus binary");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            // Keep draining, so the broker never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx.recv_timeout(PATIENCE).ok().flatten();
        let announced: Option<Value> = line.as_deref().and_then(|l| serde_json::from_str(l).ok());
        let port = announced
            .as_ref()
            .filter(|v| v["event"] == "listening")
            .and_then(|v| v["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
            panic!("node {node_id} did not announce its port ({line:?}):\n{log}");
        };
        assert_eq!(
            announced.as_ref().map(|v| v["node_id"].clone()),
            Some(json!(node_id))
        );
        Node {
            child,
            port,
            node_id: node_id.to_owned(),
            log,
        }
    }

    fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    fn http(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if self.admin {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {ADMIN_TOKEN}").parse().expect("header"),
            );
        }
        reqwest::Client::builder()
            .timeout(PATIENCE)
            .default_headers(headers)
            .build()
            .expect("an HTTP client")
    }

    /// `GET /api/cluster` on node `i`.
    async fn overview(&self, i: usize) -> Value {
        self.http()
            .get(self.node(i).url("/api/cluster"))
            .send()
            .await
            .expect("GET /api/cluster")
            .json()
            .await
            .expect("JSON")
    }

    /// Node `i`'s log so far, for failure messages.
    fn log(&self, i: usize) -> String {
        self.node(i)
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A fresh database with one project on it (made by a harness broker that is then stopped),
/// and `n` nodes on it.
async fn cluster(n: usize, admin: bool) -> (TestApp, Cluster, Uuid) {
    let app = TestApp::spawn_with(|s| {
        if admin {
            s.admin_token = Some(ADMIN_TOKEN.into());
        }
    })
    .await;
    let project = {
        let response = app
            .http
            .post(app.url("/api/projects"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"name": "cluster"}))
            .send()
            .await
            .expect("POST /api/projects");
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("JSON");
        body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("project id")
    };
    app.stop();
    let cluster = Cluster::start(&app.database_url, n, admin);
    (app, cluster, project)
}

fn seq(frame: &Value) -> i64 {
    frame["seq"].as_i64().expect("seq")
}

/// The next `message` frame, skipping other frames (receipts of its own sends).
async fn next_message(agent: &mut Agent) -> Value {
    loop {
        let frame = agent.next_json().await;
        if frame["op"] == "message" {
            return frame;
        }
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    let mut conn = app.db().await;
    diesel::sql_query(sql)
        .get_result::<Count>(&mut conn)
        .await
        .expect("count")
        .count
}

#[tokio::test]
async fn broadcasts_and_direct_messages_cross_nodes() {
    let (_app, cluster, project) = cluster(3, false).await;
    let mut a = Agent::connect(&cluster.node(0).ws(project, "agent_id=a")).await;
    let mut b = Agent::connect(&cluster.node(1).ws(project, "agent_id=b")).await;
    let mut c = Agent::connect(&cluster.node(2).ws(project, "agent_id=c&ack=manual")).await;

    let sent = a.send_ok(status("hello from node 1")).await;
    for agent in [&mut b, &mut c] {
        let m = next_message(agent).await;
        assert_eq!(
            (m["content"].clone(), seq(&m)),
            (json!("hello from node 1"), seq(&sent))
        );
        assert_eq!(m["sender_agent_id"], "a");
    }

    // b (node 2) to c (node 3) directly; a (node 1) sees nothing of it.
    let direct = b.send_ok(json!({"content": "just for c", "to": "c"})).await;
    let m = next_message(&mut c).await;
    assert_eq!(
        (m["content"].clone(), m["to"].clone()),
        (json!("just for c"), json!("c"))
    );
    assert_eq!(seq(&m), seq(&direct));
    c.send(json!({"op": "ack", "up_to": seq(&m)})).await;

    // a's next message is c's broadcast, not b's direct message.
    c.send_ok(status("from node 3")).await;
    let m = next_message(&mut a).await;
    assert_eq!(m["content"], "from node 3");
    let m = next_message(&mut b).await;
    assert_eq!(m["content"], "from node 3");
}

#[tokio::test]
async fn concurrent_senders_on_every_node_get_dense_seqs_seen_in_order_everywhere() {
    let (app, cluster, project) = cluster(3, false).await;
    const PER_SENDER: usize = 60;
    // One observer per node sees every message of the project.
    let mut observers = Vec::new();
    for i in 0..3 {
        observers.push(Agent::connect(&cluster.node(i).ws(project, "")).await);
    }
    let mut senders = Vec::new();
    for i in 0..3 {
        senders.push(Agent::connect(&cluster.node(i).ws(project, &format!("agent_id=s{i}"))).await);
    }
    // All three send at once, pipelined.
    let mut tasks = Vec::new();
    for (i, mut sender) in senders.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for n in 0..PER_SENDER {
                sender
                    .send(json!({"content": format!("s{i}-{n}"), "client_msg_id": format!("s{i}-{n}")}))
                    .await;
            }
            // Every receipt, and the broadcasts of the other two, in the order they came.
            let (mut receipts, mut seen) = (Vec::new(), Vec::new());
            while receipts.len() < PER_SENDER || seen.len() < 2 * PER_SENDER {
                let frame = sender.next_json().await;
                match frame["op"].as_str() {
                    Some("sent") => receipts.push(seq(&frame)),
                    Some("message") => seen.push(seq(&frame)),
                    _ => panic!("unexpected {frame}"),
                }
            }
            (receipts, seen)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let (receipts, seen) = task.await.expect("sender");
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "a sender saw {seen:?}"
        );
        all.extend(receipts);
    }
    all.sort_unstable();
    let expected: Vec<i64> = (1..=3 * PER_SENDER as i64).collect();
    assert_eq!(all, expected, "seqs are dense and each taken once");
    for observer in &mut observers {
        let mut seen = Vec::new();
        while seen.len() < 3 * PER_SENDER {
            seen.push(seq(&next_message(observer).await));
        }
        assert_eq!(
            seen, expected,
            "every observer sees every seq once, in order"
        );
    }
    assert_eq!(
        count(
            &app,
            &format!("SELECT head_seq AS count FROM projects WHERE id = '{project}'")
        )
        .await,
        3 * PER_SENDER as i64
    );
}

#[tokio::test]
async fn a_connection_on_another_node_takes_over_with_4001() {
    let (_app, cluster, project) = cluster(3, false).await;
    let mut first = Agent::connect(&cluster.node(0).ws(project, "agent_id=x")).await;
    let taken = Instant::now();
    let second = Agent::connect(&cluster.node(1).ws(project, "agent_id=x")).await;
    assert_eq!(first.expect_close().await, Some(CloseCode::Library(4001)));
    assert!(
        taken.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        taken.elapsed()
    );
    // From every node, x is online with the second connection only.
    let http = cluster.http();
    for i in 0..3 {
        let url = cluster
            .node(i)
            .url(&format!("/api/projects/{project}/agents"));
        let sessions = eventually("x listed with its new session", || async {
            let body: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let x = body["agents"]
                .as_array()?
                .iter()
                .find(|m| m["agent_id"] == "x")?
                .clone();
            (x["session_ids"] == json!([second.session_id()])).then_some(x)
        })
        .await;
        assert_eq!(sessions["online"], true);
    }
    // And a third, back on the first node, replaces the second.
    let mut second = second;
    let _third = Agent::connect(&cluster.node(0).ws(project, "agent_id=x")).await;
    assert_eq!(second.expect_close().await, Some(CloseCode::Library(4001)));
}

#[tokio::test]
async fn requests_are_answered_across_nodes_and_time_out_once_even_when_their_node_dies() {
    let (app, mut cluster, project) = cluster(3, false).await;
    let mut coord = Agent::connect(&cluster.node(0).ws(project, "agent_id=coord")).await;
    let mut worker = Agent::connect(&cluster.node(1).ws(project, "agent_id=worker")).await;

    // Asked on node 1, answered on node 2, the reply reaches the requester on node 1.
    let request = coord
        .send_ok(json!({"content": "build it", "to": "worker", "expects_reply": true, "timeout_ms": 30_000}))
        .await;
    let asked = next_message(&mut worker).await;
    assert_eq!(asked["id"], request["id"]);
    worker
        .send_ok(json!({"content": "built", "reply_to": request["id"], "success": true}))
        .await;
    let reply = next_message(&mut coord).await;
    assert_eq!(
        (reply["content"].clone(), reply["in_reply_to_seq"].clone()),
        (json!("built"), json!(seq(&request)))
    );

    // sendAndWait on node 3, answered by the worker on node 2.
    let http = cluster.http();
    let url = cluster
        .node(2)
        .url(&format!("/api/projects/{project}/requests"));
    let asking = tokio::spawn({
        let http = http.clone();
        async move {
            let response = http
                .post(url)
                .json(&json!({"sender_agent_id": "op", "sender_agent_type": "operator", "to": "worker",
                              "content": "status?", "timeout_ms": 20_000}))
                .send()
                .await
                .expect("POST");
            (
                response.status().as_u16(),
                response.json::<Value>().await.expect("JSON"),
            )
        }
    });
    let asked = next_message(&mut worker).await;
    worker
        .send_ok(json!({"content": "green", "reply_to": asked["id"], "success": true}))
        .await;
    let (code, body) = asking.await.expect("task");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["response"]["content"], "green");

    // A request nobody answers, committed on node 1, whose node is killed before the
    // deadline: another node times it out, once, and the requester gets it elsewhere.
    let request = coord
        .send_ok(json!({"content": "anyone?", "to": "worker", "expects_reply": true, "timeout_ms": 2_500}))
        .await;
    next_message(&mut worker).await;
    cluster.nodes[0].kill();
    assert_eq!(
        coord.expect_close().await,
        None,
        "the node died under the requester"
    );
    let mut coord = Agent::connect(&cluster.node(2).ws(project, "agent_id=coord")).await;
    let timeout = next_message(&mut coord).await;
    assert_eq!(timeout["reply_to"], request["id"]);
    assert_eq!(timeout["error"], "timeout");
    fence(&cluster, project, &[1, 2]).await;
    let responses = count(
        &app,
        &format!("SELECT count(*) AS count FROM agent_messages WHERE reply_to = '{}' AND error = 'timeout'", request["id"].as_str().expect("id")),
    )
    .await;
    assert_eq!(responses, 1, "one timeout response for the request");
}

/// Publishes one message through each of these nodes: once each is committed, everything
/// those nodes had queued before (a timeout response, say) is committed too.
async fn fence(cluster: &Cluster, project: Uuid, nodes: &[usize]) {
    let http = cluster.http();
    for &i in nodes {
        let response = http
            .post(cluster.node(i).url(&format!("/api/projects/{project}/messages")))
            .json(&json!({"sender_agent_id": "fence", "sender_agent_type": "test", "content": "fence"}))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 201);
    }
}

#[tokio::test]
async fn a_request_armed_on_three_nodes_times_out_once() {
    let app = TestApp::spawn().await;
    let project = app.create_project("timeouts").await;
    let worker = app.connect(project, "worker", "codegen").await;
    worker.close().await;
    let mut coord = app.connect(project, "coord", "coordinator").await;
    let request = coord
        .send_ok(json!({"content": "long job", "to": "worker", "expects_reply": true, "timeout_ms": 3_000}))
        .await;
    // Three nodes start while it waits: each arms every pending request when it starts.
    let cluster = Cluster::start(&app.database_url, 3, false);
    let timeout = next_message(&mut coord).await;
    assert_eq!(
        (timeout["reply_to"].clone(), timeout["error"].clone()),
        (request["id"].clone(), json!("timeout"))
    );
    fence(&cluster, project, &[0, 1, 2]).await;
    let responses = count(
        &app,
        &format!(
            "SELECT count(*) AS count FROM agent_messages WHERE reply_to = '{}'",
            request["id"].as_str().expect("id")
        ),
    )
    .await;
    assert_eq!(
        responses, 1,
        "four brokers armed it, one timeout response is stored"
    );
}

#[tokio::test]
async fn a_node_killed_mid_stream_loses_nothing_acknowledged_and_is_taken_over() {
    let (app, mut cluster, project) = cluster(3, false).await;
    // node 1 holds the duties: it started first.
    let overview = cluster.overview(1).await;
    let holders: BTreeSet<String> = overview["duties"]
        .as_object()
        .expect("duties")
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    assert_eq!(holders, BTreeSet::from(["node-1".to_owned()]), "{overview}");

    let mut r1 = Agent::connect(&cluster.node(0).ws(project, "agent_id=r1")).await;
    let mut r2 = Agent::connect(&cluster.node(1).ws(project, "agent_id=r2")).await;
    let mut r3 = Agent::connect(&cluster.node(2).ws(project, "agent_id=r3&ack=manual")).await;
    let mut sender = Agent::connect(&cluster.node(0).ws(project, "agent_id=sender")).await;
    const TOTAL: usize = 300;
    for n in 0..TOTAL {
        sender
            .send(json!({"content": format!("m{n}"), "client_msg_id": format!("m{n}")}))
            .await;
    }
    // The node dies once a third of the receipts are in.
    let mut acknowledged: BTreeMap<String, i64> = BTreeMap::new();
    while acknowledged.len() < TOTAL / 3 {
        let frame = sender.next_json().await;
        assert_eq!(frame["op"], "sent", "{frame}");
        acknowledged.insert(
            frame["client_msg_id"].as_str().expect("cmid").to_owned(),
            seq(&frame),
        );
    }
    let killed = Instant::now();
    cluster.nodes[0].kill();
    // Receipts that were already on their way still count.
    loop {
        match sender.next_event().await {
            Event::Json(frame) if frame["op"] == "sent" => {
                acknowledged.insert(
                    frame["client_msg_id"].as_str().expect("cmid").to_owned(),
                    seq(&frame),
                );
            }
            Event::Json(frame) => panic!("unexpected {frame}"),
            Event::Closed(_) => break,
        }
    }
    // The sender reconnects to node 2 and sends again everything it has no receipt for.
    let mut sender = Agent::connect(&cluster.node(1).ws(project, "agent_id=sender")).await;
    let missing: Vec<usize> = (0..TOTAL)
        .filter(|n| !acknowledged.contains_key(&format!("m{n}")))
        .collect();
    for n in &missing {
        sender
            .send(json!({"content": format!("m{n}"), "client_msg_id": format!("m{n}")}))
            .await;
    }
    let mut retried = 0;
    while retried < missing.len() {
        let frame = sender.next_json().await;
        if frame["op"] == "sent" {
            let cmid = frame["client_msg_id"].as_str().expect("cmid").to_owned();
            // A send that was stored before the kill keeps its first receipt's seq.
            if let Some(&first) = acknowledged.get(&cmid) {
                assert_eq!(first, seq(&frame));
            }
            acknowledged.insert(cmid, seq(&frame));
            retried += 1;
        }
    }
    assert_eq!(acknowledged.len(), TOTAL);
    let seqs: BTreeSet<i64> = acknowledged.values().copied().collect();
    assert_eq!(
        seqs,
        (1..=TOTAL as i64).collect(),
        "every send stored once, seqs dense"
    );

    // Every message is stored, and reaches r2 (auto) and r3 (manual) on the live nodes once
    // each, in order.
    assert_eq!(
        count(
            &app,
            &format!("SELECT count(*) AS count FROM agent_messages WHERE project_id = '{project}'")
        )
        .await,
        TOTAL as i64
    );
    for (receiver, manual) in [(&mut r2, false), (&mut r3, true)] {
        let mut seen = Vec::new();
        while seen.len() < TOTAL {
            let m = seq(&next_message(receiver).await);
            if manual {
                receiver.send(json!({"op": "ack", "seqs": [m]})).await;
            }
            seen.push(m);
        }
        assert_eq!(seen, (1..=TOTAL as i64).collect::<Vec<_>>());
    }

    // r1 lost its node: it reconnects to node 3 and gets what it is owed; together with what
    // it had, that is everything (a repeat is allowed for what it had not confirmed).
    let mut had = BTreeSet::new();
    loop {
        match r1.next_event().await {
            Event::Json(frame) if frame["op"] == "message" => {
                had.insert(seq(&frame));
            }
            Event::Json(_) => {}
            Event::Closed(_) => break,
        }
    }
    let mut r1 = Agent::connect(&cluster.node(2).ws(project, "agent_id=r1")).await;
    let replay = r1.welcome["replay"].as_i64().expect("replay");
    for _ in 0..replay {
        had.insert(seq(&next_message(&mut r1).await));
    }
    assert_eq!(had, (1..=TOTAL as i64).collect::<BTreeSet<_>>());

    // Node 1 is declared dead within its timeout (plus a heartbeat or two of the others),
    // its sessions are gone and its duties taken over.
    let overview = eventually(
        "node 1 to be declared dead and its duties taken",
        || async {
            let overview = cluster.overview(1).await;
            let nodes = overview["nodes"].as_array()?;
            let held = overview["duties"]
                .as_object()?
                .values()
                .all(Value::is_string);
            (held && nodes.iter().all(|n| n["node_id"] != "node-1")).then_some(overview)
        },
    )
    .await;
    let detected = killed.elapsed();
    assert!(
        detected < Duration::from_millis(TIMEOUT_MS + 4 * HEARTBEAT_MS + 1_000),
        "detected after {detected:?}"
    );
    let holders: Vec<&str> = overview["duties"]
        .as_object()
        .expect("duties")
        .values()
        .map(|v| v.as_str().unwrap_or("none"))
        .collect();
    assert!(
        holders.iter().all(|h| *h == "node-2" || *h == "node-3"),
        "duties taken over: {overview}"
    );
    let r1_sessions: Vec<Value> = overview["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .flat_map(|n| n["sessions"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["agent_id"] == "r1")
        .map(|s| s["session_id"].clone())
        .collect();
    assert_eq!(
        r1_sessions,
        [json!(r1.session_id())],
        "r1's old session is gone: {overview}"
    );
    assert_eq!(
        count(&app, &format!("SELECT count(*) AS count FROM sessions WHERE agent_id = 'r1' AND disconnected_at IS NULL AND project_id = '{project}'")).await,
        1,
        "only r1's new session is open"
    );
}

#[tokio::test]
async fn revoking_a_token_closes_its_sessions_on_every_node() {
    let (_app, cluster, project) = cluster(3, true).await;
    let http = cluster.http();
    let issued: Value = http
        .post(
            cluster
                .node(0)
                .url(&format!("/api/projects/{project}/tokens")),
        )
        .send()
        .await
        .expect("POST tokens")
        .json()
        .await
        .expect("JSON");
    let token = issued["token"].as_str().expect("token");
    let mut agents = Vec::new();
    for i in 0..3 {
        let url = cluster
            .node(i)
            .ws(project, &format!("agent_id=t{i}&token={token}"));
        agents.push(Agent::connect(&url).await);
    }
    // An admin connection is not affected.
    let mut admin = Agent::connect(
        &cluster
            .node(2)
            .ws(project, &format!("agent_id=admin&token={ADMIN_TOKEN}")),
    )
    .await;
    let response = http
        .delete(cluster.node(0).url(&format!(
            "/api/projects/{project}/tokens/{}",
            issued["id"].as_str().expect("id")
        )))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(response.status(), 204);
    for agent in &mut agents {
        assert_eq!(agent.expect_close().await, Some(CloseCode::Library(4003)));
    }
    admin.send_ok(status("still here")).await;
}

#[tokio::test]
async fn presence_and_the_cluster_view_are_right_from_every_node() {
    let (_app, cluster, project) = cluster(3, false).await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(Agent::connect(&cluster.node(i).ws(project, &format!("agent_id=p{i}"))).await);
    }
    let http = cluster.http();
    let online_from = |i: usize| {
        let (http, url) = (
            http.clone(),
            cluster
                .node(i)
                .url(&format!("/api/projects/{project}/agents")),
        );
        async move {
            let body: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let online: BTreeMap<String, Value> = body["agents"]
                .as_array()?
                .iter()
                .filter(|m| m["online"] == true)
                .map(|m| {
                    (
                        m["agent_id"].as_str().unwrap_or_default().to_owned(),
                        m["session_ids"].clone(),
                    )
                })
                .collect();
            Some(online)
        }
    };
    let expected: BTreeMap<String, Value> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("p{i}"), json!([a.session_id()])))
        .collect();
    for i in 0..3 {
        let online = online_from(i).await.expect("agents");
        assert_eq!(online, expected, "presence from node {}", i + 1);
    }
    // p2 leaves: offline from every node.
    let p2 = agents.remove(1);
    p2.close().await;
    for i in 0..3 {
        eventually("p2 offline", || async {
            let online = online_from(i).await?;
            (!online.contains_key("p1") && online.len() == 2).then_some(())
        })
        .await;
    }

    // The cluster view: three live nodes, each with its own session, every duty held once.
    let overview = cluster.overview(2).await;
    assert_eq!(overview["node_id"], "node-3");
    let nodes = overview["nodes"].as_array().expect("nodes");
    let ids: Vec<&str> = nodes.iter().filter_map(|n| n["node_id"].as_str()).collect();
    assert_eq!(ids, ["node-1", "node-2", "node-3"], "{overview}");
    for node in nodes {
        assert_eq!(node["alive"], true);
        let agents: Vec<&str> = node["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .filter_map(|s| s["agent_id"].as_str())
            .collect();
        let expected: &[&str] = match node["node_id"].as_str() {
            Some("node-1") => &["p0"],
            Some("node-2") => &[],
            _ => &["p2"],
        };
        assert_eq!(agents, expected, "{overview}");
    }
    let duties = overview["duties"].as_object().expect("duties");
    assert_eq!(duties.len(), 3);
    assert!(
        duties.values().all(|holder| holder.is_string()),
        "{overview}"
    );

    // Each node names itself in /readyz and /metrics.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let response = http.get(node.url("/readyz")).send().await.expect("readyz");
        assert_eq!(
            response
                .headers()
                .get("x-agentbus-node")
                .and_then(|v| v.to_str().ok()),
            Some(node.node_id.as_str())
        );
        let body: Value = response.json().await.expect("readyz JSON");
        assert_eq!(body["node_id"], node.node_id.as_str(), "{body}");
        let metrics = http
            .get(node.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(
            metrics.contains(&format!(
                "agentbus_node_info{{node_id=\"node-{}\"}} 1",
                i + 1
            )),
            "{metrics}"
        );
        assert!(metrics.trim_end().ends_with("# EOF"));
    }
}

#[tokio::test]
async fn a_node_that_shuts_down_closes_with_1001_and_hands_its_duties_over() {
    let (_app, mut cluster, project) = cluster(2, false).await;
    let mut on_first = Agent::connect(&cluster.node(0).ws(project, "agent_id=a")).await;
    let mut on_second = Agent::connect(&cluster.node(1).ws(project, "agent_id=b")).await;
    eventually("node 1 to hold every duty", || async {
        let overview = cluster.overview(1).await;
        let duties = overview["duties"].as_object()?.clone();
        duties.values().all(|h| h == "node-1").then_some(())
    })
    .await;
    let stopping = Instant::now();
    cluster.nodes[0].terminate();
    assert_eq!(on_first.expect_close().await, Some(CloseCode::Away));
    // Handed over at once, not after node 1's timeout.
    eventually("node 2 to hold every duty", || async {
        let overview = cluster.overview(1).await;
        let duties = overview["duties"].as_object()?.clone();
        let nodes = overview["nodes"].as_array()?.len();
        (nodes == 1 && duties.values().all(|h| h == "node-2")).then_some(())
    })
    .await;
    assert!(
        stopping.elapsed() < Duration::from_millis(TIMEOUT_MS),
        "handed over after {:?}:\n{}",
        stopping.elapsed(),
        cluster.log(1)
    );
    // The agent reconnects to the other node and carries on.
    let mut a = Agent::connect(&cluster.node(1).ws(project, "agent_id=a")).await;
    a.send_ok(status("moved")).await;
    assert_eq!(next_message(&mut on_second).await["content"], "moved");
}

#[tokio::test]
async fn a_claim_window_opened_on_a_node_that_dies_is_decided_once_by_another() {
    let (app, mut cluster, project) = cluster(2, false).await;
    let mut watcher = Agent::connect(&cluster.node(1).ws(project, "agent_id=watcher")).await;
    let mut a = Agent::connect(&cluster.node(0).ws(project, "agent_id=a")).await;
    a.send(
        json!({"op": "claim", "paths": ["config.yaml"], "objection_ms": 3_000,
                  "reason": "About to modify config.yaml"}),
    )
    .await;
    let result = loop {
        let frame = a.next_json().await;
        if frame["op"] == "claim_result" {
            break frame;
        }
    };
    assert_eq!(result["claim"]["state"], "pending", "{result}");
    let claim_id = result["claim"]["id"].clone();
    // The node that armed the window dies before it closes.
    cluster.nodes[0].kill();
    let is_notice = |frame: &Value, event: &str| {
        frame["message_type"] == "coordination"
            && frame["metadata"]["event"] == event
            && frame["metadata"]["claim"]["id"] == claim_id
    };
    loop {
        let frame = next_message(&mut watcher).await;
        if is_notice(&frame, "granted") {
            assert_eq!(frame["sender_agent_id"], "agentbus");
            break;
        }
    }
    let id = claim_id.as_str().expect("claim id");
    fence(&cluster, project, &[1]).await;
    let granted = count(
        &app,
        &format!(
            "SELECT count(*) AS count FROM agent_messages WHERE message_type = 'coordination' \
             AND metadata->>'event' = 'granted' AND metadata->'claim'->>'id' = '{id}'"
        ),
    )
    .await;
    assert_eq!(granted, 1, "decided once");
}
