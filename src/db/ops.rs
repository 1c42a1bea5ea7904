//! What `/readyz` asks the database: does it answer, and which migrations are applied.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

// The table in which diesel records applied migrations (only the column read here).
diesel::table! {
    __diesel_schema_migrations (version) {
        version -> VarChar,
    }
}

/// A round trip that touches no table.
pub async fn ping(conn: &mut AsyncPgConnection) -> QueryResult<()> {
    diesel::sql_query("SELECT 1").execute(conn).await.map(drop)
}

/// The versions of the applied migrations.
pub async fn applied_migrations(conn: &mut AsyncPgConnection) -> QueryResult<Vec<String>> {
    __diesel_schema_migrations::table
        .select(__diesel_schema_migrations::version)
        .load(conn)
        .await
}
