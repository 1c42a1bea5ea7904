//! What keeps one client from holding the broker's sockets, memory or database: the admin
//! token checked before a body is read, a deadline on request bodies (and unread bodies not
//! drained), refusing NUL characters in the URL, a bound on the REST requests waiting for a
//! reply, a bound on the heavy reads served at once, and large pages serialised off the HTTP
//! workers.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{HttpMessage, ResponseError};
use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::{ApiError, AppState};
use crate::limits::{ConnectionLimits, ConnectionPermit};

/// Whether a percent-encoded URL part (a path or a query string) decodes to a NUL byte. Raw
/// NUL bytes cannot be in a request line; `%00` is the only way in.
pub fn decodes_to_nul(raw: &str) -> bool {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if let (b'%', Some(&high), Some(&low)) = (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            if let (Some(high), Some(low)) = (hex(high), hex(low)) {
                if high == 0 && low == 0 {
                    return true;
                }
                i += 3;
                continue;
            }
        }
        i += 1;
    }
    false
}

/// Refuses a request whose path or query string holds a NUL character (PostgreSQL cannot
/// compare text with one): 400 `invalid_field` for the path, `invalid_query` for the query.
pub async fn refuse_nul(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if decodes_to_nul(req.path()) {
        return Ok(req.error_response(ApiError::bad_request(
            "invalid_field",
            "the path must not contain a NUL character (%00)",
        )));
    }
    if decodes_to_nul(req.query_string()) {
        return Ok(req.error_response(ApiError::bad_request(
            "invalid_query",
            "query parameters must not contain a NUL character (%00)",
        )));
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

/// The state shared by a request's payload (as its handler reads it) and the middleware that
/// bounds it.
struct BodyWatch {
    /// The real payload; taken out after the response when it was not read to its end.
    payload: Option<Payload>,
    finished: bool,
    timed_out: bool,
}

/// The request's payload, failing with `TimedOut` once the deadline has passed while the
/// body is still arriving. Bytes already received are always given.
struct DeadlinePayload {
    watch: Rc<RefCell<BodyWatch>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Stream for DeadlinePayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let watch = Rc::clone(&self.watch);
        let mut watch = watch.borrow_mut();
        if watch.finished {
            return Poll::Ready(None);
        }
        let Some(payload) = watch.payload.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(payload).poll_next(cx) {
            Poll::Ready(item) => {
                if !matches!(item, Some(Ok(_))) {
                    watch.finished = true;
                }
                Poll::Ready(item)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    watch.timed_out = true;
                    watch.finished = true;
                    Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the request body did not arrive in time",
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// A response body that keeps the request's unread payload alive until the response is
/// written: the HTTP layer then closes the connection (instead of reading, and discarding, a
/// body that may never end).
struct HoldPayload {
    body: BoxBody,
    _unread: Option<Payload>,
}

impl MessageBody for HoldPayload {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.body).poll_next(cx)
    }
}

/// Bounds the time a request body may take to arrive (`body_timeout_ms`, from the end of the
/// headers): a slower body is answered 408 `body_timeout` and its connection closed. A body
/// that its handler did not read to the end (refused before it was read, e.g. without
/// credentials) is not drained either: the connection is closed after the response.
pub async fn bound_body(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let has_body = req
        .headers()
        .contains_key(actix_web::http::header::CONTENT_LENGTH)
        || req
            .headers()
            .contains_key(actix_web::http::header::TRANSFER_ENCODING);
    let timeout_ms = req
        .app_data::<web::Data<AppState>>()
        .map(|state| state.settings.body_timeout_ms.max(1));
    let (Some(timeout_ms), true, false) = (timeout_ms, has_body, req.head().upgrade()) else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let watch = Rc::new(RefCell::new(BodyWatch {
        payload: Some(req.take_payload()),
        finished: false,
        timed_out: false,
    }));
    let stream = DeadlinePayload {
        watch: Rc::clone(&watch),
        deadline: Box::pin(tokio::time::sleep(Duration::from_millis(timeout_ms))),
    };
    req.set_payload(Payload::Stream {
        payload: Box::pin(stream),
    });
    let response = next.call(req).await?.map_into_boxed_body();
    let (timed_out, unread) = {
        let mut watch = watch.borrow_mut();
        let unread = if watch.finished && !watch.timed_out {
            None
        } else {
            watch.payload.take()
        };
        (watch.timed_out, unread)
    };
    let response = if timed_out {
        response.into_response(ApiError::BodyTimeout(timeout_ms).error_response())
    } else {
        response
    };
    Ok(response.map_body(|_, body| {
        BoxBody::new(HoldPayload {
            body,
            _unread: unread,
        })
    }))
}

/// `POST /api/projects` and `GET /api/projects`: the admin token (or an open broker) is checked
/// before anything of the request is read. The access is left in the request's extensions.
pub async fn admin_access(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return Ok(req.error_response(ApiError::Internal("no application state".into())));
    };
    let token = super::access::presented_token(req.request());
    let access = match super::access::authenticate(
        &state.pool,
        state.settings.admin_token.as_deref(),
        token.as_deref(),
    )
    .await
    {
        Ok(access) if access.is_admin() => access,
        Ok(_) => {
            return Ok(req.error_response(ApiError::Forbidden("this needs the admin token".into())))
        }
        Err(e) => return Ok(req.error_response(ApiError::from(e))),
    };
    req.extensions_mut().insert(access);
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

/// Routes under a project that need the admin token (tokens): checked on the access
/// `project_access` granted, before the body is read.
pub async fn admin_only(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let admin = req
        .extensions()
        .get::<crate::auth::Access>()
        .is_some_and(crate::auth::Access::is_admin);
    if !admin {
        return Ok(req.error_response(ApiError::Forbidden(
            "managing tokens needs the admin token".into(),
        )));
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

/// The REST requests waiting for their reply (`POST .../requests`), bounded per project and
/// in all.
#[derive(Clone)]
pub struct Waiters {
    per_project: ConnectionLimits,
    all: Option<Arc<Semaphore>>,
}

/// One waiting request's place; dropped when the request is answered or its client leaves.
pub struct WaiterPermit {
    _project: ConnectionPermit,
    _all: Option<OwnedSemaphorePermit>,
}

impl Waiters {
    /// 0 means no limit.
    pub fn new(per_project: usize, all: usize) -> Self {
        Waiters {
            per_project: ConnectionLimits::new(per_project, 0),
            all: (all > 0).then(|| Arc::new(Semaphore::new(all))),
        }
    }

    pub fn acquire(&self, project_id: Uuid) -> Result<WaiterPermit, ApiError> {
        let all = match &self.all {
            None => None,
            Some(all) => Some(
                Arc::clone(all)
                    .try_acquire_owned()
                    .map_err(|_| ApiError::Busy {
                        message: "too many requests are waiting for their replies".into(),
                        retry_after_ms: 1_000,
                    })?,
            ),
        };
        let project = self.per_project.acquire(project_id, None).map_err(|_| {
            ApiError::TooManyWaiters(
                "too many requests of this project are waiting for their replies".into(),
            )
        })?;
        Ok(WaiterPermit {
            _project: project,
            _all: all,
        })
    }
}

/// A large JSON answer (a page of messages), serialised on a blocking thread rather than on
/// the HTTP worker, whose WebSocket sessions would otherwise wait for it.
pub async fn large_json(
    body: impl serde::Serialize + Send + 'static,
) -> Result<actix_web::HttpResponse, ApiError> {
    let bytes = web::block(move || serde_json::to_vec(&body))
        .await
        .map_err(|e| ApiError::Internal(format!("serialising a page: {e}")))?
        .map_err(|e| ApiError::Internal(format!("serialising a page: {e}")))?;
    Ok(actix_web::HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(bytes))
}

/// History, search, inbox and dead-letter reads served at once; the others wait their turn, for a
/// bounded time.
#[derive(Clone)]
pub struct HeavyReads {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl HeavyReads {
    pub fn new(at_once: usize, wait: Duration) -> Self {
        HeavyReads {
            permits: Arc::new(Semaphore::new(at_once.max(1))),
            wait,
        }
    }

    /// A turn, or 503 `busy` when none came within the wait.
    pub async fn turn(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        let busy = || ApiError::Busy {
            message: "too many history, inbox and dead-letter reads are being served".into(),
            retry_after_ms: 1_000,
        };
        match tokio::time::timeout(self.wait, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(busy()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_found_only_where_it_decodes() {
        assert!(decodes_to_nul("q=%00"));
        assert!(decodes_to_nul("/api/projects/x/agents/a%00b/inbox"));
        assert!(decodes_to_nul("a=1&sender=x%00"));
        assert!(
            !decodes_to_nul("q=%2500"),
            "an escaped percent sign then 00"
        );
        assert!(!decodes_to_nul("q=100&x=%30%30"));
        assert!(!decodes_to_nul("q=%0"));
        assert!(!decodes_to_nul("q=%"));
        assert!(!decodes_to_nul(""));
    }

    #[test]
    fn waiters_are_bounded_per_project_and_in_all() {
        let waiters = Waiters::new(2, 3);
        let (p, q) = (Uuid::new_v4(), Uuid::new_v4());
        let a = waiters.acquire(p).expect("first");
        let _b = waiters.acquire(p).expect("second");
        assert!(matches!(
            waiters.acquire(p),
            Err(ApiError::TooManyWaiters(_))
        ));
        let _c = waiters.acquire(q).expect("another project");
        assert!(matches!(waiters.acquire(q), Err(ApiError::Busy { .. })));
        drop(a);
        assert!(waiters.acquire(p).is_ok(), "a place is freed on drop");
        assert!(Waiters::new(0, 0).acquire(p).is_ok(), "0: no limit");
    }

    #[tokio::test]
    async fn heavy_reads_wait_their_turn_then_are_refused() {
        let reads = HeavyReads::new(1, Duration::from_millis(20));
        let first = reads.turn().await.expect("a free turn");
        assert!(matches!(reads.turn().await, Err(ApiError::Busy { .. })));
        drop(first);
        assert!(reads.turn().await.is_ok());
    }
}
