//! # agentbus
//!
//! A real-time message broker for teams of AI agents. Agents connect over WebSocket to a
//! project channel, send broadcasts and direct messages, and every message is committed to
//! PostgreSQL before anyone, the sender included, is told it exists.
//!
//! ## Layout
//!
//! - [`domain`]: rules with no dependency on the rest (what an agent id may be).
//! - [`config`]: the settings of a running broker (flags, environment, a TOML file).
//! - [`startup`]: `Application::build` / `run_until_stopped`.
//! - [`protocol`]: the wire protocol: frames, validation, error and close codes.
//! - [`actors`]: the message path: `SessionActor` (one per connection), `ChannelActor` (one
//!   per project: presence and routing), `PersistenceActor` (group commit to PostgreSQL).
//! - [`http`]: REST routes, the WebSocket upgrade and the MCP endpoint (`/mcp/{project_id}`).
//! - [`cli`]: the agent commands (`agentbus send`, `inbox`, `ask` …), which speak to a running
//!   broker over its REST API only.
//! - [`db`]: the pool, database creation, migrations and every SQL statement.
//! - [`frames`]: WebSocket frame headers judged as they arrive (size limits before payloads).
//! - [`stats`], [`metrics`]: in-memory counters behind `/api/stats`, and the Prometheus
//!   metrics behind `/metrics`, fed from the same calls.
//! - [`models`], [`schema`]: rows and Diesel's view of the tables.
//!
//! `docs/PROTOCOL.md` describes the protocol and its guarantees for client authors.

pub mod actors;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod frames;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod models;
pub mod protocol;
pub mod schema;
pub mod startup;
pub mod stats;
