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
}

impl NewMessage {
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
        }
    }
}
