//! Commit lanes: several group-commit batches written at once, each for other projects, with
//! every ordering guarantee kept. Each project's seqs are dense and delivered in order, and
//! each sender's messages keep the order they were sent in, however the projects' messages
//! are spread over the lanes.

use crate::helpers::TestApp;

#[tokio::test]
async fn lanes_write_several_projects_at_once_and_keep_each_projects_order() {
    const PROJECTS: usize = 5;
    const SENDERS: usize = 2;
    const PER_SENDER: usize = 150;
    let app = TestApp::spawn_with(|s| s.commit_lanes = 3).await;

    let mut tasks = Vec::new();
    for p in 0..PROJECTS {
        let project = app.create_project(&format!("lanes-{p}")).await;
        let mut receiver = app.connect(project, "receiver", "watcher").await;
        let mut senders = Vec::new();
        for s in 0..SENDERS {
            senders.push(app.connect(project, &format!("sender-{s}"), "coder").await);
        }
        // The receiver: every message of its project, seqs 1, 2, 3, … and each sender's
        // messages in the order sent.
        tasks.push(tokio::spawn(async move {
            let mut next = [0_usize; SENDERS];
            for expected in 1..=(SENDERS * PER_SENDER) as i64 {
                let frame = receiver.expect_op("message").await;
                assert_eq!(frame["seq"], expected, "project {p}: {frame}");
                let content = frame["content"].as_str().expect("content");
                let (s, n) = content.split_once('/').expect("sender/n");
                let (s, n): (usize, usize) = (s.parse().expect("s"), n.parse().expect("n"));
                assert_eq!(n, next[s], "project {p}: sender {s}'s order");
                next[s] += 1;
            }
        }));
        // The senders: all their frames before reading a receipt, so that batches hold the
        // messages of every project and the lanes write at once.
        for (s, mut sender) in senders.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let seqs = sender.send_pipelined(&s.to_string(), PER_SENDER).await;
                assert!(
                    seqs.windows(2).all(|w| w[0] < w[1]),
                    "project {p}, sender {s}: receipts in seq order: {seqs:?}"
                );
            }));
        }
    }
    for task in tasks {
        task.await.expect("an agent's task");
    }
    let mut conn = app.db().await;
    for project in agentbus::db::queries::list_projects(&mut conn)
        .await
        .expect("projects")
    {
        let rows = agentbus::db::queries::all_messages(&mut conn, project.id)
            .await
            .expect("rows");
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let total = (SENDERS * PER_SENDER) as i64;
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "{}", project.name);
        assert_eq!(project.head_seq, total, "{}", project.name);
    }
}
