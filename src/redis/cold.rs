//! Cold calls that touch keys of many hash slots, written once for both kinds of store.
//!
//! On one server (plain or behind Sentinel) each of these is one pipeline, one round trip,
//! as before Redis Cluster was a store. On a cluster a pipeline or a script must stay in one
//! slot (redis-rs refuses a pipeline across slots; Redis answers CROSSSLOT to a script or a
//! MULTI), so:
//! - `query_each`: independent commands (a read per client, a write per key) run
//!   concurrently, each routed to its own slot's node; redis-rs writes the ones bound for
//!   one node together, so this stays about one round trip, and follows MOVED and ASK per
//!   command.
//! - `query_steps`: writes whose order matters (a change, then the counter that tells the
//!   other nodes to read it) run one step after the other, each step one slot and, if it
//!   is a MULTI, still atomic: one round trip per step.
//! - `scan`: SCAN walks only the node it is sent to, so a cluster's keyspace is walked on
//!   every primary in turn.

use redis::{Cmd, FromRedisValue, Pipeline, Value};

use super::slots::Addr;
use super::{Redis, StoreError};

/// A walk over every key that matches a pattern (`Redis::scan`, `Redis::scan_next`).
pub struct Scan {
    pattern: String,
    count: usize,
    /// The nodes still to walk, the one being walked last: `None` for the one server, a
    /// cluster's primaries otherwise.
    nodes: Vec<Option<Addr>>,
    cursor: u64,
}

impl Redis {
    /// Independent commands on keys of any slots; the replies as one pipeline of them would
    /// give them (`T` is read from the array of replies, in the commands' order).
    pub async fn query_each<T: FromRedisValue>(&self, cmds: &[Cmd]) -> Result<T, StoreError> {
        if cmds.is_empty() {
            return redis::from_redis_value(Value::Array(Vec::new()))
                .map_err(|e| StoreError::Unavailable(e.to_string()));
        }
        if !self.endpoint.is_cluster() {
            let mut p = redis::pipe();
            for c in cmds {
                p.add_command(c.clone());
            }
            return self.query_pipe(&p).await;
        }
        let conn = self.endpoint.conn();
        let all = async {
            let replies = futures::future::try_join_all(cmds.iter().map(|c| {
                let mut conn = conn.clone();
                async move { c.query_async::<Value>(&mut conn).await }
            }))
            .await?;
            Ok::<T, redis::RedisError>(redis::from_redis_value(Value::Array(replies))?)
        };
        self.call(all).await
    }

    /// Writes that must land in this order, each step on one slot (a step made `atomic()` is
    /// a MULTI and stays one). Replies are checked for errors, and dropped.
    pub async fn query_steps(&self, steps: &[Pipeline]) -> Result<(), StoreError> {
        if !self.endpoint.is_cluster() {
            return self.query_pipe(&joined(steps)).await;
        }
        let conn = self.endpoint.conn();
        let all = async {
            for step in steps {
                step.query_async::<()>(&mut conn.clone()).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        self.call(all).await
    }

    /// Starts a walk over the keys that match `pattern`, `count` a call (SCAN's COUNT): the
    /// one server, or every primary of the cluster as the slot map names them now. Keys
    /// written or moved between shards during the walk may be missed or seen twice, as
    /// with any SCAN.
    pub fn scan(&self, pattern: &str, count: usize) -> Scan {
        let nodes = match self.endpoint.slots() {
            Some(map) => map
                .shards()
                .iter()
                .rev()
                .map(|s| Some(s.primary.clone()))
                .collect(),
            None => vec![None],
        };
        Scan {
            pattern: pattern.to_string(),
            count,
            nodes,
            cursor: 0,
        }
    }

    /// The next batch of keys of the walk (may be empty), or `None` once it is over.
    pub async fn scan_next(&self, scan: &mut Scan) -> Result<Option<Vec<String>>, StoreError> {
        let Some(node) = scan.nodes.last() else {
            return Ok(None);
        };
        let mut c = redis::cmd("SCAN");
        c.arg(scan.cursor)
            .arg("MATCH")
            .arg(&scan.pattern)
            .arg("COUNT")
            .arg(scan.count);
        let (next, keys): (u64, Vec<String>) = match node {
            None => self.query(&c).await?,
            Some(addr) => self.call(self.endpoint.query_node(addr, &c)).await?,
        };
        scan.cursor = next;
        if next == 0 {
            scan.nodes.pop();
        }
        Ok(Some(keys))
    }
}

/// `steps` as one pipeline for one server, a MULTI step wrapped in MULTI/EXEC. Only the
/// queued commands' replies (QUEUED) are ignored: an error a command met inside the MULTI is
/// in EXEC's reply, and fails the call like any other error.
fn joined(steps: &[Pipeline]) -> Pipeline {
    let mut p = redis::pipe();
    for step in steps {
        let atomic = step.is_transaction();
        if atomic {
            p.cmd("MULTI").ignore();
        }
        for c in step.cmd_iter() {
            p.add_command(c.clone());
            if atomic {
                p.ignore();
            }
        }
        if atomic {
            p.cmd("EXEC");
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::joined;

    fn packed(p: &redis::Pipeline) -> String {
        String::from_utf8_lossy(&p.get_packed_pipeline()).replace("\r\n", " ")
    }

    #[test]
    fn steps_join_into_one_pipeline_with_their_multi() {
        let mut first = redis::pipe();
        first.atomic().del("f").ignore().sadd("f", "a/b").ignore();
        let mut then = redis::pipe();
        then.incr("n", 1).ignore();
        let p = joined(&[first, then]);
        assert!(!p.is_transaction());
        assert_eq!(
            packed(&p),
            "*1 $5 MULTI *2 $3 DEL $1 f *3 $4 SADD $1 f $3 a/b *1 $4 EXEC *3 $6 INCRBY $1 n $1 1 "
        );
    }
}
