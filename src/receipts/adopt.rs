//! A node's hook stream outlives the node: when a node that had a webhook is gone (no alive
//! key: killed, or scaled away), another node posts what it left, so a receipt written
//! before the crash still reaches the backend without waiting for that node to come back.
//!
//! Nodes with a webhook list themselves in `herald:hooknodes`. Every `EVERY`, each poster
//! looks for listed nodes without an alive key (`keys::alive`; on one node without a
//! cluster there is no other node), takes a lease on one (`SET NX PX`: one adopter at a
//! time), drains its stream through the webhook like its own, then deletes the stream and
//! unlists the node if it is still dead and its stream still empty (`scripts::HOOKS_DONE`).
//! A node that comes back while being adopted finds its stream shorter, and lists itself
//! again; a receipt posted by both is a duplicate, which at-least-once allows.
//!
//! Without a cluster there are no alive keys: two standalone nodes on one Redis would
//! adopt each other's streams (duplicates, nothing lost). Nodes that share a Redis are meant
//! to be a cluster (README, Cluster).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::hooks::{self, Feed, Step};
use crate::config::Secret;
use crate::redis::{keys, Redis, StoreError};

const EVERY: Duration = Duration::from_secs(10);
const LEASE: Duration = Duration::from_secs(60);

pub(super) async fn run(
    redis: Redis,
    own: String,
    client: reqwest::Client,
    url: Secret,
    stop: CancellationToken,
) {
    loop {
        // Every round, not once: an adopter may have unlisted this node while it was away.
        let mut add = redis::cmd("SADD");
        add.arg(keys::HOOK_NODES).arg(&own);
        let _ = redis.query::<i64>(&add).await;
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let Ok(gone) = dead_nodes(&redis, &own).await else {
            continue;
        };
        for node in gone {
            if !lease(&redis, &node, &own).await {
                continue;
            }
            let feed = Feed::Redis {
                redis: redis.clone(),
                key: keys::hooks(&node),
                node: node.clone(),
            };
            let mut backoff = Duration::from_millis(100);
            loop {
                match hooks::step(&feed, &client, url.expose(), &mut backoff, &stop).await {
                    Step::Stopped => return,
                    Step::Empty => break,
                    Step::Posted | Step::Failed => {
                        if !lease(&redis, &node, &own).await {
                            break;
                        }
                    }
                }
            }
            // Only a stream still empty of a node still dead: one that came back meanwhile
            // keeps its stream and its listing.
            let done: Result<i64, _> = redis
                .evalsha(
                    &redis.scripts().hooks_done,
                    &[keys::hooks(&node), keys::alive(&node)],
                    &[],
                )
                .await;
            if let Ok(1) = done {
                let mut unlist = redis::cmd("SREM");
                unlist.arg(keys::HOOK_NODES).arg(&node);
                let _ = redis.query::<i64>(&unlist).await;
                tracing::info!(node = %node, "posted the receipts a dead node left");
            }
        }
    }
}

/// Listed nodes other than `own` without an alive key.
async fn dead_nodes(redis: &Redis, own: &str) -> Result<Vec<String>, StoreError> {
    let mut members = redis::cmd("SMEMBERS");
    members.arg(keys::HOOK_NODES);
    let nodes: Vec<String> = redis.query(&members).await?;
    let mut gone = Vec::new();
    for n in nodes.into_iter().filter(|n| n != own) {
        let mut alive = redis::cmd("EXISTS");
        alive.arg(keys::alive(&n));
        if redis.query::<i64>(&alive).await? == 0 {
            gone.push(n);
        }
    }
    Ok(gone)
}

/// Takes or extends the lease on `node`'s stream; false if another node holds it.
async fn lease(redis: &Redis, node: &str, own: &str) -> bool {
    let key = keys::hooks_lease(node);
    let mut take = redis::cmd("SET");
    take.arg(&key)
        .arg(own)
        .arg("NX")
        .arg("PX")
        .arg(LEASE.as_millis() as u64);
    if let Ok(Some(_)) = redis.query::<Option<String>>(&take).await {
        return true;
    }
    let mut get = redis::cmd("GET");
    get.arg(&key);
    let holder: Option<String> = redis.query(&get).await.unwrap_or(None);
    if holder.as_deref() != Some(own) {
        return false;
    }
    let mut extend = redis::cmd("PEXPIRE");
    extend.arg(&key).arg(LEASE.as_millis() as u64);
    redis.query::<i64>(&extend).await.is_ok()
}
