//! Per-message times for the `http` scenario's "acknowledged -> at the device" latency: when
//! the sender got its acknowledgement (a PUBACK, an HTTP 202) and when the device got the
//! PUBLISH, for the sequence numbers of one phase.
//!
//! The payload's stamp only carries the send time, and the acknowledgement can come after
//! the delivery (Herald hands a message to a connected device as soon as it is stored, and
//! the answer to the sender races it), so the two times are kept apart and paired at the
//! end, with the cases where the device was first counted rather than clamped away.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hdrhistogram::Histogram;

use super::new_hist;

/// Times of the messages `base .. base + capacity` (0: not yet).
pub(super) struct Track {
    base: AtomicU64,
    acked: Vec<AtomicU64>,
    arrived: Vec<AtomicU64>,
}

/// The pairs of one phase.
pub(super) struct Paired {
    /// Messages with both times.
    pub(super) pairs: u64,
    /// Of those, the device had it before the sender had its acknowledgement.
    pub(super) device_first: u64,
    /// Acknowledgement to delivery, ns (0 when the device was first).
    pub(super) hist: Histogram<u64>,
}

impl Track {
    pub(super) fn new(capacity: usize) -> Track {
        let zeros = || (0..capacity).map(|_| AtomicU64::new(0)).collect();
        Track {
            base: AtomicU64::new(u64::MAX),
            acked: zeros(),
            arrived: zeros(),
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.acked.len()
    }

    /// Forgets the last phase; the next one's sequence numbers start at `base`. Call it while
    /// no message is in flight.
    pub(super) fn start(&self, base: u64) {
        for a in self.acked.iter().chain(&self.arrived) {
            a.store(0, Relaxed);
        }
        self.base.store(base, Relaxed);
    }

    fn slot(&self, seq: u64) -> Option<usize> {
        let i = seq.checked_sub(self.base.load(Relaxed))?;
        usize::try_from(i).ok().filter(|&i| i < self.acked.len())
    }

    pub(super) fn acked(&self, seq: u64, now: u64) {
        if let Some(i) = self.slot(seq) {
            self.acked[i].store(now, Relaxed);
        }
    }

    pub(super) fn arrived(&self, seq: u64, now: u64) {
        if let Some(i) = self.slot(seq) {
            self.arrived[i].store(now, Relaxed);
        }
    }

    pub(super) fn paired(&self) -> Paired {
        let mut p = Paired {
            pairs: 0,
            device_first: 0,
            hist: new_hist(),
        };
        for (a, d) in self.acked.iter().zip(&self.arrived) {
            let (a, d) = (a.load(Relaxed), d.load(Relaxed));
            if a == 0 || d == 0 {
                continue;
            }
            p.pairs += 1;
            if d <= a {
                p.device_first += 1;
            }
            p.hist.saturating_record(d.saturating_sub(a));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_only_messages_of_the_phase_with_both_times() {
        let t = Track::new(4);
        t.start(100);
        t.acked(100, 1_000_000);
        t.arrived(100, 3_000_000); // 2 ms after its acknowledgement
        t.arrived(101, 500_000);
        t.acked(101, 900_000); // the device had it first
        t.acked(102, 1_000); // never arrived
        t.arrived(99, 1); // another phase's
        t.arrived(104, 1); // past the capacity
        let p = t.paired();
        assert_eq!(p.pairs, 2);
        assert_eq!(p.device_first, 1);
        assert_eq!(p.hist.len(), 2);
        assert!(p.hist.max() >= 1_990_000);
        // A new phase forgets the old one.
        t.start(200);
        assert_eq!(t.paired().pairs, 0);
    }
}
