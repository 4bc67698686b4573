//! The outbox: per-client queues of QoS 1/2 messages that wait for the device's PUBACK.
//!
//! The outbox is the only source of truth for an undelivered message (design.md section 1).
//! Everything else that carries a message towards a device (a connection's mailbox, later the
//! node-to-node link) is a hint that makes delivery fast; losing a hint delays a message until
//! the connection re-reads its outbox, it never loses one.
//!
//! Each client's entries carry a per-client sequence number. It orders delivery, names the
//! entry for acknowledgement, and gives the MQTT packet id (`seq % 65535 + 1`), so a resend
//! after reconnecting (to any node) reuses the original packet id. The `sent` watermark is the
//! highest sequence ever written to the wire: on a new connection, entries at or below it are
//! resent with DUP = 1.
//!
//! `Store` is the interface the broker uses; `MemoryOutbox` is the in-process implementation
//! (the embedded default, lost on restart). A durable implementation slots in as another
//! `Store` variant without touching the session code.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashMap;

use crate::codec::Qos;
use crate::config::OverflowPolicy;
use crate::metrics;

/// A message as routed inside Herald. Shared (`Arc`) between all receivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    /// Unix milliseconds after which the message is dropped undelivered; 0 = never.
    pub expires_at: u64,
}

impl Message {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at != 0 && self.expires_at <= now_ms
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One queued message for one client, delivered at `qos` (1 or 2).
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub qos: Qos,
    pub msg: Arc<Message>,
}

/// MQTT packet id for an outbox sequence number: never 0, and the same on every node.
pub fn packet_id(seq: u64) -> u16 {
    (seq % 65535) as u16 + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Stored under this sequence number.
    Stored(u64),
    /// The outbox was full and the policy is `drop_new`: not stored (counted).
    Rejected,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_queued: usize,
    pub overflow: OverflowPolicy,
}

/// The broker's store. An enum rather than a trait object: two implementations, static
/// dispatch, and `async fn` without boxing.
pub enum Store {
    Memory(MemoryOutbox),
}

impl Store {
    pub async fn enqueue(
        &self,
        client: &str,
        qos: Qos,
        msg: &Arc<Message>,
    ) -> Result<Enqueued, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.enqueue(client, qos, msg)),
        }
    }

    /// Entries with `seq >= from`, in order, at most `limit`. Expired ones are removed.
    pub async fn fetch(
        &self,
        client: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.fetch(client, from, limit)),
        }
    }

    /// The device acknowledged `seq`: delete it.
    pub async fn ack(&self, client: &str, seq: u64) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.ack(client, seq);
                Ok(())
            }
        }
    }

    /// `seq` was written to the wire.
    pub async fn mark_sent(&self, client: &str, seq: u64) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.mark_sent(client, seq);
                Ok(())
            }
        }
    }

    /// A connection for `client` starts: returns the sent watermark (for DUP) and keeps the
    /// client's sequence counter alive while attached.
    pub async fn attach(&self, client: &str) -> Result<u64, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.attach(client)),
        }
    }

    pub async fn detach(&self, client: &str) {
        match self {
            Store::Memory(m) => m.detach(client),
        }
    }

    /// Drop every queued entry (clean session). The sequence counter keeps counting.
    pub async fn clear(&self, client: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.clear(client);
                Ok(())
            }
        }
    }

    /// Number of queued entries (tests and metrics).
    pub async fn len(&self, client: &str) -> Result<usize, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.len(client)),
        }
    }

    /// Periodic housekeeping: expire old entries, forget idle empty outboxes.
    pub async fn sweep(&self) {
        match self {
            Store::Memory(m) => m.sweep(),
        }
    }
}

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

    fn enqueue(&self, client: &str, qos: Qos, msg: &Arc<Message>) -> Enqueued {
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

    fn fetch(&self, client: &str, from: u64, limit: usize) -> Vec<Entry> {
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

    fn ack(&self, client: &str, seq: u64) {
        if let Some(mut ob) = self.clients.get_mut(client) {
            if let Ok(i) = ob.position(seq) {
                ob.entries.remove(i);
            }
        }
    }

    fn mark_sent(&self, client: &str, seq: u64) {
        if let Some(mut ob) = self.clients.get_mut(client) {
            ob.sent = ob.sent.max(seq);
        }
    }

    fn attach(&self, client: &str) -> u64 {
        let mut ob = self.clients.entry(Arc::from(client)).or_default();
        ob.attached += 1;
        ob.sent
    }

    fn detach(&self, client: &str) {
        if let Some(mut ob) = self.clients.get_mut(client) {
            ob.attached = ob.attached.saturating_sub(1);
        }
    }

    fn clear(&self, client: &str) {
        if let Some(mut ob) = self.clients.get_mut(client) {
            ob.entries.clear();
            ob.entries.shrink_to_fit();
        }
    }

    fn len(&self, client: &str) -> usize {
        self.clients.get(client).map_or(0, |ob| ob.entries.len())
    }

    fn sweep(&self) {
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

    #[test]
    fn packet_ids_never_zero() {
        assert_eq!(packet_id(0), 1);
        assert_eq!(packet_id(65534), 65535);
        assert_eq!(packet_id(65535), 1);
    }
}
