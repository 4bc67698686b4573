//! In-process outbox: the embedded default. Lost on restart, said so in the README.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use super::{Enqueued, Entry, Limits};
use crate::config::OverflowPolicy;
use crate::message::Qos;
use crate::message::{now_ms, Message};
use crate::metrics;
use crate::receipts::{hooks::MemQueue, Event, ReceiptId, State, Table};

/// One client's queue. It exists only while it holds entries (an idle device costs nothing
/// here), so its sequence numbers start from the clock, and above every number a removed
/// queue handed out (`MemoryOutbox::floor`: the clock alone repeats itself within a
/// millisecond and can go back): a queue created again later numbers above everything its
/// predecessor handed out, and a connection's cursor stays valid.
struct ClientOutbox {
    /// Last sequence number handed out.
    last_seq: u64,
    /// Highest sequence number written to the wire.
    sent: u64,
    /// `Message::size` summed over `entries`.
    bytes: usize,
    entries: VecDeque<Entry>,
    /// Collapse key -> seq of the newest push with it (HTTP `collapse`).
    collapse: HashMap<Box<str>, u64>,
}

impl ClientOutbox {
    fn starting_above(floor: u64) -> Self {
        // 1000 numbers per millisecond: more than one client can be sent.
        let base = (now_ms() * 1000).max(floor);
        ClientOutbox {
            last_seq: base,
            sent: base,
            bytes: 0,
            entries: VecDeque::new(),
            collapse: HashMap::new(),
        }
    }
}

impl ClientOutbox {
    fn position(&self, seq: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&seq, |e| e.seq)
    }

    fn remove(&mut self, i: usize) -> Option<Entry> {
        let e = self.entries.remove(i)?;
        self.bytes -= e.msg.size();
        Some(e)
    }

    /// Over the client's budget if `size` more bytes were added (an empty queue takes one
    /// message of any size, or a message larger than the budget could never be delivered).
    fn full(&self, limits: &Limits, size: usize) -> bool {
        self.entries.len() >= limits.max_queued
            || (!self.entries.is_empty() && self.bytes + size > limits.max_queued_bytes)
    }
}

/// In-process outbox: one `VecDeque` per client in a sharded map, so publishers to different
/// devices do not contend on one lock.
pub struct MemoryOutbox {
    clients: DashMap<Arc<str>, ClientOutbox>,
    limits: Limits,
    /// Messages and bytes held over all clients. Pushes to client ids nobody ever connects
    /// with would otherwise grow memory without bound: past `limits.max_total` or
    /// `limits.max_total_bytes`, new ones are refused. Checked before the client's lock is
    /// taken, so concurrent enqueues can overshoot by one message each.
    total: AtomicUsize,
    total_bytes: AtomicUsize,
    /// The highest sequence number any removed queue handed out.
    floor: AtomicU64,
    /// Records of tracked messages (`receipts`), and the webhook's queue when there is one.
    receipts: Table,
    hooks: Option<Arc<MemQueue>>,
}

impl MemoryOutbox {
    pub fn new(limits: Limits) -> MemoryOutbox {
        MemoryOutbox {
            clients: DashMap::new(),
            limits,
            total: AtomicUsize::new(0),
            total_bytes: AtomicUsize::new(0),
            floor: AtomicU64::new(0),
            receipts: Table::new(std::time::Duration::from_secs(86_400), limits.max_total),
            hooks: None,
        }
    }

    /// With receipts kept `ttl`, and final states queued for a webhook in `hooks`.
    pub fn with_receipts(
        mut self,
        ttl: std::time::Duration,
        hooks: Option<Arc<MemQueue>>,
    ) -> MemoryOutbox {
        self.receipts = Table::new(ttl, self.limits.max_total);
        self.hooks = hooks;
        self
    }

    /// A tracked message's state changed.
    pub(super) fn note(&self, client: &Arc<str>, seq: u64, state: State) {
        let at_ms = now_ms();
        metrics::receipt(state.name());
        if self.receipts.note(client, seq, state, at_ms) {
            if let Some(h) = &self.hooks {
                let id = ReceiptId {
                    client: client.clone(),
                    seq,
                    lineage: 0,
                };
                h.push(Event { id, state, at_ms });
            }
        }
    }

    /// See `Store::collapse`: the entry of `key` before `seq` goes if it was never sent.
    pub(super) fn collapse(&self, client: &Arc<str>, key: &str, seq: u64) -> Option<(u64, bool)> {
        let mut ob = self.clients.get_mut(&**client)?;
        let old = ob.collapse.get(key).copied().unwrap_or(0);
        if old >= seq {
            return None;
        }
        if ob.collapse.len() >= self.limits.max_queued.max(1) {
            ob.collapse.clear();
        }
        ob.collapse.insert(key.into(), seq);
        if old <= ob.sent {
            return None;
        }
        let i = ob.position(old).ok()?;
        let e = ob.remove(i)?;
        self.removed(1, e.msg.size());
        Some((old, e.msg.receipt))
    }

    /// Its record, or what its entry in the outbox says (`receipts::unrecorded`).
    pub(super) fn receipt(&self, client: &str, seq: u64) -> Option<(State, u64)> {
        self.receipts.get(client, seq).or_else(|| {
            let ob = self.clients.get(client)?;
            let i = ob.position(seq).ok()?;
            crate::receipts::unrecorded(&ob.entries[i].msg)
        })
    }

    /// The client's outbox, created on first use under the caller's key (no copy of the id,
    /// and no allocation when it exists).
    fn entry(&self, client: &Arc<str>) -> dashmap::mapref::one::RefMut<'_, Arc<str>, ClientOutbox> {
        match self.clients.get_mut(&**client) {
            Some(ob) => ob,
            None => self.clients.entry(client.clone()).or_insert_with(|| {
                ClientOutbox::starting_above(self.floor.load(Ordering::Acquire))
            }),
        }
    }

    fn removed(&self, n: usize, bytes: usize) {
        self.total.fetch_sub(n, Ordering::Relaxed);
        self.total_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes held over all clients.
    pub fn bytes(&self) -> usize {
        self.total_bytes.load(Ordering::Relaxed)
    }

    pub(super) fn enqueue(&self, client: &Arc<str>, qos: Qos, msg: &Arc<Message>) -> Enqueued {
        let size = msg.size();
        if self.total.load(Ordering::Relaxed) >= self.limits.max_total {
            metrics::dropped(metrics::Drop::StoreFull);
            metrics::limit_hit("store_max_messages");
            return Enqueued::Rejected;
        }
        if self.total_bytes.load(Ordering::Relaxed) + size > self.limits.max_total_bytes {
            metrics::dropped(metrics::Drop::StoreFull);
            metrics::limit_hit("store_max_bytes");
            return Enqueued::Rejected;
        }
        let mut ob = self.entry(client);
        if ob.full(&self.limits, size) {
            if ob.entries.len() < self.limits.max_queued {
                metrics::limit_hit("session_max_queued_bytes");
            }
            match self.limits.overflow {
                OverflowPolicy::DropNew => {
                    metrics::dropped(metrics::Drop::OutboxFullNew);
                    return Enqueued::Rejected;
                }
                OverflowPolicy::DropOldest => {
                    while ob.full(&self.limits, size) {
                        let Some(e) = ob.remove(0) else { break };
                        self.removed(1, e.msg.size());
                        metrics::dropped(metrics::Drop::OutboxFullOldest);
                        if e.msg.receipt {
                            self.note(client, e.seq, State::Dropped);
                        }
                    }
                }
            }
        }
        ob.last_seq += 1;
        let seq = ob.last_seq;
        ob.bytes += size;
        ob.entries.push_back(Entry {
            seq,
            qos,
            msg: msg.clone(),
            live: false,
        });
        self.total.fetch_add(1, Ordering::Relaxed);
        self.total_bytes.fetch_add(size, Ordering::Relaxed);
        metrics::stored();
        Enqueued::Stored(seq)
    }

    pub(super) fn fetch(&self, client: &str, from: u64, limit: usize) -> Vec<Entry> {
        let Some(mut ob) = self.clients.get_mut(client) else {
            return Vec::new();
        };
        let now = now_ms();
        let mut i = match ob.position(from) {
            Ok(i) | Err(i) => i,
        };
        let mut out = Vec::with_capacity(limit.min(ob.entries.len() - i));
        while out.len() < limit && i < ob.entries.len() {
            if ob.entries[i].msg.is_expired(now) {
                if let Some(e) = ob.remove(i) {
                    self.removed(1, e.msg.size());
                    if e.msg.receipt {
                        self.note(ob.key(), e.seq, State::Expired);
                    }
                }
                metrics::dropped(metrics::Drop::Expired);
                continue;
            }
            out.push(ob.entries[i].clone());
            i += 1;
        }
        out
    }

    pub(super) fn ack(&self, client: &str, seq: u64) {
        if let Some(mut ob) = self.clients.get_mut(client) {
            if let Ok(i) = ob.position(seq) {
                if let Some(e) = ob.remove(i) {
                    self.removed(1, e.msg.size());
                }
            }
        }
    }

    pub(super) fn mark_sent(&self, client: &str, seq: u64) {
        if let Some(mut ob) = self.clients.get_mut(client) {
            ob.sent = ob.sent.max(seq);
        }
    }

    /// The sent watermark of a client's queue (0 if it has none).
    pub(super) fn sent(&self, client: &str) -> u64 {
        self.clients.get(client).map_or(0, |ob| ob.sent)
    }

    /// Drops every queued entry; returns how many. The queue itself stays (its sequence
    /// counter and sent watermark keep going: a connection's cursor stays valid).
    pub(super) fn clear(&self, client: &str) -> usize {
        let Some(mut ob) = self.clients.get_mut(client) else {
            return 0;
        };
        let n = ob.entries.len();
        self.removed(n, ob.bytes);
        for e in ob.entries.iter().filter(|e| e.msg.receipt) {
            self.note(ob.key(), e.seq, State::Dropped);
        }
        ob.entries.clear();
        ob.entries.shrink_to_fit();
        ob.bytes = 0;
        n
    }

    pub(super) fn len(&self, client: &str) -> usize {
        self.clients.get(client).map_or(0, |ob| ob.entries.len())
    }

    /// The number of queued entries and the `born_us` of the oldest (the front: entries
    /// are kept in sequence order).
    pub(super) fn queued(&self, client: &str) -> (usize, Option<u64>) {
        self.clients.get(client).map_or((0, None), |ob| {
            (ob.entries.len(), ob.entries.front().map(|e| e.msg.born_us))
        })
    }

    /// Messages held (exact) and the age of the oldest: a pass over the outboxes, each
    /// shard read-locked in turn, run every few seconds.
    pub(super) fn sample(&self) -> super::OutboxSample {
        let oldest = self
            .clients
            .iter()
            .filter_map(|ob| ob.entries.front().map(|e| e.msg.born_us))
            .filter(|b| *b > 0)
            .min();
        super::OutboxSample {
            messages: self.total.load(Ordering::Relaxed) as u64,
            oldest_age_secs: oldest.map_or(0.0, |b| {
                crate::message::now_us().saturating_sub(b) as f64 / 1e6
            }),
            sessions: None,
        }
    }

    pub(super) fn sweep(&self) {
        let now = now_ms();
        self.receipts.sweep(now);
        self.clients.retain(|client, ob| {
            let before = (ob.entries.len(), ob.bytes);
            ob.entries.retain(|e| {
                let expired = e.msg.is_expired(now);
                if expired && e.msg.receipt {
                    self.note(client, e.seq, State::Expired);
                }
                !expired
            });
            ob.bytes = ob.entries.iter().map(|e| e.msg.size()).sum();
            self.removed(before.0 - ob.entries.len(), before.1 - ob.bytes);
            for _ in ob.entries.len()..before.0 {
                metrics::dropped(metrics::Drop::Expired);
            }
            if ob.entries.is_empty() {
                // The next queue of this client starts above it (see `ClientOutbox`).
                self.floor.fetch_max(ob.last_seq, Ordering::AcqRel);
                return false;
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(p: &str, expires_at: u64) -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::copy_from_slice(p.as_bytes()),
            qos: Qos::AtLeastOnce,
            retain: false,
            expires_at,
            born_us: 0,
            forwarded: false,
            receipt: false,
        })
    }

    fn store(max: usize, overflow: OverflowPolicy) -> MemoryOutbox {
        MemoryOutbox::new(Limits {
            max_queued: max,
            max_queued_bytes: 1 << 20,
            overflow,
            max_total: 100,
            max_total_bytes: 1 << 30,
        })
    }

    #[test]
    fn clear_counts_and_numbering_goes_on() {
        let s = store(10, OverflowPolicy::DropOldest);
        let c: Arc<str> = "c".into();
        let seq = |e| match e {
            Enqueued::Stored(seq) => seq,
            Enqueued::Rejected => panic!("rejected"),
        };
        let last = (0..3)
            .map(|i| seq(s.enqueue(&c, Qos::AtLeastOnce, &msg(&i.to_string(), 0))))
            .max()
            .unwrap_or(0);
        assert_eq!(s.queued("c").0, 3);
        assert_eq!(s.clear("c"), 3);
        assert_eq!(s.queued("c"), (0, None));
        assert_eq!(s.bytes(), 0);
        assert_eq!(s.clear("c"), 0);
        // A connection's cursor past the deleted entries still finds the next one.
        assert!(seq(s.enqueue(&c, Qos::AtLeastOnce, &msg("next", 0))) > last);
    }

    #[test]
    fn order_ack_and_fetch_from() {
        let s = store(10, OverflowPolicy::DropOldest);
        let seqs: Vec<u64> = (0..5)
            .map(
                |i| match s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg(&i.to_string(), 0)) {
                    Enqueued::Stored(seq) => seq,
                    Enqueued::Rejected => panic!("rejected"),
                },
            )
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        s.ack("c", seqs[1]);
        let got: Vec<u64> = s.fetch("c", 0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(got, [seqs[0], seqs[2], seqs[3], seqs[4]]);
        let got: Vec<u64> = s.fetch("c", seqs[3], 1).iter().map(|e| e.seq).collect();
        assert_eq!(got, [seqs[3]]);
    }

    #[test]
    fn overflow_policies() {
        let s = store(2, OverflowPolicy::DropOldest);
        for i in 0..3 {
            s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg(&i.to_string(), 0));
        }
        let got: Vec<String> = s
            .fetch("c", 0, 10)
            .iter()
            .map(|e| String::from_utf8_lossy(&e.msg.payload).into_owned())
            .collect();
        assert_eq!(got, ["1", "2"]);
        let s = store(2, OverflowPolicy::DropNew);
        for i in 0..2 {
            s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg(&i.to_string(), 0));
        }
        assert_eq!(
            s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg("x", 0)),
            Enqueued::Rejected
        );
        assert_eq!(s.len("c"), 2);
    }

    #[test]
    fn total_cap_refuses_new_messages() {
        let s = MemoryOutbox::new(Limits {
            max_queued: 10,
            max_queued_bytes: 1 << 20,
            overflow: OverflowPolicy::DropOldest,
            max_total: 2,
            max_total_bytes: 1 << 30,
        });
        let a: Arc<str> = "a".into();
        let Enqueued::Stored(seq) = s.enqueue(&a, Qos::AtLeastOnce, &msg("1", 0)) else {
            panic!("not stored");
        };
        s.enqueue(&"b".into(), Qos::AtLeastOnce, &msg("2", 0));
        assert_eq!(
            s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg("3", 0)),
            Enqueued::Rejected
        );
        s.ack("a", seq);
        assert!(matches!(
            s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg("3", 0)),
            Enqueued::Stored(_)
        ));
    }

    #[test]
    fn expired_entries_are_skipped() {
        let s = store(10, OverflowPolicy::DropOldest);
        s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg("old", 1));
        s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg("new", 0));
        let got = s.fetch("c", 0, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].msg.payload[..], b"new");
    }

    /// Acknowledged and swept within the millisecond it was created: the next queue of the
    /// client must not start from the same clock reading.
    #[test]
    fn sequence_grows_across_a_queue_swept_in_the_same_millisecond() {
        let s = store(10, OverflowPolicy::DropOldest);
        let c: Arc<str> = "c".into();
        for _ in 0..50 {
            let Enqueued::Stored(first) = s.enqueue(&c, Qos::AtLeastOnce, &msg("a", 0)) else {
                panic!("not stored");
            };
            s.ack("c", first);
            s.sweep();
            let Enqueued::Stored(second) = s.enqueue(&c, Qos::AtLeastOnce, &msg("b", 0)) else {
                panic!("not stored");
            };
            assert!(second > first, "{second} after {first}");
            s.ack("c", second);
        }
    }

    #[test]
    fn sequence_grows_across_a_removed_queue() {
        let s = store(10, OverflowPolicy::DropOldest);
        let Enqueued::Stored(first) = s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg("a", 0)) else {
            panic!("not stored");
        };
        s.clear("c");
        s.sweep();
        assert_eq!(s.len("c"), 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let Enqueued::Stored(second) = s.enqueue(&"c".into(), Qos::AtLeastOnce, &msg("b", 0))
        else {
            panic!("not stored");
        };
        assert!(second > first);
    }

    fn sized(n: usize) -> Arc<Message> {
        msg(&"x".repeat(n - 1), 0)
    }

    #[test]
    fn byte_budget_per_client() {
        let limits = |overflow| Limits {
            max_queued: 100,
            max_queued_bytes: 3000,
            overflow,
            max_total: 100,
            max_total_bytes: 1 << 30,
        };
        let s = MemoryOutbox::new(limits(OverflowPolicy::DropOldest));
        let c: Arc<str> = "c".into();
        for _ in 0..5 {
            assert!(matches!(
                s.enqueue(&c, Qos::AtLeastOnce, &sized(1000)),
                Enqueued::Stored(_)
            ));
        }
        assert_eq!(
            s.len("c"),
            3,
            "the oldest give way to stay within 3000 bytes"
        );
        assert_eq!(s.bytes(), 3000);
        // A message over the whole budget still fits an emptied queue, alone.
        assert!(matches!(
            s.enqueue(&c, Qos::AtLeastOnce, &sized(5000)),
            Enqueued::Stored(_)
        ));
        assert_eq!((s.len("c"), s.bytes()), (1, 5000));
        s.clear("c");
        assert_eq!(s.bytes(), 0);

        let s = MemoryOutbox::new(limits(OverflowPolicy::DropNew));
        for _ in 0..3 {
            s.enqueue(&c, Qos::AtLeastOnce, &sized(1000));
        }
        assert_eq!(
            s.enqueue(&c, Qos::AtLeastOnce, &sized(10)),
            Enqueued::Rejected
        );
        let first = s.fetch("c", 0, 1)[0].seq;
        s.ack("c", first);
        assert_eq!(s.bytes(), 2000);
        assert!(matches!(
            s.enqueue(&c, Qos::AtLeastOnce, &sized(10)),
            Enqueued::Stored(_)
        ));
    }

    #[test]
    fn byte_budget_over_all_clients() {
        let s = MemoryOutbox::new(Limits {
            max_queued: 100,
            max_queued_bytes: 1 << 20,
            overflow: OverflowPolicy::DropOldest,
            max_total: 100,
            max_total_bytes: 2500,
        });
        assert!(matches!(
            s.enqueue(&"a".into(), Qos::AtLeastOnce, &sized(1000)),
            Enqueued::Stored(_)
        ));
        assert!(matches!(
            s.enqueue(&"b".into(), Qos::AtLeastOnce, &sized(1000)),
            Enqueued::Stored(_)
        ));
        assert_eq!(
            s.enqueue(&"c".into(), Qos::AtLeastOnce, &sized(1000)),
            Enqueued::Rejected
        );
        s.sweep();
        assert_eq!(s.bytes(), 2000);
        s.clear("a");
        assert!(matches!(
            s.enqueue(&"c".into(), Qos::AtLeastOnce, &sized(1000)),
            Enqueued::Stored(_)
        ));
    }
}
