//! `GET /ws/agent/messages/{project_id}`: the WebSocket upgrade. Everything that can be
//! refused is refused here, with an HTTP error, before the upgrade.
//!
//! ## What the client sends is judged by its frame headers
//!
//! The WebSocket decoder (actix-http's `Parser`, driven by actix-ws's `MessageStream`) keeps
//! reading the connection into its buffer until a whole frame is there, and only then
//! compares the frame's length with its maximum; `MessageStream` also reads everything the
//! connection has before decoding. A header declaring 2^40 bytes followed by a stream of
//! payload would therefore be buffered as fast as the client sends it, and a fragmented
//! message over the limit ends with the aggregator's generic error. So the client's bytes
//! pass through a [`FrameGuard`] on their way to the decoder: it follows the frame
//! boundaries with a [`FrameTracker`] (headers only; payloads are skipped, not copied) and,
//! as soon as a header declares more than `max_frame_bytes`, or a continuation's header would
//! take its message past it, lets through only the complete frames before that header, ends
//! the stream and records why in a [`Refusal`] shared with the session. The session handles
//! the frames before the cut in order, then sees the end of the stream and the refusal, and
//! answers `frame_too_large` and closes with 1009 (after the receipts of what was sent
//! before). Nothing of the refused frame's payload reaches the decoder, which therefore never
//! holds more than one frame of at most `max_frame_bytes` plus [`READ_AHEAD`] and the last
//! chunk the HTTP layer handed over: `MessageStream` reads until its payload has nothing
//! ready, so the guard hands over at most that much before it lets the decoder have a turn,
//! whatever the HTTP layer has buffered (while the stream is read, the HTTP layer stops
//! reading the socket once its own 32 KiB buffer is full and nobody takes from it). Once the cut stream has been dropped, the HTTP layer reads
//! and discards whatever still arrives, keeping none of it, until it shuts the connection
//! down after the close frame (within its client disconnect timeout, 1 s). The decoder's own
//! limits stay in place behind the guard.

use std::pin::Pin;
use std::task::{Context, Poll};

use actix::{Actor, AsyncContext};
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_web::{dev, web, FromRequest, HttpRequest, HttpResponse};
use futures_util::Stream;
use serde::Deserialize;
use uuid::Uuid;

use super::{projects, ApiError, AppState};
use crate::actors::session::{DeliveryOptions, Identity, SessionActor, SessionDeps};
use crate::db::cursors::{self, MemberCursor};
use crate::db::queries;
use crate::frames::{FrameTracker, Refusal};
use crate::protocol::{self, AckMode};

/// The agent type of a connection that names none.
pub const DEFAULT_AGENT_TYPE: &str = "agent";

#[derive(Deserialize)]
pub struct ConnectParams {
    agent_id: Option<String>,
    agent_type: Option<String>,
    /// `auto` (default) or `manual`.
    ack: Option<AckMode>,
    /// Replay the visible history after this seq instead of what is owed.
    since: Option<i64>,
    /// What the agent can do, comma-separated.
    capabilities: Option<String>,
}

pub async fn connect(
    req: HttpRequest,
    body: web::Payload,
    path: web::Path<String>,
    params: web::Query<ConnectParams>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let params = params.into_inner();
    let Some(agent_id) = params.agent_id else {
        return observe(req, body, path, params, state).await;
    };
    let agent_id = super::parse_agent_id("agent_id", agent_id)?.into_string();
    let agent_type = super::parse_agent_type(
        "agent_type",
        params
            .agent_type
            .unwrap_or_else(|| DEFAULT_AGENT_TYPE.to_owned()),
    )?
    .into_string();
    let capabilities: Option<Vec<String>> = params.capabilities.as_deref().map(|list| {
        list.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    });
    if let Some(capabilities) = &capabilities {
        protocol::check_capabilities(capabilities)?;
    }
    check_since(params.since)?;
    let project_id = super::parse_project_id(&path)?;
    let access = super::access::authenticate(
        &state.pool,
        state.settings.admin_token.as_deref(),
        super::access::presented_token(&req).as_deref(),
    )
    .await?;
    if !access.allows_project(project_id) {
        return Err(ApiError::Forbidden(
            "this token is for another project".into(),
        ));
    }
    access.speak_as(&agent_id)?;
    let project = projects::load(&state, &path).await?;

    let permit = state
        .connection_limits
        .acquire(project.id, req.peer_addr().map(|a| a.ip()))
        .map_err(|scope| {
            ApiError::TooManyConnections(format!("too many open connections for this {scope}"))
        })?;
    let (response, ws, stream, refusal) =
        upgrade(&req, body, state.settings.max_frame_bytes).await?;

    let session_id = Uuid::new_v4();
    let cursor = {
        let mut conn = state.pool.get().await?;
        queries::insert_session(&mut conn, session_id, project.id, &agent_id, &agent_type).await?;
        // A new member starts at the head read above; the replay covers anything committed
        // between that read and the moment the session joins its channel.
        let cursor = cursors::join_member(
            &mut conn,
            project.id,
            &agent_id,
            &agent_type,
            session_id,
            project.head_seq,
        )
        .await?;
        if let Some(capabilities) = &capabilities {
            cursors::set_capabilities(&mut conn, project.id, &agent_id, capabilities, None).await?;
        }
        cursor
    };

    let deps = session_deps(&state, project.id, project.head_seq);
    let identity = Identity {
        session_id,
        token_id: access.token_id(),
        project_id: project.id,
        agent_id,
        agent_type,
        observer: false,
    };
    log::info!(
        "session {session_id}: agent {:?} ({}) joined project {}",
        identity.agent_id,
        identity.agent_type,
        project.id
    );
    let delivery = DeliveryOptions {
        ack: params.ack.unwrap_or(AckMode::Auto),
        since: params.since,
        cursor,
    };
    SessionActor::create(move |ctx| {
        ctx.add_stream(stream);
        SessionActor::new(identity, deps, delivery, ws, permit, refusal)
    });
    Ok(response)
}

/// What a session of this project needs from the rest of the broker (its channel started at
/// `head_seq` if it is not running yet).
fn session_deps(state: &AppState, project_id: Uuid, head_seq: i64) -> SessionDeps {
    SessionDeps {
        channel: state.registry.get_or_start(project_id, head_seq),
        persistence: state.persistence.clone(),
        cursors: state.cursors.clone(),
        pool: state.pool.clone(),
        settings: state.settings.clone(),
        stats: state.stats.clone(),
        project_limits: state.project_limits.clone(),
        coordination: state.coordination.clone(),
    }
}

/// `since` as the query gave it: not negative.
fn check_since(since: Option<i64>) -> Result<(), ApiError> {
    if since.is_some_and(|s| s < 0) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`since` must not be negative",
        ));
    }
    Ok(())
}

/// The aggregated message stream of an accepted upgrade.
type ClientStream = actix_ws::AggregatedMessageStream;

/// Upgrades the connection, with the client's bytes passing through a [`FrameGuard`] on
/// their way to the decoder.
async fn upgrade(
    req: &HttpRequest,
    body: web::Payload,
    max_frame: usize,
) -> Result<(HttpResponse, actix_ws::Session, ClientStream, Refusal), ApiError> {
    let refusal = Refusal::default();
    let guarded = FrameGuard {
        inner: body.into_inner(),
        tracker: FrameTracker::new(max_frame),
        refusal: refusal.clone(),
        refused: false,
        read_ahead: 0,
    };
    let body = web::Payload::from_request(
        req,
        &mut dev::Payload::Stream {
            payload: Box::pin(guarded),
        },
    )
    .await
    .map_err(|e| ApiError::Internal(format!("the WebSocket body: {e}")))?;
    let (response, ws, stream) = actix_ws::handle(req, body).map_err(|e| {
        ApiError::bad_request("not_a_websocket", format!("WebSocket upgrade failed: {e}"))
    })?;
    let stream = stream
        .max_frame_size(max_frame)
        .aggregate_continuations()
        .max_continuation_size(max_frame);
    Ok((response, ws, stream, refusal))
}

/// A connection without `agent_id`: a read-only observer of the whole project. It receives
/// every message committed in the project (after `since` when given, else from the head),
/// is no member and cannot send. With tokens required it needs the admin token or an
/// unbound token of the project: a token bound to an agent sees only what that agent may.
async fn observe(
    req: HttpRequest,
    body: web::Payload,
    path: web::Path<String>,
    params: ConnectParams,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if params.agent_type.is_some() || params.ack.is_some() || params.capabilities.is_some() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`agent_type`, `ack` and `capabilities` need an `agent_id`: a connection without one is a read-only observer",
        ));
    }
    check_since(params.since)?;
    let project_id = super::parse_project_id(&path)?;
    let access = super::access::authenticate(
        &state.pool,
        state.settings.admin_token.as_deref(),
        super::access::presented_token(&req).as_deref(),
    )
    .await?;
    if !access.allows_project(project_id) {
        return Err(ApiError::Forbidden(
            "this token is for another project".into(),
        ));
    }
    if let Some(bound) = access.bound_agent() {
        return Err(ApiError::Forbidden(format!(
            "this token speaks only as agent {bound:?} and cannot observe the whole project; connect with agent_id={bound:?}"
        )));
    }
    let project = projects::load(&state, &path).await?;
    let permit = state
        .connection_limits
        .acquire(project.id, req.peer_addr().map(|a| a.ip()))
        .map_err(|scope| {
            ApiError::TooManyConnections(format!("too many open connections for this {scope}"))
        })?;
    let (response, ws, stream, refusal) =
        upgrade(&req, body, state.settings.max_frame_bytes).await?;
    let session_id = Uuid::new_v4();
    let deps = session_deps(&state, project.id, project.head_seq);
    let identity = Identity {
        session_id,
        token_id: access.token_id(),
        project_id: project.id,
        agent_id: String::new(),
        agent_type: String::new(),
        observer: true,
    };
    log::info!(
        "session {session_id}: observer joined project {}",
        project.id
    );
    // Without `since` the observer starts at the head: nothing is replayed.
    let delivery = DeliveryOptions {
        ack: AckMode::Auto,
        since: params.since,
        cursor: MemberCursor {
            ack_floor: project.head_seq,
            acked_above: Vec::new(),
            joined_seq: None,
            agent_type: String::new(),
        },
    };
    SessionActor::create(move |ctx| {
        ctx.add_stream(stream);
        SessionActor::new(identity, deps, delivery, ws, permit, refusal)
    });
    Ok(response)
}

/// Most bytes the guard hands to the decoder before the decoder has had a turn.
const READ_AHEAD: usize = 64 * 1024;

/// The client's side of the connection on its way to the WebSocket decoder, cut at the first
/// frame header over the limit (see the module documentation).
struct FrameGuard<P = dev::Payload> {
    inner: P,
    tracker: FrameTracker,
    refusal: Refusal,
    /// Set at the cut: the stream has ended, and the connection is not read any further.
    refused: bool,
    /// Bytes handed over since the decoder last had a turn.
    read_ahead: usize,
}

impl<P> Stream for FrameGuard<P>
where
    P: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(None);
        }
        if this.read_ahead >= READ_AHEAD {
            // The decoder reads until nothing is ready: let it decode what it has first.
            this.read_ahead = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => match this.tracker.scan(&bytes) {
                Ok(()) => {
                    this.read_ahead += bytes.len();
                    Poll::Ready(Some(Ok(bytes)))
                }
                Err(refused) => {
                    this.refused = true;
                    this.refusal.record(refused.why);
                    if refused.keep == 0 {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(bytes.slice(..refused.keep))))
                    }
                }
            },
            Poll::Pending => {
                this.read_ahead = 0;
                Poll::Pending
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use futures_util::stream;

    use super::*;
    use crate::frames::Oversize;

    fn poll<S: Stream + Unpin>(s: &mut S) -> Poll<Option<S::Item>> {
        Pin::new(s).poll_next(&mut Context::from_waker(Waker::noop()))
    }

    /// A masked text frame header for `len` bytes, with a 64-bit length.
    fn header(len: u64) -> Vec<u8> {
        let mut bytes = vec![0x81, 0x80 | 127];
        bytes.extend(len.to_be_bytes());
        bytes.extend([1, 2, 3, 4]);
        bytes
    }

    fn guard(
        chunks: Vec<Vec<u8>>,
        max: usize,
    ) -> FrameGuard<impl Stream<Item = Result<Bytes, PayloadError>> + Unpin> {
        FrameGuard {
            inner: stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c)))),
            tracker: FrameTracker::new(max),
            refusal: Refusal::default(),
            refused: false,
            read_ahead: 0,
        }
    }

    #[test]
    fn the_stream_ends_before_the_refused_header() {
        let mut first = header(3);
        first.extend([0; 3]);
        let fits = first.len();
        first.extend(header(1 << 40));
        let mut payload = guard(vec![first, vec![0; 100]], 1000);
        match poll(&mut payload) {
            Poll::Ready(Some(Ok(bytes))) => assert_eq!(bytes.len(), fits),
            other => panic!("{other:?}"),
        }
        assert!(matches!(poll(&mut payload), Poll::Ready(None)));
        assert!(matches!(poll(&mut payload), Poll::Ready(None)));
        assert_eq!(
            payload.refusal.get(),
            Some(Oversize::Frame { declared: 1 << 40 })
        );
    }

    #[test]
    fn the_decoder_gets_a_turn_after_read_ahead_bytes() {
        let mut frame = header(READ_AHEAD as u64);
        frame.extend(vec![0; READ_AHEAD]);
        let mut payload = guard(vec![frame.clone(), frame], 2 * READ_AHEAD);
        assert!(matches!(poll(&mut payload), Poll::Ready(Some(Ok(_)))));
        assert!(poll(&mut payload).is_pending());
        assert!(matches!(poll(&mut payload), Poll::Ready(Some(Ok(_)))));
        assert!(poll(&mut payload).is_pending());
        assert!(matches!(poll(&mut payload), Poll::Ready(None)));
        assert_eq!(payload.refusal.get(), None);
    }
}
