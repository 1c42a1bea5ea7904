//! Test harness: a broker on port 0 against a fresh database, and WebSocket agents that speak
//! the real protocol.

use std::time::Duration;

use actix_web::dev::ServerHandle;
use agentbus::config::Settings;
use agentbus::startup::Application;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

/// The PostgreSQL server the tests create their databases on.
pub fn server_url() -> String {
    std::env::var("AGENTBUS_TEST_SERVER")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Longest a test waits for something that should happen promptly: it only catches hangs.
/// It bounds each wait as a whole, from the moment it starts: frames that arrive meanwhile
/// (heartbeat pings, other agents' messages) do not extend it.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// When a wait that starts now must be over.
pub fn deadline() -> Instant {
    Instant::now() + PATIENCE
}

/// A fresh database name on the test server; the database (created by the first broker that
/// connects to it) is dropped `WITH (FORCE)` when the guard is, so a test that fails cleans
/// up too, panicking or not. A test that runs brokers in other processes on the database of
/// a `TestApp` declares them after the app: locals are dropped in reverse order, so the
/// processes are killed before the database is dropped.
struct TestDatabase {
    url: String,
    name: String,
}

impl TestDatabase {
    fn new() -> TestDatabase {
        let name = format!("t_{}", Uuid::new_v4().simple());
        TestDatabase {
            url: format!("{}/{name}", server_url()),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        // On its own thread: this may run inside the test's runtime.
        let _ = std::thread::spawn(move || drop_database(&name)).join();
    }
}

pub struct TestApp {
    pub port: u16,
    pub database_url: String,
    pub http: reqwest::Client,
    handle: ServerHandle,
    /// The database this app created, if it owns it; dropped after the app stopped.
    database: Option<TestDatabase>,
}

impl TestApp {
    /// A broker with default settings on a fresh database.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// A broker on a fresh database, with settings adjusted by `tweak`.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
        // Dropped even if the broker fails to start.
        let database = TestDatabase::new();
        let mut app = Self::spawn_on(&database.url, tweak).await;
        app.database = Some(database);
        app
    }

    /// A broker on the given database (created if missing, never dropped by the harness).
    pub async fn spawn_on(database_url: &str, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        let mut settings = Settings {
            bind: "127.0.0.1:0".into(),
            database_url: database_url.to_owned(),
            workers: 2,
            // Tests that are not about rate limits send bursts no agent would; the limits
            // have their own test.
            rate_per_session: 0,
            rate_per_project: 0,
            ..Settings::default()
        };
        tweak(&mut settings);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                match Application::build(settings).await {
                    Ok(app) => {
                        let _ = tx.send(Ok((app.port(), app.handle())));
                        let _ = app.run_until_stopped().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                    }
                }
            })
        });
        let (port, handle) = tokio::time::timeout(PATIENCE, rx)
            .await
            .expect("the broker did not start within the patience bound")
            .expect("the broker thread died")
            .unwrap_or_else(|e| panic!("the broker did not start: {e}"));
        TestApp {
            port,
            database_url: database_url.to_owned(),
            database: None,
            // Every request, body included, within the patience bound.
            http: reqwest::Client::builder()
                .timeout(PATIENCE)
                .build()
                .expect("an HTTP client"),
            handle,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn ws_url(&self, project: Uuid, query: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/ws/agent/messages/{project}?{query}",
            self.port
        )
    }

    pub async fn create_project(&self, name: &str) -> Uuid {
        let response = self
            .http
            .post(self.url("/api/projects"))
            .json(&json!({ "name": name }))
            .send()
            .await
            .expect("POST /api/projects");
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("project JSON");
        body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("project id")
    }

    /// Connects an agent and reads its welcome frame.
    pub async fn connect(&self, project: Uuid, agent_id: &str, agent_type: &str) -> Agent {
        Agent::connect(&self.ws_url(
            project,
            &format!("agent_id={agent_id}&agent_type={agent_type}"),
        ))
        .await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// A member of a project as `GET /api/projects/{id}/agents` lists it.
    pub async fn member(&self, project: Uuid, agent_id: &str) -> Option<Value> {
        let (_, body) = self
            .get_json(&format!("/api/projects/{project}/agents"))
            .await;
        body["agents"]
            .as_array()?
            .iter()
            .find(|m| m["agent_id"] == agent_id)
            .cloned()
    }

    /// A direct connection to the broker's database, to check what was stored.
    pub async fn db(&self) -> AsyncPgConnection {
        tokio::time::timeout(PATIENCE, AsyncPgConnection::establish(&self.database_url))
            .await
            .expect("connecting to the test database hung")
            .expect("connect to the test database")
    }

    pub fn stop(&self) {
        // The stop command is sent at once; its completion is not awaited here.
        drop(self.handle.stop(false));
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop();
        // Then `database`, if any, is dropped: a failed test's database is cleaned up too.
    }
}

fn drop_database(name: &str) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let drop = async {
        let _ = agentbus::db::drop_database(&server_url(), name).await;
    };
    // Bounded, so that a test never hangs in its clean-up.
    let _ = rt.block_on(async { tokio::time::timeout(PATIENCE, drop).await });
}

/// A WebSocket client speaking protocol v1. Like a real client it reads its socket all the
/// time (in a background task), so pings are answered promptly; frames wait in a queue
/// until the test looks at them.
pub struct Agent {
    sink: SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>,
    frames: mpsc::UnboundedReceiver<Result<Message, tungstenite::Error>>,
    pub welcome: Value,
}

impl Agent {
    pub async fn connect(url: &str) -> Agent {
        let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
            .await
            .expect("the WebSocket upgrade hung")
            .expect("WebSocket connect");
        let (sink, mut stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(frame) = stream.next().await {
                if tx.send(frame).is_err() {
                    break;
                }
            }
        });
        let mut agent = Agent {
            sink,
            frames,
            welcome: Value::Null,
        };
        agent.welcome = agent.expect_op("welcome").await;
        agent
    }

    /// Connects without reading anything (a peer that never reads, never answers pings).
    pub async fn connect_raw(
        url: &str,
    ) -> Result<WebSocketStream<MaybeTlsStream<TcpStream>>, tungstenite::Error> {
        tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
            .await
            .expect("the WebSocket upgrade hung")
            .map(|(ws, _)| ws)
    }

    pub fn session_id(&self) -> Uuid {
        self.welcome["session_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("session_id")
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_message(Message::text(text)).await;
    }

    /// Sends a frame; a broker that stops reading fails the test instead of blocking it.
    pub async fn send_message(&mut self, message: Message) {
        tokio::time::timeout(PATIENCE, self.sink.send(message))
            .await
            .expect("sending a frame hung")
            .expect("send a frame");
    }

    /// Sends and waits for the `sent` receipt, passing over deliveries of others' messages
    /// (failing on anything else).
    pub async fn send_ok(&mut self, frame: Value) -> Value {
        self.send(frame).await;
        let deadline = deadline();
        loop {
            let next = self.next_json_until(deadline).await;
            match next["op"].as_str() {
                Some("sent") => return next,
                Some("message") => continue,
                _ => panic!("expected a sent frame, got {next}"),
            }
        }
    }

    /// Sends `count` status messages pipelined (every frame before the first receipt is
    /// read), with contents `"{tag}/{n}"` and client_msg_ids `"{tag}-{n}"`, and returns the
    /// seqs of their receipts in the order they came, passing over deliveries of others'
    /// messages (failing on anything else).
    pub async fn send_pipelined(&mut self, tag: &str, count: usize) -> Vec<i64> {
        for n in 0..count {
            self.send(json!({"type": "status", "content": format!("{tag}/{n}"), "client_msg_id": format!("{tag}-{n}")}))
                .await;
        }
        let mut seqs = Vec::with_capacity(count);
        while seqs.len() < count {
            let frame = self.next_json().await;
            match frame["op"].as_str() {
                Some("sent") => seqs.push(frame["seq"].as_i64().expect("seq")),
                Some("message") => {}
                _ => panic!("unexpected frame {frame}"),
            }
        }
        seqs
    }

    /// The next text frame, as JSON (pings and pongs are skipped).
    pub async fn next_json(&mut self) -> Value {
        self.next_json_until(deadline()).await
    }

    /// The next text frame, as JSON, which must arrive before `deadline`.
    pub async fn next_json_until(&mut self, deadline: Instant) -> Value {
        match self.next_event_until(deadline).await {
            Event::Json(v) => v,
            Event::Closed(code) => panic!("connection closed ({code:?}) while waiting for a frame"),
        }
    }

    /// The next text frame or the end of the connection (pings and pongs are skipped).
    pub async fn next_event(&mut self) -> Event {
        self.next_event_until(deadline()).await
    }

    /// The next text frame or the end of the connection, which must come before `deadline`:
    /// pings and pongs skipped meanwhile do not extend it.
    pub async fn next_event_until(&mut self, deadline: Instant) -> Event {
        loop {
            let next = tokio::time::timeout_at(deadline, self.frames.recv())
                .await
                .expect("no frame within the patience bound");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Event::Json(
                        serde_json::from_str(&text).expect("the broker sent invalid JSON"),
                    )
                }
                Some(Ok(Message::Close(frame))) => return Event::Closed(frame.map(|f| f.code)),
                Some(Ok(Message::Binary(_))) => panic!("the broker sent a binary frame"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Event::Closed(None),
            }
        }
    }

    /// The next frame, which must have this `op`.
    pub async fn expect_op(&mut self, op: &str) -> Value {
        let frame = self.next_json().await;
        assert_eq!(frame["op"], op, "expected a {op} frame, got {frame}");
        frame
    }

    /// The next frame, which must be an error with this code.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let frame = self.expect_op("error").await;
        assert_eq!(frame["code"], code, "unexpected error {frame}");
        frame
    }

    /// Waits for the broker to close the connection and returns its close code.
    pub async fn expect_close(&mut self) -> Option<CloseCode> {
        let deadline = deadline();
        loop {
            match self.next_event_until(deadline).await {
                Event::Closed(code) => return code,
                Event::Json(_) => continue,
            }
        }
    }

    /// The next WebSocket message of any kind, unparsed (`None` once the connection ended).
    pub async fn raw_next(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        tokio::time::timeout(PATIENCE, self.frames.recv())
            .await
            .expect("no WebSocket message within the patience bound")
    }

    /// Starts the closing handshake. Not awaited to the end: with the read half in another
    /// task, the sink may never be woken for the server's answer, and nothing here needs it.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.sink.close()).await;
    }
}

pub enum Event {
    Json(Value),
    Closed(Option<CloseCode>),
}

/// A spec-shaped send frame.
pub fn status(content: &str) -> Value {
    json!({"agent_type": "coder", "type": "status", "content": content, "metadata": {}})
}

/// The JSON body of a GET of `url`, or `None` if the request or its body failed: for
/// polling, with [`eventually`], a broker that may not be up yet.
pub async fn fetch_json(http: &reqwest::Client, url: &str) -> Option<Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

/// Polls `check` until it returns `Some`, failing after `PATIENCE`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = deadline();
    loop {
        // A check that hangs (a request, a query) counts against the same deadline.
        let checked = tokio::time::timeout_at(deadline, check())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        if let Some(value) = checked {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
