//! The broker's own persistence batch counters, when it exposes them on `GET /api/stats`
//! (an object with numeric `batches` and `rows`, anywhere in the answer). A broker without
//! them is reported as "n/a".

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(5);

/// The batch counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct BatchCounters {
    pub batches: u64,
    pub rows: u64,
}

/// Batches written during a run.
#[derive(Debug, Clone, Serialize)]
pub struct BatchSizes {
    pub batches: u64,
    pub rows: u64,
    pub mean_rows: f64,
}

impl BatchSizes {
    pub fn between(before: &BatchCounters, after: &BatchCounters) -> Option<BatchSizes> {
        let batches = after.batches.checked_sub(before.batches)?;
        let rows = after.rows.checked_sub(before.rows)?;
        (batches > 0).then(|| BatchSizes {
            batches,
            rows,
            mean_rows: rows as f64 / batches as f64,
        })
    }
}

/// Reads the counters from the broker at `ws_base` (`ws://host:port`), if it has them.
pub async fn read(ws_base: &str) -> Option<BatchCounters> {
    let addr = ws_base
        .strip_prefix("ws://")?
        .trim_end_matches('/')
        .to_owned();
    tokio::task::spawn_blocking(move || fetch(&addr))
        .await
        .ok()
        .flatten()
}

fn fetch(addr: &str) -> Option<BatchCounters> {
    let socket_addr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()?
        .next()?;
    let mut stream = TcpStream::connect_timeout(&socket_addr, TIMEOUT).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(TIMEOUT)).ok()?;
    write!(
        stream,
        "GET /api/stats HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    find_counters(&serde_json::from_str(body).ok()?)
}

/// The first object with numeric `batches` and `rows`, depth first.
fn find_counters(value: &Value) -> Option<BatchCounters> {
    match value {
        Value::Object(map) => {
            if let (Some(batches), Some(rows)) = (
                map.get("batches").and_then(Value::as_u64),
                map.get("rows").and_then(Value::as_u64),
            ) {
                return Some(BatchCounters { batches, rows });
            }
            map.values().find_map(find_counters)
        }
        Value::Array(items) => items.iter().find_map(find_counters),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_counters_wherever_they_are() {
        let stats = serde_json::json!({"uptime_s": 3, "persistence": {"batches": 4, "rows": 10}});
        let c = find_counters(&stats).expect("found");
        assert_eq!((c.batches, c.rows), (4, 10));
        assert!(find_counters(&serde_json::json!({"batches": "x"})).is_none());
        let sizes = BatchSizes::between(
            &BatchCounters {
                batches: 1,
                rows: 1,
            },
            &c,
        )
        .expect("some");
        assert_eq!((sizes.batches, sizes.rows), (3, 9));
        assert_eq!(sizes.mean_rows, 3.0);
    }
}
