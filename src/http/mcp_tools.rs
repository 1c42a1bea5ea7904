//! The MCP tools: each translates its arguments to the same internals as the REST route that
//! does the same thing, and its outcome to a tool result (`structuredContent` plus a compact
//! text rendering, `isError` with a sentence a model can act on).

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::agents::{agent_views, read_inbox};
use super::mcp::{joined, McpIdentity};
use super::messages::{ask, joined_sender, new_message, store, Asked, MAX_PAGE};
use super::{ApiError, AppState};
use crate::actors::inbox::InboxRead;
use crate::auth::Access;
use crate::db::inbox::Interface;
use crate::db::queries::{self, HistoryQuery};
use crate::models::{Project, StoredMessage};
use crate::protocol::SendFields;

/// What a tool call runs with.
pub struct Context<'a> {
    pub state: &'a AppState,
    pub identity: &'a McpIdentity,
    pub access: &'a Access,
    pub project: &'a Project,
}

pub fn initialize_result(version: &str, identity: &McpIdentity) -> Value {
    json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {"name": "agentbus", "version": env!("CARGO_PKG_VERSION")},
        "instructions": format!(
            "You are agent {:?} on an agentbus project. check_inbox for what others sent you \
             (wait_seconds to wait), send_message to tell, ask to get an answer, reply to answer.",
            identity.agent_id
        ),
    })
}

/// The `tools/list` answer.
pub fn list() -> Value {
    let s = |t: &str| json!({"type": t});
    let mut list = json!({"tools": [
        {
            "name": "send_message",
            "description": "Send a message to the project (everyone), one agent (to) or agents of a type (to_type).",
            "inputSchema": {"type": "object", "properties": {
                "content": s("string"), "type": s("string"), "to": s("string"), "to_type": s("string"),
                "priority": {"type": "integer", "minimum": 0, "maximum": 3, "description": "0 critical .. 3 low; default 2"},
                "metadata": s("object"), "ttl_ms": s("integer"),
                "client_msg_id": {"type": "string", "description": "retry key: sent once"},
                "task": {"type": "boolean", "description": "a task: one agent claims it"}
            }, "required": ["content"]}
        },
        {
            "name": "check_inbox",
            "description": "Messages sent to you, urgent first. Returned ones are acknowledged unless peek.",
            "inputSchema": {"type": "object", "properties": {
                "wait_seconds": {"type": "number", "minimum": 0, "maximum": 60, "description": "wait this long for mail if none"},
                "limit": s("integer"), "urgent_only": s("boolean"), "peek": s("boolean")
            }}
        },
        {
            "name": "ask",
            "description": "Send a request and wait for its first reply.",
            "inputSchema": {"type": "object", "properties": {
                "content": s("string"), "to": s("string"), "to_type": s("string"), "type": s("string"),
                "timeout_seconds": {"type": "number", "description": "default 60"}
            }, "required": ["content"]}
        },
        {
            "name": "reply",
            "description": "Reply to a message (a request you received).",
            "inputSchema": {"type": "object", "properties": {
                "message_id": s("string"), "content": s("string"), "success": s("boolean"), "metadata": s("object")
            }, "required": ["message_id", "content"]}
        },
        {
            "name": "list_agents",
            "description": "The project's agents: online, interface, type, capabilities, queue.",
            "inputSchema": {"type": "object", "properties": {}}
        },
        {
            "name": "search_messages",
            "description": "Search the project's history (words in query; filters).",
            "inputSchema": {"type": "object", "properties": {
                "query": s("string"), "type": s("string"), "sender": s("string"),
                "after_seq": s("integer"), "before_seq": s("integer"), "limit": s("integer")
            }}
        },
        {
            "name": "read_thread",
            "description": "A message, what it replies to, and its replies.",
            "inputSchema": {"type": "object", "properties": {"message_id": s("string")}, "required": ["message_id"]}
        }
    ]});
    if let Some(tools) = list["tools"].as_array_mut() {
        tools.extend(super::mcp_coordination::definitions());
    }
    list
}

/// One line per message: `#seq [type] sender → recipient: content`.
pub fn render(message: &StoredMessage) -> String {
    let to = match (&message.recipient_agent_id, &message.recipient_agent_type) {
        (Some(agent), _) => agent.clone(),
        (None, Some(agent_type)) => format!("type:{agent_type}"),
        (None, None) => "all".to_owned(),
    };
    let urgent = if message.priority <= 1 { " !" } else { "" };
    let task = if message.task {
        " (a task: claim_task to take it)"
    } else {
        ""
    };
    format!(
        "#{} [{}]{urgent} {} → {to}: {} (id {}){task}",
        message.seq,
        message.message_type,
        message.sender_agent_id,
        message.content.replace('\n', "\\n"),
        message.id
    )
}

fn render_all(messages: &[StoredMessage]) -> String {
    messages.iter().map(render).collect::<Vec<_>>().join("\n")
}

/// A tool's successful result.
fn ok(text: String, structured: Value) -> Value {
    json!({"content": [{"type": "text", "text": text}], "structuredContent": structured, "isError": false})
}

/// A tool's failure, as a result the model reads.
fn failed(text: String) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": true})
}

#[derive(Deserialize)]
struct CallParams {
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// Runs `tools/call`. `Err` is a protocol error (unknown tool, malformed call); a tool that
/// fails answers `Ok` with `isError`.
pub async fn call(ctx: &Context<'_>, params: &Value) -> Result<Value, String> {
    let call: CallParams = serde_json::from_value(params.clone())
        .map_err(|e| format!("tools/call needs `name` and `arguments`: {e}"))?;
    let arguments = if call.arguments.is_null() {
        json!({})
    } else {
        call.arguments
    };
    let outcome = match call.name.as_str() {
        "send_message" => run(ctx, arguments, send_message).await,
        "check_inbox" => run(ctx, arguments, check_inbox).await,
        "ask" => run(ctx, arguments, ask_tool).await,
        "reply" => run(ctx, arguments, reply).await,
        "list_agents" => run(ctx, arguments, list_agents).await,
        "search_messages" => run(ctx, arguments, search_messages).await,
        "read_thread" => run(ctx, arguments, read_thread).await,
        other => match super::mcp_coordination::call(ctx, other, arguments).await {
            Some(outcome) => outcome,
            None => return Err(format!("no tool named {other:?}; see tools/list")),
        },
    };
    Ok(outcome.unwrap_or_else(|e| failed(e.to_string())))
}

/// Parses the arguments, records the call as the agent's presence, runs the tool.
async fn run<'c, A, F, Fut>(
    ctx: &'c Context<'c>,
    arguments: Value,
    tool: F,
) -> Result<Value, ApiError>
where
    A: DeserializeOwned,
    F: FnOnce(&'c Context<'c>, A) -> Fut,
    Fut: std::future::Future<Output = Result<Value, ApiError>>,
{
    let args: A = serde_json::from_value(arguments)
        .map_err(|e| ApiError::bad_request("invalid_field", format!("invalid arguments: {e}")))?;
    joined(ctx.state, ctx.identity, ctx.access).await?;
    tool(ctx, args).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendArgs {
    content: String,
    #[serde(rename = "type")]
    message_type: Option<String>,
    to: Option<String>,
    to_type: Option<String>,
    priority: Option<i64>,
    metadata: Option<Value>,
    ttl_ms: Option<i64>,
    client_msg_id: Option<String>,
    task: Option<bool>,
}

/// Stores a send as the session's agent.
async fn send_as(ctx: &Context<'_>, send: SendFields) -> Result<StoredMessage, ApiError> {
    let message = new_message(
        ctx.state,
        ctx.identity.project_id,
        ctx.identity.agent_id.clone(),
        ctx.identity.agent_type.clone(),
        send,
    )?;
    joined_sender(ctx.state, ctx.access, &message, Interface::Mcp).await?;
    Ok(store(ctx.state, message).await?.0)
}

async fn send_message(ctx: &Context<'_>, args: SendArgs) -> Result<Value, ApiError> {
    let stored = send_as(
        ctx,
        SendFields {
            content: Some(args.content),
            message_type: args.message_type,
            to: args.to,
            to_type: args.to_type,
            priority: args.priority,
            metadata: args.metadata,
            ttl_ms: args.ttl_ms,
            client_msg_id: args.client_msg_id,
            task: args.task,
            ..SendFields::default()
        },
    )
    .await?;
    Ok(ok(
        format!("sent {}", render(&stored)),
        json!({"id": stored.id, "seq": stored.seq}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxArgs {
    wait_seconds: Option<f64>,
    limit: Option<i64>,
    urgent_only: Option<bool>,
    peek: Option<bool>,
}

async fn check_inbox(ctx: &Context<'_>, args: InboxArgs) -> Result<Value, ApiError> {
    let wait = args.wait_seconds.unwrap_or(0.0);
    if !(0.0..=60.0).contains(&wait) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "wait_seconds must be between 0 and 60",
        ));
    }
    let limit = super::messages::page_limit(args.limit)?;
    let page = read_inbox(
        ctx.state,
        ctx.project.head_seq,
        InboxRead {
            project_id: ctx.identity.project_id,
            agent_id: ctx.identity.agent_id.clone(),
            limit,
            urgent_only: args.urgent_only.unwrap_or(false),
            ack: !args.peek.unwrap_or(false),
            wait: Duration::from_secs_f64(wait),
            max_bytes: ctx.state.settings.max_page_bytes,
            resume: None,
        },
    )
    .await?;
    let text = if page.messages.is_empty() {
        "no new messages".to_owned()
    } else {
        let mut text = render_all(&page.messages);
        if page.remaining > 0 {
            text.push_str(&format!("\n({} more: check_inbox again)", page.remaining));
        }
        text
    };
    Ok(ok(
        text,
        json!({"messages": page.messages, "remaining": page.remaining}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AskArgs {
    content: String,
    to: Option<String>,
    to_type: Option<String>,
    #[serde(rename = "type")]
    message_type: Option<String>,
    timeout_seconds: Option<f64>,
}

/// A request's timeout when `ask` names none.
const DEFAULT_ASK_SECONDS: f64 = 60.0;

async fn ask_tool(ctx: &Context<'_>, args: AskArgs) -> Result<Value, ApiError> {
    let seconds = args.timeout_seconds.unwrap_or(DEFAULT_ASK_SECONDS);
    if !(seconds > 0.0 && seconds * 1000.0 <= crate::protocol::MAX_REPLY_TIMEOUT_MS as f64) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "timeout_seconds must be above 0 and at most a day",
        ));
    }
    let message = new_message(
        ctx.state,
        ctx.identity.project_id,
        ctx.identity.agent_id.clone(),
        ctx.identity.agent_type.clone(),
        SendFields {
            content: Some(args.content),
            message_type: Some(args.message_type.unwrap_or_else(|| "request".to_owned())),
            to: args.to,
            to_type: args.to_type,
            expects_reply: Some(true),
            timeout_ms: Some((seconds * 1000.0).ceil() as i64),
            ..SendFields::default()
        },
    )?;
    joined_sender(ctx.state, ctx.access, &message, Interface::Mcp).await?;
    Ok(match ask(ctx.state, ctx.project.head_seq, message).await? {
        Asked::NoRecipient(request) => failed(format!(
            "nobody can receive this request (no such agent or type has joined the project); \
             check list_agents. It was stored as #{} and dead-lettered.",
            request.seq
        )),
        Asked::Answered {
            request,
            response,
            timed_out: true,
        } => json!({
            "content": [{"type": "text", "text": format!(
                "no reply within {seconds} s to request #{} (id {}); a late reply will be in check_inbox",
                request.seq, request.id)}],
            "structuredContent": {"request": request, "response": response, "timed_out": true},
            "isError": true,
        }),
        Asked::Answered {
            request,
            response,
            timed_out: false,
        } => ok(
            render(&response),
            json!({"request": request, "response": response, "timed_out": false}),
        ),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyArgs {
    message_id: String,
    content: String,
    success: Option<bool>,
    metadata: Option<Value>,
}

async fn reply(ctx: &Context<'_>, args: ReplyArgs) -> Result<Value, ApiError> {
    let stored = send_as(
        ctx,
        SendFields {
            content: Some(args.content),
            message_type: Some("response".to_owned()),
            reply_to: Some(args.message_id),
            success: args.success,
            metadata: args.metadata,
            ..SendFields::default()
        },
    )
    .await?;
    Ok(ok(
        format!("sent {}", render(&stored)),
        json!({"id": stored.id, "seq": stored.seq}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

async fn list_agents(ctx: &Context<'_>, _: NoArgs) -> Result<Value, ApiError> {
    let agents = agent_views(ctx.state, ctx.identity.project_id, None).await?;
    let text = agents
        .iter()
        .map(|a| {
            format!(
                "{} ({}) {}{} queue {}{}",
                a.agent_id,
                a.agent_type,
                if a.online { "online" } else { "offline" },
                a.interface
                    .as_deref()
                    .map(|i| format!(" via {i}"))
                    .unwrap_or_default(),
                a.queue_depth,
                if a.capabilities.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", a.capabilities.join(", "))
                }
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    Ok(ok(text, json!({ "agents": agents })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchArgs {
    query: Option<String>,
    #[serde(rename = "type")]
    message_type: Option<String>,
    sender: Option<String>,
    after_seq: Option<i64>,
    before_seq: Option<i64>,
    limit: Option<i64>,
}

async fn search_messages(ctx: &Context<'_>, args: SearchArgs) -> Result<Value, ApiError> {
    let limit = args.limit.unwrap_or(20);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    if args.after_seq.is_some_and(|s| s < 0) || args.before_seq.is_some_and(|s| s < 0) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "after_seq and before_seq must not be negative",
        ));
    }
    let query = HistoryQuery {
        after_seq: args.after_seq,
        before_seq: args.before_seq,
        limit,
        message_type: args.message_type,
        sender: args.sender,
        q: args.query.filter(|q| !q.trim().is_empty()),
        ..HistoryQuery::default()
    };
    let _turn = ctx.state.heavy_reads.turn().await?;
    let mut conn = ctx.state.pool.get().await?;
    let page = queries::history(
        &mut conn,
        ctx.identity.project_id,
        &query,
        ctx.state.settings.max_page_bytes,
    )
    .await?;
    drop(conn);
    let mut text = if page.messages.is_empty() {
        "no messages match".to_owned()
    } else {
        render_all(&page.messages)
    };
    if page.has_more {
        text.push_str("\n(more match: page with after_seq/before_seq)");
    }
    Ok(ok(
        text,
        json!({ "messages": page.messages, "has_more": page.has_more }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThreadArgs {
    message_id: String,
}

async fn read_thread(ctx: &Context<'_>, args: ThreadArgs) -> Result<Value, ApiError> {
    let id = Uuid::parse_str(&args.message_id).map_err(|_| {
        ApiError::bad_request("invalid_field", "message_id must be a message id (a UUID)")
    })?;
    let project_id = ctx.identity.project_id;
    let mut conn = ctx.state.pool.get().await?;
    let message = queries::find_message(&mut conn, project_id, id)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no message {id} in this project; search_messages finds ids"
            ))
        })?;
    let replies_to = match message.reply_to {
        Some(parent) => queries::find_message(&mut conn, project_id, parent).await?,
        None => None,
    };
    let thread = HistoryQuery {
        thread: Some(id),
        limit: MAX_PAGE,
        after_seq: Some(0),
        ..HistoryQuery::default()
    };
    let replies: Vec<StoredMessage> = queries::history(
        &mut conn,
        project_id,
        &thread,
        ctx.state.settings.max_page_bytes,
    )
    .await?
    .messages
    .into_iter()
    .filter(|m| m.id != id)
    .collect();
    let mut text = String::new();
    if let Some(parent) = &replies_to {
        text.push_str(&format!("in reply to {}\n", render(parent)));
    }
    text.push_str(&render(&message));
    for r in &replies {
        text.push_str(&format!("\n  {}", render(r)));
    }
    Ok(ok(
        text,
        json!({"message": message, "replies_to": replies_to, "replies": replies}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tool_list_stays_small() {
        let bytes = list().to_string().len();
        println!("tools/list: {bytes} bytes, about {} tokens", bytes / 4);
        // Every tool definition costs every agent context on every turn: under 2,500 tokens.
        assert!(bytes < 10_000, "{bytes} bytes");
    }

    #[test]
    fn a_message_renders_on_one_line() {
        let message = StoredMessage {
            id: Uuid::nil(),
            project_id: Uuid::nil(),
            seq: 1,
            sender_agent_id: "x".into(),
            sender_agent_type: "t".into(),
            sender_session_id: None,
            recipient_agent_id: None,
            message_type: "status".into(),
            content: "two\nlines".into(),
            metadata: json!({}),
            priority: 0,
            correlation_id: None,
            reply_to: None,
            client_msg_id: None,
            created_at: chrono::Utc::now(),
            expires_at: None,
            delivered_at: None,
            read_at: None,
            recipient_agent_type: Some("backend".into()),
            expects_reply: false,
            reply_deadline: None,
            replied_at: None,
            in_reply_to_seq: None,
            success: None,
            error: None,
            duration_ms: None,
            late: false,
            task: false,
        };
        let line = render(&message);
        assert!(
            line.starts_with("#1 [status] ! x → type:backend: two\\nlines"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
