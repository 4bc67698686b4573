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

use std::future::{ready, Future};
use std::sync::Arc;

use futures::future::Either;

use crate::config::{Config, OverflowPolicy};
// Re-exported while the session module still names them here.
pub use crate::message::{now_ms, packet_id, Message};
use crate::message::{ClientId, Qos};
use crate::metrics::{self, StoreOp};
use crate::receipts::{hooks, Event, ReceiptId, State};

pub use crate::redis::StoreError;
pub use memory::MemoryOutbox;
pub use redis::RedisOutbox;

/// One queued message for one client, delivered at `qos` (1 or 2).
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub qos: Qos,
    pub msg: Arc<Message>,
    /// Stored while a connection of the client was live (Redis store): it may be written
    /// to the wire without a sent watermark, and a later connection resends it with DUP.
    pub live: bool,
}

/// Where a client was connected when its message was stored (cluster nodes, Redis store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHint {
    pub node: Box<str>,
    pub inc: u64,
}

/// What an enqueue did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub outcome: Enqueued,
    /// Where the client is connected according to the route table, read with the store (a
    /// cluster node with the Redis store; `None` otherwise).
    pub route: Option<RouteHint>,
    /// Stored as live (see `Entry::live`).
    pub live: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Stored under this sequence number.
    Stored(u64),
    /// The outbox was full and the policy is `drop_new`: not stored (counted).
    Rejected,
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
    /// The newest entry when the connection started (Redis store): live entries up to it
    /// may have been sent by an earlier connection, so they go out with DUP = 1.
    pub replay_to: u64,
    /// Which copy of the client's keys this was read from (Redis: `Redis::lineage`). Acks
    /// name it: after a failover that lost writes, numbers the connection read may be
    /// newer entries' (`Outbox::ack`).
    pub lineage: u16,
}

/// What a connection does with its client's outbox (read, acknowledge, mark sent): a
/// narrow view of the store, without the calls that manage sessions and subscriptions.
#[derive(Clone, Copy)]
pub struct Outbox<'a>(&'a Store);

impl<'a> Outbox<'a> {
    pub fn new(store: &'a Store) -> Outbox<'a> {
        Outbox(store)
    }

    /// Calls cross the network: worth running many at once.
    pub fn is_remote(&self) -> bool {
        self.0.is_remote()
    }

    /// See `Store::fetch`.
    pub async fn fetch(
        &self,
        client: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.0.fetch(client, from, limit).await
    }

    /// See `Store::ack`.
    pub async fn ack(&self, client: &ClientId, seq: u64, lineage: u16) -> bool {
        self.0.ack(client, seq, lineage).await
    }

    /// Whether `client`'s keys are still the copy a connection attached to under `lineage`
    /// (`Attach::lineage`).
    pub fn is_current(&self, client: &str, lineage: u16) -> bool {
        match self.0 {
            Store::Memory(..) => true,
            Store::Redis(r, _) => r.lineage(client) == lineage,
        }
    }

    /// A persistent session's connection `conn` ended, having written entries up to `seq`:
    /// its next connection then knows exactly what was sent (Redis; see `Attach::replay_to`).
    pub async fn finish(&self, client: &ClientId, seq: u64, conn: u64) {
        if let Store::Redis(r, _) = self.0 {
            r.finish(client, seq, conn).await;
        }
    }

    /// See `Store::note`.
    pub async fn note(&self, client: &ClientId, seq: u64, lineage: u16, state: State) {
        self.0.note(client, seq, lineage, state).await
    }

    /// See `Store::mark_sent`.
    pub async fn mark_sent(
        &self,
        client: &ClientId,
        seq: u64,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.0.mark_sent(client, seq).await
    }
}

/// The store's gauges (`Store::outbox_sample`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OutboxSample {
    pub messages: u64,
    pub oldest_age_secs: f64,
    /// Redis store: persistent sessions in the store, and those with a route.
    pub sessions: Option<(u64, u64)>,
}

/// The broker's store. An enum rather than a trait object: two implementations, static
/// dispatch, `async fn` without boxing, and one place that shows what each does.
pub enum Store {
    /// With the receipt webhook's feed until the server takes it (`take_hook_feed`).
    Memory(MemoryOutbox, Option<HookFeed>),
    Redis(Box<RedisOutbox>, Option<HookFeed>),
}

type HookFeed = (hooks::Feed, Arc<tokio::sync::Notify>);

impl Store {
    /// The memory store, or with `redis` the Redis store on that connection. `node`: this
    /// node's id (the Redis store's receipt hook stream is the node's).
    pub fn open(config: &Config, redis: Option<crate::redis::Redis>, node: &str) -> Store {
        let limits = Limits {
            max_queued: config.session.max_queued_messages,
            max_queued_bytes: config.session.max_queued_bytes,
            overflow: config.session.overflow,
            max_total: config.store.max_messages,
            max_total_bytes: config.store.max_bytes,
        };
        let http = &config.http;
        let webhook = http.listen.is_some() && http.receipt_webhook.is_some();
        let wake = Arc::new(tokio::sync::Notify::new());
        match redis {
            None => {
                let queue = webhook.then(|| {
                    let q = hooks::MemQueue::new(
                        http.receipt_queue,
                        http.receipt_queue_bytes,
                        wake.clone(),
                    );
                    Arc::new(q)
                });
                Store::Memory(
                    MemoryOutbox::new(limits).with_receipts(http.receipt_ttl, queue.clone()),
                    queue.map(|q| (hooks::Feed::Memory(q), wake)),
                )
            }
            Some(r) => {
                let key = crate::redis::keys::hooks(node);
                let notes = redis::notes::Notes {
                    hook_sha: r.scripts().hook.get_hash().to_string(),
                    ttl_ms: http.receipt_ttl.as_millis() as u64,
                    hook: webhook.then(|| redis::notes::Hook {
                        key: key.clone(),
                        cap: http.receipt_queue,
                        wake: wake.clone(),
                    }),
                };
                let feed = webhook.then(|| {
                    let feed = hooks::Feed::Redis {
                        redis: r.clone(),
                        node: node.to_string(),
                        key,
                    };
                    (feed, wake)
                });
                Store::Redis(
                    Box::new(RedisOutbox::open(
                        r,
                        limits,
                        config.session.message_ttl,
                        config.store.redis_wait_replicas,
                        config.cluster.listen.is_some(),
                        config.server.max_packet_size + 64,
                        notes,
                        metrics::enabled() || http.listen.is_some(),
                    )),
                    feed,
                )
            }
        }
    }

    /// What the receipt webhook's poster reads, and what wakes it (`receipts::hooks`);
    /// `None` without a webhook. Taken once.
    pub fn take_hook_feed(&mut self) -> Option<HookFeed> {
        match self {
            Store::Memory(_, f) | Store::Redis(_, f) => f.take(),
        }
    }

    /// A tracked message's state changed: recorded, and a final state queued for the
    /// webhook. Best effort, like `ack`.
    pub async fn note(&self, client: &Arc<str>, seq: u64, lineage: u16, state: State) {
        match self {
            Store::Memory(m, _) => m.note(client, seq, state),
            Store::Redis(r, _) => {
                let id = ReceiptId {
                    client: client.clone(),
                    seq,
                    lineage,
                };
                r.note(Event {
                    id,
                    state,
                    at_ms: now_ms(),
                })
                .await
            }
        }
    }

    /// The state of a tracked message and when it changed (unix ms); `None` when unknown.
    pub async fn receipt(&self, id: &ReceiptId) -> Result<Option<(State, u64)>, StoreError> {
        match self {
            Store::Memory(m, _) => Ok(m.receipt(&id.client, id.seq)),
            Store::Redis(r, _) => r.receipt(id).await,
        }
    }

    /// A push with the collapse key `key` was stored as `seq`: the older entry with the same
    /// key is removed if it was never written to the device (then it is counted dropped,
    /// `reason="collapsed"`, and a tracked one noted `dropped`). A message already sent stays:
    /// the new one is queued behind it. Runs after the store, so a crash between the two
    /// leaves both messages, never neither. Returns the removed seq.
    pub async fn collapse(
        &self,
        client: &Arc<str>,
        key: &str,
        seq: u64,
        lineage: u16,
    ) -> Result<Option<u64>, StoreError> {
        let removed = match self {
            Store::Memory(m, _) => m.collapse(client, key, seq),
            Store::Redis(r, _) => r.collapse(client, key, seq).await?,
        };
        let Some((old, tracked)) = removed else {
            return Ok(None);
        };
        metrics::dropped(metrics::Drop::Collapsed);
        if tracked {
            self.note(client, old, lineage, State::Dropped).await;
        }
        Ok(Some(old))
    }

    /// The lineage of `client`'s keys now (`Attach::lineage`): what a receipt id names.
    pub fn lineage(&self, client: &str) -> u16 {
        match self {
            Store::Memory(..) => 0,
            Store::Redis(r, _) => r.lineage(client),
        }
    }

    /// Calls cross the network: worth running many at once.
    pub fn is_remote(&self) -> bool {
        matches!(self, Store::Redis(..))
    }

    /// Appends `msg` to `client`'s outbox. The append is submitted when this is called, not
    /// when the future is first polled: calls made in order are stored in order. `live`: a
    /// connection of the client is registered on this node now.
    pub fn enqueue(
        &self,
        client: &Arc<str>,
        qos: Qos,
        msg: &Arc<Message>,
        live: bool,
    ) -> impl Future<Output = Result<Stored, StoreError>> + Send + 'static {
        match self {
            Store::Memory(m, _) => {
                let started = metrics::sampled_clock();
                let outcome = m.enqueue(client, qos, msg);
                metrics::store_op(StoreOp::Enqueue, started);
                Either::Left(ready(Ok(Stored {
                    outcome,
                    route: None,
                    live: false,
                })))
            }
            Store::Redis(r, _) => {
                let started = metrics::clock();
                let stored = r.enqueue(client, qos, msg, live);
                Either::Right(async move {
                    let r = stored.await;
                    metrics::store_op(StoreOp::Enqueue, started);
                    r
                })
            }
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
            Store::Memory(m, _) => Ok(m.fetch(client, from, limit)),
            Store::Redis(r, _) => r.fetch(client, from, limit).await,
        }
    }

    /// The device acknowledged `seq`, read under `lineage` (`Attach::lineage`): delete it. A
    /// failure is logged and counted by the store, not returned: the entry comes back as a
    /// duplicate, never lost. False, and nothing deleted, if the store no longer serves the
    /// copy of the client's keys the entry was read from: the connection must end.
    /// Timed here for the memory store (one call in 64: `sampled_clock`); the Redis store's
    /// writer times the write itself.
    pub async fn ack(&self, client: &Arc<str>, seq: u64, lineage: u16) -> bool {
        match self {
            Store::Memory(m, _) => {
                let started = metrics::sampled_clock();
                m.ack(client, seq);
                metrics::store_op(StoreOp::Ack, started);
                true
            }
            Store::Redis(r, _) => r.ack(client, seq, lineage).await,
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
            Store::Memory(m, _) => {
                m.mark_sent(client, seq);
                None
            }
            Store::Redis(r, _) => Some(r.mark_sent(client, seq).await),
        }
    }

    /// A connection for `client` starts. `clean` drops its queued entries and stored
    /// subscriptions first; the sequence counter keeps counting.
    /// `conn`: the connection's id (`Broker::new_conn_id`), for `finish`.
    pub async fn attach(
        &self,
        client: &Arc<str>,
        clean: bool,
        conn: u64,
    ) -> Result<Attach, StoreError> {
        let started = metrics::clock();
        let r = self.attach_untimed(client, clean, conn).await;
        metrics::store_op(StoreOp::Attach, started);
        r
    }

    async fn attach_untimed(
        &self,
        client: &Arc<str>,
        clean: bool,
        conn: u64,
    ) -> Result<Attach, StoreError> {
        match self {
            Store::Memory(m, _) => {
                let sent_watermark = m.sent(client);
                if clean {
                    m.clear(client);
                }
                Ok(Attach {
                    sent_watermark,
                    session_present: false,
                    replay_to: 0,
                    lineage: 0,
                })
            }
            Store::Redis(r, _) => r.attach(client, clean, conn).await,
        }
    }

    /// A clean session ended: drop its entries (it stored no subscriptions: only persistent
    /// sessions do, and its CONNECT cleared the ones from before).
    pub async fn clear(&self, client: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(m, _) => {
                m.clear(client);
                Ok(())
            }
            Store::Redis(r, _) => r.clear(client).await,
        }
    }

    /// Empties `client`'s outbox (the backend's `DELETE /v1/clients/{id}/outbox`): every
    /// queued entry is dropped and counted (`reason="deleted"`), a tracked one noted
    /// `dropped`; returns how many. The
    /// session, its sequence counter and sent watermark stay. A connection already holding
    /// entries in its mailbox or in flight may still deliver those.
    pub async fn delete_outbox(&self, client: &str) -> Result<usize, StoreError> {
        let n = match self {
            // The memory store notes its tracked entries itself (`MemoryOutbox::clear`).
            Store::Memory(m, _) => m.clear(client),
            Store::Redis(r, _) => {
                let (n, tracked) = r.delete_all(client).await?;
                let client: Arc<str> = Arc::from(client);
                let lineage = r.lineage(&client);
                for seq in tracked {
                    self.note(&client, seq, lineage, State::Dropped).await;
                }
                n
            }
        };
        metrics::dropped_many(metrics::Drop::Deleted, n as u64);
        Ok(n)
    }

    /// The number of queued entries and the `born_us` of the oldest (`None` when empty, or
    /// when the oldest does not say).
    pub async fn queued(&self, client: &str) -> Result<(usize, Option<u64>), StoreError> {
        match self {
            Store::Memory(m, _) => Ok(m.queued(client)),
            Store::Redis(r, _) => r.queued(client).await,
        }
    }

    /// Number of queued entries (tests and metrics).
    pub async fn len(&self, client: &str) -> Result<usize, StoreError> {
        match self {
            Store::Memory(m, _) => Ok(m.len(client)),
            Store::Redis(r, _) => r.len(client).await,
        }
    }

    /// Waits (a bounded time) for the store writes queued so far: a draining node's acks.
    pub async fn flush(&self) {
        if let Store::Redis(r, _) = self {
            r.flush().await;
        }
    }

    /// The store's last probe round trip (Redis), in seconds.
    pub fn ping_secs(&self) -> Option<f64> {
        match self {
            Store::Memory(..) => None,
            Store::Redis(r, _) => Some(r.ping_secs()),
        }
    }

    /// What is queued: the memory store's own figures (a pass over its outboxes), or the
    /// Redis store's last store-wide sample (`None` before the first).
    pub fn outbox_sample(&self) -> Option<OutboxSample> {
        match self {
            Store::Memory(m, _) => Some(m.sample()),
            Store::Redis(r, _) => r.sample(),
        }
    }

    /// Periodic housekeeping: expire old entries, forget idle empty outboxes.
    pub async fn sweep(&self) {
        if let Store::Memory(m, _) = self {
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
            Store::Memory(..) => Ok(()),
            Store::Redis(r, _) => r.save_subscription(client, filter, qos).await,
        }
    }

    pub async fn remove_subscription(&self, client: &str, filter: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(..) => Ok(()),
            Store::Redis(r, _) => r.remove_subscription(client, filter).await,
        }
    }

    /// (client, filter, qos) of every stored subscription.
    pub async fn load_subscriptions(&self) -> Result<Vec<(String, String, Qos)>, StoreError> {
        match self {
            Store::Memory(..) => Ok(Vec::new()),
            Store::Redis(r, _) => r.load_subscriptions().await,
        }
    }

    /// Stored subscriptions of one persistent session.
    pub async fn client_subscriptions(
        &self,
        client: &str,
    ) -> Result<Vec<(String, Qos)>, StoreError> {
        match self {
            Store::Memory(..) => Ok(Vec::new()),
            Store::Redis(r, _) => r.client_subscriptions(client).await,
        }
    }

    /// The highest sequence number in each client's outbox (0 if empty). Only the Redis
    /// store is shared with other nodes, so only it can hold what this node was not told.
    pub async fn newest(&self, clients: &[&str]) -> Result<Vec<u64>, StoreError> {
        match self {
            Store::Memory(..) => Ok(vec![0; clients.len()]),
            Store::Redis(r, _) => r.newest(clients).await,
        }
    }

    /// Stores (or, with an empty payload, clears) the retained message of `msg.topic`.
    /// Submitted at call time, like `enqueue`.
    pub fn set_retained(
        &self,
        msg: &Message,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        match self {
            Store::Memory(..) => Either::Left(ready(Ok(()))),
            Store::Redis(r, _) => Either::Right(r.set_retained(msg)),
        }
    }

    /// Brings the store's keys to this version's layout (Redis; once per store, before the
    /// first node of this version serves).
    pub async fn upgrade(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(..) => Ok(()),
            Store::Redis(r, _) => r.upgrade().await,
        }
    }

    pub async fn load_retained(&self) -> Result<Vec<Message>, StoreError> {
        match self {
            Store::Memory(..) => Ok(Vec::new()),
            Store::Redis(r, _) => r.load_retained().await,
        }
    }
}
