//! A request's credentials: where the token is presented (`Authorization: Bearer …`, or
//! `?token=` where a browser cannot set headers), and what it allows (the rules are
//! [`crate::auth`]'s; project tokens are looked up by [`crate::db::tokens`]).

use actix_web::HttpRequest;

use super::ApiError;
use crate::auth::{self, Access, AuthError, Credentials};
use crate::db::{tokens, DbPool};
use crate::domain::AgentId;

/// The token presented with a request: the `Authorization: Bearer` header, else a `token`
/// query parameter.
pub fn presented_token(req: &HttpRequest) -> Option<String> {
    if let Some(value) = req.headers().get(actix_web::http::header::AUTHORIZATION) {
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

/// What the presented token allows: the admin token is compared without a database read; a
/// project token must be stored and not revoked.
pub async fn authenticate(
    pool: &DbPool,
    admin_token: Option<&str>,
    presented: Option<&str>,
) -> Result<Access, AuthError> {
    let token_hash = match auth::judge(admin_token, presented)? {
        Credentials::Decided(access) => return Ok(access),
        Credentials::LookUp { token_hash } => token_hash,
    };
    let mut conn = pool
        .get()
        .await
        .map_err(|e| AuthError::Database(e.to_string()))?;
    tokens::find_access(&mut conn, &token_hash)
        .await
        .map_err(|e| AuthError::Database(e.to_string()))?
        .ok_or(AuthError::Invalid)
}

/// The agent a call acts as: the one it names (as `field`), parsed, else the one its token is
/// bound to (`None` if neither). A token bound to another agent than the one named is refused
/// ([`Access::speak_as`]).
pub fn acting_agent(
    access: &Access,
    field: &'static str,
    named: Option<String>,
) -> Result<Option<AgentId>, ApiError> {
    let Some(named) = named.or_else(|| access.bound_agent().map(str::to_owned)) else {
        return Ok(None);
    };
    let agent_id = super::parse_agent_id(field, named)?;
    access.speak_as(&agent_id)?;
    Ok(Some(agent_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_token_is_found_among_other_parameters() {
        assert_eq!(url_query_token("agent_id=a&token=xyz"), Some("xyz".into()));
        assert_eq!(url_query_token("agent_id=a"), None);
    }
}
