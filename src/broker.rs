//! The broker: shared state of one node and the publish path.
//!
//! A publish is resolved to receivers (the owner of a push topic, or the subscription table's matches),
//! stored in each receiver's outbox when its QoS is above 0, and only then hinted to the
//! receiver's live connection through its mailbox. `publish` returns after the stores, so
//! the caller's PUBACK means "in the outbox" (ARCHITECTURE.md 1.1, store before ack).
//!
//! The client table maps a client id to its live connection (if any) and, for a persistent
//! session that is offline, the protocol state that must survive it (QoS 2 packet ids).
//! Takeover waits for the old connection to finish so that its will and session state are
//! settled before the new connection starts.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::future::BoxFuture;

use crate::auth::Auth;
use crate::cluster::{self, Claim, Cluster};
use crate::config::Config;
use crate::keepalive::Deadlines;
use crate::mailbox::{Delivery, Kick, Limits as MailboxLimits, Mailbox};
use crate::memguard::MemGuard;
use crate::message::{now_ms, ClientId, Message, Qos};
use crate::metrics;
use crate::outbox::{Enqueued, Outbox, Store, StoreError, Stored};
use crate::retained::Retained;
use crate::subscriptions::Subscriptions;
use crate::topic::PushTemplate;

/// Protocol state of a persistent session that outlives its connection.
#[derive(Debug, Default)]
pub struct SessionData {
    /// Inbound QoS 2 packet ids answered with PUBREC, waiting for PUBREL.
    pub incoming_qos2: HashSet<u16>,
    /// Outbound QoS 2 packet ids released with PUBREL, waiting for PUBCOMP.
    pub awaiting_pubcomp: Vec<u16>,
}

struct ClientState {
    conn: Option<Arc<Mailbox>>,
    conn_id: u64,
    /// The last connection asked for a persistent session.
    persistent: bool,
    saved: Option<Box<SessionData>>,
    /// Cluster: the route epoch of the current connection, or, while its claim is in flight
    /// (`CLAIMING` set), the highest epoch a kick named meanwhile. One word instead of two:
    /// every client has an entry.
    route: u64,
}

const CLAIMING: u64 = 1 << 63;

impl ClientState {
    /// The route epoch; 0 while the claim is in flight (or without a cluster).
    fn epoch(&self) -> u64 {
        if self.route & CLAIMING != 0 {
            0
        } else {
            self.route
        }
    }

    /// While the claim is in flight: the highest epoch a kick named.
    fn kick_floor(&self) -> u64 {
        if self.route & CLAIMING != 0 {
            self.route & !CLAIMING
        } else {
            0
        }
    }
}

/// `Broker::census`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Census {
    pub online: usize,
    pub online_persistent: usize,
    /// Persistent sessions this node keeps without a connection (the memory store's).
    pub offline: usize,
    pub mailbox_bytes: usize,
}

/// What a new connection starts with.
pub struct Attached {
    pub session_present: bool,
    /// QoS 2 state carried over; `None` while there is none (most sessions never use QoS 2).
    pub data: Option<Box<SessionData>>,
    /// Outbox entries at or below this sequence number may have been sent before: DUP = 1.
    pub sent_watermark: u64,
    /// Live outbox entries at or below this one may have been sent before (`Attach`).
    pub replay_to: u64,
    /// The copy of the client's keys read (`Attach::lineage`).
    pub lineage: u16,
}

pub struct Broker {
    config: Config,
    subscriptions: Subscriptions,
    retained: Retained,
    store: Store,
    push: Option<PushTemplate>,
    clients: DashMap<ClientId, ClientState>,
    next_conn_id: AtomicU64,
    incarnation: u64,
    cluster: Option<Arc<Cluster>>,
    /// This node's name in answers to backends (`node_id`).
    node: Arc<str>,
    /// Who may connect and what they may do.
    auth: Arc<Auth>,
    guard: MemGuard,
    /// Connections by keepalive deadline.
    deadlines: Deadlines,
    /// Unix ms from which silence counts against a client's keepalive: moved forward after
    /// the node itself stalled, and while the memory guard holds publishers' sockets unread,
    /// so that no client is cut off for the node's own pause.
    silence_from: AtomicU64,
}

/// How long a new connection waits for the one it replaces to finish its cleanup.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);

impl Broker {
    /// Loads what the store keeps (subscriptions, retained messages). In a cluster a
    /// persistent session's subscriptions are loaded by the node it connects to.
    pub async fn open(
        config: Config,
        store: Store,
        cluster: Option<Arc<Cluster>>,
        auth: Arc<Auth>,
    ) -> Result<Broker, StoreError> {
        store.upgrade().await?;
        let subscriptions = Subscriptions::default();
        if cluster.is_none() {
            for (client, filter, qos) in store.load_subscriptions().await? {
                subscriptions.subscribe(&Arc::from(client), &filter, qos);
            }
        }
        let retained = Retained::default();
        for msg in store.load_retained().await? {
            retained.retain(&Arc::new(msg));
        }
        let node = match &cluster {
            Some(c) => c.id.clone(),
            None => Arc::from(
                config
                    .cluster
                    .node_id
                    .clone()
                    .unwrap_or_else(crate::server::hostname),
            ),
        };
        Ok(Broker {
            node,
            push: config
                .push
                .enabled
                .then(|| PushTemplate::new(&config.push.topic_template)),
            store,
            subscriptions,
            retained,
            clients: DashMap::new(),
            next_conn_id: AtomicU64::new(1),
            incarnation: now_ms() ^ u64::from(std::process::id()) << 40,
            guard: MemGuard::new(config.server.max_memory),
            silence_from: AtomicU64::new(0),
            deadlines: Deadlines::default(),
            config,
            cluster,
            auth,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Who may connect and what they may do.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The outbox store (its periodic sweep, tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What a connection does with its client's outbox (read, acknowledge, mark sent). Not
    /// carried in each session: one more pointer in an idle connection's task moves it into
    /// tokio's next allocation size, 128 bytes more per connection (`tests/footprint.rs`).
    pub fn outbox(&self) -> Outbox<'_> {
        Outbox::new(&self.store)
    }

    /// The memory guard (`memguard`).
    pub fn guard(&self) -> &MemGuard {
        &self.guard
    }

    /// Forgives every client's silence up to now (see `silence_from`).
    pub fn forgive_silence(&self) {
        self.silence_from.fetch_max(now_ms(), Ordering::Relaxed);
    }

    /// Wakes every connection (the memory guard let go: publishers' sockets are read again).
    pub fn wake_all(&self) {
        for e in self.clients.iter() {
            if let Some(mb) = &e.conn {
                mb.wake();
            }
        }
    }

    /// A connection's id (its mailbox holds it).
    /// Unique and increasing, and also when the connection started, in unix µs (a burst
    /// of connects may run a few µs ahead of the clock): what a message born before it is
    /// a replay on, at no cost in the connection's own state, which every idle connection
    /// pays for (`tests/footprint.rs`).
    pub fn new_conn_id(&self) -> u64 {
        let now = crate::message::now_us();
        let prev = self
            .next_conn_id
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(p.max(now.saturating_sub(1)) + 1)
            })
            .unwrap_or(now);
        prev.max(now.saturating_sub(1)) + 1
    }

    /// A unique id for a client that connected with an empty one.
    pub fn assign_client_id(&self) -> String {
        let n = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        format!("herald-{:x}-{n}", self.incarnation)
    }

    /// Registers a new connection for `client`, taking over any older one.
    pub async fn attach(
        &self,
        client: &ClientId,
        clean: bool,
        mailbox: Arc<Mailbox>,
    ) -> Result<Attached, StoreError> {
        let conn_id = mailbox.conn_id();
        let old = {
            let mut e = self.clients.entry(client.clone()).or_insert(ClientState {
                conn: None,
                conn_id: 0,
                persistent: false,
                saved: None,
                route: CLAIMING,
            });
            e.conn_id = conn_id;
            e.route = CLAIMING;
            e.conn.replace(mailbox.clone())
        };
        self.deadlines
            .watch(&mailbox, self.silence_from.load(Ordering::Relaxed));
        if let Some(old) = old {
            metrics::takeover();
            if crate::lograte::allow(crate::lograte::Reason::Takeover) {
                tracing::info!(client = %client, "takeover: a new connection replaces the client's current one");
            }
            old.kick(Kick::Takeover);
            if tokio::time::timeout(TAKEOVER_WAIT, old.wait_done())
                .await
                .is_err()
            {
                tracing::warn!(client = %client, "previous connection did not finish in time");
            }
        }
        let (existed, saved) = match self.clients.get_mut(client) {
            Some(mut e) => {
                let existed = e.persistent;
                e.persistent = !clean;
                (existed, e.saved.take())
            }
            None => (false, None),
        };
        let claimed = match &self.cluster {
            Some(c) => c.claim(client).await.map(Some),
            None => Ok(None),
        };
        let stored = match &claimed {
            Err(e) => Err(e.clone()),
            Ok(_) => self.store.attach(client, clean, conn_id).await,
        };
        let stored = match stored {
            Ok(a) => {
                if clean {
                    self.subscriptions.unsubscribe_all(client);
                }
                a
            }
            Err(e) => {
                // Undo the registration so that the refused client leaves no trace.
                if let Some(mut st) = self.clients.get_mut(client) {
                    if st.conn_id == conn_id {
                        st.conn = None;
                        st.persistent = existed;
                        st.saved = saved;
                    }
                }
                self.clients
                    .remove_if(client, |_, st| st.conn_id == conn_id && !st.persistent);
                return Err(e);
            }
        };
        if let Ok(Some(claim)) = claimed {
            self.claimed(client, conn_id, &mailbox, claim).await;
            if !clean {
                if let Err(e) = self.load_subscriptions(client).await {
                    // Refused after the claim: end it as a connection that closed at once,
                    // or the table would keep a mailbox nobody reads.
                    self.detach(client, conn_id, clean, saved).await;
                    return Err(e);
                }
            }
        }
        Ok(Attached {
            session_present: !clean && (existed || stored.session_present),
            data: saved.filter(|_| !clean),
            sent_watermark: stored.sent_watermark,
            replay_to: stored.replay_to,
            lineage: stored.lineage,
        })
    }

    /// Cluster: this node now owns `client` at `claim.epoch`; tell the previous owner.
    async fn claimed(&self, client: &ClientId, conn_id: u64, mailbox: &Mailbox, claim: Claim) {
        let Some(c) = &self.cluster else {
            return;
        };
        let kicked_meanwhile = match self.clients.get_mut(client) {
            Some(mut e) if e.conn_id == conn_id => {
                let floor = e.kick_floor();
                e.route = claim.epoch & !CLAIMING;
                floor >= claim.epoch
            }
            _ => false,
        };
        if kicked_meanwhile {
            metrics::remote_kick();
            mailbox.kick(Kick::Takeover);
        }
        if let Some(prev) = claim.previous {
            c.kick_previous(client, &prev).await;
        }
    }

    /// Cluster: a persistent session's subscriptions follow it to the node it connects to.
    async fn load_subscriptions(&self, client: &ClientId) -> Result<(), StoreError> {
        let mut new_filter = false;
        for (filter, qos) in self.store.client_subscriptions(client).await? {
            new_filter |= self.subscriptions.subscribe(client, &filter, qos);
        }
        if new_filter {
            self.interest_changed();
        }
        Ok(())
    }

    fn interest_changed(&self) {
        if let Some(c) = &self.cluster {
            c.interest_changed();
        }
    }

    /// Cluster: `client` connected to another node at an epoch after `epoch`. Close the
    /// connection here unless it is newer, and forget the session: it lives there now.
    fn kick_if_older(&self, client: &str, epoch: u64) {
        let forget = {
            let Some(mut e) = self.clients.get_mut(client) else {
                return;
            };
            if e.epoch() == 0 {
                // Our claim is still in flight: decide when it returns.
                e.route = CLAIMING | e.kick_floor().max(epoch & !CLAIMING);
                return;
            }
            if e.epoch() > epoch {
                return;
            }
            e.persistent = false;
            e.saved = None;
            match &e.conn {
                Some(mb) => {
                    metrics::remote_kick();
                    if crate::lograte::allow(crate::lograte::Reason::Takeover) {
                        tracing::info!(client = %client, "takeover: the client connected to another node");
                    }
                    mb.kick(Kick::Takeover);
                    false
                }
                None => true,
            }
        };
        if forget {
            self.clients
                .remove_if(client, |_, e| e.conn.is_none() && e.epoch() <= epoch);
        }
        if self.subscriptions.unsubscribe_all(client) {
            self.interest_changed();
        }
    }

    /// Cluster: a peer stored a message for `client` and says it is connected here.
    fn take_forward(&self, client: &str, seq: u64, qos: Qos, msg: Arc<Message>) {
        if let Some(mb) = self.mailbox(client) {
            let d = match qos {
                Qos::AtMostOnce => Delivery::Direct(msg),
                // The peer read the route with the store: the entry is live.
                _ => Delivery::Stored {
                    seq,
                    qos,
                    msg,
                    live: true,
                },
            };
            mb.push(d, self.mailbox_limits());
        }
    }

    /// A connection ended. Only the connection that still owns the client id removes state.
    pub async fn detach(
        &self,
        client: &ClientId,
        conn_id: u64,
        clean: bool,
        data: Option<Box<SessionData>>,
    ) {
        let mut owner = false;
        let mut moved = false;
        let mut epoch = 0;
        if let Some(mut e) = self.clients.get_mut(client) {
            if e.conn_id == conn_id {
                owner = true;
                e.conn = None;
                epoch = e.epoch();
                // A persistent session that connected to another node meanwhile.
                moved = !clean && !e.persistent;
            }
            if !clean && e.persistent {
                e.saved = data;
            }
        }
        if owner && moved {
            self.clients
                .remove_if(client, |_, e| e.conn_id == conn_id && e.conn.is_none());
            return;
        }
        if owner && clean {
            let removed = self
                .clients
                .remove_if(client, |_, e| e.conn_id == conn_id && e.conn.is_none());
            if removed.is_some() {
                if self.subscriptions.unsubscribe_all(client) {
                    self.interest_changed();
                }
                let cleared = match &self.cluster {
                    // Only while the route is still ours: the client may already be on
                    // another node with a new clean session.
                    Some(c) => match c.release(client, epoch, true).await {
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    },
                    None => self.store.clear(client).await,
                };
                if let Err(e) = cleared {
                    tracing::warn!(client = %client, error = %e, "could not clear outbox");
                }
            }
        }
    }

    pub fn mailbox_limits(&self) -> MailboxLimits {
        MailboxLimits {
            count: self.config.session.max_mailbox,
            bytes: self.config.session.max_mailbox_bytes,
        }
    }

    fn mailbox(&self, client: &str) -> Option<Arc<Mailbox>> {
        self.clients.get(client).and_then(|e| e.conn.clone())
    }

    /// SUBSCRIBE for one filter: the granted QoS, or 0x80. A persistent session's
    /// subscription is stored before it is granted.
    pub async fn subscribe(
        &self,
        client: &ClientId,
        persistent: bool,
        filter: &str,
        qos: Qos,
    ) -> Result<u8, StoreError> {
        if let Some(owner) = self.push.as_ref().and_then(|p| p.owner_of_filter(filter)) {
            // The push subscription is implicit; a client may name its own, never another's.
            return Ok(if owner == &**client {
                qos.min(Qos::AtLeastOnce) as u8
            } else {
                0x80
            });
        }
        let (held, count) = self.subscriptions.holds(client, filter);
        if !held && count >= self.config.session.max_subscriptions {
            metrics::limit_hit("session_max_subscriptions");
            return Ok(0x80);
        }
        if persistent {
            self.store.save_subscription(client, filter, qos).await?;
        }
        if self.subscriptions.subscribe(client, filter, qos) {
            self.interest_changed();
        }
        Ok(qos as u8)
    }

    pub async fn unsubscribe(
        &self,
        client: &ClientId,
        persistent: bool,
        filter: &str,
    ) -> Result<(), StoreError> {
        if self.subscriptions.unsubscribe(client, filter) {
            self.interest_changed();
        }
        if persistent {
            self.store.remove_subscription(client, filter).await?;
        }
        Ok(())
    }

    /// The retained messages matching a new subscription: those delivered at QoS 1/2 are
    /// stored in the client's outbox (RETAIN set) before this returns; the QoS 0 ones are
    /// returned for the connection to write as its write buffer has room.
    pub async fn send_retained(
        self: &Arc<Self>,
        client: &ClientId,
        filter: &str,
        granted: Qos,
    ) -> Result<Vec<Arc<Message>>, StoreError> {
        let mut qos0 = Vec::new();
        let mut stores = Vec::new();
        for msg in self.retained.matching(filter, now_ms()) {
            match msg.qos.min(granted) {
                Qos::AtMostOnce => qos0.push(msg),
                qos => stores.push(self.deliver(client.clone(), qos, msg, false)),
            }
        }
        futures::future::try_join_all(stores).await?;
        Ok(qos0)
    }

    /// The push topics' template; `None` when `push.enabled` is off.
    pub fn push_template(&self) -> Option<&PushTemplate> {
        self.push.as_ref()
    }

    /// Resolves receivers for a message from a client (or a will) and stores it for each. Every store is submitted
    /// before this returns, so messages published in order are stored in order however the
    /// futures are polled. The future resolves once every receiver's outbox holds the
    /// message; an error means some outbox may not, and the publisher must not be
    /// acknowledged.
    pub fn publish(
        self: &Arc<Self>,
        mut msg: Message,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        self.stamp_expiry(&mut msg);
        if let Some(owner) = self.push.as_ref().and_then(|p| p.client_of(&msg.topic)) {
            let stored = self.push_to(Arc::from(owner), msg);
            return Box::pin(async move { stored.await.map(|_| ()) });
        }
        let forwarded = self.cluster.as_ref().and_then(|c| c.forward_publish(&msg));
        let retained = msg.retain.then(|| {
            let retained = Arc::new(msg.clone());
            self.retained.retain(&retained);
            msg.retain = false;
            self.store.set_retained(&retained)
        });
        let deliveries = self.deliver_local(Arc::new(msg), forwarded.is_none());
        Box::pin(async move {
            if let Some(r) = retained {
                r.await?;
            }
            if let Some(f) = forwarded {
                f.await;
            }
            futures::future::try_join_all(deliveries).await.map(|_| ())
        })
    }

    /// A message on a push topic (the caller checked: `PushTemplate::client_of`), stored
    /// in its device's outbox like `publish` does; resolves to its sequence number there
    /// (`None`: QoS 0, or refused by a full outbox), which names it for a receipt.
    pub fn push(
        self: &Arc<Self>,
        mut msg: Message,
    ) -> BoxFuture<'static, Result<Option<u64>, StoreError>> {
        self.stamp_expiry(&mut msg);
        let Some(owner) = self.push.as_ref().and_then(|p| p.client_of(&msg.topic)) else {
            return Box::pin(futures::future::ready(Ok(None)));
        };
        Box::pin(self.push_to(Arc::from(owner), msg))
    }

    /// A stored message expires `session.message_ttl` after now, unless it carries its own,
    /// shorter expiry (the HTTP API's `ttl`).
    fn stamp_expiry(&self, msg: &mut Message) {
        let ttl = self.config.session.message_ttl;
        if !ttl.is_zero() && msg.qos != Qos::AtMostOnce && msg.expires_at == 0 {
            msg.expires_at = now_ms() + ttl.as_millis() as u64;
        }
    }

    fn push_to(
        self: &Arc<Self>,
        owner: ClientId,
        mut msg: Message,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send + 'static {
        // Push topics are never retained: a retained copy would be readable by wildcard
        // subscribers, which would break device isolation.
        msg.retain = false;
        let qos = msg.qos.min(Qos::AtLeastOnce);
        self.deliver(owner, qos, Arc::new(msg), true)
    }

    /// Cluster: an ordinary-topic publish another node received, for subscribers here.
    /// That node stored the retained copy; this one only keeps it for later subscribers.
    fn publish_from_peer(
        self: &Arc<Self>,
        mut msg: Message,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        if msg.retain {
            self.retained.retain(&Arc::new(msg.clone()));
            msg.retain = false;
        }
        let deliveries = self.deliver_local(Arc::new(msg), false);
        Box::pin(async move { futures::future::try_join_all(deliveries).await.map(|_| ()) })
    }

    /// Deliveries to this node's subscribers of `msg.topic`, submitted now.
    fn deliver_local(
        self: &Arc<Self>,
        msg: Arc<Message>,
        count_unmatched: bool,
    ) -> Vec<impl Future<Output = Result<Option<u64>, StoreError>> + Send + 'static> {
        let mut receivers = HashMap::new();
        self.subscriptions.matches(&msg.topic, &mut receivers);
        if receivers.is_empty() && count_unmatched {
            metrics::dropped(metrics::Drop::NoReceiver);
        }
        receivers
            .into_iter()
            .map(|(client, sub_qos)| self.deliver(client, msg.qos.min(sub_qos), msg.clone(), false))
            .collect()
    }

    /// Hands one message to one client: stored first unless QoS 0, then hinted. The store
    /// is submitted at call time. `anywhere`: the client may be connected to another node
    /// (a push), rather than known here (a subscription match).
    fn deliver(
        self: &Arc<Self>,
        client: ClientId,
        qos: Qos,
        msg: Arc<Message>,
        anywhere: bool,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send + 'static {
        let stored = (qos != Qos::AtMostOnce).then(|| {
            let live = self.store.is_remote() && self.mailbox(&client).is_some();
            self.store.enqueue(&client, qos, &msg, live)
        });
        let broker = self.clone();
        async move {
            let Some(stored) = stored else {
                if let Some(mb) = broker.mailbox(&client) {
                    mb.push(Delivery::Direct(msg), broker.mailbox_limits());
                } else if let Some(c) = broker.cluster.as_ref().filter(|_| anywhere) {
                    c.forward_push(client, 0, qos, msg, None).await;
                }
                return Ok(None);
            };
            let (seq, route, live) = match stored.await {
                Ok(Stored {
                    outcome: Enqueued::Stored(seq),
                    route,
                    live,
                }) => (seq, route, live),
                Ok(_) => return Ok(None),
                Err(e) => {
                    metrics::store_error();
                    return Err(e);
                }
            };
            // Looked up after the store so that a connection registered meanwhile either
            // sees the entry in its first outbox read or gets this hint.
            if let Some(mb) = broker.mailbox(&client) {
                let d = Delivery::Stored {
                    seq,
                    qos,
                    msg,
                    live,
                };
                mb.push(d, broker.mailbox_limits());
            } else if let Some(c) = broker
                .cluster
                .as_ref()
                .filter(|_| anywhere && route.is_some())
            {
                c.forward_push(client, seq, qos, msg, route).await;
            }
            Ok(Some(seq))
        }
    }

    /// Kicks the connections whose keepalive ran out and wakes the ones waiting to retry
    /// their outbox: only those whose deadline came (`keepalive`), not every connection.
    /// Run a few times a second by the server.
    pub fn check_keepalives(&self) {
        let from = self.silence_from.load(Ordering::Relaxed);
        self.deadlines.tick(now_ms(), from);
    }

    /// Wakes `mailbox`'s connection on the next tick (its outbox read failed).
    pub fn retry_later(&self, mailbox: &Arc<Mailbox>) {
        self.deadlines.retry(mailbox);
    }

    /// The mailboxes of the clients connected now (a drain closes them in batches with
    /// `Kick::Shutdown`: no wills, the devices are moving, not gone).
    pub fn mailboxes(&self) -> Vec<Arc<Mailbox>> {
        self.clients.iter().filter_map(|e| e.conn.clone()).collect()
    }

    /// Every client connected now, with its mailbox (a broadcast's list): one pass over the
    /// client table, like `census`.
    pub fn connected(&self) -> Vec<(ClientId, Arc<Mailbox>)> {
        self.clients
            .iter()
            .filter_map(|e| e.conn.clone().map(|mb| (e.key().clone(), mb)))
            .collect()
    }

    /// This node's name: its cluster node id; without a cluster `cluster.node_id` if set,
    /// else the host name.
    pub fn node_id(&self) -> &Arc<str> {
        &self.node
    }

    /// The cluster this node is part of, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Sessions online and offline, and the bytes waiting in mailboxes: a pass over every
    /// client, run every few seconds for the gauges.
    pub fn census(&self) -> Census {
        let mut c = Census::default();
        for e in self.clients.iter() {
            match &e.conn {
                Some(mb) => {
                    c.online += 1;
                    c.mailbox_bytes += mb.queued_bytes();
                    if e.persistent {
                        c.online_persistent += 1;
                    }
                }
                None if e.persistent => c.offline += 1,
                None => {}
            }
        }
        c
    }

    /// Asks every connection to close (server shutdown: no wills).
    pub fn close_all(&self) {
        for e in self.clients.iter() {
            if let Some(mb) = &e.conn {
                mb.kick(Kick::Shutdown);
            }
        }
    }

    pub fn is_connected(&self, client: &str) -> bool {
        self.mailbox(client).is_some()
    }

    /// When `client`'s connection to this node started, in unix ms; `None` when it has
    /// none here. Read from the connection's id, which is its start in unix µs
    /// (`new_conn_id`): nothing stored per connection for it.
    pub fn connected_since_ms(&self, client: &str) -> Option<u64> {
        self.mailbox(client).map(|m| m.conn_id() / 1000)
    }
}

/// What the cluster asks of this node (see `cluster::Local`).
impl cluster::Local for Broker {
    fn take_forward(&self, client: &str, seq: u64, qos: Qos, msg: Arc<Message>) {
        Broker::take_forward(self, client, seq, qos, msg)
    }

    fn kick_if_older(&self, client: &str, epoch: u64) {
        Broker::kick_if_older(self, client, epoch)
    }

    fn publish_from_peer(
        self: Arc<Self>,
        msg: Message,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Broker::publish_from_peer(&self, msg)
    }

    fn filters(&self) -> Vec<String> {
        self.subscriptions.filters()
    }

    fn broadcast(self: Arc<Self>, payload: bytes::Bytes, qos: Qos) -> BoxFuture<'static, u64> {
        Box::pin(async move {
            crate::broadcast::fan_out(&self, payload, qos, true)
                .await
                .handed
        })
    }

    fn connected_since(&self, client: &str) -> Option<u64> {
        self.connected_since_ms(client)
    }

    fn connections(&self) -> Vec<cluster::Connected> {
        self.clients
            .iter()
            .filter(|e| e.epoch() != 0)
            .filter_map(|e| {
                e.conn.clone().map(|mailbox| cluster::Connected {
                    client: e.key().clone(),
                    mailbox,
                    epoch: e.epoch(),
                })
            })
            .collect()
    }

    fn newest<'a>(&'a self, clients: &'a [&'a str]) -> BoxFuture<'a, Result<Vec<u64>, StoreError>> {
        Box::pin(self.store.newest(clients))
    }
}
