//! Errors of the REST routes and the WebSocket upgrade, each mapped to an HTTP status and a
//! JSON body `{"error": "...", "code": "..."}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::protocol::{ErrorCode, Rejection};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or breaks a rule (400).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// No valid credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials that do not allow this (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such project or message (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// Too many open connections for the project or the client's address (429).
    #[error("{0}")]
    TooManyConnections(String),
    /// Over the project's rate (429): retry after this many milliseconds.
    #[error("too many messages for this project; retry in {0} ms")]
    RateLimited(u64),
    /// The database could not be reached in time (503); nothing was changed.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The broker cannot take more right now (503, `unavailable`); nothing was changed:
    /// retry after this many milliseconds.
    #[error("{0}")]
    Saturated(String, u64),
    /// Too many requests of this kind are being served; retry after this many milliseconds
    /// (503 `busy`).
    #[error("{message}; retry in {retry_after_ms} ms")]
    Busy {
        message: String,
        retry_after_ms: u64,
    },
    /// Too many `POST .../requests` of this project are waiting for their replies (429).
    #[error("{0}")]
    TooManyWaiters(String),
    /// The request body did not arrive within `body_timeout_ms` (408; the connection is
    /// closed).
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u64),
    /// A bug or an unexpected database answer (500). The detail is logged with the request
    /// id, never sent to the client.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The detail of a 500, left in the response's extensions for the request log (which knows
/// the request id) instead of in its body.
#[derive(Clone, Debug)]
pub struct InternalDetail(pub String);

/// The body of every 500: no detail, only where to find it.
pub fn internal_body(request_id: &str) -> serde_json::Value {
    serde_json::json!({
        "error": format!("internal error; the broker's log has the details under request id {request_id}"),
        "code": "internal",
        "request_id": request_id,
    })
}

impl From<crate::auth::NotThisAgent> for ApiError {
    fn from(e: crate::auth::NotThisAgent) -> Self {
        ApiError::Forbidden(e.to_string())
    }
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::NotFound(_) => "not_found",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Conflict(_) => "conflict",
            ApiError::RateLimited(_) => ErrorCode::RateLimited.as_str(),
            ApiError::TooManyConnections(_) => "too_many_connections",
            ApiError::Unavailable(_) | ApiError::Saturated(..) => ErrorCode::Unavailable.as_str(),
            ApiError::Busy { .. } => "busy",
            ApiError::TooManyWaiters(_) => "too_many_waiters",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        match e {
            crate::auth::AuthError::Database(detail) => unavailable(&detail),
            other => ApiError::Unauthorized(other.to_string()),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        match rejection.code {
            ErrorCode::Unavailable => match rejection.retry_after_ms {
                Some(ms) => ApiError::Saturated(rejection.message, ms),
                None => ApiError::Unavailable(rejection.message),
            },
            ErrorCode::ProjectNotFound => ApiError::NotFound(rejection.message),
            code => ApiError::bad_request(code.as_str(), rejection.message),
        }
    }
}

impl From<diesel::result::Error> for ApiError {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::Error as E;
        match e {
            E::DatabaseError(diesel::result::DatabaseErrorKind::ClosedConnection, _)
            | E::BrokenTransactionManager => unavailable(&e.to_string()),
            E::DatabaseError(diesel::result::DatabaseErrorKind::Unknown, ref info)
                if info.message().contains("connection") =>
            {
                unavailable(&e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for ApiError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        unavailable(&e.to_string())
    }
}

/// The database could not serve a request: the detail (the database's or the pool's text) is
/// logged, and the client is told only that.
fn unavailable(detail: &str) -> ApiError {
    log::warn!("database unavailable: {detail}");
    ApiError::Unavailable("it could not be reached in time; retry later".into())
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: String,
    code: &'a str,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited(_) | ApiError::TooManyConnections(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::TooManyWaiters(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Saturated(..) | ApiError::Busy { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(detail) = self {
            // The request log (`log_request`) logs the detail with the request id and
            // answers the generic body of `internal_body`.
            let mut response = HttpResponse::InternalServerError().json(internal_body("-"));
            response
                .extensions_mut()
                .insert(InternalDetail(detail.clone()));
            return response;
        }
        let mut response = HttpResponse::build(self.status_code());
        if let ApiError::Unauthorized(_) = self {
            response.insert_header((actix_web::http::header::WWW_AUTHENTICATE, "Bearer"));
        }
        if let ApiError::RateLimited(ms)
        | ApiError::Saturated(_, ms)
        | ApiError::Busy {
            retry_after_ms: ms, ..
        } = self
        {
            response.insert_header((
                actix_web::http::header::RETRY_AFTER,
                ms.div_ceil(1000).max(1).to_string(),
            ));
        }
        if let ApiError::TooManyWaiters(_) = self {
            response.insert_header((actix_web::http::header::RETRY_AFTER, "1"));
        }
        if let ApiError::BodyTimeout(_) = self {
            // What is left of the body is not read: the connection cannot be reused.
            response.force_close();
        }
        response.json(ErrorBody {
            error: self.to_string(),
            code: self.code(),
        })
    }
}
