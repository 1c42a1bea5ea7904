//! Integration tests: every test starts a real broker on port 0 against its own fresh
//! PostgreSQL database and talks to it over real sockets.

mod bad_input;
mod helpers;
mod history;
mod messaging;
mod outage;
mod pg_cluster;
mod sessions;
