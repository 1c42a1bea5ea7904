//! Who may do what. With an admin token configured (`admin_token`), every API call and
//! WebSocket upgrade presents a token (`Authorization: Bearer …`, or `?token=` where a
//! browser cannot set headers): the admin token for everything, or a project token for its
//! own project only. A project token may be bound to one agent id, which it then cannot
//! speak past. Without an admin token (allowed on loopback only) the broker is open.
//!
//! Tokens carry 244 random bits; only their SHA-256 is stored, so a leaked database
//! does not leak usable tokens.

use actix_web::HttpRequest;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::db::DbPool;

/// What the presented credentials allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No admin token is configured: everything is allowed.
    Open,
    /// The admin token: everything.
    Admin,
    /// A project token: that project only, as `agent_id` when bound.
    Project {
        token_id: Uuid,
        project_id: Uuid,
        agent_id: Option<String>,
    },
}

impl Access {
    /// May these credentials use `project_id`?
    pub fn allows_project(&self, project_id: Uuid) -> bool {
        match self {
            Access::Open | Access::Admin => true,
            Access::Project { project_id: p, .. } => *p == project_id,
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Access::Open | Access::Admin)
    }

    /// The agent these credentials must speak as, if any.
    pub fn bound_agent(&self) -> Option<&str> {
        match self {
            Access::Project { agent_id, .. } => agent_id.as_deref(),
            _ => None,
        }
    }

    pub fn token_id(&self) -> Option<Uuid> {
        match self {
            Access::Project { token_id, .. } => Some(*token_id),
            _ => None,
        }
    }
}

/// Why credentials were refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this broker requires a token: `Authorization: Bearer <token>` (or `?token=`)")]
    Missing,
    #[error("the token is not valid (unknown or revoked)")]
    Invalid,
    #[error("database error while checking the token: {0}")]
    Database(String),
}

/// The token a request presents: the bearer header, else the `token` query parameter.
pub fn presented_token(req: &HttpRequest) -> Option<String> {
    if let Some(value) = req.headers().get(actix_web::http::header::AUTHORIZATION) {
        // The scheme name is case-insensitive (RFC 7235).
        if let Some((scheme, token)) = value.to_str().ok().and_then(|v| v.split_once(' ')) {
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
                return Some(token.trim().to_owned());
            }
        }
    }
    url_query_token(req.query_string())
}

fn url_query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == "token").then(|| value.to_owned())
    })
}

/// Resolves the credentials of a request (a database lookup only for project tokens).
pub async fn authenticate(
    pool: &DbPool,
    admin_token: Option<&str>,
    presented: Option<&str>,
) -> Result<Access, AuthError> {
    let Some(admin) = admin_token.filter(|t| !t.is_empty()) else {
        return Ok(Access::Open);
    };
    let token = presented
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)?;
    if constant_time_eq(token.as_bytes(), admin.as_bytes()) {
        return Ok(Access::Admin);
    }
    let mut conn = pool
        .get()
        .await
        .map_err(|e| AuthError::Database(e.to_string()))?;
    let found = find_token(&mut conn, &hash(token))
        .await
        .map_err(|e| AuthError::Database(e.to_string()))?;
    match found {
        Some(t) if t.revoked_at.is_none() => Ok(Access::Project {
            token_id: t.id,
            project_id: t.project_id,
            agent_id: t.agent_id,
        }),
        _ => Err(AuthError::Invalid),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new token: 244 random bits (two v4 UUIDs), prefixed so it is recognisable in
/// configuration files.
pub fn generate() -> String {
    format!("ab_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

#[derive(QueryableByName, Debug)]
struct TokenRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    project_id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    agent_id: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    revoked_at: Option<DateTime<Utc>>,
}

async fn find_token(
    conn: &mut AsyncPgConnection,
    token_hash: &str,
) -> QueryResult<Option<TokenRow>> {
    diesel::sql_query(
        "SELECT id, project_id, agent_id, revoked_at FROM tokens WHERE token_hash = $1",
    )
    .bind::<Text, _>(token_hash)
    .get_result(conn)
    .await
    .optional()
}

/// A token as listed (never the token itself).
#[derive(QueryableByName, Serialize, Debug)]
pub struct TokenInfo {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub project_id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    pub agent_id: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Issues a token for a project; returns its id and the token (shown once).
pub async fn issue(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: Option<&str>,
) -> QueryResult<(Uuid, String)> {
    let (id, token) = (Uuid::new_v4(), generate());
    diesel::sql_query(
        "INSERT INTO tokens (id, project_id, agent_id, token_hash) VALUES ($1, $2, $3, $4)",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<SqlUuid, _>(project_id)
    .bind::<Nullable<Text>, _>(agent_id)
    .bind::<Text, _>(hash(&token))
    .execute(conn)
    .await?;
    Ok((id, token))
}

/// Revokes a token of a project; false when there is no such (unrevoked) token.
pub async fn revoke(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    token_id: Uuid,
) -> QueryResult<bool> {
    diesel::sql_query(
        "UPDATE tokens SET revoked_at = now() WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL",
    )
    .bind::<SqlUuid, _>(token_id)
    .bind::<SqlUuid, _>(project_id)
    .execute(conn)
    .await
    .map(|n| n == 1)
}

pub async fn list(conn: &mut AsyncPgConnection, project_id: Uuid) -> QueryResult<Vec<TokenInfo>> {
    diesel::sql_query(
        "SELECT id, project_id, agent_id, created_at, revoked_at FROM tokens \
         WHERE project_id = $1 ORDER BY created_at",
    )
    .bind::<SqlUuid, _>(project_id)
    .load(conn)
    .await
}

/// Shortest admin token accepted: a guessable one would undo everything it protects.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// Whether an address is loopback (127.0.0.0/8, ::1, localhost).
pub fn is_loopback_bind(bind: &str) -> bool {
    use std::net::ToSocketAddrs;
    match bind.to_socket_addrs() {
        Ok(mut addrs) => addrs.all(|a| a.ip().is_loopback()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_and_compare() {
        let t = generate();
        assert!(t.starts_with("ab_") && t.len() == 67);
        assert_eq!(hash(&t), hash(&t));
        assert_ne!(hash(&t), hash(&generate()));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(url_query_token("agent_id=a&token=xyz"), Some("xyz".into()));
        assert_eq!(url_query_token("agent_id=a"), None);
    }

    #[test]
    fn loopback_binds_are_recognised() {
        assert!(is_loopback_bind("127.0.0.1:8080"));
        assert!(is_loopback_bind("[::1]:8080"));
        assert!(!is_loopback_bind("0.0.0.0:8080"));
    }
}
