//! What an `ack` frame covers on one connection: only what that connection gave the client
//! and is still waiting to hear about. Anything else (a seq never delivered on it, one that
//! does not exist yet, one acknowledged already) is left out and reported back, so an early
//! or mistaken ack can never make a message count as done before it was delivered.

use std::collections::{BTreeSet, HashSet, VecDeque};

/// The seqs an ack made done, and those it named that were left out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    pub done: Vec<i64>,
    pub ignored: Vec<i64>,
}

/// Manual mode: takes the acknowledged seqs out of `in_flight` (delivered on this connection
/// and not acknowledged yet). `up_to` covers every seq of `in_flight` up to and including it,
/// nothing else; it is an inclusive bound, so `i64::MAX` works like any other value.
pub fn take_in_flight(
    in_flight: &mut BTreeSet<i64>,
    seqs: &[i64],
    up_to: Option<i64>,
) -> AckOutcome {
    let mut outcome = AckOutcome::default();
    for &seq in unique(seqs).iter() {
        if in_flight.remove(&seq) {
            outcome.done.push(seq);
        } else {
            outcome.ignored.push(seq);
        }
    }
    if let Some(n) = up_to {
        let covered: Vec<i64> = in_flight.range(..=n).copied().collect();
        for seq in &covered {
            in_flight.remove(seq);
        }
        outcome.done.extend(covered);
    }
    outcome
}

/// Auto mode: what an ack confirms ahead of the pong among `unconfirmed` (written to the
/// socket and not yet confirmed). The seqs stay in `unconfirmed`, whose positions the pings
/// count; confirming them again when the pong comes is harmless.
pub fn confirm_early(unconfirmed: &VecDeque<i64>, seqs: &[i64], up_to: Option<i64>) -> AckOutcome {
    let written: HashSet<i64> = unconfirmed.iter().copied().collect();
    let mut outcome = AckOutcome::default();
    for &seq in unique(seqs).iter() {
        if written.contains(&seq) {
            outcome.done.push(seq);
        } else {
            outcome.ignored.push(seq);
        }
    }
    if let Some(n) = up_to {
        outcome
            .done
            .extend(written.iter().copied().filter(|&seq| seq <= n));
        outcome.done.sort_unstable();
        outcome.done.dedup();
    }
    outcome
}

/// The seqs of a frame, each once, in ascending order.
fn unique(seqs: &[i64]) -> BTreeSet<i64> {
    seqs.iter().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(seqs: &[i64]) -> BTreeSet<i64> {
        seqs.iter().copied().collect()
    }

    #[test]
    fn only_what_is_in_flight_is_acknowledged() {
        let mut in_flight = set(&[3, 5, 7]);
        let outcome = take_in_flight(&mut in_flight, &[5, 2, 9, 5], None);
        assert_eq!(outcome.done, [5]);
        assert_eq!(
            outcome.ignored,
            [2, 9],
            "never delivered here; 5 counted once"
        );
        assert_eq!(in_flight, set(&[3, 7]));
        let again = take_in_flight(&mut in_flight, &[5], None);
        assert_eq!(again.ignored, [5], "acknowledged already");
    }

    #[test]
    fn up_to_covers_what_was_delivered_up_to_it_and_nothing_beyond() {
        let mut in_flight = set(&[2, 4, 6]);
        let outcome = take_in_flight(&mut in_flight, &[], Some(4));
        assert_eq!(
            outcome,
            AckOutcome {
                done: vec![2, 4],
                ignored: vec![]
            }
        );
        assert_eq!(in_flight, set(&[6]));
    }

    #[test]
    fn up_to_at_the_top_of_the_range_does_not_wrap() {
        for n in [i64::MAX, i64::MAX - 1] {
            let mut in_flight = set(&[1, 10, i64::MAX - 1]);
            let outcome = take_in_flight(&mut in_flight, &[], Some(n));
            assert_eq!(outcome.done, [1, 10, i64::MAX - 1], "up_to {n}");
            assert!(in_flight.is_empty());
        }
        let mut in_flight = set(&[1, i64::MAX]);
        let outcome = take_in_flight(&mut in_flight, &[i64::MAX], Some(i64::MAX - 1));
        assert_eq!(outcome.done, [i64::MAX, 1]);
        assert!(in_flight.is_empty());
        let unconfirmed: VecDeque<i64> = [4, 8].into_iter().collect();
        for n in [i64::MAX, i64::MAX - 1] {
            assert_eq!(confirm_early(&unconfirmed, &[], Some(n)).done, [4, 8]);
        }
    }

    #[test]
    fn auto_mode_confirms_only_what_was_written() {
        let unconfirmed: VecDeque<i64> = [4, 8, 9].into_iter().collect();
        let outcome = confirm_early(&unconfirmed, &[8, 100], Some(4));
        assert_eq!(outcome.done, [4, 8]);
        assert_eq!(outcome.ignored, [100]);
    }
}
