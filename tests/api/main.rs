//! Integration tests: every test starts a real broker on port 0 against its own fresh
//! PostgreSQL database and talks to it over real sockets.

mod auth;
mod bad_input;
mod batch;
mod bench;
mod claims;
mod cli;
mod cluster;
#[cfg(feature = "browser-tests")]
mod console;
mod crash;
mod fuzz;
mod hardening_delivery;
mod hardening_rest;
mod hardening_ws;
mod helpers;
mod history;
mod inbox_wait;
mod joining;
mod lanes;
mod limits;
mod mcp;
#[cfg(feature = "sdk-tests")]
mod mcp_sdk;
mod messaging;
mod observer;
mod offline;
mod ops;
mod outage;
mod pg_cluster;
mod plans;
mod requests;
mod schema;
mod sessions;
mod shutdown;
mod tasks;
