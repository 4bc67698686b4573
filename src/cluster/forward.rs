//! Forwarding: what this node hands to its peers over the node-to-node links (hop 1 of a
//! push to a device connected elsewhere, ordinary-topic publishes for other nodes'
//! subscribers, kicks of a client's older connection).
//!
//! The peer table is one mutex, taken for a map lookup and a channel `try_send` per
//! forward, never across an await; the link task does the writing. Profiled on node A of a
//! forwarded push, the node on two cores: `Cluster::send`, lock included, is about 2 % of
//! the node's CPU and the lock's slow path never shows (BENCHMARKS.md, "Locks").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::message::{ClientId, Message, Qos};
use crate::metrics;
use crate::outbox::RouteHint;

use super::frame::Frame;
use super::link::{self, Peer};
use super::routes::Route;
use super::Cluster;

impl Cluster {
    /// Hands `frame` to the link towards `node` (created on first use). `Err` (counted) if
    /// the link's queue is full; with `ack`, the receiver completes once the peer
    /// acknowledged the frame.
    fn send(
        &self,
        node: &str,
        addr: SocketAddr,
        frame: Frame,
        ack: bool,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<()>>, ()> {
        let mut peers = self.peers.lock();
        self.link_to(&mut peers, node, addr);
        let sent = peers.get(node).map_or(Err(()), |p| p.send(frame, ack));
        if sent.is_err() {
            metrics::forward_failed();
        }
        sent
    }

    /// Node-to-node links currently connected.
    pub fn links_up(&self) -> usize {
        self.peers.lock().values().filter(|p| p.is_up()).count()
    }

    /// Waits (up to `limit`) until every link has written what was queued on it: a
    /// draining node finishes the forwards it started.
    pub async fn flush_links(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self
            .peers
            .lock()
            .values()
            .all(|p| p.is_idle() || !p.is_up())
        {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("node links not flushed in time");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Starts the link to `node` at `addr` unless one is there.
    pub(super) fn link_to(
        &self,
        peers: &mut HashMap<Arc<str>, Peer>,
        node: &str,
        addr: SocketAddr,
    ) {
        if !peers
            .get(node)
            .is_some_and(|p| p.addr == addr && !p.is_closed())
        {
            let p = Peer::start(
                addr,
                format!("$herald/{}/{}", self.id, self.inc),
                self.security.clone(),
            );
            peers.insert(Arc::from(node), p);
        }
    }

    /// Keeps a link to every live node, dialled before the first forward (so that
    /// `herald_cluster_links_up` below `herald_cluster_peers` means a peer this node
    /// cannot reach), and drops the links to nodes that left the alive table.
    pub(super) fn sync_links(&self, alive: &HashMap<Arc<str>, super::registry::NodeInfo>) {
        let mut peers = self.peers.lock();
        peers.retain(|n, _| alive.contains_key(n));
        for (node, info) in alive {
            self.link_to(&mut peers, node, info.addr);
        }
    }

    /// Tells the node `client` is connected to (if another, live one) that its outbox has
    /// `seq`. A hint: if it is lost, the owner's sweep or a reconnect finds the message in
    /// the outbox. `known`: the route the store read with the enqueue; without it (QoS 0,
    /// nothing stored) the route is read here.
    pub async fn forward_push(
        &self,
        client: ClientId,
        seq: u64,
        qos: Qos,
        msg: Arc<Message>,
        known: Option<RouteHint>,
    ) {
        let route = match known {
            Some(h) => Route {
                node: h.node.into(),
                inc: h.inc,
                epoch: 0,
            },
            None => match self.route(&client).await {
                Ok(Some(route)) => route,
                _ => return,
            },
        };
        let Some(addr) = self.live_elsewhere(&route).await else {
            return;
        };
        metrics::forwarded(metrics::Forward::Push);
        let frame = Frame::Push {
            target_inc: route.inc,
            client,
            seq,
            qos,
            msg,
        };
        let _ = self.send(&route.node, addr, frame, false);
    }

    /// This node now owns `client`; tell `previous` owner (if another, live node) to close
    /// its connection unless that one is newer. A lost kick is found by the sweep (the
    /// route names a newer epoch).
    pub async fn kick_previous(&self, client: &ClientId, previous: &Route) {
        if let Some(addr) = self.live_elsewhere(previous).await {
            metrics::forwarded(metrics::Forward::Kick);
            let kick = Frame::Kick {
                target_inc: previous.inc,
                client: client.clone(),
                epoch: previous.epoch,
            };
            let _ = self.send(&previous.node, addr, kick, false);
        }
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
}
