//! Offline agents lose nothing: replay on connect, ack modes, TTL, read receipts, inboxes.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::helpers::{eventually, status, Agent, TestApp};

fn seq(frame: &Value) -> i64 {
    frame["seq"].as_i64().expect("seq")
}

/// Receives `n` message frames (failing on anything else).
async fn messages(agent: &mut Agent, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(agent.expect_op("message").await);
    }
    out
}

#[tokio::test]
async fn a_returning_agent_gets_what_it_missed_by_priority_then_live_with_no_gap() {
    let app = TestApp::spawn().await;
    let project = app.create_project("offline").await;
    let mut a = app.connect(project, "a", "coordinator").await;
    let b = app.connect(project, "b", "coder").await;
    let mut c = app.connect(project, "c", "coder").await;
    b.close().await;
    eventually("b to be offline", || async {
        let b = app.member(project, "b").await?;
        (b["online"] == false).then_some(())
    })
    .await;

    // 50 messages while b is away: broadcasts and direct ones (to b and to c), every
    // priority, a few that expire at once.
    let mut owed: Vec<(i64, i64)> = Vec::new(); // (priority, seq)
    for n in 0..50i64 {
        let priority = (n * 7) % 4;
        let mut frame = json!({"type": "status", "content": format!("m{n}"), "priority": priority});
        let to_b = n % 3 == 0;
        let to_c = !to_b && n % 10 == 1;
        if to_b {
            frame["to"] = json!("b");
        } else if to_c {
            frame["to"] = json!("c");
        }
        let expires = n % 9 == 4;
        if expires {
            frame["ttl_ms"] = json!(1);
        }
        let receipt = a.send_ok(frame).await;
        if !to_c && !expires {
            owed.push((priority, seq(&receipt)));
        }
    }
    owed.sort();
    let head = 50;

    // b comes back while a keeps talking.
    let mut b = app.connect(project, "b", "coder").await;
    assert_eq!(b.welcome["head_seq"].as_i64(), Some(head));
    let by_priority: Vec<i64> = (0..4)
        .map(|p| owed.iter().filter(|(q, _)| *q == p).count() as i64)
        .collect();
    let sender = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for n in 0..20 {
            seqs.push(seq(&a.send_ok(status(&format!("live {n}"))).await));
        }
        seqs
    });

    let announced = b.welcome["replay"].as_u64().unwrap_or(0) as usize;
    let replayed = messages(&mut b, announced).await;
    let got: Vec<(i64, i64)> = replayed
        .iter()
        .map(|m| (m["priority"].as_i64().unwrap_or(-1), seq(m)))
        .collect();
    assert_eq!(
        got, owed,
        "the backlog arrives priority first, then by seq, each once: {replayed:?}"
    );
    assert_eq!(b.welcome["replay"].as_i64(), Some(owed.len() as i64));
    assert_eq!(b.welcome["replay_by_priority"], json!(by_priority));

    let live_seqs = sender.await.expect("sender");
    let live = messages(&mut b, live_seqs.len()).await;
    assert_eq!(
        live.iter().map(seq).collect::<Vec<_>>(),
        live_seqs,
        "then live, in seq order, no gap"
    );

    // Nothing else is owed: a new message is the very next frame.
    c.send_ok(status("after")).await;
    assert_eq!(b.expect_op("message").await["content"], "after");
    let (_, agents) = app
        .get_json(&format!("/api/projects/{project}/agents"))
        .await;
    let b_row = agents["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["agent_id"] == "b"))
        .cloned();
    let b_row = b_row.expect("b is listed");
    assert_eq!(b_row["online"], true);
    assert_eq!(b_row["agent_type"], "coder");
}

#[tokio::test]
async fn a_direct_message_waits_for_an_agent_that_never_connected() {
    let app = TestApp::spawn().await;
    let project = app.create_project("newcomer").await;
    let mut a = app.connect(project, "a", "coordinator").await;
    a.send_ok(status("before anyone knew newbie")).await;
    let direct = a
        .send_ok(json!({"type": "task_assignment", "content": "welcome aboard", "to": "newbie"}))
        .await;
    // Stored and owed to newbie, but the sender hears that no such agent has connected yet.
    let warning = a.expect_error("no_recipient").await;
    assert!(warning["error"]
        .as_str()
        .is_some_and(|e| e.contains("newbie")));
    a.send_ok(status("a broadcast before newbie arrives")).await;

    let (_, inbox) = app
        .get_json(&format!("/api/projects/{project}/agents/newbie/inbox"))
        .await;
    assert_eq!(inbox["messages"].as_array().map(Vec::len), Some(1));

    let mut newbie = app.connect(project, "newbie", "coder").await;
    assert_eq!(
        newbie.welcome["replay"], 1,
        "only the direct message: broadcasts start at the head"
    );
    let got = newbie.expect_op("message").await;
    assert_eq!(got["id"], direct["id"]);
    a.send_ok(status("hello newbie")).await;
    assert_eq!(newbie.expect_op("message").await["content"], "hello newbie");
}

#[tokio::test]
async fn manual_ack_redelivers_what_was_not_acknowledged_and_respects_the_window() {
    let app = TestApp::spawn_with(|s| s.max_in_flight = 3).await;
    let project = app.create_project("manual").await;
    let manual = |app: &TestApp| app.ws_url(project, "agent_id=b&agent_type=coder&ack=manual");
    let b = Agent::connect(&manual(&app)).await;
    assert_eq!(b.welcome["ack"], "manual");
    b.close().await;
    let mut a = app.connect(project, "a", "coder").await;
    for n in 1..=5 {
        a.send_ok(status(&format!("m{n}"))).await;
    }

    // Delivered, never acknowledged: delivered again on the next connection.
    let mut b = Agent::connect(&manual(&app)).await;
    assert_eq!(b.welcome["replay"], 5);
    let first: Vec<i64> = messages(&mut b, 3).await.iter().map(seq).collect();
    assert_eq!(first, [1, 2, 3]);
    // The window is full: the next frame is the answer to this bad ack, not a 4th message.
    b.send(json!({"op": "ack"})).await;
    b.expect_error("missing_field").await;
    b.send(json!({"op": "ack", "seqs": [2]})).await;
    assert_eq!(seq(&b.expect_op("message").await), 4);
    // Progress is recorded asynchronously: wait for it before reconnecting.
    eventually("the ack of seq 2 to be recorded", || async {
        let row = app.member(project, "b").await?;
        (row["queue_depth"] == 4).then_some(())
    })
    .await;
    b.close().await;

    let mut b = Agent::connect(&manual(&app)).await;
    assert_eq!(b.welcome["replay"], 4, "all but the acknowledged seq 2");
    let got: Vec<i64> = messages(&mut b, 3).await.iter().map(seq).collect();
    assert_eq!(got, [1, 3, 4]);
    // Out of order, then a range.
    b.send(json!({"op": "ack", "seqs": [4, 1]})).await;
    assert_eq!(seq(&b.expect_op("message").await), 5);
    b.send(json!({"op": "ack", "up_to": 5})).await;
    // Recorded: the floor reaches 5.
    eventually("b's ack floor to reach 5", || async {
        let row = app.member(project, "b").await?;
        (row["ack_floor"] == 5 && row["queue_depth"] == 0).then_some(())
    })
    .await;
    b.close().await;
    let mut b = Agent::connect(&manual(&app)).await;
    assert_eq!(b.welcome["replay"], 0);
    assert_eq!(b.welcome["ack_floor"], 5);
    a.send_ok(status("m6")).await;
    assert_eq!(seq(&b.expect_op("message").await), 6);
}

#[tokio::test]
async fn since_replays_the_visible_history() {
    let app = TestApp::spawn().await;
    let project = app.create_project("since").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;
    for n in 1..=4 {
        a.send_ok(status(&format!("m{n}"))).await;
    }
    a.send_ok(json!({"content": "for c only", "to": "c"})).await;
    messages(&mut b, 4).await;
    b.close().await;

    let mut b = Agent::connect(&app.ws_url(project, "agent_id=b&since=0")).await;
    assert_eq!(
        b.welcome["replay"], 4,
        "everything visible to b, already delivered or not"
    );
    let got: Vec<i64> = messages(&mut b, 4).await.iter().map(seq).collect();
    assert_eq!(got, [1, 2, 3, 4]);
    let mut b2 = Agent::connect(&app.ws_url(project, "agent_id=b&since=2")).await;
    assert_eq!(b2.welcome["replay"], 2);
    assert_eq!(seq(&b2.expect_op("message").await), 3);
}

#[tokio::test]
async fn expired_messages_are_never_delivered() {
    let app = TestApp::spawn().await;
    let project = app.create_project("ttl").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;
    // Expires before the channel routes it.
    a.send_ok(json!({"content": "too late", "ttl_ms": 1})).await;
    a.send_ok(json!({"content": "in time", "ttl_ms": 600_000}))
        .await;
    let got = b.expect_op("message").await;
    assert_eq!(got["content"], "in time");
    assert!(got["expires_at"].is_string());

    // Nor replayed: z never connected; its expired direct message is not owed to it.
    a.send_ok(json!({"content": "expired for z", "ttl_ms": 1, "to": "z"}))
        .await;
    a.expect_error("no_recipient").await;
    a.send_ok(json!({"content": "alive for z", "to": "z"}))
        .await;
    a.expect_error("no_recipient").await;
    let (_, body) = app
        .get_json(&format!("/api/projects/{project}/agents/z/inbox"))
        .await;
    let contents: Vec<&str> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(contents, ["alive for z"]);
    let z = app.connect(project, "z", "coder").await;
    assert_eq!(z.welcome["replay"], 1);
}

#[tokio::test]
async fn read_receipts_and_rest_inboxes_follow_the_websocket_rules() {
    let app = TestApp::spawn().await;
    let project = app.create_project("inbox").await;
    let mut a = app.connect(project, "a", "coder").await;
    let b = app.connect(project, "b", "coder").await;
    b.close().await;
    let mut ids = Vec::new();
    for (n, priority) in [(1, 3), (2, 0), (3, 2)] {
        let r = a
            .send_ok(json!({"content": format!("m{n}"), "priority": priority, "to": "b"}))
            .await;
        ids.push(r["id"].as_str().expect("id").to_owned());
    }
    a.send_ok(json!({"content": "for c", "to": "c"})).await;

    let inbox = format!("/api/projects/{project}/agents/b/inbox");
    let (code, body) = app.get_json(&inbox).await;
    assert_eq!(code, 200);
    let seqs: Vec<i64> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(seq)
        .collect();
    assert_eq!(seqs, [2, 3, 1], "priority order, as a socket would replay");

    let ack = format!("/api/projects/{project}/agents/b/ack");
    let (code, body) = app.post_json(&ack, &json!({"seqs": [2]})).await;
    assert_eq!(code, 200);
    assert_eq!(body["ack_floor"], 0, "seq 1 is still owed");
    let (_, body) = app.get_json(&inbox).await;
    assert_eq!(
        body["messages"]
            .as_array()
            .map(|m| m.iter().map(seq).collect::<Vec<_>>()),
        Some(vec![3, 1])
    );
    let (_, body) = app.post_json(&ack, &json!({"up_to": 3})).await;
    assert_eq!(
        body["ack_floor"], 4,
        "seq 4 is c's: not owed to b, so the floor passes it"
    );
    // Acknowledged over REST with up_to: delivered.
    let (_, history) = app
        .get_json(&format!(
            "/api/projects/{project}/messages?limit=3&after_seq=0"
        ))
        .await;
    assert!(history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .all(|m| m["delivered_at"].is_string()));
    let (_, body) = app.get_json(&inbox).await;
    assert_eq!(body["messages"], json!([]));
    let (code, _) = app.post_json(&ack, &json!({})).await;
    assert_eq!(code, 400);
    let (code, _) = app
        .post_json(
            &format!("/api/projects/{project}/agents/nobody/ack"),
            &json!({"up_to": 1}),
        )
        .await;
    assert_eq!(code, 404);

    // Read receipts: over the socket, and over REST; only the recipient's count.
    let mut b = app.connect(project, "b", "coder").await;
    b.send(json!({"op": "read", "ids": [ids[0]]})).await;
    let (code, body) = app
        .post_json(
            &format!("/api/projects/{project}/messages/{}/read", ids[1]),
            &json!({"agent_id": "b"}),
        )
        .await;
    assert_eq!((code, body["marked"].as_bool()), (200, Some(true)));
    let (_, body) = app
        .post_json(
            &format!("/api/projects/{project}/messages/{}/read", ids[2]),
            &json!({"agent_id": "c"}),
        )
        .await;
    assert_eq!(
        body["marked"], false,
        "c is not the recipient of b's message"
    );
    eventually("read_at to be recorded", || async {
        let (_, body) = app
            .get_json(&format!("/api/projects/{project}/messages?limit=10"))
            .await;
        let m = body["messages"].as_array()?.clone();
        let read: Vec<bool> = m.iter().map(|m| m["read_at"].is_string()).collect();
        (read == [true, true, false, false]).then_some(())
    })
    .await;
    b.send_ok(status("still fine")).await;
}

#[tokio::test]
async fn a_consumer_that_stops_reading_slows_nobody_and_recovers_everything() {
    const TOTAL: usize = 10_000;
    let app = TestApp::spawn_with(|s| {
        s.outbox_max_frames = 512;
        s.client_timeout_ms = 120_000;
    })
    .await;
    let project = app.create_project("slow").await;
    let mut fast = app.connect(project, "fast", "coder").await;
    // Connected, welcomed, then never read again.
    let slow = Agent::connect_raw(&app.ws_url(project, "agent_id=slow"))
        .await
        .expect("connect");
    let mut a = app.connect(project, "a", "coder").await;

    let sender = tokio::spawn(async move {
        let payload = "x".repeat(200);
        // Pipelined in windows of 500 sends, well under the pending-send bound.
        for window in 0..TOTAL / 500 {
            for n in 0..500 {
                a.send(json!({"content": format!("{} {payload}", window * 500 + n)}))
                    .await;
            }
            for _ in 0..500 {
                a.expect_op("sent").await;
            }
        }
    });
    let mut seen = HashSet::new();
    while seen.len() < TOTAL {
        let m = fast.expect_op("message").await;
        assert!(seen.insert(seq(&m)), "no duplicate");
    }
    sender.await.expect("sender");

    // The slow consumer was cut off: what the broker keeps for it is bounded.
    eventually("the slow consumer to be disconnected", || async {
        let row = app.member(project, "slow").await?;
        (row["online"] == false).then_some(())
    })
    .await;
    drop(slow);
    // It never confirmed receiving anything (it never read, so never answered a ping): all
    // of it is owed, and it gets all of it when it comes back.
    let mut slow = app.connect(project, "slow", "agent").await;
    assert_eq!(slow.welcome["replay"].as_i64(), Some(TOTAL as i64));
    let mut got = HashSet::new();
    while got.len() < TOTAL {
        let m = slow.expect_op("message").await;
        assert!(got.insert(seq(&m)), "no duplicate in the replay");
    }
    assert_eq!(got, seen);
}

#[tokio::test]
async fn a_manual_consumer_that_falls_behind_drains_from_the_store() {
    const TOTAL: i64 = 2_000;
    let app = TestApp::spawn_with(|s| s.max_in_flight = 50).await;
    let project = app.create_project("drain").await;
    let mut b = Agent::connect(&app.ws_url(project, "agent_id=b&ack=manual")).await;
    let mut a = app.connect(project, "a", "coder").await;
    for window in 0..TOTAL / 500 {
        for n in 0..500 {
            a.send(json!({"content": format!("{}", window * 500 + n)}))
                .await;
        }
        for _ in 0..500 {
            a.expect_op("sent").await;
        }
    }
    // Everything is committed; b has at most its window in flight and the rest waits in the
    // store. Acknowledging as it goes, it gets every message once, in seq order.
    let mut expected = 1;
    while expected <= TOTAL {
        let m = b.expect_op("message").await;
        assert_eq!(seq(&m), expected);
        b.send(json!({"op": "ack", "seqs": [expected]})).await;
        expected += 1;
    }
    a.send_ok(status("live again")).await;
    assert_eq!(b.expect_op("message").await["content"], "live again");
}

#[tokio::test]
async fn up_to_acknowledges_only_what_the_session_delivered() {
    let app = TestApp::spawn_with(|s| s.max_in_flight = 1).await;
    let project = app.create_project("up-to").await;
    let url = app.ws_url(project, "agent_id=b&ack=manual");
    Agent::connect(&url).await.close().await;
    let mut a = app.connect(project, "a", "coder").await;
    a.send_ok(json!({"content": "low 1", "priority": 3})).await;
    a.send_ok(json!({"content": "low 2", "priority": 3})).await;
    let urgent = a.send_ok(json!({"content": "urgent", "priority": 0})).await;

    let mut b = Agent::connect(&url).await;
    let first = b.expect_op("message").await;
    assert_eq!(first["id"], urgent["id"], "priority first");
    // "Everything up to seq 3" — but seqs 1 and 2 have not been delivered yet.
    b.send(json!({"op": "ack", "up_to": 3})).await;
    assert_eq!(b.expect_op("message").await["content"], "low 1");
    eventually("the ack to be recorded", || async {
        let row = app.member(project, "b").await?;
        (row["queue_depth"] == 2).then_some(())
    })
    .await;
    b.close().await;
    let b = Agent::connect(&url).await;
    assert_eq!(b.welcome["replay"], 2, "low 1 and low 2 are still owed");
}

#[tokio::test]
async fn a_backlog_of_large_messages_is_paced_not_refused() {
    const COUNT: usize = 40;
    let app = TestApp::spawn_with(|s| s.outbox_max_bytes = 256 * 1024).await;
    let project = app.create_project("large").await;
    Agent::connect(&app.ws_url(project, "agent_id=b"))
        .await
        .close()
        .await;
    let mut a = app.connect(project, "a", "coder").await;
    let big = "y".repeat(30 * 1024);
    for n in 0..COUNT {
        a.send_ok(json!({"content": format!("{n} {big}")})).await;
    }
    // 40 × 30 KiB is far more than the outbox holds: the replay must pace itself.
    let mut b = app.connect(project, "b", "coder").await;
    assert_eq!(b.welcome["replay"], COUNT);
    let got = messages(&mut b, COUNT).await;
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        (1..=COUNT as i64).collect::<Vec<_>>()
    );
}

/// An acknowledgement covers only what the agent could have received: a broadcast committed
/// before its first connection is not owed to it, so its ack does not mark it delivered.
#[tokio::test]
async fn an_ack_does_not_deliver_broadcasts_from_before_the_first_connection() {
    let app = TestApp::spawn().await;
    let project = app.create_project("visibility").await;
    let mut a = app.connect(project, "a", "coder").await;
    // c is a member (a direct message names it) but has never connected.
    a.send_ok(json!({"content": "for c", "to": "c"})).await;
    assert_eq!(a.expect_op("error").await["code"], "no_recipient");
    a.send_ok(status("a broadcast c was never owed")).await;
    let (code, body) = app
        .post_json(
            &format!("/api/projects/{project}/agents/c/ack"),
            &json!({"up_to": 2}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (_, history) = app
        .get_json(&format!("/api/projects/{project}/messages?after_seq=0"))
        .await;
    let delivered: Vec<(i64, bool)> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (seq(m), m["delivered_at"].is_string()))
        .collect();
    assert_eq!(delivered, [(1, true), (2, false)]);
}

/// The hand-over from the store to live delivery, many times over. With a window of one, each
/// round leaves the session catching up from the store with exactly one message read (a full
/// page, so the range is not known to be exhausted); then the ack of that message, which reads
/// the last (empty) page, races a new message. However they interleave, the new message must be
/// delivered: from the store if it was committed while the last page was being read, live
/// otherwise.
#[tokio::test]
async fn a_message_that_arrives_while_the_catch_up_ends_is_not_lost() {
    const ROUNDS: usize = 100;
    let app = TestApp::spawn_with(|s| s.max_in_flight = 1).await;
    let project = app.create_project("seam").await;
    let mut b = Agent::connect(&app.ws_url(project, "agent_id=b&ack=manual")).await;
    let mut a = app.connect(project, "a", "coder").await;
    a.send_ok(json!({"content": "first"})).await;
    let mut held = seq(&b.expect_op("message").await);
    for round in 0..ROUNDS {
        // Committed while `held` is unacknowledged: the window is full, so this one is read
        // from the store once `held` is acknowledged, as a page of one.
        let filler = seq(&a
            .send_ok(json!({"content": format!("filler {round}")}))
            .await);
        b.send(json!({"op": "ack", "seqs": [held]})).await;
        assert_eq!(seq(&b.expect_op("message").await), filler, "round {round}");
        // The probe's commit and the ack that ends the catch-up, as close together as can be.
        a.send(json!({"content": format!("probe {round}")})).await;
        b.send(json!({"op": "ack", "seqs": [filler]})).await;
        let probe = seq(&a.expect_op("sent").await);
        assert_eq!(seq(&b.expect_op("message").await), probe, "round {round}");
        held = probe;
    }
}

/// An agent that connects while messages stream in (auto mode): the replay, the live
/// messages skipped during it, those skipped while those were read, and so on, then live,
/// arrive as one gapless sequence, each once.
#[tokio::test]
async fn an_agent_that_connects_mid_stream_gets_every_message_once_in_order() {
    const BACKLOG: i64 = 300;
    const STREAM: i64 = 1_500;
    let app = TestApp::spawn().await;
    let project = app.create_project("mid-stream").await;
    app.connect(project, "b", "coder").await.close().await;
    let mut a = app.connect(project, "a", "coder").await;
    for n in 0..BACKLOG {
        a.send(json!({"content": format!("backlog {n}")})).await;
    }
    for _ in 0..BACKLOG {
        a.expect_op("sent").await;
    }
    let sender = tokio::spawn(async move {
        for window in 0..STREAM / 100 {
            for n in 0..100 {
                a.send(json!({"content": format!("stream {}", window * 100 + n)}))
                    .await;
            }
            for _ in 0..100 {
                a.expect_op("sent").await;
            }
        }
    });
    let mut b = app.connect(project, "b", "coder").await;
    // Up to the last one sent, which comes last whatever was skipped.
    let mut got = Vec::new();
    while got.last() != Some(&(BACKLOG + STREAM)) {
        got.push(seq(&b.expect_op("message").await));
    }
    sender.await.expect("sender");
    let missing: Vec<i64> = (1..=BACKLOG + STREAM)
        .filter(|s| !got.contains(s))
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(got, (1..=BACKLOG + STREAM).collect::<Vec<_>>());
}
