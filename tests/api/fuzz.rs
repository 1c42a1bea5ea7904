//! Hostile input at a live broker: random and mangled frames from several connections, then
//! a normal exchange must still work and every acknowledged message must be intact.

use std::collections::HashMap;

use agentbus::db::queries;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{status, TestApp, PATIENCE};

/// A small deterministic generator (xorshift64*), so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// One hostile frame.
fn hostile(rng: &mut Rng) -> Message {
    let nasty = [
        "",
        "null",
        "[]",
        "{}",
        "\"\"",
        "{\"op\":null}",
        "{\"content\":{}}",
        "{\"content\":[1]}",
        "{\"content\":\"x\",\"priority\":-1}",
        "{\"content\":\"x\",\"priority\":1e99}",
        "{\"content\":\"x\",\"ttl_ms\":\"soon\"}",
        "{\"content\":\"x\",\"to\":\"\\u0000\"}",
        "{\"content\":\"\\u0000\"}",
        "{\"content\":\"x\",\"metadata\":{\"k\":\"\\u0000\"}}",
        "{\"op\":\"ack\",\"seqs\":[-5]}",
        "{\"op\":\"ack\",\"up_to\":9223372036854775807}",
        "{\"op\":\"read\",\"ids\":[\"'; DROP TABLE agent_messages; --\"]}",
        "{\"op\":\"hello\",\"capabilities\":[\"\"]}",
        "{\"content\":\"x\",\"reply_to\":\"nope\"}",
        "{\"content\":\"x\",\"expects_reply\":true,\"timeout_ms\":0}",
        "{\"type\":\"x y\",\"content\":\"x\"}",
        "{\"content\":\"x\",\"to\":\"a\",\"to_type\":\"b\"}",
        "{\"content\":\"x\"",
        "\u{feff}{}",
        "{\"content\":\"x\",\"client_msg_id\":\"\"}",
    ];
    match rng.below(8) {
        0 => Message::text(rng.pick(&nasty)),
        1 => {
            // Deep nesting, deeper than any parser should follow.
            let depth = 100 + rng.below(2000) as usize;
            Message::text(format!(
                "{{\"content\":\"x\",\"metadata\":{}{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            ))
        }
        2 => {
            // Random printable garbage.
            let len = rng.below(300) as usize;
            Message::text(
                (0..len)
                    .map(|_| char::from(32 + rng.below(95) as u8))
                    .collect::<String>(),
            )
        }
        3 => Message::binary(
            (0..rng.below(64))
                .map(|_| rng.below(256) as u8)
                .collect::<Vec<u8>>(),
        ),
        4 => Message::Ping(
            (0..rng.below(100))
                .map(|_| rng.below(256) as u8)
                .collect::<Vec<u8>>()
                .into(),
        ),
        5 => {
            // A valid frame with one field mangled.
            let fields = [
                "content",
                "type",
                "priority",
                "metadata",
                "to",
                "ttl_ms",
                "client_msg_id",
                "op",
            ];
            let values = [
                json!(null),
                json!(7),
                json!(-1),
                json!("s"),
                json!([]),
                json!({}),
                json!(true),
                json!(1.5),
            ];
            let mut frame = json!({"content": "fine", "type": "status"});
            frame[fields[rng.below(fields.len() as u64) as usize]] =
                values[rng.below(values.len() as u64) as usize].clone();
            Message::text(frame.to_string())
        }
        6 => Message::text(format!(
            "{{\"content\":\"{}\"}}",
            "é".repeat(rng.below(40_000) as usize)
        )),
        _ => Message::text(
            json!({"content": "'; DROP TABLE agent_messages; -- 😀", "type": "status"}).to_string(),
        ),
    }
}

#[tokio::test]
async fn random_hostile_frames_break_nothing_and_lose_no_acknowledged_message() {
    let seed = std::env::var("AGENTBUS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_CAFE_F00D_u64);
    eprintln!("fuzz seed {seed} (set AGENTBUS_FUZZ_SEED to replay)");
    let app = TestApp::spawn_with(|s| s.max_frame_bytes = 64 * 1024).await;
    let project = app.create_project("fuzz").await;

    let mut acknowledged: HashMap<String, (i64, String)> = HashMap::new();
    for connection in 0..6u64 {
        let mut rng = Rng(seed ^ (connection + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let url = app.ws_url(project, &format!("agent_id=fuzzer-{connection}"));
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        let (mut sink, mut stream) = ws.split();
        let mut expected = Vec::new();
        for n in 0..150 {
            let frame = if n % 5 == 0 {
                // Interleaved: a valid send whose receipt must come back.
                let id = format!("c{connection}-{n}");
                expected.push(id.clone());
                Message::text(
                    json!({"content": format!("valid {id}"), "client_msg_id": id}).to_string(),
                )
            } else if rng.below(20) == 0 {
                // Invalid UTF-8 in a text frame: the broker closes this connection (1007).
                Message::Frame(Frame::message(
                    vec![0xC3, 0x28, 0xFF],
                    OpCode::Data(Data::Text),
                    true,
                ))
            } else {
                hostile(&mut rng)
            };
            if sink.send(frame).await.is_err() {
                break;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
        // Read whatever comes back until the connection ends.
        while let Ok(Some(Ok(message))) = tokio::time::timeout(PATIENCE, stream.next()).await {
            if std::env::var("FUZZ_DEBUG").is_ok() {
                eprintln!("{connection}: {:.200}", format!("{message:?}"));
            }
            if let Message::Text(text) = message {
                let frame: Value = serde_json::from_str(&text).expect("the broker sends JSON");
                assert!(frame["op"].is_string(), "{frame}");
                if frame["op"] == "sent" {
                    let id = frame["client_msg_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    if expected.contains(&id) {
                        acknowledged.insert(
                            id.clone(),
                            (frame["seq"].as_i64().expect("seq"), format!("valid {id}")),
                        );
                    }
                }
            }
        }
    }

    // The broker still serves a normal exchange.
    let mut a = app.connect(project, "a", "coder").await;
    let mut b = app.connect(project, "b", "coder").await;
    a.send_ok(status("still alive")).await;
    assert_eq!(b.expect_op("message").await["content"], "still alive");
    let (code, _) = app.get_json("/healthz").await;
    assert_eq!(code, 200);

    // Every acknowledged message is stored, with its seq and its content, once; seqs are dense.
    let mut conn = app.db().await;
    let rows = queries::all_messages(&mut conn, project)
        .await
        .expect("rows");
    let by_id: HashMap<&str, &agentbus::models::StoredMessage> = rows
        .iter()
        .filter_map(|r| Some((r.client_msg_id.as_deref()?, r)))
        .collect();
    assert!(!acknowledged.is_empty());
    for (id, (seq, content)) in &acknowledged {
        let row = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("acknowledged {id} is missing"));
        assert_eq!((row.seq, &row.content), (*seq, content));
    }
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=rows.len() as i64).collect::<Vec<_>>());
}
