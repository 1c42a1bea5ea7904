//! Projects, sessions and history. The commit path is in [`super::batch`]; membership and
//! delivery cursors in [`super::cursors`].

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::models::{Project, StoredMessage};
use crate::schema::{agent_messages, projects, sessions};

pub async fn create_project(conn: &mut AsyncPgConnection, name: &str) -> QueryResult<Project> {
    diesel::insert_into(projects::table)
        .values(projects::name.eq(name))
        .returning(Project::as_returning())
        .get_result(conn)
        .await
}

/// Creates a project and its first token (returned in clear, once), in one transaction.
pub async fn create_project_with_token(
    conn: &mut AsyncPgConnection,
    name: &str,
) -> QueryResult<(Project, String)> {
    use diesel_async::AsyncConnection;
    conn.transaction(async |conn| {
        let project = create_project(conn, name).await?;
        let (_, token) = crate::db::tokens::issue(conn, project.id, None).await?;
        Ok((project, token))
    })
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

/// At shutdown: every session still open in the database is closed now. (One broker per
/// database: another broker's sessions would be marked too.)
pub async fn mark_all_sessions_disconnected(conn: &mut AsyncPgConnection) -> QueryResult<usize> {
    diesel::update(sessions::table.filter(sessions::disconnected_at.is_null()))
        .set(sessions::disconnected_at.eq(diesel::dsl::now))
        .execute(conn)
        .await
}

pub async fn mark_session_disconnected(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<()> {
    diesel::update(sessions::table.find(id))
        .set(sessions::disconnected_at.eq(diesel::dsl::now))
        .execute(conn)
        .await
        .map(drop)
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
    pub correlation_id: Option<String>,
    /// A request and every reply to it.
    pub thread: Option<Uuid>,
    /// Words that must all appear in the content (served by the full-text index).
    pub q: Option<String>,
}

/// A page of history and what follows it.
#[derive(Debug)]
pub struct HistoryPage {
    /// Ascending by seq.
    pub messages: Vec<StoredMessage>,
    /// More messages match beyond this page, in its direction (after its last message when
    /// reading forward with `after_seq`, before its first otherwise).
    pub has_more: bool,
    /// The page stopped at the byte budget before `limit` messages.
    pub truncated: bool,
}

/// The messages a history query selects, filtered and ordered (newest first unless reading
/// forward with `after_seq`), all columns.
fn history_selection<'a>(
    project_id: Uuid,
    q: &'a HistoryQuery,
    tsquery: Option<String>,
) -> agent_messages::BoxedQuery<'a, diesel::pg::Pg> {
    use crate::schema::agent_messages::dsl as m;
    let mut query = m::agent_messages
        .filter(m::project_id.eq(project_id))
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
    if let Some(c) = &q.correlation_id {
        query = query.filter(m::correlation_id.eq(c.clone()));
    }
    if let Some(t) = q.thread {
        query = query.filter(m::id.eq(t).or(m::reply_to.eq(t)));
    }
    if let Some(words) = tsquery {
        // The indexed documents (db::search; the caller indexed the project's tail first).
        // The matches' seqs are gathered first (an InitPlan), so the rows are then fetched by
        // (project_id, seq).
        use diesel::sql_types::{Text, Uuid as SqlUuid};
        query = query.filter(
            diesel::dsl::sql::<diesel::sql_types::Bool>(
                "seq = ANY(ARRAY(SELECT s.seq FROM message_search s WHERE s.project_id = ",
            )
            .bind::<SqlUuid, _>(project_id)
            .sql(" AND s.document @@ ")
            .bind::<Text, _>(words)
            .sql("::tsquery))"),
        );
    }
    // With a text search, order by `seq + 0`: an expression no index provides, so the planner
    // looks up the matches found by the full-text index and sorts them, instead of walking
    // the seq index and testing every row until enough match (seconds on a large project
    // when the word is rare).
    match (q.q.is_some(), q.after_seq.is_some()) {
        (false, true) => query.order(m::seq.asc()),
        (false, false) => query.order(m::seq.desc()),
        (true, true) => query.order((m::seq + 0_i64).asc()),
        (true, false) => query.order((m::seq + 0_i64).desc()),
    }
}

/// Most messages a search indexes per transaction when it catches its project up.
const SEARCH_PASS: i64 = 5_000;

/// A page of history, ascending by seq; with neither bound, the latest page. At most
/// `q.limit` messages and, past the first, at most about `budget` bytes of them (see
/// `db::paging`): the seqs and sizes of the page are read first (no content), then only the
/// messages that fit.
pub async fn history(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    q: &HistoryQuery,
    budget: usize,
) -> QueryResult<HistoryPage> {
    use crate::schema::agent_messages::dsl as m;
    // A search finds every message stored before it began: what the search indexer has not
    // reached yet in this project is indexed now, then the index alone is read.
    let tsquery = match &q.q {
        Some(text) => match crate::domain::words::query(text) {
            Some(tsquery) => {
                crate::db::search::index_project(conn, project_id, SEARCH_PASS).await?;
                Some(tsquery)
            }
            // No word in it (only punctuation): nothing can match.
            None => {
                return Ok(HistoryPage {
                    messages: Vec::new(),
                    has_more: false,
                    truncated: false,
                })
            }
        },
        None => None,
    };
    // The stored size of the content and metadata, without reading (or decompressing) them.
    let sized: Vec<(i64, i64)> = history_selection(project_id, q, tsquery)
        .select((
            m::seq,
            diesel::dsl::sql::<diesel::sql_types::BigInt>(
                "octet_length(content)::int8 + octet_length(coalesce(error, ''))::int8 \
                 + pg_column_size(metadata)::int8",
            ),
        ))
        .limit(q.limit.saturating_add(1))
        .load(conn)
        .await?;
    let limit = usize::try_from(q.limit).unwrap_or(usize::MAX);
    let candidates = &sized[..sized.len().min(limit)];
    let fit = crate::db::paging::fitting(
        candidates.iter().map(|&(_, bytes)| {
            usize::try_from(bytes)
                .unwrap_or(0)
                .saturating_add(crate::db::paging::ROW_OVERHEAD_BYTES)
        }),
        budget,
    );
    let seqs: Vec<i64> = candidates[..fit].iter().map(|&(seq, _)| seq).collect();
    let messages = m::agent_messages
        .filter(m::project_id.eq(project_id))
        .filter(m::seq.eq_any(seqs))
        .order(m::seq.asc())
        .select(StoredMessage::as_select())
        .load(conn)
        .await?;
    Ok(HistoryPage {
        messages,
        has_more: sized.len() > fit,
        truncated: fit < candidates.len(),
    })
}

pub async fn find_message(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    id: Uuid,
) -> QueryResult<Option<StoredMessage>> {
    agent_messages::table
        .filter(agent_messages::project_id.eq(project_id))
        .filter(agent_messages::id.eq(id))
        .select(StoredMessage::as_select())
        .first(conn)
        .await
        .optional()
}

/// The members to whom a message is still owed (the same rule as replay).
pub async fn owed_to(
    conn: &mut AsyncPgConnection,
    message: &StoredMessage,
) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Agent {
        #[diesel(sql_type = diesel::sql_types::Text)]
        agent_id: String,
    }
    let agents: Vec<Agent> = diesel::sql_query(
        "SELECT m.agent_id FROM members m, agent_messages a \
         WHERE a.id = $1 AND m.project_id = a.project_id AND a.seq > m.ack_floor \
           AND NOT (a.seq = ANY(m.acked_above)) \
           AND agentbus_owed(a.recipient_agent_id, a.recipient_agent_type, a.sender_agent_id, \
                             a.seq, a.expires_at, m.agent_id, m.agent_type, m.joined_seq) \
         ORDER BY m.agent_id",
    )
    .bind::<diesel::sql_types::Uuid, _>(message.id)
    .load(conn)
    .await?;
    Ok(agents.into_iter().map(|a| a.agent_id).collect())
}

pub async fn dead_letter(
    conn: &mut AsyncPgConnection,
    message_id: Uuid,
) -> QueryResult<Option<(String, chrono::DateTime<chrono::Utc>, Option<Uuid>)>> {
    use crate::schema::dead_letters::dsl as d;
    d::dead_letters
        .find(message_id)
        .select((d::reason, d::dead_at, d::retried_as))
        .first(conn)
        .await
        .optional()
}

pub async fn reply_count(
    conn: &mut AsyncPgConnection,
    project_id: Uuid,
    request_id: Uuid,
) -> QueryResult<i64> {
    agent_messages::table
        .filter(agent_messages::project_id.eq(project_id))
        .filter(agent_messages::reply_to.eq(request_id))
        .count()
        .get_result(conn)
        .await
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
