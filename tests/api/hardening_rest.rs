//! What one REST client must not be able to do to everyone else: hold sockets and waiters
//! after it left, hold connections with a body that never arrives, take the broker's memory
//! with large pages, or get database text back for a NUL in a URL.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::crash::BrokerProcess;
use crate::helpers::{Agent, TestApp};

/// Longest a test waits for the broker to settle (descriptors closed, pages read): it only
/// catches hangs, under a loaded machine.
const DEADLINE: Duration = Duration::from_secs(90);

const ADMIN_TOKEN: &str = "an-admin-token-long-enough";

/// The `agentbus` binary on a free port against this database, with these extra flags.
fn broker(database_url: &str, flags: &[&str]) -> BrokerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentbus"));
    command
        .args(["serve", "--bind", "127.0.0.1:0", "--workers", "2"])
        .args(flags)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn,agentbus=info");
    BrokerProcess::spawn(command)
}

/// The broker's open descriptors.
fn open_fds(broker: &BrokerProcess) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", broker.child.id()))
        .expect("the broker's /proc/PID/fd")
        .count()
}

/// A line of the broker's /proc/PID/status, in KiB (`VmRSS`, `VmHWM`).
fn status_kib(broker: &BrokerProcess, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", broker.child.id()))
        .expect("the broker's /proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/PID/status"))
}

/// Polls `check` until it holds, failing after `DEADLINE` with what was last seen.
async fn until(what: &str, mut check: impl FnMut() -> (bool, String)) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (done, seen) = check();
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} (last seen: {seen})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A raw HTTP/1.1 request (with a complete body).
fn request(method: &str, path: &str, token: Option<&str>, body: &str) -> Vec<u8> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads until the server closes the connection: `Err` with what was received if it has not
/// within `DEADLINE`.
async fn read_to_close(stream: &mut TcpStream) -> Result<String, String> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(DEADLINE, read).await.is_ok();
    let text = String::from_utf8_lossy(&received).into_owned();
    if closed {
        Ok(text)
    } else {
        Err(text)
    }
}

/// A project (made by the in-process harness, which also drops the database at the end) and
/// the broker binary serving its database.
async fn project_on_a_broker(flags: &[&str]) -> (TestApp, Uuid, BrokerProcess) {
    let app = TestApp::spawn().await;
    let project = app.create_project("hardening").await;
    app.stop();
    let broker = broker(&app.database_url, flags);
    (app, project, broker)
}

#[tokio::test]
async fn an_abandoned_send_and_wait_frees_its_socket_and_waiter_and_stays_answerable() {
    const CLIENTS: usize = 300;
    let (_app, project, broker) = project_on_a_broker(&[]).await;
    let port = broker.port;
    let mut worker = Agent::connect(&format!(
        "ws://127.0.0.1:{port}/ws/agent/messages/{project}?agent_id=worker&agent_type=codegen"
    ))
    .await;
    let http = reqwest::Client::new();
    let show = format!("http://127.0.0.1:{port}/api/projects/{project}");
    assert_eq!(http.get(&show).send().await.expect("GET").status(), 200);
    let baseline = open_fds(&broker);
    let rss_before = status_kib(&broker, "VmRSS");

    // Requests that would wait ten minutes for their reply, from clients that then leave.
    let body = json!({"sender_agent_id": "op", "sender_agent_type": "operator", "to": "worker",
                      "content": "will anyone answer?", "timeout_ms": 600_000})
    .to_string();
    let raw = request(
        "POST",
        &format!("/api/projects/{project}/requests"),
        None,
        &body,
    );
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.write_all(&raw).await.expect("send the request");
        clients.push(stream);
    }
    // Every request is stored (and delivered) before its client leaves.
    let mut request_ids = Vec::new();
    for _ in 0..CLIENTS {
        let message = worker.expect_op("message").await;
        request_ids.push(message["id"].as_str().expect("id").to_owned());
    }
    let held = open_fds(&broker);
    assert!(
        held >= baseline + CLIENTS / 2,
        "the waiting requests should hold sockets ({baseline} -> {held})"
    );
    // Another client is served meanwhile.
    assert_eq!(http.get(&show).send().await.expect("GET").status(), 200);
    drop(clients);

    until("the abandoned requests' sockets to close", || {
        let now = open_fds(&broker);
        (
            now <= baseline + 20,
            format!("{now} open, {baseline} before"),
        )
    })
    .await;
    let rss_growth_mib = status_kib(&broker, "VmRSS").saturating_sub(rss_before) / 1024;
    eprintln!(
        "abandoned requests: {baseline} descriptors before, {held} while waiting, {} after; \
         RSS +{rss_growth_mib} MiB",
        open_fds(&broker)
    );
    assert!(
        rss_growth_mib < 100,
        "the broker kept {rss_growth_mib} MiB after the clients left"
    );

    // The requests are still stored, and can still be answered.
    let first = &request_ids[0];
    worker
        .send_ok(json!({"type": "answer", "content": "late, but here", "reply_to": first}))
        .await;
    let (code, shown): (u16, Value) = {
        let response = http
            .get(format!("{show}/messages/{first}"))
            .send()
            .await
            .expect("GET the request");
        (
            response.status().as_u16(),
            response.json().await.expect("JSON"),
        )
    };
    assert_eq!(code, 200, "{shown}");
    assert_eq!(shown["replies"], 1, "{shown}");
    assert_eq!(shown["message"]["expects_reply"], true);
}

#[tokio::test]
async fn waiters_are_bounded_per_project_and_a_departed_one_frees_its_place() {
    let (_app, project, broker) = project_on_a_broker(&["--max-waiters-per-project", "3"]).await;
    let port = broker.port;
    let mut worker = Agent::connect(&format!(
        "ws://127.0.0.1:{port}/ws/agent/messages/{project}?agent_id=worker&agent_type=codegen"
    ))
    .await;
    let path = format!("/api/projects/{project}/requests");
    let waiting = request(
        "POST",
        &path,
        None,
        &json!({"sender_agent_id": "op", "sender_agent_type": "operator", "to": "worker",
                "content": "hold on", "timeout_ms": 600_000})
        .to_string(),
    );
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.write_all(&waiting).await.expect("send");
        clients.push(stream);
        worker.expect_op("message").await;
    }
    let url = format!("http://127.0.0.1:{port}{path}");
    let quick = json!({"sender_agent_id": "op", "sender_agent_type": "operator", "to": "worker",
                       "content": "quick one", "timeout_ms": 100});
    let http = reqwest::Client::new();
    let response = http.post(&url).json(&quick).send().await.expect("POST");
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["code"], "too_many_waiters", "{body}");

    // The three clients leave: their places are freed, without waiting for their timeout.
    drop(clients);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let response = http.post(&url).json(&quick).send().await.expect("POST");
        if response.status() != 429 {
            // Admitted: the worker does not answer, so the broker's timeout response does.
            assert_eq!(response.status(), 504);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the departed waiters' places were never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn bodies_trickled_without_a_token_are_refused_before_they_are_read() {
    const CLIENTS: usize = 200;
    let (_app, project, broker) = project_on_a_broker(&["--admin-token", ADMIN_TOKEN]).await;
    let port = broker.port;
    let baseline = open_fds(&broker);
    // Half declare a length, half are chunked; each sends one byte of its body and stalls.
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let head = if n % 2 == 0 {
            "POST /api/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: 100000\r\n\r\n{"
                .to_owned()
        } else {
            format!(
                "POST /api/projects/{project}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n"
            )
        };
        stream.write_all(head.as_bytes()).await.expect("send");
        clients.push(stream);
    }
    // Another client is served meanwhile.
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/projects"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("GET /api/projects");
    assert_eq!(response.status(), 200);
    // Each is answered 401 and its connection closed, though its body never came.
    let answers = join_all(clients.iter_mut().map(read_to_close)).await;
    for (n, answer) in answers.iter().enumerate() {
        let answer = answer.as_deref().unwrap_or_else(|received| {
            panic!("client {n}'s connection was held open, after: {received:?}")
        });
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "client {n} got: {answer}"
        );
    }
    drop(clients);
    until("the refused connections' descriptors to close", || {
        let now = open_fds(&broker);
        (
            now <= baseline + 20,
            format!("{now} open, {baseline} before"),
        )
    })
    .await;
}

#[tokio::test]
async fn a_body_slower_than_the_body_timeout_gets_408_and_the_connection_closed() {
    let app = TestApp::spawn_with(|s| {
        s.admin_token = Some(ADMIN_TOKEN.into());
        s.body_timeout_ms = 500;
    })
    .await;
    let mut stream = TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    stream
        .write_all(
            format!(
                "POST /api/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\""
            )
            .as_bytes(),
        )
        .await
        .expect("send");
    let answer = read_to_close(&mut stream)
        .await
        .expect("the connection was held open after");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"body_timeout\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );

    // A body that arrives in time is served as usual.
    let response = app
        .http
        .post(app.url("/api/projects"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "in time"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 201);
}

fn seqs(body: &Value) -> Vec<i64> {
    body["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {body}"))
        .iter()
        .map(|m| m["seq"].as_i64().expect("seq"))
        .collect()
}

/// Follows a paged read (`first`, then each `next`) to its end; every page must be within
/// the budget (or a single message).
async fn read_all_pages(app: &TestApp, first: &str, budget: usize) -> (Vec<i64>, usize) {
    let mut all = Vec::new();
    let mut pages = 0;
    let mut path = first.to_owned();
    loop {
        let response = app.http.get(app.url(&path)).send().await.expect("GET");
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("body");
        let body: Value = serde_json::from_str(&text).expect("JSON");
        let page = seqs(&body);
        assert!(
            text.len() <= budget + 4096 || page.len() == 1,
            "a page of {} bytes ({} messages) is over the budget",
            text.len(),
            page.len()
        );
        pages += 1;
        all.extend(page);
        if body["has_more"] != true {
            assert!(body["next"].is_null(), "{}", body["next"]);
            return (all, pages);
        }
        let next = body["next"].as_object().expect("a next cursor");
        let base = first.split('?').next().unwrap_or(first);
        let cursor: Vec<String> = next.iter().map(|(k, v)| format!("{k}={v}")).collect();
        path = format!("{base}?limit=1000&{}", cursor.join("&"));
        assert!(pages < 100, "paging does not end");
    }
}

#[tokio::test]
async fn a_page_stops_at_the_byte_budget_and_its_cursor_yields_the_rest_exactly_once() {
    const BUDGET: usize = 64 * 1024;
    let app = TestApp::spawn_with(|s| s.max_page_bytes = BUDGET).await;
    let project = app.create_project("pages").await;
    // b becomes a member, then goes offline: everything below is owed to it.
    app.connect(project, "b", "reviewer").await.close().await;
    let large = "x".repeat(10_000);
    for n in 1..=30 {
        let (code, body) = app
            .post_json(
                &format!("/api/projects/{project}/messages"),
                &json!({"sender_agent_id": "a", "sender_agent_type": "coder",
                        "type": "status", "content": format!("{n} {large}"),
                        "priority": n % 4}),
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }
    let everything: Vec<i64> = (1..=30).collect();
    let base = format!("/api/projects/{project}/messages");

    // Forwards.
    let (code, body) = app
        .get_json(&format!("{base}?limit=1000&after_seq=0"))
        .await;
    assert_eq!(code, 200);
    assert_eq!(body["truncated"], true, "{}", body["next"]);
    assert_eq!(body["has_more"], true);
    let (forward, pages) =
        read_all_pages(&app, &format!("{base}?limit=1000&after_seq=0"), BUDGET).await;
    assert_eq!(forward, everything, "no gap, no duplicate");
    assert!(pages >= 4, "{pages} pages");

    // Backwards from the latest page: each page ascending, the pages newest first.
    let (backward, _) = read_all_pages(&app, &format!("{base}?limit=1000"), BUDGET).await;
    let mut sorted = backward.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, everything, "no gap, no duplicate");
    assert_eq!(backward.iter().collect::<BTreeSet<_>>().len(), 30);

    // A page under the budget and under its limit has nothing more.
    let (_, body) = app.get_json(&format!("{base}?after_seq=28")).await;
    assert_eq!(seqs(&body), vec![29, 30]);
    assert_eq!(body["has_more"], false);
    assert_eq!(body["truncated"], false);

    // The inbox, in delivery order (priority, then seq), the same way.
    let inbox = format!("/api/projects/{project}/agents/b/inbox");
    let (inboxed, pages) = read_all_pages(&app, &format!("{inbox}?limit=1000"), BUDGET).await;
    let mut expected = everything.clone();
    expected.sort_by_key(|&seq| ((seq as usize) % 4, seq));
    assert_eq!(inboxed, expected, "delivery order, no gap, no duplicate");
    assert!(pages >= 4, "{pages} pages");
    let (code, body) = app.get_json(&format!("{inbox}?after_seq=3")).await;
    assert_eq!(
        (code, &body["code"]),
        (400, &json!("invalid_query")),
        "{body}"
    );
}

/// 20 sends from `sender`, each timed until `receiver` has it; sorted.
async fn deliveries(sender: &mut Agent, receiver: &mut Agent) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for n in 0..20 {
        let sent = std::time::Instant::now();
        sender
            .send_ok(crate::helpers::status(&format!("still here {n}")))
            .await;
        receiver.expect_op("message").await;
        latencies.push(sent.elapsed());
    }
    latencies.sort_unstable();
    latencies
}

#[tokio::test]
async fn twenty_concurrent_large_reads_do_not_take_the_broker_s_memory() {
    const MESSAGES: usize = 500;
    let (app, project, broker) = project_on_a_broker(&[]).await;
    let port = broker.port;
    let http = reqwest::Client::new();
    let publish = format!("http://127.0.0.1:{port}/api/projects/{project}/messages");
    let content = "y".repeat(60_000);
    for batch in 0..MESSAGES / 20 {
        let sends = (0..20).map(|n| {
            let (http, publish) = (http.clone(), publish.clone());
            let content = format!("{batch}.{n} {content}");
            async move {
                http.post(publish)
                    .json(
                        &json!({"sender_agent_id": "a", "sender_agent_type": "coder",
                                  "content": content}),
                    )
                    .send()
                    .await
                    .expect("POST")
                    .status()
            }
        });
        for status in join_all(sends).await {
            assert_eq!(status, 201);
        }
    }
    // Another project, whose deliveries go on meanwhile.
    let other: Value = http
        .post(format!("http://127.0.0.1:{port}/api/projects"))
        .json(&json!({"name": "bystander"}))
        .send()
        .await
        .expect("POST /api/projects")
        .json()
        .await
        .expect("JSON");
    let other = other["id"].as_str().expect("project id").to_owned();
    let ws = |agent: &str| {
        format!("ws://127.0.0.1:{port}/ws/agent/messages/{other}?agent_id={agent}&agent_type=coder")
    };
    let (mut sender, mut receiver) = (
        Agent::connect(&ws("a")).await,
        Agent::connect(&ws("b")).await,
    );
    let rss_before = status_kib(&broker, "VmRSS");
    let reads = (0..20).map(|_| {
        let http = http.clone();
        let url = format!("{publish}?limit=1000&after_seq=0");
        async move {
            let response = http.get(url).send().await.expect("GET");
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("JSON");
            (status, body)
        }
    });
    let idle = deliveries(&mut sender, &mut receiver).await;
    let (answers, busy) = tokio::join!(join_all(reads), deliveries(&mut sender, &mut receiver));
    // Figures for docs/SECURITY.md, not assertions: timings depend on the machine.
    eprintln!(
        "another project's send->delivery: p50 {:?} (max {:?}) idle, p50 {:?} (max {:?}) during the reads",
        idle[idle.len() / 2],
        idle[idle.len() - 1],
        busy[busy.len() / 2],
        busy[busy.len() - 1]
    );
    let peak_growth_mib = status_kib(&broker, "VmHWM").saturating_sub(rss_before) / 1024;
    eprintln!(
        "20 concurrent reads: RSS {} MiB before, peak +{peak_growth_mib} MiB",
        rss_before / 1024
    );
    assert!(
        peak_growth_mib < 150,
        "20 concurrent reads took the broker's memory up by {peak_growth_mib} MiB"
    );
    for (status, body) in answers {
        // Waiting for a turn is fine; a read refused after waiting says so.
        if status == 503 {
            assert_eq!(body["code"], "busy", "{body}");
            continue;
        }
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["truncated"], true);
        assert!(!seqs(&body).is_empty());
    }
    drop(app);
}

#[tokio::test]
async fn a_nul_in_a_query_or_path_parameter_is_a_400_without_database_text() {
    let app = TestApp::spawn().await;
    let project = app.create_project("nul").await;
    let p = format!("/api/projects/{project}");
    let cases = [
        ("GET", format!("{p}/messages?q=%00"), "invalid_query"),
        ("GET", format!("{p}/messages?type=%00"), "invalid_query"),
        ("GET", format!("{p}/messages?sender=a%00b"), "invalid_query"),
        (
            "GET",
            format!("{p}/messages?correlation_id=%00"),
            "invalid_query",
        ),
        ("GET", format!("{p}/agents?capability=%00"), "invalid_query"),
        ("GET", format!("{p}/agents/a%00b/inbox"), "invalid_field"),
        ("POST", format!("{p}/agents/a%00b/ack"), "invalid_field"),
    ];
    for (method, path, code) in cases {
        let request = match method {
            "GET" => app.http.get(app.url(&path)),
            _ => app.http.post(app.url(&path)).json(&json!({"up_to": 1})),
        };
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        assert_eq!(status, 400, "{method} {path}: {text}");
        let body: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(body["code"], code, "{method} {path}: {text}");
        for database_text in ["0x00", "UTF8", "invalid byte sequence", "postgres"] {
            assert!(
                !text.contains(database_text),
                "{method} {path} shows database text: {text}"
            );
        }
    }
}

#[tokio::test]
async fn every_response_forbids_content_sniffing() {
    let app = TestApp::spawn().await;
    let project = app.create_project("nosniff").await;
    for path in [
        "/".to_owned(),
        "/healthz".to_owned(),
        "/api/projects".to_owned(),
        format!("/api/projects/{project}/messages"),
        "/no/such/route".to_owned(),
        format!("/api/projects/{project}/messages?limit=0"),
    ] {
        let response = app.http.get(app.url(&path)).send().await.expect("GET");
        assert_eq!(
            response
                .headers()
                .get("x-content-type-options")
                .and_then(|v| v.to_str().ok()),
            Some("nosniff"),
            "GET {path} ({})",
            response.status()
        );
    }
    // Routes that check credentials before the body keep answering other methods 404.
    for path in [
        "/api/projects".to_owned(),
        format!("/api/projects/{project}/tokens"),
    ] {
        let response = app.http.put(app.url(&path)).send().await.expect("PUT");
        assert_eq!(response.status(), 404, "PUT {path}");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["code"], "not_found", "PUT {path}");
    }
}

#[tokio::test]
async fn a_500_names_its_request_id_and_never_shows_database_text() {
    let app = TestApp::spawn().await;
    let project = app.create_project("internal").await;
    // A database that no longer has what the broker expects: its queries fail with an error
    // that is neither the client's fault nor an outage.
    let mut conn = app.db().await;
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query("ALTER TABLE dead_letters RENAME TO dead_letters_elsewhere"),
        &mut conn,
    )
    .await
    .expect("rename a table");
    let response = app
        .http
        .get(app.url(&format!("/api/projects/{project}/dead-letters")))
        .header("X-Request-Id", "probe-500")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 500);
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("probe-500")
    );
    let text = response.text().await.expect("body");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(body["code"], "internal", "{text}");
    assert_eq!(body["request_id"], "probe-500", "{text}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("probe-500")),
        "{text}"
    );
    for database_text in ["dead_letters", "relation", "does not exist"] {
        assert!(!text.contains(database_text), "database text in: {text}");
    }
}
