//! Interest: which topic filters each node has subscribers for (`herald:filters:{node}`,
//! with one version counter `herald:interest` bumped on every change), so that an
//! ordinary-topic publish goes only to the nodes that need it. Each node caches every
//! other node's filters in a subscription table whose "clients" are node ids.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::message::Qos;
use crate::redis::keys;
use crate::redis::StoreError;
use crate::subscriptions::Subscriptions;

use super::registry::NodeInfo;
use super::Cluster;

impl Cluster {
    /// Our own filters changed: `run` rewrites `herald:filters:{id}`.
    pub fn interest_changed(&self) {
        self.interest_dirty.notify_one();
    }

    /// After a refresh of the alive table: reload the other nodes' filters if the members
    /// or the version changed.
    pub(super) async fn interest_refresh(
        &self,
        changed_members: bool,
        version: u64,
    ) -> Result<(), StoreError> {
        if changed_members || self.interest_version.swap(version, Ordering::AcqRel) != version {
            self.reload_interest().await?;
        }
        Ok(())
    }

    async fn reload_interest(&self) -> Result<(), StoreError> {
        let nodes: Vec<Arc<str>> = self.nodes.read().keys().cloned().collect();
        let table = Subscriptions::default();
        if !nodes.is_empty() {
            let cmds: Vec<redis::Cmd> = nodes
                .iter()
                .map(|n| redis::Cmd::smembers(keys::filters(n)))
                .collect();
            let sets: Vec<Vec<String>> = self.redis.query_each(&cmds).await?;
            for (n, filters) in nodes.iter().zip(sets) {
                for f in filters {
                    table.subscribe(n, &f, Qos::AtMostOnce);
                }
            }
        }
        *self.remote.write() = Arc::new(table);
        Ok(())
    }

    pub(super) async fn write_interest(&self, filters: Vec<String>) -> Result<(), StoreError> {
        let key = keys::filters(&self.id);
        // The set is replaced in one MULTI (no node reads it half-written); the counter, in
        // another slot, moves only once it is.
        let mut replace = redis::pipe();
        replace.atomic().del(&key);
        if !filters.is_empty() {
            replace.sadd(&key, filters);
        }
        self.redis
            .query_steps(&[replace, super::registry::bump_interest()])
            .await
    }

    /// Nodes other than this one that must see a publish on `topic`.
    pub(super) fn nodes_for(&self, topic: &str, retain: bool) -> Vec<(Arc<str>, NodeInfo)> {
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
}
