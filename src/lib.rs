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

/// The layering of the crate, checked on its source: every `crate::` path a module names
/// (outside comments and its own tests) must be of a lower layer, and SQL is written only
/// under `src/db/`. Run with `cargo test --lib layering`.
#[cfg(test)]
mod layering {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// Each top-level module and its layer: a module may use modules of lower layers only.
    const LAYERS: &[(&str, u8)] = &[
        ("domain", 0),
        ("auth", 0),
        ("frames", 0),
        ("limits", 0),
        ("schema", 0),
        ("models", 1),
        ("db", 2),
        ("protocol", 2),
        ("config", 3),
        ("metrics", 3),
        ("stats", 4),
        ("actors", 5),
        ("http", 6),
        ("startup", 7),
        ("bench", 7),
        ("cli", 7),
    ];

    fn layer(module: &str) -> Option<u8> {
        LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
    }

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The code of a file without its comments and without its `#[cfg(test)] mod …`.
    fn code(text: &str) -> String {
        let text = text.split("#[cfg(test)]\nmod ").next().unwrap_or_default();
        text.lines()
            .map(|line| match line.find("//") {
                Some(i) if !line[..i].contains('"') => &line[..i],
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The top-level modules named as `crate::X` or inside `crate::{X, Y::…}`.
    fn named(code: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(list) = rest.strip_prefix('{') {
                let end = list.find('}').unwrap_or(list.len());
                for item in list[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.insert(name);
            }
        }
        found
    }

    #[test]
    fn modules_only_use_lower_layers_and_sql_lives_in_db() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &mut files);
        let mut wrong = Vec::new();
        for file in files {
            let relative = file.strip_prefix(&root).expect("under src");
            let top = relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .unwrap_or_default()
                .trim_end_matches(".rs")
                .to_owned();
            if top == "lib" || top == "main" {
                continue;
            }
            let Some(own) = layer(&top) else {
                wrong.push(format!("{}: module {top} has no layer", relative.display()));
                continue;
            };
            let code = code(&std::fs::read_to_string(&file).expect("read source"));
            for used in named(&code) {
                match layer(&used) {
                    _ if used == top => {}
                    Some(l) if l < own => {}
                    _ => wrong.push(format!(
                        "{}: {top} (layer {own}) uses crate::{used}",
                        relative.display()
                    )),
                }
            }
            if top != "db" {
                for sql in [
                    "sql_query(",
                    "diesel::update(",
                    "diesel::insert_into(",
                    "diesel::delete(",
                ] {
                    if code.contains(sql) {
                        wrong.push(format!("{}: SQL ({sql}) outside db", relative.display()));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    }
}
