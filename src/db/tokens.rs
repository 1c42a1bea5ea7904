//! The tokens table: issuing, looking up, listing and revoking project tokens. Only a
//! token's hash is stored (`auth::hash`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;
use uuid::Uuid;

use crate::auth::{self, Access};

#[derive(QueryableByName, Debug)]
struct ActiveToken {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    project_id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    agent_id: Option<String>,
}

/// What the unrevoked token with this hash allows, if there is one.
pub async fn find_access(
    conn: &mut AsyncPgConnection,
    token_hash: &str,
) -> QueryResult<Option<Access>> {
    let found: Option<ActiveToken> = diesel::sql_query(
        "SELECT id, project_id, agent_id FROM tokens \
         WHERE token_hash = $1 AND revoked_at IS NULL",
    )
    .bind::<Text, _>(token_hash)
    .get_result(conn)
    .await
    .optional()?;
    Ok(found.map(|t| Access::Project {
        token_id: t.id,
        project_id: t.project_id,
        agent_id: t.agent_id,
    }))
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

/// Issues a token for a project, bound to `agent_id` if given. Returns its id and the token,
/// which is not stored and cannot be shown again.
pub async fn issue(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    agent_id: Option<&str>,
) -> QueryResult<(Uuid, String)> {
    let (id, token) = (Uuid::new_v4(), auth::generate());
    diesel::sql_query(
        "INSERT INTO tokens (id, project_id, agent_id, token_hash) VALUES ($1, $2, $3, $4)",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<SqlUuid, _>(project_id)
    .bind::<Nullable<Text>, _>(agent_id)
    .bind::<Text, _>(auth::hash(&token))
    .execute(conn)
    .await?;
    Ok((id, token))
}

/// Revokes a token of a project. False if there is no such unrevoked token.
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

/// The tokens of a project, oldest first.
pub async fn list(conn: &mut AsyncPgConnection, project_id: Uuid) -> QueryResult<Vec<TokenInfo>> {
    diesel::sql_query(
        "SELECT id, project_id, agent_id, created_at, revoked_at FROM tokens \
         WHERE project_id = $1 ORDER BY created_at",
    )
    .bind::<SqlUuid, _>(project_id)
    .load(conn)
    .await
}
