//! The accept loops: one per client listener, with the connection capacity check, EMFILE
//! handling and the TLS / WebSocket handshakes in each connection's own task; and the count
//! of open connections that `max_connections` and shutdown wait on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Transport;
use crate::broker::Broker;
use crate::descriptors;
use crate::lograte::{self, Reason};
use crate::metrics;
use crate::session::Connection;
use crate::transport::{self, TlsServer};

/// What every accept loop hands a new connection.
pub(super) struct Accept {
    pub broker: Arc<Broker>,
    pub shutdown: CancellationToken,
    /// Cancelled when the node stops taking connections (drain, shutdown).
    pub accepting: CancellationToken,
    pub connections: Arc<Connections>,
    pub tls: Option<Arc<TlsServer>>,
    /// `server.max_connections`, or fewer if the descriptors allow fewer.
    pub capacity: usize,
    pub spare: descriptors::Spare,
}

/// Connections accepted in a row before the accept loop yields.
const ACCEPT_STREAK: u32 = 1024;

pub(super) async fn accept_loop(listener: TcpListener, kind: Transport, ctx: Arc<Accept>) {
    let max = ctx.capacity;
    let mut backoff = Duration::from_millis(10);
    let mut streak = 0u32;
    loop {
        // Accept while the kernel has connections queued, not 128 at a time (tokio's
        // budget) behind every runnable connection task: in a reconnect storm the queue
        // overflows otherwise, and the kernel drops SYNs that come back only after TCP's
        // 1 s and 3 s resends (herald-bench storm, BENCHMARKS.md). Every 1,024 in a row
        // the loop still lets the others run.
        streak += 1;
        if streak >= ACCEPT_STREAK {
            streak = 0;
            tokio::task::yield_now().await;
        }
        let accepted = tokio::select! {
            r = tokio::task::unconstrained(listener.accept()) => r,
            _ = ctx.accepting.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) if descriptors::exhausted(&e) => {
                // Close the waiting client at once rather than leave it in the backlog.
                ctx.spare.free();
                if let Ok(Ok((s, _))) =
                    tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
                {
                    drop(s);
                    metrics::rejected_descriptors();
                }
                ctx.spare.restore();
                if lograte::allow(Reason::AcceptFailed) {
                    tracing::warn!(error = %e, "out of descriptors: closing new connections");
                }
                continue;
            }
            Err(e) => {
                // Back off instead of spinning on the error.
                if lograte::allow(Reason::AcceptFailed) {
                    tracing::warn!(error = %e, "accept failed");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if ctx.connections.open.load(Ordering::Relaxed) >= max {
            if max < ctx.broker.config().server.max_connections {
                metrics::rejected_descriptors();
            } else {
                metrics::rejected_max_connections();
            }
            if lograte::allow(Reason::MaxConnections) {
                tracing::warn!(peer = %peer, max, "connection capacity reached, closing new connection");
            }
            drop(stream);
            continue;
        }
        let open = Open::new(&ctx.connections);
        let _ = stream.set_nodelay(true);
        let (broker, stop) = (ctx.broker.clone(), ctx.shutdown.clone());
        match (kind, &ctx.tls) {
            // The plain path stays a bare connection task: its size is every idle
            // connection's cost (tests/footprint.rs).
            (Transport::Tcp, _) => {
                tokio::spawn(Connection::new(broker, stream, peer, stop).run(open));
            }
            (Transport::Ws, _) => {
                tokio::spawn(async move {
                    let max_packet = broker.config().server.max_packet_size;
                    if let Some(ws) =
                        handshake(&broker, peer, transport::ws_accept(stream, max_packet)).await
                    {
                        tokio::spawn(Connection::new(broker, ws, peer, stop).run(open));
                    }
                });
            }
            (Transport::Tls, Some(tls)) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Some((s, id)) = handshake(&broker, peer, tls.accept(stream)).await {
                        tokio::spawn(
                            Connection::new(broker, s, peer, stop)
                                .with_cert_identity(id)
                                .run(open),
                        );
                    }
                });
            }
            (Transport::Wss, Some(tls)) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let max_packet = broker.config().server.max_packet_size;
                    let both = async {
                        let (s, id) = tls.accept(stream).await?;
                        Ok((transport::ws_accept(s, max_packet).await?, id))
                    };
                    if let Some((ws, id)) = handshake(&broker, peer, both).await {
                        tokio::spawn(
                            Connection::new(broker, ws, peer, stop)
                                .with_cert_identity(id)
                                .run(open),
                        );
                    }
                });
            }
            // Config validation requires a certificate for TLS listeners.
            (Transport::Tls | Transport::Wss, None) => drop(open),
        }
    }
}

/// A transport's handshake under `server.connect_timeout`: a client that stalls it (a
/// half-open TLS handshake, a slowloris WebSocket upgrade) is closed at the timeout. It runs
/// in a task of its own, and the connection is spawned as a new task after it: awaited in
/// the same task, the handshake's state would stay in every idle connection's task for
/// life (4,152 bytes per TLS connection, measured).
async fn handshake<T, F>(broker: &Broker, peer: SocketAddr, f: F) -> Option<T>
where
    F: std::future::Future<Output = std::io::Result<T>>,
{
    match tokio::time::timeout(broker.config().server.connect_timeout, f).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            metrics::handshake_failed();
            tracing::debug!(peer = %peer, error = %e, "handshake failed");
            None
        }
        Err(_) => {
            metrics::connect_timeout();
            tracing::debug!(peer = %peer, "handshake not finished in time");
            None
        }
    }
}

/// The open connections: counted for `max_connections`, waited for at shutdown.
#[derive(Default)]
pub(super) struct Connections {
    open: AtomicUsize,
    none_open: Notify,
}

impl Connections {
    pub(super) async fn all_closed(&self) {
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
