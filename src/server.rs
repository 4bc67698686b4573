//! Listeners, the accept loop and graceful shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::metrics;
use crate::session::Connection;

/// A running Herald node.
pub struct Server {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    connections: Arc<Connections>,
    timeout: Duration,
}

/// How often stored messages are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// How often keepalives are checked: the slack on top of 1.5 times a client's keepalive.
const KEEPALIVE_EVERY: Duration = Duration::from_millis(250);

impl Server {
    /// Binds the listeners and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: Config) -> std::io::Result<Server> {
        metrics::init();
        let listener = TcpListener::bind(config.server.listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))).await?;
        let local_addr = listener.local_addr()?;
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let timeout = config.server.shutdown_timeout;
        let cluster_listener = match config.cluster.listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let cluster = match &cluster_listener {
            Some(l) => {
                let c = &config.cluster;
                let id = c
                    .node_id
                    .clone()
                    .unwrap_or_else(|| format!("{}:{}", hostname(), local_addr.port()));
                Some(Arc::new(Cluster::new(
                    id,
                    c.advertise.unwrap_or(l.local_addr()?),
                    c.sweep_interval,
                    c.node_ttl,
                )))
            }
            None => None,
        };
        let broker = Arc::new(
            Broker::open(config, cluster.clone())
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?,
        );
        let shutdown = CancellationToken::new();
        let connections = Arc::new(Connections::default());
        if let (Some(c), Some(l), Some(r)) = (&cluster, cluster_listener, broker.store.redis()) {
            c.register(r)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            tokio::spawn(c.clone().run(broker.clone(), shutdown.clone()));
            tokio::spawn(cluster::serve(l, broker.clone(), shutdown.clone()));
        }

        if let Some(l) = metrics_listener {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = metrics::serve(l) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        {
            let broker = broker.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut sweep = tokio::time::interval(SWEEP_EVERY);
                let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
                loop {
                    tokio::select! {
                        _ = sweep.tick() => broker.store.sweep().await,
                        _ = keepalive.tick() => broker.check_keepalives(),
                        _ = stop.cancelled() => return,
                    }
                }
            });
        }
        tokio::spawn(accept_loop(
            listener,
            broker.clone(),
            shutdown.clone(),
            connections.clone(),
        ));
        tracing::info!(listen = %local_addr, metrics = ?metrics_addr, "herald started");
        Ok(Server {
            local_addr,
            metrics_addr,
            broker,
            shutdown,
            connections,
            timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Stops accepting, closes every connection, waits up to `shutdown_timeout`.
    pub async fn shutdown(self) {
        if let (Some(c), Some(r)) = (&self.broker.cluster, self.broker.store.redis()) {
            c.unregister(r).await;
        }
        self.shutdown.cancel();
        self.broker.close_all();
        if tokio::time::timeout(self.timeout, self.connections.all_closed())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close in time");
        }
        tracing::info!("herald stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    connections: Arc<Connections>,
) {
    let max = broker.config.server.max_connections;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if connections.open.load(Ordering::Relaxed) >= max {
            metrics::rejected_max_connections();
            tracing::warn!(peer = %peer, max, "max_connections reached, closing new connection");
            drop(stream);
            continue;
        }
        let open = Open::new(&connections);
        let _ = stream.set_nodelay(true);
        tokio::spawn(Connection::new(broker.clone(), stream, peer, shutdown.clone()).run(open));
    }
}

/// The open connections: counted for `max_connections`, waited for at shutdown.
#[derive(Default)]
struct Connections {
    open: AtomicUsize,
    none_open: Notify,
}

impl Connections {
    async fn all_closed(&self) {
        loop {
            let notified = self.none_open.notified();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One open connection, counted until dropped. Its task holds it; a task tracker would
/// add a token of its own to every connection's task.
struct Open(Arc<Connections>);

impl Open {
    fn new(c: &Arc<Connections>) -> Open {
        c.open.fetch_add(1, Ordering::AcqRel);
        metrics::connection_opened();
        Open(c.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::connection_closed();
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_open.notify_waiters();
        }
    }
}

/// For the default node id.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "herald".into())
}
