//! The outbox: per-client queues of QoS 1/2 messages that wait for the device's PUBACK.
//!
//! The outbox is the only source of truth for an undelivered message (ARCHITECTURE.md
//! section 1). Everything else that carries a message towards a device (a connection's
//! mailbox, later the node-to-node link) is a hint that makes delivery fast; losing a hint
//! delays a message until the connection re-reads its outbox, it never loses one.
//!
//! Each client's entries carry a per-client sequence number. It orders delivery, names the
//! entry for acknowledgement, and gives the MQTT packet id (`seq % 65535 + 1`), so a resend
//! after reconnecting (to any node) reuses the original packet id. The `sent` watermark is the
//! highest sequence ever written to the wire: on a new connection, entries at or below it are
//! resent with DUP = 1.
//!
//! `Store` is the interface the broker uses, with two implementations of the same semantics:
//! `MemoryOutbox` (the embedded default, lost on restart) and `RedisOutbox` (durable, shared
//! by the nodes of a cluster). The store also keeps what a restarted node needs besides
//! outboxes: subscriptions of persistent sessions and retained messages.

mod memory;
mod redis;
mod resp;

use std::future::{ready, Future};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::Either;

use bytes::Bytes;

use crate::codec::Qos;
use crate::config::{Config, OverflowPolicy, StoreKind};

pub use memory::MemoryOutbox;
pub use redis::{key as redis_key, RedisOutbox};

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

    /// What the byte budgets count for a message: its topic and payload (the fixed costs of
    /// a queued message are bounded by the message counts next to each byte budget).
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
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

/// Where a client was connected when its message was stored (cluster nodes, Redis store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHint {
    pub node: Box<str>,
    pub inc: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Stored under this sequence number.
    Stored(u64),
    /// The outbox was full and the policy is `drop_new`: not stored (counted).
    Rejected,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_queued: usize,
    /// Bytes (`Message::size`) per client outbox.
    pub max_queued_bytes: usize,
    pub overflow: OverflowPolicy,
    /// Messages held by the memory store over all clients.
    pub max_total: usize,
    /// Bytes held by the memory store over all clients.
    pub max_total_bytes: usize,
}

/// What the store knows about a client when a connection starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attach {
    /// Entries at or below this sequence number may have been sent before: DUP = 1.
    pub sent_watermark: u64,
    /// The store holds a persistent session for the client (survives a restart).
    pub session_present: bool,
}

/// The broker's store. An enum rather than a trait object: two implementations, static
/// dispatch, `async fn` without boxing, and one place that shows what each does.
pub enum Store {
    Memory(MemoryOutbox),
    Redis(Box<RedisOutbox>),
}

impl Store {
    pub async fn open(config: &Config) -> Result<Store, StoreError> {
        let limits = Limits {
            max_queued: config.session.max_queued_messages,
            max_queued_bytes: config.session.max_queued_bytes,
            overflow: config.session.overflow,
            max_total: config.store.max_messages,
            max_total_bytes: config.store.max_bytes,
        };
        Ok(match config.store.kind {
            StoreKind::Memory => Store::Memory(MemoryOutbox::new(limits)),
            StoreKind::Redis => Store::Redis(Box::new(
                RedisOutbox::connect(
                    &config.store.redis_url,
                    config.store.redis_ca.as_deref(),
                    limits,
                    config.session.message_ttl,
                    config.store.redis_wait_replicas,
                    config.cluster.listen.is_some(),
                )
                .await?,
            )),
        })
    }

    /// Calls cross the network: worth running many at once.
    pub fn is_remote(&self) -> bool {
        matches!(self, Store::Redis(_))
    }

    /// Appends `msg` to `client`'s outbox. The append is submitted when this is called, not
    /// when the future is first polled: calls made in order are stored in order.
    pub fn enqueue(
        &self,
        client: &Arc<str>,
        qos: Qos,
        msg: &Arc<Message>,
    ) -> impl Future<Output = Result<Enqueued, StoreError>> + Send + 'static {
        match self {
            Store::Memory(m) => Either::Left(ready(Ok(m.enqueue(client, qos, msg)))),
            Store::Redis(r) => Either::Right(r.enqueue(client, qos, msg)),
        }
    }

    /// `enqueue`, and where the client is connected according to the route table, read
    /// right after the store (a cluster node with the Redis store; `None` otherwise).
    pub fn enqueue_routed(
        &self,
        client: &Arc<str>,
        qos: Qos,
        msg: &Arc<Message>,
    ) -> impl Future<Output = Result<(Enqueued, Option<RouteHint>), StoreError>> + Send + 'static
    {
        match self {
            Store::Memory(m) => Either::Left(ready(Ok((m.enqueue(client, qos, msg), None)))),
            Store::Redis(r) => Either::Right(r.enqueue_routed(client, qos, msg)),
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
            Store::Redis(r) => r.fetch(client, from, limit).await,
        }
    }

    /// The device acknowledged `seq`: delete it. A failure is logged and counted by the
    /// store, not returned: the entry comes back as a duplicate, never lost.
    pub async fn ack(&self, client: &Arc<str>, seq: u64) {
        match self {
            Store::Memory(m) => m.ack(client, seq),
            Store::Redis(r) => r.ack(client, seq).await,
        }
    }

    /// `seq` is about to be written to the wire. With Redis the PUBLISH must wait for the
    /// returned receiver: the watermark is written ahead, so that a resend after a crash of
    /// this node carries DUP = 1 (ARCHITECTURE.md 1.4). Best effort, like `ack`.
    pub async fn mark_sent(
        &self,
        client: &Arc<str>,
        seq: u64,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        match self {
            Store::Memory(m) => {
                m.mark_sent(client, seq);
                None
            }
            Store::Redis(r) => Some(r.mark_sent(client, seq).await),
        }
    }

    /// A connection for `client` starts. `clean` drops its queued entries and stored
    /// subscriptions first; the sequence counter keeps counting.
    pub async fn attach(&self, client: &Arc<str>, clean: bool) -> Result<Attach, StoreError> {
        match self {
            Store::Memory(m) => {
                let sent_watermark = m.sent(client);
                if clean {
                    m.clear(client);
                }
                Ok(Attach {
                    sent_watermark,
                    session_present: false,
                })
            }
            Store::Redis(r) => r.attach(client, clean).await,
        }
    }

    /// A clean session ended: drop its entries and stored subscriptions.
    pub async fn clear(&self, client: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.clear(client);
                Ok(())
            }
            Store::Redis(r) => r.clear(client).await,
        }
    }

    /// Number of queued entries (tests and metrics).
    pub async fn len(&self, client: &str) -> Result<usize, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.len(client)),
            Store::Redis(r) => r.len(client).await,
        }
    }

    /// Periodic housekeeping: expire old entries, forget idle empty outboxes.
    pub async fn sweep(&self) {
        if let Store::Memory(m) = self {
            m.sweep()
        }
    }

    /// Subscriptions of persistent sessions, so a restarted node has them.
    pub async fn save_subscription(
        &self,
        client: &str,
        filter: &str,
        qos: Qos,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => r.save_subscription(client, filter, qos).await,
        }
    }

    pub async fn remove_subscription(&self, client: &str, filter: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => r.remove_subscription(client, filter).await,
        }
    }

    /// (client, filter, qos) of every stored subscription.
    pub async fn load_subscriptions(&self) -> Result<Vec<(String, String, Qos)>, StoreError> {
        match self {
            Store::Memory(_) => Ok(Vec::new()),
            Store::Redis(r) => r.load_subscriptions().await,
        }
    }

    /// Stored subscriptions of one persistent session.
    pub async fn client_subscriptions(
        &self,
        client: &str,
    ) -> Result<Vec<(String, Qos)>, StoreError> {
        match self {
            Store::Memory(_) => Ok(Vec::new()),
            Store::Redis(r) => r.client_subscriptions(client).await,
        }
    }

    pub fn redis(&self) -> Option<&RedisOutbox> {
        match self {
            Store::Redis(r) => Some(r),
            Store::Memory(_) => None,
        }
    }

    /// Stores (or, with an empty payload, clears) the retained message of `msg.topic`.
    /// Submitted at call time, like `enqueue`.
    pub fn set_retained(
        &self,
        msg: &Message,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        match self {
            Store::Memory(_) => Either::Left(ready(Ok(()))),
            Store::Redis(r) => Either::Right(r.set_retained(msg)),
        }
    }

    pub async fn load_retained(&self) -> Result<Vec<Message>, StoreError> {
        match self {
            Store::Memory(_) => Ok(Vec::new()),
            Store::Redis(r) => r.load_retained().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_never_zero() {
        assert_eq!(packet_id(0), 1);
        assert_eq!(packet_id(65534), 65535);
        assert_eq!(packet_id(65535), 1);
    }
}
