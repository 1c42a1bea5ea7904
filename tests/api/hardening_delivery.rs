//! Bounds on what one client can make the delivery bookkeeping and the commit path do: acks
//! only count for what was delivered, the stored ack set is bounded, `up_to` has no overflow,
//! uncommitted sends have a broker-wide byte budget, and reply matching by correlation id
//! reads a bounded number of requests.

use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{eventually, status, Agent, TestApp};

fn seq(message: &Value) -> i64 {
    message["seq"].as_i64().expect("seq")
}

#[derive(QueryableByName)]
struct AckedAbove {
    #[diesel(sql_type = BigInt)]
    ack_floor: i64,
    #[diesel(sql_type = Array<BigInt>)]
    acked_above: Vec<i64>,
}

async fn cursor(conn: &mut AsyncPgConnection, project: Uuid, agent: &str) -> AckedAbove {
    diesel::sql_query(
        "SELECT ack_floor, acked_above FROM members WHERE project_id = $1 AND agent_id = $2",
    )
    .bind::<SqlUuid, _>(project)
    .bind::<Text, _>(agent)
    .get_result(conn)
    .await
    .expect("the member's cursor")
}

/// Stores `n` broadcasts from `sender` after the project's head, straight into the database
/// (faster than sending them), and moves the head past them.
async fn insert_broadcasts(conn: &mut AsyncPgConnection, project: Uuid, sender: &str, n: i64) {
    diesel::sql_query(
        "WITH p AS (SELECT head_seq FROM projects WHERE id = $1) \
         INSERT INTO agent_messages (project_id, seq, sender_agent_id, sender_agent_type, message_type, content) \
         SELECT $1, p.head_seq + g, $2, 'coder', 'status', 'bulk ' || g FROM p, generate_series(1, $3) AS g",
    )
    .bind::<SqlUuid, _>(project)
    .bind::<Text, _>(sender)
    .bind::<BigInt, _>(n)
    .execute(conn)
    .await
    .expect("insert messages");
    diesel::sql_query("UPDATE projects SET head_seq = head_seq + $2 WHERE id = $1")
        .bind::<SqlUuid, _>(project)
        .bind::<BigInt, _>(n)
        .execute(conn)
        .await
        .expect("move the head");
}

#[tokio::test]
async fn acks_for_seqs_never_delivered_are_refused_and_those_messages_still_arrive() {
    let app = TestApp::spawn().await;
    let project = app.create_project("early-acks").await;
    let manual = app.ws_url(project, "agent_id=b&agent_type=coder&ack=manual");
    let mut b = Agent::connect(&manual).await;

    // Over the socket: seqs 2 and 3 do not exist yet.
    b.send(json!({"op": "ack", "seqs": [3, 2]})).await;
    let warning = b.expect_error("ack_ignored").await;
    assert_eq!(warning["seqs"], json!([2, 3]), "{warning}");
    // Over REST: not stored yet either.
    let ack = format!("/api/projects/{project}/agents/b/ack");
    let (code, body) = app.post_json(&ack, &json!({"seqs": [2, 3]})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["ignored"], json!([2, 3]), "{body}");
    assert_eq!(body["ack_floor"], 0);
    b.close().await;

    let mut a = app.connect(project, "a", "coder").await;
    for n in 1..=3 {
        a.send_ok(status(&format!("m{n}"))).await;
    }
    // A direct message to someone else is not b's to acknowledge.
    let for_c = a.send_ok(json!({"content": "for c", "to": "c"})).await;
    a.expect_error("no_recipient").await;
    let (_, body) = app
        .post_json(&ack, &json!({"seqs": [seq(&for_c), 1, 99]}))
        .await;
    assert_eq!(body["ignored"], json!([seq(&for_c), 99]), "{body}");
    assert_eq!(
        body["ack_floor"], 1,
        "seq 1 was b's and is stored: acknowledged"
    );

    let mut db = app.db().await;
    assert_eq!(
        cursor(&mut db, project, "b").await.acked_above,
        Vec::<i64>::new()
    );
    // At-least-once kept: 2 and 3 are still owed and delivered.
    let mut b = Agent::connect(&manual).await;
    assert_eq!(b.welcome["replay"], 2, "{}", b.welcome);
    let got = [
        seq(&b.expect_op("message").await),
        seq(&b.expect_op("message").await),
    ];
    assert_eq!(got, [2, 3]);
    // Delivered now: acknowledging them counts, and nothing is reported back; a second ack
    // of the same seq is reported as not awaiting one.
    b.send(json!({"op": "ack", "seqs": [2, 3]})).await;
    b.send(json!({"op": "ack", "seqs": [3]})).await;
    assert_eq!(b.expect_error("ack_ignored").await["seqs"], json!([3]));
    eventually("b's floor to pass the acknowledged seqs", || async {
        let row = app.member(project, "b").await?;
        (row["ack_floor"] == 4 && row["queue_depth"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_stored_ack_set_is_bounded_and_forgets_only_the_highest() {
    let app = TestApp::spawn().await;
    let project = app.create_project("ack-set").await;
    let b = app.connect(project, "b", "coder").await;
    b.close().await;
    let mut db = app.db().await;
    insert_broadcasts(&mut db, project, "a", 12_001).await;

    // Seq 1 is never acknowledged; 2..=12001 are, in two REST calls (10 000 per call at most); the broker keeps the lowest 1 000.
    let ack = format!("/api/projects/{project}/agents/b/ack");
    for range in [2..=10_001_i64, 10_002..=12_001] {
        let seqs: Vec<i64> = range.collect();
        let (code, body) = app.post_json(&ack, &json!({ "seqs": seqs })).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["ignored"], json!([]));
        assert_eq!(body["ack_floor"], 0, "seq 1 is still owed");
    }
    let stored = cursor(&mut db, project, "b").await;
    assert_eq!(stored.acked_above.len(), 1_000, "bounded");
    assert_eq!(stored.acked_above[0], 2);
    assert_eq!(
        stored.acked_above.last(),
        Some(&1_001),
        "the lowest are kept"
    );

    // The forgotten ones are owed again, never lost: once 1 is acknowledged the floor moves
    // over everything remembered and stops before the first forgotten seq.
    let (_, body) = app.post_json(&ack, &json!({"seqs": [1]})).await;
    assert_eq!(body["ack_floor"], 1_001, "{body}");
    let (_, inbox) = app
        .get_json(&format!("/api/projects/{project}/agents/b/inbox?limit=1"))
        .await;
    assert_eq!(seq(&inbox["messages"][0]), 1_002);
    let stored = cursor(&mut db, project, "b").await;
    assert_eq!((stored.ack_floor, stored.acked_above.len()), (1_001, 0));
    // Acknowledging everything at once moves the floor over all of it.
    let seqs: Vec<i64> = (1_002..=11_001).collect();
    let (_, body) = app.post_json(&ack, &json!({ "seqs": seqs })).await;
    assert_eq!(body["ack_floor"], 11_001, "{body}");
}

#[tokio::test]
async fn up_to_at_the_top_of_the_seq_range_acknowledges_everything_given_over_both_paths() {
    let app = TestApp::spawn().await;
    let project = app.create_project("up-to-max").await;
    let manual = app.ws_url(project, "agent_id=b&agent_type=coder&ack=manual");
    let mut b = Agent::connect(&manual).await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut floor = 0;
    for up_to in [i64::MAX, i64::MAX - 1] {
        for n in 1..=3 {
            a.send_ok(status(&format!("m{n}"))).await;
        }
        for _ in 0..3 {
            b.expect_op("message").await;
        }
        b.send(json!({"op": "ack", "up_to": up_to})).await;
        floor += 3;
        eventually("the socket's up_to to be recorded", || async {
            let row = app.member(project, "b").await?;
            (row["ack_floor"] == floor).then_some(())
        })
        .await;
    }
    b.close().await;
    // The same over REST: everything owed up to the head.
    let ack = format!("/api/projects/{project}/agents/b/ack");
    for up_to in [i64::MAX, i64::MAX - 1] {
        for n in 1..=2 {
            a.send_ok(status(&format!("r{n}"))).await;
        }
        let (code, body) = app.post_json(&ack, &json!({ "up_to": up_to })).await;
        floor += 2;
        assert_eq!(
            (code, body["ack_floor"].as_i64()),
            (200, Some(floor)),
            "{body}"
        );
    }
    let b = Agent::connect(&manual).await;
    assert_eq!(b.welcome["replay"], 0);
}

#[tokio::test]
async fn sends_beyond_the_uncommitted_byte_budget_are_refused_until_the_database_catches_up() {
    // Each send below holds a little over 10 000 bytes: two fit, a third does not.
    let app = TestApp::spawn_with(|s| s.max_uncommitted_bytes = 25_000).await;
    let project = app.create_project("budget").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;
    let content = "x".repeat(10_000);
    let send = |n: usize| json!({"content": content, "client_msg_id": format!("m{n}")});

    // The commit path stalls: another transaction holds the message table.
    let mut lock = app.db().await;
    lock.batch_execute("BEGIN; LOCK TABLE agent_messages IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the message table");
    for n in 0..20 {
        a.send(send(n)).await;
    }
    let mut refused = Vec::new();
    for _ in 2..20 {
        let error = a.expect_error("unavailable").await;
        assert!(
            error["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
            "{error}"
        );
        refused.push(
            error["client_msg_id"]
                .as_str()
                .expect("client_msg_id")
                .to_owned(),
        );
    }
    let expected: Vec<String> = (2..20).map(|n| format!("m{n}")).collect();
    assert_eq!(
        refused, expected,
        "the first two were accepted, the rest refused"
    );
    // REST publishes share the budget: 503 with Retry-After.
    let response = app
        .http
        .post(app.url(&format!("/api/projects/{project}/messages")))
        .json(&json!({"sender_agent_id": "ci", "sender_agent_type": "ci", "content": content, "client_msg_id": "rest"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["code"], "unavailable", "{body}");

    lock.batch_execute("ROLLBACK").await.expect("unlock");
    // What was accepted is committed and acknowledged.
    let first = a.expect_op("sent").await;
    let second = a.expect_op("sent").await;
    assert_eq!(
        (first["client_msg_id"].as_str(), seq(&first)),
        (Some("m0"), 1)
    );
    assert_eq!(
        (second["client_msg_id"].as_str(), seq(&second)),
        (Some("m1"), 2)
    );
    // Retrying later succeeds.
    for n in 2..20 {
        assert_eq!(seq(&a.send_ok(send(n)).await), n as i64 + 1);
    }
    let (code, body) = app
        .post_json(
            &format!("/api/projects/{project}/messages"),
            &json!({"sender_agent_id": "ci", "sender_agent_type": "ci", "content": "later", "client_msg_id": "rest"}),
        )
        .await;
    assert_eq!((code, body["seq"].as_i64()), (201, Some(21)), "{body}");
    for n in 1..=21 {
        assert_eq!(seq(&b.expect_op("message").await), n);
    }
    #[derive(QueryableByName)]
    struct Seqs {
        #[diesel(sql_type = Array<BigInt>)]
        seqs: Vec<i64>,
    }
    let mut db = app.db().await;
    let stored: Seqs = diesel::sql_query(
        "SELECT array_agg(seq ORDER BY seq) AS seqs FROM agent_messages WHERE project_id = $1",
    )
    .bind::<SqlUuid, _>(project)
    .get_result(&mut db)
    .await
    .expect("stored seqs");
    assert_eq!(
        stored.seqs,
        (1..=21).collect::<Vec<i64>>(),
        "dense, nothing extra"
    );
}

#[derive(QueryableByName)]
struct IndexUse {
    #[diesel(sql_type = BigInt)]
    idx_scan: i64,
    #[diesel(sql_type = BigInt)]
    idx_tup_read: i64,
}

async fn correlation_index_use(conn: &mut AsyncPgConnection) -> Option<IndexUse> {
    diesel::sql_query(
        "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes \
         WHERE indexrelname = 'idx_agent_messages_request_correlation'",
    )
    .get_result(conn)
    .await
    .ok()
}

#[tokio::test]
async fn a_reply_by_a_shared_correlation_id_reads_a_bounded_number_of_requests() {
    let app = TestApp::spawn().await;
    let project = app.create_project("shared-correlation").await;
    let mut coord = app.connect(project, "coord", "coordinator").await;
    let mut worker = app.connect(project, "worker", "codegen").await;
    // 5 000 requests of other agents, all with the same correlation id.
    let mut db = app.db().await;
    diesel::sql_query(
        "INSERT INTO agent_messages (project_id, seq, sender_agent_id, sender_agent_type, message_type, \
           content, correlation_id, expects_reply, reply_deadline, recipient_agent_id) \
         SELECT $1, g, 'asker-' || (g % 50), 'coder', 'request', 'q ' || g, 'shared', true, \
           now() + interval '1 day', 'nobody' FROM generate_series(1, 5000) AS g",
    )
    .bind::<SqlUuid, _>(project)
    .execute(&mut db)
    .await
    .expect("insert requests");
    // Then 20 000 newer messages that are not requests, some carrying the same id: reading
    // the project's messages newest first until enough requests turn up would read them all.
    diesel::sql_query(
        "INSERT INTO agent_messages (project_id, seq, sender_agent_id, sender_agent_type, message_type, \
           content, correlation_id) \
         SELECT $1, g, 'chatter', 'coder', 'status', 's ' || g, \
           CASE WHEN g % 2 = 0 THEN 'shared' ELSE 'c-' || g END \
         FROM generate_series(5001, 25000) AS g",
    )
    .bind::<SqlUuid, _>(project)
    .execute(&mut db)
    .await
    .expect("insert messages");
    db.batch_execute(&format!(
        "UPDATE projects SET head_seq = 25000 WHERE id = '{project}'; ANALYZE agent_messages"
    ))
    .await
    .expect("head and statistics");

    let request = coord
        .send_ok(
            json!({"content": "build it", "to": "worker", "expects_reply": true,
                        "correlation_id": "shared"}),
        )
        .await;
    assert_eq!(seq(&request), 25001);
    assert_eq!(worker.expect_op("message").await["seq"], 25001);
    // The worker's own, newer request with the same id is not the one it answers.
    worker
        .send_ok(
            json!({"content": "which branch?", "to": "coord", "expects_reply": true,
                        "correlation_id": "shared"}),
        )
        .await;
    assert_eq!(coord.expect_op("message").await["seq"], 25002);
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }
    let plan: Vec<Line> = diesel::sql_query(format!(
        "EXPLAIN SELECT r.id FROM unnest(ARRAY['{project}']::uuid[], ARRAY['shared']::text[]) \
           AS k(project_id, correlation_id) \
         CROSS JOIN LATERAL (SELECT a.id FROM agent_messages a \
           WHERE a.expects_reply AND a.project_id = k.project_id \
             AND a.correlation_id = k.correlation_id ORDER BY a.seq DESC LIMIT 16) AS r"
    ))
    .load(&mut db)
    .await
    .expect("explain");
    let plan: Vec<String> = plan.into_iter().map(|l| l.line).collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("idx_agent_messages_request_correlation") && plan.contains("Limit"),
        "the lookup by correlation id is a bounded index scan:\n{plan}"
    );
    let before = correlation_index_use(&mut db)
        .await
        .expect("the index exists");
    let reply = worker
        .send_ok(json!({"type": "result_report", "content": "done", "correlation_id": "shared"}))
        .await;
    let got = coord.expect_op("message").await;
    assert_eq!(got["id"], reply["id"]);
    assert_eq!(got["reply_to"], request["id"], "{got}");
    assert_eq!(got["in_reply_to_seq"], 25001);
    assert_eq!(got["to"], "coord");

    // The match read the index, and only a few entries of it, not the 5 000 that share the id.
    let after = eventually(
        "the reply's index scan to show in the statistics",
        || async {
            let mut db = app.db().await;
            correlation_index_use(&mut db)
                .await
                .filter(|now| now.idx_scan > before.idx_scan)
        },
    )
    .await;
    let read = after.idx_tup_read - before.idx_tup_read;
    assert!(read <= 100, "{read} index entries read for one match");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn a_stalled_database_does_not_let_pending_sends_fill_the_broker_s_memory() {
    let app = TestApp::spawn().await;
    let project = app.create_project("stall").await;
    app.stop();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"));
    command
        .args(["serve", "--bind", "127.0.0.1:0", "--workers", "2"])
        .args(["--max-uncommitted-bytes", "16777216"])
        .args(["--rate-per-session", "0", "--rate-per-project", "0"])
        .env("DATABASE_URL", &app.database_url)
        .env("RUST_LOG", "info");
    let broker = crate::crash::BrokerProcess::spawn(command);
    let pid = broker.child.id();
    let url = |agent: &str| {
        format!(
            "ws://127.0.0.1:{}/ws/agent/messages/{project}?agent_id={agent}",
            broker.port
        )
    };
    const CONNECTIONS: usize = 4;
    const SENDS: usize = 1_000;
    let mut agents = Vec::new();
    for n in 0..CONNECTIONS {
        agents.push(Agent::connect(&url(&format!("p{n}"))).await);
    }
    let rss_before = rss_kib(pid);

    // 4 connections × 1 000 sends × 60 KB (about 240 MB) while the message table is locked,
    // with a 16 MiB budget: without it the broker held them all (232 MiB more).
    let mut lock = app.db().await;
    lock.batch_execute("BEGIN; LOCK TABLE agent_messages IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the message table");
    let content = "y".repeat(60_000);
    let mut refused = [0usize; CONNECTIONS];
    let mut peak = rss_before;
    for agent in agents.iter_mut() {
        for i in 0..SENDS {
            agent
                .send(json!({"content": content, "client_msg_id": format!("s{i}")}))
                .await;
            if i % 100 == 0 {
                peak = peak.max(rss_kib(pid));
            }
        }
    }
    // Count the refusals: everything not taken is refused at once, so the frames that come
    // back before the lock is released are exactly the refusals.
    for (n, agent) in agents.iter_mut().enumerate() {
        loop {
            let frame = agent.next_json().await;
            assert_eq!(frame["code"], "unavailable", "{frame}");
            refused[n] += 1;
            peak = peak.max(rss_kib(pid));
            // The refusals of one connection are contiguous from the first send over the
            // budget to its last send.
            if frame["client_msg_id"] == format!("s{}", SENDS - 1) {
                break;
            }
        }
    }
    let grown_mib = peak.saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 100,
        "the broker grew by {grown_mib} MiB while sends waited for a locked table"
    );
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    // What was taken commits, and its receipts arrive.
    let mut taken = 0;
    for (n, agent) in agents.iter_mut().enumerate() {
        for _ in 0..SENDS - refused[n] {
            assert_eq!(agent.expect_op("sent").await["op"], "sent");
            taken += 1;
        }
    }
    assert!(taken > 0 && refused.iter().sum::<usize>() > 0);
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
        #[diesel(sql_type = BigInt)]
        head: i64,
    }
    let mut db = app.db().await;
    let stored: Count = diesel::sql_query(
        "SELECT count(*) AS n, coalesce(max(seq), 0) AS head FROM agent_messages WHERE project_id = $1",
    )
    .bind::<SqlUuid, _>(project)
    .get_result(&mut db)
    .await
    .expect("count");
    assert_eq!(
        (stored.n, stored.head),
        (taken as i64, taken as i64),
        "dense"
    );
}
