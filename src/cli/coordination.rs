//! The coordination commands: `agentbus claim`, `release`, `claims` and `guard` (file
//! claims), `agentbus tasks` and `agentbus task claim|done|fail|release|cancel` (tasks). They
//! speak to a running broker over its REST API (docs/PROTOCOL.md, "Command line").

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::client::Client;
use super::error::{exit, CliError};
use super::settings::Connection;
use super::{body, encode_segment, print_json, print_line, project_path};
use crate::domain::claims::PathPattern;

/// A duration on the command line: `90s`, `30m`, `2h`, `1h 30m` (humantime), or a plain
/// number of seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    if let Ok(seconds) = raw.trim().parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(raw)
        .map_err(|e| format!("{raw:?} is not a duration ({e}); e.g. 90s, 30m, 2h"))
}

fn millis(d: Duration) -> Value {
    json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Args, Debug)]
pub struct ClaimArgs {
    /// Paths or globs relative to the repository root: `src/api/**`, `docs/*.md`, `Cargo.toml`.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// A shared claim: other shared claims on these paths are allowed.
    #[arg(long)]
    pub shared: bool,
    /// How long the claim lasts (default: the broker's claim_default_ttl_ms), e.g. 45m.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Announce the claim and let other agents object for this long first (the command waits).
    #[arg(long, value_parser = parse_duration)]
    pub objection_window: Option<Duration>,
    /// Why: shown to the other agents.
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// The claims to release (their ids).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub claim_ids: Vec<String>,
    /// Release every claim this agent holds.
    #[arg(long)]
    pub all: bool,
    /// Release another agent's claim (needs the admin token, or an unbound project token).
    #[arg(long, requires = "reason", conflicts_with = "all")]
    pub force: bool,
    /// Why (with --force): shown to the other agents.
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct ClaimsArgs {
    /// Every claim, in every state, newest first (default: those held now).
    #[arg(long)]
    pub all: bool,
    /// Only this agent's claims.
    #[arg(long)]
    pub agent: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct GuardArgs {
    /// Check these paths instead of the files staged for the commit.
    pub paths: Vec<String>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct TasksArgs {
    /// open (default), claimed, done, failed, canceled, unclaimed or all.
    #[arg(long, default_value = "open")]
    pub state: String,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Take an open task (exit 4 when another agent was first).
    Claim(TaskIdArgs),
    /// Finish your task; the result goes to its sender.
    Done(TaskResultArgs),
    /// Finish your task as failed; the error goes to its sender.
    Fail(TaskResultArgs),
    /// Give your task back: it is open again, offered again.
    Release(TaskIdArgs),
    /// Cancel a task you sent.
    Cancel(TaskCancelArgs),
}

#[derive(Args, Debug)]
pub struct TaskIdArgs {
    /// The task's id (its message's id).
    pub task_id: String,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct TaskResultArgs {
    pub task_id: String,
    /// The result (done) or the error (fail); `-` reads it from standard input.
    pub result: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct TaskCancelArgs {
    pub task_id: String,
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

/// `id: agent holds paths (mode) until T: reason`.
pub fn claim_line(c: &Value) -> String {
    let s = |k: &str| c[k].as_str().unwrap_or("?").to_owned();
    let paths = c["paths"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let mode = if c["shared"] == true {
        "shared"
    } else {
        "exclusive"
    };
    let what = match c["state"].as_str() {
        Some("granted") => format!("holds {paths} ({mode}) until {}", s("expires_at")),
        Some("pending") => format!(
            "asks for {paths} ({mode}); objections until {}",
            s("decide_at")
        ),
        Some(state) => format!("{state}: {paths} ({mode})"),
        None => paths,
    };
    let reason = c["reason"]
        .as_str()
        .map(|r| format!(": {}", super::output::compact(r)))
        .unwrap_or_default();
    format!("{} {} {what}{reason}", s("id"), s("agent_id"))
}

/// `#seq id [state] sender → to: content`.
pub fn task_line(t: &Value) -> String {
    let to = match (t["to"].as_str(), t["to_type"].as_str()) {
        (Some(agent), _) => agent.to_owned(),
        (None, Some(agent_type)) => format!("type:{agent_type}"),
        (None, None) => "all".to_owned(),
    };
    let state = match (t["state"].as_str(), t["holder"].as_str()) {
        (Some("open"), _) | (_, None) => t["state"].as_str().unwrap_or("?").to_owned(),
        (Some(state), Some(holder)) => format!("{state} by {holder}"),
        (None, Some(_)) => "?".to_owned(),
    };
    let mut line = format!(
        "#{} {} [{state}] {} → {to}: {}",
        t["seq"],
        t["id"].as_str().unwrap_or("?"),
        t["sender_agent_id"].as_str().unwrap_or("?"),
        super::output::compact(t["content"].as_str().unwrap_or(""))
    );
    if let Some(result) = t["result"].as_str() {
        line.push_str(&format!(" ⇒ {}", super::output::compact(result)));
    }
    line
}

fn conflict_lines(body: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    for c in body["conflicts"].as_array().into_iter().flatten() {
        let paths: Vec<&str> = c["paths"]
            .as_array()
            .map(|p| p.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        lines.push(format!(
            "  {} {} {} ({}) until {}{}",
            c["holder"].as_str().unwrap_or("?"),
            if c["state"] == "pending" {
                "asked for"
            } else {
                "holds"
            },
            paths.join(", "),
            if c["shared"] == true {
                "shared"
            } else {
                "exclusive"
            },
            c["expires_at"]
                .as_str()
                .or(c["decide_at"].as_str())
                .unwrap_or("?"),
            c["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ));
    }
    for o in body["objections"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  {} objected: {}",
            o["agent_id"].as_str().unwrap_or("?"),
            o["reason"].as_str().unwrap_or("")
        ));
    }
    lines
}

pub async fn claim(a: ClaimArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let agent = c.agent_id()?.to_owned();
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let request = body(vec![
        ("agent_id", Some(json!(agent))),
        ("agent_type", Some(json!(c.agent_type))),
        ("paths", Some(json!(a.paths))),
        ("shared", a.shared.then_some(json!(true))),
        ("ttl_ms", a.ttl.map(millis)),
        ("objection_ms", a.objection_window.map(millis)),
        ("reason", a.reason.map(Value::from)),
    ]);
    let answer = client
        .post(
            &project_path(&project, "/claims"),
            &[],
            &request,
            a.objection_window.unwrap_or(Duration::ZERO),
        )
        .await?;
    let code = match (answer.status, answer.body["code"].as_str()) {
        (201, _) => exit::OK,
        (409, Some("conflict")) => exit::CONFLICT,
        (409, Some("objected")) => exit::OBJECTED,
        _ => {
            return Err(client
                .ok(answer)
                .err()
                .unwrap_or_else(|| unexpected("claim")))
        }
    };
    if c.json {
        print_json(&answer.body)?;
    } else if code == exit::OK {
        print_line(&claim_line(&answer.body["claim"]))?;
    } else {
        eprintln!(
            "agentbus: {}",
            answer.body["error"].as_str().unwrap_or("refused")
        );
        for line in conflict_lines(&answer.body) {
            eprintln!("{line}");
        }
    }
    Ok(code)
}

fn unexpected(what: &str) -> CliError {
    CliError::failed(format!(
        "the broker answered the {what} in an unexpected way"
    ))
}

fn claim_path(project: &str, claim_id: &str) -> Result<String, CliError> {
    if uuid::Uuid::parse_str(claim_id).is_err() {
        return Err(CliError::failed(format!(
            "{claim_id:?} is not a claim id; `agentbus claims` lists them"
        )));
    }
    Ok(project_path(project, &format!("/claims/{claim_id}")))
}

async fn held(
    client: &Client,
    project: &str,
    agent: Option<&str>,
    all: bool,
) -> Result<Value, CliError> {
    let mut query = vec![("state", if all { "all" } else { "active" }.to_owned())];
    if let Some(agent) = agent {
        query.push(("agent_id", agent.to_owned()));
    }
    if all {
        query.push(("limit", "1000".to_owned()));
    }
    client
        .get_ok(&project_path(project, "/claims"), &query)
        .await
}

pub async fn release(a: ReleaseArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let agent = match (a.force, c.agent_id()) {
        (true, Err(_)) => None,
        (_, Ok(agent)) => Some(agent.to_owned()),
        (false, Err(e)) => return Err(e),
    };
    let ids: Vec<String> = if a.all {
        let mine = held(&client, &project, agent.as_deref(), false).await?;
        mine["claims"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect()
    } else {
        a.claim_ids.clone()
    };
    if ids.is_empty() {
        eprintln!("agentbus: no claims to release");
        return Ok(exit::NOTHING);
    }
    for id in ids {
        let mut query = Vec::new();
        if let Some(agent) = &agent {
            query.push(("agent_id", agent.clone()));
        }
        if a.force {
            query.push(("force", "true".to_owned()));
        }
        if let Some(reason) = &a.reason {
            query.push(("reason", reason.clone()));
        }
        let answer = client.delete(&claim_path(&project, &id)?, &query).await?;
        let released = client.ok(answer)?;
        if c.json {
            print_json(&released)?;
        } else {
            print_line(&claim_line(&released["claim"]))?;
        }
    }
    Ok(exit::OK)
}

pub async fn claims(a: ClaimsArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let list = held(&client, &project, a.agent.as_deref(), a.all).await?;
    let claims = list["claims"].as_array().cloned().unwrap_or_default();
    if c.json {
        print_json(&list)?;
    } else {
        for claim in &claims {
            print_line(&claim_line(claim))?;
        }
    }
    Ok(if claims.is_empty() {
        exit::NOTHING
    } else {
        exit::OK
    })
}

/// The paths staged for the commit, as git names them (relative to the repository root).
fn staged_paths() -> Result<Vec<String>, CliError> {
    let output = std::process::Command::new("git")
        .args(["diff", "--cached", "--name-only", "-z", "--no-renames"])
        .output()
        .map_err(|e| {
            CliError::failed(format!(
                "cannot run git ({e}); run the guard inside a git repository"
            ))
        })?;
    if !output.status.success() {
        return Err(CliError::failed(format!(
            "git could not list the staged files: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect())
}

/// The paths among `paths` that another agent holds exclusively, each with the claim.
pub fn blocked<'a>(
    paths: &'a [String],
    claims: &'a [Value],
    me: Option<&str>,
) -> Vec<(&'a str, &'a Value)> {
    let theirs: Vec<(&Value, Vec<PathPattern>)> = claims
        .iter()
        .filter(|c| c["state"] == "granted" && c["shared"] != true)
        .filter(|c| me.is_none_or(|me| c["agent_id"] != me))
        .map(|c| {
            let patterns = c["paths"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter_map(|p| PathPattern::parse(p).ok())
                .collect();
            (c, patterns)
        })
        .collect();
    let mut out = Vec::new();
    for path in paths {
        for (claim, patterns) in &theirs {
            if patterns.iter().any(|p| p.matches(path)) {
                out.push((path.as_str(), *claim));
            }
        }
    }
    out
}

pub async fn guard(a: GuardArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let paths = if a.paths.is_empty() {
        staged_paths()?
    } else {
        a.paths.clone()
    };
    if paths.is_empty() {
        return Ok(exit::OK);
    }
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let list = held(&client, &project, None, false).await?;
    let claims = list["claims"].as_array().cloned().unwrap_or_default();
    let me = c.agent_id().ok();
    let blocked = blocked(&paths, &claims, me);
    if c.json {
        let found: Vec<Value> = blocked
            .iter()
            .map(|(path, claim)| json!({"path": path, "claim": claim}))
            .collect();
        print_json(&json!({ "blocked": found }))?;
    }
    if blocked.is_empty() {
        return Ok(exit::OK);
    }
    eprintln!("agentbus guard: this commit touches paths another agent holds:");
    for (path, claim) in &blocked {
        eprintln!(
            "  {path}: held by {} until {} (claim {}){}",
            claim["agent_id"].as_str().unwrap_or("?"),
            claim["expires_at"].as_str().unwrap_or("?"),
            claim["id"].as_str().unwrap_or("?"),
            claim["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    eprintln!(
        "Wait for the claim to end (`agentbus claims`), ask its holder (`agentbus send --to AGENT …`), \
         or unstage those paths."
    );
    Ok(exit::CONFLICT)
}

pub async fn tasks(a: TasksArgs) -> Result<u8, CliError> {
    let c = &a.connection;
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let list = client
        .get_ok(
            &project_path(&project, "/tasks"),
            &[("state", a.state.clone())],
        )
        .await?;
    let tasks = list["tasks"].as_array().cloned().unwrap_or_default();
    if c.json {
        print_json(&list)?;
    } else {
        for task in &tasks {
            print_line(&task_line(task))?;
        }
    }
    Ok(if tasks.is_empty() {
        exit::NOTHING
    } else {
        exit::OK
    })
}

/// A result from the argument, or standard input for `-` (or with no argument when standard
/// input is not a terminal); none otherwise.
fn optional_text(argument: Option<String>) -> Result<Option<String>, CliError> {
    match argument {
        None if std::io::stdin().is_terminal() => Ok(None),
        other => super::settings::content(other).map(Some),
    }
}

pub async fn task(command: TaskCommand) -> Result<u8, CliError> {
    let (action, task_id, connection, extra) = match command {
        TaskCommand::Claim(a) => ("claim", a.task_id, a.connection, vec![]),
        TaskCommand::Release(a) => ("release", a.task_id, a.connection, vec![]),
        TaskCommand::Done(a) => {
            let result = optional_text(a.result)?;
            let fields = vec![
                ("result", result.map(Value::from)),
                ("success", Some(json!(true))),
            ];
            ("complete", a.task_id, a.connection, fields)
        }
        TaskCommand::Fail(a) => {
            let result = optional_text(a.result)?;
            let fields = vec![
                ("result", result.map(Value::from)),
                ("success", Some(json!(false))),
            ];
            ("complete", a.task_id, a.connection, fields)
        }
        TaskCommand::Cancel(a) => (
            "cancel",
            a.task_id,
            a.connection,
            vec![("reason", a.reason.map(Value::from))],
        ),
    };
    let c = &connection;
    let agent = c.agent_id()?.to_owned();
    if uuid::Uuid::parse_str(&task_id).is_err() {
        return Err(CliError::failed(format!(
            "{task_id:?} is not a task id; `agentbus tasks` lists them"
        )));
    }
    let client = Client::new(c)?;
    let project = client.project_id(c).await?;
    let mut fields = vec![
        ("agent_id", Some(json!(agent))),
        ("agent_type", Some(json!(c.agent_type))),
    ];
    fields.extend(extra);
    let answer = client
        .post(
            &project_path(
                &project,
                &format!("/tasks/{}/{action}", encode_segment(&task_id)),
            ),
            &[],
            &body(fields),
            Duration::ZERO,
        )
        .await?;
    if answer.status == 409 && answer.body["code"] == "already_claimed" {
        if c.json {
            print_json(&answer.body)?;
        }
        eprintln!(
            "agentbus: {}",
            answer.body["error"].as_str().unwrap_or("already claimed")
        );
        return Ok(exit::CONFLICT);
    }
    let moved = client.ok(answer)?;
    if c.json {
        print_json(&moved)?;
    } else {
        print_line(&task_line(&moved["task"]))?;
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").unwrap_err().contains("e.g. 90s"));
    }

    #[test]
    fn the_guard_blocks_only_other_agents_exclusive_grants() {
        let claims = vec![
            json!({"id": "1", "agent_id": "a", "state": "granted", "shared": false, "paths": ["src/api/**"]}),
            json!({"id": "2", "agent_id": "b", "state": "granted", "shared": true, "paths": ["docs/**"]}),
            json!({"id": "3", "agent_id": "c", "state": "pending", "shared": false, "paths": ["README.md"]}),
            json!({"id": "4", "agent_id": "me", "state": "granted", "shared": false, "paths": ["Cargo.toml"]}),
        ];
        let paths: Vec<String> = [
            "src/api/x.rs",
            "docs/a.md",
            "README.md",
            "Cargo.toml",
            "src/main.rs",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let found: Vec<&str> = blocked(&paths, &claims, Some("me"))
            .iter()
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(found, ["src/api/x.rs"]);
        // Nobody: every exclusive grant counts, its own too.
        let found: Vec<&str> = blocked(&paths, &claims, None)
            .iter()
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(found, ["src/api/x.rs", "Cargo.toml"]);
    }

    #[test]
    fn lines_name_holders_and_states() {
        let line = claim_line(
            &json!({"id": "c1", "agent_id": "a", "state": "granted", "shared": false,
            "paths": ["src/**"], "expires_at": "T", "reason": "refactor"}),
        );
        assert_eq!(line, "c1 a holds src/** (exclusive) until T: refactor");
        let line = task_line(
            &json!({"seq": 4, "id": "t1", "state": "claimed", "holder": "fe-1",
            "sender_agent_id": "lead", "to_type": "frontend", "content": "build Z"}),
        );
        assert_eq!(
            line,
            "#4 t1 [claimed by fe-1] lead → type:frontend: build Z"
        );
    }
}
