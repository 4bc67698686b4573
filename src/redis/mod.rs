//! Redis: the one module that talks to it. It owns the key schema (`keys`), the scripts
//! (`scripts`), the connection (one address, Sentinel, TLS or Redis Cluster: `endpoint`;
//! a cluster's hash slots and redirects: `slots`), the hot path's own RESP connections
//! (`hot`, `resp`) and the store's health. The outbox (`outbox::redis`) and
//! the cluster (`cluster`) use it and never each other's keys.
//!
//! Two kinds of connection: every cold call (attach, fetch, subscriptions, the cluster's
//! routes and registry) shares one redis-rs multiplexed connection, pipelined by the driver,
//! through `Redis::query`, `query_pipe` and `invoke` (and, where keys of many hash slots meet,
//! `query_each`, `query_steps` and `scan`: see `cold`); the outbox's two writer tasks each own
//! a `Hot` connection speaking RESP directly (see `resp` for why).
//!
//! Availability: any I/O error or timeout marks the store down (logged once), and so does
//! the active probe, a PING every second, when it gets no answer within `PROBE_TIMEOUT`
//! (so a Redis that hangs with no traffic flowing is noticed too). While down,
//! calls fail at once without touching Redis (CONNECT gets CONNACK 3, QoS 1 is not
//! acknowledged), and one task pings Redis with backoff until it answers and has the
//! scripts again (logged once); the hot connections are then made again.

mod cold;
mod endpoint;
mod hot;
pub mod keys;
mod lineage;
pub(crate) mod resp;
mod routed;
pub mod scripts;
pub mod slots;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::metrics;

pub use cold::Scan;
pub use endpoint::redacted_url;
use endpoint::Endpoint;
pub(crate) use hot::Hot;
pub(crate) use routed::Part;
use scripts::Scripts;

/// What a store call can fail with. The memory store never fails; Redis can be down.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Upper bound on any one Redis call, so that a stalled Redis never hangs a client.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How often the active probe pings Redis, and how long it waits for the answer.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether Redis answers. Shared by every user of the connection.
pub struct Health {
    up: AtomicBool,
    wake: Notify,
    /// The last probe's round trip, in microseconds.
    ping_us: AtomicU64,
}

impl Health {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The last active probe's round trip, in seconds.
    pub fn ping_secs(&self) -> f64 {
        self.ping_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// `Err` while the store is down: callers fail at once.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.is_up() {
            Ok(())
        } else {
            Err(StoreError::Unavailable("redis is down".into()))
        }
    }

    pub fn mark_down(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::error!(
                error = why,
                "redis unavailable: refusing new connections, holding QoS 1 acks"
            );
            self.wake.notify_one();
        }
    }

    /// A redis-rs error: marks the store down if it means the server is gone.
    pub fn failed(&self, e: redis::RedisError) -> StoreError {
        // A missing script (Redis restarted) or a read-only server (a demoted master after a
        // Sentinel failover) is fixed the same way as a lost connection: reconnect and
        // reload.
        let server_gone = matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::NoScript | redis::ServerErrorKind::ReadOnly
            )
        );
        if server_gone
            || e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
        {
            self.mark_down(&e.to_string());
        }
        metrics::store_error();
        StoreError::Unavailable(e.to_string())
    }

    /// An error reply on a hot connection, with the same rules as `failed`.
    pub fn error_reply(&self, e: &[u8]) -> StoreError {
        let why = String::from_utf8_lossy(e).into_owned();
        if e.starts_with(b"NOSCRIPT") || e.starts_with(b"READONLY") {
            self.mark_down(&why);
        }
        metrics::store_error();
        StoreError::Unavailable(why)
    }
}

/// The node's connection to Redis (cloned handles share it).
#[derive(Clone)]
pub struct Redis {
    endpoint: Arc<Endpoint>,
    health: Arc<Health>,
    scripts: Arc<Scripts>,
}

impl Redis {
    /// Connects to `url` and loads the scripts. Fails at start if Redis cannot be reached:
    /// a misconfigured URL should stop the broker, not leave it refusing every client.
    pub async fn connect(url: &str, ca: Option<&std::path::Path>) -> Result<Redis, StoreError> {
        let shown = redacted_url(url);
        let unavailable =
            |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("{shown}: {e}"));
        let endpoint = Arc::new(Endpoint::open(url, ca).await.map_err(|e| unavailable(&e))?);
        let scripts = Arc::new(Scripts::new());
        // On a cluster, SCRIPT LOAD goes to every node the cluster connection knows,
        // replicas too, so a promoted replica has them; a node it skipped answers NOSCRIPT
        // later, which marks the store down and brings it back through `health_loop`.
        scripts
            .load(&mut endpoint.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let health = Arc::new(Health {
            up: AtomicBool::new(true),
            wake: Notify::new(),
            ping_us: AtomicU64::new(0),
        });
        tokio::spawn(health_loop(
            endpoint.clone(),
            health.clone(),
            scripts.clone(),
        ));
        tokio::spawn(probe_loop(endpoint.clone(), health.clone()));
        Ok(Redis {
            endpoint,
            health,
            scripts,
        })
    }

    /// Checks a `store.redis_url` without connecting.
    pub fn validate_url(url: &str) -> Result<(), String> {
        Endpoint::validate(url)
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    pub fn scripts(&self) -> &Scripts {
        &self.scripts
    }

    /// Which copy of `client`'s keys the store serves now (`lineage`): a connection that
    /// read its outbox under another one must not acknowledge by number.
    pub fn lineage(&self, client: &str) -> u16 {
        self.endpoint.lineage.of(client)
    }

    /// A Redis Cluster's slot map as last read; `None` unless the store is a cluster.
    pub fn slots(&self) -> Option<Arc<slots::SlotMap>> {
        self.endpoint.slots()
    }

    /// Reads a Redis Cluster's slot map again (after a MOVED, or a shard's connection
    /// failed); concurrent callers share one `CLUSTER SLOTS`.
    pub async fn refresh_slots(&self) -> Result<Arc<slots::SlotMap>, StoreError> {
        if !self.endpoint.is_cluster() {
            return Err(StoreError::Unavailable("not a redis cluster".into()));
        }
        self.endpoint
            .refresh_slots()
            .await
            .map_err(|e| self.health.failed(e))
    }

    /// How to reach one node of a Redis Cluster (a shard's primary, a MOVED or ASK target)
    /// with the store's password and TLS settings, for a connection of the hot path's own.
    pub fn node_info(&self, node: &slots::Addr) -> redis::ConnectionInfo {
        self.endpoint.node_info(node)
    }

    /// A hot-path connection for one writer task (made on first use).
    pub(crate) fn hot(&self) -> Hot {
        Hot::new(&self.endpoint)
    }

    /// Runs one call under the call timeout, marking the store down on I/O trouble.
    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.health.check()?;
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.health.failed(e)),
            Err(_) => {
                self.health.mark_down("timed out");
                Err(StoreError::Unavailable("redis call timed out".into()))
            }
        }
    }

    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.endpoint.conn();
        self.call(cmd.query_async(&mut conn)).await
    }

    pub async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        p: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.endpoint.conn();
        self.call(p.query_async(&mut conn)).await
    }

    /// Runs a script by hash alone (`Scripts::load` loaded it); see `scripts` for why.
    pub async fn evalsha<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[&str],
    ) -> Result<T, StoreError> {
        let mut c = redis::cmd("EVALSHA");
        c.arg(script.get_hash()).arg(keys.len()).arg(keys).arg(args);
        self.query(&c).await
    }

    /// Runs a script, loading it first if Redis does not have it.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.endpoint.conn();
        self.call(call.invoke_async(&mut conn)).await
    }
}

/// The active probe: a PING every `PROBE_EVERY` while the store is up (on a cluster, every
/// primary is asked whether the cluster is ok: `Endpoint::ping`); no answer within
/// `PROBE_TIMEOUT` marks it down (then `health_loop` takes over). Ends with the process
/// (the handle holds the connection).
async fn probe_loop(endpoint: Arc<Endpoint>, health: Arc<Health>) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !health.is_up() {
            continue;
        }
        let started = std::time::Instant::now();
        match tokio::time::timeout(PROBE_TIMEOUT, endpoint.ping()).await {
            Ok(Ok(_)) => {
                let us = started.elapsed().as_micros() as u64;
                health.ping_us.store(us, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                health.failed(e);
            }
            Err(_) => health.mark_down("no answer to the probe's PING"),
        }
    }
}

/// While the store is down, tries Redis with backoff until it answers and has the scripts.
async fn health_loop(endpoint: Arc<Endpoint>, health: Arc<Health>, scripts: Arc<Scripts>) {
    loop {
        health.wake.notified().await;
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = async {
                endpoint.refresh().await?;
                scripts.load(&mut endpoint.conn()).await
            };
            let ready = tokio::time::timeout(CALL_TIMEOUT, attempt).await;
            if matches!(ready, Ok(Ok(()))) {
                endpoint.reconnected();
                health.up.store(true, Ordering::Release);
                tracing::warn!("redis available again");
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}
