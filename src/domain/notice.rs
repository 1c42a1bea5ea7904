//! A message the broker itself sends about coordination (a claim decided, a task taken): what
//! it says and to whom, before it is stored as an ordinary message from `agentbus`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The message type of every coordination notice.
pub const COORDINATION_TYPE: &str = "coordination";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// One agent, or (with `to_type`) every agent of a type, or (neither) everyone.
    pub to: Option<String>,
    pub to_type: Option<String>,
    pub content: String,
    /// Names what the notice is about: `{"claim": {...}, "event": ...}` or
    /// `{"task": {...}, "event": ...}`.
    pub metadata: serde_json::Value,
    pub priority: i16,
    /// The task message a task notice is about (so a thread shows the task's story).
    pub reply_to: Option<Uuid>,
    pub success: Option<bool>,
    pub error: Option<String>,
}

impl Notice {
    pub fn new(content: String, metadata: serde_json::Value, priority: i16) -> Notice {
        Notice {
            to: None,
            to_type: None,
            content,
            metadata,
            priority,
            reply_to: None,
            success: None,
            error: None,
        }
    }

    pub fn to(mut self, to: Option<String>, to_type: Option<String>) -> Notice {
        self.to = to;
        self.to_type = to_type;
        self
    }
}
