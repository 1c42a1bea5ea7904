//! A hostile WebSocket client cannot make the broker buffer without bound: a frame header that
//! declares more than `max_frame_bytes` is refused as soon as it is read (not once its payload
//! has arrived), a fragmented message is capped by its running total, and a flood of pings
//! from a client that never reads costs at most one queued pong.
//!
//! These tests speak WebSocket by hand over a raw TCP socket, so they can write what no
//! well-behaved library would (a header declaring 2^40 bytes, a continuation that is never
//! finished, millions of pings without reading), and they run the real binary so they can
//! read its memory from `/proc`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use uuid::Uuid;

use crate::crash::BrokerProcess;
use crate::helpers::{status, Agent, TestApp, PATIENCE};

/// Growth of the broker's resident memory that fails a test. Each flood below would grow it
/// by several hundred MiB if it were buffered; a broker that refuses or bounds it stays
/// within a few MiB.
const MAX_GROWTH_MIB: u64 = 150;
/// Longest any flood below keeps writing: it stops by itself at its byte or frame budget,
/// when the broker closes, or at this bound, whichever comes first.
const FLOOD_TIME: Duration = Duration::from_secs(90);
/// The mask of every frame the test client writes (clients must mask; any key will do).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The header of a masked client frame (RFC 6455 §5.2) declaring `len` payload bytes.
fn header(opcode: u8, fin: bool, len: u64) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 | opcode } else { opcode }];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out
}

/// A whole masked client frame.
fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = header(opcode, fin, payload.len() as u64);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// A frame from the broker (servers do not mask).
#[derive(Debug)]
enum ServerFrame {
    Text(Value),
    Ping,
    Pong(Vec<u8>),
    Close(Option<u16>),
}

/// The reading half of a hand-made WebSocket connection.
struct RawReader(OwnedReadHalf);

impl RawReader {
    /// The next frame, or `None` if the connection ended (or failed) first.
    async fn next(&mut self) -> Option<ServerFrame> {
        let mut head = [0u8; 2];
        self.0.read_exact(&mut head).await.ok()?;
        let len = match head[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                self.0.read_exact(&mut ext).await.ok()?;
                u64::from(u16::from_be_bytes(ext))
            }
            127 => {
                let mut ext = [0u8; 8];
                self.0.read_exact(&mut ext).await.ok()?;
                u64::from_be_bytes(ext)
            }
            n => u64::from(n),
        };
        assert!(len < 64 << 20, "the broker announced a {len}-byte frame");
        let mut payload = vec![0u8; len as usize];
        self.0.read_exact(&mut payload).await.ok()?;
        Some(match head[0] & 0x0f {
            OP_TEXT => ServerFrame::Text(
                serde_json::from_slice(&payload).expect("the broker sends JSON text frames"),
            ),
            OP_PING => ServerFrame::Ping,
            OP_PONG => ServerFrame::Pong(payload),
            OP_CLOSE => ServerFrame::Close(
                (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
            ),
            op => panic!("the broker sent a frame with opcode {op}"),
        })
    }

    /// The next text frame (pings and pongs from the broker are passed over).
    async fn next_text(&mut self) -> Value {
        loop {
            match timeout(PATIENCE, self.next()).await {
                Ok(Some(ServerFrame::Text(value))) => return value,
                Ok(Some(ServerFrame::Ping | ServerFrame::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Every frame until the broker's close frame (included), the end of the connection or
    /// `deadline`, whichever comes first.
    async fn until_close(&mut self, deadline: Instant) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, self.next()).await {
            let close = matches!(frame, ServerFrame::Close(_));
            frames.push(frame);
            if close {
                break;
            }
        }
        frames
    }
}

/// Performs the upgrade by hand and reads the welcome frame.
async fn connect_raw(port: u16, project: Uuid, agent_id: &str) -> (RawReader, OwnedWriteHalf) {
    let mut socket = timeout(PATIENCE, TcpStream::connect(("127.0.0.1", port)))
        .await
        .expect("connect hung")
        .expect("connect");
    let request = format!(
        "GET /ws/agent/messages/{project}?agent_id={agent_id} HTTP/1.1\r\n\
         Host: 127.0.0.1:{port}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("write the upgrade");
    // The response head, byte by byte so that nothing after it is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = timeout(PATIENCE, socket.read_u8())
            .await
            .expect("the upgrade response hung")
            .expect("read the upgrade response");
        head.push(byte);
        assert!(head.len() < 8192, "no end to the response head");
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (read, write) = socket.into_split();
    let mut reader = RawReader(read);
    let welcome = reader.next_text().await;
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    (reader, write)
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the fd directory")
        .count()
}

/// A real broker process on a fresh database with one project. The harness app that
/// created the database is kept (stopped) so that the database is dropped at the end.
async fn broker() -> (TestApp, BrokerProcess, Uuid) {
    let app = TestApp::spawn().await;
    let project = app.create_project("hostile").await;
    app.stop();
    let broker = BrokerProcess::start(&app.database_url);
    (app, broker, project)
}

/// A normal exchange between two new agents (named after `label`): the broker still serves
/// everyone else.
async fn still_serves(port: u16, project: Uuid, label: &str) {
    let url = |agent: &str| {
        format!("ws://127.0.0.1:{port}/ws/agent/messages/{project}?agent_id={label}-{agent}")
    };
    let mut a = Agent::connect(&url("a")).await;
    let mut b = Agent::connect(&url("b")).await;
    let receipt = a.send_ok(status("still here")).await;
    let message = b.expect_op("message").await;
    assert_eq!(message["seq"], receipt["seq"]);
    assert_eq!(message["content"], "still here");
}

/// Asserts the frames end with a `frame_too_large` error and a 1009 close.
fn assert_refused_as_too_large(frames: &[ServerFrame]) {
    let texts: Vec<&Value> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Text(v) => Some(v),
            _ => None,
        })
        .collect();
    assert!(
        texts
            .iter()
            .any(|v| v["op"] == "error" && v["code"] == "frame_too_large"),
        "no frame_too_large error among {frames:?}"
    );
    assert!(
        matches!(frames.last(), Some(ServerFrame::Close(Some(1009)))),
        "the connection was not closed with 1009: {frames:?}"
    );
}

#[tokio::test]
async fn a_header_declaring_a_huge_frame_is_refused_before_its_payload_is_buffered() {
    let (_app, broker, project) = broker().await;
    let pid = broker.child.id();
    still_serves(broker.port, project, "before").await;
    let (rss_before, fds_before) = (rss_kib(pid), open_fds(pid));

    let (mut reader, mut writer) = connect_raw(broker.port, project, "huge").await;
    // A text frame declaring 2^40 bytes, then payload for as long as the connection takes it
    // (up to 512 MiB), whatever the broker answers. A broker that waits for the whole frame
    // before judging its size buffers all of it.
    const BUDGET: u64 = 512 << 20;
    let sent = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(rss_before));
    let flood = {
        let (sent, peak) = (sent.clone(), peak.clone());
        tokio::spawn(async move {
            let chunk: Vec<u8> = MASK.iter().copied().cycle().take(64 * 1024).collect();
            let flood = async {
                writer
                    .write_all(&header(OP_TEXT, true, 1 << 40))
                    .await
                    .ok()?;
                while sent.load(Ordering::Relaxed) < BUDGET {
                    writer.write_all(&chunk).await.ok()?;
                    let total = sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if total % (8 << 20) == 0 {
                        peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    }
                }
                Some(())
            };
            let _ = timeout(FLOOD_TIME, flood).await;
            peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
            // Returned, not dropped: the connection stays open on this side.
            writer
        })
    };
    let frames = reader.until_close(Instant::now() + FLOOD_TIME).await;
    let sent_at_close_kib = sent.load(Ordering::Relaxed) >> 10;
    // Then the broker ends the connection itself, although this side is still open (and may
    // still be writing).
    let ended = timeout(PATIENCE, async { while reader.next().await.is_some() {} }).await;
    let writer = flood.await.expect("the flood task");
    let grown_mib = peak.load(Ordering::Relaxed).saturating_sub(rss_before) / 1024;
    let sent_mib = sent.load(Ordering::Relaxed) >> 20;
    eprintln!(
        "{sent_at_close_kib} KiB sent when the close came, {sent_mib} MiB in all; \
         the broker grew by up to {grown_mib} MiB"
    );
    assert!(
        grown_mib < MAX_GROWTH_MIB,
        "the broker grew by {grown_mib} MiB while {sent_mib} MiB were sent"
    );
    assert_refused_as_too_large(&frames);
    assert!(
        ended.is_ok(),
        "the broker kept the connection open after its close"
    );
    drop(writer);
    drop(reader);
    still_serves(broker.port, project, "after").await;
    let deadline = Instant::now() + PATIENCE;
    while open_fds(pid) > fds_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        open_fds(pid) <= fds_before,
        "{} descriptors open, {fds_before} before",
        open_fds(pid)
    );
}

#[tokio::test]
async fn an_oversize_header_is_refused_without_waiting_for_any_payload() {
    let app = TestApp::spawn_with(|s| s.max_frame_bytes = 4096).await;
    let project = app.create_project("header").await;
    let (mut reader, mut writer) = connect_raw(app.port, project, "a").await;
    // A send that fits, then a header one byte over the limit and not a byte of its payload:
    // the send gets its receipt, then the refusal comes at once.
    let send = json!({"content": "before", "client_msg_id": "c1"}).to_string();
    let mut bytes = frame(OP_TEXT, true, send.as_bytes());
    bytes.extend(header(OP_TEXT, true, 4097));
    writer.write_all(&bytes).await.expect("write");
    let frames = reader.until_close(Instant::now() + PATIENCE).await;
    let receipt = frames
        .iter()
        .find_map(|f| match f {
            ServerFrame::Text(v) if v["op"] == "sent" => Some(v),
            _ => None,
        })
        .unwrap_or_else(|| {
            panic!("no receipt for the send before the oversize header: {frames:?}")
        });
    assert_eq!(receipt["client_msg_id"], "c1");
    assert_refused_as_too_large(&frames);
}

#[tokio::test]
async fn a_fragmented_message_over_the_limit_is_refused_at_the_fragment_that_crosses_it() {
    let app = TestApp::spawn_with(|s| s.max_frame_bytes = 4096).await;
    let project = app.create_project("fragments").await;

    // A fragmented message that fits, with a ping between its fragments, is delivered.
    let (mut reader, mut writer) = connect_raw(app.port, project, "a").await;
    let text = json!({"content": "y".repeat(3000)}).to_string();
    let (first, rest) = text.split_at(2000);
    let mut bytes = frame(OP_TEXT, false, first.as_bytes());
    bytes.extend(frame(OP_PING, true, b"between"));
    bytes.extend(frame(OP_CONTINUATION, true, rest.as_bytes()));
    writer.write_all(&bytes).await.expect("write");
    loop {
        let value = reader.next_text().await;
        if value["op"] == "sent" {
            assert_eq!(value["seq"], 1);
            break;
        }
        assert_ne!(value["op"], "error", "{value}");
    }

    // 3000 bytes, a ping, 1000 more (exactly the limit), then the header of a continuation
    // that would cross it, without its payload: refused with 1009 at that header.
    let mut bytes = frame(OP_TEXT, false, &[b'x'; 3000]);
    bytes.extend(frame(OP_PING, true, b"between"));
    bytes.extend(frame(OP_CONTINUATION, false, &[b'x'; 1096]));
    bytes.extend(header(OP_CONTINUATION, true, 1));
    writer.write_all(&bytes).await.expect("write");
    let frames = reader.until_close(Instant::now() + PATIENCE).await;
    assert_refused_as_too_large(&frames);

    // A fragmented message that never ends, in small fragments: refused once the running
    // total passes the limit, however small each fragment is.
    let (mut reader, mut writer) = connect_raw(app.port, project, "b").await;
    let mut bytes = frame(OP_TEXT, false, b"{\"content\":\"");
    for _ in 0..100 {
        bytes.extend(frame(OP_CONTINUATION, false, &[b'z'; 100]));
    }
    let _ = writer.write_all(&bytes).await;
    let frames = reader.until_close(Instant::now() + PATIENCE).await;
    assert_refused_as_too_large(&frames);

    let mut conn = app.db().await;
    let stored = agentbus::db::queries::all_messages(&mut conn, project)
        .await
        .expect("rows");
    assert_eq!(stored.len(), 1, "only the message that fitted was stored");
}

#[tokio::test]
async fn a_ping_flood_from_a_client_that_never_reads_costs_at_most_one_pong() {
    let (_app, broker, project) = broker().await;
    let pid = broker.child.id();
    still_serves(broker.port, project, "before").await;
    let rss_before = rss_kib(pid);

    let (mut reader, mut writer) = connect_raw(broker.port, project, "pinger").await;
    // Two million 125-byte pings (250 MiB on the wire), numbered, without reading anything.
    const PINGS: u64 = 2_000_000;
    const PER_WRITE: u64 = 1000;
    let ping = |n: u64| {
        let mut payload = [b'p'; 125];
        payload[..8].copy_from_slice(&n.to_be_bytes());
        frame(OP_PING, true, &payload)
    };
    // A client that reads gets a pong for every ping.
    for n in 0..3 {
        writer.write_all(&ping(n)).await.expect("write a ping");
        loop {
            match timeout(PATIENCE, reader.next()).await {
                Ok(Some(ServerFrame::Pong(payload))) => {
                    assert_eq!(payload[..8], n.to_be_bytes(), "the pong answers ping {n}");
                    break;
                }
                Ok(Some(ServerFrame::Ping)) => {}
                other => panic!("expected the pong of ping {n}, got {other:?}"),
            }
        }
    }
    let written = Arc::new(AtomicU64::new(0));
    let flood = {
        let written = written.clone();
        async move {
            let (mut next, mut peak) = (0, rss_before);
            while next < PINGS {
                let batch: Vec<u8> = (next..next + PER_WRITE).flat_map(ping).collect();
                writer.write_all(&batch).await.expect("write pings");
                next += PER_WRITE;
                written.store(next, Ordering::Relaxed);
                if next % 100_000 == 0 {
                    peak = peak.max(rss_kib(pid));
                }
            }
            (writer, peak.max(rss_kib(pid)))
        }
    };
    let (mut writer, peak) = timeout(FLOOD_TIME, flood).await.unwrap_or_else(|_| {
        panic!(
            "only {} pings written in {FLOOD_TIME:?}",
            written.load(Ordering::Relaxed)
        )
    });
    // The socket buffers hold a few MiB at most: nearly all of it has been read by the
    // broker, and what it holds for this client is what it kept of the flood.
    let grown_mib = peak.saturating_sub(rss_before) / 1024;
    eprintln!("{PINGS} pings written; the broker grew by up to {grown_mib} MiB");
    assert!(
        grown_mib < MAX_GROWTH_MIB,
        "the broker grew by {grown_mib} MiB after {PINGS} unread pings"
    );
    // Everything written has been read by the broker once it answers a frame sent after it.
    let send = json!({"content": "after the flood", "client_msg_id": "after"}).to_string();
    writer
        .write_all(&frame(OP_TEXT, true, send.as_bytes()))
        .await
        .expect("write");
    let mut pongs = 0u64;
    let mut last_pong = None;
    let mut receipt = None;
    let deadline = Instant::now() + FLOOD_TIME;
    // Read until the receipt has come and the newest ping has its pong.
    while receipt.is_none() || last_pong != Some(PINGS - 1) {
        match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Some(ServerFrame::Pong(payload))) => {
                pongs += 1;
                let n = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
                assert!(last_pong < Some(n), "pong {n} after pong {last_pong:?}");
                last_pong = Some(n);
            }
            Ok(Some(ServerFrame::Text(value))) if value["op"] == "sent" => receipt = Some(value),
            Ok(Some(ServerFrame::Ping)) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => panic!("no pong for the last ping (last was {last_pong:?}, {pongs} pongs)"),
        }
    }
    eprintln!("{pongs} pongs for {PINGS} pings");
    assert!(
        pongs < PINGS / 10,
        "{pongs} pongs for {PINGS} pings: unanswered pings were queued"
    );
    assert_eq!(receipt.expect("receipt")["client_msg_id"], "after");
    still_serves(broker.port, project, "after").await;
}
