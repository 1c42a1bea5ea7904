//! The outbox of coordination notices: written in the transaction that decides what they
//! report, stored as messages afterwards (see `actors::coordination`), then deleted.

use diesel::prelude::*;
use diesel::sql_types::{Integer, Jsonb, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::domain::notice::Notice;

/// A notice waiting to be stored. Its id is the stored message's `client_msg_id`, so handing
/// it over twice stores it once.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: Uuid,
    pub project_id: Uuid,
    pub notice: Notice,
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    project_id: Uuid,
    #[diesel(sql_type = Jsonb)]
    message: serde_json::Value,
}

/// Queues a notice; returns it with its id.
pub async fn push(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    notice: Notice,
) -> QueryResult<Pending> {
    let id = Uuid::new_v4();
    let message = serde_json::to_value(&notice)
        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    diesel::sql_query(
        "INSERT INTO coordination_outbox (id, project_id, message) VALUES ($1, $2, $3)",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<SqlUuid, _>(project_id)
    .bind::<Jsonb, _>(message)
    .execute(conn)
    .await?;
    Ok(Pending {
        id,
        project_id,
        notice,
    })
}

/// The oldest notices not stored yet.
pub async fn waiting(conn: &mut AsyncPgConnection, limit: i32) -> QueryResult<Vec<Pending>> {
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT id, project_id, message FROM coordination_outbox ORDER BY created_at, id LIMIT $1",
    )
    .bind::<Integer, _>(limit)
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| match serde_json::from_value(r.message) {
            Ok(notice) => Some(Pending {
                id: r.id,
                project_id: r.project_id,
                notice,
            }),
            Err(e) => {
                log::error!("coordination notice {} cannot be read: {e}", r.id);
                None
            }
        })
        .collect())
}

/// The notice was stored as a message.
pub async fn done(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<()> {
    diesel::sql_query("DELETE FROM coordination_outbox WHERE id = $1")
        .bind::<SqlUuid, _>(id)
        .execute(conn)
        .await
        .map(drop)
}
