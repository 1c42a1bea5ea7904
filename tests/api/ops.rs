//! Operations: `/readyz` follows the database and the migrations, `/metrics` follows the
//! traffic, and `agentbus serve` layers flags over environment over a configuration file.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use diesel_async::RunQueryDsl;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::crash::BrokerProcess;
use crate::helpers::{eventually, status, TestApp};
use crate::pg_cluster::PgCluster;

#[tokio::test]
async fn readyz_is_ready_on_a_fresh_broker() {
    let app = TestApp::spawn().await;
    let (code, body) = app.get_json("/readyz").await;
    // It names the node that answered (a generated id unless one was configured).
    let node_id = body["node_id"].as_str().unwrap_or_default().to_owned();
    assert!(!node_id.is_empty(), "{body}");
    assert_eq!(
        (code, body),
        (200, json!({"status": "ready", "node_id": node_id}))
    );
    let (code, body) = app.get_json("/healthz").await;
    assert_eq!((code, body), (200, json!({"status": "ok"})));
}

#[tokio::test]
async fn readyz_is_not_ready_while_a_migration_is_pending() {
    let app = TestApp::spawn().await;
    let mut conn = app.db().await;
    // As if the newest migration had not been applied.
    diesel::sql_query(
        "DELETE FROM __diesel_schema_migrations \
         WHERE version = (SELECT max(version) FROM __diesel_schema_migrations)",
    )
    .execute(&mut conn)
    .await
    .expect("forget the newest migration");
    let (code, body) = app.get_json("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    let reason = body["reason"].as_str().expect("a reason");
    assert!(reason.contains("migrations not applied"), "{reason}");
}

#[tokio::test]
async fn readyz_is_503_while_the_database_is_down_and_ready_again_after() {
    let cluster = PgCluster::start();
    let app = TestApp::spawn_on(&cluster.url("agentbus"), |s| s.db_timeout_ms = 1_000).await;
    assert_eq!(app.get_json("/readyz").await.0, 200);

    cluster.halt();
    let asked = Instant::now();
    let (code, body) = app.get_json("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert!(
        body["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "readyz took {:?} with a 1 s database timeout",
        asked.elapsed()
    );
    // The process is alive all the same.
    assert_eq!(app.get_json("/healthz").await.0, 200);

    cluster.resume();
    eventually("readyz to recover", || async {
        (app.get_json("/readyz").await.0 == 200).then_some(())
    })
    .await;
    app.stop();
}

/// The value of the sample `series` (name and labels, as written) in an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

async fn scrape(app: &TestApp) -> String {
    let response = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.expect("the metrics");
    assert!(text.ends_with("# EOF\n"), "{text}");
    text
}

/// Waits until `series` has the value `check` wants, and returns it.
async fn wait_for(app: &TestApp, series: &str, check: impl Fn(f64) -> bool) -> f64 {
    eventually(series, || async {
        sample(&scrape(app).await, series).filter(|&v| check(v))
    })
    .await
}

#[tokio::test]
async fn metrics_follow_connections_messages_and_errors() {
    let app = TestApp::spawn().await;
    let text = scrape(&app).await;
    for series in [
        "agentbus_connections",
        "agentbus_messages_in_total",
        "agentbus_deliveries_total",
        "agentbus_delivered_bytes_total",
        "agentbus_persistence_batch_rows_count",
        "agentbus_persistence_commit_seconds_count",
        "agentbus_rate_limited_total",
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series} in:\n{text}");
    }
    // A series per error code, from the code's first occurrence.
    assert_eq!(
        sample(&text, "agentbus_errors_total{code=\"invalid_json\"}"),
        None
    );

    let project = app.create_project("metrics").await;
    let mut a = app.connect(project, "a", "coder").await;
    wait_for(&app, "agentbus_connections", |v| v == 1.0).await;
    let mut b = app.connect(project, "b", "coder").await;
    wait_for(&app, "agentbus_connections", |v| v == 2.0).await;

    for i in 0..3 {
        a.send_ok(status(&format!("step {i}"))).await;
    }
    for _ in 0..3 {
        b.expect_op("message").await;
    }
    wait_for(&app, "agentbus_messages_in_total", |v| v == 3.0).await;
    // a's own messages are not delivered to a: three deliveries, all to b.
    wait_for(&app, "agentbus_deliveries_total", |v| v == 3.0).await;
    let bytes = wait_for(&app, "agentbus_delivered_bytes_total", |v| v > 0.0).await;
    assert!(bytes > 3.0 * "step 0".len() as f64, "{bytes} bytes");
    let text = scrape(&app).await;
    let rows = sample(&text, "agentbus_persistence_batch_rows_sum").unwrap();
    let batches = sample(&text, "agentbus_persistence_batch_rows_count").unwrap();
    assert_eq!(rows, 3.0, "{text}");
    assert!((1.0..=3.0).contains(&batches), "{text}");
    assert_eq!(
        sample(&text, "agentbus_persistence_commit_seconds_count"),
        Some(batches),
        "{text}"
    );

    // A bad frame: the error frame is counted under its code.
    a.send_text("this is not JSON").await;
    a.expect_error("invalid_json").await;
    a.send_message(Message::binary(vec![1, 2, 3])).await;
    a.expect_error("binary_not_supported").await;
    wait_for(&app, "agentbus_errors_total{code=\"invalid_json\"}", |v| {
        v == 1.0
    })
    .await;
    wait_for(
        &app,
        "agentbus_errors_total{code=\"binary_not_supported\"}",
        |v| v == 1.0,
    )
    .await;

    a.close().await;
    wait_for(&app, "agentbus_connections", |v| v == 1.0).await;
    b.close().await;
    wait_for(&app, "agentbus_connections", |v| v == 0.0).await;
    // `/api/stats` is fed by the same calls.
    let (_, stats) = app.get_json("/api/stats").await;
    assert_eq!(
        (stats["messages_in"].clone(), stats["deliveries"].clone()),
        (json!(3), json!(3))
    );
}

/// A configuration file in the temp directory, removed when dropped.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let path =
            std::env::temp_dir().join(format!("agentbus-ops-{}.toml", Uuid::new_v4().simple()));
        std::fs::write(&path, text).expect("write the configuration file");
        ConfigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `agentbus ARGS` with exactly the environment `env` (nothing inherited).
fn agentbus(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentbus"));
    command
        .args(args)
        .env_clear()
        .env("RUST_LOG", "info")
        .envs(env.iter().copied());
    command
}

async fn project_names(port: u16) -> Vec<String> {
    let body: Value = reqwest::get(format!("http://127.0.0.1:{port}/api/projects"))
        .await
        .expect("GET /api/projects")
        .json()
        .await
        .expect("JSON");
    body["projects"]
        .as_array()
        .expect("a list of projects")
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn the_binary_takes_flags_over_environment_over_the_file() {
    // A database with a project in it, to recognise it through a broker process.
    let app = TestApp::spawn().await;
    app.create_project("layered").await;
    // A port that is taken: a broker told to listen there fails to start.
    let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
    let taken = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());

    let file = ConfigFile::new(&format!(
        "bind = {taken:?}\ndatabase_url = {:?}\nworkers = 1\n",
        app.database_url
    ));
    // The environment beats the file: the broker listens on the port the environment names,
    // on the database the file names (AGENTBUS_CONFIG names the file).
    let broker = BrokerProcess::spawn(agentbus(
        &["serve"],
        &[
            ("AGENTBUS_CONFIG", file.path()),
            ("AGENTBUS_BIND", "127.0.0.1:0"),
        ],
    ));
    assert!(
        project_names(broker.port)
            .await
            .contains(&"layered".to_owned()),
        "the broker does not use the file's database"
    );
    drop(broker);

    // A flag beats the environment.
    let broker = BrokerProcess::spawn(agentbus(
        &["serve", "--config", file.path(), "--bind", "127.0.0.1:0"],
        &[("AGENTBUS_BIND", &taken)],
    ));
    assert!(project_names(broker.port)
        .await
        .contains(&"layered".to_owned()));
    drop(broker);

    // And the file's value is used when nothing overrides it.
    let output = agentbus(&["serve", "--config", file.path()], &[])
        .output()
        .expect("run the binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("binding {taken}")), "{stderr}");
    drop(listener);
}

#[tokio::test]
async fn the_binary_refuses_an_unknown_key_by_name() {
    let file = ConfigFile::new("bind = \"127.0.0.1:0\"\nmax_frame_byte = 1024\n");
    // Should the file be accepted, the broker would find no database there and stop.
    let output = agentbus(
        &["serve", "--config", file.path()],
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")],
    )
    .output()
    .expect("run the binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown field `max_frame_byte`"),
        "{stderr}"
    );
    assert!(stderr.contains(file.path()), "{stderr}");
}
