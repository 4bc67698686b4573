//! The server side of a TLS connection as a byte stream, over rustls's unbuffered API, so that
//! an idle connection holds no buffer at all.
//!
//! Why not tokio-rustls: its `TlsStream` wraps a buffered `ServerConnection`, whose record
//! deframer keeps a 4 KiB `Vec` for the connection's whole life (rustls 0.23
//! `DeframerVecBuffer::prepare_read`: every `read_tls` first sizes it to `used + 4096`, and it
//! shrinks back only to 4096, never to 0), zeroed, so resident. That was two thirds of what
//! an idle TLS connection cost (see `tls`'s module doc for the figures). Here the caller
//! owns the buffers, and:
//! - socket reads go into one scratch buffer per thread; rustls decrypts the records in it,
//!   and only an incomplete record (or handshake message) left at the end is copied into
//!   `incoming`, which is freed as soon as it is used up;
//! - decrypted bytes go straight into the reader's buffer; what does not fit waits in
//!   `plaintext`, freed once read;
//! - writes are encrypted into `outgoing` and written at once; whatever the socket does not
//!   take waits there, freed once sent.
//!
//! What stays is the rustls connection itself: its state machine, the traffic keys and, with
//! client certificates, the client's chain (rustls keeps it for `peer_certificates`).
//!
//! Behaviour matches tokio-rustls where it matters to the session: `poll_write` takes at
//! most 16 KiB at a time (one record), `poll_flush` sends everything encrypted so far,
//! `poll_shutdown` sends close_notify; a peer's close_notify reads as EOF, and so does a TCP
//! close at a record boundary (MQTT has its own framing, so a truncation attack cannot cut
//! a packet short unnoticed); a TCP close inside a record is `UnexpectedEof`. A TLS error
//! (bad record, failed client certificate) sends its alert when the socket takes it, and
//! every later call fails.
//!
//! Files:
//! - `mod.rs` (here): the `TlsStream` state and the handshake (`accept`);
//! - `records.rs`: rustls's unbuffered state machine run over those buffers: received
//!   records decrypted (`process`), data encrypted (`encrypt_with`), the alert after an
//!   error (`fail`);
//! - `stream.rs`: the socket below and `AsyncRead + AsyncWrite` above;
//! - `tests.rs`: unit tests.

mod records;
mod stream;
#[cfg(test)]
mod tests;

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::UnbufferedServerConnection;

use stream::Filled;

/// A server-side TLS stream: `AsyncRead + AsyncWrite + Unpin + Send` over any such stream.
/// Made by `TlsServer::accept`, which completes the handshake.
pub struct TlsStream<S> {
    io: S,
    conn: UnbufferedServerConnection,
    /// Received bytes rustls has not consumed yet: the start of a record, or records of a
    /// handshake message still being joined. Presented again, in front of new bytes.
    incoming: Vec<u8>,
    /// Encrypted bytes the socket has not taken yet.
    outgoing: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_at`.
    plaintext: Vec<u8>,
    plain_at: usize,
    /// close_notify or the socket's EOF arrived: reads return EOF.
    read_closed: bool,
    /// close_notify is queued or sent: no more writes.
    close_sent: bool,
    /// A TLS error happened (and was returned); every later call fails.
    broken: bool,
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("tls: {e}"))
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// The server handshake on `io`, to completion (client certificate verified, session
    /// tickets sent).
    pub(crate) async fn accept(io: S, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = TlsStream {
            io,
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            plaintext: Vec::new(),
            plain_at: 0,
            read_closed: false,
            close_sent: false,
            broken: false,
        };
        poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // Our flight first: the client waits for it.
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.read_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls: connection closed during the handshake",
                )));
            }
            match ready!(self.poll_fill(cx, None)) {
                Ok(Filled::Progress) => {}
                Ok(Filled::Eof) => self.read_closed = true,
                Err(e) => {
                    // The alert, if the socket takes it now.
                    let _ = self.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl<S> TlsStream<S> {
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The TLS state: protocol version, cipher suite, the client's certificates.
    pub fn tls(&self) -> &rustls::CommonState {
        &self.conn
    }
}
