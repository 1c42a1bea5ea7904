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
//! Actors know each other's messages, never each other's types: each actor's inbound
//! messages are defined beside it, and an actor holds `Recipient<…>` of the messages it
//! sends (a channel holds `Recipient<ToSession>` per session; the persistence actor holds
//! `Recipient<TrackRequest>`, `Recipient<IndexSoon>` and `Recipient<coordination::Arm>`; the
//! deadline and coordination actors are started by the persistence actor with its
//! `Recipient<Persist>`). What became of a send is a raw
//! [`settle::Settlement`]; each waiter (a session, a REST call) words its own answer.
//! Committed messages reach channels through one seam, [`registry::ChannelRegistry::route`],
//! which any other source of commits can feed the same way.
//!
//! Beside that path: `CursorActor` records delivery progress, `DeadlineActor` fires request
//! timeouts and sweeps expired messages, `SearchIndexActor` indexes committed messages
//! for full-text search, and `CoordinationActor` keeps the deadlines of file claims and tasks
//! (whose decisions are stored as ordinary messages, through `Persist`). `ClusterActor` makes
//! this broker one node of several on the same database: heartbeat, duties (which node sweeps
//! and indexes), and the other nodes' notifications, whose commits reach channels through the
//! same `route` seam, read back from PostgreSQL by seq.
//!
//! A session's delivery decisions (outbox, flow control, confirmation, draining, closing) are
//! the plain state machine `delivery::Delivery`, with `feed::Feed` as its seam between the
//! store and the live channel; `SessionActor` is the shell that does its I/O.

pub mod acks;
pub mod channel;
pub mod cluster;
pub mod coordination;
pub mod cursor;
pub mod deadlines;
pub mod delivery;
pub mod feed;
pub mod inbox;
pub mod lanes;
pub mod persistence;
pub mod registry;
pub mod search;
pub mod session;
pub mod settle;
