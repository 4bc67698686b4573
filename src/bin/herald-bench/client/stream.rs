//! Where a connection goes (`Target`: broker address, loopback source address) and what it
//! is (`Stream`: TCP, or TLS over TCP, behind one type so the scenarios need not care).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

use super::tls::{tls_stats, Tls};

/// Where to connect, and which loopback source addresses to spread connections over.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// First source address (e.g. 127.0.0.2) as an integer; connection `i` uses
    /// `first + i % sources`. `sources == 0`: let the kernel choose.
    pub first_source: u32,
    pub sources: u32,
    /// TLS on top of TCP (None: plain MQTT).
    pub tls: Option<Tls>,
}

/// A connection to the broker: plain TCP or TLS over TCP.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The read half of a `Stream` (TCP: tokio's owned half, no lock; TLS: `tokio::io::split`).
pub enum ReadHalf {
    Tcp(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write half of a `Stream`.
pub enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl Stream {
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

macro_rules! dispatch_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! dispatch_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

dispatch_read!(Stream);
dispatch_read!(ReadHalf);
dispatch_write!(Stream);
dispatch_write!(WriteHalf);

impl Target {
    pub fn source(&self, i: usize) -> Option<Ipv4Addr> {
        (self.sources > 0).then(|| Ipv4Addr::from(self.first_source + (i as u32 % self.sources)))
    }

    /// A TCP connection bound to connection `i`'s source address.
    pub async fn tcp(&self, i: usize) -> io::Result<TcpStream> {
        let sock = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let (Some(src), SocketAddr::V4(_)) = (self.source(i), self.addr) {
            // SO_REUSEADDR lets bind() pick ports still in TIME_WAIT from an earlier run.
            sock.set_reuseaddr(true)?;
            bind_address_no_port(&sock)?;
            sock.bind(SocketAddr::new(src.into(), 0))?;
        }
        let stream = sock.connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// TCP from connection `i`'s source address, then the TLS handshake if TLS is on.
    pub async fn connect(&self, i: usize) -> Result<Stream, String> {
        let tcp = self
            .tcp(i)
            .await
            .map_err(|e| format!("connect from {:?}: {e}", self.source(i)))?;
        let Some(tls) = &self.tls else {
            return Ok(Stream::Tcp(tcp));
        };
        let s = tls
            .connector
            .connect(tls.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let st = tls_stats();
        let conn = s.get_ref().1;
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            st.resumed.fetch_add(1, Relaxed);
        } else {
            st.full.fetch_add(1, Relaxed);
        }
        if st.first.get().is_none() {
            let _ = st.first.set(
                format!(
                    "{:?} {:?} {:?}",
                    conn.protocol_version(),
                    conn.negotiated_cipher_suite().map(|c| c.suite()),
                    conn.negotiated_key_exchange_group().map(|g| g.name()),
                )
                .replace("Some(", "")
                .replace(')', ""),
            );
        }
        Ok(Stream::Tls(Box::new(s)))
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: `bind` takes the source address only and `connect` picks the
/// port for the whole 4-tuple. Without it, `bind` searches for a port that is free on the
/// address (synchronously, on a runtime thread): with tens of thousands of sockets and
/// TIME_WAITs on 16 addresses, a reconnect storm's 19,000 binds stalled the load generator
/// for seconds in some runs, which then looked like the broker's slowness.
fn bind_address_no_port(sock: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to an int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
