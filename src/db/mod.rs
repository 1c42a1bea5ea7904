//! PostgreSQL access: the connection pool, database creation and migrations, and the queries
//! the broker runs (`queries`).

pub mod batch;
pub mod claims;
pub mod cluster;
pub mod cursors;
pub mod dead_letters;
pub mod deadlines;
pub mod inbox;
pub mod ops;
pub mod outbox;
pub mod paging;
pub mod prepared;
pub mod queries;
pub mod search;
pub mod tasks;
pub mod timers;
pub mod tokens;

use std::time::Duration;

use anyhow::Context;
use diesel::Connection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

/// The migrations under `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub type DbPool = Pool<AsyncPgConnection>;

/// Builds the pool. Connections are made lazily, so this succeeds while the database is down;
/// `timeout` bounds how long a caller waits for one, so an outage turns into a prompt error
/// rather than a hang.
pub fn build_pool(database_url: &str, size: usize, timeout: Duration) -> anyhow::Result<DbPool> {
    let mut config = ManagerConfig::default();
    // A connection whose server went away reports itself broken and is dropped on return; a
    // test query on every checkout would add a round trip to each group commit.
    config.recycling_method = RecyclingMethod::Fast;
    config.custom_setup = Box::new(|url| Box::pin(establish(url.to_owned())));
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    Pool::builder(manager)
        .max_size(size.max(2))
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .context("building the database pool")
}

/// Opens a pool connection. Hot statements are prepared once per connection
/// (`db::prepared`), but each execution is still planned for its own parameters and the
/// table's current size: a generic plan made while a table is small (a new database) keeps
/// scanning the whole table long after it has grown, and cannot know how many rows the batch
/// arrays hold. JIT compilation is off: it pays only on long analytical queries, and on a
/// broker's short ones it added tens of milliseconds whenever an estimate came out high.
async fn establish(url: String) -> diesel::ConnectionResult<AsyncPgConnection> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = AsyncPgConnection::establish(&url).await?;
    conn.batch_execute("SET plan_cache_mode = force_custom_plan; SET jit = off")
        .await
        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// Runs `f` in a transaction whose prepared statements, and the foreign-key checks of its
/// inserts, run on generic plans: planned once per connection, not at every execution as the
/// connection's `force_custom_plan` would have them (see [`establish`]).
///
/// Only for statements whose best plan cannot depend on the parameters or on how large a
/// table has grown: primary-key and unique-index probes, and inserts from `unnest` (the
/// group commit). At one message per batch, planning was more than half of PostgreSQL's time
/// on the commit path (docs/PERFORMANCE.md, third round). The setting ends with the
/// transaction, and it is sent with `BEGIN` in one round trip.
pub async fn generic_plan_transaction<T, E, F>(conn: &mut AsyncPgConnection, f: F) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    transaction_begun_with(conn, GENERIC_PLANS, f).await
}

/// `BEGIN` for [`generic_plan_transaction`].
pub const GENERIC_PLANS: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

/// `BEGIN` for [`indexed_plan_transaction`].
pub const INDEXED_GENERIC_PLANS: &str =
    "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off";

/// Runs `f` in a transaction whose prepared statements run on generic plans that read every
/// table through an index wherever one applies (`enable_seqscan = off`).
///
/// For statements that reach a large table only through index conditions, but whose
/// planning costs more than their execution: the delivery-progress statements
/// (`db::cursors`), whose custom plans took up to 2 ms of PostgreSQL's CPU at every write
/// cycle of every project (docs/PERFORMANCE.md). A statement whose generic plan is slow on a
/// large table still asks for a custom plan for itself (`delivered_at`, see
/// `db::cursors::MARK_DELIVERED`). A generic plan is made once per connection,
/// possibly while the tables are still small: on its own the planner would then choose
/// sequential scans, and the connection would keep them after the tables have grown. With
/// sequential scans priced out, the plan is the index plan whatever the table's size then;
/// `tests/api/plans.rs` checks every such statement's plan on a new database.
pub async fn indexed_plan_transaction<T, E, F>(conn: &mut AsyncPgConnection, f: F) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    transaction_begun_with(conn, INDEXED_GENERIC_PLANS, f).await
}

async fn transaction_begun_with<T, E, F>(
    conn: &mut AsyncPgConnection,
    begin: &str,
    f: F,
) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    use diesel_async::{AnsiTransactionManager, TransactionManager};
    AnsiTransactionManager::begin_transaction_sql(&mut *conn, begin).await?;
    match f(&mut *conn).await {
        Ok(value) => {
            AnsiTransactionManager::commit_transaction(&mut *conn).await?;
            Ok(value)
        }
        Err(e) => {
            AnsiTransactionManager::rollback_transaction(&mut *conn).await?;
            Err(e)
        }
    }
}

/// Creates the database named in `database_url` if it does not exist, by connecting to the
/// server's `postgres` database.
pub async fn ensure_database_exists(database_url: &str) -> anyhow::Result<()> {
    if AsyncPgConnection::establish(database_url).await.is_ok() {
        return Ok(());
    }
    let (server_url, name) = split_database_name(database_url)
        .with_context(|| format!("no database name in DATABASE_URL {database_url:?}"))?;
    let mut conn = AsyncPgConnection::establish(&format!("{server_url}/postgres"))
        .await
        .with_context(|| format!("connecting to the PostgreSQL server at {server_url}"))?;
    let exists: i64 = diesel::dsl::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
        "count(*) FROM pg_database WHERE datname = {}",
        quote_literal(&name)
    )))
    .get_result(&mut conn)
    .await?;
    if exists == 0 {
        log::info!("creating database {name}");
        diesel::sql_query(format!("CREATE DATABASE {}", quote_identifier(&name)))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
    }
    Ok(())
}

/// Applies pending migrations. Runs on a plain thread with its own blocking connection,
/// because diesel's migration harness blocks and must not run on an actix worker.
pub fn run_migrations(database_url: &str) -> anyhow::Result<()> {
    let url = database_url.to_owned();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let mut conn = <AsyncConnectionWrapper<AsyncPgConnection> as Connection>::establish(&url)
            .with_context(|| format!("connecting to {url}"))?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map_err(|e| anyhow::anyhow!("running migrations: {e}"))?;
        for version in applied {
            log::info!("applied migration {version}");
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the migration thread panicked"))?
}

/// `postgres://u@h:p/name?x` → (`postgres://u@h:p`, `name`).
fn split_database_name(url: &str) -> Option<(String, String)> {
    let (without_query, _) = url.split_once('?').unwrap_or((url, ""));
    let scheme_end = without_query.find("://")? + 3;
    let slash = without_query[scheme_end..].rfind('/')? + scheme_end;
    let name = &without_query[slash + 1..];
    if name.is_empty() {
        return None;
    }
    Some((without_query[..slash].to_owned(), name.to_owned()))
}

fn quote_identifier(name: &str) -> String {
    postgres_protocol::escape::escape_identifier(name)
}

fn quote_literal(value: &str) -> String {
    postgres_protocol::escape::escape_literal(value)
}

/// Drops database `name` of the server at `server_url` (`postgres://user@host:port`),
/// terminating any connection left to it. For throwaway databases (tests, the benchmark).
pub async fn drop_database(server_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn =
        AsyncPgConnection::establish(&format!("{}/postgres", server_url.trim_end_matches('/')))
            .await
            .with_context(|| format!("connecting to {server_url} to drop {name}"))?;
    diesel::sql_query(format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_identifier(name)
    ))
    .execute(&mut conn)
    .await
    .with_context(|| format!("dropping database {name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_database_name_off_a_url() {
        assert_eq!(
            split_database_name("postgres://postgres@127.0.0.1:5432/agentbus"),
            Some((
                "postgres://postgres@127.0.0.1:5432".into(),
                "agentbus".into()
            ))
        );
        assert_eq!(
            split_database_name("postgres://u:p@h/db?sslmode=disable"),
            Some(("postgres://u:p@h".into(), "db".into()))
        );
        assert_eq!(split_database_name("postgres://h:5432/"), None);
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
