//! Listeners, the accept loops, the node's periodic work, graceful shutdown and the drain.
//!
//! Each client transport (TCP, TLS, WebSocket, WebSocket over TLS) is its own listener and
//! accept task; they all hand their streams to the same `session::Connection`, which is
//! generic over the stream. A TLS or WebSocket handshake runs in the connection's own task
//! under `server.connect_timeout`, never in the accept loop, so a client that stalls its
//! handshake holds only its own socket and only until the timeout (`accept`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::auth::Auth;
use crate::broker::Broker;
use crate::cluster::{self, Cluster, LinkSecurity, LinkTls};
use crate::config::Config;
use crate::config::StoreKind;
use crate::descriptors;
use crate::lograte;
use crate::mailbox::Kick;
use crate::metrics;
use crate::outbox::Store;
use crate::readiness::Readiness;
use crate::redis::Redis;
use crate::transport::{self, TlsServer};
use accept::{accept_loop, Accept, Connections};

mod accept;

/// A running Herald node.
pub struct Server {
    cluster: Option<Arc<Cluster>>,
    listeners: Listeners,
    metrics_addr: Option<SocketAddr>,
    /// The backend HTTP API's listener (`http.listen`).
    http_addr: Option<SocketAddr>,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    /// Cancelled when the node stops taking connections (drain or shutdown).
    accepting: CancellationToken,
    connections: Arc<Connections>,
    timeout: Duration,
    tls: Option<Arc<TlsServer>>,
    readiness: Arc<Readiness>,
    /// `POST /admin/drain` cancels it.
    drain_requested: CancellationToken,
}

/// The bound address of each client listener that is on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listeners {
    pub tcp: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// How often stored messages are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// How often the log rate limit's summaries of ended windows are written.
const LOG_SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// How often keepalives are checked: the slack on top of 1.5 times a client's keepalive.
const KEEPALIVE_EVERY: Duration = Duration::from_millis(250);

/// Connections the kernel queues for a listener before `accept`, capped by the kernel's
/// `net.core.somaxconn` (4,096 on current Linux; raise it for storms bigger than that).
/// Rust's default, 128, drops connections in a reconnect storm: 705 of 5,000 clients
/// connecting at once never reached the node in the attack suite.
const BACKLOG: u32 = 65_535;

/// Listening sockets per client address: `SO_REUSEPORT` sockets of this process on one
/// address, each with a kernel accept queue of its own (`BACKLOG`, capped by somaxconn),
/// among which the kernel spreads new connections. With one queue of 4,096, a reconnect
/// storm of 19,000 devices overflowed it in half the runs (herald-bench storm), and every
/// SYN the kernel drops comes back only after TCP's 1 s and 3 s resends.
const ACCEPT_QUEUES: usize = 4;

/// A socket bound to `a`, with `SO_REUSEADDR` (and `SO_REUSEPORT` for a group of accept
/// queues).
fn bound(a: SocketAddr, reuseport: bool) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = match a {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if reuseport {
        socket.set_reuseport(true)?;
    }
    socket.bind(a)?;
    Ok(socket)
}

fn cannot_listen(a: SocketAddr, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}"))
}

/// Binds a client listener: `ACCEPT_QUEUES` sockets on `addr`. A plain bind comes first, so
/// that an address another process listens on fails as it would without `SO_REUSEPORT`
/// (rather than joining its group), and port 0 is resolved once for all of them.
async fn bind_clients(addr: Option<SocketAddr>) -> std::io::Result<Vec<TcpListener>> {
    let Some(a) = addr else {
        return Ok(Vec::new());
    };
    let group = || -> std::io::Result<Vec<TcpListener>> {
        let a = bound(a, false)?.local_addr()?;
        (0..ACCEPT_QUEUES)
            .map(|_| bound(a, true)?.listen(BACKLOG))
            .collect()
    };
    group().map_err(|e| cannot_listen(a, e))
}

fn local_of(l: &[TcpListener]) -> std::io::Result<Option<SocketAddr>> {
    l.first().map(|l| l.local_addr()).transpose()
}

async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    let Some(a) = addr else {
        return Ok(None);
    };
    bound(a, false)
        .and_then(|s| s.listen(BACKLOG))
        .map(Some)
        .map_err(|e| cannot_listen(a, e))
}

fn local(l: &Option<TcpListener>) -> std::io::Result<Option<SocketAddr>> {
    l.as_ref().map(|l| l.local_addr()).transpose()
}

impl Server {
    /// Binds the listeners and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: Config) -> std::io::Result<Server> {
        metrics::init(config.metrics.listen.is_some());
        // The redis crate builds its rustls configs with the process default; Herald's own
        // code names the ring provider itself. Already installed (a second server in one
        // process, or an embedding program's choice) is fine.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let s = &config.server;
        let tcp = bind_clients(s.listen).await?;
        let tls_l = bind_clients(s.tls_listen).await?;
        let ws = bind_clients(s.ws_listen).await?;
        let wss = bind_clients(s.wss_listen).await?;
        let listeners = Listeners {
            tcp: local_of(&tcp)?,
            tls: local_of(&tls_l)?,
            ws: local_of(&ws)?,
            wss: local_of(&wss)?,
        };
        let tls = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                TlsServer::load(cert, key, config.tls.client_ca.as_deref())
                    .map_err(std::io::Error::other)?,
            )),
            _ => None,
        };
        let auth = Arc::new(Auth::load(&config).map_err(std::io::Error::other)?);
        let metrics_listener = bind(config.metrics.listen).await?;
        let metrics_addr = local(&metrics_listener)?;
        let http_listener = bind(config.http.listen).await?;
        let http_addr = local(&http_listener)?;
        let shutdown = CancellationToken::new();
        let readiness = Arc::new(Readiness::new());
        let drain_requested = CancellationToken::new();
        metrics::readiness(false, false);
        // Served from now on: /healthz answers while Redis is being reached, /readyz says
        // why the node is not ready yet.
        if let Some(l) = metrics_listener {
            let admin = Arc::new(Admin {
                readiness: readiness.clone(),
                drain: drain_requested.clone(),
                can_drain: config.cluster.listen.is_some(),
            });
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = admin::serve(l, admin) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        let timeout = config.server.shutdown_timeout;
        // Every listener is bound before Redis is reached: a process that is up has all its
        // ports.
        let cluster_listener = bind(config.cluster.listen).await?;
        let redis = match config.store.kind {
            StoreKind::Redis => Some(
                Redis::connect(&config.store.redis_url, config.store.redis_ca.as_deref())
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            ),
            StoreKind::Memory => None,
        };
        if let Some(r) = &redis {
            readiness.watch_store(r.health().clone());
        }
        let port = listeners
            .tcp
            .or(listeners.tls)
            .or(listeners.ws)
            .or(listeners.wss)
            .map_or(0, |a| a.port());
        let node_id = config
            .cluster
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{}:{port}", hostname()));
        let cluster = match (&cluster_listener, &redis) {
            (Some(l), Some(redis)) => {
                let c = &config.cluster;
                let settings = cluster::Settings {
                    id: node_id.clone(),
                    advertise: c.advertise.unwrap_or(l.local_addr()?),
                    sweep_interval: c.sweep_interval,
                    node_ttl: c.node_ttl,
                    security: link_security(&config, tls.as_ref())?,
                };
                Some(Arc::new(Cluster::new(settings, redis.clone())))
            }
            // The configuration check refuses a cluster without the Redis store.
            _ => None,
        };
        let mut store = Store::open(&config, redis, &node_id);
        if let (Some((feed, wake)), Some(url)) =
            (store.take_hook_feed(), config.http.receipt_webhook.clone())
        {
            tokio::spawn(crate::receipts::hooks::run(
                feed,
                wake,
                url,
                shutdown.clone(),
            ));
        }
        let broker = Arc::new(
            Broker::open(config, store, cluster.clone(), auth)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?,
        );
        let connections = Arc::new(Connections::default());
        if let (Some(c), Some(l)) = (&cluster, cluster_listener) {
            let max_packet = broker.config().server.max_packet_size;
            c.start(broker.clone(), l, max_packet, shutdown.clone())
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        {
            let broker = broker.clone();
            let stop = shutdown.clone();
            let readiness = readiness.clone();
            let cluster = cluster.clone();
            let sampled = metrics_addr.is_some();
            tokio::spawn(async move {
                let mut sweep = tokio::time::interval(SWEEP_EVERY);
                let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
                keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut logs = tokio::time::interval(LOG_SUMMARY_EVERY);
                let mut memory = tokio::time::interval(MEMORY_EVERY);
                let mut sample = tokio::time::interval(SAMPLE_EVERY);
                sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut census = 0;
                let guarded = broker.guard().limit() > 0;
                let mut last = tokio::time::Instant::now();
                loop {
                    tokio::select! {
                        _ = sweep.tick() => broker.store().sweep().await,
                        t = keepalive.tick() => {
                            let late = t.elapsed() + t.duration_since(last);
                            last = t;
                            tick(&broker, late);
                        }
                        _ = memory.tick(), if guarded => guard_memory(&broker),
                        _ = sample.tick(), if sampled => {
                            census = (census + 1) % CENSUS_EVERY;
                            record_sample(&broker, &readiness, cluster.as_deref(), census == 1);
                        }
                        _ = logs.tick() => lograte::flush(),
                        _ = stop.cancelled() => return,
                    }
                }
            });
        }
        let capacity = match descriptors::raise() {
            Ok(l) => {
                let capacity = l.capacity().min(broker.config().server.max_connections);
                tracing::info!(
                    capacity,
                    max_connections = broker.config().server.max_connections,
                    descriptor_limit = l.soft,
                    reserved = l.reserve(),
                    "connection capacity"
                );
                capacity
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the descriptor limit");
                broker.config().server.max_connections
            }
        };
        if broker.guard().limit() > 0 {
            tracing::info!(
                max_memory_mib = broker.guard().limit() >> 20,
                "memory guard on"
            );
        }
        let accepting = shutdown.child_token();
        let accept = Accept {
            broker: broker.clone(),
            shutdown: shutdown.clone(),
            accepting: accepting.clone(),
            connections: connections.clone(),
            tls: tls.clone(),
            capacity,
            spare: descriptors::Spare::new(),
        };
        let accept = Arc::new(accept);
        for (l, kind) in [
            (tcp, Transport::Tcp),
            (tls_l, Transport::Tls),
            (ws, Transport::Ws),
            (wss, Transport::Wss),
        ] {
            for l in l {
                tokio::spawn(accept_loop(l, kind, accept.clone()));
            }
        }
        if let Some(l) = http_listener {
            // Stops taking pushes when the node stops accepting (drain or shutdown).
            tokio::spawn(crate::http_api::serve(l, broker.clone(), accepting.clone()));
        }
        if broker.auth().is_open() {
            tracing::warn!("no authentication configured: any client may connect as any client id and publish anywhere (keep this node on a trusted network; see README, Security)");
        }
        let shown = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        tracing::info!(
            listen = %shown(listeners.tcp),
            tls = %shown(listeners.tls),
            ws = %shown(listeners.ws),
            wss = %shown(listeners.wss),
            metrics = %shown(metrics_addr),
            http = %shown(http_addr),
            "herald started"
        );
        readiness.started();
        Ok(Server {
            cluster,
            listeners,
            metrics_addr,
            http_addr,
            broker,
            shutdown,
            accepting,
            connections,
            timeout,
            tls,
            readiness,
            drain_requested,
        })
    }

    /// The plain TCP listener's address, or (TLS-only and WebSocket-only nodes) the first
    /// listener that is on.
    pub fn local_addr(&self) -> SocketAddr {
        let l = &self.listeners;
        l.tcp
            .or(l.tls)
            .or(l.ws)
            .or(l.wss)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn listeners(&self) -> Listeners {
        self.listeners
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The backend HTTP API's address (`http.listen`), when it is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// SIGHUP: re-reads the certificate and key, the password file and the ACL file. What
    /// fails to load keeps its previous version (logged with the reason); connections stay.
    pub fn reload(&self) {
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded, keeping the old one")
                }
            }
        }
        if let Err(e) = self.broker.auth().reload() {
            tracing::error!(error = %e, "authentication files not reloaded, keeping the old ones");
        }
    }

    /// Cancelled by `POST /admin/drain`.
    pub fn drain_requested(&self) -> CancellationToken {
        self.drain_requested.clone()
    }

    /// Only cluster nodes drain: a single node has nowhere to send its devices.
    pub fn can_drain(&self) -> bool {
        self.cluster.is_some()
    }

    /// Takes the node out of its cluster without a reconnect storm: leaves the readiness
    /// set, stops accepting, closes the device connections in batches spread over
    /// `cluster.drain_duration` (each session releases its route as it ends; no wills, the
    /// devices are not gone), waits for them, for the store writes and the forwards
    /// already queued, then shuts down.
    pub async fn drain(self) {
        self.readiness.start_draining();
        metrics::readiness(false, true);
        self.accepting.cancel();
        let period = self.broker.config().cluster.drain_duration;
        // One pass over the client table, not one per batch.
        let open = self.broker.mailboxes();
        let batches = (period.as_millis() / DRAIN_BATCH_EVERY.as_millis()).max(1) as usize;
        tracing::info!(
            connections = open.len(),
            duration_ms = period.as_millis() as u64,
            batches,
            "draining: not ready, not accepting, closing connections in batches (a second stop signal exits at once)"
        );
        let mut tick = tokio::time::interval(period / batches as u32);
        for batch in open.chunks(open.len().div_ceil(batches).max(1)) {
            tick.tick().await;
            for mb in batch {
                mb.kick(Kick::Shutdown);
            }
        }
        // Any connection that attached after the list was taken (its handshake was under
        // way when accepting stopped).
        self.broker.close_all();
        if tokio::time::timeout(self.timeout, self.connections.all_closed())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close in time");
        }
        self.broker.store().flush().await;
        if let Some(c) = &self.cluster {
            c.flush_links(self.timeout).await;
        }
        tracing::info!("drained");
        self.shutdown().await;
    }

    /// Stops accepting, closes every connection, waits up to `shutdown_timeout`.
    pub async fn shutdown(self) {
        self.readiness.start_draining();
        metrics::readiness(false, true);
        if let Some(c) = &self.cluster {
            c.unregister().await;
        }
        self.shutdown.cancel();
        self.broker.close_all();
        if tokio::time::timeout(self.timeout, self.connections.all_closed())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close in time");
        }
        lograte::flush_all();
        tracing::info!("herald stopped");
    }
}

/// The node-to-node link's secret and TLS.
fn link_security(config: &Config, tls: Option<&Arc<TlsServer>>) -> std::io::Result<LinkSecurity> {
    let c = &config.cluster;
    let secret = c
        .secret
        .clone()
        .ok_or_else(|| std::io::Error::other("cluster.secret is required"))?;
    let tls = match (c.tls, tls) {
        (false, _) => None,
        (true, None) => {
            return Err(std::io::Error::other(
                "cluster.tls needs tls.cert and tls.key",
            ))
        }
        (true, Some(server)) => {
            let ca = c
                .tls_ca
                .as_deref()
                .or(config.tls.client_ca.as_deref())
                .ok_or_else(|| std::io::Error::other("cluster.tls needs cluster.tls_ca"))?;
            // Present our own certificate too: with tls.client_ca the peer's listener asks
            // for one.
            let own = config.tls.cert.as_deref().zip(config.tls.key.as_deref());
            let client = transport::client_config(ca, own)
                .map_err(|e| std::io::Error::other(format!("cluster.tls_ca: {e}")))?;
            Some(LinkTls {
                client,
                server: server.clone(),
            })
        }
    };
    Ok(LinkSecurity { secret, tls })
}

/// A draining node closes a batch of connections this often.
const DRAIN_BATCH_EVERY: Duration = Duration::from_millis(100);

/// How often the gauges are set; the census (a pass over every connection's mailbox) runs
/// every `CENSUS_EVERY` samples only.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const CENSUS_EVERY: u32 = 5;

/// Sets the gauges (only when the metrics listener is on).
fn record_sample(broker: &Broker, readiness: &Readiness, cluster: Option<&Cluster>, census: bool) {
    let mut s = metrics::Sample {
        store_up: Some(readiness.store_up()),
        store_ping_secs: broker.store().ping_secs(),
        peers: cluster.map(|c| c.peers_known()),
        links_up: cluster.map(|c| c.links_up()),
        ..Default::default()
    };
    if census {
        let c = broker.census();
        s.online = Some(c.online);
        s.mailbox_bytes = Some(c.mailbox_bytes);
        s.offline = Some(c.offline);
        if let Some(o) = broker.store().outbox_sample() {
            s.outbox_messages = Some(o.messages);
            s.outbox_oldest_secs = Some(o.oldest_age_secs);
            // The Redis store's sessions are store-wide: those with no route are offline
            // (without a cluster there are no routes, and this node is the only one).
            s.offline = o.sessions.map(|(all, routed)| match cluster {
                Some(_) => all.saturating_sub(routed) as usize,
                None => (all as usize).saturating_sub(c.online_persistent),
            });
        }
    }
    metrics::record_sample(&s);
    metrics::readiness(readiness.check().is_ok(), readiness.is_draining());
}

/// A gap between keepalive ticks this much over their interval means the node stalled
/// (SIGSTOP, a starved CPU, a long swap-in): clients were silent because Herald was.
const STALL: Duration = Duration::from_secs(2);

/// The node's frequent housekeeping: stall detection, the memory guard, keepalives.
/// `since_last`: time since the previous tick began (its interval when all is well).
fn tick(broker: &Broker, since_last: Duration) {
    if since_last > KEEPALIVE_EVERY + STALL {
        metrics::stall();
        tracing::warn!(
            stalled_ms = since_last.as_millis() as u64,
            "the node stalled: no client is judged on keepalive for the time it was paused"
        );
        broker.forgive_silence();
    }
    if broker.guard().throttled() {
        // Publishers' sockets go unread: their PINGREQs wait in them.
        broker.forgive_silence();
    }
    broker.check_keepalives();
}

/// How often the memory guard samples RSS: often enough that clients cannot pile much on
/// between two samples (an attack test offered 40 MiB within one 250 ms keepalive tick),
/// and a read of /proc/self/statm costs microseconds.
const MEMORY_EVERY: Duration = Duration::from_millis(20);

/// The memory guard's sample; publishers are woken when it lets go of them.
fn guard_memory(broker: &Broker) {
    let (before, after) = broker.guard().sample();
    if before != after && !broker.guard().throttled() {
        broker.wake_all();
    }
}

/// For the default node id.
/// The host's name (a node's default id).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "herald".into())
}
