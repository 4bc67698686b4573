//! Keepalive deadlines in coarse buckets: the work is done when a deadline comes, not by
//! visiting every connection on every tick. A connection is filed under the 250 ms slot of
//! its deadline (1.5 times its keepalive after the last packet it sent); packets that come
//! later only move `Mailbox::last_seen`, never the entry. When a slot is due, each of its
//! connections is looked at once: still silent, it is kicked; heard from since, it is filed
//! again under its new deadline. So an idle connection that pings costs one look per
//! keepalive period (every 90 s with a 60 s keepalive) instead of four a second, and one
//! `Weak` pointer in a bucket.
//!
//! Also here: the connections waiting to read their outbox again after the store failed,
//! woken on the next tick (they used to be found by the same full pass).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::mailbox::{Kick, Mailbox};

/// A slot's width: the precision of a keepalive kick (the tick that runs `due` is as fine).
const SLOT_MS: u64 = 250;

#[derive(Default)]
pub struct Deadlines {
    /// Slot (deadline / `SLOT_MS`) -> the connections due then.
    slots: Mutex<BTreeMap<u64, Vec<Weak<Mailbox>>>>,
    /// Connections that asked to be woken on the next tick.
    retries: Mutex<Vec<Weak<Mailbox>>>,
}

impl Deadlines {
    /// Files `mb` under its deadline, counting silence from `silence_from` at the earliest.
    /// A connection without a keepalive is never filed.
    pub fn watch(&self, mb: &Arc<Mailbox>, silence_from: u64) {
        if let Some(at) = mb.deadline(silence_from) {
            self.file(Arc::downgrade(mb), at);
        }
    }

    fn file(&self, mb: Weak<Mailbox>, at_ms: u64) {
        // Rounded up: a connection is never looked at before its deadline.
        let slot = at_ms.div_ceil(SLOT_MS);
        self.slots.lock().entry(slot).or_default().push(mb);
    }

    /// Wakes `mb` on the next tick.
    pub fn retry(&self, mb: &Arc<Mailbox>) {
        self.retries.lock().push(Arc::downgrade(mb));
    }

    /// The tick: kicks the connections whose deadline passed in silence, files the others
    /// again, and wakes the ones waiting for a retry. Returns how many were looked at.
    pub fn tick(&self, now_ms: u64, silence_from: u64) -> usize {
        let retries = std::mem::take(&mut *self.retries.lock());
        for mb in retries.iter().filter_map(Weak::upgrade) {
            mb.wake();
        }
        let due = {
            let mut slots = self.slots.lock();
            let later = slots.split_off(&(now_ms / SLOT_MS + 1));
            std::mem::replace(&mut *slots, later)
        };
        let mut looked = 0;
        for mb in due.into_values().flatten() {
            let Some(mb) = mb.upgrade().filter(|mb| !mb.is_done()) else {
                continue;
            };
            looked += 1;
            match mb.deadline(silence_from) {
                Some(at) if at > now_ms => self.file(Arc::downgrade(&mb), at),
                Some(_) => mb.kick(Kick::Keepalive),
                None => {}
            }
        }
        looked
    }

    /// Connections filed (tests and the census).
    pub fn len(&self) -> usize {
        self.slots.lock().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_connections_are_kicked_at_their_deadline_and_others_filed_again() {
        let d = Deadlines::default();
        let quiet = Arc::new(Mailbox::new(10, 1)); // 15 s after its last packet
        let chatty = Arc::new(Mailbox::new(10, 2));
        let never = Arc::new(Mailbox::new(0, 3));
        let t0 = crate::message::now_ms();
        for mb in [&quiet, &chatty, &never] {
            mb.touch(t0);
            d.watch(mb, 0);
        }
        assert_eq!(d.len(), 2, "no keepalive, no deadline");
        assert_eq!(d.tick(t0 + 14_000, 0), 0, "nothing due yet");
        chatty.touch(t0 + 10_000);
        assert_eq!(d.tick(t0 + 15_250, 0), 2);
        assert_eq!(quiet.kicked(), Some(Kick::Keepalive));
        assert_eq!(chatty.kicked(), None);
        assert_eq!(d.len(), 1, "the chatty one is filed again");
        assert_eq!(d.tick(t0 + 25_250, 0), 1);
        assert_eq!(chatty.kicked(), Some(Kick::Keepalive));
        assert!(d.is_empty());
    }

    #[test]
    fn forgiven_silence_and_gone_connections() {
        let d = Deadlines::default();
        let mb = Arc::new(Mailbox::new(10, 1));
        let t0 = crate::message::now_ms();
        mb.touch(t0);
        d.watch(&mb, 0);
        // The node stalled until t0 + 14 s: silence counts from then.
        d.tick(t0 + 15_250, t0 + 14_000);
        assert_eq!(mb.kicked(), None);
        drop(mb);
        assert_eq!(
            d.tick(t0 + 30_000, 0),
            0,
            "a closed connection is forgotten"
        );
        assert!(d.is_empty());
    }
}
