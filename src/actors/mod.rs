//! The actors a message passes through:
//!
//! ```text
//!  client ──frame──▶ SessionActor ──Persist──▶ PersistenceActor ──(group commit)──▶ PostgreSQL
//!                                                     │
//!                                                Committed (per project, in seq order)
//!                                                     ▼
//!  client ◀──frame── SessionActor ◀──Deliver── ChannelActor (presence, routing, receipts)
//! ```
//!
//! A message reaches nobody, not even its sender's receipt, before its batch committed.

pub mod channel;
pub mod cursor;
pub mod deadlines;
pub mod persistence;
pub mod registry;
pub mod session;
