//! Statements prepared once per connection.
//!
//! Diesel never caches a `sql_query`: it cannot know whether its text is constant, so every
//! execution pays a Parse and plan in PostgreSQL and an extra round trip to prepare. The hot
//! statements (the group commit, delivery progress) have constant SQL text, so
//! [`PrepareOnce::prepared`] marks them safe to cache: diesel-async then keeps one prepared
//! statement per connection, keyed by the SQL text and the bind types, and each later
//! execution is a single Bind/Execute round trip.
//!
//! Only for constant SQL: a text built with `format!` from client input would fill the cache
//! with one statement per distinct text. Texts chosen from a few constant variants are fine.
//! And not for statements that return `*`: once a migration adds a column, PostgreSQL refuses
//! to run a prepared statement whose result would change ("cached plan must not change result
//! type"), and a broker still running the old version would fail on it until restarted.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::QueryResult;

/// A query whose SQL text is constant, so its prepared statement can be reused.
#[derive(Debug, Clone)]
pub struct Prepared<Q>(Q);

/// `.prepared()` on any query: see the module doc.
pub trait PrepareOnce: Sized {
    fn prepared(self) -> Prepared<Self> {
        Prepared(self)
    }
}

impl<Q: QueryFragment<Pg>> PrepareOnce for Q {}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

// No static query id: the cache is then keyed by the SQL text (and bind types), so two
// statements with the same Rust type can never share a prepared statement.
impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}
