//! # agentbus
//!
//! A real-time message broker for teams of AI agents. Agents connect over WebSocket to a
//! project channel, send broadcasts and direct messages, and every message is committed to
//! PostgreSQL before anyone, the sender included, is told it exists.
//!
//! ## Layout
//!
//! Layers that only point down (the `layering` test below checks every `crate::` path, and
//! that SQL is written only under `db`):
//!
//! 1. [`domain`], `auth`, `frames`, `limits`, [`schema`]: pure rules and the tables.
//! 2. [`models`] (rows), then [`db`] (every SQL statement, by concern) and [`protocol`] (the
//!    wire protocol: frames, validation, error and close codes).
//! 3. [`config`], `metrics`, then `stats`.
//! 4. `actors`: the message path (`SessionActor` over the `delivery` state machine,
//!    `ChannelActor`, `PersistenceActor`, …), talking through `Recipient<…>`.
//! 5. [`http`]: REST, the WebSocket upgrade, the MCP endpoint.
//! 6. [`startup`] (`Application::build` / `run_until_stopped`), [`cli`] (the agent commands,
//!    over REST only), [`bench`] (`agentbus bench`), and `main.rs`.
//!
//! `docs/PROTOCOL.md` describes the protocol and its guarantees for client authors.

pub(crate) mod actors;
pub(crate) mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub(crate) mod frames;
pub mod http;
pub(crate) mod limits;
pub(crate) mod metrics;
pub mod models;
pub mod protocol;
pub mod schema;
pub mod startup;
pub(crate) mod stats;

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
