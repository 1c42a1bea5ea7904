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
//!
//! Beside that path: `CursorActor` records delivery progress, `DeadlineActor` fires request
//! timeouts and sweeps expired messages, `SearchIndexActor` indexes committed messages
//! for full-text search, and `CoordinationActor` keeps the deadlines of file claims and tasks
//! (whose decisions are stored as ordinary messages, through `Persist`).

pub mod acks;
pub mod channel;
pub mod coordination;
pub mod cursor;
pub mod deadlines;
pub mod feed;
pub mod inbox;
pub mod persistence;
pub mod registry;
pub mod search;
pub mod session;
