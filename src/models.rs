//! Rows as the broker reads them, and a send on its way to being stored.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use crate::schema::{agent_messages, projects};

/// A project: the unit of isolation. Each has its own channel, members and seq counter.
#[derive(Queryable, Selectable, Serialize, Debug, Clone, PartialEq)]
#[diesel(table_name = projects, check_for_backend(diesel::pg::Pg))]
pub struct Project {
    pub id: Uuid,
    pub name: String,
    /// The seq of the newest committed message (0 when there is none).
    pub head_seq: i64,
    pub created_at: DateTime<Utc>,
}

/// A message as stored in `agent_messages` (and as the REST API shows it).
#[derive(Queryable, Selectable, QueryableByName, Serialize, Debug, Clone, PartialEq)]
#[diesel(table_name = agent_messages, check_for_backend(diesel::pg::Pg))]
pub struct StoredMessage {
    pub id: Uuid,
    pub project_id: Uuid,
    /// Position in the project's history: dense, starting at 1, in commit order.
    pub seq: i64,
    pub sender_agent_id: String,
    pub sender_agent_type: String,
    pub sender_session_id: Option<Uuid>,
    /// The recipient of a direct message; `None` for a broadcast.
    #[serde(rename = "to")]
    pub recipient_agent_id: Option<String>,
    pub message_type: String,
    pub content: String,
    pub metadata: serde_json::Value,
    pub priority: i16,
    pub correlation_id: Option<String>,
    pub reply_to: Option<Uuid>,
    pub client_msg_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
    /// Addressed to every agent of this type.
    #[serde(rename = "to_type")]
    pub recipient_agent_type: Option<String>,
    /// A request: its sender waits for a reply until `reply_deadline`.
    pub expects_reply: bool,
    pub reply_deadline: Option<DateTime<Utc>>,
    pub replied_at: Option<DateTime<Utc>>,
    /// For a reply: the seq of the request it answers.
    pub in_reply_to_seq: Option<i64>,
    pub success: Option<bool>,
    pub error: Option<String>,
    /// For a reply: milliseconds from the request's commit to this reply's commit.
    pub duration_ms: Option<i64>,
    /// A reply committed after its request's deadline.
    pub late: bool,
    /// A task (docs/PROTOCOL.md, "Tasks"): its state is in `tasks`.
    pub task: bool,
}

/// A validated send that has not been committed yet. The broker gives it its id up front so a
/// client can be told which message an error is about; seq and created_at come with the
/// commit.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: Uuid,
    pub project_id: Uuid,
    pub sender_agent_id: String,
    pub sender_agent_type: String,
    /// `None` for messages published over REST.
    pub sender_session_id: Option<Uuid>,
    pub recipient_agent_id: Option<String>,
    pub message_type: String,
    pub content: String,
    pub metadata: serde_json::Value,
    pub priority: i16,
    pub correlation_id: Option<String>,
    pub reply_to: Option<Uuid>,
    pub client_msg_id: Option<String>,
    /// Time to live, counted from the commit.
    pub ttl_ms: Option<i64>,
    pub recipient_agent_type: Option<String>,
    /// A request waiting this long for its reply.
    pub reply_timeout_ms: Option<i64>,
    pub success: Option<bool>,
    pub error: Option<String>,
    /// Filled in at commit for a reply to a pending request.
    pub reply: Option<ReplyLink>,
    /// Set on the broker's own timeout response to this request: it is stored only if the
    /// request is still unanswered when the batch commits.
    pub timeout_of: Option<Uuid>,
    /// A task: its row in `tasks` is written in the same transaction.
    pub task: Option<crate::domain::tasks::TaskTerms>,
}

/// How a reply relates to the request it answers (resolved at commit).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyLink {
    pub in_reply_to_seq: i64,
    pub duration_ms: i64,
    pub late: bool,
}

impl NewMessage {
    /// About how many bytes of memory this message holds while it waits for its commit: its
    /// text fields, its metadata as JSON, and a fixed allowance for everything else. What the
    /// broker-wide budget of uncommitted sends (`max_uncommitted_bytes`) counts.
    pub fn held_bytes(&self) -> usize {
        /// Counts what is written, keeping nothing.
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0 += bytes.len();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        const FIXED: usize = 512;
        let mut metadata = Count(0);
        // Writing a `Value` to a writer that never fails cannot fail.
        let _ = serde_json::to_writer(&mut metadata, &self.metadata);
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        FIXED
            + self.content.len()
            + metadata.0
            + self.sender_agent_id.len()
            + self.sender_agent_type.len()
            + self.message_type.len()
            + text(&self.recipient_agent_id)
            + text(&self.recipient_agent_type)
            + text(&self.correlation_id)
            + text(&self.client_msg_id)
            + text(&self.error)
    }

    /// The stored form of this message once its batch committed with `seq` at `created_at`.
    pub fn into_stored(self, seq: i64, created_at: DateTime<Utc>) -> StoredMessage {
        StoredMessage {
            id: self.id,
            project_id: self.project_id,
            seq,
            expires_at: self
                .ttl_ms
                .map(|ttl| created_at + chrono::Duration::milliseconds(ttl)),
            sender_agent_id: self.sender_agent_id,
            sender_agent_type: self.sender_agent_type,
            sender_session_id: self.sender_session_id,
            recipient_agent_id: self.recipient_agent_id,
            message_type: self.message_type,
            content: self.content,
            metadata: self.metadata,
            priority: self.priority,
            correlation_id: self.correlation_id,
            reply_to: self.reply_to,
            client_msg_id: self.client_msg_id,
            created_at,
            delivered_at: None,
            read_at: None,
            recipient_agent_type: self.recipient_agent_type,
            expects_reply: self.reply_timeout_ms.is_some(),
            reply_deadline: self
                .reply_timeout_ms
                .map(|ms| created_at + chrono::Duration::milliseconds(ms)),
            replied_at: None,
            in_reply_to_seq: self.reply.as_ref().map(|r| r.in_reply_to_seq),
            success: self.success,
            error: self.error,
            duration_ms: self.reply.as_ref().map(|r| r.duration_ms),
            late: self.reply.as_ref().is_some_and(|r| r.late),
            task: self.task.is_some(),
        }
    }
}
