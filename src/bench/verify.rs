//! Verification of every run: each expected delivery arrived exactly once, nothing went to
//! its sender or to another project, and every acknowledged message is in PostgreSQL with
//! the seq its receipt gave (in the JetStream run: in the run's stream, see
//! [`jetstream`](super::jetstream)).

use std::collections::HashMap;

use anyhow::Context;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use serde::Serialize;
use uuid::Uuid;

use super::cli::Mode;
use super::driver::{agent_id, original_cmid, reply_cmid, DriveResult, Receipt, Workload};
use crate::db::queries;

/// Examples given for each kind of failure.
const EXAMPLES: usize = 3;

/// What the verifier found. The run passes when `failures` is empty.
#[derive(Debug, Default, Serialize)]
pub struct Verification {
    /// Messages acknowledged with a `sent` receipt (JetStream: a publish ack).
    pub acknowledged: u64,
    /// Sends refused with an error frame (JetStream: publishes that failed or whose ack
    /// timed out or was an error).
    pub refused: u64,
    /// Sends that got neither a receipt nor an error.
    pub unanswered: u64,
    /// Deliveries owed for the acknowledged messages.
    pub expected_deliveries: u64,
    /// Owed deliveries that arrived exactly once.
    pub delivered_once: u64,
    /// Owed deliveries that never arrived.
    pub lost: u64,
    /// Extra copies of deliveries.
    pub duplicated: u64,
    /// Deliveries of messages that were never acknowledged.
    pub unacknowledged_deliveries: u64,
    /// Frames that must not happen (another project, own message, misaddressed, out of
    /// order, connection closed by the broker).
    pub anomalies: u64,
    /// Messages the idle connections received.
    pub idle_received: u64,
    /// Rows of the run's projects in PostgreSQL, and acknowledged messages found there with
    /// the right seq. JetStream: messages in the run's stream, and acknowledged messages
    /// found there with the sequence, subject and number their ack and publish gave.
    pub db_rows: u64,
    pub db_matching: u64,
    pub failures: Vec<String>,
}

/// Examples of one kind of failure, counted in full.
#[derive(Default)]
pub(super) struct Examples {
    count: u64,
    examples: Vec<String>,
}

impl Examples {
    pub(super) fn add(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(what());
        }
    }

    fn describe(&self) -> String {
        if self.examples.is_empty() {
            String::new()
        } else {
            format!(", e.g. {}", self.examples.join("; "))
        }
    }
}

/// What the deliveries the agents recorded showed, before the store is read.
#[derive(Default)]
pub(super) struct DeliveryFindings {
    lost: Examples,
    duplicated: Examples,
    unacked: Examples,
}

/// What reading the acknowledged messages back from the store showed.
#[derive(Default)]
pub(super) struct StoreFindings {
    /// Acknowledged but not stored.
    pub(super) missing: Examples,
    /// Stored differently from what the receipt said, or not densely numbered.
    pub(super) wrong: Examples,
    /// Stored but never acknowledged.
    pub(super) extra: Examples,
}

/// An acknowledged message: who sent it (and to whom a reply goes), with its receipt.
struct Acked {
    sender: usize,
    client_msg_id: String,
    receipt: Receipt,
}

/// Checks the deliveries the agents recorded, then the database.
pub async fn verify(
    database_url: &str,
    w: &Workload,
    run: &DriveResult,
) -> anyhow::Result<Verification> {
    let mut v = Verification::default();
    let deliveries = check_deliveries(w, run, &mut v);
    let mut conn = AsyncPgConnection::establish(database_url)
        .await
        .with_context(|| format!("connecting to {database_url} to verify"))?;
    let mut store = StoreFindings::default();
    for (p, &project_id) in run.project_ids.iter().enumerate() {
        let agents: Vec<_> = run.agents.iter().filter(|a| a.project == p).collect();
        // The database: every acknowledged message, with its seq; nothing else.
        let mut acked: HashMap<Uuid, Acked> = HashMap::new();
        for agent in &agents {
            for (n, receipt) in agent.receipts.iter().enumerate() {
                if let Some(receipt) = receipt {
                    acked.insert(
                        receipt.id,
                        Acked {
                            sender: agent.agent,
                            client_msg_id: original_cmid(n),
                            receipt: *receipt,
                        },
                    );
                }
            }
            for reply in &agent.reply_receipts {
                acked.insert(
                    reply.receipt.id,
                    Acked {
                        sender: agent.agent,
                        client_msg_id: reply_cmid(reply.requester, reply.n),
                        receipt: reply.receipt,
                    },
                );
            }
        }
        let rows = queries::all_messages(&mut conn, project_id)
            .await
            .context("reading the run's messages back from PostgreSQL")?;
        v.db_rows += rows.len() as u64;
        let mut found = 0;
        for (index, row) in rows.iter().enumerate() {
            if row.seq != index as i64 + 1 {
                store.wrong.add(|| {
                    format!(
                        "project {p}: seqs are not dense: row {} has seq {}",
                        index + 1,
                        row.seq
                    )
                });
            }
            match acked.get(&row.id) {
                Some(a) => {
                    found += 1;
                    let right = row.seq == a.receipt.seq
                        && row.sender_agent_id == agent_id(a.sender)
                        && row.client_msg_id.as_deref() == Some(a.client_msg_id.as_str());
                    if right {
                        v.db_matching += 1;
                    } else {
                        store.wrong.add(|| {
                            format!(
                                "project {p}: message {} was acknowledged as seq {} of {} ({}) but is stored as seq {} of {} ({:?})",
                                row.id,
                                a.receipt.seq,
                                agent_id(a.sender),
                                a.client_msg_id,
                                row.seq,
                                row.sender_agent_id,
                                row.client_msg_id
                            )
                        });
                    }
                }
                None => store.extra.add(|| {
                    format!(
                        "project {p}: seq {} ({} {:?}) is stored but was never acknowledged",
                        row.seq, row.sender_agent_id, row.client_msg_id
                    )
                }),
            }
        }
        if found < acked.len() {
            let stored: std::collections::HashSet<Uuid> = rows.iter().map(|r| r.id).collect();
            for (id, a) in &acked {
                if !stored.contains(id) {
                    store.missing.add(|| {
                        format!(
                            "project {p}: {}'s {} (id {id}, seq {}) was acknowledged but is not in PostgreSQL",
                            agent_id(a.sender),
                            a.client_msg_id,
                            a.receipt.seq
                        )
                    });
                }
            }
        }
    }
    finish(w, run, &mut v, deliveries, store, "PostgreSQL");
    Ok(v)
}

/// The checks that need only what the agents recorded: every owed delivery arrived exactly
/// once, nothing unacknowledged was delivered; counts the acknowledged, refused and
/// unanswered sends and the anomalies. Shared by the broker runs and the JetStream run.
pub(super) fn check_deliveries(
    w: &Workload,
    run: &DriveResult,
    v: &mut Verification,
) -> DeliveryFindings {
    let m = w.messages;
    let mut found = DeliveryFindings::default();
    let DeliveryFindings {
        lost,
        duplicated,
        unacked,
    } = &mut found;

    for agent in &run.agents {
        v.refused += agent.errors;
        v.anomalies += agent.anomalies;
        v.acknowledged += agent.receipts.iter().flatten().count() as u64;
        v.acknowledged += agent.reply_receipts.len() as u64;
    }
    v.unanswered = run.issued.saturating_sub(run.settled);
    v.idle_received = run.idle_received;

    for p in 0..w.projects {
        let agents: Vec<_> = run.agents.iter().filter(|a| a.project == p).collect();
        // Original messages: owed to every other agent (broadcast) or to their target.
        for sender in &agents {
            for (n, receipt) in sender.receipts.iter().enumerate() {
                let recipients: Vec<usize> = match w.mode {
                    Mode::Broadcast => (0..w.agents).filter(|&r| r != sender.agent).collect(),
                    Mode::Direct | Mode::Request => vec![w.target(sender.agent, n)],
                };
                for r in recipients {
                    let count = agents[r].received[sender.agent * m + n];
                    match (receipt, count) {
                        (Some(_), 0) => lost.add(|| {
                            format!(
                                "project {p}: {} never received {}'s message {n} (seq {})",
                                agent_id(r),
                                agent_id(sender.agent),
                                receipt.map_or(0, |r| r.seq)
                            )
                        }),
                        (Some(_), c) => {
                            v.delivered_once += 1;
                            for _ in 1..c {
                                duplicated.add(|| {
                                    format!(
                                        "project {p}: {} received {}'s message {n} {c} times",
                                        agent_id(r),
                                        agent_id(sender.agent)
                                    )
                                });
                            }
                        }
                        (None, 0) => {}
                        (None, c) => {
                            for _ in 0..c {
                                unacked.add(|| {
                                    format!(
                                        "project {p}: {} received {}'s message {n}, which was never acknowledged",
                                        agent_id(r),
                                        agent_id(sender.agent)
                                    )
                                });
                            }
                        }
                    }
                    if receipt.is_some() {
                        v.expected_deliveries += 1;
                    }
                }
            }
        }
        // Replies: owed to the requester.
        if w.mode == Mode::Request {
            let mut replied = vec![false; w.agents * m];
            for replier in &agents {
                for reply in &replier.reply_receipts {
                    replied[reply.requester * m + reply.n] = true;
                    v.expected_deliveries += 1;
                    let count = agents[reply.requester].replies_received[reply.n];
                    match count {
                        0 => lost.add(|| {
                            format!(
                                "project {p}: {} never received the reply to its request {} (seq {})",
                                agent_id(reply.requester),
                                reply.n,
                                reply.receipt.seq
                            )
                        }),
                        c => {
                            v.delivered_once += 1;
                            for _ in 1..c {
                                duplicated.add(|| {
                                    format!(
                                        "project {p}: {} received the reply to its request {} {c} times",
                                        agent_id(reply.requester),
                                        reply.n
                                    )
                                });
                            }
                        }
                    }
                }
            }
            for requester in &agents {
                for (n, &count) in requester.replies_received.iter().enumerate() {
                    if count > 0 && !replied[requester.agent * m + n] {
                        unacked.add(|| {
                            format!(
                                "project {p}: {} received a reply to its request {n} that was never acknowledged",
                                agent_id(requester.agent)
                            )
                        });
                    }
                }
            }
        }
    }
    found
}

/// Turns the findings into the run's failures, in a fixed order. `store` names where the
/// acknowledged messages were looked for ("PostgreSQL", "the stream").
pub(super) fn finish(
    w: &Workload,
    run: &DriveResult,
    v: &mut Verification,
    deliveries: DeliveryFindings,
    store_found: StoreFindings,
    store: &str,
) {
    let DeliveryFindings {
        lost,
        duplicated,
        unacked,
    } = deliveries;
    v.lost = lost.count;
    v.duplicated = duplicated.count;
    v.unacknowledged_deliveries = unacked.count;

    let f = &mut v.failures;
    if run.broker_died {
        f.push("the broker process exited during the run".to_owned());
    }
    if run.stalled {
        f.push(format!(
            "the run stalled: nothing happened for {:?} before everything arrived",
            w.settle
        ));
    }
    if lost.count > 0 {
        f.push(format!(
            "{} of {} expected deliveries were lost (never received){}",
            lost.count,
            v.expected_deliveries,
            lost.describe()
        ));
    }
    if duplicated.count > 0 {
        f.push(format!(
            "{} deliveries were duplicated{}",
            duplicated.count,
            duplicated.describe()
        ));
    }
    if unacked.count > 0 {
        f.push(format!(
            "{} deliveries were of messages never acknowledged{}",
            unacked.count,
            unacked.describe()
        ));
    }
    if v.refused > 0 {
        let examples: Vec<&String> = run
            .agents
            .iter()
            .flat_map(|a| &a.error_examples)
            .take(EXAMPLES)
            .collect();
        f.push(format!(
            "{} sends were refused with an error frame, e.g. {}",
            v.refused,
            examples
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if v.unanswered > 0 {
        f.push(format!(
            "{} sends got neither a receipt nor an error",
            v.unanswered
        ));
    }
    if v.anomalies > 0 {
        let examples: Vec<&str> = run
            .agents
            .iter()
            .flat_map(|a| &a.anomaly_examples)
            .map(|s| s.as_str())
            .take(EXAMPLES)
            .collect();
        f.push(format!(
            "{} frames that must not happen (misrouted, out of order, or a closed connection), e.g. {}",
            v.anomalies,
            examples.join("; ")
        ));
    }
    if run.idle_received > 0 {
        f.push(format!(
            "the idle connections, alone in their project, received {} messages",
            run.idle_received
        ));
    }
    if run.idle_closed > 0 {
        f.push(format!(
            "the broker closed {} idle connections",
            run.idle_closed
        ));
    }
    let StoreFindings {
        missing,
        wrong,
        extra,
    } = store_found;
    if missing.count > 0 {
        f.push(format!(
            "{} acknowledged messages are missing from {store}{}",
            missing.count,
            missing.describe()
        ));
    }
    if wrong.count > 0 {
        f.push(format!(
            "{} stored messages do not match their receipts{}",
            wrong.count,
            wrong.describe()
        ));
    }
    if extra.count > 0 {
        f.push(format!(
            "{} messages are stored but were never acknowledged{}",
            extra.count,
            extra.describe()
        ));
    }
}

/// Checks the raw ceiling's rows: everything inserted is stored once, densely numbered.
pub async fn verify_raw(
    conn: &mut AsyncPgConnection,
    project_ids: &[Uuid],
    expected: u64,
) -> anyhow::Result<Verification> {
    let mut v = Verification {
        acknowledged: expected,
        ..Verification::default()
    };
    for &project in project_ids {
        let rows = queries::all_messages(conn, project).await?;
        v.db_rows += rows.len() as u64;
        v.db_matching += rows
            .iter()
            .enumerate()
            .filter(|(i, r)| r.seq == *i as i64 + 1)
            .count() as u64;
    }
    if v.db_rows != expected || v.db_matching != expected {
        v.failures.push(format!(
            "the raw ceiling stored {} rows ({} densely numbered); {expected} were inserted",
            v.db_rows, v.db_matching
        ));
    }
    Ok(v)
}
