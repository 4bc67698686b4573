//! The socket below (reads through a per-thread scratch buffer, writes from `outgoing`) and
//! `AsyncRead + AsyncWrite` above, with tokio-rustls's behaviour (see the parent module).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::TlsStream;

/// Bytes asked of the socket per read: one TLS record of the largest size (TLS 1.2 allows
/// 2^14 + 2048 bytes of ciphertext plus the 5-byte header).
const READ_CHUNK: usize = 16 * 1024 + 2048 + 5;

/// Plaintext encrypted per `poll_write`: one full record.
const MAX_WRITE: usize = 16 * 1024;

thread_local! {
    /// Where socket reads land and rustls decrypts in place: `incoming`, then new bytes.
    static WORK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What one read from the socket came to.
pub(super) enum Filled {
    /// New bytes went through rustls (maybe producing nothing for the reader yet).
    Progress,
    /// The socket is at EOF.
    Eof,
}

impl<S> TlsStream<S> {
    /// Takes what waits in `plaintext`.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.plaintext.len() - self.plain_at);
        buf.put_slice(&self.plaintext[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        if self.plain_at == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plain_at = 0;
        }
    }

    fn broken_error() -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, "tls: connection failed earlier")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Reads once from the socket (after `incoming`) into the thread's scratch buffer and
    /// runs rustls over it.
    pub(super) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        out: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<Filled>> {
        WORK.with(|work| {
            let mut work = work.borrow_mut();
            let have = self.incoming.len();
            let end = have + READ_CHUNK;
            if work.len() < end {
                work.resize(end, 0);
            }
            work[..have].copy_from_slice(&self.incoming);
            let mut rb = ReadBuf::new(&mut work[have..end]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(Filled::Eof));
            }
            let total = have + n;
            let used = match self.process(&mut work[..total], out) {
                Ok(used) => used,
                Err(e) => {
                    if !self.broken {
                        self.fail(None);
                    }
                    return Poll::Ready(Err(e));
                }
            };
            self.incoming = work[used..total].to_vec();
            Poll::Ready(Ok(Filled::Progress))
        })
    }

    /// Writes `outgoing` until it is empty (then frees it) or the socket is full.
    pub(super) fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) if n == self.outgoing.len() => self.outgoing = Vec::new(),
                Ok(n) => {
                    self.outgoing.drain(..n);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plain_at < this.plaintext.len() {
            this.take_plaintext(buf);
            return Poll::Ready(Ok(()));
        }
        if this.broken {
            return Poll::Ready(Err(Self::broken_error()));
        }
        if this.read_closed || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // Something owed (a key update, an alert): its errors show on the next write.
        let _ = this.poll_send(cx);
        loop {
            let before = buf.filled().len();
            let filled = match this.poll_fill(cx, Some(&mut *buf)) {
                Poll::Ready(Ok(f)) => f,
                Poll::Ready(Err(e)) => {
                    let _ = this.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            };
            if let Filled::Eof = filled {
                this.read_closed = true;
                if !this.incoming.is_empty() {
                    this.incoming = Vec::new();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls: connection closed inside a record",
                    )));
                }
                return Poll::Ready(Ok(()));
            }
            let _ = this.poll_send(cx);
            if buf.filled().len() > before || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            // Only handshake messages (a key update, tickets) or part of a record: read on.
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.broken {
            return Poll::Ready(Err(Self::broken_error()));
        }
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls: closed",
            )));
        }
        ready!(this.poll_send(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &buf[..buf.len().min(MAX_WRITE)];
        // One record's overhead is at most 5 + 16 + 1 (TLS 1.3) or 5 + 8 + 16 (TLS 1.2); a
        // queued key update adds a record.
        this.encrypt_with(|w, out| w.encrypt(data, out), data.len() + 128)?;
        // The bytes are taken; the socket gets them now or on the next write or flush.
        let _ = this.poll_send(cx)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && !this.broken {
            this.close_sent = true;
            this.encrypt_with(|w, out| w.queue_close_notify(out), 64)?;
        }
        ready!(this.poll_send(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
