//! Where the Redis connection comes from: one address (`redis://`, `rediss://` with TLS,
//! `unix://`), the current master of a Sentinel set
//! (`redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`), looked up again
//! after every outage so that a failover is followed, or a Redis Cluster
//! (`redis+cluster://[[user]:password@]host:port[,host:port...][/]`, `rediss+cluster://`
//! with TLS), whose topology redis-rs follows by itself for the cold commands (MOVED, ASK,
//! failover) while `slots` keeps a map of it for the hot path's own connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

use super::lineage::Lineage;
use super::slots::{Addr, SlotMap};
use super::{resp, CALL_TIMEOUT};

/// The connection in use and how to find it again.
pub(super) struct Endpoint {
    target: Target,
    /// For the hot path's own connections to a `rediss://` server (or TLS cluster nodes).
    pub(super) tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// Bumped when the store comes back after an outage: the hot-path connections (`Hot`)
    /// are made again then, to whatever server `current` names.
    epoch: AtomicU64,
    /// Which copy of each client's keys is served (see `lineage`).
    pub(super) lineage: Lineage,
    /// One server: the `run_id` of the server last seen (a restart or another server
    /// changes it, and with it the lineage).
    run_id: parking_lot::Mutex<Option<String>>,
}

// One per process, behind an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Target {
    /// One server: a fixed address, or whichever is Sentinel's master.
    Server {
        sentinel: Option<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
        current: parking_lot::RwLock<Current>,
    },
    Cluster(Cluster),
}

/// The server in use: a connection manager for the cold commands, and its address and
/// settings for the hot path's own connections.
struct Current {
    manager: ConnectionManager,
    info: redis::ConnectionInfo,
}

/// A Redis Cluster: redis-rs's cluster connection for the cold commands, and what the hot
/// path needs to talk to the shards itself.
struct Cluster {
    conn: ClusterConnection,
    /// The first seed: its settings (password, TLS) are every node's, and its host stands
    /// in for a node that does not know its own address.
    seed: redis::ConnectionInfo,
    slots: parking_lot::RwLock<Arc<SlotMap>>,
    /// One `CLUSTER SLOTS` at a time: writers that hit MOVED together share one refresh.
    refreshing: tokio::sync::Mutex<()>,
    /// The probe's own connection to each primary (see `check_primaries`).
    probes: tokio::sync::Mutex<HashMap<Addr, resp::Conn>>,
}

/// A connection for the cold commands, whatever the target: clones share the underlying
/// connection(s).
#[derive(Clone)]
pub(super) enum ColdConn {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for ColdConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            ColdConn::Server(c) => c.req_packed_command(cmd),
            ColdConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            ColdConn::Server(c) => c.req_packed_commands(pipeline, offset, count),
            ColdConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            ColdConn::Server(c) => c.get_db(),
            ColdConn::Cluster(c) => c.get_db(),
        }
    }
}

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(CALL_TIMEOUT))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
}

fn timed_out(what: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        what.to_string(),
    ))
}

async fn current(client: redis::Client) -> redis::RedisResult<Current> {
    let info = client.get_connection_info().clone();
    let manager = tokio::time::timeout(
        CALL_TIMEOUT,
        ConnectionManager::new_with_config(client, manager_config()),
    )
    .await
    .map_err(|_| timed_out("connect timed out"))??;
    Ok(Current { manager, info })
}

impl Endpoint {
    pub(super) async fn open(
        url: &str,
        ca: Option<&std::path::Path>,
    ) -> redis::RedisResult<Endpoint> {
        if let Some(spec) = ClusterSpec::parse(url) {
            return Endpoint::open_cluster(spec?, ca).await;
        }
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            let (client, tls) = if url.starts_with("rediss://") {
                redis_tls(url, ca)?
            } else {
                (redis::Client::open(url)?, None)
            };
            let current = current(client).await?;
            let endpoint = Endpoint::server(None, current, tls);
            endpoint.note_server(false).await?;
            return Ok(endpoint);
        };
        let mut sentinel = sentinel_client(rest)?;
        let current = current(sentinel.async_get_client().await?).await?;
        let endpoint = Endpoint::server(Some(tokio::sync::Mutex::new(sentinel)), current, None);
        endpoint.note_server(false).await?;
        Ok(endpoint)
    }

    /// One server: reads its `run_id`. Another server than last time (a Sentinel failover)
    /// starts a new lineage for every key (`lineage`); so does the same server restarted,
    /// unless it cannot have lost a write anyone read (`appendfsync always`: Redis sends no
    /// reply before the write it saw is on disk).
    async fn note_server(&self, moved: bool) -> redis::RedisResult<()> {
        let Target::Server { current, .. } = &self.target else {
            return Ok(());
        };
        let mut manager = current.read().manager.clone();
        let info: String = self
            .timed(redis::cmd("INFO").arg("server"), &mut manager)
            .await?;
        let Some(id) = info_field(&info, "run_id") else {
            return Err(protocol_error("INFO server without run_id", String::new()));
        };
        let known = self.run_id.lock().clone();
        if known.as_deref().is_some_and(|k| k != id)
            && (moved || !self.lossless(&mut manager).await)
        {
            self.lineage.replaced();
            tracing::warn!(
                "redis is another server, or restarted and may have lost writes: connections \
                 that read outboxes before re-read them"
            );
        }
        *self.run_id.lock() = Some(id.to_string());
        Ok(())
    }

    /// Whether the server writes every change to disk before it answers (`aof_enabled`,
    /// `appendfsync always`). A server that does not say is taken to lose writes.
    async fn lossless(&self, manager: &mut ConnectionManager) -> bool {
        let aof = self
            .timed::<String>(redis::cmd("INFO").arg("persistence"), manager)
            .await
            .is_ok_and(|i| info_field(&i, "aof_enabled") == Some("1"));
        let fsync = self
            .timed::<Vec<String>>(redis::cmd("CONFIG").arg("GET").arg("appendfsync"), manager)
            .await
            .is_ok_and(|v| v.get(1).is_some_and(|f| f == "always"));
        aof && fsync
    }

    async fn timed<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        manager: &mut ConnectionManager,
    ) -> redis::RedisResult<T> {
        tokio::time::timeout(CALL_TIMEOUT, cmd.query_async(manager))
            .await
            .map_err(|_| timed_out("redis call timed out"))?
    }

    fn server(
        sentinel: Option<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
        current: Current,
        tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    ) -> Endpoint {
        Endpoint {
            target: Target::Server {
                sentinel,
                current: parking_lot::RwLock::new(current),
            },
            tls,
            epoch: AtomicU64::new(0),
            lineage: Lineage::server(),
            run_id: parking_lot::Mutex::new(None),
        }
    }

    /// Connects to the seeds and reads the slot map. Like a single server, a cluster that
    /// cannot be reached or does not serve every slot fails the start.
    async fn open_cluster(
        spec: ClusterSpec,
        ca: Option<&std::path::Path>,
    ) -> redis::RedisResult<Endpoint> {
        let (root_cert, tls) = if spec.tls {
            let (pem, config) = tls_trust(ca)?;
            (pem, Some(config))
        } else {
            (None, None)
        };
        let client = spec.client(root_cert)?;
        let conn = tokio::time::timeout(CALL_TIMEOUT, client.get_async_connection())
            .await
            .map_err(|_| timed_out("cluster connect timed out"))??;
        let seed = spec.seeds[0].clone();
        let endpoint = Endpoint {
            target: Target::Cluster(Cluster {
                conn,
                seed,
                slots: parking_lot::RwLock::new(Arc::new(SlotMap::empty())),
                refreshing: tokio::sync::Mutex::new(()),
                probes: tokio::sync::Mutex::new(HashMap::new()),
            }),
            tls,
            epoch: AtomicU64::new(0),
            lineage: Lineage::cluster(),
            run_id: parking_lot::Mutex::new(None),
        };
        endpoint.refresh().await?;
        Ok(endpoint)
    }

    pub(super) fn conn(&self) -> ColdConn {
        match &self.target {
            Target::Server { current, .. } => ColdConn::Server(current.read().manager.clone()),
            Target::Cluster(c) => ColdConn::Cluster(c.conn.clone()),
        }
    }

    /// Where the hot path connects. On a cluster this names the first seed, which serves
    /// only its own slots: the hot path connects per shard there (`node_info`).
    pub(super) fn info(&self) -> redis::ConnectionInfo {
        match &self.target {
            Target::Server { current, .. } => current.read().info.clone(),
            Target::Cluster(c) => c.seed.clone(),
        }
    }

    /// Which connection generation is current (see `reconnected`).
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The store came back after an outage: hot connections are made again, to whatever
    /// server `current` names now.
    pub(super) fn reconnected(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Checks a `store.redis_url` without connecting.
    pub(super) fn validate(url: &str) -> Result<(), String> {
        let r = match (
            ClusterSpec::parse(url),
            url.strip_prefix("redis+sentinel://"),
        ) {
            (Some(spec), _) => spec.and_then(|s| s.client(None)).map(|_| ()),
            (None, Some(rest)) => sentinel_client(rest).map(|_| ()),
            (None, None) => redis::Client::open(url).map(|_| ()),
        };
        r.map_err(|e| format!("{}: {e}", redacted_url(url)))
    }

    /// The active probe's question: does the store answer? One server: a PING. A cluster:
    /// every primary of the slot map answers `CLUSTER INFO` with `cluster_state:ok`. (Not a
    /// PING through redis-rs: its fan-out skips nodes it has no connection to, so a dead
    /// primary would go unnoticed.)
    pub(super) async fn ping(&self) -> redis::RedisResult<()> {
        match &self.target {
            Target::Server { current, .. } => {
                let mut manager = current.read().manager.clone();
                let cmd = redis::cmd("PING");
                cmd.query_async::<String>(&mut manager).await.map(|_| ())
            }
            Target::Cluster(c) => {
                let map = c.slots.read().clone();
                c.check_primaries(&map, self.tls.as_ref()).await
            }
        }
    }

    /// After an outage: with Sentinel, connect to whoever is master now; on a cluster,
    /// read the slot map again (redis-rs follows the topology by itself) and insist that
    /// every slot is served by a primary that answers and says the cluster is ok, so that
    /// the store stays down until a failover is over rather than going up and down with
    /// each call to the dead primary. A plain URL's connection manager reconnects by itself.
    pub(super) async fn refresh(&self) -> redis::RedisResult<()> {
        match &self.target {
            Target::Server {
                sentinel: Some(sentinel),
                current: server,
            } => {
                let client = sentinel.lock().await.async_get_client().await?;
                let fresh = current(client).await?;
                let moved = {
                    let mut now = server.write();
                    let moved = now.info.addr() != fresh.info.addr();
                    *now = fresh;
                    moved
                };
                self.note_server(moved).await?;
            }
            Target::Server { sentinel: None, .. } => self.note_server(false).await?,
            Target::Cluster(c) => {
                let map = self.refresh_slots().await?;
                let served = map.served();
                if served < super::slots::SLOTS {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                        "redis cluster does not serve every slot",
                        format!("{served} of {} served", super::slots::SLOTS),
                    )));
                }
                c.check_primaries(&map, self.tls.as_ref()).await?;
            }
        }
        Ok(())
    }

    /// Whether the store is a Redis Cluster (the hot path then splits its pipelines by
    /// shard).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The slot map as last read; `None` unless the store is a cluster.
    pub(super) fn slots(&self) -> Option<Arc<SlotMap>> {
        match &self.target {
            Target::Cluster(c) => Some(c.slots.read().clone()),
            Target::Server { .. } => None,
        }
    }

    /// Reads the slot map again (`CLUSTER SLOTS`, asked through the cluster connection)
    /// and returns it: after a MOVED, or a connection to a shard failed. Callers that ask
    /// while a refresh runs get that refresh's map rather than one more round trip each.
    pub(super) async fn refresh_slots(&self) -> redis::RedisResult<Arc<SlotMap>> {
        let Target::Cluster(c) = &self.target else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "not a redis cluster",
            )));
        };
        let seen = c.slots.read().clone();
        let _one = c.refreshing.lock().await;
        let now = c.slots.read().clone();
        if !Arc::ptr_eq(&seen, &now) {
            return Ok(now);
        }
        let mut conn = c.conn.clone();
        let mut cmd = redis::cmd("CLUSTER");
        let reply: redis::Value =
            tokio::time::timeout(CALL_TIMEOUT, cmd.arg("SLOTS").query_async(&mut conn))
                .await
                .map_err(|_| timed_out("CLUSTER SLOTS timed out"))??;
        let map = SlotMap::from_cluster_slots(&reply, &host_of(&c.seed))
            .map_err(|e| protocol_error("bad CLUSTER SLOTS reply", e))?;
        let changed = self.lineage.follow(&now, &map);
        if changed > 0 && now.served() > 0 {
            tracing::warn!(
                slots = changed,
                "redis cluster failover: connections that read these slots' outboxes before \
                 re-read them"
            );
        }
        let map = Arc::new(map);
        *c.slots.write() = map.clone();
        Ok(map)
    }

    /// Sends `cmd` to the cluster node at `node` itself, whatever its keys (SCAN walks only
    /// the node it is sent to); on one server, to that server. The node must be one redis-rs
    /// knows (a node of the slot map: both read the same `CLUSTER SLOTS`).
    pub(super) async fn query_node<T: redis::FromRedisValue>(
        &self,
        node: &Addr,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let Target::Cluster(c) = &self.target else {
            return cmd.query_async(&mut self.conn()).await;
        };
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: node.host.clone(),
            port: node.port,
        });
        let reply = c.conn.clone().route_command(cmd.clone(), routing).await?;
        Ok(redis::from_redis_value(reply.extract_error()?)?)
    }

    /// How to connect to the node at `node` (a shard's primary, a MOVED or ASK target)
    /// with this endpoint's password and TLS: for `resp::Conn::connect(&info, tls)`.
    pub(super) fn node_info(&self, node: &Addr) -> redis::ConnectionInfo {
        node_info_from(&self.info(), node)
    }
}

/// `info`'s settings (password, TLS) at `node`'s address.
fn node_info_from(info: &redis::ConnectionInfo, node: &Addr) -> redis::ConnectionInfo {
    let addr = match info.addr() {
        redis::ConnectionAddr::TcpTls { insecure, .. } => redis::ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: *insecure,
            tls_params: None,
        },
        _ => redis::ConnectionAddr::Tcp(node.host.clone(), node.port),
    };
    info.clone().set_addr(addr)
}

/// `CLUSTER INFO`, encoded once.
const CLUSTER_INFO: &[u8] = b"*2\r\n$7\r\nCLUSTER\r\n$4\r\nINFO\r\n";

impl Cluster {
    /// Every primary of `map` answers `CLUSTER INFO` with `cluster_state:ok`, over
    /// connections of the probe's own (made as the hot path makes its: `node_info`, `tls`).
    /// An error names the first primary that did not; it is an I/O error, which marks the
    /// store down.
    async fn check_primaries(
        &self,
        map: &SlotMap,
        tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
    ) -> redis::RedisResult<()> {
        let mut probes = self.probes.lock().await;
        probes.retain(|addr, _| map.shard_by_primary(addr).is_some());
        for shard in map.shards() {
            let addr = &shard.primary;
            // Out of the map while in use: a call cancelled by its timeout drops it rather
            // than leaving a reply behind for the next one to read.
            let conn = probes.remove(addr);
            match cluster_info(conn, &node_info_from(&self.seed, addr), tls).await {
                Ok(conn) => {
                    probes.insert(addr.clone(), conn);
                }
                Err(why) => {
                    return Err(redis::RedisError::from(std::io::Error::other(format!(
                        "redis cluster primary {addr}: {why}"
                    ))))
                }
            }
        }
        Ok(())
    }
}

/// Asks one node `CLUSTER INFO` (connecting first if `conn` is `None`); the connection back
/// if it says `cluster_state:ok`.
async fn cluster_info(
    conn: Option<resp::Conn>,
    info: &redis::ConnectionInfo,
    tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
) -> Result<resp::Conn, String> {
    let mut conn = match conn {
        Some(c) => c,
        None => resp::Conn::connect(info, tls)
            .await
            .map_err(|e| e.to_string())?,
    };
    conn.round_trip(CLUSTER_INFO, 1)
        .await
        .map_err(|e| e.to_string())?;
    let state = match resp::Replies::new(conn.replies()).next() {
        Ok(resp::Reply::Bulk(Some(text))) => String::from_utf8_lossy(text)
            .lines()
            .find_map(|l| l.strip_prefix("cluster_state:"))
            .map(|s| s.trim().to_string()),
        Ok(resp::Reply::Error(e)) => return Err(String::from_utf8_lossy(e).into_owned()),
        Ok(other) => return Err(format!("unexpected CLUSTER INFO reply {other:?}")),
        Err(e) => return Err(e.to_string()),
    };
    match state.as_deref() {
        Some("ok") => Ok(conn),
        Some(state) => Err(format!("cluster_state:{state}")),
        None => Err("no cluster_state in CLUSTER INFO".into()),
    }
}

/// `name:value` in an `INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

fn host_of(info: &redis::ConnectionInfo) -> String {
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => {
            host.clone()
        }
        _ => String::new(),
    }
}

fn protocol_error(what: &'static str, detail: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Parse, what, detail))
}

/// A `redis+cluster://` or `rediss+cluster://` URL, parsed.
struct ClusterSpec {
    tls: bool,
    /// Every seed with the URL's username and password; never empty.
    seeds: Vec<redis::ConnectionInfo>,
}

impl ClusterSpec {
    /// `None` if `url` is not a cluster URL. After the scheme:
    /// `[[user]:password@]host:port[,host:port...][/[0]]`. The password is taken as written
    /// (no percent-decoding), as in `redis+sentinel://`; a cluster has database 0 only.
    fn parse(url: &str) -> Option<redis::RedisResult<ClusterSpec>> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
            (false, rest)
        } else {
            (true, url.strip_prefix("rediss+cluster://")?)
        };
        Some(ClusterSpec::parse_rest(tls, rest))
    }

    fn parse_rest(tls: bool, spec: &str) -> redis::RedisResult<ClusterSpec> {
        let invalid = |why: String| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "bad cluster URL",
                why,
            ))
        };
        // The password may hold '@' or '/': the host list starts after the last '@'.
        let (auth, rest) = match spec.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, spec),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !matches!(path, "" | "0") {
            return Err(invalid(format!(
                "/{path}: a Redis Cluster has database 0 only"
            )));
        }
        let mut settings = redis::RedisConnectionInfo::default();
        if let Some(auth) = auth {
            let Some((user, password)) = auth.split_once(':') else {
                return Err(invalid(
                    "credentials must be :password or user:password".into(),
                ));
            };
            if !user.is_empty() {
                settings = settings.set_username(user);
            }
            if !password.is_empty() {
                settings = settings.set_password(password);
            }
        }
        let mut seeds = Vec::new();
        for host in hosts.split(',') {
            let addr = Addr::parse(host)
                .filter(|a| !a.host.is_empty())
                .ok_or_else(|| invalid(format!("{host:?} is not host:port")))?;
            let addr = if tls {
                redis::ConnectionAddr::TcpTls {
                    host: addr.host,
                    port: addr.port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                redis::ConnectionAddr::Tcp(addr.host, addr.port)
            };
            let info = redis::IntoConnectionInfo::into_connection_info(addr)?
                .set_redis_settings(settings.clone());
            seeds.push(info);
        }
        Ok(ClusterSpec { tls, seeds })
    }

    /// The cluster client. Retries are few and short: every call is bounded by
    /// `CALL_TIMEOUT` anyway, and a MOVED or ASK is followed at once.
    fn client(
        &self,
        root_cert: Option<Vec<u8>>,
    ) -> redis::RedisResult<redis::cluster::ClusterClient> {
        let mut b = redis::cluster::ClusterClientBuilder::new(self.seeds.clone())
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(CALL_TIMEOUT)
            .overall_response_timeout(Some(CALL_TIMEOUT))
            .retries(5)
            .min_retry_wait(20)
            .max_retry_wait(500);
        if let Some(pem) = root_cert {
            b = b.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            });
        }
        b.build()
    }
}

/// A `rediss://` client for the cold commands and the same trust for the hot path: the CA in
/// `store.redis_ca` (managed Redis with a private CA) or the system's roots.
fn redis_tls(
    url: &str,
    ca: Option<&std::path::Path>,
) -> redis::RedisResult<(
    redis::Client,
    Option<Arc<tokio_rustls::rustls::ClientConfig>>,
)> {
    let (root_cert, config) = tls_trust(ca)?;
    let client = match root_cert {
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            },
        )?,
        None => redis::Client::open(url)?,
    };
    Ok((client, Some(config)))
}

/// What a TLS connection to Redis trusts: the CA in `store.redis_ca` (its PEM for redis-rs,
/// and a client config for the hot path), or else the system's roots (redis-rs finds them
/// itself: no PEM).
fn tls_trust(
    ca: Option<&std::path::Path>,
) -> redis::RedisResult<(Option<Vec<u8>>, Arc<tokio_rustls::rustls::ClientConfig>)> {
    let fail = |e: String| redis::RedisError::from(std::io::Error::other(e));
    match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| fail(format!("store.redis_ca: {}: {e}", path.display())))?;
            let config = crate::transport::client_config(path, None)
                .map_err(|e| fail(format!("store.redis_ca: {e}")))?;
            Ok((Some(pem), config))
        }
        None => Ok((None, system_roots().map_err(fail)?)),
    }
}

/// A client config that trusts the system's roots (a managed Redis with a public CA).
fn system_roots() -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use tokio_rustls::rustls;
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err("rediss://: no trusted roots found on this system; set store.redis_ca".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `url` with its password replaced by `***`, for logs and errors.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // Userinfo ends at the last '@': a password may itself hold '@', and the Sentinel and
    // cluster parsers take a raw '/' in it too (they split at the last '@' of the whole URL),
    // so stopping at the first '/' could show the rest of such a password.
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{shown}{}", &rest[at..])
}

/// `[:password@]host:port[,host:port...]/service[/db]` after the scheme.
fn sentinel_client(spec: &str) -> redis::RedisResult<redis::sentinel::SentinelClient> {
    use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
    let invalid = |why: &str| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "bad sentinel URL",
            why.to_string(),
        ))
    };
    let (auth, rest) = match spec.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, spec),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or_else(|| invalid("missing /service"))?;
    let mut path = path.split('/');
    let service = path
        .next()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("missing service name"))?;
    let db: i64 = match path.next() {
        Some(d) if !d.is_empty() => d.parse().map_err(|_| invalid("db is not a number"))?,
        _ => 0,
    };
    let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
    let mut redis_info = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(password) = auth.and_then(|a| a.strip_prefix(':').or(Some(a))) {
        if !password.is_empty() {
            redis_info = redis_info.set_password(password);
        }
    }
    let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis_info);
    SentinelClient::build(sentinels, service, Some(node), SentinelServerType::Master)
}

#[cfg(test)]
mod url_tests {
    use super::{redacted_url, ClusterSpec, Endpoint};
    use crate::redis::slots::Addr;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redacted_url("redis://:pw@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(
            redacted_url("rediss://u:p@ss@h:1/2"),
            "rediss://u:***@h:1/2"
        );
        assert_eq!(redacted_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(
            redacted_url("redis+sentinel://:pw@a:1,b:2/m/0"),
            "redis+sentinel://:***@a:1,b:2/m/0"
        );
        // A raw '/' in a Sentinel password must not end the redaction early.
        assert_eq!(
            redacted_url("redis+sentinel://:p/w@a:1/m"),
            "redis+sentinel://:***@a:1/m"
        );
    }

    #[test]
    fn cluster_passwords_are_hidden() {
        assert_eq!(
            redacted_url("redis+cluster://:pw@a:1,b:2,c:3/"),
            "redis+cluster://:***@a:1,b:2,c:3/"
        );
        assert_eq!(
            redacted_url("rediss+cluster://user:p@s/s@a:1,b:2"),
            "rediss+cluster://user:***@a:1,b:2"
        );
        assert_eq!(
            redacted_url("redis+cluster://a:1,b:2"),
            "redis+cluster://a:1,b:2"
        );
        // Errors carry the redacted URL, never the password.
        let err = Endpoint::validate("redis+cluster://:s3cret@a:1/5").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.contains(":***@a:1"), "{err}");
        let err = Endpoint::validate("redis+cluster://:s3cret@nohost").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    fn seeds(url: &str) -> Vec<(String, u16, bool)> {
        let spec = ClusterSpec::parse(url)
            .expect("a cluster URL")
            .expect("valid");
        spec.seeds
            .iter()
            .map(|i| match i.addr() {
                redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p, false),
                redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port, true),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn cluster_urls() {
        assert_eq!(
            seeds("redis+cluster://10.0.0.1:7000,10.0.0.2:7001/"),
            vec![
                ("10.0.0.1".to_string(), 7000, false),
                ("10.0.0.2".to_string(), 7001, false)
            ]
        );
        assert_eq!(
            seeds("rediss+cluster://[::1]:7000/0"),
            vec![("::1".to_string(), 7000, true)]
        );
        let spec = ClusterSpec::parse("redis+cluster://app:p@ss,w/d@h:1,h:2")
            .unwrap()
            .unwrap();
        assert!(!spec.tls);
        for seed in &spec.seeds {
            let settings = seed.redis_settings();
            assert_eq!(settings.username(), Some("app"));
            assert_eq!(settings.password(), Some("p@ss,w/d"));
            assert_eq!(settings.db(), 0);
        }
        let spec = ClusterSpec::parse("redis+cluster://:pw@h:1")
            .unwrap()
            .unwrap();
        assert_eq!(spec.seeds[0].redis_settings().username(), None);
        assert_eq!(spec.seeds[0].redis_settings().password(), Some("pw"));

        assert!(ClusterSpec::parse("redis://h:1").is_none());
        assert!(ClusterSpec::parse("redis+sentinel://h:1/m").is_none());
        for bad in [
            "redis+cluster://",
            "redis+cluster://h",
            "redis+cluster://h:1,",
            "redis+cluster://h:1,h",
            "redis+cluster://:7000",
            "redis+cluster://h:1/3",
            "redis+cluster://pw@h:1",
        ] {
            assert!(ClusterSpec::parse(bad).unwrap().is_err(), "{bad}");
            assert!(Endpoint::validate(bad).is_err(), "{bad}");
        }
        assert!(Endpoint::validate("redis+cluster://h:1,h:2/").is_ok());
        assert!(Endpoint::validate("rediss+cluster://h:1").is_ok());
        // The plain and Sentinel schemes are checked as before.
        assert!(Endpoint::validate("redis://h:1/0").is_ok());
        assert!(Endpoint::validate("redis+sentinel://h:1/m/0").is_ok());
        assert!(Endpoint::validate("redis+sentinel://h:1").is_err());
    }

    #[test]
    fn node_settings_follow_the_seed() {
        let spec = ClusterSpec::parse("rediss+cluster://:pw@seed:1")
            .unwrap()
            .unwrap();
        let info = super::node_info_from(&spec.seeds[0], &Addr::new("10.0.0.9", 7005));
        match info.addr() {
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                assert_eq!((host.as_str(), *port), ("10.0.0.9", 7005))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(info.redis_settings().password(), Some("pw"));
    }
}
