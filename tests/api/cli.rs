//! The agent commands (`agentbus send`, `inbox`, `ask`, ...) run as the built binary against
//! a real broker, with WebSocket agents on the other side.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{TestApp, PATIENCE};

/// What a run of the binary left: its exit status and output.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"))
    }

    /// The one line of stderr, which must be exactly one.
    pub fn error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:?}");
        lines[0]
    }
}

/// The binary with a clean environment: only what the test gives.
pub fn agentbus(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentbus"));
    command
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
}

/// Runs a command to its end (killed, and the test failed, if it outlives the bound),
/// feeding it `stdin` (or an empty, closed standard input).
pub async fn run(mut command: Command, stdin: Option<&str>) -> Run {
    let input = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agentbus binary");
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(input) = input {
            pipe.write_all(input.as_bytes()).expect("write stdin");
        }
        drop(pipe);
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        });
        let err_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + PATIENCE * 4;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the binary") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the command did not finish within the patience bound");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Run {
            code: status.code().unwrap_or(-1),
            stdout: reader.join().expect("stdout reader"),
            stderr: err_reader.join().expect("stderr reader"),
        }
    })
    .await
    .expect("the runner thread")
}

/// The settings of an agent of this project on this broker.
pub fn env_for(app: &TestApp, project: &str, agent_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AGENTBUS_URL", format!("http://127.0.0.1:{}", app.port)),
        ("AGENTBUS_PROJECT", project.to_owned()),
        ("AGENTBUS_AGENT_ID", agent_id.to_owned()),
        ("AGENTBUS_AGENT_TYPE", "shell".to_owned()),
    ]
}

/// Runs `agentbus ARGS` as this agent.
pub async fn cli(app: &TestApp, project: Uuid, agent_id: &str, args: &[&str]) -> Run {
    run(
        agentbus(args, &env_for(app, &project.to_string(), agent_id)),
        None,
    )
    .await
}

#[tokio::test]
async fn send_reaches_a_websocket_agent_and_prints_one_line() {
    let app = TestApp::spawn().await;
    let project = app.create_project("send").await;
    let mut web = app.connect(project, "web", "frontend").await;

    let out = cli(
        &app,
        project,
        "shell-1",
        &["send", "--to", "web", "--type", "status", "hello web"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.lines(),
        ["#1 [status] shell-1 → web: hello web"],
        "{out:?}"
    );
    assert_eq!(out.stderr, "");

    let m = web.expect_op("message").await;
    assert_eq!(m["content"], "hello web");
    assert_eq!(m["sender_agent_id"], "shell-1");
    assert_eq!(m["sender_agent_type"], "shell");
    assert_eq!(m["message_type"], "status");

    // --json: the stored message object, as the broker returned it.
    let out = cli(
        &app,
        project,
        "shell-1",
        &[
            "send",
            "--json",
            "--priority",
            "0",
            "--metadata",
            r#"{"pr": 12}"#,
            "urgent",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let stored = out.json();
    assert_eq!(stored["seq"], 2);
    assert_eq!(stored["content"], "urgent");
    assert_eq!(stored["priority"], 0);
    assert_eq!(stored["metadata"], json!({"pr": 12}));
    assert!(stored["id"]
        .as_str()
        .and_then(|s| s.parse::<Uuid>().ok())
        .is_some());
    let m = web.expect_op("message").await;
    assert_eq!(m["id"], stored["id"]);
}

#[tokio::test]
async fn content_comes_from_stdin() {
    let app = TestApp::spawn().await;
    let project = app.create_project("stdin").await;
    let mut web = app.connect(project, "web", "frontend").await;
    let env = env_for(&app, &project.to_string(), "shell-1");

    // `-` reads standard input; its last newline is not part of the content.
    let out = run(agentbus(&["send", "-"], &env), Some("line one\nline two\n")).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.lines(),
        ["#1 [status] shell-1 → all: line one ⏎ line two"]
    );
    assert_eq!(
        web.expect_op("message").await["content"],
        "line one\nline two"
    );

    // No argument and a piped standard input: the same.
    let out = run(agentbus(&["send"], &env), Some("piped")).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(web.expect_op("message").await["content"], "piped");

    // Nothing on standard input: a usage error, and nothing sent.
    let out = run(agentbus(&["send"], &env), None).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.error_line().contains("content is empty"), "{out:?}");
    let (_, history) = app
        .get_json(&format!("/api/projects/{project}/messages"))
        .await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn a_project_is_found_by_name_and_an_unknown_name_is_one_clear_sentence() {
    let app = TestApp::spawn().await;
    let project = app.create_project("by-name").await;
    let mut web = app.connect(project, "web", "frontend").await;

    let env = env_for(&app, "by-name", "shell-1");
    let out = run(agentbus(&["send", "hi by name"], &env), None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(web.expect_op("message").await["content"], "hi by name");

    let env = env_for(&app, "nope", "shell-1");
    let out = run(agentbus(&["send", "lost"], &env), None).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(
        out.error_line(),
        "agentbus: no project named \"nope\"; see `agentbus project list`, or create it with `agentbus project create nope`"
    );
    assert_eq!(out.stdout, "");

    // An id that names no project: the broker's 404, with where to look.
    let out = cli(&app, Uuid::new_v4(), "shell-1", &["history"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.error_line().contains("agentbus project list"),
        "{out:?}"
    );
}

#[tokio::test]
async fn project_list_prints_each_project() {
    let app = TestApp::spawn().await;
    let project = app.create_project("listed").await;
    let env = env_for(&app, "", "");

    let out = run(agentbus(&["project", "list"], &env), None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.lines(), [format!("{project}  listed  (head 0)")]);

    let out = run(agentbus(&["project", "list", "--json"], &env), None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["projects"][0]["id"], project.to_string());
}

#[tokio::test]
async fn no_broker_is_one_sentence_that_says_how_to_start_one() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let env = vec![
        ("AGENTBUS_URL", format!("http://127.0.0.1:{port}")),
        ("AGENTBUS_PROJECT", Uuid::new_v4().to_string()),
        ("AGENTBUS_AGENT_ID", "shell-1".to_owned()),
        ("RUST_BACKTRACE", "1".to_owned()),
    ];
    for args in [
        &["send", "hi"][..],
        &["inbox"],
        &["agents"],
        &["history"],
        &["tail"],
    ] {
        let out = run(agentbus(args, &env), None).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert_eq!(
            out.error_line(),
            format!("agentbus: no broker at http://127.0.0.1:{port}; start one with `agentbus serve` or set AGENTBUS_URL"),
            "{args:?}"
        );
    }
}

#[tokio::test]
async fn missing_settings_name_the_variable_to_set() {
    let app = TestApp::spawn().await;
    let env = vec![("AGENTBUS_URL", format!("http://127.0.0.1:{}", app.port))];
    let out = run(agentbus(&["history"], &env), None).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.error_line().contains("AGENTBUS_PROJECT"), "{out:?}");

    let project = app.create_project("settings").await;
    let mut env = env.clone();
    env.push(("AGENTBUS_PROJECT", project.to_string()));
    let out = run(agentbus(&["send", "hi"], &env), None).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.error_line().contains("AGENTBUS_AGENT_ID"), "{out:?}");

    // Usage errors are clap's: status 2.
    let out = run(agentbus(&["inbox", "--wait", "61"], &env), None).await;
    assert_eq!(out.code, 2, "{out:?}");
}

#[tokio::test]
async fn token_create_for_an_unknown_project_is_one_sentence_without_a_backtrace() {
    let app = TestApp::spawn().await;
    let unknown = Uuid::new_v4();
    let env = vec![
        ("DATABASE_URL", app.database_url.clone()),
        ("RUST_BACKTRACE", "1".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ];
    let out = run(
        agentbus(&["token", "create", &unknown.to_string()], &env),
        None,
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(
        out.error_line(),
        format!("agentbus: no project {unknown} in this database; see `agentbus project list` or create one with `agentbus project create NAME`")
    );
    assert_eq!(out.stdout, "");
    assert!(!out.stderr.contains("foreign key") && !out.stderr.contains("stack backtrace"));
}

#[tokio::test]
async fn ask_prints_the_websocket_agents_reply() {
    let app = TestApp::spawn().await;
    let project = app.create_project("ask").await;
    let mut backend = app.connect(project, "backend", "backend").await;

    let asking = tokio::spawn({
        let env = env_for(&app, &project.to_string(), "shell-1");
        async move {
            run(
                agentbus(
                    &[
                        "ask",
                        "--to",
                        "backend",
                        "--timeout",
                        "60",
                        "is the API up?",
                    ],
                    &env,
                ),
                None,
            )
            .await
        }
    });
    let request = backend.expect_op("message").await;
    assert_eq!(request["content"], "is the API up?");
    assert_eq!(request["expects_reply"], true);
    assert_eq!(request["message_type"], "request");
    backend
        .send_ok(json!({"content": "yes, on :9000", "reply_to": request["id"], "success": true}))
        .await;

    let out = asking.await.expect("the ask task");
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.lines(),
        ["#2 [status] backend → shell-1 (reply to #1): yes, on :9000"],
        "{out:?}"
    );
}

#[tokio::test]
async fn ask_exits_1_when_no_reply_comes_and_3_when_nobody_can_receive() {
    let app = TestApp::spawn().await;
    let project = app.create_project("ask-timeout").await;
    let _backend = app.connect(project, "backend", "backend").await;

    let out = cli(
        &app,
        project,
        "shell-1",
        &["ask", "--to", "backend", "--timeout", "1", "anyone?"],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.error_line(),
        "agentbus: no reply within 1 s (request #1)"
    );

    let out = cli(
        &app,
        project,
        "shell-1",
        &[
            "ask",
            "--json",
            "--to",
            "backend",
            "--timeout",
            "1",
            "again?",
        ],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    let body = out.json();
    assert_eq!(body["response"]["error"], "timeout");
    assert_eq!(body["request"]["content"], "again?");

    let out = cli(
        &app,
        project,
        "shell-1",
        &["ask", "--to", "ghost", "hello?"],
    )
    .await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.error_line().contains("ghost"), "{out:?}");
}

#[tokio::test]
async fn reply_answers_a_websocket_request_and_can_report_an_error() {
    let app = TestApp::spawn().await;
    let project = app.create_project("reply").await;
    let mut coord = app.connect(project, "coord", "coordinator").await;
    let mut worker = app.connect(project, "worker", "backend").await;

    let request = coord
        .send_ok(json!({"type": "request", "content": "run the migrations", "to": "worker", "expects_reply": true, "timeout_ms": 60_000}))
        .await;
    let request_id = request["id"].as_str().expect("id").to_owned();
    let delivered = worker.expect_op("message").await;
    assert_eq!(delivered["id"], request_id.as_str());

    // The worker answers from its shell, as itself.
    let out = cli(
        &app,
        project,
        "worker",
        &["reply", &request_id, "migrated, 3 applied"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let reply = coord.expect_op("message").await;
    assert_eq!(reply["reply_to"], request_id.as_str());
    assert_eq!(reply["content"], "migrated, 3 applied");
    assert_eq!(reply["success"], true);
    assert_eq!(reply["in_reply_to_seq"], request["seq"]);

    // A reply to a message that is not a request goes to its sender, not to everyone.
    let note = coord
        .send_ok(json!({"content": "fyi: main is frozen", "to": "worker"}))
        .await;
    worker.expect_op("message").await;
    let out = cli(
        &app,
        project,
        "worker",
        &[
            "reply",
            "--error",
            note["id"].as_str().expect("id"),
            "cannot: my branch is mid-rebase",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let answer = coord.expect_op("message").await;
    assert_eq!(answer["to"], "coord");
    assert_eq!(answer["success"], false);
    assert_eq!(answer["error"], "cannot: my branch is mid-rebase");

    let out = cli(&app, project, "worker", &["reply", "not-an-id", "x"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = cli(
        &app,
        project,
        "worker",
        &["reply", &Uuid::new_v4().to_string(), "x"],
    )
    .await;
    assert_eq!(out.code, 3, "{out:?}");
}

#[tokio::test]
async fn agents_lists_the_members() {
    let app = TestApp::spawn().await;
    let project = app.create_project("agents").await;
    let out = cli(&app, project, "shell-1", &["agents"]).await;
    assert_eq!(out.code, 1, "no members yet: {out:?}");

    let mut web = app.connect(project, "web", "frontend").await;
    web.send(json!({"op": "hello", "capabilities": ["react"], "description": "the UI"}))
        .await;
    let _api = app.connect(project, "api", "backend").await;
    crate::helpers::eventually("the capabilities are recorded", || async {
        app.member(project, "web")
            .await
            .filter(|m| m["capabilities"] == json!(["react"]))
    })
    .await;

    let out = cli(&app, project, "shell-1", &["agents"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines = out.lines();
    assert_eq!(lines.len(), 2, "{out:?}");
    let web_line = lines
        .iter()
        .find(|l| l.starts_with("web "))
        .expect("web is listed");
    assert!(web_line.starts_with("web (frontend) online"), "{web_line}");
    assert!(
        web_line.contains("can react") && web_line.contains("the UI"),
        "{web_line}"
    );

    let out = cli(&app, project, "shell-1", &["agents", "--json"]).await;
    let listed = out.json();
    let ids: Vec<&str> = listed["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter_map(|a| a["agent_id"].as_str())
        .collect();
    assert!(ids.contains(&"web") && ids.contains(&"api"), "{ids:?}");
}

#[tokio::test]
async fn history_pages_searches_and_exits_1_when_empty() {
    let app = TestApp::spawn().await;
    let project = app.create_project("history").await;
    let out = cli(&app, project, "shell-1", &["history"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stdout, "");

    let mut web = app.connect(project, "web", "frontend").await;
    for content in [
        "retry policy drafted",
        "lunch",
        "the retry policy is merged",
    ] {
        web.send_ok(json!({"type": "status", "content": content}))
            .await;
    }
    let out = cli(&app, project, "shell-1", &["history"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.lines(),
        [
            "#1 [status] web → all: retry policy drafted",
            "#2 [status] web → all: lunch",
            "#3 [status] web → all: the retry policy is merged",
        ]
    );
    let out = cli(
        &app,
        project,
        "shell-1",
        &["history", "--q", "retry policy", "--after-seq", "1"],
    )
    .await;
    assert_eq!(
        out.lines(),
        ["#3 [status] web → all: the retry policy is merged"],
        "{out:?}"
    );

    let out = cli(
        &app,
        project,
        "shell-1",
        &["history", "--json", "--before-seq", "3", "--limit", "1"],
    )
    .await;
    let page = out.json();
    assert_eq!(page["head_seq"], 3);
    assert_eq!(page["messages"][0]["seq"], 2);
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1));

    let out = cli(&app, project, "shell-1", &["history", "--limit", "0"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.error_line().contains("limit"), "{out:?}");
}

#[tokio::test]
async fn tail_prints_messages_as_they_are_committed() {
    let app = TestApp::spawn().await;
    let project = app.create_project("tail").await;
    let mut web = app.connect(project, "web", "frontend").await;
    let _api = app.connect(project, "api", "backend").await;
    web.send_ok(json!({"content": "before"})).await;

    let following = tokio::spawn({
        let env = env_for(&app, &project.to_string(), "shell-1");
        async move {
            run(
                agentbus(
                    &[
                        "tail",
                        "--after-seq",
                        "0",
                        "--count",
                        "3",
                        "--interval-ms",
                        "50",
                        "--json",
                    ],
                    &env,
                ),
                None,
            )
            .await
        }
    });
    web.send_ok(json!({"content": "during", "to_type": "backend"}))
        .await;
    web.send_ok(json!({"content": "after", "priority": 1}))
        .await;

    let out = following.await.expect("the tail task");
    assert_eq!(out.code, 0, "{out:?}");
    let seen: Vec<Value> = out
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).expect("one JSON message per line"))
        .collect();
    let contents: Vec<&str> = seen.iter().filter_map(|m| m["content"].as_str()).collect();
    assert_eq!(contents, ["before", "during", "after"]);
    let seqs: Vec<i64> = seen.iter().filter_map(|m| m["seq"].as_i64()).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[tokio::test]
async fn inbox_joins_prints_acknowledges_and_then_has_nothing() {
    let app = TestApp::spawn().await;
    let project = app.create_project("inbox").await;
    let mut web = app.connect(project, "web", "frontend").await;
    let _api = app.connect(project, "api", "backend").await;
    web.send_ok(json!({"content": "before shell-1 joined"}))
        .await;

    // The first call makes shell-1 a member, at the head: nothing is owed yet.
    let out = cli(&app, project, "shell-1", &["inbox"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stdout, "");
    let member = app
        .member(project, "shell-1")
        .await
        .expect("shell-1 is a member");
    assert_eq!(member["agent_type"], "shell");

    web.send_ok(json!({"type": "status", "content": "to everyone"}))
        .await;
    web.send_ok(json!({"type": "alert", "content": "to you, now", "to": "shell-1", "priority": 0}))
        .await;

    // --peek shows, most urgent first, and leaves them owed.
    let out = cli(&app, project, "shell-1", &["inbox", "--peek"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.lines(),
        [
            "#3 [alert] web → shell-1 (urgent, priority 0): to you, now",
            "#2 [status] web → all: to everyone",
        ]
    );
    let out = cli(
        &app,
        project,
        "shell-1",
        &["inbox", "--urgent-only", "--json"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let page = out.json();
    assert_eq!(page["agent_id"], "shell-1");
    let seqs: Vec<i64> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["seq"].as_i64())
        .collect();
    assert_eq!(seqs, [3]);
    assert!(
        page["ack_floor"].is_i64() && page["remaining"].is_i64(),
        "{page}"
    );

    // Without --peek they are acknowledged: the next read has only what is left.
    let out = cli(&app, project, "shell-1", &["inbox"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.lines(), ["#2 [status] web → all: to everyone"]);
    let out = cli(&app, project, "shell-1", &["inbox"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stdout, "");
}

#[tokio::test]
async fn inbox_wait_returns_the_websocket_message_it_waited_for() {
    let app = TestApp::spawn().await;
    let project = app.create_project("inbox-wait").await;
    let mut web = app.connect(project, "web", "frontend").await;
    let out = cli(&app, project, "shell-1", &["inbox"]).await;
    assert_eq!(out.code, 1, "{out:?}");

    let waiting = tokio::spawn({
        let env = env_for(&app, &project.to_string(), "shell-1");
        async move { run(agentbus(&["inbox", "--wait", "50"], &env), None).await }
    });
    web.send_ok(json!({"type": "status", "content": "wake up", "to": "shell-1"}))
        .await;
    let out = waiting.await.expect("the waiting inbox");
    assert_eq!(
        out.code, 0,
        "woken with the message, not at the deadline: {out:?}"
    );
    assert_eq!(out.lines(), ["#1 [status] web → shell-1: wake up"]);

    // Nothing owed: an empty answer at the deadline, exit 1.
    let out = cli(&app, project, "shell-1", &["inbox", "--wait", "1"]).await;
    assert_eq!(out.code, 1, "{out:?}");
}

#[tokio::test]
async fn hook_tells_new_mail_once_urgent_first_then_nothing() {
    let app = TestApp::spawn().await;
    let project = app.create_project("hook").await;
    let mut web = app.connect(project, "web", "frontend").await;
    let env = env_for(&app, &project.to_string(), "shell-1");
    let prompt = r#"{"session_id":"s","hook_event_name":"UserPromptSubmit","prompt":"go on"}"#;
    let hook =
        |input: &'static str| run(agentbus(&["inbox", "--hook", "claude"], &env), Some(input));

    // Nothing yet (this first call also makes shell-1 a member): no output at all.
    let out = hook(prompt).await;
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{out:?}");

    web.send_ok(json!({"type": "status", "content": "fyi", "to": "shell-1"}))
        .await;
    web.send_ok(
        json!({"type": "alert", "content": "stop the deploy", "to": "shell-1", "priority": 1}),
    )
    .await;

    let out = hook(prompt).await;
    assert_eq!(out.code, 0, "{out:?}");
    let said: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(
        said["hookSpecificOutput"]["hookEventName"],
        "UserPromptSubmit"
    );
    let context = said["hookSpecificOutput"]["additionalContext"]
        .as_str()
        .expect("additionalContext");
    let lines: Vec<&str> = context.lines().collect();
    assert_eq!(
        lines[0],
        "agentbus: 2 new messages for shell-1 (1 URGENT, shown first):"
    );
    assert_eq!(
        lines[1],
        "URGENT #2 [alert] web → shell-1 (urgent, priority 1): stop the deploy"
    );
    assert_eq!(lines[2], "#1 [status] web → shell-1: fyi");

    // Told once: the next turn hears nothing, though the messages are still unread.
    let out = hook(prompt).await;
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{out:?}");
    let out = cli(&app, project, "shell-1", &["inbox", "--peek"]).await;
    assert_eq!(out.lines().len(), 2, "{out:?}");

    // New mail at a Stop: the decision that keeps the agent working.
    web.send_ok(json!({"type": "status", "content": "one more", "to": "shell-1"}))
        .await;
    let stop = r#"{"session_id":"s","hook_event_name":"Stop","stop_hook_active":false}"#;
    let out = run(agentbus(&["inbox", "--hook", "codex"], &env), Some(stop)).await;
    assert_eq!(out.code, 0, "{out:?}");
    let said: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(said["decision"], "block");
    assert!(said["reason"]
        .as_str()
        .expect("reason")
        .contains("#3 [status] web → shell-1: one more"));
    assert_eq!(said.as_object().map(|o| o.len()), Some(2), "{said}");

    // --peek tells without counting it: the same mail is told again.
    web.send_ok(json!({"type": "status", "content": "last", "to": "shell-1"}))
        .await;
    for _ in 0..2 {
        let out = run(agentbus(&["inbox", "--hook", "text", "--peek"], &env), None).await;
        assert_eq!(out.code, 0, "{out:?}");
        assert!(
            out.stdout
                .starts_with("agentbus: 1 new message for shell-1:\n#4 "),
            "{out:?}"
        );
    }
}

#[tokio::test]
async fn a_hook_that_cannot_reach_the_broker_exits_1_never_2() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let env = vec![
        ("AGENTBUS_URL", format!("http://127.0.0.1:{port}")),
        ("AGENTBUS_PROJECT", Uuid::new_v4().to_string()),
        ("AGENTBUS_AGENT_ID", "shell-1".to_owned()),
    ];
    let out = run(agentbus(&["inbox", "--hook", "claude"], &env), Some("{}")).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stdout, "");
    assert!(out.error_line().contains("no broker at"), "{out:?}");
}

#[tokio::test]
async fn an_unreachable_database_is_one_sentence_without_its_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("postgres://postgres:hunter2@127.0.0.1:{port}/agentbus");
    let env = vec![("RUST_BACKTRACE", "1".to_owned())];
    for args in [
        vec!["migrate", "--database-url", &url],
        vec!["project", "create", "x", "--database-url", &url],
    ] {
        let out = run(agentbus(&args, &env), None).await;
        assert_eq!(out.code, 2, "{out:?}");
        let line = out.error_line();
        assert!(
            line.starts_with(&format!(
                "agentbus: the database at postgres://postgres:***@127.0.0.1:{port}/agentbus is not usable; start PostgreSQL or set DATABASE_URL"
            )),
            "{line}"
        );
        assert!(!line.contains("hunter2"), "{line}");
    }
}
