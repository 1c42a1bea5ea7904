//! The dead-letter list: messages that could not reach anyone, and their retries.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;
use uuid::Uuid;

use crate::models::StoredMessage;
use crate::schema::{agent_messages, dead_letters};

/// A dead letter with its message.
#[derive(Serialize, Debug)]
pub struct DeadLetter {
    pub message: StoredMessage,
    /// `expired`, `no_recipient` or `max_deliveries`.
    pub reason: String,
    pub dead_at: DateTime<Utc>,
    /// The message that retried it, once retried.
    pub retried_as: Option<Uuid>,
}

/// `(reason, dead_at, retried_as)` of a dead letter.
type Record = (String, DateTime<Utc>, Option<Uuid>);

/// The newest `limit` dead letters of a project, newest first.
pub async fn list(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    limit: i64,
) -> QueryResult<Vec<DeadLetter>> {
    let rows: Vec<(StoredMessage, Record)> = dead_letters::table
        .inner_join(agent_messages::table)
        .filter(dead_letters::project_id.eq(project_id))
        .order(dead_letters::dead_at.desc())
        .limit(limit)
        .select((
            StoredMessage::as_select(),
            (
                dead_letters::reason,
                dead_letters::dead_at,
                dead_letters::retried_as,
            ),
        ))
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(message, (reason, dead_at, retried_as))| DeadLetter {
            message,
            reason,
            dead_at,
            retried_as,
        })
        .collect())
}

/// One dead letter of a project: its message and what retried it, if anything did.
pub async fn find(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    message_id: Uuid,
) -> QueryResult<Option<(StoredMessage, Option<Uuid>)>> {
    dead_letters::table
        .inner_join(agent_messages::table)
        .filter(dead_letters::project_id.eq(project_id))
        .filter(dead_letters::message_id.eq(message_id))
        .select((StoredMessage::as_select(), dead_letters::retried_as))
        .first(conn)
        .await
        .optional()
}

/// Records that `message_id` was retried as `retried_as`.
pub async fn mark_retried(
    conn: &mut AsyncPgConnection,
    message_id: Uuid,
    retried_as: Uuid,
) -> QueryResult<()> {
    diesel::update(dead_letters::table.find(message_id))
        .set(dead_letters::retried_as.eq(retried_as))
        .execute(conn)
        .await
        .map(drop)
}

/// How many dead letters a project has.
pub async fn count(conn: &mut AsyncPgConnection, project_id: Uuid) -> QueryResult<i64> {
    dead_letters::table
        .filter(dead_letters::project_id.eq(project_id))
        .count()
        .get_result(conn)
        .await
}
