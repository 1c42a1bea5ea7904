//! The broker's own persistence batch counters, when it exposes them on `GET /api/stats`
//! (an object with numeric `batches` and `rows`, anywhere in the answer), and its
//! message-wait histograms from `GET /metrics` (`agentbus_message_wait_seconds{stage}`). A
//! broker without them is reported as "n/a".

use std::collections::BTreeMap;
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
    let response = get(ws_base, "/api/stats", "application/json").await?;
    find_counters(&response.json::<Value>().await.ok()?)
}

async fn get(ws_base: &str, path: &str, accept: &str) -> Option<reqwest::Response> {
    let address = ws_base.strip_prefix("ws://")?.trim_end_matches('/');
    let client = reqwest::Client::builder().timeout(TIMEOUT).build().ok()?;
    let response = client
        .get(format!("http://{address}{path}"))
        .header(reqwest::header::ACCEPT, accept)
        .send()
        .await
        .ok()?;
    response.status().is_success().then_some(response)
}

/// The series of the broker's message-wait histograms.
const WAIT_SERIES: &str = "agentbus_message_wait_seconds";

/// One stage's histogram at one moment: cumulative counts by upper bound (seconds), and the
/// sum (seconds) and count of observations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageCounters {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// The message-wait histograms at one moment, by stage.
pub type WaitCounters = BTreeMap<String, StageCounters>;

/// How long the run's messages waited at one stage inside the broker (see
/// `agentbus_message_wait_seconds` in docs/CONFIGURATION.md). The quantiles are the upper bounds
/// of the histogram buckets they fall in (`null`: above the last bound).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageWait {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms_at_most: Option<f64>,
    pub p99_ms_at_most: Option<f64>,
}

/// Reads the message-wait histograms of the broker at `ws_base`, if it has them.
pub async fn read_waits(ws_base: &str) -> Option<WaitCounters> {
    let response = get(ws_base, "/metrics", "text/plain").await?;
    let waits = parse_waits(&response.text().await.ok()?);
    (!waits.is_empty()).then_some(waits)
}

/// The `agentbus_message_wait_seconds` series of an OpenMetrics text, by stage.
fn parse_waits(text: &str) -> WaitCounters {
    let mut waits = WaitCounters::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(WAIT_SERIES) else {
            continue;
        };
        let Some((name, rest)) = rest.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let label = |key: &str| {
            labels.split(',').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        let (Some(stage), Ok(value)) = (label("stage"), value.trim().parse::<f64>()) else {
            continue;
        };
        let entry = waits.entry(stage).or_default();
        match name {
            "_sum" => entry.sum = value,
            "_count" => entry.count = value as u64,
            "_bucket" => {
                let bound = match label("le").as_deref() {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => match le.parse() {
                        Ok(bound) => bound,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                entry.buckets.push((bound, value as u64));
            }
            _ => {}
        }
    }
    for stage in waits.values_mut() {
        stage.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    waits
}

/// What waited during a run: the difference of two readings, by stage (stages with no
/// observation in between are left out).
pub fn waits_between(before: &WaitCounters, after: &WaitCounters) -> BTreeMap<String, StageWait> {
    let empty = StageCounters::default();
    let mut out = BTreeMap::new();
    for (stage, now) in after {
        let then = before.get(stage).unwrap_or(&empty);
        let count = now.count.saturating_sub(then.count);
        if count == 0 {
            continue;
        }
        let earlier = |bound: f64| {
            then.buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0, |(_, n)| *n)
        };
        let buckets: Vec<(f64, u64)> = now
            .buckets
            .iter()
            .map(|&(bound, n)| (bound, n.saturating_sub(earlier(bound))))
            .collect();
        let at_most = |q: f64| {
            let rank = (q * count as f64).ceil() as u64;
            buckets
                .iter()
                .find(|(_, n)| *n >= rank)
                .map(|(bound, _)| bound * 1000.0)
                .filter(|ms| ms.is_finite())
        };
        out.insert(
            stage.clone(),
            StageWait {
                count,
                mean_ms: (now.sum - then.sum).max(0.0) * 1000.0 / count as f64,
                p50_ms_at_most: at_most(0.5),
                p99_ms_at_most: at_most(0.99),
            },
        );
    }
    out
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

    #[test]
    fn wait_histograms_are_read_and_subtracted() {
        let reading = |n: [u64; 3], sum: f64| {
            format!(
                "# TYPE agentbus_message_wait_seconds histogram\n\
                 agentbus_message_wait_seconds_sum{{stage=\"commit\"}} {sum}\n\
                 agentbus_message_wait_seconds_count{{stage=\"commit\"}} {}\n\
                 agentbus_message_wait_seconds_bucket{{le=\"0.001\",stage=\"commit\"}} {}\n\
                 agentbus_message_wait_seconds_bucket{{le=\"0.002\",stage=\"commit\"}} {}\n\
                 agentbus_message_wait_seconds_bucket{{le=\"+Inf\",stage=\"commit\"}} {}\n\
                 agentbus_persistence_commit_seconds_count 7\n# EOF\n",
                n[2], n[0], n[1], n[2]
            )
        };
        let before = parse_waits(&reading([1, 2, 2], 0.003));
        assert_eq!(
            before["commit"],
            StageCounters {
                buckets: vec![(0.001, 1), (0.002, 2), (f64::INFINITY, 2)],
                sum: 0.003,
                count: 2,
            }
        );
        // 100 more: 10 under 1 ms, 89 more under 2 ms, one above every bound.
        let after = parse_waits(&reading([11, 101, 102], 0.203));
        let waits = waits_between(&before, &after);
        let commit = &waits["commit"];
        assert_eq!(commit.count, 100);
        assert!((commit.mean_ms - 2.0).abs() < 1e-9, "{commit:?}");
        assert_eq!(commit.p50_ms_at_most, Some(2.0));
        assert_eq!(commit.p99_ms_at_most, Some(2.0));
        let one_more = parse_waits(&reading([11, 101, 103], 0.3));
        assert_eq!(
            waits_between(&after, &one_more)["commit"].p99_ms_at_most,
            None
        );
        assert!(waits_between(&after, &after).is_empty());
    }
}
