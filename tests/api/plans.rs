//! The plans PostgreSQL makes for the broker's generic-plan statements on a new database,
//! with a few rows: a pool connection may make them then, and keeps them for its life.

use agentbus::db::cursors;
use agentbus::db::{GENERIC_PLANS, INDEXED_GENERIC_PLANS};
use diesel::QueryableByName;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use serde_json::Value;

use crate::helpers::{status, TestApp};

/// The delivery-progress statements (`db::cursors`) that the cursor writer runs on generic
/// plans in `db::indexed_plan_transaction`, with the types of their parameters.
/// (`MARK_DELIVERED` runs there too, but on custom plans: see `db::cursors`.)
const PROGRESS_STATEMENTS: &[(&str, &str, &str)] = &[
    (
        "advance_cursors",
        cursors::ADVANCE_CURSORS,
        "uuid, text[], int8[], text[], int8[], int8",
    ),
    (
        "mark_named_delivered",
        cursors::MARK_NAMED_DELIVERED,
        "uuid, int8[]",
    ),
    (
        "settle_attempts",
        cursors::SETTLE_ATTEMPTS,
        "uuid, text[], int8[]",
    ),
    ("mark_read", cursors::MARK_READ, "uuid, text, uuid[]"),
    (
        "record_attempts",
        cursors::RECORD_ATTEMPTS,
        "uuid, text, int8[]",
    ),
    ("give_up", cursors::GIVE_UP, "uuid, uuid[]"),
];

/// What is wrong with a plan: every table read with a sequential scan, and every index scan
/// without an index condition (a whole index read in order, no better than the table).
fn full_scans(node: &Value, found: &mut Vec<String>) {
    let kind = node["Node Type"].as_str().unwrap_or_default();
    if kind == "Seq Scan" {
        found.push(format!("Seq Scan on {}", node["Relation Name"]));
    }
    if node.get("Index Name").is_some() && node.get("Index Cond").is_none() {
        found.push(format!(
            "{kind} on {} without a condition",
            node["Index Name"]
        ));
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        full_scans(child, found);
    }
}

/// The generic plan of `sql` under the transaction settings `begin` (a `BEGIN; SET LOCAL …`
/// as the broker sends it), as EXPLAIN's JSON.
async fn generic_plan(
    conn: &mut diesel_async::AsyncPgConnection,
    begin: &str,
    sql: &str,
    types: &str,
) -> Value {
    #[derive(QueryableByName)]
    struct Plan {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
        json: String,
    }
    conn.batch_execute(begin).await.expect("begin");
    conn.batch_execute(&format!("PREPARE probe ({types}) AS {sql}"))
        .await
        .unwrap_or_else(|e| panic!("prepare {sql}: {e}"));
    // A generic plan does not look at the values: NULL stands for each of them.
    let nulls = vec!["NULL"; types.split(',').count()].join(", ");
    let plan: Plan = diesel::sql_query(format!("EXPLAIN (FORMAT JSON) EXECUTE probe ({nulls})"))
        .get_result(conn)
        .await
        .expect("explain");
    conn.batch_execute("ROLLBACK; DEALLOCATE probe")
        .await
        .expect("rollback");
    let parsed: Value = serde_json::from_str(&plan.json).expect("EXPLAIN's JSON");
    parsed[0]["Plan"].clone()
}

#[tokio::test]
async fn progress_statements_plan_index_scans_on_a_new_database() {
    let app = TestApp::spawn().await;
    // A new deployment: a few rows, and statistics that say so (autovacuum analyzes a table
    // after its first 50 changes). A table the planner believes to be one page long is where
    // it prefers reading the whole of it.
    let project = app.create_project("plans").await;
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;
    for n in 0..3 {
        a.send_ok(status(&format!("step {n}"))).await;
    }
    for _ in 0..3 {
        b.expect_op("message").await;
    }
    let mut conn = app.db().await;
    conn.batch_execute("ANALYZE").await.expect("analyze");
    let mut wrong = Vec::new();
    let mut seq_scans_without_the_setting = 0;
    for (name, sql, types) in PROGRESS_STATEMENTS {
        let plan = generic_plan(&mut conn, INDEXED_GENERIC_PLANS, sql, types).await;
        let mut found = Vec::new();
        full_scans(&plan, &mut found);
        if *name == "advance_cursors" {
            // The seqs an agent named are looked up in a hash table for every message its
            // floor passes, not read through one by one.
            assert!(
                plan.to_string().contains("NOT (hashed SubPlan"),
                "advance_cursors: {plan:#}"
            );
        }
        wrong.extend(found.into_iter().map(|f| format!("{name}: {f}")));
        // The same statement on a plain generic plan: what the setting is there for.
        let mut plain = Vec::new();
        full_scans(
            &generic_plan(&mut conn, GENERIC_PLANS, sql, types).await,
            &mut plain,
        );
        seq_scans_without_the_setting += plain.len();
    }
    assert!(
        wrong.is_empty(),
        "generic plans made on a new database must read through indexes, or the pool's \
         connections keep full scans after the tables have grown: {wrong:#?}"
    );
    assert!(
        seq_scans_without_the_setting > 0,
        "without enable_seqscan = off some of these plans scan whole tables on a new \
         database; if none does any more, the check above has stopped telling anything"
    );
}
