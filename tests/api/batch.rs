//! The group commit itself (`db::batch::commit_batch`), on a real database: batches of plain
//! broadcasts take the pipelined path (one round trip), and it must give exactly what the
//! general path gives: dense seqs per project in batch order, retries within the batch and
//! across batches recognised, a deleted project's rows not stored, and a refused batch
//! leaving nothing behind, not even a seq.

use chrono::Utc;
use diesel::sql_types::BigInt;
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use agentbus::db::batch::{commit_batch, Outcome};
use agentbus::models::NewMessage;
use agentbus::protocol::{self, ClientOp};

use crate::helpers::TestApp;

/// A broadcast from `sender`, built from its frame by the broker's own parsing, as a session
/// builds it.
fn broadcast(project: Uuid, sender: &str, cmid: &str) -> NewMessage {
    let frame = format!(
        r#"{{"op":"send","message_type":"status","content":"from {sender}: {cmid}","client_msg_id":"{cmid}"}}"#
    );
    let Ok(ClientOp::Send(fields)) = protocol::parse_client_frame(&frame) else {
        panic!("not a send frame: {frame}");
    };
    let Ok(send) = protocol::validate_send(fields, &protocol::SendLimits::UNBOUNDED) else {
        panic!("the frame is refused: {frame}");
    };
    send.into_message(project, sender.to_owned(), "worker".to_owned(), None)
}

fn seq(outcome: &Outcome) -> i64 {
    match outcome {
        Outcome::Stored { seq, .. } => *seq,
        other => panic!("not stored: {other:?}"),
    }
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Row {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    client_msg_id: String,
}

/// The project's stored messages, by seq, and its head.
async fn stored(conn: &mut AsyncPgConnection, project: Uuid) -> (Vec<(i64, String)>, i64) {
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT seq, client_msg_id FROM agent_messages WHERE project_id = '{project}' ORDER BY seq"
    ))
    .load(conn)
    .await
    .expect("reading the stored messages");
    #[derive(QueryableByName)]
    struct Head {
        #[diesel(sql_type = BigInt)]
        head_seq: i64,
    }
    let head: Head = diesel::sql_query(format!(
        "SELECT head_seq FROM projects WHERE id = '{project}'"
    ))
    .get_result(conn)
    .await
    .expect("reading the head");
    (
        rows.into_iter().map(|r| (r.seq, r.client_msg_id)).collect(),
        head.head_seq,
    )
}

#[tokio::test]
async fn plain_batches_get_dense_seqs_in_batch_order_and_retries_their_original() {
    let app = TestApp::spawn().await;
    let (p, q) = (
        app.create_project("batch-p").await,
        app.create_project("batch-q").await,
    );
    let mut conn = app.db().await;
    let mut batch = vec![
        broadcast(p, "a", "1"),
        broadcast(q, "a", "1"),
        broadcast(p, "b", "1"),
        // A retry of the first, before the first was committed.
        broadcast(p, "a", "1"),
        broadcast(p, "a", "2"),
        // A project that does not exist (deleted while its sends waited).
        broadcast(Uuid::new_v4(), "a", "1"),
        broadcast(q, "b", "1"),
    ];
    let outcomes = commit_batch(&mut conn, &mut batch, Utc::now())
        .await
        .expect("committing a batch");
    assert_eq!(seq(&outcomes[0]), 1);
    assert_eq!(seq(&outcomes[1]), 1);
    assert_eq!(seq(&outcomes[2]), 2);
    assert!(
        matches!(outcomes[3], Outcome::SameAs(0)),
        "{:?}",
        outcomes[3]
    );
    assert_eq!(seq(&outcomes[4]), 3);
    assert!(
        matches!(outcomes[5], Outcome::ProjectMissing),
        "{:?}",
        outcomes[5]
    );
    assert_eq!(seq(&outcomes[6]), 2);
    let (rows, head) = stored(&mut conn, p).await;
    assert_eq!(
        rows,
        [
            (1, "1".to_owned()),
            (2, "1".to_owned()),
            (3, "2".to_owned())
        ]
    );
    assert_eq!(head, 3);
    let (rows, head) = stored(&mut conn, q).await;
    assert_eq!(rows, [(1, "1".to_owned()), (2, "1".to_owned())]);
    assert_eq!(head, 2);

    // A retry of a message stored by an earlier batch gets it back, and the new message of
    // the same batch the next seq.
    let mut batch = vec![broadcast(p, "a", "2"), broadcast(p, "c", "1")];
    let outcomes = commit_batch(&mut conn, &mut batch, Utc::now())
        .await
        .expect("committing a batch with a retry");
    match &outcomes[0] {
        Outcome::Duplicate { message, .. } => assert_eq!(message.seq, 3),
        other => panic!("not recognised as a retry: {other:?}"),
    }
    assert_eq!(seq(&outcomes[1]), 4);
    assert_eq!(stored(&mut conn, p).await.1, 4);
}

#[tokio::test]
async fn a_refused_plain_batch_leaves_no_row_and_no_seq_behind() {
    let app = TestApp::spawn().await;
    let p = app.create_project("batch-refused").await;
    let mut conn = app.db().await;
    let mut refused = broadcast(p, "a", "2");
    // Past the column's check (0..=3): PostgreSQL refuses the whole batch.
    refused.priority = 9;
    let mut batch = vec![broadcast(p, "a", "1"), refused];
    let error = commit_batch(&mut conn, &mut batch, Utc::now())
        .await
        .expect_err("a priority the table refuses");
    assert!(
        error.to_string().contains("priority"),
        "the database names the check: {error}"
    );
    assert_eq!(stored(&mut conn, p).await, (Vec::new(), 0));
    // The connection is usable, outside any transaction, and the next batch starts at 1.
    let mut batch = vec![broadcast(p, "a", "1")];
    let outcomes = commit_batch(&mut conn, &mut batch, Utc::now())
        .await
        .expect("the next batch");
    assert_eq!(seq(&outcomes[0]), 1);
    assert_eq!(stored(&mut conn, p).await, (vec![(1, "1".to_owned())], 1));
}
