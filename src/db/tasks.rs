//! Tasks in PostgreSQL. A task's row is written in the transaction that stores its message
//! ([`open_committed`], called by the group commit); every later move is a conditional
//! `UPDATE tasks … WHERE state = … RETURNING`, so the first claim wins however many agents
//! claim at once, and each deadline changes the task at most once. Each move queues its
//! notices in the outbox in the same transaction.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::batch::Outcome;
use super::outbox::{self, Pending};
use super::timers;
use crate::domain::tasks::{Task, TaskEvent, TaskState, TaskTerms};
use crate::models::NewMessage;

/// Writes the rows of the tasks a batch stored (and marks their messages as tasks), in the
/// batch's transaction.
pub async fn open_committed(
    conn: &mut AsyncPgConnection,
    batch: &[NewMessage],
    plan: &[Outcome],
    created_at: DateTime<Utc>,
) -> QueryResult<()> {
    let (mut ids, mut projects, mut claim_timeouts, mut work_timeouts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (msg, outcome) in batch.iter().zip(plan) {
        if let (Some(terms), Outcome::Stored { .. }) = (&msg.task, outcome) {
            ids.push(msg.id);
            projects.push(msg.project_id);
            claim_timeouts.push(terms.claim_timeout_ms);
            work_timeouts.push(terms.work_timeout_ms);
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    diesel::sql_query("UPDATE agent_messages SET task = true WHERE id = ANY($1)")
        .bind::<Array<SqlUuid>, _>(&ids)
        .execute(conn)
        .await?;
    diesel::sql_query(
        "INSERT INTO tasks (message_id, project_id, claim_timeout_ms, work_timeout_ms, \
           claim_deadline, updated_at) \
         SELECT t.id, t.p, t.c, t.w, $5 + t.c * interval '1 millisecond', $5 \
         FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::int8[]) AS t(id, p, c, w)",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
    .bind::<Array<SqlUuid>, _>(&projects)
    .bind::<Array<Nullable<BigInt>>, _>(&claim_timeouts)
    .bind::<Array<Nullable<BigInt>>, _>(&work_timeouts)
    .bind::<Timestamptz, _>(created_at)
    .execute(conn)
    .await
    .map(drop)
}

/// The terms a task was sent with (to retry its dead letter as a task).
pub async fn terms_of(
    conn: &mut AsyncPgConnection,
    message_id: Uuid,
) -> QueryResult<Option<TaskTerms>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Nullable<BigInt>)]
        claim_timeout_ms: Option<i64>,
        #[diesel(sql_type = Nullable<BigInt>)]
        work_timeout_ms: Option<i64>,
    }
    let row: Option<Row> = diesel::sql_query(
        "SELECT claim_timeout_ms, work_timeout_ms FROM tasks WHERE message_id = $1",
    )
    .bind::<SqlUuid, _>(message_id)
    .get_result(conn)
    .await
    .optional()?;
    Ok(row.map(|r| TaskTerms {
        claim_timeout_ms: r.claim_timeout_ms,
        work_timeout_ms: r.work_timeout_ms,
    }))
}

/// A task's columns, over `t` (tasks) and `a` (its message).
const COLUMNS: &str = "t.message_id AS id, t.project_id, a.seq, a.sender_agent_id, \
    a.sender_agent_type, a.recipient_agent_id AS to_agent, a.recipient_agent_type AS to_type, \
    a.message_type, a.content, t.state, t.holder, t.claim_timeout_ms, t.work_timeout_ms, \
    t.claim_deadline, t.work_deadline, t.claimed_at, t.closed_at, t.result, t.offers, \
    a.created_at, t.updated_at, \
    (SELECT m.agent_type FROM members m \
      WHERE m.project_id = t.project_id AND m.agent_id = a.sender_agent_id) AS sender_member_type";

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    project_id: Uuid,
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    sender_agent_id: String,
    #[diesel(sql_type = Text)]
    sender_agent_type: String,
    #[diesel(sql_type = Nullable<Text>)]
    to_agent: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    to_type: Option<String>,
    #[diesel(sql_type = Text)]
    message_type: String,
    #[diesel(sql_type = Text)]
    content: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Nullable<Text>)]
    holder: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    claim_timeout_ms: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    work_timeout_ms: Option<i64>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    claim_deadline: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    work_deadline: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    claimed_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    closed_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    result: Option<String>,
    #[diesel(sql_type = Integer)]
    offers: i32,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    updated_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Text>)]
    sender_member_type: Option<String>,
}

impl From<Row> for Task {
    fn from(r: Row) -> Task {
        Task {
            id: r.id,
            project_id: r.project_id,
            seq: r.seq,
            sender_agent_id: r.sender_agent_id,
            sender_agent_type: r.sender_agent_type,
            to: r.to_agent,
            to_type: r.to_type,
            message_type: r.message_type,
            content: r.content,
            // The table's CHECK constraint allows only the known states.
            state: TaskState::parse(&r.state).unwrap_or(TaskState::Canceled),
            holder: r.holder,
            claim_timeout_ms: r.claim_timeout_ms,
            work_timeout_ms: r.work_timeout_ms,
            claim_deadline: r.claim_deadline,
            work_deadline: r.work_deadline,
            claimed_at: r.claimed_at,
            closed_at: r.closed_at,
            result: r.result,
            offers: r.offers,
            created_at: r.created_at,
            updated_at: r.updated_at,
            sender_member_type: r.sender_member_type,
        }
    }
}

/// Runs `update` (an `UPDATE tasks … RETURNING` of the whole row) and gives the changed
/// task back. (The rest of a statement does not see what its `WITH` changed: the row must
/// come from `RETURNING`.)
fn changed(update: &str) -> String {
    format!(
        "WITH t AS ({update}) SELECT {COLUMNS} FROM t JOIN agent_messages a ON a.id = t.message_id"
    )
}

/// One task of a project.
pub async fn find(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    task_id: Uuid,
) -> QueryResult<Option<Task>> {
    let row: Option<Row> = diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM tasks t JOIN agent_messages a ON a.id = t.message_id \
         WHERE t.project_id = $1 AND t.message_id = $2"
    ))
    .bind::<SqlUuid, _>(project_id)
    .bind::<SqlUuid, _>(task_id)
    .get_result(conn)
    .await
    .optional()?;
    Ok(row.map(Task::from))
}

/// A project's tasks, newest first, optionally in one state.
pub async fn list(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    state: Option<TaskState>,
    limit: i64,
) -> QueryResult<Vec<Task>> {
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM tasks t JOIN agent_messages a ON a.id = t.message_id \
         WHERE t.project_id = $1 AND ($2::text IS NULL OR t.state = $2) \
         ORDER BY a.seq DESC LIMIT $3"
    ))
    .bind::<SqlUuid, _>(project_id)
    .bind::<Nullable<Text>, _>(state.map(TaskState::as_str))
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(Task::from).collect())
}

/// Why a move asked by an agent was not made.
#[derive(Debug)]
pub enum Refusal {
    NotFound,
    /// The task was not offered to this agent (claim), or it is not its sender (cancel).
    NotYours(Task),
    /// Another agent holds it.
    AlreadyClaimed(Task),
    /// It is not claimed by this agent (complete, release).
    NotHolder(Task),
    /// Done, failed, canceled or unclaimed.
    Closed(Task),
}

/// What a successful move gives back: the task after it, and the notices to store.
pub type Moved = (Task, Vec<Pending>);

async fn notify(
    conn: &mut AsyncPgConnection,
    task: &Task,
    event: &TaskEvent,
) -> QueryResult<Vec<Pending>> {
    let mut pending = Vec::new();
    for notice in task.notices(event) {
        pending.push(outbox::push(conn, task.project_id, notice).await?);
    }
    Ok(pending)
}

fn classify(task: Option<Task>, agent_id: &str) -> Refusal {
    match task {
        None => Refusal::NotFound,
        Some(t) if t.state.is_closed() => Refusal::Closed(t),
        Some(t) if t.state == TaskState::Claimed && t.holder.as_deref() != Some(agent_id) => {
            Refusal::AlreadyClaimed(t)
        }
        Some(t) => Refusal::NotHolder(t),
    }
}

/// Claims an open task for `agent_id`. The first claim wins; a claim by its holder again
/// answers the task as it is (`false`: nothing changed).
pub async fn claim(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    task_id: Uuid,
    agent_id: &str,
) -> QueryResult<Result<(Task, bool, Vec<Pending>), Refusal>> {
    conn.transaction(async |conn| {
        let Some(task) = find(conn, project_id, task_id).await? else {
            return Ok(Err(Refusal::NotFound));
        };
        #[derive(QueryableByName)]
        struct Member {
            #[diesel(sql_type = Text)]
            agent_type: String,
        }
        let member: Option<Member> = diesel::sql_query(
            "SELECT agent_type FROM members WHERE project_id = $1 AND agent_id = $2",
        )
        .bind::<SqlUuid, _>(project_id)
        .bind::<Text, _>(agent_id)
        .get_result(conn)
        .await
        .optional()?;
        let offered = task.audience().offered_to(
            &task.sender_agent_id,
            agent_id,
            member.as_ref().map(|m| m.agent_type.as_str()),
        );
        if !offered {
            return Ok(Err(Refusal::NotYours(task)));
        }
        let row: Option<Row> = diesel::sql_query(changed(
            "UPDATE tasks SET state = 'claimed', holder = $3, claimed_at = now(), \
               claim_deadline = NULL, updated_at = now(), \
               work_deadline = now() + work_timeout_ms * interval '1 millisecond' \
             WHERE project_id = $1 AND message_id = $2 AND state = 'open' RETURNING *",
        ))
        .bind::<SqlUuid, _>(project_id)
        .bind::<SqlUuid, _>(task_id)
        .bind::<Text, _>(agent_id)
        .get_result(conn)
        .await
        .optional()?;
        let Some(row) = row else {
            let now = find(conn, project_id, task_id).await?;
            return Ok(match now {
                Some(t)
                    if t.state == TaskState::Claimed && t.holder.as_deref() == Some(agent_id) =>
                {
                    Ok((t, false, Vec::new()))
                }
                other => Err(classify(other, agent_id)),
            });
        };
        let task = Task::from(row);
        let pending = notify(conn, &task, &TaskEvent::Claimed).await?;
        Ok(Ok((task, true, pending)))
    })
    .await
}

/// The holder finishes its task: `done` (success) or `failed`, with a result (or error).
pub async fn complete(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    task_id: Uuid,
    agent_id: &str,
    success: bool,
    result: Option<&str>,
) -> QueryResult<Result<Moved, Refusal>> {
    conn.transaction(async |conn| {
        let row: Option<Row> = diesel::sql_query(changed(
            "UPDATE tasks SET state = CASE WHEN $4 THEN 'done' ELSE 'failed' END, result = $5, \
               closed_at = now(), work_deadline = NULL, updated_at = now() \
             WHERE project_id = $1 AND message_id = $2 AND state = 'claimed' AND holder = $3 \
             RETURNING *",
        ))
        .bind::<SqlUuid, _>(project_id)
        .bind::<SqlUuid, _>(task_id)
        .bind::<Text, _>(agent_id)
        .bind::<Bool, _>(success)
        .bind::<Nullable<Text>, _>(result)
        .get_result(conn)
        .await
        .optional()?;
        let Some(row) = row else {
            return Ok(Err(classify(
                find(conn, project_id, task_id).await?,
                agent_id,
            )));
        };
        let task = Task::from(row);
        let pending = notify(conn, &task, &TaskEvent::Finished).await?;
        Ok(Ok((task, pending)))
    })
    .await
}

/// Back to open: `SET` of a task that becomes open again (its claim deadline counted anew).
const REOPEN: &str = "state = 'open', holder = NULL, claimed_at = NULL, work_deadline = NULL, \
    claim_deadline = now() + claim_timeout_ms * interval '1 millisecond', \
    offers = offers + 1, updated_at = now()";

/// The holder gives its task back: open again, offered again.
pub async fn release(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    task_id: Uuid,
    agent_id: &str,
) -> QueryResult<Result<Moved, Refusal>> {
    conn.transaction(async |conn| {
        let row: Option<Row> = diesel::sql_query(changed(&format!(
            "UPDATE tasks SET {REOPEN} \
             WHERE project_id = $1 AND message_id = $2 AND state = 'claimed' AND holder = $3 \
             RETURNING *"
        )))
        .bind::<SqlUuid, _>(project_id)
        .bind::<SqlUuid, _>(task_id)
        .bind::<Text, _>(agent_id)
        .get_result(conn)
        .await
        .optional()?;
        let Some(row) = row else {
            return Ok(Err(classify(
                find(conn, project_id, task_id).await?,
                agent_id,
            )));
        };
        let task = Task::from(row);
        let event = TaskEvent::Released {
            by: agent_id.to_owned(),
        };
        let pending = notify(conn, &task, &event).await?;
        Ok(Ok((task, pending)))
    })
    .await
}

/// Its sender cancels an open or claimed task.
pub async fn cancel(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    task_id: Uuid,
    agent_id: &str,
    reason: Option<&str>,
) -> QueryResult<Result<Moved, Refusal>> {
    conn.transaction(async |conn| {
        let row: Option<Row> = diesel::sql_query(changed(
            "UPDATE tasks x SET state = 'canceled', result = $4, closed_at = now(), \
               claim_deadline = NULL, work_deadline = NULL, updated_at = now() \
             FROM agent_messages m \
             WHERE m.id = x.message_id AND x.project_id = $1 AND x.message_id = $2 \
               AND m.sender_agent_id = $3 AND x.state IN ('open', 'claimed') \
             RETURNING x.*",
        ))
        .bind::<SqlUuid, _>(project_id)
        .bind::<SqlUuid, _>(task_id)
        .bind::<Text, _>(agent_id)
        .bind::<Nullable<Text>, _>(reason)
        .get_result(conn)
        .await
        .optional()?;
        let Some(row) = row else {
            return Ok(Err(match find(conn, project_id, task_id).await? {
                None => Refusal::NotFound,
                Some(t) if t.sender_agent_id != agent_id => Refusal::NotYours(t),
                Some(t) => Refusal::Closed(t),
            }));
        };
        let task = Task::from(row);
        let event = TaskEvent::Canceled {
            reason: reason.map(str::to_owned),
        };
        let pending = notify(conn, &task, &event).await?;
        Ok(Ok((task, pending)))
    })
    .await
}

/// What a task's deadline found: the task moved, or why not.
pub type Due = timers::Due<Task>;

/// Nobody claimed an open task by its claim deadline: it becomes a dead letter `unclaimed`.
pub async fn unclaimed_due(conn: &mut AsyncPgConnection, task_id: Uuid) -> QueryResult<Due> {
    conn.transaction(async |conn| {
        let row: Option<Row> = diesel::sql_query(changed(
            "UPDATE tasks SET state = 'unclaimed', closed_at = now(), updated_at = now() \
             WHERE message_id = $1 AND state = 'open' AND claim_deadline <= now() \
             RETURNING *",
        ))
        .bind::<SqlUuid, _>(task_id)
        .get_result(conn)
        .await
        .optional()?;
        match row {
            Some(row) => {
                let task = Task::from(row);
                diesel::sql_query(
                    "INSERT INTO dead_letters (message_id, project_id, reason, dead_at) \
                     VALUES ($1, $2, 'unclaimed', now()) \
                     ON CONFLICT (message_id) DO UPDATE SET reason = 'unclaimed', \
                       dead_at = now(), retried_as = NULL",
                )
                .bind::<SqlUuid, _>(task.id)
                .bind::<SqlUuid, _>(task.project_id)
                .execute(conn)
                .await?;
                let pending = notify(conn, &task, &TaskEvent::Unclaimed).await?;
                Ok(Due::Done(task, pending))
            }
            None => later(conn, task_id, TaskState::Open).await,
        }
    })
    .await
}

/// A claimed task's work deadline passed: open again, offered again.
pub async fn work_due(conn: &mut AsyncPgConnection, task_id: Uuid) -> QueryResult<Due> {
    conn.transaction(async |conn| {
        #[derive(QueryableByName)]
        struct Holder {
            #[diesel(sql_type = Nullable<Text>)]
            holder: Option<String>,
        }
        let before: Option<Holder> =
            diesel::sql_query("SELECT holder FROM tasks WHERE message_id = $1 FOR UPDATE")
                .bind::<SqlUuid, _>(task_id)
                .get_result(conn)
                .await
                .optional()?;
        let row: Option<Row> = diesel::sql_query(changed(&format!(
            "UPDATE tasks SET {REOPEN} \
             WHERE message_id = $1 AND state = 'claimed' AND work_deadline <= now() \
             RETURNING *"
        )))
        .bind::<SqlUuid, _>(task_id)
        .get_result(conn)
        .await
        .optional()?;
        match row {
            Some(row) => {
                let task = Task::from(row);
                let event = TaskEvent::Reopened {
                    by: before.and_then(|b| b.holder).unwrap_or_default(),
                };
                let pending = notify(conn, &task, &event).await?;
                Ok(Due::Done(task, pending))
            }
            None => later(conn, task_id, TaskState::Claimed).await,
        }
    })
    .await
}

/// Why a deadline changed nothing: still in `state` with a later deadline, or settled.
async fn later(conn: &mut AsyncPgConnection, task_id: Uuid, state: TaskState) -> QueryResult<Due> {
    timers::later(
        conn,
        "SELECT CASE WHEN state = 'open' THEN claim_deadline ELSE work_deadline END AS at \
         FROM tasks WHERE message_id = $1 AND state = $2",
        task_id,
        state.as_str(),
    )
    .await
}

/// A deadline a task is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskDeadline {
    /// An open task's claim deadline.
    Unclaimed,
    /// A claimed task's work deadline.
    Work,
}

/// Every task deadline still to come (or passed while no broker ran), to re-arm at start-up.
pub async fn deadlines(
    conn: &mut AsyncPgConnection,
) -> QueryResult<Vec<(Uuid, TaskDeadline, DateTime<Utc>)>> {
    timers::load(
        conn,
        "SELECT message_id AS id, 0 AS kind, claim_deadline AS at FROM tasks \
           WHERE state = 'open' AND claim_deadline IS NOT NULL \
         UNION ALL SELECT message_id, 1, work_deadline FROM tasks \
           WHERE state = 'claimed' AND work_deadline IS NOT NULL",
        TaskDeadline::Unclaimed,
        TaskDeadline::Work,
    )
    .await
}
