//! The MCP tools of file claims and tasks: `claim_files`, `release_files`, `list_claims`,
//! `object_claim`, `list_tasks`, `claim_task`, `complete_task`. Each calls the same
//! coordination service as the REST routes and the WebSocket frames.

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::mcp_tools::Context;
use super::ApiError;
use crate::actors::coordination::Caller;
use crate::db::claims::{ListFilter, Releaser};
use crate::domain::claims::Claim;
use crate::domain::tasks::{Task, TaskState};
use crate::protocol::coordination::Answer;

/// The definitions `tools/list` adds for coordination.
pub fn definitions() -> Vec<Value> {
    let s = |t: &str| json!({"type": t});
    vec![
        json!({
            "name": "claim_files",
            "description": "Claim paths/globs before editing them (exclusive unless shared). With objection_seconds, others may object first; the call waits.",
            "inputSchema": {"type": "object", "properties": {
                "paths": {"type": "array", "items": s("string"), "description": "relative, e.g. src/api/**"},
                "shared": s("boolean"), "reason": s("string"),
                "ttl_seconds": s("number"), "objection_seconds": s("number")
            }, "required": ["paths"]}
        }),
        json!({
            "name": "release_files",
            "description": "Release a claim (claim_id), or all your claims.",
            "inputSchema": {"type": "object", "properties": {"claim_id": s("string")}}
        }),
        json!({
            "name": "list_claims",
            "description": "Claims held now: who holds which paths, until when; pending ones.",
            "inputSchema": {"type": "object", "properties": {}}
        }),
        json!({
            "name": "object_claim",
            "description": "Object to another agent's pending claim: it is refused.",
            "inputSchema": {"type": "object", "properties": {"claim_id": s("string"), "reason": s("string")}, "required": ["claim_id", "reason"]}
        }),
        json!({
            "name": "list_tasks",
            "description": "Tasks (messages sent with task): open ones by default.",
            "inputSchema": {"type": "object", "properties": {"state": s("string")}}
        }),
        json!({
            "name": "claim_task",
            "description": "Take an open task; only the first claim wins.",
            "inputSchema": {"type": "object", "properties": {"task_id": s("string")}, "required": ["task_id"]}
        }),
        json!({
            "name": "complete_task",
            "description": "Finish your task: the result goes to its sender (success false: failed).",
            "inputSchema": {"type": "object", "properties": {"task_id": s("string"), "result": s("string"), "success": s("boolean")}, "required": ["task_id"]}
        }),
    ]
}

/// Runs a coordination tool, if `name` is one. The outer `Option` is `None` for other tools.
pub async fn call(
    ctx: &Context<'_>,
    name: &str,
    arguments: Value,
) -> Option<Result<Value, ApiError>> {
    if !definitions().iter().any(|d| d["name"] == name) {
        return None;
    }
    // The call counts as the agent's presence, as every tool's does.
    if let Err(e) = super::mcp::joined(ctx.state, ctx.identity, ctx.access).await {
        return Some(Err(e));
    }
    Some(match name {
        "claim_files" => run(arguments, |a| claim_files(ctx, a)).await,
        "release_files" => run(arguments, |a| release_files(ctx, a)).await,
        "list_claims" => run(arguments, |a| list_claims(ctx, a)).await,
        "object_claim" => run(arguments, |a| object_claim(ctx, a)).await,
        "list_tasks" => run(arguments, |a| list_tasks(ctx, a)).await,
        "claim_task" => run(arguments, |a| claim_task(ctx, a)).await,
        "complete_task" => run(arguments, |a| complete_task(ctx, a)).await,
        _ => return None,
    })
}

async fn run<A, F, Fut>(arguments: Value, tool: F) -> Result<Value, ApiError>
where
    A: serde::de::DeserializeOwned,
    F: FnOnce(A) -> Fut,
    Fut: std::future::Future<Output = Result<Value, ApiError>>,
{
    let args: A = serde_json::from_value(arguments)
        .map_err(|e| ApiError::bad_request("invalid_field", format!("invalid arguments: {e}")))?;
    tool(args).await
}

fn caller<'a>(ctx: &'a Context<'_>) -> Caller<'a> {
    Caller {
        project_id: ctx.identity.project_id,
        agent_id: &ctx.identity.agent_id,
    }
}

fn uuid(field: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::bad_request("invalid_field", format!("{field} must be an id (a UUID)"))
    })
}

/// Seconds (fractions allowed) as whole milliseconds.
fn millis(field: &str, seconds: Option<f64>) -> Result<Option<i64>, ApiError> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s * 1000.0 < i64::MAX as f64 => {
            Ok(Some((s * 1000.0).ceil() as i64))
        }
        Some(_) => Err(ApiError::bad_request(
            "invalid_field",
            format!("{field} must be a number of seconds above 0"),
        )),
    }
}

/// One line per claim: `<id>: agent holds paths (mode) until T: reason`.
pub fn claim_line(c: &Claim) -> String {
    let until = match c.state.as_str() {
        "pending" => format!(
            "asks for (objections until {})",
            c.decide_at.map(|t| t.to_rfc3339()).unwrap_or_default()
        ),
        "granted" => format!(
            "holds (until {})",
            c.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default()
        ),
        other => other.to_owned(),
    };
    format!(
        "claim {}: {} {until} {} ({}){}",
        c.id,
        c.agent_id,
        c.paths.join(", "),
        c.mode(),
        c.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    )
}

/// One line per task: `task #seq <id> [state by holder] sender → to: content`.
pub fn task_line(t: &Task) -> String {
    let to = match (&t.to, &t.to_type) {
        (Some(a), _) => a.clone(),
        (None, Some(ty)) => format!("type:{ty}"),
        (None, None) => "all".into(),
    };
    let state = match (&t.state, &t.holder) {
        (TaskState::Open, _) => "open".to_owned(),
        (state, Some(h)) => format!("{} by {h}", state.as_str()),
        (state, None) => state.as_str().to_owned(),
    };
    format!(
        "task #{} {} [{state}] {} → {to}: {}",
        t.seq,
        t.id,
        t.sender_agent_id,
        t.content.replace('\n', "\\n")
    )
}

/// A tool result from an answer: the structured answer, and a line (isError when refused).
fn result(answer: &Answer, text: String) -> Value {
    let structured = json!({
        "ok": answer.ok(),
        "code": answer.refused.as_ref().map(|(c, _)| c.as_str()),
        "claim": answer.claim, "task": answer.task,
        "conflicts": answer.conflicts, "objections": answer.objections, "seq": answer.seq,
    });
    let text = match &answer.refused {
        Some((_, why)) => format!("{why}. {text}"),
        None => text,
    };
    json!({"content": [{"type": "text", "text": text}], "structuredContent": structured, "isError": !answer.ok()})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimArgs {
    paths: Vec<String>,
    shared: Option<bool>,
    reason: Option<String>,
    ttl_seconds: Option<f64>,
    objection_seconds: Option<f64>,
}

async fn claim_files(ctx: &Context<'_>, args: ClaimArgs) -> Result<Value, ApiError> {
    let coordination = &ctx.state.coordination;
    let spec = coordination.spec(
        &args.paths,
        args.shared.unwrap_or(false),
        millis("ttl_seconds", args.ttl_seconds)?,
        millis("objection_seconds", args.objection_seconds)?,
        args.reason,
    )?;
    let _place = match spec.objection_ms {
        Some(_) => Some(ctx.state.waiters.acquire(ctx.identity.project_id)?),
        None => None,
    };
    let answer = coordination.claim(caller(ctx), &spec).await?;
    let answer = coordination.decided(answer).await?;
    let mut text = answer.claim.as_ref().map(claim_line).unwrap_or_default();
    for c in &answer.conflicts {
        text.push_str(&format!(
            "\nconflicts with {} ({}): {}{}",
            c.holder,
            c.state,
            c.paths.join(", "),
            c.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ));
    }
    for o in &answer.objections {
        text.push_str(&format!("\nobjection by {}: {}", o.agent_id, o.reason));
    }
    Ok(result(&answer, text))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseArgs {
    claim_id: Option<String>,
}

async fn release_files(ctx: &Context<'_>, args: ReleaseArgs) -> Result<Value, ApiError> {
    let coordination = &ctx.state.coordination;
    let by = Releaser {
        agent_id: Some(&ctx.identity.agent_id),
        force: false,
        reason: None,
    };
    let project_id = ctx.identity.project_id;
    if let Some(raw) = args.claim_id {
        let answer = coordination
            .release(project_id, uuid("claim_id", &raw)?, &by)
            .await?;
        let text = answer.claim.as_ref().map(claim_line).unwrap_or_default();
        return Ok(result(&answer, text));
    }
    let mine = coordination
        .list_claims(
            project_id,
            &ListFilter {
                active_only: true,
                state: None,
                agent_id: Some(&ctx.identity.agent_id),
                limit: 1000,
            },
        )
        .await?;
    let mut released = Vec::new();
    for claim in mine {
        let answer = coordination.release(project_id, claim.id, &by).await?;
        if let (true, Some(claim)) = (answer.ok(), answer.claim) {
            released.push(claim);
        }
    }
    let text = if released.is_empty() {
        "you hold no claims".to_owned()
    } else {
        released
            .iter()
            .map(claim_line)
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(
        json!({"content": [{"type": "text", "text": text}], "structuredContent": {"released": released}, "isError": false}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

async fn list_claims(ctx: &Context<'_>, _: NoArgs) -> Result<Value, ApiError> {
    let claims = ctx
        .state
        .coordination
        .list_claims(
            ctx.identity.project_id,
            &ListFilter {
                active_only: true,
                state: None,
                agent_id: None,
                limit: 1000,
            },
        )
        .await?;
    let text = if claims.is_empty() {
        "no claims are held".to_owned()
    } else {
        claims.iter().map(claim_line).collect::<Vec<_>>().join("\n")
    };
    Ok(
        json!({"content": [{"type": "text", "text": text}], "structuredContent": {"claims": claims}, "isError": false}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectArgs {
    claim_id: String,
    reason: String,
}

async fn object_claim(ctx: &Context<'_>, args: ObjectArgs) -> Result<Value, ApiError> {
    let id = uuid("claim_id", &args.claim_id)?;
    let answer = ctx
        .state
        .coordination
        .object(caller(ctx), id, args.reason)
        .await?;
    let text = answer.claim.as_ref().map(claim_line).unwrap_or_default();
    Ok(result(&answer, text))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListTasksArgs {
    state: Option<String>,
}

async fn list_tasks(ctx: &Context<'_>, args: ListTasksArgs) -> Result<Value, ApiError> {
    let state = match args.state.as_deref() {
        None => Some(TaskState::Open),
        Some("all") => None,
        Some(raw) => Some(TaskState::parse(raw).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_field",
                "state must be open, claimed, done, failed, canceled, unclaimed or all",
            )
        })?),
    };
    let tasks = ctx
        .state
        .coordination
        .list_tasks(ctx.identity.project_id, state, 100)
        .await?;
    let text = if tasks.is_empty() {
        "no tasks".to_owned()
    } else {
        tasks.iter().map(task_line).collect::<Vec<_>>().join("\n")
    };
    Ok(
        json!({"content": [{"type": "text", "text": text}], "structuredContent": {"tasks": tasks}, "isError": false}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskArgs {
    task_id: String,
}

async fn claim_task(ctx: &Context<'_>, args: TaskArgs) -> Result<Value, ApiError> {
    let id = uuid("task_id", &args.task_id)?;
    let answer = ctx.state.coordination.claim_task(caller(ctx), id).await?;
    let text = answer.task.as_ref().map(task_line).unwrap_or_default();
    Ok(result(&answer, text))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteArgs {
    task_id: String,
    result: Option<String>,
    success: Option<bool>,
}

async fn complete_task(ctx: &Context<'_>, args: CompleteArgs) -> Result<Value, ApiError> {
    let id = uuid("task_id", &args.task_id)?;
    let answer = ctx
        .state
        .coordination
        .complete_task(caller(ctx), id, args.success.unwrap_or(true), args.result)
        .await?;
    let text = answer.task.as_ref().map(task_line).unwrap_or_default();
    Ok(result(&answer, text))
}
