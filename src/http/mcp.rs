//! `/mcp/{project_id}`: the Model Context Protocol endpoint, Streamable HTTP transport
//! (revisions 2025-06-18 and 2025-03-26), answering every request with `application/json`.
//!
//! Everything that can be refused is refused before any JSON-RPC, with the REST error body:
//! a foreign `Origin` or (on a loopback broker) a foreign `Host` (403), credentials (401/403),
//! the project (404), the agent's identity (400/403). The agent is a bound token's, or the
//! `agent_id`/`agent_type` query parameters, validated as at the WebSocket.
//!
//! Sessions live in memory: `initialize` issues an `Mcp-Session-Id`, every later request must
//! carry it (400 without, 404 for an unknown or ended one, or one of another agent), `DELETE`
//! ends it. After a broker restart clients get 404 and start a new session, as the
//! specification says.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::agents::{call_as, CallAs};
use super::socket::DEFAULT_AGENT_TYPE;
use super::{mcp_tools, projects, ApiError, AppState};
use crate::auth::{self, Access};
use crate::db::inbox::Interface;
use crate::models::Project;

/// The revisions this endpoint speaks, newest first.
pub const PROTOCOL_VERSIONS: [&str; 2] = ["2025-06-18", "2025-03-26"];
/// The header naming a session.
pub const SESSION_HEADER: &str = "mcp-session-id";
/// The header naming the negotiated revision (2025-06-18).
pub const VERSION_HEADER: &str = "mcp-protocol-version";
/// Most sessions kept; beyond it the least recently used one is ended.
pub const MAX_SESSIONS: usize = 10_000;

/// JSON-RPC error codes.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
}

/// The revision to answer an `initialize` asking for `requested` with: the same when it is
/// spoken here, else the newest.
pub fn negotiate(requested: Option<&str>) -> &'static str {
    PROTOCOL_VERSIONS
        .iter()
        .find(|v| Some(**v) == requested)
        .copied()
        .unwrap_or(PROTOCOL_VERSIONS[0])
}

/// One JSON-RPC message from the client.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Request {
        id: Value,
        method: String,
        params: Value,
    },
    Notification {
        method: String,
    },
    /// A response to something this server asked (it never asks): ignored.
    Response,
}

/// Reads one JSON-RPC 2.0 message; the error is the JSON-RPC error response to send.
pub fn parse_message(value: &Value) -> Result<Incoming, Value> {
    let invalid = |id: &Value, why: &str| error_response(id, code::INVALID_REQUEST, why);
    let Some(object) = value.as_object() else {
        return Err(invalid(
            &Value::Null,
            "a JSON-RPC message must be an object",
        ));
    };
    let id = object.get("id").cloned();
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(
            id.as_ref().unwrap_or(&Value::Null),
            "`jsonrpc` must be \"2.0\"",
        ));
    }
    match (object.get("method"), id) {
        (Some(Value::String(method)), Some(id)) => {
            if !(id.is_string() || id.is_i64() || id.is_u64()) {
                return Err(invalid(&Value::Null, "`id` must be a string or an integer"));
            }
            Ok(Incoming::Request {
                id,
                method: method.clone(),
                params: object.get("params").cloned().unwrap_or(Value::Null),
            })
        }
        (Some(Value::String(method)), None) => Ok(Incoming::Notification {
            method: method.clone(),
        }),
        (Some(_), id) => Err(invalid(
            id.as_ref().unwrap_or(&Value::Null),
            "`method` must be a string",
        )),
        (None, Some(_)) if object.contains_key("result") || object.contains_key("error") => {
            Ok(Incoming::Response)
        }
        (None, id) => Err(invalid(
            id.as_ref().unwrap_or(&Value::Null),
            "a request needs a `method`",
        )),
    }
}

pub fn error_response(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

pub fn result_response(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// Who an MCP session speaks as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpIdentity {
    pub project_id: Uuid,
    pub agent_id: String,
    pub agent_type: String,
}

struct Session {
    identity: McpIdentity,
    version: &'static str,
    last_used: Instant,
}

/// The open MCP sessions, by id.
#[derive(Clone, Default)]
pub struct McpSessions(Arc<Mutex<HashMap<String, Session>>>);

impl McpSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session; ends the least recently used one when [`MAX_SESSIONS`] are open.
    pub fn open(&self, identity: McpIdentity, version: &'static str) -> String {
        let id = Uuid::new_v4().simple().to_string();
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                identity,
                version,
                last_used: Instant::now(),
            },
        );
        id
    }

    /// The session's revision, if it is open and speaks as `identity`.
    pub fn touch(&self, id: &str, identity: &McpIdentity) -> Option<&'static str> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(id).filter(|s| s.identity == *identity)?;
        session.last_used = Instant::now();
        Some(session.version)
    }

    /// Ends a session of `identity`; false when there was none.
    pub fn end(&self, id: &str, identity: &McpIdentity) -> bool {
        let mut sessions = self.lock();
        if sessions.get(id).is_some_and(|s| s.identity == *identity) {
            sessions.remove(id);
            true
        } else {
            false
        }
    }
}

#[derive(Deserialize)]
pub struct McpParams {
    agent_id: Option<String>,
    agent_type: Option<String>,
}

/// Is this origin allowed: on the list, or the broker's own loopback origin?
pub fn origin_allowed(origin: &str, allowed: &[String], port: u16) -> bool {
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return true;
    }
    ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|host| origin == format!("http://{host}:{port}"))
}

/// Does this `Host` header name the broker on loopback (`127.0.0.1`, `localhost`, `[::1]`,
/// with the broker's port)?
pub fn loopback_host(host: &str, port: u16) -> bool {
    ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|name| host.eq_ignore_ascii_case(&format!("{name}:{port}")))
}

/// The checks every MCP request passes before any JSON-RPC: origin and host, credentials,
/// project, identity. The caller joined (and its presence recorded) when `join` is set.
async fn admit(
    req: &HttpRequest,
    state: &AppState,
    path: &str,
    params: McpParams,
) -> Result<(McpIdentity, Access, Project), ApiError> {
    let port = req.app_config().local_addr().port();
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !origin_allowed(origin, &state.settings.mcp_allowed_origins, port) {
            return Err(ApiError::Forbidden(format!(
                "the origin {origin:?} may not use the MCP endpoint (see `mcp_allowed_origins`)"
            )));
        }
    }
    if auth::is_loopback_bind(&state.settings.bind) {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !loopback_host(host, port) {
            return Err(ApiError::Forbidden(format!(
                "this broker listens on loopback only: the Host header must be 127.0.0.1:{port} or localhost:{port}"
            )));
        }
    }
    let project_id = super::parse_project_id(path)?;
    let access = super::access::authenticate(
        &state.pool,
        state.settings.admin_token.as_deref(),
        super::access::presented_token(req).as_deref(),
    )
    .await?;
    if !access.allows_project(project_id) {
        return Err(ApiError::Forbidden(
            "this token is for another project".into(),
        ));
    }
    let agent_id =
        super::access::acting_agent(&access, "agent_id", params.agent_id)?.ok_or_else(|| {
            ApiError::bad_request(
                "missing_field",
                "the `agent_id` query parameter is required (or a token bound to an agent)",
            )
        })?;
    let agent_type = params
        .agent_type
        .unwrap_or_else(|| DEFAULT_AGENT_TYPE.to_owned());
    let agent_id = agent_id.into_string();
    let agent_type = super::parse_agent_type("agent_type", agent_type)?.into_string();
    let project = projects::load(state, path).await?;
    Ok((
        McpIdentity {
            project_id: project.id,
            agent_id,
            agent_type,
        },
        access,
        project,
    ))
}

/// Records a call of the session's agent: joins it if needed, and counts as presence.
pub(super) async fn joined(
    state: &AppState,
    identity: &McpIdentity,
    access: &Access,
) -> Result<(), ApiError> {
    call_as(
        state,
        access,
        identity.project_id,
        &CallAs::implicit(&identity.agent_id, &identity.agent_type, Interface::Mcp),
    )
    .await
    .map(drop)
}

fn session_header(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// The open session a request names, or the HTTP error the specification asks for.
fn session_of(
    req: &HttpRequest,
    state: &AppState,
    identity: &McpIdentity,
) -> Result<(String, &'static str), ApiError> {
    let id = session_header(req).ok_or_else(|| {
        ApiError::bad_request(
            "missing_session",
            "the Mcp-Session-Id header is required after initialize",
        )
    })?;
    let version = state.mcp_sessions.touch(id, identity).ok_or_else(|| {
        ApiError::NotFound("no such MCP session (ended or unknown): initialize again".into())
    })?;
    if let Some(asked) = req.headers().get(VERSION_HEADER) {
        let asked = asked.to_str().unwrap_or_default();
        if !PROTOCOL_VERSIONS.contains(&asked) {
            return Err(ApiError::bad_request(
                "unsupported_protocol_version",
                format!(
                    "MCP-Protocol-Version {asked:?} is not supported: use one of {PROTOCOL_VERSIONS:?}"
                ),
            ));
        }
    }
    Ok((id.to_owned(), version))
}

/// `POST /mcp/{project_id}`: one JSON-RPC message (or, in revision 2025-03-26, a batch).
pub async fn post(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<McpParams>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (identity, access, project) = admit(&req, &state, &path, params.into_inner()).await?;
    // The body is read only once the caller is admitted.
    let body = read_body(payload).await?;
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => {
            return Ok(HttpResponse::BadRequest().json(error_response(
                &Value::Null,
                code::PARSE_ERROR,
                &format!("the body is not JSON: {e}"),
            )))
        }
    };
    // initialize opens a session, and comes alone.
    if let Ok(Incoming::Request { id, method, params }) = parse_message(&value) {
        if method == "initialize" {
            let requested = params.get("protocolVersion").and_then(Value::as_str);
            let version = negotiate(requested);
            joined(&state, &identity, &access).await?;
            let session = state.mcp_sessions.open(identity.clone(), version);
            let result = mcp_tools::initialize_result(version, &identity);
            let mut response = HttpResponse::Ok();
            if let Ok(value) = HeaderValue::from_str(&session) {
                response.insert_header((SESSION_HEADER, value));
            }
            return Ok(response.json(result_response(&id, result)));
        }
    }
    let (_session, version) = session_of(&req, &state, &identity)?;
    let ctx = mcp_tools::Context {
        state: &state,
        identity: &identity,
        access: &access,
        project: &project,
    };
    let responses = match &value {
        Value::Array(batch) if version == "2025-03-26" && !batch.is_empty() => {
            let mut out = Vec::new();
            for message in batch {
                if let Some(response) = handle(&ctx, message).await {
                    out.push(response);
                }
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
        Value::Array(_) => Some(error_response(
            &Value::Null,
            code::INVALID_REQUEST,
            "batches are not part of this protocol revision: send one message per request",
        )),
        message => handle(&ctx, message).await,
    };
    Ok(match responses {
        Some(body) => HttpResponse::Ok().json(body),
        // Only notifications or responses: accepted, nothing to say.
        None => HttpResponse::Accepted().finish(),
    })
}

/// Largest JSON-RPC body accepted, as for the REST API.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

async fn read_body(mut payload: web::Payload) -> Result<web::BytesMut, ApiError> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("invalid_json", format!("the body could not be read: {e}"))
        })?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::bad_request(
                "invalid_json",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Handles one message; `None` for a notification or a response.
async fn handle(ctx: &mcp_tools::Context<'_>, message: &Value) -> Option<Value> {
    match parse_message(message) {
        Err(error) => Some(error),
        Ok(Incoming::Notification { .. } | Incoming::Response) => None,
        Ok(Incoming::Request { id, method, params }) => Some(match method.as_str() {
            "initialize" => error_response(
                &id,
                code::INVALID_REQUEST,
                "this session is initialized already",
            ),
            "ping" => result_response(&id, json!({})),
            "tools/list" => result_response(&id, mcp_tools::list()),
            "tools/call" => match mcp_tools::call(ctx, &params).await {
                Ok(result) => result_response(&id, result),
                Err(message) => error_response(&id, code::INVALID_PARAMS, &message),
            },
            other => error_response(
                &id,
                code::METHOD_NOT_FOUND,
                &format!("method {other:?} is not served by this endpoint"),
            ),
        }),
    }
}

/// `GET /mcp/{project_id}`: no server-initiated stream is offered.
pub async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<McpParams>,
) -> Result<HttpResponse, ApiError> {
    admit(&req, &state, &path, params.into_inner()).await?;
    Ok(HttpResponse::MethodNotAllowed()
        .insert_header((header::ALLOW, "POST, DELETE"))
        .json(json!({
            "error": "this endpoint offers no server-initiated stream: POST JSON-RPC messages",
            "code": "method_not_allowed",
        })))
}

/// `DELETE /mcp/{project_id}`: ends the session.
pub async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<McpParams>,
) -> Result<HttpResponse, ApiError> {
    let (identity, _, _) = admit(&req, &state, &path, params.into_inner()).await?;
    let id = session_header(&req).ok_or_else(|| {
        ApiError::bad_request("missing_session", "the Mcp-Session-Id header is required")
    })?;
    if state.mcp_sessions.end(id, &identity) {
        Ok(HttpResponse::Ok().json(json!({"ended": true})))
    } else {
        Err(ApiError::NotFound("no such MCP session".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_told_apart_and_malformed_ones_refused() {
        let request = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"});
        assert_eq!(
            parse_message(&request),
            Ok(Incoming::Request {
                id: json!(7),
                method: "tools/list".into(),
                params: Value::Null
            })
        );
        assert_eq!(
            parse_message(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"})),
            Ok(Incoming::Notification {
                method: "notifications/initialized".into()
            })
        );
        assert_eq!(
            parse_message(&json!({"jsonrpc": "2.0", "id": 1, "result": {}})),
            Ok(Incoming::Response)
        );
        for bad in [
            json!([1]),
            json!({"id": 1, "method": "x"}),
            json!({"jsonrpc": "2.0", "id": 1}),
            json!({"jsonrpc": "2.0", "id": 1, "method": 5}),
            json!({"jsonrpc": "2.0", "id": {"no": 1}, "method": "x"}),
        ] {
            let error = parse_message(&bad).expect_err("refused");
            assert_eq!(error["error"]["code"], code::INVALID_REQUEST, "{bad}");
        }
    }

    #[test]
    fn the_version_is_the_client_s_when_spoken_here_else_the_newest() {
        assert_eq!(negotiate(Some("2025-03-26")), "2025-03-26");
        assert_eq!(negotiate(Some("2025-06-18")), "2025-06-18");
        assert_eq!(negotiate(Some("2099-01-01")), "2025-06-18");
        assert_eq!(negotiate(None), "2025-06-18");
    }

    #[test]
    fn origins_and_hosts_are_checked_against_loopback_and_the_list() {
        let allowed = vec!["https://tools.example".to_owned()];
        assert!(origin_allowed("https://tools.example", &allowed, 8080));
        assert!(origin_allowed("http://127.0.0.1:8080", &[], 8080));
        assert!(origin_allowed("http://localhost:8080", &[], 8080));
        assert!(!origin_allowed("http://localhost:9999", &[], 8080));
        assert!(!origin_allowed("https://evil.example", &allowed, 8080));
        assert!(!origin_allowed("null", &[], 8080));
        assert!(loopback_host("127.0.0.1:8080", 8080));
        assert!(loopback_host("LOCALHOST:8080", 8080));
        assert!(loopback_host("[::1]:8080", 8080));
        assert!(!loopback_host("evil.example:8080", 8080));
        assert!(!loopback_host("127.0.0.1:80", 8080));
        assert!(!loopback_host("", 8080));
    }

    #[test]
    fn sessions_belong_to_their_agent_and_end() {
        let sessions = McpSessions::default();
        let me = McpIdentity {
            project_id: Uuid::nil(),
            agent_id: "a".into(),
            agent_type: "t".into(),
        };
        let other = McpIdentity {
            agent_id: "b".into(),
            ..me.clone()
        };
        let id = sessions.open(me.clone(), "2025-06-18");
        assert_eq!(sessions.touch(&id, &me), Some("2025-06-18"));
        assert_eq!(sessions.touch(&id, &other), None, "not another agent's");
        assert!(!sessions.end(&id, &other));
        assert!(sessions.end(&id, &me));
        assert_eq!(sessions.touch(&id, &me), None, "ended");
    }
}
