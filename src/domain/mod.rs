//! Validated domain rules with no dependency on the rest of the broker: the bottom layer,
//! which `protocol`, `db`, the actors and `http` all build on.

pub mod agent_id;

pub use agent_id::BROKER_AGENT_ID;
pub mod claims;
pub mod notice;
pub mod tasks;
