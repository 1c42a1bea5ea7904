//! Judging a client's WebSocket frames by their headers, before their payload arrives.
//!
//! A WebSocket frame header (RFC 6455 §5.2) declares its payload length up front, in at most
//! 14 bytes. The WebSocket decoder the broker uses compares that length with its maximum only
//! once the whole frame is buffered, so a header declaring 2^40 bytes followed by a stream of
//! payload would be buffered for as long as the client kept sending. [`FrameTracker`] reads
//! the same byte stream as it goes past, incrementally (a header may be split across reads),
//! skipping payloads without looking at them, and says so as soon as a header declares more
//! than the limit, or as soon as the header of a continuation frame would take its fragmented
//! message past it (control frames between fragments do not count). Nothing in it depends on
//! the network library: the upgrade in `http::socket` runs it over the connection's bytes and
//! stops reading at the first [`Refused`], and the session tells the client through the
//! shared [`Refusal`].

use std::sync::{Arc, OnceLock};

/// The longest frame header: 2 bytes, a 64-bit extended length and a 4-byte mask.
const MAX_HEADER: usize = 14;
/// Opcodes from this one up are control frames (RFC 6455 §5.5): never fragmented, and never
/// part of a fragmented message's size.
const FIRST_CONTROL_OPCODE: u8 = 0x8;
const OPCODE_CONTINUATION: u8 = 0x0;

/// What was too large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversize {
    /// One frame's header declared this many payload bytes.
    Frame { declared: u64 },
    /// A fragmented message would reach this many payload bytes with its next fragment.
    Message { total: u64 },
}

/// The stream must stop here: the first `keep` bytes of the chunk just scanned end the last
/// frame that may be read (the refused frame's header starts there, or started in an earlier
/// chunk if `keep` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub keep: usize,
    pub why: Oversize,
}

/// Follows the frame boundaries of one direction of a WebSocket connection.
#[derive(Debug)]
pub struct FrameTracker {
    limit: u64,
    /// The header being read, and how many of its bytes have arrived (0: at a boundary).
    header: [u8; MAX_HEADER],
    have: usize,
    /// Payload bytes of the current frame not seen yet.
    remaining: u64,
    /// Payload bytes of the unfinished fragmented message so far.
    message: u64,
}

/// A header read so far: either more bytes are needed, or it is complete.
enum Header {
    Partial,
    Complete { opcode: u8, fin: bool, len: u64 },
}

impl FrameTracker {
    /// Frames and fragmented messages may carry at most `limit` payload bytes.
    pub fn new(limit: usize) -> Self {
        FrameTracker {
            limit: limit as u64,
            header: [0; MAX_HEADER],
            have: 0,
            remaining: 0,
            message: 0,
        }
    }

    /// Follows the next bytes of the stream. After an `Err`, the tracker must not be used
    /// again: the stream is to be cut there.
    pub fn scan(&mut self, chunk: &[u8]) -> Result<(), Refused> {
        let mut pos = 0;
        // Where the header being read started in this chunk (0 if it started earlier).
        let mut header_start = 0;
        while pos < chunk.len() {
            if self.remaining > 0 {
                let skip = self.remaining.min((chunk.len() - pos) as u64);
                self.remaining -= skip;
                pos += skip as usize;
                continue;
            }
            if self.have == 0 {
                header_start = pos;
            }
            self.header[self.have] = chunk[pos];
            self.have += 1;
            pos += 1;
            let refused = |why| Refused {
                keep: header_start,
                why,
            };
            match self.read_header().map_err(refused)? {
                Header::Partial => {}
                Header::Complete { opcode, fin, len } => {
                    self.have = 0;
                    self.remaining = len;
                    if opcode == OPCODE_CONTINUATION {
                        self.message = if fin { 0 } else { self.message + len };
                    } else if opcode < FIRST_CONTROL_OPCODE {
                        self.message = if fin { 0 } else { len };
                    }
                }
            }
        }
        Ok(())
    }

    /// Looks at the header bytes read so far; refuses as soon as the length is known to be
    /// too large (before the mask has arrived).
    fn read_header(&self) -> Result<Header, Oversize> {
        let header = &self.header[..self.have];
        let [first, second, rest @ ..] = header else {
            return Ok(Header::Partial);
        };
        let (extended, len) = match second & 0x7f {
            126 => (
                2,
                rest.get(..2)
                    .map(|b| u64::from(u16::from_be_bytes([b[0], b[1]]))),
            ),
            127 => (
                8,
                rest.get(..8)
                    .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
            ),
            n => (0, Some(u64::from(n))),
        };
        let Some(len) = len else {
            return Ok(Header::Partial);
        };
        let opcode = first & 0x0f;
        if len > self.limit {
            return Err(Oversize::Frame { declared: len });
        }
        if opcode == OPCODE_CONTINUATION && self.message + len > self.limit {
            return Err(Oversize::Message {
                total: self.message + len,
            });
        }
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        if header.len() < 2 + extended + mask {
            return Ok(Header::Partial);
        }
        Ok(Header::Complete {
            opcode,
            fin: first & 0x80 != 0,
            len,
        })
    }
}

/// Why the reading side of a connection stopped, set once by the stream that refused and
/// read by the session that must tell the client.
#[derive(Debug, Clone, Default)]
pub struct Refusal(Arc<OnceLock<Oversize>>);

impl Refusal {
    /// Records the refusal (only the first one counts).
    pub fn record(&self, why: Oversize) {
        let _ = self.0.set(why);
    }

    pub fn get(&self) -> Option<Oversize> {
        self.0.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1000;

    /// A masked client frame header declaring `len` bytes.
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
        out.extend_from_slice(&[1, 2, 3, 4]);
        out
    }

    fn frame(opcode: u8, fin: bool, len: usize) -> Vec<u8> {
        let mut out = header(opcode, fin, len as u64);
        out.extend(std::iter::repeat_n(b'x', len));
        out
    }

    /// Scans `stream` in chunks of `size` bytes; the refusal, with `keep` turned into an
    /// offset in the whole stream.
    fn scan_in_chunks(stream: &[u8], size: usize) -> Option<(usize, Oversize)> {
        let mut tracker = FrameTracker::new(LIMIT);
        for (n, chunk) in stream.chunks(size).enumerate() {
            if let Err(refused) = tracker.scan(chunk) {
                return Some((n * size + refused.keep, refused.why));
            }
        }
        None
    }

    /// Every way of splitting the stream into chunks gives the same verdict; a cut is reported
    /// at the refused header's start when it started in the refusing chunk, and otherwise at
    /// that chunk's start (the header's first bytes were already let through).
    fn verdict(stream: &[u8]) -> Option<(usize, Oversize)> {
        let whole = scan_in_chunks(stream, stream.len().max(1));
        for size in 1..=stream.len().min(40) {
            let split = scan_in_chunks(stream, size);
            match (whole, split) {
                (None, None) => {}
                (Some((at, why)), Some((cut, split_why))) => {
                    assert_eq!(why, split_why, "chunks of {size}");
                    assert!(
                        cut <= at + MAX_HEADER && cut >= at,
                        "chunks of {size}: {cut}"
                    );
                    if size == 1 {
                        // The refusing byte is the header's last length byte.
                        assert!(cut > at, "chunks of 1 cut at {cut}, header at {at}");
                    }
                }
                _ => panic!("chunks of {size} disagree: {whole:?} vs {split:?}"),
            }
        }
        whole
    }

    #[test]
    fn frames_within_the_limit_pass_whatever_the_chunking() {
        let mut stream = frame(0x1, true, 10);
        stream.extend(frame(0x1, true, 0));
        stream.extend(frame(0x9, true, 125));
        stream.extend(frame(0x1, true, 300));
        stream.extend(frame(0x2, true, LIMIT));
        stream.extend(frame(0x1, true, 5));
        assert_eq!(verdict(&stream), None);
    }

    #[test]
    fn a_16_bit_length_over_the_limit_is_refused_at_its_header() {
        let mut stream = frame(0x1, true, 20);
        let at = stream.len();
        stream.extend(header(0x1, true, LIMIT as u64 + 1));
        assert_eq!(
            verdict(&stream),
            Some((
                at,
                Oversize::Frame {
                    declared: LIMIT as u64 + 1
                }
            ))
        );
    }

    #[test]
    fn a_64_bit_length_is_refused_before_the_mask_arrives() {
        let mut tracker = FrameTracker::new(LIMIT);
        let header = header(0x1, true, 1 << 40);
        // The first 10 bytes carry the length; the mask is not needed to judge it.
        assert_eq!(
            tracker.scan(&header[..10]),
            Err(Refused {
                keep: 0,
                why: Oversize::Frame { declared: 1 << 40 }
            })
        );
        let mut stream = frame(0x1, true, 3);
        stream.extend(&header);
        assert_eq!(
            verdict(&stream),
            Some((9, Oversize::Frame { declared: 1 << 40 }))
        );
    }

    #[test]
    fn payload_bytes_are_never_taken_for_headers() {
        // A payload full of bytes that would read as a huge header.
        let mut stream = header(0x1, true, 600);
        stream.extend(std::iter::repeat_n(0xff, 600));
        stream.extend(frame(0x1, true, 2));
        assert_eq!(verdict(&stream), None);
    }

    #[test]
    fn a_fragmented_message_is_refused_at_the_fragment_that_crosses_the_limit() {
        let mut stream = frame(0x1, false, 600);
        // Control frames between fragments do not count towards the message.
        stream.extend(frame(0x9, true, 100));
        stream.extend(frame(0x0, false, 300));
        stream.extend(frame(0xA, true, 100));
        stream.extend(frame(0x0, false, 100));
        assert_eq!(verdict(&stream), None, "exactly the limit");
        let at = stream.len();
        stream.extend(header(0x0, true, 1));
        assert_eq!(
            verdict(&stream),
            Some((
                at,
                Oversize::Message {
                    total: LIMIT as u64 + 1
                }
            ))
        );
    }

    #[test]
    fn many_small_fragments_are_counted_together() {
        let mut stream = frame(0x1, false, 0);
        for _ in 0..100 {
            stream.extend(frame(0x0, false, 10));
        }
        let at = stream.len();
        stream.extend(frame(0x0, false, 10));
        assert_eq!(
            verdict(&stream),
            Some((at, Oversize::Message { total: 1010 }))
        );
    }

    #[test]
    fn a_finished_message_starts_the_count_again() {
        let mut stream = Vec::new();
        for _ in 0..5 {
            stream.extend(frame(0x1, false, 500));
            stream.extend(frame(0x0, true, 500));
        }
        stream.extend(frame(0x2, false, 999));
        stream.extend(frame(0x0, true, 1));
        assert_eq!(verdict(&stream), None);
    }

    #[test]
    fn unmasked_frames_are_followed_too() {
        // Clients must mask; the decoder refuses unmasked frames, but the tracker still finds
        // the boundaries.
        let mut stream = vec![0x81, 3, b'a', b'b', b'c'];
        stream.extend([0x81, 126, 0x04, 0x00]);
        assert_eq!(
            verdict(&stream),
            Some((5, Oversize::Frame { declared: 1024 }))
        );
    }

    #[test]
    fn a_refusal_is_recorded_once() {
        let refusal = Refusal::default();
        assert_eq!(refusal.get(), None);
        refusal.clone().record(Oversize::Frame { declared: 5 });
        refusal.record(Oversize::Message { total: 9 });
        assert_eq!(refusal.get(), Some(Oversize::Frame { declared: 5 }));
    }
}
