//! The API's listener, bounded: at most `MAX_CONNECTIONS` connections at once (the next one
//! waits in the kernel's backlog until one ends; `herald_limit_hits_total{limit=
//! "http_max_connections"}` counts the times the limit was reached), and a connection that
//! moves no byte either way for `IDLE` is closed. axum's own listener has neither (it
//! serves hyper without a timer, so no header-read timeout either): a client that opens
//! sockets and sends nothing would hold them, and their descriptors, for ever.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics;

/// Connections served at once.
pub(super) const MAX_CONNECTIONS: usize = 1024;

/// How long a connection may move no byte (a request being read or written, or keep-alive
/// between requests) before it is closed.
pub(super) const IDLE: Duration = Duration::from_secs(30);

pub(super) struct Bounded {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl Bounded {
    pub(super) fn new(inner: TcpListener) -> Bounded {
        Bounded::with_limit(inner, MAX_CONNECTIONS)
    }

    fn with_limit(inner: TcpListener, max: usize) -> Bounded {
        Bounded {
            inner,
            permits: Arc::new(Semaphore::new(max)),
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        if self.permits.available_permits() == 0 {
            metrics::limit_hit("http_max_connections");
        }
        // Never closed: an error would mean no connection can be served again.
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return std::future::pending().await;
        };
        loop {
            match self.inner.accept().await {
                Ok((io, peer)) => {
                    let _ = io.set_nodelay(true);
                    let idle = Box::pin(tokio::time::sleep(IDLE));
                    return (
                        Guarded {
                            io,
                            idle,
                            _permit: permit,
                        },
                        peer,
                    );
                }
                // Out of descriptors, say: back off rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection: its permit, and its idle deadline, pushed back by every byte
/// read or written.
pub(super) struct Guarded {
    io: TcpStream,
    idle: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Guarded {
    /// After progress: a new deadline. While pending: the error once the deadline passed.
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.idle.as_mut().reset(Instant::now() + IDLE);
                Poll::Ready(r)
            }
            Poll::Pending if self.idle.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.check(cx, r)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.check(cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_idle() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut bounded = Bounded::new(l);
        let _client = TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = bounded.accept().await;
        let started = Instant::now();
        let e = io.read(&mut [0u8; 1]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= IDLE);
    }

    #[tokio::test]
    async fn a_connection_over_the_limit_waits_for_one_to_end() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut bounded = Bounded::with_limit(l, 1);
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let (first, _) = bounded.accept().await;
        let second = tokio::time::timeout(Duration::from_millis(200), bounded.accept()).await;
        assert!(
            second.is_err(),
            "a second connection was served over the limit"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), bounded.accept()).await;
        assert!(
            second.is_ok(),
            "the second connection was not served after the first ended"
        );
    }
}
