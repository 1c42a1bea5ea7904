//! What the coordination deadlines share, for claims (objection windows, expiries) and tasks
//! (claim and work deadlines): what a deadline found when it fired, why it changed nothing,
//! and the deadlines to re-arm when a broker starts.
//!
//! A timer may fire early (the row's deadline moved after it was armed, or the clocks of the
//! broker and the database differ) or late (another broker, or a request, settled the row
//! first): the change it makes is always conditional on the row's state and the database's
//! `now()`, and these functions answer what the timer should do instead.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::outbox::Pending;

/// A deadline reached: the conditional change it made, or why there was none.
// Made once per deadline and consumed at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Due<T> {
    /// Changed now: the row after the change, and the notices to store.
    Done(T, Vec<Pending>),
    /// Not due yet (renewed, or the timer fired early): due at this time.
    Later(DateTime<Utc>),
    /// Settled otherwise already (objected, released, claimed, finished...): nothing to do.
    Settled,
}

/// Why a deadline changed nothing: `sql` selects the row's deadline as `at`, for the row
/// `$1` while it is in state `$2`. A row still in that state is due `Later`; one that has
/// left it is `Settled`.
pub(super) async fn later<T>(
    conn: &mut AsyncPgConnection,
    sql: &'static str,
    id: Uuid,
    state: &str,
) -> QueryResult<Due<T>> {
    #[derive(QueryableByName)]
    struct At {
        #[diesel(sql_type = Nullable<Timestamptz>)]
        at: Option<DateTime<Utc>>,
    }
    let at: Option<At> = diesel::sql_query(sql)
        .bind::<SqlUuid, _>(id)
        .bind::<Text, _>(state)
        .get_result(conn)
        .await
        .optional()?;
    Ok(at.and_then(|a| a.at).map_or(Due::Settled, Due::Later))
}

/// The deadlines `sql` selects as `(id, kind, at)`, `kind` 0 for `first` and anything else
/// for `second`: every deadline still to come (or passed while no broker ran).
pub(super) async fn load<K: Copy>(
    conn: &mut AsyncPgConnection,
    sql: &'static str,
    first: K,
    second: K,
) -> QueryResult<Vec<(Uuid, K, DateTime<Utc>)>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = Integer)]
        kind: i32,
        #[diesel(sql_type = Timestamptz)]
        at: DateTime<Utc>,
    }
    let rows: Vec<Row> = diesel::sql_query(sql).load(conn).await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.id, if r.kind == 0 { first } else { second }, r.at))
        .collect())
}
