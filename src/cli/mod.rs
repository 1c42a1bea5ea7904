//! The agent commands of the `agentbus` binary: `send`, `inbox`, `ask`, `reply`, `agents`,
//! `history`, `tail` and `project list`, for shell agents and scripts, and the coordination
//! commands (`claim`, `release`, `claims`, `guard`, `tasks`, `task`: [`coordination`]). They talk to a
//! running broker over its REST API only (docs/PROTOCOL.md, "Command line").

pub mod client;
pub mod coordination;
pub mod error;
pub mod hook;
pub mod output;
pub mod settings;

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use client::Client;
use error::{exit, CliError};
use hook::HookFormat;
use settings::Connection;

/// Longest `inbox --wait`, in seconds (the broker's `wait_ms` bound).
pub const MAX_WAIT_SECONDS: u64 = 60;
/// Longest error text a reply carries, in characters (the broker's bound).
const MAX_ERROR_CHARS: usize = 4_096;

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Send a message (a broadcast unless --to or --to-type).
    Send(SendArgs),
    /// Print the messages owed to this agent, and acknowledge them (exit 1 when none).
    Inbox(InboxArgs),
    /// Send a request and wait for its reply (exit 1 when none came in time).
    Ask(AskArgs),
    /// Answer a message: the reply goes to its sender.
    Reply(ReplyArgs),
    /// List the project's agents: online, type, queue, capabilities.
    Agents(ListArgs),
    /// Print a page of the project's history (exit 1 when it is empty).
    History(HistoryArgs),
    /// Follow the project live: print each message as it is committed, until interrupted.
    Tail(TailArgs),
    /// Claim paths before editing them (exit 4: held by another agent; 5: objected).
    Claim(coordination::ClaimArgs),
    /// Release claims.
    Release(coordination::ReleaseArgs),
    /// List the claims held now (exit 1 when none).
    Claims(coordination::ClaimsArgs),
    /// A git pre-commit hook: refuse a commit touching paths another agent holds (exit 4).
    Guard(coordination::GuardArgs),
    /// List tasks, open ones by default (exit 1 when none).
    Tasks(coordination::TasksArgs),
    /// Take, finish, give back or cancel a task.
    Task {
        #[command(subcommand)]
        command: coordination::TaskCommand,
    },
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// The content; `-` (or nothing, when standard input is not a terminal) reads it from
    /// standard input.
    pub content: Option<String>,
    /// Send to this agent only.
    #[arg(long, conflicts_with = "to_type")]
    pub to: Option<String>,
    /// Send to every agent of this type.
    #[arg(long)]
    pub to_type: Option<String>,
    /// The message type (default `status`).
    #[arg(long = "type")]
    pub message_type: Option<String>,
    /// 0 (critical) to 3 (low); default 2. 0 and 1 count as urgent.
    #[arg(long)]
    pub priority: Option<i64>,
    /// A JSON object stored with the message.
    #[arg(long)]
    pub metadata: Option<String>,
    /// Make this a reply to that message (see also `agentbus reply`).
    #[arg(long)]
    pub reply_to: Option<String>,
    /// Expire the message after this many milliseconds.
    #[arg(long)]
    pub ttl_ms: Option<i64>,
    /// An id of your own: a retry with the same id is stored once.
    #[arg(long)]
    pub client_msg_id: Option<String>,
    /// Send it as a task: exactly one agent takes it (`agentbus task claim`).
    #[arg(long)]
    pub task: bool,
    /// With --task: dead-letter it as `unclaimed` if nobody claims it within this, e.g. 10m.
    #[arg(long, requires = "task", value_parser = coordination::parse_duration)]
    pub claim_timeout: Option<Duration>,
    /// With --task: offer it again if its holder has not finished it within this, e.g. 1h.
    #[arg(long, requires = "task", value_parser = coordination::parse_duration)]
    pub work_timeout: Option<Duration>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct InboxArgs {
    /// Wait up to this many seconds (at most 60) for a message when none is owed.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_SECONDS))]
    pub wait: u64,
    /// Show without acknowledging (they stay owed; with --hook: without marking them told).
    #[arg(long)]
    pub peek: bool,
    /// At most this many messages (1 to 1000; default 50).
    #[arg(long)]
    pub limit: Option<i64>,
    /// Only urgent messages (priority 0 and 1).
    #[arg(long)]
    pub urgent_only: bool,
    /// Print only what is new since this agent was last told, in the format of a coding
    /// agent's hook, and nothing when nothing is new (docs/AGENTS.md).
    #[arg(long, value_enum, conflicts_with_all = ["wait", "urgent_only"])]
    pub hook: Option<HookFormat>,
    /// With --hook claude/codex: the hook event, instead of reading it from the JSON the
    /// tool passes on standard input.
    #[arg(long, requires = "hook")]
    pub hook_event: Option<String>,
    /// The JSON argument Codex passes to its `notify` program; accepted and ignored.
    #[arg(hide = true, requires = "hook")]
    pub notification: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct AskArgs {
    /// The request; `-` (or nothing, when standard input is not a terminal) reads it from
    /// standard input.
    pub content: Option<String>,
    /// Ask this agent.
    #[arg(long, conflicts_with = "to_type")]
    pub to: Option<String>,
    /// Ask every agent of this type (the first reply is printed).
    #[arg(long)]
    pub to_type: Option<String>,
    /// The message type (default `request`).
    #[arg(long = "type")]
    pub message_type: Option<String>,
    /// Seconds to wait for the reply; the broker answers "timeout" after them.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct ReplyArgs {
    /// The id of the message answered.
    pub message_id: String,
    /// The answer; `-` (or nothing, when standard input is not a terminal) reads it from
    /// standard input.
    pub content: Option<String>,
    /// The request failed: the content is the error (the reply has `success: false`).
    #[arg(long)]
    pub error: bool,
    /// The message type (default `response`).
    #[arg(long = "type")]
    pub message_type: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Only messages after this seq (the first page after it).
    #[arg(long)]
    pub after_seq: Option<i64>,
    /// Only messages before this seq (the page just before it).
    #[arg(long)]
    pub before_seq: Option<i64>,
    /// Only messages whose content has every one of these words.
    #[arg(long)]
    pub q: Option<String>,
    /// Only messages of this type.
    #[arg(long = "type")]
    pub message_type: Option<String>,
    /// Only messages from this agent.
    #[arg(long)]
    pub sender: Option<String>,
    /// At most this many messages (1 to 1000; default 50).
    #[arg(long)]
    pub limit: Option<i64>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct TailArgs {
    /// Start after this seq instead of at the head (0: the whole history).
    #[arg(long)]
    pub after_seq: Option<i64>,
    /// Only messages of this type.
    #[arg(long = "type")]
    pub message_type: Option<String>,
    /// Only messages from this agent.
    #[arg(long)]
    pub sender: Option<String>,
    /// Stop after printing this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Milliseconds between two polls of the history.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub interval_ms: u64,
    #[command(flatten)]
    pub connection: Connection,
}

/// Runs an agent command and returns its exit status; errors are printed as one line.
pub fn run(command: AgentCommand) -> ExitCode {
    let hook_mode = matches!(&command, AgentCommand::Inbox(a) if a.hook.is_some());
    let outcome = runtime().and_then(|rt| {
        rt.block_on(async {
            match command {
                AgentCommand::Send(a) => send(a).await,
                AgentCommand::Inbox(a) => inbox(a).await,
                AgentCommand::Ask(a) => ask(a).await,
                AgentCommand::Reply(a) => reply(a).await,
                AgentCommand::Agents(a) => agents(a).await,
                AgentCommand::History(a) => history(a).await,
                AgentCommand::Tail(a) => tail(a).await,
                AgentCommand::Claim(a) => coordination::claim(a).await,
                AgentCommand::Release(a) => coordination::release(a).await,
                AgentCommand::Claims(a) => coordination::claims(a).await,
                AgentCommand::Guard(a) => coordination::guard(a).await,
                AgentCommand::Tasks(a) => coordination::tasks(a).await,
                AgentCommand::Task { command } => coordination::task(command).await,
            }
        })
    });
    finish(outcome, hook_mode)
}

/// `agentbus project list`.
pub fn list_projects(args: ListArgs) -> ExitCode {
    let outcome = runtime().and_then(|rt| {
        rt.block_on(async {
            let client = Client::new(&args.connection)?;
            let body = client.get_ok("/api/projects", &[]).await?;
            let projects = body["projects"].as_array().cloned().unwrap_or_default();
            if args.connection.json {
                print_json(&body)?;
            } else {
                for p in &projects {
                    print_line(&output::project_line(p))?;
                }
            }
            Ok(if projects.is_empty() {
                exit::NOTHING
            } else {
                exit::OK
            })
        })
    });
    finish(outcome, false)
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the async runtime: {e}")))
}

/// The exit status of an outcome. A hook never exits 2 (hooks read 2 as "block"): its
/// errors exit 1.
fn finish(outcome: Result<u8, CliError>, hook_mode: bool) -> ExitCode {
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("agentbus: {e}");
            ExitCode::from(if hook_mode { 1 } else { e.exit_code() })
        }
    }
}

fn print_line(line: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|_| stdout.flush()) {
        Ok(()) => Ok(()),
        // The reader went away (`| head`): nothing more to say.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(CliError::failed(format!(
            "cannot write to standard output: {e}"
        ))),
    }
}

fn print_json(value: &Value) -> Result<(), CliError> {
    print_line(&value.to_string())
}

fn project_path(project: &str, rest: &str) -> String {
    format!("/api/projects/{project}{rest}")
}

fn agent_path(project: &str, agent: &str, rest: &str) -> String {
    project_path(project, &format!("/agents/{}{rest}", encode_segment(agent)))
}

/// A path segment, percent-encoded (agent ids are restricted, but not to URL-safe bytes).
fn encode_segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn parse_metadata(raw: Option<&str>) -> Result<Option<Value>, CliError> {
    raw.map(|text| {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            CliError::failed(format!(
                "--metadata is not JSON ({e}); give a JSON object, e.g. '{{\"pr\": 12}}'"
            ))
        })?;
        if value.is_object() {
            Ok(value)
        } else {
            Err(CliError::failed(
                "--metadata must be a JSON object, e.g. '{\"pr\": 12}'",
            ))
        }
    })
    .transpose()
}

/// A body without its absent fields.
fn body(fields: Vec<(&str, Option<Value>)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect(),
    )
}

async fn send(a: SendArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let agent = c.agent_id()?.to_owned();
    let metadata = parse_metadata(a.metadata.as_deref())?;
    let content = settings::content(a.content)?;
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let request = body(vec![
        ("sender_agent_id", Some(json!(agent))),
        ("sender_agent_type", Some(json!(c.agent_type))),
        ("content", Some(json!(content))),
        ("type", a.message_type.map(Value::from)),
        ("to", a.to.map(Value::from)),
        ("to_type", a.to_type.map(Value::from)),
        ("priority", a.priority.map(Value::from)),
        ("metadata", metadata),
        ("reply_to", a.reply_to.map(Value::from)),
        ("ttl_ms", a.ttl_ms.map(Value::from)),
        ("client_msg_id", a.client_msg_id.map(Value::from)),
        ("task", a.task.then_some(json!(true))),
        (
            "claim_timeout_ms",
            a.claim_timeout.map(|d| json!(d.as_millis() as u64)),
        ),
        (
            "work_timeout_ms",
            a.work_timeout.map(|d| json!(d.as_millis() as u64)),
        ),
    ]);
    let stored = client
        .post_ok(&project_path(&project, "/messages"), &[], &request)
        .await?;
    if c.json {
        print_json(&stored)?;
    } else {
        print_line(&output::message_line(&stored))?;
    }
    Ok(exit::OK)
}

async fn inbox(a: InboxArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let agent = c.agent_id()?.to_owned();
    if let Some(format) = a.hook {
        let event = match (&a.hook_event, format) {
            (Some(event), _) => event.clone(),
            (None, HookFormat::Text) => String::new(),
            (None, _) => hook::event_name(&read_hook_input()),
        };
        return notify(c, &agent, format, &event, a.peek, a.limit).await;
    }
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let mut query = vec![
        ("agent_type", c.agent_type.clone()),
        ("wait_ms", (a.wait * 1000).to_string()),
        ("ack", (!a.peek).to_string()),
    ];
    if let Some(limit) = a.limit {
        query.push(("limit", limit.to_string()));
    }
    if a.urgent_only {
        query.push(("urgent_only", "true".to_owned()));
    }
    let answer = client
        .get(
            &agent_path(&project, &agent, "/inbox"),
            &query,
            Duration::from_secs(a.wait),
        )
        .await?;
    let page = client.ok(answer)?;
    let messages = page["messages"].as_array().cloned().unwrap_or_default();
    if c.json {
        print_json(&page)?;
    } else {
        for m in &messages {
            print_line(&output::message_line(m))?;
        }
        if let Some(more) = page["remaining"].as_i64().filter(|&n| n > 0) {
            eprintln!("agentbus: {more} more owed; run `agentbus inbox` again to read them");
        }
    }
    Ok(if messages.is_empty() {
        exit::NOTHING
    } else {
        exit::OK
    })
}

/// The JSON a hook's tool passes on standard input, read for at most two seconds (a hook
/// started with an open but silent standard input must not hang).
fn read_hook_input() -> String {
    if std::io::stdin().is_terminal() {
        return String::new();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::stdin().take(1 << 20).read_to_string(&mut text);
        let _ = tx.send(text);
    });
    rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default()
}

/// `inbox --hook`: what is new since the agent was last told, through the broker's
/// notification watermark, which this call advances unless `peek`.
async fn notify(
    c: &Connection,
    agent: &str,
    format: HookFormat,
    event: &str,
    peek: bool,
    limit: Option<i64>,
) -> Result<u8, CliError> {
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let mut query = vec![
        ("agent_type", c.agent_type.clone()),
        ("peek", peek.to_string()),
    ];
    if let Some(limit) = limit {
        query.push(("limit", limit.to_string()));
    }
    let news = client
        .post_ok(
            &agent_path(&project, agent, "/notifications"),
            &query,
            &json!({}),
        )
        .await?;
    let messages = news["messages"].as_array().cloned().unwrap_or_default();
    let remaining = news["remaining"].as_i64().unwrap_or(0);
    if let Some(text) = hook::render(format, event, agent, &messages, remaining) {
        print_line(&text)?;
    }
    Ok(exit::OK)
}

async fn ask(a: AskArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let agent = c.agent_id()?.to_owned();
    let content = settings::content(a.content)?;
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let request = body(vec![
        ("sender_agent_id", Some(json!(agent))),
        ("sender_agent_type", Some(json!(c.agent_type))),
        ("content", Some(json!(content))),
        (
            "type",
            Some(json!(a.message_type.unwrap_or_else(|| "request".into()))),
        ),
        ("to", a.to.map(Value::from)),
        ("to_type", a.to_type.map(Value::from)),
        ("timeout_ms", Some(json!(a.timeout * 1000))),
    ]);
    let answer = client
        .post(
            &project_path(&project, "/requests"),
            &[],
            &request,
            Duration::from_secs(a.timeout),
        )
        .await?;
    match answer.status {
        200 => {
            if c.json {
                print_json(&answer.body)?;
            } else {
                print_line(&output::message_line(&answer.body["response"]))?;
            }
            Ok(exit::OK)
        }
        504 if answer.body.get("response").is_some() => {
            if c.json {
                print_json(&answer.body)?;
            }
            eprintln!(
                "agentbus: no reply within {} s (request #{})",
                a.timeout, answer.body["request"]["seq"]
            );
            Ok(exit::NOTHING)
        }
        _ => Err(client.ok(answer).err().unwrap_or_else(|| {
            CliError::failed("the broker answered the request in an unexpected way")
        })),
    }
}

async fn reply(a: ReplyArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let agent = c.agent_id()?.to_owned();
    let content = settings::content(a.content)?;
    if uuid::Uuid::parse_str(&a.message_id).is_err() {
        return Err(CliError::failed(format!(
            "{:?} is not a message id; give the id (a UUID) shown after `agentbus reply` in the request's line",
            a.message_id
        )));
    }
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    // The answered message's sender is the recipient; for a request the broker routes the
    // reply to the requester in any case.
    let original = client
        .get_ok(
            &project_path(&project, &format!("/messages/{}", a.message_id)),
            &[],
        )
        .await?;
    let to = original["message"]["sender_agent_id"]
        .as_str()
        .map(str::to_owned);
    let error_text = a
        .error
        .then(|| content.chars().take(MAX_ERROR_CHARS).collect::<String>());
    let request = body(vec![
        ("sender_agent_id", Some(json!(agent))),
        ("sender_agent_type", Some(json!(c.agent_type))),
        ("content", Some(json!(content))),
        (
            "type",
            Some(json!(a.message_type.unwrap_or_else(|| "response".into()))),
        ),
        ("reply_to", Some(json!(a.message_id))),
        ("to", to.map(Value::from)),
        ("success", Some(json!(!a.error))),
        ("error", error_text.map(Value::from)),
    ]);
    let stored = client
        .post_ok(&project_path(&project, "/messages"), &[], &request)
        .await?;
    if c.json {
        print_json(&stored)?;
    } else {
        print_line(&output::message_line(&stored))?;
    }
    Ok(exit::OK)
}

async fn agents(a: ListArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let list = client
        .get_ok(&project_path(&project, "/agents"), &[])
        .await?;
    let agents = list["agents"].as_array().cloned().unwrap_or_default();
    if c.json {
        print_json(&list)?;
    } else {
        for agent in &agents {
            print_line(&output::agent_line(agent))?;
        }
    }
    Ok(if agents.is_empty() {
        exit::NOTHING
    } else {
        exit::OK
    })
}

fn history_query(
    after_seq: Option<i64>,
    before_seq: Option<i64>,
    q: Option<&str>,
    message_type: Option<&str>,
    sender: Option<&str>,
    limit: Option<i64>,
) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if let Some(s) = after_seq {
        query.push(("after_seq", s.to_string()));
    }
    if let Some(s) = before_seq {
        query.push(("before_seq", s.to_string()));
    }
    if let Some(q) = q {
        query.push(("q", q.to_owned()));
    }
    if let Some(t) = message_type {
        query.push(("type", t.to_owned()));
    }
    if let Some(s) = sender {
        query.push(("sender", s.to_owned()));
    }
    if let Some(l) = limit {
        query.push(("limit", l.to_string()));
    }
    query
}

async fn history(a: HistoryArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let query = history_query(
        a.after_seq,
        a.before_seq,
        a.q.as_deref(),
        a.message_type.as_deref(),
        a.sender.as_deref(),
        a.limit,
    );
    let page = client
        .get_ok(&project_path(&project, "/messages"), &query)
        .await?;
    let messages = page["messages"].as_array().cloned().unwrap_or_default();
    if c.json {
        print_json(&page)?;
    } else {
        for m in &messages {
            print_line(&output::message_line(m))?;
        }
    }
    Ok(if messages.is_empty() {
        exit::NOTHING
    } else {
        exit::OK
    })
}

/// Largest page `tail` asks for.
const TAIL_PAGE: i64 = 1_000;

async fn tail(a: TailArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let path = project_path(&project, "/messages");
    let mut last = match a.after_seq {
        Some(seq) => seq,
        None => {
            let head = client.get_ok(&path, &[("limit", "1".to_owned())]).await?;
            head["head_seq"].as_i64().unwrap_or(0)
        }
    };
    let mut printed = 0u64;
    let mut failing = false;
    loop {
        let query = history_query(
            Some(last),
            None,
            None,
            a.message_type.as_deref(),
            a.sender.as_deref(),
            Some(TAIL_PAGE),
        );
        let page = match client.get_ok(&path, &query).await {
            Ok(page) => {
                if failing {
                    eprintln!("agentbus: following again");
                    failing = false;
                }
                page
            }
            Err(e) => {
                // The broker restarting is no reason to stop following it.
                if !failing {
                    eprintln!("agentbus: {e}; retrying");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
                continue;
            }
        };
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        for m in &messages {
            if c.json {
                print_json(m)?;
            } else {
                print_line(&output::message_line(m))?;
            }
            last = last.max(m["seq"].as_i64().unwrap_or(last));
            printed += 1;
            if a.count.is_some_and(|n| printed >= n) {
                return Ok(exit::OK);
            }
        }
        if (messages.len() as i64) < TAIL_PAGE {
            tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Line {
        #[command(subcommand)]
        command: AgentCommand,
    }

    fn parses(args: &[&str]) -> bool {
        Line::try_parse_from(std::iter::once("agentbus").chain(args.iter().copied())).is_ok()
    }

    #[test]
    fn usage_is_checked_before_anything_is_sent() {
        assert!(parses(&["inbox", "--wait", "60", "--peek"]));
        assert!(!parses(&["inbox", "--wait", "61"]));
        assert!(parses(&["inbox", "--hook", "claude", "--peek"]));
        assert!(!parses(&["inbox", "--hook", "claude", "--wait", "5"]));
        assert!(!parses(&["inbox", "--hook", "slack"]));
        // Codex's notify appends a JSON argument: accepted with --hook only.
        assert!(parses(&[
            "inbox",
            "--hook",
            "text",
            r#"{"type":"agent-turn-complete"}"#
        ]));
        assert!(!parses(&["inbox", "stray"]));
        assert!(!parses(&["send", "--to", "a", "--to-type", "b", "x"]));
        assert!(!parses(&["ask", "--timeout", "0", "x"]));
        assert!(!parses(&["reply"]));
        assert!(parses(&["tail", "--count", "3", "--interval-ms", "50"]));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_segment("web-1.a_b~"), "web-1.a_b~");
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn metadata_must_be_an_object() {
        assert_eq!(parse_metadata(None).unwrap(), None);
        assert_eq!(
            parse_metadata(Some(r#"{"pr": 12}"#)).unwrap(),
            Some(json!({"pr": 12}))
        );
        assert!(parse_metadata(Some("[1]")).is_err());
        assert!(parse_metadata(Some("{"))
            .unwrap_err()
            .message
            .contains("not JSON"));
    }

    #[test]
    fn absent_fields_are_left_out() {
        assert_eq!(
            body(vec![("a", Some(json!(1))), ("b", None)]),
            json!({"a": 1})
        );
    }

    #[test]
    fn history_query_has_what_was_given() {
        assert_eq!(
            history_query(
                Some(3),
                None,
                Some("retry policy"),
                None,
                Some("web"),
                Some(10)
            ),
            vec![
                ("after_seq", "3".to_owned()),
                ("q", "retry policy".to_owned()),
                ("sender", "web".to_owned()),
                ("limit", "10".to_owned()),
            ]
        );
        assert!(history_query(None, None, None, None, None, None).is_empty());
    }
}
