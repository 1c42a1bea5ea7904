//! Validated domain rules with no dependency on the rest of the broker: the bottom layer,
//! which `protocol`, `db`, the actors and `http` all build on.

pub mod agent_id;
pub mod identifier;

pub use agent_id::{AgentId, InvalidAgentId, BROKER_AGENT_ID};
pub use identifier::{AgentType, InvalidIdentifier};
pub mod claims;
pub mod notice;
pub mod tasks;
pub mod words;
