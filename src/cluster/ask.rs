//! Questions to other nodes, answered over the node-to-node link (`link`): "hand this
//! broadcast to your devices, how many took it?" and "is this client connected to you?".
//!
//! Every wait is bounded: a node that does not answer in time is reported as such, and the
//! backend still gets an answer about the others.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::message::Qos;
use crate::redis::StoreError;

use super::frame::Frame;
use super::Cluster;

/// How long a broadcast waits for a peer's count: a fan-out on a node with a million
/// connections takes a moment (a pass over its client table, then the hand-offs).
const BROADCAST_WAIT: Duration = Duration::from_secs(5);
/// How long a status waits for the node the route names.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// Question ids: unique within the process, which is all an answer on one link needs.
static NEXT_QUESTION: AtomicU64 = AtomicU64::new(1);

fn question_id() -> u64 {
    NEXT_QUESTION.fetch_add(1, Ordering::Relaxed)
}

/// One peer's part of a broadcast.
#[derive(Debug, Clone)]
pub struct PeerCount {
    pub node: Arc<str>,
    /// Devices that took it there, or why the node did not say.
    pub handed: Result<u64, String>,
}

/// Where a client is connected, as far as the other nodes know (`Cluster::locate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// No other live node has it (the route is absent, names this node, a dead node or an
    /// old incarnation, or the node it names says the client is not connected).
    Nowhere,
    /// Connected to `node` since `since` (unix ms).
    At { node: String, since: u64 },
    /// The route names live `node`, which did not answer in time.
    Unanswered { node: String, why: String },
}

impl Cluster {
    /// Asks every other live node (the cached alive table) to hand `payload` to its devices,
    /// all at once; each answer or failure, within `BROADCAST_WAIT`.
    pub async fn broadcast(&self, payload: Bytes, qos: Qos) -> Vec<PeerCount> {
        let nodes: Vec<_> = self
            .nodes
            .read()
            .iter()
            .map(|(n, i)| (n.clone(), i.addr))
            .collect();
        let asks = nodes.into_iter().map(|(node, addr)| {
            let frame = Frame::Broadcast {
                id: question_id(),
                qos,
                payload: payload.clone(),
            };
            let asked = self.ask(&node, addr, frame);
            async move {
                let handed = match asked {
                    Err(()) => Err("the link's queue is full".to_string()),
                    Ok(rx) => match tokio::time::timeout(BROADCAST_WAIT, rx).await {
                        Ok(Ok(n)) => Ok(n),
                        Ok(Err(_)) => Err("the link to the node is down".to_string()),
                        Err(_) => Err(format!(
                            "no answer within {}",
                            humantime::format_duration(BROADCAST_WAIT)
                        )),
                    },
                };
                PeerCount { node, handed }
            }
        });
        futures::future::join_all(asks).await
    }

    /// Which other node `client` is connected to: its route (one `HMGET`), and, when that
    /// names another live node, that node's own word (a persistent session keeps its route
    /// while offline, so the route alone would call an offline device online).
    pub async fn locate(&self, client: &str) -> Result<Located, StoreError> {
        let Some(route) = self.route(client).await? else {
            return Ok(Located::Nowhere);
        };
        let Some(addr) = self.live_elsewhere(&route).await else {
            return Ok(Located::Nowhere);
        };
        let frame = Frame::Status {
            id: question_id(),
            client: Arc::from(client),
        };
        let why = match self.ask(&route.node, addr, frame) {
            Err(()) => "the link's queue is full".to_string(),
            Ok(rx) => match tokio::time::timeout(STATUS_WAIT, rx).await {
                Ok(Ok(0)) => return Ok(Located::Nowhere),
                Ok(Ok(since)) => {
                    return Ok(Located::At {
                        node: route.node,
                        since,
                    })
                }
                Ok(Err(_)) => "the link to the node is down".to_string(),
                Err(_) => format!(
                    "no answer within {}",
                    humantime::format_duration(STATUS_WAIT)
                ),
            },
        };
        Ok(Located::Unanswered {
            node: route.node,
            why,
        })
    }

    /// Queues a question for `node` (its link created on first use).
    fn ask(
        &self,
        node: &str,
        addr: std::net::SocketAddr,
        frame: Frame,
    ) -> Result<tokio::sync::oneshot::Receiver<u64>, ()> {
        let mut peers = self.peers.lock();
        self.link_to(&mut peers, node, addr);
        peers.get(node).map_or(Err(()), |p| p.ask(frame))
    }
}
