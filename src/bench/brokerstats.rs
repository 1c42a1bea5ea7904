//! The broker's own persistence batch counters, when it exposes them on `GET /api/stats`
//! (an object with numeric `batches` and `rows`, anywhere in the answer). A broker without
//! them is reported as "n/a".

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
    let address = ws_base.strip_prefix("ws://")?.trim_end_matches('/');
    let client = reqwest::Client::builder().timeout(TIMEOUT).build().ok()?;
    let response = client
        .get(format!("http://{address}/api/stats"))
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    find_counters(&response.json::<Value>().await.ok()?)
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
