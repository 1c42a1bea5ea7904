//! Who may do what. With an admin token configured (`admin_token`), every API call and
//! WebSocket upgrade presents a token (`Authorization: Bearer …`, or `?token=` where a
//! browser cannot set headers): the admin token for everything, or a project token for its
//! own project only. A project token may be bound to one agent id, which it then cannot
//! speak past. Without an admin token (allowed on loopback only) the broker is open.
//!
//! Tokens carry 244 random bits; only their SHA-256 is stored, so a leaked database
//! does not leak usable tokens.
//!
//! Pure rules only: the tokens table is read and written by [`crate::db::tokens`], and a
//! request's credentials are taken from it and judged by `http::access`.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

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
    pub fn allows_project(&self, project_id: Uuid) -> bool {
        match self {
            Access::Open | Access::Admin => true,
            Access::Project { project_id: p, .. } => *p == project_id,
        }
    }

    /// Admin rights: the admin token, or an open broker.
    pub fn is_admin(&self) -> bool {
        matches!(self, Access::Open | Access::Admin)
    }

    /// The agent a bound project token speaks as.
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

    /// May these credentials act as `agent_id`? Everything but a token bound to another
    /// agent may; the refusal names the agent the token speaks as.
    pub fn speak_as(&self, agent_id: &str) -> Result<(), NotThisAgent> {
        match self.bound_agent() {
            Some(bound) if bound != agent_id => Err(NotThisAgent {
                bound: bound.to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

/// A token bound to one agent was used to act as another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this token speaks only as agent {bound:?}")]
pub struct NotThisAgent {
    pub bound: String,
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

/// The first step of judging credentials, before any database read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Decided: no token needed, or the admin token.
    Decided(Access),
    /// A project token, to be looked up by this hash.
    LookUp { token_hash: String },
}

/// Judges the presented token against the configured admin token (compared in constant
/// time). An empty admin token counts as none.
pub fn judge(admin_token: Option<&str>, presented: Option<&str>) -> Result<Credentials, AuthError> {
    let Some(admin) = admin_token.filter(|t| !t.is_empty()) else {
        return Ok(Credentials::Decided(Access::Open));
    };
    let token = presented
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)?;
    if bool::from(token.as_bytes().ct_eq(admin.as_bytes())) {
        return Ok(Credentials::Decided(Access::Admin));
    }
    Ok(Credentials::LookUp {
        token_hash: hash(token),
    })
}

/// The stored form of a token: its SHA-256, in lowercase hex.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new token: `ab_` and 64 hex characters (two v4 UUIDs, 244 random bits).
pub fn generate() -> String {
    format!("ab_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

/// Shortest admin token the broker accepts.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// Whether every address `bind` resolves to is a loopback address.
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
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_admin_token_is_judged_before_any_lookup() {
        let admin = Some("0123456789abcdef");
        assert_eq!(
            judge(None, None).ok(),
            Some(Credentials::Decided(Access::Open))
        );
        assert_eq!(
            judge(Some(""), Some("x")).ok(),
            Some(Credentials::Decided(Access::Open))
        );
        assert!(matches!(judge(admin, None), Err(AuthError::Missing)));
        assert!(matches!(judge(admin, Some("")), Err(AuthError::Missing)));
        assert_eq!(
            judge(admin, admin).ok(),
            Some(Credentials::Decided(Access::Admin))
        );
        assert_eq!(
            judge(admin, Some("0123456789abcdeF")).ok(),
            Some(Credentials::LookUp {
                token_hash: hash("0123456789abcdeF")
            })
        );
    }

    #[test]
    fn a_bound_token_speaks_as_its_agent_only() {
        let bound = Access::Project {
            token_id: Uuid::nil(),
            project_id: Uuid::nil(),
            agent_id: Some("gen-1".into()),
        };
        assert_eq!(bound.speak_as("gen-1"), Ok(()));
        assert_eq!(
            bound.speak_as("gen-2").map_err(|e| e.to_string()),
            Err("this token speaks only as agent \"gen-1\"".into())
        );
        let unbound = Access::Project {
            token_id: Uuid::nil(),
            project_id: Uuid::nil(),
            agent_id: None,
        };
        assert_eq!(unbound.speak_as("anyone"), Ok(()));
        assert_eq!(Access::Admin.speak_as("anyone"), Ok(()));
    }

    #[test]
    fn loopback_binds_are_recognised() {
        assert!(is_loopback_bind("127.0.0.1:8080"));
        assert!(is_loopback_bind("[::1]:8080"));
        assert!(!is_loopback_bind("0.0.0.0:8080"));
    }
}
