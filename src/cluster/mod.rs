//! Cluster: many Herald nodes over one Redis (ARCHITECTURE.md section 3).
//!
//! What lives where:
//! - Redis holds the truth: outboxes (see `outbox`), the route table `herald:route:{cid}`
//!   (HASH node / inc / epoch) with its fencing counter `herald:epoch:{cid}`, one alive key
//!   per node `herald:alive:{node}` = "<incarnation> <address>" with a short TTL, the set of
//!   node ids `herald:nodes`, and per node the set of topic filters it has subscribers for,
//!   `herald:filters:{node}`, with one version counter `herald:interest` bumped on change.
//! - Each node caches the alive table and every other node's filters (a `Router` whose
//!   "clients" are node ids), refreshed twice a second; both are hints.
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

mod link;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use redis::Script;
use tokio::sync::Notify;

use crate::codec::Qos;
use crate::metrics;
use crate::outbox::{redis_key, Message, RedisOutbox, StoreError};
use crate::router::Router;

pub use link::{serve, Frame, LinkSecurity, LinkTls};

const CLAIM: &str = r#"
local e = redis.call('INCR', KEYS[2])
redis.call('PERSIST', KEYS[2])
local old = redis.call('HMGET', KEYS[1], 'node', 'inc', 'epoch')
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'inc', ARGV[2], 'epoch', e)
return {e, old[1] or '', old[2] or '0', old[3] or '0'}
"#;

const RELEASE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'node', 'inc', 'epoch')
if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] or r[3] ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7])
  redis.call('PEXPIRE', KEYS[5], 86400000)
end
return 1
"#;

const UNREGISTER: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1], KEYS[2]) end
return redis.call('INCR', KEYS[3])
"#;

/// How often the alive table and the other nodes' filters are re-read.
const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// A node missing from the cached alive table is looked up in Redis at most this often.
const LOOKUP_EVERY: Duration = Duration::from_millis(500);

/// Where a client was last connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub node: String,
    pub inc: u64,
    pub epoch: u64,
}

/// The result of registering a new connection in the route table.
pub struct Claim {
    pub epoch: u64,
    pub previous: Option<Route>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NodeInfo {
    inc: u64,
    addr: SocketAddr,
}

pub struct Cluster {
    pub id: Arc<str>,
    /// Random per start: a restarted node is a new incarnation, and routes to the old one
    /// are ignored as soon as the alive key names the new one.
    pub inc: u64,
    advertise: SocketAddr,
    pub sweep_interval: Duration,
    node_ttl: Duration,
    /// Other live nodes, as last read from Redis.
    nodes: RwLock<HashMap<Arc<str>, NodeInfo>>,
    /// When each node was last looked up in Redis. An async lock: callers that miss the
    /// cache together wait for one lookup instead of each giving up or each asking.
    looked_up: tokio::sync::Mutex<HashMap<Arc<str>, Instant>>,
    peers: Mutex<HashMap<Arc<str>, link::Peer>>,
    security: Arc<LinkSecurity>,
    /// Other nodes' filters; the router's "clients" are node ids.
    remote: RwLock<Arc<Router>>,
    interest_version: AtomicU64,
    /// Our own filters changed: rewrite `herald:filters:{id}`.
    interest_dirty: Notify,
    claim: Script,
    release: Script,
    unregister: Script,
}

fn alive_key(node: &str) -> String {
    format!("herald:alive:{{{node}}}")
}

fn filters_key(node: &str) -> String {
    format!("herald:filters:{{{node}}}")
}

fn route_key(client: &str) -> String {
    redis_key("route", client)
}

fn parse_alive(v: &str) -> Option<NodeInfo> {
    let (inc, addr) = v.split_once(' ')?;
    Some(NodeInfo {
        inc: inc.parse().ok()?,
        addr: addr.parse().ok()?,
    })
}

fn parse_route(node: Option<String>, inc: Option<String>, epoch: Option<String>) -> Option<Route> {
    let node = node.filter(|n| !n.is_empty())?;
    Some(Route {
        node,
        inc: inc.and_then(|i| i.parse().ok()).unwrap_or(0),
        epoch: epoch.and_then(|e| e.parse().ok()).unwrap_or(0),
    })
}

impl Cluster {
    pub fn new(
        id: String,
        advertise: SocketAddr,
        sweep_interval: Duration,
        node_ttl: Duration,
        security: LinkSecurity,
    ) -> Cluster {
        Cluster {
            id: Arc::from(id),
            inc: random_u64() >> 1,
            advertise,
            sweep_interval,
            node_ttl,
            nodes: RwLock::default(),
            looked_up: tokio::sync::Mutex::default(),
            peers: Mutex::default(),
            security: Arc::new(security),
            remote: RwLock::default(),
            interest_version: AtomicU64::new(0),
            interest_dirty: Notify::new(),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            unregister: Script::new(UNREGISTER),
        }
    }

    fn alive_value(&self) -> String {
        format!("{} {}", self.inc, self.advertise)
    }

    /// Announces this node: alive key, member of `herald:nodes`, no filters yet.
    pub async fn register(&self, redis: &RedisOutbox) -> Result<(), StoreError> {
        let previous: Option<String> = redis
            .query(redis::cmd("GET").arg(alive_key(&self.id)))
            .await?;
        if let Some(p) = previous {
            tracing::warn!(node = %self.id, previous = %p, "node id was alive under another incarnation: replacing it (restart, or two nodes share an id)");
        }
        // A new incarnation starts with no subscribers: drop the filters of the last one
        // before anyone can see this node alive.
        let mut p = redis::pipe();
        p.del(filters_key(&self.id))
            .ignore()
            .incr("herald:interest", 1)
            .ignore();
        redis.query_pipe::<()>(&p).await?;
        self.heartbeat(redis).await?;
        tracing::info!(node = %self.id, incarnation = self.inc, advertise = %self.advertise, "joined the cluster");
        self.refresh(redis).await
    }

    /// Graceful stop: routes to this node are ignored from now on, not after the TTL.
    pub async fn unregister(&self, redis: &RedisOutbox) {
        let mut call = self.unregister.prepare_invoke();
        call.key(alive_key(&self.id))
            .key(filters_key(&self.id))
            .key("herald:interest")
            .arg(self.alive_value());
        if let Err(e) = redis.invoke::<u64>(&call).await {
            tracing::warn!(error = %e, "could not leave the cluster cleanly; peers will wait for the alive key to expire");
        }
    }

    /// CONNECT: bump the client's epoch and make this node its route, in one step.
    pub async fn claim(&self, redis: &RedisOutbox, client: &str) -> Result<Claim, StoreError> {
        let mut call = self.claim.prepare_invoke();
        call.key(route_key(client))
            .key(redis_key("epoch", client))
            .arg(&*self.id)
            .arg(self.inc.to_string());
        let (epoch, node, inc, old_epoch): (u64, String, String, String) =
            redis.invoke(&call).await?;
        Ok(Claim {
            epoch,
            previous: parse_route(Some(node), Some(inc), Some(old_epoch)),
        })
    }

    /// A connection ended: remove its route if it is still the current one, and with
    /// `clear` the client's outbox, session and subscriptions too (a clean session). The
    /// epoch counter of a clean client then expires after a day, so that backends that
    /// connect with a fresh random id each time leave nothing behind, while a connection
    /// that outlived its kick by less than that is still fenced.
    pub async fn release(
        &self,
        redis: &RedisOutbox,
        client: &str,
        epoch: u64,
        clear: bool,
    ) -> Result<bool, StoreError> {
        let mut call = self.release.prepare_invoke();
        call.key(route_key(client))
            .key(redis_key("outbox", client))
            .key(redis_key("session", client))
            .key(redis_key("subs", client))
            .key(redis_key("epoch", client))
            .key(redis_key("qbytes", client))
            .key(redis_key("sent", client))
            .arg(&*self.id)
            .arg(self.inc.to_string())
            .arg(epoch.to_string())
            .arg(if clear { "1" } else { "0" });
        let released: u8 = redis.invoke(&call).await?;
        if released == 1 && clear {
            redis
                .query::<()>(redis::cmd("SREM").arg("herald:subscribers").arg(client))
                .await?;
        }
        Ok(released == 1)
    }

    pub async fn route(
        &self,
        redis: &RedisOutbox,
        client: &str,
    ) -> Result<Option<Route>, StoreError> {
        let (node, inc, epoch): (Option<String>, Option<String>, Option<String>) = redis
            .query(
                redis::cmd("HMGET")
                    .arg(route_key(client))
                    .arg("node")
                    .arg("inc")
                    .arg("epoch"),
            )
            .await?;
        Ok(parse_route(node, inc, epoch))
    }

    /// Routes and newest outbox sequence numbers of many clients, in one pipeline.
    pub async fn sweep_state(
        &self,
        redis: &RedisOutbox,
        clients: &[&str],
    ) -> Result<Vec<(Option<Route>, u64)>, StoreError> {
        let mut p = redis::pipe();
        for c in clients {
            p.cmd("HMGET")
                .arg(route_key(c))
                .arg("node")
                .arg("inc")
                .arg("epoch");
            p.cmd("ZRANGE")
                .arg(redis_key("outbox", c))
                .arg(-1)
                .arg(-1)
                .arg("WITHSCORES");
        }
        type Row = (Option<String>, Option<String>, Option<String>);
        let replies: Vec<redis::Value> = redis.query_pipe(&p).await?;
        let mut out = Vec::with_capacity(clients.len());
        let mut replies = replies.into_iter();
        while let (Some(route), Some(newest)) = (replies.next(), replies.next()) {
            let route = match redis::from_redis_value::<Row>(route) {
                Ok((n, i, e)) => parse_route(n, i, e),
                Err(_) => None,
            };
            // Members are `<seq>|<binary envelope>`: bytes, not text.
            let newest = match redis::from_redis_value::<Vec<(Vec<u8>, f64)>>(newest) {
                Ok(v) => v.first().map_or(0, |(_, score)| *score as u64),
                Err(_) => 0,
            };
            out.push((route, newest));
        }
        Ok(out)
    }

    /// Is `route` a live connection elsewhere? Its node's address if so. A route to this
    /// node, to a dead node, or to an older incarnation is not. When the cached incarnation
    /// differs and Redis was asked about that node moments ago, the cached address is used
    /// anyway: every frame names the incarnation it is for, and the receiver drops it if
    /// that is not its own.
    pub async fn live_elsewhere(&self, redis: &RedisOutbox, route: &Route) -> Option<SocketAddr> {
        if *route.node == *self.id {
            if route.inc != self.inc {
                metrics::stale_route();
            }
            return None;
        }
        let node = route.node.as_str();
        let cached = self.nodes.read().get(node).copied();
        if let Some(i) = cached.filter(|i| i.inc == route.inc) {
            return Some(i.addr);
        }
        let (info, fresh) = {
            let mut recent = self.looked_up.lock().await;
            let now = Instant::now();
            match recent.get(node) {
                Some(t) if now.duration_since(*t) < LOOKUP_EVERY => {
                    (self.nodes.read().get(node).copied(), false)
                }
                _ => {
                    recent.insert(Arc::from(node), now);
                    (self.look_up(redis, node).await, true)
                }
            }
        };
        match info {
            Some(i) if i.inc == route.inc || !fresh => Some(i.addr),
            _ => {
                metrics::stale_route();
                None
            }
        }
    }

    async fn look_up(&self, redis: &RedisOutbox, node: &str) -> Option<NodeInfo> {
        let v: Option<String> = redis
            .query(redis::cmd("GET").arg(alive_key(node)))
            .await
            .ok()?;
        let info = v.as_deref().and_then(parse_alive);
        let mut nodes = self.nodes.write();
        match info {
            Some(i) => nodes.insert(Arc::from(node), i),
            None => nodes.remove(node),
        };
        info
    }

    /// Hands `frame` to the link towards `node` (created on first use). `Err` (counted) if
    /// the link's queue is full; with `ack`, the receiver completes once the peer
    /// acknowledged the frame.
    pub(crate) fn send(
        &self,
        node: &str,
        addr: SocketAddr,
        frame: Frame,
        ack: bool,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<()>>, ()> {
        let mut peers = self.peers.lock();
        if !peers
            .get(node)
            .is_some_and(|p| p.addr == addr && !p.is_closed())
        {
            let p = link::Peer::start(
                addr,
                format!("$herald/{}/{}", self.id, self.inc),
                self.security.clone(),
            );
            peers.insert(Arc::from(node), p);
        }
        let sent = peers.get(node).map_or(Err(()), |p| p.send(frame, ack));
        if sent.is_err() {
            metrics::forward_failed();
        }
        sent
    }

    /// Nodes other than this one that must see a publish on `topic`.
    fn nodes_for(&self, topic: &str, retain: bool) -> Vec<(Arc<str>, NodeInfo)> {
        let nodes = self.nodes.read();
        if retain {
            // Every node keeps the retained messages for its later subscribers.
            return nodes.iter().map(|(n, i)| (n.clone(), *i)).collect();
        }
        let mut matched = HashMap::new();
        self.remote.read().matches(topic, &mut matched);
        matched
            .into_keys()
            .filter_map(|n| nodes.get(&n).map(|i| (n, *i)))
            .collect()
    }

    /// Forwards an ordinary-topic publish to the nodes with matching subscribers. The
    /// frames are queued now (in publish order); the future resolves when every peer that
    /// had to store acknowledged, or could not be reached (counted, logged): a dead or cut
    /// off node must not stop every publisher of the cluster until its alive key expires,
    /// and its subscribers' sessions live on that node (see the module doc).
    pub fn forward_publish(
        &self,
        msg: &Message,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let targets = self.nodes_for(&msg.topic, msg.retain);
        if targets.is_empty() {
            return None;
        }
        let ack = msg.qos != Qos::AtMostOnce;
        let mut waits = Vec::new();
        for (node, info) in targets {
            let frame = Frame::Publish {
                target_inc: info.inc,
                msg: msg.clone(),
            };
            metrics::forwarded(metrics::Forward::Publish);
            if let Ok(Some(rx)) = self.send(&node, info.addr, frame, ack) {
                waits.push((node, rx));
            }
        }
        Some(async move {
            // All peers at once: several frozen peers hold a PUBACK for one ACK_TIMEOUT, not
            // one each.
            let acks = waits.into_iter().map(|(node, rx)| async move {
                if !matches!(
                    tokio::time::timeout(link::ACK_TIMEOUT, rx).await,
                    Ok(Ok(()))
                ) {
                    metrics::forward_failed();
                    tracing::debug!(node = %node, "forwarded publish not acknowledged");
                }
            });
            futures::future::join_all(acks).await;
        })
    }

    /// Our own filters changed.
    pub fn interest_changed(&self) {
        self.interest_dirty.notify_one();
    }

    /// Re-reads the alive table, and the other nodes' filters when they changed.
    async fn refresh(&self, redis: &RedisOutbox) -> Result<(), StoreError> {
        let (members, version): (Vec<String>, Option<u64>) = redis
            .query_pipe(
                redis::pipe()
                    .smembers("herald:nodes")
                    .get("herald:interest"),
            )
            .await?;
        let others: Vec<String> = members.into_iter().filter(|m| **m != *self.id).collect();
        let mut fresh = HashMap::new();
        if !others.is_empty() {
            let keys: Vec<String> = others.iter().map(|n| alive_key(n)).collect();
            let values: Vec<Option<String>> = redis.query(redis::cmd("MGET").arg(&keys)).await?;
            let mut gone = Vec::new();
            for (node, v) in others.iter().zip(values) {
                match v.as_deref().and_then(parse_alive) {
                    Some(info) => {
                        fresh.insert(Arc::<str>::from(node.as_str()), info);
                    }
                    None => gone.push(node.clone()),
                }
            }
            if !gone.is_empty() {
                // Long dead: forget the member (a restart adds it back).
                let _ = redis
                    .query::<()>(redis::cmd("SREM").arg("herald:nodes").arg(&gone))
                    .await;
            }
        }
        let changed_members = {
            let mut nodes = self.nodes.write();
            let changed = *nodes != fresh;
            *nodes = fresh;
            changed
        };
        let version = version.unwrap_or(0);
        if changed_members || self.interest_version.swap(version, Ordering::AcqRel) != version {
            self.reload_interest(redis).await?;
        }
        self.peers
            .lock()
            .retain(|n, _| self.nodes.read().contains_key(n));
        Ok(())
    }

    async fn reload_interest(&self, redis: &RedisOutbox) -> Result<(), StoreError> {
        let nodes: Vec<Arc<str>> = self.nodes.read().keys().cloned().collect();
        let router = Router::default();
        if !nodes.is_empty() {
            let mut p = redis::pipe();
            for n in &nodes {
                p.smembers(filters_key(n));
            }
            let sets: Vec<Vec<String>> = redis.query_pipe(&p).await?;
            for (n, filters) in nodes.iter().zip(sets) {
                for f in filters {
                    router.subscribe(n, &f, Qos::AtMostOnce);
                }
            }
        }
        *self.remote.write() = Arc::new(router);
        Ok(())
    }

    async fn heartbeat(&self, redis: &RedisOutbox) -> Result<(), StoreError> {
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(alive_key(&self.id))
            .arg(self.alive_value())
            .arg("PX")
            .arg(self.node_ttl.as_millis() as u64)
            .ignore()
            .sadd("herald:nodes", &*self.id)
            .ignore();
        redis.query_pipe::<()>(&p).await
    }

    async fn write_interest(
        &self,
        redis: &RedisOutbox,
        filters: Vec<String>,
    ) -> Result<(), StoreError> {
        let key = filters_key(&self.id);
        let mut p = redis::pipe();
        p.atomic().del(&key).ignore();
        if !filters.is_empty() {
            p.sadd(&key, filters).ignore();
        }
        p.incr("herald:interest", 1).ignore();
        redis.query_pipe::<()>(&p).await
    }

    /// The node's background work: alive key, tables, own filters. Runs until the runtime
    /// stops or `stop` fires.
    /// For the node-to-node listener.
    pub fn security(&self) -> Arc<LinkSecurity> {
        self.security.clone()
    }

    pub async fn run(
        self: Arc<Self>,
        broker: Arc<crate::broker::Broker>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let Some(store) = broker.store.redis() else {
            return;
        };
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        let mut heartbeat = tokio::time::interval(self.node_ttl / 3);
        let mut sweep = tokio::time::interval(self.sweep_interval);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut interest_pending = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = heartbeat.tick() => {
                    if let Err(e) = self.heartbeat(store).await {
                        tracing::debug!(error = %e, "alive key not refreshed");
                    }
                }
                _ = refresh.tick() => {
                    if let Err(e) = self.refresh(store).await {
                        tracing::debug!(error = %e, "cluster tables not refreshed");
                    }
                    if interest_pending {
                        interest_pending = self.write_interest(store, broker.router.filters()).await.is_err();
                    }
                }
                _ = self.interest_dirty.notified() => {
                    interest_pending = self.write_interest(store, broker.router.filters()).await.is_err();
                }
                _ = sweep.tick() => broker.cluster_sweep().await,
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
