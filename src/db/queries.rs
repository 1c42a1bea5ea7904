//! Every SQL statement the broker runs. The hot one is [`commit_batch`]: one transaction per
//! group-commit batch, whatever its size.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Int2, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::models::{NewMessage, Project, StoredMessage};
use crate::schema::{agent_messages, projects, sessions};

pub async fn create_project(conn: &mut AsyncPgConnection, name: &str) -> QueryResult<Project> {
    diesel::insert_into(projects::table)
        .values(projects::name.eq(name))
        .returning(Project::as_returning())
        .get_result(conn)
        .await
}

pub async fn list_projects(conn: &mut AsyncPgConnection) -> QueryResult<Vec<Project>> {
    projects::table
        .order((projects::created_at.asc(), projects::id.asc()))
        .select(Project::as_select())
        .load(conn)
        .await
}

pub async fn find_project(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Project>> {
    projects::table
        .find(id)
        .select(Project::as_select())
        .first(conn)
        .await
        .optional()
}

/// Records a new WebSocket connection. Done before the upgrade completes, so that every
/// message the session sends can reference its row.
pub async fn insert_session(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    project_id: Uuid,
    agent_id: &str,
    agent_type: &str,
) -> QueryResult<()> {
    diesel::insert_into(sessions::table)
        .values((
            sessions::id.eq(id),
            sessions::project_id.eq(project_id),
            sessions::agent_id.eq(agent_id),
            sessions::agent_type.eq(agent_type),
        ))
        .execute(conn)
        .await
        .map(drop)
}

pub async fn mark_session_disconnected(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<()> {
    diesel::update(sessions::table.find(id))
        .set(sessions::disconnected_at.eq(diesel::dsl::now))
        .execute(conn)
        .await
        .map(drop)
}

/// What became of one message of a batch.
#[derive(Debug)]
pub enum Outcome {
    /// Stored now with this seq.
    Stored(i64),
    /// A retry: a message with the same (project, sender, client_msg_id) was already stored;
    /// this is that message, and nothing new was written.
    Duplicate(Box<StoredMessage>),
    /// A retry of the message at this earlier index of the same batch.
    SameAs(usize),
    /// The project does not exist (any more); nothing was written.
    ProjectMissing,
}

#[derive(QueryableByName)]
struct Head {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = BigInt)]
    head_seq: i64,
}

/// Stores a batch in one transaction and returns one outcome per message, in batch order.
///
/// Seqs are allocated in the same transaction (`UPDATE projects SET head_seq = head_seq + n`),
/// so a batch that rolls back gives its numbers back and every project's seqs stay dense; the
/// row lock taken by that update makes seq order equal commit order. Retries are recognised by
/// their client_msg_id before any number is allocated, so a duplicate leaves no hole either.
/// The rows go in with one `INSERT ... SELECT FROM UNNEST(...)`: one bind parameter per
/// column, however many rows (a multi-row VALUES list would hit PostgreSQL's 65535-parameter
/// limit at a few thousand rows).
pub async fn commit_batch(
    conn: &mut AsyncPgConnection,
    batch: &[NewMessage],
    created_at: DateTime<Utc>,
) -> QueryResult<Vec<Outcome>> {
    conn.transaction(async move |conn| {
        let existing = find_retries(conn, batch).await?;

        // Which messages are new, and the first occurrence of each client_msg_id within
        // the batch (a client may retry before its first attempt committed).
        let mut first_in_batch: HashMap<(Uuid, &str, &str), usize> = HashMap::new();
        let mut plan: Vec<Outcome> = Vec::with_capacity(batch.len());
        let mut new_per_project: HashMap<Uuid, i64> = HashMap::new();
        for (index, msg) in batch.iter().enumerate() {
            if let Some(cmid) = msg.client_msg_id.as_deref() {
                let key = (msg.project_id, msg.sender_agent_id.as_str(), cmid);
                if let Some(stored) =
                    existing.get(&(msg.project_id, msg.sender_agent_id.clone(), cmid.to_owned()))
                {
                    plan.push(Outcome::Duplicate(Box::new(stored.clone())));
                    continue;
                }
                if let Some(&first) = first_in_batch.get(&key) {
                    plan.push(Outcome::SameAs(first));
                    continue;
                }
                first_in_batch.insert(key, index);
            }
            *new_per_project.entry(msg.project_id).or_default() += 1;
            plan.push(Outcome::Stored(0));
        }

        // Allocate seqs: each project's new messages get head+1 ..= head+n, in batch order.
        let mut next_seq: HashMap<Uuid, i64> = HashMap::with_capacity(new_per_project.len());
        if !new_per_project.is_empty() {
            let (ids, counts): (Vec<Uuid>, Vec<i64>) =
                new_per_project.iter().map(|(k, v)| (*k, *v)).unzip();
            let heads: Vec<Head> = diesel::sql_query(
                "UPDATE projects AS p SET head_seq = p.head_seq + c.n \
                 FROM unnest($1::uuid[], $2::int8[]) AS c(id, n) \
                 WHERE p.id = c.id RETURNING p.id, p.head_seq",
            )
            .bind::<Array<SqlUuid>, _>(&ids)
            .bind::<Array<BigInt>, _>(&counts)
            .load(conn)
            .await?;
            for head in heads {
                let n = new_per_project[&head.id];
                next_seq.insert(head.id, head.head_seq - n + 1);
            }
        }

        // Assign seqs and gather the columns of the rows to insert.
        let mut cols = Columns::with_capacity(batch.len());
        for (msg, outcome) in batch.iter().zip(plan.iter_mut()) {
            if let Outcome::Stored(seq) = outcome {
                match next_seq.get_mut(&msg.project_id) {
                    Some(next) => {
                        *seq = *next;
                        *next += 1;
                        cols.push(msg, *seq, created_at);
                    }
                    None => *outcome = Outcome::ProjectMissing,
                }
            }
        }
        if !cols.id.is_empty() {
            cols.insert(conn, created_at).await?;
            cols.ensure_recipients(conn).await?;
        }
        Ok(plan)
    })
    .await
}

/// Messages already stored under the client_msg_ids this batch carries.
async fn find_retries(
    conn: &mut AsyncPgConnection,
    batch: &[NewMessage],
) -> QueryResult<HashMap<(Uuid, String, String), StoredMessage>> {
    let mut projects_col = Vec::new();
    let mut senders = Vec::new();
    let mut cmids = Vec::new();
    for msg in batch {
        if let Some(cmid) = &msg.client_msg_id {
            projects_col.push(msg.project_id);
            senders.push(msg.sender_agent_id.as_str());
            cmids.push(cmid.as_str());
        }
    }
    if cmids.is_empty() {
        return Ok(HashMap::new());
    }
    let found: Vec<StoredMessage> = diesel::sql_query(
        "SELECT m.* FROM agent_messages m \
         JOIN unnest($1::uuid[], $2::text[], $3::text[]) AS k(project_id, sender, cmid) \
           ON m.project_id = k.project_id AND m.sender_agent_id = k.sender AND m.client_msg_id = k.cmid",
    )
    .bind::<Array<SqlUuid>, _>(&projects_col)
    .bind::<Array<Text>, _>(&senders)
    .bind::<Array<Text>, _>(&cmids)
    .load(conn)
    .await?;
    Ok(found
        .into_iter()
        .filter_map(|m| {
            let cmid = m.client_msg_id.clone()?;
            Some(((m.project_id, m.sender_agent_id.clone(), cmid), m))
        })
        .collect())
}

/// The columns of the rows a batch inserts, one vector per column (borrowed from the batch).
struct Columns<'a> {
    id: Vec<Uuid>,
    project_id: Vec<Uuid>,
    seq: Vec<i64>,
    sender_agent_id: Vec<&'a str>,
    sender_agent_type: Vec<&'a str>,
    sender_session_id: Vec<Option<Uuid>>,
    recipient_agent_id: Vec<Option<&'a str>>,
    message_type: Vec<&'a str>,
    content: Vec<&'a str>,
    metadata: Vec<&'a serde_json::Value>,
    priority: Vec<i16>,
    correlation_id: Vec<Option<&'a str>>,
    reply_to: Vec<Option<Uuid>>,
    client_msg_id: Vec<Option<&'a str>>,
    expires_at: Vec<Option<DateTime<Utc>>>,
}

impl<'a> Columns<'a> {
    fn with_capacity(n: usize) -> Self {
        Columns {
            id: Vec::with_capacity(n),
            project_id: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            sender_agent_id: Vec::with_capacity(n),
            sender_agent_type: Vec::with_capacity(n),
            sender_session_id: Vec::with_capacity(n),
            recipient_agent_id: Vec::with_capacity(n),
            message_type: Vec::with_capacity(n),
            content: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            priority: Vec::with_capacity(n),
            correlation_id: Vec::with_capacity(n),
            reply_to: Vec::with_capacity(n),
            client_msg_id: Vec::with_capacity(n),
            expires_at: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, msg: &'a NewMessage, seq: i64, created_at: DateTime<Utc>) {
        self.id.push(msg.id);
        self.project_id.push(msg.project_id);
        self.seq.push(seq);
        self.sender_agent_id.push(&msg.sender_agent_id);
        self.sender_agent_type.push(&msg.sender_agent_type);
        self.sender_session_id.push(msg.sender_session_id);
        self.recipient_agent_id
            .push(msg.recipient_agent_id.as_deref());
        self.message_type.push(&msg.message_type);
        self.content.push(&msg.content);
        self.metadata.push(&msg.metadata);
        self.priority.push(msg.priority);
        self.correlation_id.push(msg.correlation_id.as_deref());
        self.reply_to.push(msg.reply_to);
        self.client_msg_id.push(msg.client_msg_id.as_deref());
        self.expires_at.push(
            msg.ttl_ms
                .map(|ttl| created_at + chrono::Duration::milliseconds(ttl)),
        );
    }

    /// The recipients of this batch's direct messages become members, owed those messages.
    async fn ensure_recipients(&self, conn: &mut AsyncPgConnection) -> QueryResult<()> {
        let (mut projects, mut agents, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        for ((project, to), seq) in self
            .project_id
            .iter()
            .zip(&self.recipient_agent_id)
            .zip(&self.seq)
        {
            if let Some(to) = to {
                projects.push(*project);
                agents.push(*to);
                seqs.push(*seq);
            }
        }
        crate::db::cursors::ensure_recipients(conn, &projects, &agents, &seqs).await
    }

    async fn insert(
        &self,
        conn: &mut AsyncPgConnection,
        created_at: DateTime<Utc>,
    ) -> QueryResult<()> {
        diesel::sql_query(
            "INSERT INTO agent_messages (id, project_id, seq, sender_agent_id, sender_agent_type, \
               sender_session_id, recipient_agent_id, message_type, content, metadata, priority, \
               correlation_id, reply_to, client_msg_id, expires_at, created_at) \
             SELECT u.*, $16 FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::text[], \
               $5::text[], $6::uuid[], $7::text[], $8::text[], $9::text[], $10::jsonb[], \
               $11::int2[], $12::text[], $13::uuid[], $14::text[], $15::timestamptz[]) AS u",
        )
        .bind::<Array<SqlUuid>, _>(&self.id)
        .bind::<Array<SqlUuid>, _>(&self.project_id)
        .bind::<Array<BigInt>, _>(&self.seq)
        .bind::<Array<Text>, _>(&self.sender_agent_id)
        .bind::<Array<Text>, _>(&self.sender_agent_type)
        .bind::<Array<Nullable<SqlUuid>>, _>(&self.sender_session_id)
        .bind::<Array<Nullable<Text>>, _>(&self.recipient_agent_id)
        .bind::<Array<Text>, _>(&self.message_type)
        .bind::<Array<Text>, _>(&self.content)
        .bind::<Array<Jsonb>, _>(&self.metadata)
        .bind::<Array<Int2>, _>(&self.priority)
        .bind::<Array<Nullable<Text>>, _>(&self.correlation_id)
        .bind::<Array<Nullable<SqlUuid>>, _>(&self.reply_to)
        .bind::<Array<Nullable<Text>>, _>(&self.client_msg_id)
        .bind::<Array<Nullable<Timestamptz>>, _>(&self.expires_at)
        .bind::<Timestamptz, _>(created_at)
        .execute(conn)
        .await
        .map(drop)
    }
}

/// Which page of a project's history to read.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// The first page after this seq (how a frontend polls for what is new).
    pub after_seq: Option<i64>,
    /// The page just before this seq (how a reader scrolls back).
    pub before_seq: Option<i64>,
    pub limit: i64,
    pub message_type: Option<String>,
    pub sender: Option<String>,
}

/// A page of history, ascending by seq. With neither bound, the latest page.
pub async fn history(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    q: &HistoryQuery,
) -> QueryResult<Vec<StoredMessage>> {
    use crate::schema::agent_messages::dsl as m;
    let mut query = m::agent_messages
        .filter(m::project_id.eq(project_id))
        .select(StoredMessage::as_select())
        .into_boxed();
    if let Some(after) = q.after_seq {
        query = query.filter(m::seq.gt(after));
    }
    if let Some(before) = q.before_seq {
        query = query.filter(m::seq.lt(before));
    }
    if let Some(t) = &q.message_type {
        query = query.filter(m::message_type.eq(t.clone()));
    }
    if let Some(s) = &q.sender {
        query = query.filter(m::sender_agent_id.eq(s.clone()));
    }
    if q.after_seq.is_some() {
        query.order(m::seq.asc()).limit(q.limit).load(conn).await
    } else {
        let mut page = query.order(m::seq.desc()).limit(q.limit).load(conn).await?;
        page.reverse();
        Ok(page)
    }
}

/// Every message of a project, ascending (tests and tools; not for large projects).
pub async fn all_messages(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
) -> QueryResult<Vec<StoredMessage>> {
    agent_messages::table
        .filter(agent_messages::project_id.eq(project_id))
        .order(agent_messages::seq.asc())
        .select(StoredMessage::as_select())
        .load(conn)
        .await
}
