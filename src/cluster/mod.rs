//! Cluster: many Herald nodes over one Redis (ARCHITECTURE.md section 3).
//!
//! Files: `routes` (the route table: client -> node, with epochs), `registry` (alive keys
//! and this node's cached alive table), `interest` (which node has subscribers for which
//! filter), `forward` (what goes to peers), `ask` (questions to peers and their answers:
//! broadcasts, where a client is connected), `sweep` (repair of lost hints), `frame` (what
//! one node tells another), `link` (the node-to-node connections). Keys are in
//! `redis::keys`; the broker reaches the cluster through `Cluster`'s methods, and the
//! cluster reaches the broker only through the `Local` trait, so neither imports the other.
//!
//! What lives where: Redis holds the truth (outboxes, routes, alive keys, filters); each
//! node caches the alive table and every other node's filters, refreshed twice a second;
//! both caches are hints.
//!
//! The path of a push to a device on another node: the receiving node stores the message
//! in the device's outbox (Redis; the enqueue script also returns the device's route, read
//! right after the store, so forwarding costs no extra round trip) and, if the route names a
//! live node (alive key present with the route's incarnation), queues
//! `{cid, seq, message}` for the node-to-node link (hop 1), then acknowledges the publisher;
//! the owner hands it to the
//! connection (hop 2). A forward lost on the way (link down, node restarting) only delays the
//! message: the owner re-reads the outbox on reconnect, and its periodic sweep wakes every
//! connected client whose outbox holds entries it has not been told about.
//!
//! Ordinary topics: a publish is forwarded once per node that has a matching filter (and to
//! every node when retained); with QoS > 0 the peer acknowledges after storing for its own
//! subscribers, and the publisher's PUBACK waits for those acknowledgements, at most
//! `link::ACK_TIMEOUT`: a peer that does not answer in time is counted as a failed forward
//! and does not hold the publisher up (its subscribers may miss the message).
//!
//! One owner per client id: CONNECT bumps the client's epoch and writes the route in one
//! Lua call, then tells the previous owner node (if live) to close its connection unless
//! that connection's epoch is newer. Kicks can be lost too, so the sweep also closes local
//! connections whose route now names a newer epoch elsewhere. A clean session's end removes
//! its route only if the route still names this node, incarnation and epoch.
//!
//! Non-push subscriptions of persistent sessions are served by the node the client last
//! connected to (loaded from Redis when it connects); if that node dies, messages on
//! ordinary topics published before the client reconnects are not queued for it. Push
//! topics do not have this limit: their outbox is addressed by client id.

mod ask;
mod forward;
mod frame;
mod interest;
mod link;
mod registry;
mod routes;
mod sweep;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::mailbox::Mailbox;
use crate::message::{ClientId, Message, Qos};
use crate::redis::{Redis, StoreError};
use crate::subscriptions::Subscriptions;

pub use ask::{Located, PeerCount};
pub use link::{LinkSecurity, LinkTls};
pub use routes::{Claim, Route};

/// How often the alive table and the other nodes' filters are re-read.
const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// A node missing from the cached alive table is looked up in Redis at most this often.
const LOOKUP_EVERY: Duration = Duration::from_millis(500);

/// The local node as the cluster sees it: what peers' frames and the sweep need of it.
pub trait Local: Send + Sync + 'static {
    /// A peer stored `msg` in `client`'s outbox as `seq` and says it is connected here.
    fn take_forward(&self, client: &str, seq: u64, qos: Qos, msg: Arc<Message>);
    /// `client` connected to another node at an epoch after `epoch`: close the connection
    /// here unless it is newer, and forget the session.
    fn kick_if_older(&self, client: &str, epoch: u64);
    /// An ordinary-topic publish another node received, for subscribers here.
    fn publish_from_peer(
        self: Arc<Self>,
        msg: Message,
    ) -> BoxFuture<'static, Result<(), StoreError>>;
    /// Every topic filter somebody here subscribes to.
    fn filters(&self) -> Vec<String>;
    /// Connections whose route claim has completed.
    fn connections(&self) -> Vec<Connected>;
    /// Hands `payload` to every device connected here, live only (`broadcast`); resolves to
    /// how many took it.
    fn broadcast(self: Arc<Self>, payload: bytes::Bytes, qos: Qos) -> BoxFuture<'static, u64>;
    /// Since when (unix ms) `client` is connected here; `None` if it is not.
    fn connected_since(&self, client: &str) -> Option<u64>;
    /// The highest sequence number in each client's outbox.
    fn newest<'a>(&'a self, clients: &'a [&'a str]) -> BoxFuture<'a, Result<Vec<u64>, StoreError>>;
}

/// A local connection, for the sweep.
pub struct Connected {
    pub client: ClientId,
    pub mailbox: Arc<Mailbox>,
    /// Its route epoch.
    pub epoch: u64,
}

pub struct Cluster {
    pub id: Arc<str>,
    /// Random per start: a restarted node is a new incarnation, and routes to the old one
    /// are ignored as soon as the alive key names the new one.
    pub inc: u64,
    advertise: SocketAddr,
    sweep_interval: Duration,
    node_ttl: Duration,
    redis: Redis,
    /// Other live nodes, as last read from Redis.
    nodes: RwLock<HashMap<Arc<str>, registry::NodeInfo>>,
    /// The last lookup of each node missing from `nodes`.
    lookups: Mutex<HashMap<Arc<str>, registry::Lookup>>,
    peers: Mutex<HashMap<Arc<str>, link::Peer>>,
    security: Arc<LinkSecurity>,
    /// Other nodes' filters; the table's "clients" are node ids.
    remote: RwLock<Arc<Subscriptions>>,
    interest_version: AtomicU64,
    /// Our own filters changed: rewrite `herald:filters:{id}`.
    interest_dirty: Notify,
}

/// How a node is set up (`cluster.*` in the configuration).
pub struct Settings {
    pub id: String,
    pub advertise: SocketAddr,
    pub sweep_interval: Duration,
    pub node_ttl: Duration,
    pub security: LinkSecurity,
}

impl Cluster {
    pub fn new(settings: Settings, redis: Redis) -> Cluster {
        Cluster {
            id: Arc::from(settings.id),
            inc: random_u64() >> 1,
            advertise: settings.advertise,
            sweep_interval: settings.sweep_interval,
            node_ttl: settings.node_ttl,
            redis,
            nodes: RwLock::default(),
            lookups: Mutex::default(),
            peers: Mutex::default(),
            security: Arc::new(settings.security),
            remote: RwLock::default(),
            interest_version: AtomicU64::new(0),
            interest_dirty: Notify::new(),
        }
    }

    /// Joins the cluster, then runs the node's background work until `stop`: the alive
    /// key, the tables, this node's filters, the sweep, and the node-to-node listener.
    pub async fn start(
        self: &Arc<Self>,
        local: Arc<dyn Local>,
        listener: TcpListener,
        max_packet: usize,
        stop: CancellationToken,
    ) -> Result<(), StoreError> {
        self.register().await?;
        let inbound = Arc::new(link::Inbound {
            local: local.clone(),
            inc: self.inc,
            max_packet: max_packet.saturating_add(64 * 1024),
        });
        tokio::spawn(link::serve(
            listener,
            inbound,
            self.security.clone(),
            stop.clone(),
        ));
        tokio::spawn(self.clone().sweep_loop(local.clone(), stop.clone()));
        tokio::spawn(self.clone().run(local, stop));
        Ok(())
    }

    /// The sweep, in a task of its own: a sweep over very many connections (a round trip
    /// per 500) must not delay the alive key's refresh, or past two thirds of `node_ttl`
    /// the node would look dead to its peers.
    async fn sweep_loop(self: Arc<Self>, local: Arc<dyn Local>, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(self.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sweep.tick() => self.sweep(&*local).await,
            }
        }
    }

    /// Other live nodes, as last read from the registry.
    pub fn peers_known(&self) -> usize {
        self.nodes.read().len()
    }

    async fn run(self: Arc<Self>, local: Arc<dyn Local>, stop: CancellationToken) {
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        let mut heartbeat = tokio::time::interval(self.node_ttl / 3);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut interest_pending = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = heartbeat.tick() => {
                    if let Err(e) = self.heartbeat().await {
                        tracing::debug!(error = %e, "alive key not refreshed");
                    }
                }
                _ = refresh.tick() => {
                    if let Err(e) = self.refresh().await {
                        tracing::debug!(error = %e, "cluster tables not refreshed");
                    }
                    if interest_pending {
                        interest_pending = self.write_interest(local.filters()).await.is_err();
                    }
                }
                _ = self.interest_dirty.notified() => {
                    interest_pending = self.write_interest(local.filters()).await.is_err();
                }
            }
        }
    }
}

/// Random enough for an incarnation: std's per-process hasher keys come from the OS.
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id()))
}
