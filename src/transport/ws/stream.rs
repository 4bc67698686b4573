//! `WsStream` as a byte stream: reads hand the data payloads to the reader and answer
//! control frames, writes send one binary frame each, and what the socket does not take at
//! once is owed in `out`.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame::{frame_header, push_frame, Violation};
use super::{Frame, WsStream};

/// Largest payload of one outgoing frame: a longer write sends this much and returns the
/// count, like a short write on a socket. Bounds the copy made when the socket takes only
/// part of a frame.
pub(super) const MAX_OUT_FRAME: usize = 16 * 1024;

thread_local! {
    /// For writing header and payload in one write on a stream without vectored writes.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl<S: AsyncWrite + Unpin> WsStream<S> {
    /// Writes what is owed (`out`, then a pending pong) until done or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.out.is_empty() {
                if self.frame == Frame::Ping {
                    return Poll::Ready(Ok(()));
                }
                match self.pong.take() {
                    Some(p) => push_frame(&mut self.out, 0x8a, &p),
                    None => return Poll::Ready(Ok(())),
                }
            }
            let mut sent = 0;
            while sent < self.out.len() {
                match Pin::new(&mut self.inner).poll_write(cx, &self.out[sent..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.out.drain(..sent);
                        return Poll::Pending;
                    }
                }
            }
            self.out = Vec::new();
        }
    }

    /// Sends a close frame for `v` if the socket takes it now, and turns `v` into the error.
    fn fail(&mut self, cx: &mut Context<'_>, v: Violation) -> io::Error {
        self.read_done = true;
        let mut payload = v.code.to_be_bytes().to_vec();
        payload.extend_from_slice(&v.reason.as_bytes()[..v.reason.len().min(120)]);
        self.queue_close(&payload);
        let _ = self.poll_drain(cx);
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("websocket: {}", v.reason),
        )
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A pong or close owed from an earlier read; errors show on the next write.
        if !this.out.is_empty() || this.pong.is_some() {
            let _ = this.poll_drain(cx);
        }
        if this.read_done || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let dst = buf.initialize_unfilled();
            let mut rb = ReadBuf::new(dst);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                this.read_done = true;
                if this.frame != Frame::Header || this.hdr_len > 0 || this.in_message {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "websocket: connection closed inside a frame",
                    )));
                }
                return Poll::Ready(Ok(()));
            }
            let produced = match this.decode(&mut dst[..n]) {
                Ok(p) => p,
                Err(v) => return Poll::Ready(Err(this.fail(cx, v))),
            };
            if !this.out.is_empty() || this.pong.is_some() {
                let _ = this.poll_drain(cx);
            }
            buf.advance(produced);
            if produced > 0 || this.read_done {
                return Poll::Ready(Ok(()));
            }
            // Only headers and control frames so far: read on (never report 0 bytes, which
            // would be EOF).
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "websocket: closed",
            )));
        }
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let payload = &buf[..buf.len().min(MAX_OUT_FRAME)];
        let (h, hn) = frame_header(0x82, payload.len());
        let header = &h[..hn];
        let written = if this.inner.is_write_vectored() {
            let bufs = [io::IoSlice::new(header), io::IoSlice::new(payload)];
            ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs))?
        } else {
            ready!(SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                s.clear();
                s.extend_from_slice(header);
                s.extend_from_slice(payload);
                Pin::new(&mut this.inner).poll_write(cx, &s)
            }))?
        };
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        // The frame is promised whole: whatever the socket did not take is owed.
        if written < hn {
            this.out.extend_from_slice(&header[written..]);
            this.out.extend_from_slice(payload);
        } else if written < hn + payload.len() {
            this.out.extend_from_slice(&payload[written - hn..]);
        }
        Poll::Ready(Ok(payload.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.queue_close(&1000u16.to_be_bytes());
        ready!(this.poll_drain(cx))?;
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
