//! The node registry: one alive key per node (`herald:alive:{node}` = "<incarnation>
//! <address>", short TTL), the set of node ids (`herald:nodes`), and this node's cached
//! copy of the alive table, refreshed twice a second (a hint: frames name the incarnation
//! they are for, and a receiver drops what is not its own).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};

use crate::metrics;
use crate::redis::{keys, scripts};
use crate::redis::{Redis, StoreError};

use super::routes::Route;
use super::{Cluster, LOOKUP_EVERY};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NodeInfo {
    pub(super) inc: u64,
    pub(super) addr: SocketAddr,
}

/// A lookup of one node's alive key, shared by every caller that misses the cache while it
/// runs or within `LOOKUP_EVERY` after.
pub(super) struct Lookup {
    at: Instant,
    /// `None`: Redis could not be asked (the cache is left as it is); `Some(None)`: the
    /// node has no alive key.
    result: Shared<BoxFuture<'static, Option<Option<NodeInfo>>>>,
}

fn parse_alive(v: &str) -> Option<NodeInfo> {
    let (inc, addr) = v.split_once(' ')?;
    Some(NodeInfo {
        inc: inc.parse().ok()?,
        addr: addr.parse().ok()?,
    })
}

async fn read_alive(redis: Redis, node: String) -> Option<Option<NodeInfo>> {
    let v: Option<String> = redis
        .query(redis::cmd("GET").arg(keys::alive(&node)))
        .await
        .ok()?;
    Some(v.as_deref().and_then(parse_alive))
}

/// `INCR herald:interest`: the other nodes re-read every node's filters when it moves.
pub(super) fn bump_interest() -> redis::Pipeline {
    let mut p = redis::pipe();
    p.incr(keys::INTEREST, 1);
    p
}

impl Cluster {
    fn alive_value(&self) -> String {
        format!("{} {}", self.inc, self.advertise)
    }

    /// Announces this node: alive key, member of `herald:nodes`, no filters yet.
    pub async fn register(&self) -> Result<(), StoreError> {
        let previous: Option<String> = self
            .redis
            .query(redis::cmd("GET").arg(keys::alive(&self.id)))
            .await?;
        if let Some(p) = previous {
            tracing::warn!(node = %self.id, previous = %p, "node id was alive under another incarnation: replacing it (restart, or two nodes share an id)");
        }
        // A new incarnation starts with no subscribers: drop the filters of the last one
        // before anyone can see this node alive, then tell the others (two slots).
        let mut drop = redis::pipe();
        drop.del(keys::filters(&self.id));
        self.redis.query_steps(&[drop, bump_interest()]).await?;
        self.heartbeat().await?;
        tracing::info!(node = %self.id, incarnation = self.inc, advertise = %self.advertise, "joined the cluster");
        self.refresh().await
    }

    /// Graceful stop: routes to this node are ignored from now on, not after the TTL.
    pub async fn unregister(&self) {
        // The node's own keys share its hash tag: one script, atomic (`scripts::UNREGISTER`).
        // The counter is in another slot, so it is bumped after. EVAL rather than EVALSHA:
        // once per process, and a store that came back without the script cannot refuse it.
        let mut leave = redis::pipe();
        leave
            .cmd("EVAL")
            .arg(scripts::UNREGISTER)
            .arg(2)
            .arg(keys::alive(&self.id))
            .arg(keys::filters(&self.id))
            .arg(self.alive_value());
        if let Err(e) = self.redis.query_steps(&[leave, bump_interest()]).await {
            tracing::warn!(error = %e, "could not leave the cluster cleanly; peers will wait for the alive key to expire");
        }
    }

    pub(super) async fn heartbeat(&self) -> Result<(), StoreError> {
        // The alive key before the membership (two slots): a member without one is taken
        // for long dead and removed by whichever node refreshes then (`refresh`).
        let mut alive = redis::pipe();
        alive
            .cmd("SET")
            .arg(keys::alive(&self.id))
            .arg(self.alive_value())
            .arg("PX")
            .arg(self.node_ttl.as_millis() as u64);
        let mut member = redis::pipe();
        member.sadd(keys::NODES, &*self.id);
        self.redis.query_steps(&[alive, member]).await
    }

    /// Re-reads the alive table, and the other nodes' filters when they changed.
    pub(super) async fn refresh(&self) -> Result<(), StoreError> {
        let (members, version): (Vec<String>, Option<u64>) = self
            .redis
            .query_each(&[
                redis::Cmd::smembers(keys::NODES),
                redis::Cmd::get(keys::INTEREST),
            ])
            .await?;
        let others: Vec<String> = members.into_iter().filter(|m| **m != *self.id).collect();
        let mut fresh = HashMap::new();
        if !others.is_empty() {
            let alive: Vec<String> = others.iter().map(|n| keys::alive(n)).collect();
            // One slot per node on a cluster: redis-rs splits an MGET by slot and puts the
            // replies back in order.
            let values: Vec<Option<String>> =
                self.redis.query(redis::cmd("MGET").arg(&alive)).await?;
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
                let _ = self
                    .redis
                    .query::<()>(redis::cmd("SREM").arg(keys::NODES).arg(&gone))
                    .await;
            }
        }
        let changed_members = {
            let mut nodes = self.nodes.write();
            let changed = *nodes != fresh;
            *nodes = fresh;
            changed
        };
        self.interest_refresh(changed_members, version.unwrap_or(0))
            .await?;
        self.sync_links(&self.nodes.read());
        Ok(())
    }

    /// Is `route` a live connection elsewhere? Its node's address if so. A route to this
    /// node, to a dead node, or to an older incarnation is not. When the cached incarnation
    /// differs and Redis was asked about that node moments ago, the cached address is used
    /// anyway: every frame names the incarnation it is for, and the receiver drops it if
    /// that is not its own.
    ///
    /// A miss asks Redis once per node per `LOOKUP_EVERY`: callers that miss together share
    /// the one lookup (a shared future), and no lock is held while it runs, so a slow Redis
    /// holds only the pushes to that node's devices, not every forward of the node.
    pub async fn live_elsewhere(&self, route: &Route) -> Option<SocketAddr> {
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
        let (lookup, fresh) = {
            let mut recent = self.lookups.lock();
            let now = Instant::now();
            match recent.get(node) {
                Some(l) if now.duration_since(l.at) < LOOKUP_EVERY => (l.result.clone(), false),
                _ => {
                    let result = read_alive(self.redis.clone(), node.to_string())
                        .boxed()
                        .shared();
                    recent.insert(
                        Arc::from(node),
                        Lookup {
                            at: now,
                            result: result.clone(),
                        },
                    );
                    (result, true)
                }
            }
        };
        let Some(info) = lookup.await else {
            metrics::stale_route();
            return None;
        };
        if fresh {
            let mut nodes = self.nodes.write();
            match info {
                Some(i) => nodes.insert(Arc::from(node), i),
                None => nodes.remove(node),
            };
        }
        match info {
            Some(i) if i.inc == route.inc || !fresh => Some(i.addr),
            _ => {
                metrics::stale_route();
                None
            }
        }
    }
}
