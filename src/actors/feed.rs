//! Where a session's next messages come from, and the hand-over between the two sources: the
//! store (the replay at connect, or a catch-up after live traffic had to be skipped) and the
//! live channel. Plain bookkeeping without I/O, so that every interleaving of store pages and
//! live messages can be tested; the session actor does the reading and the writing.
//!
//! The rule that keeps the seam without gap: the range being read from the store is fixed
//! while it is read (a page in flight was asked for exactly that range); a live message that
//! arrives meanwhile is only remembered, and read in the next range once this one is done.

/// A range of owed messages being read from the store, page by page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRange {
    /// Seqs in `(after, upto]`.
    pub after: i64,
    pub upto: i64,
    /// Priority then seq (the replay at connect), or seq only (catch-up).
    pub by_priority: bool,
    /// Where the next page starts (keyset: priority, seq).
    pub resume: (i16, i64),
}

/// What to do with a live message from the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// Queue it for the client now.
    Deliver,
    /// Skip it: the store is being read, and it is read from there in its turn.
    FromStore,
    /// Skip it: it was queued already (read from the store).
    Queued,
}

/// The delivery position of one session. The default (before the replay is set up) reads
/// nothing from the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Feed {
    /// The range being read from the store; `None` while live messages are delivered as they
    /// come.
    reading: Option<StoreRange>,
    /// The highest live seq skipped while reading from the store: the store is read up to it
    /// before live delivery resumes.
    missed_upto: i64,
    /// The highest seq queued for the client (read from the store or live).
    queued_upto: i64,
}

impl Feed {
    /// At connect: every message owed in `(after, head]` is read from the store first, by
    /// priority; live messages wait until then.
    pub fn replay(after: i64, head: i64) -> Feed {
        Feed {
            reading: Some(StoreRange {
                after,
                upto: head,
                by_priority: true,
                resume: (-1, 0),
            }),
            missed_upto: head,
            queued_upto: after,
        }
    }

    /// The range to read the next page of, if the store is being read.
    pub fn reading(&self) -> Option<&StoreRange> {
        self.reading.as_ref()
    }

    /// The highest seq queued for the client so far.
    #[cfg(test)]
    pub fn queued_upto(&self) -> i64 {
        self.queued_upto
    }

    /// A message was queued for the client.
    pub fn queued(&mut self, seq: i64) {
        self.queued_upto = self.queued_upto.max(seq);
    }

    /// A live message arrived from the channel.
    pub fn live(&mut self, seq: i64) -> Live {
        if self.reading.is_some() {
            // Never widen the range being read: a page already asked for it would not cover
            // this seq, and the range would be taken as read up to it.
            self.missed_upto = self.missed_upto.max(seq);
            Live::FromStore
        } else if seq <= self.queued_upto {
            Live::Queued
        } else {
            Live::Deliver
        }
    }

    /// Manual mode, window full: live message `seq` is not delivered; live traffic stops, and
    /// everything after what was queued is caught up from the store, in seq order.
    pub fn fall_behind(&mut self, seq: i64) {
        if self.reading.is_none() {
            self.reading = Some(StoreRange {
                after: self.queued_upto,
                upto: seq,
                by_priority: false,
                resume: (0, self.queued_upto),
            });
        }
        self.missed_upto = self.missed_upto.max(seq);
    }

    /// A page was read: the next one starts after `resume`.
    pub fn advance(&mut self, resume: (i16, i64)) {
        if let Some(range) = self.reading.as_mut() {
            range.resume = resume;
        }
    }

    /// The range being read has no more messages (a page came back short). What was skipped
    /// meanwhile is read next, in seq order. Returns the seq up to which everything owed was
    /// queued if live delivery resumes now, `None` if the store is still being read.
    pub fn range_done(&mut self) -> Option<i64> {
        let range = self.reading.take()?;
        self.queued_upto = self.queued_upto.max(range.upto);
        if self.missed_upto > range.upto {
            self.reading = Some(StoreRange {
                after: range.upto,
                upto: self.missed_upto,
                by_priority: false,
                resume: (0, range.upto),
            });
            None
        } else {
            Some(self.queued_upto)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one page of the range being read, from a store holding `owed` (the seqs owed to
    /// this session, in seq order), as the session does: at most `limit` messages, the
    /// range's bounds fixed when the page is asked for. Returns what the page held and
    /// whether it came back short.
    fn ask(feed: &Feed, owed: &[i64], limit: usize) -> (Vec<i64>, bool) {
        let range = feed.reading().expect("reading the store").clone();
        let page: Vec<i64> = owed
            .iter()
            .copied()
            .filter(|&s| s > range.after && s <= range.upto && s > range.resume.1)
            .take(limit)
            .collect();
        let short = page.len() < limit;
        (page, short)
    }

    /// The session's side of a page that came back: queue it, then see whether the range is
    /// done. Returns the seqs queued.
    fn arrived(feed: &mut Feed, page: (Vec<i64>, bool)) -> Vec<i64> {
        let (page, short) = page;
        for &seq in &page {
            feed.queued(seq);
        }
        if let Some(&last) = page.last() {
            feed.advance((0, last));
        }
        if short {
            feed.range_done();
        }
        page
    }

    /// A page asked for and queued with nothing in between.
    fn read(feed: &mut Feed, owed: &[i64], limit: usize) -> Vec<i64> {
        let page = ask(feed, owed, limit);
        arrived(feed, page)
    }

    #[test]
    fn a_live_message_that_arrives_while_the_last_catch_up_page_is_read_is_read_next() {
        // Manual mode, window of one: 1 was delivered live, 2 found the window full.
        let mut feed = Feed::replay(0, 0);
        assert!(read(&mut feed, &[], 1).is_empty());
        assert_eq!(feed.reading(), None, "live");
        assert_eq!(feed.live(1), Live::Deliver);
        feed.queued(1);
        assert_eq!(feed.live(2), Live::Deliver);
        feed.fall_behind(2);
        // 1 acknowledged: a page of one holds 2, full, so the range may hold more.
        let mut store = vec![1, 2];
        assert_eq!(read(&mut feed, &store, 1), [2]);
        assert!(feed.reading().is_some());
        // 2 acknowledged: the next page is asked for (and comes back empty) ...
        let last_page = ask(&feed, &store, 1);
        // ... while 3 is committed and arrives live.
        store.push(3);
        assert_eq!(feed.live(3), Live::FromStore);
        assert!(arrived(&mut feed, last_page).is_empty());
        // The store is read once more, for 3, before live delivery resumes.
        let next = feed.reading().expect("3 is still to be read").clone();
        assert_eq!((next.after, next.upto, next.by_priority), (2, 3, false));
        assert_eq!(read(&mut feed, &store, 1), [3]);
        assert_eq!(read(&mut feed, &store, 1), Vec::<i64>::new());
        assert_eq!(feed.reading(), None);
        assert_eq!(feed.live(4), Live::Deliver);
    }

    #[test]
    fn live_messages_during_the_replay_follow_it_in_seq_order_then_live_resumes() {
        let mut feed = Feed::replay(0, 5);
        let mut store = vec![2, 3, 5];
        // Everything owed up to the head fits in the first page, asked for before 6 arrived.
        let first = ask(&feed, &store, 10);
        store.push(6);
        assert_eq!(feed.live(6), Live::FromStore);
        assert_eq!(arrived(&mut feed, first), [2, 3, 5]);
        // 7 arrives while the page for (5, 6] is read.
        let second = ask(&feed, &store, 10);
        store.push(7);
        assert_eq!(feed.live(7), Live::FromStore);
        assert_eq!(arrived(&mut feed, second), [6]);
        assert_eq!(read(&mut feed, &store, 10), [7]);
        assert_eq!(feed.reading(), None);
        assert_eq!(feed.queued_upto(), 7);
        assert_eq!(feed.live(7), Live::Queued);
        assert_eq!(feed.live(8), Live::Deliver);
    }

    #[test]
    fn going_live_reports_what_was_queued_up_to() {
        let mut feed = Feed::replay(3, 9);
        assert_eq!(feed.live(10), Live::FromStore);
        // The replay's range is done: 10 is still to be read, so not live yet.
        assert_eq!(feed.range_done(), None);
        assert_eq!(feed.queued_upto(), 9);
        feed.queued(10);
        assert_eq!(feed.range_done(), Some(10));
        assert_eq!(feed.range_done(), None, "nothing is being read");
    }

    #[test]
    fn falling_behind_while_reading_keeps_the_range_and_remembers_the_seq() {
        let mut feed = Feed::replay(0, 4);
        feed.fall_behind(6);
        let range = feed.reading().expect("reading");
        assert_eq!((range.after, range.upto, range.by_priority), (0, 4, true));
        feed.queued(4);
        assert_eq!(feed.range_done(), None);
        let range = feed.reading().expect("6 is read next");
        assert_eq!((range.after, range.upto), (4, 6));
    }
}
