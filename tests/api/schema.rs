//! `src/schema.rs` against the migrations: every table it declares exists with exactly its
//! columns (names, types, nullability, lengths) and primary key, and every table the
//! migrations create is declared, except the ones listed as queried with SQL only.

use std::collections::{BTreeMap, BTreeSet};

use diesel::sql_types::{Integer, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use crate::helpers::TestApp;

/// Tables the migrations create that `schema.rs` leaves out on purpose.
const NOT_DECLARED: &[&str] = &["__diesel_schema_migrations", "message_search"];

/// A column as `schema.rs` or the database describes it: SQL type (as the `udt_name`),
/// nullable, character length.
type Column = (String, bool, Option<i32>);

#[derive(Debug, Default, PartialEq)]
struct Table {
    primary_key: Vec<String>,
    columns: BTreeMap<String, Column>,
}

/// The `udt_name` PostgreSQL reports for a Diesel SQL type.
fn udt_name(diesel_type: &str) -> String {
    if let Some(inner) = diesel_type
        .strip_prefix("Array<")
        .and_then(|t| t.strip_suffix('>'))
    {
        // Array elements are nullable in PostgreSQL whatever the declaration says.
        let inner = inner
            .strip_prefix("Nullable<")
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or(inner);
        return format!("_{}", udt_name(inner));
    }
    match diesel_type {
        "Uuid" => "uuid",
        "Text" => "text",
        "Varchar" => "varchar",
        "Bpchar" => "bpchar",
        "Int2" => "int2",
        "Int4" => "int4",
        "Int8" => "int8",
        "Bool" => "bool",
        "Jsonb" => "jsonb",
        "Timestamptz" => "timestamptz",
        other => panic!("schema.rs uses a type this check does not know: {other}"),
    }
    .to_owned()
}

/// The tables of `src/schema.rs`, read from its `diesel::table!` blocks.
fn declared() -> BTreeMap<String, Table> {
    let text = include_str!("../../src/schema.rs");
    let mut tables = BTreeMap::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != "diesel::table! {" {
            continue;
        }
        let header = lines.next().expect("a table header");
        let (name, key) = header.split_once(" (").expect("name (primary key) {");
        let key = key.trim_end_matches(" {").trim_end_matches(')');
        let mut table = Table {
            primary_key: key.split(',').map(|c| c.trim().to_owned()).collect(),
            ..Table::default()
        };
        let mut length = None;
        for line in lines.by_ref() {
            if line == "}" {
                break;
            }
            if let Some(n) = line
                .strip_prefix("#[max_length = ")
                .and_then(|l| l.strip_suffix(']'))
            {
                length = Some(n.parse().expect("a length"));
                continue;
            }
            let (column, ty) = line
                .trim_end_matches(',')
                .split_once(" -> ")
                .unwrap_or_else(|| panic!("a column line: {line:?}"));
            let (nullable, ty) = match ty
                .strip_prefix("Nullable<")
                .and_then(|t| t.strip_suffix('>'))
            {
                Some(inner) => (true, inner),
                None => (false, ty),
            };
            table
                .columns
                .insert(column.to_owned(), (udt_name(ty), nullable, length.take()));
        }
        tables.insert(name.to_owned(), table);
    }
    tables
}

#[derive(QueryableByName)]
struct DbColumn {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
    #[diesel(sql_type = Text)]
    udt_name: String,
    #[diesel(sql_type = Text)]
    is_nullable: String,
    #[diesel(sql_type = Nullable<Integer>)]
    length: Option<i32>,
}

#[derive(QueryableByName)]
struct KeyColumn {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
}

#[tokio::test]
async fn schema_rs_matches_the_migrated_database() {
    let app = TestApp::spawn().await;
    let mut conn = app.db().await;
    let columns: Vec<DbColumn> = diesel::sql_query(
        "SELECT table_name::text, column_name::text, udt_name::text, is_nullable::text, \
                character_maximum_length::int4 AS length \
         FROM information_schema.columns WHERE table_schema = 'public' \
         ORDER BY table_name, ordinal_position",
    )
    .load(&mut conn)
    .await
    .expect("columns");
    let keys: Vec<KeyColumn> = diesel::sql_query(
        "SELECT tc.table_name::text, k.column_name::text \
         FROM information_schema.table_constraints tc \
         JOIN information_schema.key_column_usage k \
           ON k.constraint_name = tc.constraint_name AND k.table_schema = tc.table_schema \
         WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = 'public' \
         ORDER BY tc.table_name, k.ordinal_position",
    )
    .load(&mut conn)
    .await
    .expect("primary keys");
    let mut migrated: BTreeMap<String, Table> = BTreeMap::new();
    for c in columns {
        migrated.entry(c.table_name).or_default().columns.insert(
            c.column_name,
            (c.udt_name, c.is_nullable == "YES", c.length),
        );
    }
    for k in keys {
        migrated
            .entry(k.table_name)
            .or_default()
            .primary_key
            .push(k.column_name);
    }
    for table in NOT_DECLARED {
        assert!(
            migrated.remove(*table).is_some(),
            "{table} is no longer created"
        );
    }
    let declared = declared();
    let names = |t: &BTreeMap<String, Table>| t.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(
        names(&declared),
        names(&migrated),
        "tables in schema.rs (left) and created by the migrations (right)"
    );
    for (name, table) in &declared {
        assert_eq!(
            Some(table),
            migrated.get(name),
            "table {name}: schema.rs (left), database (right)"
        );
    }
}
