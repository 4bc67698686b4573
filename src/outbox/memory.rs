//! In-process outbox: the embedded default. Lost on restart, said so in the README.

use std::collections::VecDeque;
use std::sync::Arc;

use dashmap::DashMap;

use super::{now_ms, Enqueued, Entry, Limits, Message};
use crate::codec::Qos;
use crate::config::OverflowPolicy;
use crate::metrics;

#[derive(Default)]
struct ClientOutbox {
    /// Last sequence number handed out.
    last_seq: u64,
    /// Highest sequence number written to the wire.
    sent: u64,
    attached: u32,
    entries: VecDeque<Entry>,
}

impl ClientOutbox {
    fn position(&self, seq: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&seq, |e| e.seq)
    }
}

/// In-process outbox: one `VecDeque` per client in a sharded map, so publishers to different
/// devices do not contend on one lock.
pub struct MemoryOutbox {
    clients: DashMap<Arc<str>, ClientOutbox>,
    limits: Limits,
}

impl MemoryOutbox {
    pub fn new(limits: Limits) -> MemoryOutbox {
        MemoryOutbox {
            clients: DashMap::new(),
            limits,
        }
    }

    pub(super) fn enqueue(&self, client: &str, qos: Qos, msg: &Arc<Message>) -> Enqueued {
        let mut ob = self.clients.entry(Arc::from(client)).or_default();
        if ob.entries.len() >= self.limits.max_queued {
            match self.limits.overflow {
                OverflowPolicy::DropNew => {
                    metrics::dropped(metrics::Drop::OutboxFullNew);
                    return Enqueued::Rejected;
                }
                OverflowPolicy::DropOldest => {
                    ob.entries.pop_front();
                    metrics::dropped(metrics::Drop::OutboxFullOldest);
                }
            }
        }
        ob.last_seq += 1;
        let seq = ob.last_seq;
        ob.entries.push_back(Entry {
            seq,
            qos,
            msg: msg.clone(),
        });
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
                ob.entries.remove(i);
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
                ob.entries.remove(i);
            }
        }
    }

    pub(super) fn mark_sent(&self, client: &str, seq: u64) {
        if let Some(mut ob) = self.clients.get_mut(client) {
            ob.sent = ob.sent.max(seq);
        }
    }

    pub(super) fn attach(&self, client: &str) -> u64 {
        let mut ob = self.clients.entry(Arc::from(client)).or_default();
        ob.attached += 1;
        ob.sent
    }

    pub(super) fn detach(&self, client: &str) {
        if let Some(mut ob) = self.clients.get_mut(client) {
            ob.attached = ob.attached.saturating_sub(1);
        }
    }

    pub(super) fn clear(&self, client: &str) {
        if let Some(mut ob) = self.clients.get_mut(client) {
            ob.entries.clear();
            ob.entries.shrink_to_fit();
        }
    }

    pub(super) fn len(&self, client: &str) -> usize {
        self.clients.get(client).map_or(0, |ob| ob.entries.len())
    }

    pub(super) fn sweep(&self) {
        let now = now_ms();
        self.clients.retain(|_, ob| {
            let before = ob.entries.len();
            ob.entries.retain(|e| !e.msg.is_expired(now));
            for _ in ob.entries.len()..before {
                metrics::dropped(metrics::Drop::Expired);
            }
            // An attached client's counter must keep counting: its connection's cursor
            // points past the numbers already handed out.
            ob.attached > 0 || !ob.entries.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn msg(p: &str, expires_at: u64) -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::copy_from_slice(p.as_bytes()),
            qos: Qos::AtLeastOnce,
            retain: false,
            expires_at,
        })
    }

    fn store(max: usize, overflow: OverflowPolicy) -> MemoryOutbox {
        MemoryOutbox::new(Limits {
            max_queued: max,
            overflow,
        })
    }

    #[test]
    fn order_ack_and_fetch_from() {
        let s = store(10, OverflowPolicy::DropOldest);
        for i in 0..5 {
            assert_eq!(
                s.enqueue("c", Qos::AtLeastOnce, &msg(&i.to_string(), 0)),
                Enqueued::Stored(i + 1)
            );
        }
        s.ack("c", 2);
        let seqs: Vec<u64> = s.fetch("c", 0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 3, 4, 5]);
        let seqs: Vec<u64> = s.fetch("c", 4, 1).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [4]);
    }

    #[test]
    fn overflow_policies() {
        let s = store(2, OverflowPolicy::DropOldest);
        for i in 0..3 {
            s.enqueue("c", Qos::AtLeastOnce, &msg(&i.to_string(), 0));
        }
        let seqs: Vec<u64> = s.fetch("c", 0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3]);
        let s = store(2, OverflowPolicy::DropNew);
        for i in 0..2 {
            s.enqueue("c", Qos::AtLeastOnce, &msg(&i.to_string(), 0));
        }
        assert_eq!(
            s.enqueue("c", Qos::AtLeastOnce, &msg("x", 0)),
            Enqueued::Rejected
        );
        assert_eq!(s.len("c"), 2);
    }

    #[test]
    fn expired_entries_are_skipped() {
        let s = store(10, OverflowPolicy::DropOldest);
        s.enqueue("c", Qos::AtLeastOnce, &msg("old", 1));
        s.enqueue("c", Qos::AtLeastOnce, &msg("new", 0));
        let got = s.fetch("c", 0, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].seq, 2);
    }

    #[test]
    fn sequence_survives_clear_while_attached() {
        let s = store(10, OverflowPolicy::DropOldest);
        s.attach("c");
        s.enqueue("c", Qos::AtLeastOnce, &msg("a", 0));
        s.clear("c");
        s.sweep();
        assert_eq!(
            s.enqueue("c", Qos::AtLeastOnce, &msg("b", 0)),
            Enqueued::Stored(2)
        );
    }
}
