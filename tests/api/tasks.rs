//! Tasks: messages that exactly one agent takes. Racing claims, completion, the claim and
//! work deadlines (also across a broker restart), cancelation, the command line, and bad input.

use chrono::Utc;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::claims::{time, Peer};
use crate::cli::cli;
use crate::crash::BrokerProcess;
use crate::helpers::{eventually, fetch_json, Agent, TestApp};

/// Sends a task and returns its id (its message's id), from the receipt.
async fn send_task(sender: &mut Peer, frame: Value) -> String {
    let mut frame = frame;
    frame["task"] = json!(true);
    sender.send(frame).await;
    let sent = sender.next_op("sent").await;
    sent["id"].as_str().expect("id").to_owned()
}

/// The next delivered message with this id.
async fn delivered(peer: &mut Peer, id: &str) -> Value {
    let until = crate::helpers::deadline();
    loop {
        let frame = peer.agent.next_json_until(until).await;
        if frame["op"] == "message" && frame["id"] == id {
            return frame;
        }
    }
}

async fn task_op(peer: &mut Peer, op: &str, task_id: &str, extra: Value) -> Value {
    let mut frame = json!({"op": op, "task_id": task_id});
    if let Value::Object(fields) = extra {
        for (k, v) in fields {
            frame[k] = v;
        }
    }
    peer.send(frame).await;
    peer.next_op("task_result").await
}

async fn task_state(app: &TestApp, project: Uuid, task_id: &str) -> Value {
    let (status, body) = app
        .get_json(&format!("/api/projects/{project}/tasks/{task_id}"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["task"].clone()
}

#[tokio::test]
async fn two_agents_of_a_type_claiming_at_once_one_wins() {
    let app = TestApp::spawn().await;
    let project = app.create_project("race").await;
    let mut lead = Peer::connect(&app, project, "lead", "lead").await;
    let mut fe1 = Peer::connect(&app, project, "fe-1", "frontend").await;
    let mut fe2 = Peer::connect(&app, project, "fe-2", "frontend").await;
    let mut be = Peer::connect(&app, project, "be-1", "backend").await;
    for round in 0..5 {
        let task_id = send_task(
            &mut lead,
            json!({"to_type": "frontend", "type": "task_assignment", "content": format!("component {round}")}),
        )
        .await;
        let offered = delivered(&mut fe1, &task_id).await;
        assert_eq!(offered["task"], true, "{offered}");
        delivered(&mut fe2, &task_id).await;
        // Both claims are on the wire before either answer is read.
        fe1.send(json!({"op": "claim_task", "task_id": task_id}))
            .await;
        fe2.send(json!({"op": "claim_task", "task_id": task_id}))
            .await;
        let (r1, r2) = (
            fe1.next_op("task_result").await,
            fe2.next_op("task_result").await,
        );
        let winners: Vec<&Value> = [&r1, &r2].into_iter().filter(|r| r["ok"] == true).collect();
        assert_eq!(winners.len(), 1, "round {round}: {r1} / {r2}");
        let (winner, loser) = if r1["ok"] == true {
            (&r1, &r2)
        } else {
            (&r2, &r1)
        };
        assert_eq!(loser["code"], "already_claimed");
        assert_eq!(loser["task"]["holder"], winner["task"]["holder"]);
        assert!(loser["error"]
            .as_str()
            .unwrap()
            .contains("already claimed by"));
        // The claim is told to the type it was offered to and to its sender.
        for peer in [&mut fe1, &mut fe2] {
            let told = peer.notice("claimed", "task", &task_id).await;
            assert_eq!(told["to_type"], "frontend");
        }
        let told = lead.notice("claimed", "task", &task_id).await;
        assert_eq!(told["to"], "lead");
        assert_eq!(told["reply_to"], task_id.as_str());
        // An agent it was not offered to cannot take it.
        let refused = task_op(&mut be, "claim_task", &task_id, json!({})).await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
    }
    let (_, claimed) = app
        .get_json(&format!("/api/projects/{project}/tasks?state=claimed"))
        .await;
    assert_eq!(claimed["tasks"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn completion_reaches_the_sender_with_the_result() {
    let app = TestApp::spawn().await;
    let project = app.create_project("complete").await;
    let mut lead = Peer::connect(&app, project, "lead", "lead").await;
    let tasks = format!("/api/projects/{project}/tasks");
    // Sent and handled over REST.
    let (status, task) = app
        .post_json(
            &format!("/api/projects/{project}/messages"),
            &json!({"sender_agent_id": "lead", "sender_agent_type": "lead", "to": "worker", "content": "summarise the logs", "task": true}),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    assert_eq!(task["task"], true);
    let task_id = task["id"].as_str().unwrap().to_owned();
    let (status, open) = app.get_json(&format!("{tasks}?state=open")).await;
    assert_eq!(
        (status, open["tasks"][0]["id"].clone()),
        (200, json!(task_id))
    );
    // Completing an open task: claim it first.
    let (status, body) = app
        .post_json(
            &format!("{tasks}/{task_id}/complete"),
            &json!({"agent_id": "worker"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (409, json!("not_holder")),
        "{body}"
    );
    let (status, body) = app
        .post_json(
            &format!("{tasks}/{task_id}/claim"),
            &json!({"agent_id": "worker"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["task"]["state"], "claimed");
    assert_eq!(body["task"]["holder"], "worker");
    let (status, body) = app
        .post_json(
            &format!("{tasks}/{task_id}/claim"),
            &json!({"agent_id": "someone"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, json!("forbidden")),
        "{body}"
    );
    let (status, body) = app
        .post_json(
            &format!("{tasks}/{task_id}/complete"),
            &json!({"agent_id": "worker", "result": "3 errors, all in the parser"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["task"]["state"], "done");
    let done = lead.notice("done", "task", &task_id).await;
    assert_eq!(done["to"], "lead");
    assert_eq!(done["success"], true);
    assert_eq!(done["reply_to"], task_id.as_str());
    assert!(done["content"]
        .as_str()
        .unwrap()
        .contains("3 errors, all in the parser"));
    assert_eq!(
        task_state(&app, project, &task_id).await["result"],
        "3 errors, all in the parser"
    );
    // Closed: nothing more happens to it.
    let (status, body) = app
        .post_json(
            &format!("{tasks}/{task_id}/claim"),
            &json!({"agent_id": "worker"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (409, json!("task_closed")),
        "{body}"
    );
    // A failure reaches the sender as one, with its error.
    let mut worker = Peer::connect(&app, project, "worker", "worker").await;
    let failing = send_task(
        &mut lead,
        json!({"to": "worker", "content": "fix the build"}),
    )
    .await;
    assert_eq!(
        task_op(&mut worker, "claim_task", &failing, json!({})).await["ok"],
        true
    );
    let failed = task_op(
        &mut worker,
        "complete_task",
        &failing,
        json!({"success": false, "result": "needs a newer rustc"}),
    )
    .await;
    assert_eq!(failed["task"]["state"], "failed", "{failed}");
    let told = lead.notice("failed", "task", &failing).await;
    assert_eq!(
        (told["success"].clone(), told["error"].clone()),
        (json!(false), json!("needs a newer rustc"))
    );
    // The thread of a task tells its story.
    let (_, thread) = app
        .get_json(&format!(
            "/api/projects/{project}/messages?thread={task_id}"
        ))
        .await;
    let events: Vec<&str> = thread["messages"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|m| m["metadata"]["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["claimed", "claimed", "done", "done"], "{thread}");
}

#[tokio::test]
async fn a_task_nobody_claims_in_time_is_a_dead_letter() {
    let app = TestApp::spawn().await;
    let project = app.create_project("unclaimed").await;
    let mut lead = Peer::connect(&app, project, "lead", "lead").await;
    let _fe = Peer::connect(&app, project, "fe-1", "frontend").await;
    let task_id = send_task(
        &mut lead,
        json!({"to_type": "frontend", "content": "review the design", "claim_timeout_ms": 700}),
    )
    .await;
    let told = lead.notice("unclaimed", "task", &task_id).await;
    assert_eq!(told["to"], "lead");
    assert_eq!(told["priority"], 1);
    let task = task_state(&app, project, &task_id).await;
    assert_eq!(task["state"], "unclaimed");
    let (_, dead) = app
        .get_json(&format!("/api/projects/{project}/dead-letters"))
        .await;
    let letter = &dead["dead_letters"][0];
    assert_eq!(letter["reason"], "unclaimed", "{dead}");
    assert_eq!(letter["message"]["id"], task_id.as_str());
    // Too late to claim it; retried, it is a task again.
    let mut fe = Peer::connect(&app, project, "fe-2", "frontend").await;
    assert_eq!(
        task_op(&mut fe, "claim_task", &task_id, json!({})).await["code"],
        "task_closed"
    );
    let (status, retry) = app
        .post_json(
            &format!("/api/projects/{project}/dead-letters/{task_id}/retry"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 201, "{retry}");
    assert_eq!(retry["task"], true);
    let again = retry["id"].as_str().unwrap();
    assert_eq!(
        task_state(&app, project, again).await["claim_timeout_ms"],
        700
    );
}

#[tokio::test]
async fn a_holder_that_runs_out_of_time_loses_the_task_to_another() {
    let app = TestApp::spawn().await;
    let project = app.create_project("work-timeout").await;
    let mut lead = Peer::connect(&app, project, "lead", "lead").await;
    let mut fe1 = Peer::connect(&app, project, "fe-1", "frontend").await;
    let mut fe2 = Peer::connect(&app, project, "fe-2", "frontend").await;
    let task_id = send_task(
        &mut lead,
        json!({"to_type": "frontend", "content": "port the settings page", "work_timeout_ms": 700}),
    )
    .await;
    let taken = task_op(&mut fe1, "claim_task", &task_id, json!({})).await;
    assert_eq!(taken["ok"], true, "{taken}");
    assert!(taken["task"]["work_deadline"].is_string());
    // Offered again, to the type and to the sender, with the task's content.
    let reopened = fe2.notice("reopened", "task", &task_id).await;
    assert!(reopened["content"]
        .as_str()
        .unwrap()
        .contains("port the settings page"));
    assert!(reopened["content"]
        .as_str()
        .unwrap()
        .contains("fe-1 did not finish"));
    lead.notice("reopened", "task", &task_id).await;
    let task = task_state(&app, project, &task_id).await;
    assert_eq!(
        (
            task["state"].clone(),
            task["offers"].clone(),
            task["holder"].clone()
        ),
        (json!("open"), json!(2), Value::Null)
    );
    let retaken = task_op(&mut fe2, "claim_task", &task_id, json!({})).await;
    assert_eq!(retaken["task"]["holder"], "fe-2", "{retaken}");
    // Its holder gives it back: open again.
    let back = task_op(&mut fe2, "release_task", &task_id, json!({})).await;
    assert_eq!(back["task"]["state"], "open", "{back}");
    fe1.notice("released", "task", &task_id).await;
    // The holder that ran out of time holds nothing.
    let late = task_op(
        &mut fe1,
        "complete_task",
        &task_id,
        json!({"result": "done"}),
    )
    .await;
    assert_eq!(late["code"], "not_holder", "{late}");
}

#[tokio::test]
async fn only_its_sender_cancels_a_task() {
    let app = TestApp::spawn().await;
    let project = app.create_project("cancel").await;
    let mut lead = Peer::connect(&app, project, "lead", "lead").await;
    let mut fe = Peer::connect(&app, project, "fe-1", "frontend").await;
    let task_id = send_task(&mut lead, json!({"content": "anyone: rotate the keys"})).await;
    assert_eq!(
        task_op(&mut fe, "claim_task", &task_id, json!({})).await["ok"],
        true
    );
    let refused = task_op(&mut fe, "cancel_task", &task_id, json!({})).await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let canceled = task_op(
        &mut lead,
        "cancel_task",
        &task_id,
        json!({"reason": "done by hand"}),
    )
    .await;
    assert_eq!(canceled["task"]["state"], "canceled", "{canceled}");
    let told = fe.notice("canceled", "task", &task_id).await;
    assert!(told["content"].as_str().unwrap().contains("done by hand"));
    let late = task_op(&mut fe, "complete_task", &task_id, json!({})).await;
    assert_eq!(late["code"], "task_closed", "{late}");
}

#[tokio::test]
async fn bad_tasks_get_clear_errors_and_store_nothing() {
    let app = TestApp::spawn().await;
    let project = app.create_project("bad-tasks").await;
    let mut lead = Peer::connect(&app, project, "lead", "lead").await;
    for (frame, field) in [
        (
            json!({"content": "x", "task": true, "expects_reply": true}),
            "task",
        ),
        (
            json!({"content": "x", "claim_timeout_ms": 5}),
            "claim_timeout_ms",
        ),
        (
            json!({"content": "x", "task": true, "claim_timeout_ms": 0}),
            "claim_timeout_ms",
        ),
        (
            json!({"content": "x", "task": true, "work_timeout_ms": -1}),
            "work_timeout_ms",
        ),
    ] {
        lead.send(frame.clone()).await;
        let error = lead.expect_error("invalid_field").await;
        assert_eq!(error["field"], field, "{frame}: {error}");
    }
    lead.send(json!({"op": "claim_task"})).await;
    assert_eq!(lead.expect_error("missing_field").await["field"], "task_id");
    let unknown = Uuid::new_v4().to_string();
    assert_eq!(
        task_op(&mut lead, "claim_task", &unknown, json!({})).await["code"],
        "not_found"
    );
    let tasks = format!("/api/projects/{project}/tasks");
    let (status, body) = app
        .post_json(
            &format!("{tasks}/{unknown}/finish"),
            &json!({"agent_id": "a"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = app
        .post_json(
            &format!("{tasks}/{unknown}/claim"),
            &json!({"agent_id": "a", "result": "x"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("invalid_field")),
        "{body}"
    );
    let (status, body) = app.get_json(&format!("{tasks}?state=taken")).await;
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("invalid_query")),
        "{body}"
    );
    let (_, project_row) = app.get_json(&format!("/api/projects/{project}")).await;
    assert_eq!(project_row["head_seq"], 0, "nothing stored: {project_row}");
}

#[tokio::test]
async fn the_task_commands() {
    let app = TestApp::spawn().await;
    let project = app.create_project("cli-tasks").await;
    // Both workers join with their type, so a task to the type is offered to them.
    for agent in ["w1", "w2"] {
        assert_eq!(cli(&app, project, agent, &["inbox"]).await.code, 1);
    }
    let out = cli(
        &app,
        project,
        "lead",
        &[
            "send",
            "--task",
            "--to-type",
            "shell",
            "--work-timeout",
            "1h",
            "run the migration",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.lines()[0].contains("task: agentbus task claim "),
        "{out:?}"
    );
    let out = cli(&app, project, "w1", &["tasks"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let line = out.lines()[0].to_owned();
    assert!(
        line.contains("[open] lead → type:shell: run the migration"),
        "{line}"
    );
    let task_id = line.split(' ').nth(1).unwrap().to_owned();
    let out = cli(&app, project, "w1", &["task", "claim", &task_id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.lines()[0].contains("[claimed by w1]"), "{out:?}");
    let out = cli(&app, project, "w2", &["task", "claim", &task_id]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.error_line().contains("already claimed by w1"),
        "{out:?}"
    );
    let out = cli(
        &app,
        project,
        "w1",
        &["task", "done", &task_id, "migrated 12 tables"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.lines()[0].contains("[done by w1]"), "{out:?}");
    assert!(out.lines()[0].contains("migrated 12 tables"), "{out:?}");
    let out = cli(&app, project, "w1", &["tasks"]).await;
    assert_eq!(out.code, 1, "no open task: {out:?}");
    // The result reached the sender's inbox.
    let lead_inbox = eventually("the result in lead's inbox", || async {
        let (_, page) = app
            .get_json(&format!("/api/projects/{project}/agents/lead/inbox"))
            .await;
        let found = page["messages"]
            .as_array()?
            .iter()
            .find(|m| m["metadata"]["event"] == "done")?
            .clone();
        Some(found)
    })
    .await;
    assert!(lead_inbox["content"]
        .as_str()
        .unwrap()
        .contains("migrated 12 tables"));
    let out = cli(&app, project, "w1", &["task", "claim", "nope"]).await;
    assert_eq!(out.code, 2, "{out:?}");
}

/// The coordination notices about a task, each as "event to recipient" (the agent, or
/// the type), sorted; a notice stored twice is there twice.
async fn task_events(http: &reqwest::Client, base: &str, task_id: &str) -> Option<Vec<String>> {
    let body = fetch_json(http, &format!("{base}/messages?type=coordination")).await?;
    let mut events: Vec<String> = body["messages"]
        .as_array()?
        .iter()
        .filter(|m| m["metadata"]["task"]["id"] == task_id)
        .map(|m| {
            let to = match &m["to"] {
                Value::String(agent) => agent.clone(),
                _ => format!("type {}", m["to_type"].as_str().unwrap_or("-")),
            };
            format!("{} to {to}", m["metadata"]["event"].as_str().unwrap_or("-"))
        })
        .collect();
    events.sort();
    Some(events)
}

#[tokio::test]
async fn task_deadlines_survive_a_broker_restart_and_fire_once() {
    let app = TestApp::spawn().await;
    let database_url = app.database_url.clone();
    let project = app.create_project("task-restart").await;
    app.stop();

    let first = BrokerProcess::start(&database_url);
    let port = first.port;
    let ws = |agent: &str, kind: &str| {
        format!(
            "ws://127.0.0.1:{port}/ws/agent/messages/{project}?agent_id={agent}&agent_type={kind}"
        )
    };
    let mut lead = Peer::from(Agent::connect(&ws("lead", "lead")).await);
    let mut fe = Peer::from(Agent::connect(&ws("fe-1", "frontend")).await);
    // One waits for its claim deadline, the other, taken, for its work deadline.
    let unclaimed = send_task(
        &mut lead,
        json!({"to_type": "frontend", "content": "nobody takes this", "claim_timeout_ms": 4000}),
    )
    .await;
    let worked = send_task(
        &mut lead,
        json!({"to_type": "frontend", "content": "fe-1 stops midway", "work_timeout_ms": 4000}),
    )
    .await;
    let taken = task_op(&mut fe, "claim_task", &worked, json!({})).await;
    assert_eq!(taken["ok"], true, "{taken}");
    let base = format!("http://127.0.0.1:{port}/api/projects/{project}");
    let state = |id: &str| {
        let (http, url) = (app.http.clone(), format!("{base}/tasks/{id}"));
        async move { Some(fetch_json(&http, &url).await?["task"].clone()) }
    };
    let claim_deadline = time(&state(&unclaimed).await.expect("task")["claim_deadline"]);
    let work_deadline = time(&taken["task"]["work_deadline"]);
    drop((lead, fe));
    // Killed before either deadline: only the next broker can act on them.
    first.kill();
    assert!(
        Utc::now() < claim_deadline.min(work_deadline),
        "the broker was killed after a deadline"
    );

    let _second = BrokerProcess::start_on(&database_url, port);
    let after = eventually("both deadlines to fire after the restart", || {
        let (a, b) = (state(&unclaimed), state(&worked));
        async move {
            let (a, b) = (a.await?, b.await?);
            (a["state"] == "unclaimed" && b["state"] == "open").then_some((a, b))
        }
    })
    .await;
    assert_eq!(after.1["holder"], Value::Null, "{}", after.1);
    assert_eq!(after.1["offers"], 2, "{}", after.1);
    let dead = fetch_json(&app.http, &format!("{base}/dead-letters"))
        .await
        .expect("dead letters");
    let letters = dead["dead_letters"].as_array().expect("dead letters");
    assert_eq!(letters.len(), 1, "{dead}");
    assert_eq!(letters[0]["reason"], "unclaimed");
    assert_eq!(letters[0]["message"]["id"], unclaimed.as_str());
    // Each deadline fired once: one notice of each move to each party.
    let events = eventually("the notices of both moves", || {
        let (http, base) = (app.http.clone(), base.clone());
        let (unclaimed, worked) = (unclaimed.clone(), worked.clone());
        async move {
            let a = task_events(&http, &base, &unclaimed).await?;
            let b = task_events(&http, &base, &worked).await?;
            // Each move is told to the sender and to the type.
            let told = |events: &[String], event: &str| {
                events.iter().filter(|e| e.starts_with(event)).count() >= 2
            };
            (told(&a, "unclaimed") && told(&b, "reopened")).then_some((a, b))
        }
    })
    .await;
    assert_eq!(
        events.0,
        ["unclaimed to lead", "unclaimed to type frontend"],
        "{events:?}"
    );
    assert_eq!(
        events.1,
        [
            "claimed to lead",
            "claimed to type frontend",
            "reopened to lead",
            "reopened to type frontend"
        ],
        "{events:?}"
    );
}
