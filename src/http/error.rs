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
    /// A bug or an unexpected database answer (500).
    #[error("internal error: {0}")]
    Internal(String),
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
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        match e {
            crate::auth::AuthError::Database(detail) => ApiError::Unavailable(detail),
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
            | E::BrokenTransactionManager => ApiError::Unavailable(e.to_string()),
            E::DatabaseError(diesel::result::DatabaseErrorKind::Unknown, ref info)
                if info.message().contains("connection") =>
            {
                ApiError::Unavailable(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for ApiError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
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
            ApiError::Unavailable(_) | ApiError::Saturated(..) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(detail) = self {
            log::error!("internal error: {detail}");
        }
        let mut response = HttpResponse::build(self.status_code());
        if let ApiError::Unauthorized(_) = self {
            response.insert_header((actix_web::http::header::WWW_AUTHENTICATE, "Bearer"));
        }
        if let ApiError::RateLimited(ms) | ApiError::Saturated(_, ms) = self {
            response.insert_header((
                actix_web::http::header::RETRY_AFTER,
                ms.div_ceil(1000).to_string(),
            ));
        }
        response.json(ErrorBody {
            error: self.to_string(),
            code: self.code(),
        })
    }
}
