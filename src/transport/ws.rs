//! MQTT over WebSocket (RFC 6455; MQTT 3.1.1 section 6).
//!
//! `accept` runs the HTTP upgrade with tungstenite: path `/mqtt` only (any other path gets
//! `404 Not Found` and the connection fails), subprotocol `mqtt` or `mqttv3.1` echoed back
//! when the client offers one (`mqtt` preferred). A client that offers neither (or no
//! `Sec-WebSocket-Protocol` at all) is accepted without the header, as Mosquitto does: the
//! MQTT CONNECT that follows is what proves it speaks MQTT, and a browser that insisted on a
//! protocol closes the socket itself. No `Origin` check: MQTT authenticates in CONNECT. The
//! caller wraps `accept` in its connect timeout, which cuts off a slow or endless upgrade;
//! tungstenite itself bounds the request's size.
//!
//! After the upgrade the stream is handed to `WsStream`, a small RFC 6455 frame codec of our
//! own rather than tungstenite's `WebSocket`, for memory: tungstenite keeps a read buffer per
//! connection for its whole life (`read_buffer_size`, allocated eagerly, 128 KiB by default),
//! and a write buffer that never shrinks. `WsStream` keeps no buffer at all while idle:
//! - reads go straight into the caller's buffer (the session reads through one scratch
//!   buffer per worker thread): the frame headers are taken out and kept in a 14-byte array,
//!   the payload is unmasked in place and moved up, so a frame is never stored;
//! - a write sends one binary frame, header and payload in one vectored write; only when the
//!   socket takes part of it is the rest copied into `out`, freed once it is sent;
//! - a ping's payload (at most 125 bytes) waits for its pong in a small Vec, only the
//!   latest ping is answered (RFC 6455 5.5.3 allows it), so a ping flood cannot grow memory.
//!
//! An idle `WsStream` is its inner stream plus about 100 bytes.
//!
//! Limits: a data message (one frame, or a fragmented message) may carry at most
//! `max_packet + 16` bytes: an MQTT packet and its fixed header, or several small packets
//! (clients send one packet per message). Bigger gets close code 1009 and an error. Text
//! frames get 1003 (MQTT 6.0: binary frames only), protocol errors 1002; each error sends
//! the close frame if the socket takes it at once, and fails the read.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http;
use tungstenite::protocol::WebSocketConfig;

/// The only path that upgrades.
pub const PATH: &str = "/mqtt";

/// Subprotocols we answer, in order of preference.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Largest payload of one outgoing frame: a longer write sends this much and returns the
/// count, like a short write on a socket. Bounds the copy made when the socket takes only
/// part of a frame.
const MAX_OUT_FRAME: usize = 16 * 1024;

/// Server handshake: HTTP upgrade on `/mqtt`, subprotocol negotiation (see the module doc),
/// then a `WsStream` whose messages may carry at most `max_packet + 16` bytes. Errors are
/// `io::Error`s (the refused upgrade: "websocket upgrade refused: ...").
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: S,
    max_packet: usize,
) -> io::Result<WsStream<S>> {
    // tungstenite only runs the upgrade here; its `WebSocket` is taken apart right after,
    // so it gets no buffers worth the name (the 128 KiB read buffer would be allocated, and
    // zeroed on the first read, for nothing).
    let config = WebSocketConfig::default()
        .read_buffer_size(0)
        .write_buffer_size(0)
        .max_write_buffer_size(1)
        .max_frame_size(Some(max_packet.saturating_add(16)))
        .max_message_size(Some(max_packet.saturating_add(16)));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, negotiate, Some(config))
        .await
        .map_err(|e| match e {
            tungstenite::Error::Io(e) => e,
            tungstenite::Error::Http(resp) => io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "websocket upgrade refused: {}",
                    resp.body()
                        .as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_else(|| resp.status().to_string().into())
                ),
            ),
            e => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("websocket upgrade: {e}"),
            ),
        })?;
    // The server handshake refuses bytes behind the request (tungstenite's
    // `JunkAfterRequest`: a client must wait for the 101), so the raw stream holds nothing
    // tungstenite has read.
    let mut inner = ws.into_inner();
    // The 101 may still sit in a TLS layer's buffer; the client waits for it.
    inner.flush().await?;
    Ok(WsStream::new(inner, max_packet))
}

/// tungstenite's request callback: path and subprotocol.
fn negotiate(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != PATH {
        let mut refused = ErrorResponse::new(Some(format!(
            "path {} not found (MQTT is on {PATH})",
            req.uri().path()
        )));
        *refused.status_mut() = http::StatusCode::NOT_FOUND;
        return Err(refused);
    }
    let offered: Vec<&str> = req
        .headers()
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // Echo the client's own spelling: a browser checks the answer against its offer.
    let chosen = SUBPROTOCOLS.iter().find_map(|want| {
        offered
            .iter()
            .find(|o| o.eq_ignore_ascii_case(want))
            .copied()
    });
    if let Some(p) = chosen.and_then(|p| http::HeaderValue::from_str(p).ok()) {
        resp.headers_mut()
            .insert(http::header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    Ok(resp)
}

/// What the bytes being read belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Between frames: the next bytes are a header.
    Header,
    /// Payload of a binary (or continuation) frame: goes to the reader.
    Data,
    /// Payload of a control frame: collected in `control`.
    Ping,
    Pong,
    Close,
}

/// Binary WebSocket messages as a byte stream: `AsyncRead + AsyncWrite + Unpin + Send` so the
/// MQTT session runs on it unchanged.
///
/// Reads: binary frames' payloads concatenated (an MQTT packet may span frames and a frame
/// may hold several packets); a text frame is an error (close 1003); a ping is answered with
/// a pong; a close frame is answered with a close frame and reads EOF.
/// Writes: each `poll_write` sends one binary frame of the given bytes (up to 16 KiB);
/// `poll_flush` also sends a pending pong; `poll_shutdown` sends a close frame (1000), then
/// shuts the inner stream down.
pub struct WsStream<S> {
    inner: S,
    /// Header bytes of the incoming frame collected so far (at most 2 + 8 + 4).
    hdr: [u8; 14],
    hdr_len: u8,
    /// What the next incoming payload bytes are.
    frame: Frame,
    /// Offset into `mask` of the next payload byte.
    mask_pos: u8,
    mask: [u8; 4],
    /// A fragmented binary message is open (the next data frame must be a continuation).
    in_message: bool,
    /// Read side finished: a close frame arrived, or an error. Reads return EOF.
    read_done: bool,
    /// A close frame is queued or sent: no more writes.
    close_sent: bool,
    /// Payload bytes of the incoming frame still to come.
    remaining: u64,
    /// Bytes of the open data message so far, and the limit.
    message_len: u64,
    max_message: u64,
    /// Payload of the incoming control frame (at most 125 bytes); empty otherwise.
    control: Vec<u8>,
    /// Payload of the latest ping not yet answered.
    pong: Option<Vec<u8>>,
    /// Bytes owed to the socket, in wire order: the rest of a partly written frame, a pong,
    /// a close frame. Released when sent.
    out: Vec<u8>,
}

thread_local! {
    /// For writing header and payload in one write on a stream without vectored writes.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl<S> WsStream<S> {
    /// A stream over an already upgraded connection (server side: client frames must be
    /// masked). Messages may carry at most `max_packet + 16` bytes.
    pub fn new(inner: S, max_packet: usize) -> WsStream<S> {
        WsStream {
            inner,
            hdr: [0; 14],
            hdr_len: 0,
            frame: Frame::Header,
            mask_pos: 0,
            mask: [0; 4],
            in_message: false,
            read_done: false,
            close_sent: false,
            remaining: 0,
            message_len: 0,
            max_message: max_packet.saturating_add(16) as u64,
            control: Vec::new(),
            pong: None,
            out: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Takes the frames out of `buf` (bytes just read), leaving the data payload, unmasked,
    /// at its front; returns how many bytes that is. Control frames are handled here.
    fn decode(&mut self, buf: &mut [u8]) -> Result<usize, Violation> {
        let mut at = 0;
        let mut out = 0;
        while at < buf.len() && !self.read_done {
            if self.frame == Frame::Header {
                let need = header_len(&self.hdr[..self.hdr_len as usize]);
                let take = (need - self.hdr_len as usize).min(buf.len() - at);
                let h = self.hdr_len as usize;
                self.hdr[h..h + take].copy_from_slice(&buf[at..at + take]);
                self.hdr_len += take as u8;
                at += take;
                // The length code in the second byte may ask for more header bytes.
                if self.hdr_len as usize == header_len(&self.hdr[..self.hdr_len as usize]) {
                    self.start_frame()?;
                }
                continue;
            }
            let take = (self.remaining.min((buf.len() - at) as u64)) as usize;
            let mask = self.mask;
            let pos = self.mask_pos as usize;
            let chunk = &mut buf[at..at + take];
            for (i, b) in chunk.iter_mut().enumerate() {
                *b ^= mask[(pos + i) & 3];
            }
            self.mask_pos = ((pos + take) & 3) as u8;
            if self.frame == Frame::Data {
                buf.copy_within(at..at + take, out);
                out += take;
            } else {
                self.control.extend_from_slice(&buf[at..at + take]);
            }
            at += take;
            self.remaining -= take as u64;
            if self.remaining == 0 {
                self.end_frame();
            }
        }
        Ok(out)
    }

    /// A complete header is in `hdr`: check it and set up for the payload.
    fn start_frame(&mut self) -> Result<(), Violation> {
        let h = &self.hdr[..self.hdr_len as usize];
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let len = match h[1] & 0x7f {
            126 => u16::from_be_bytes([h[2], h[3]]) as u64,
            127 => u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
            n => n as u64,
        };
        self.hdr_len = 0;
        if h[1] & 0x80 == 0 {
            return Err(Violation::protocol("unmasked frame from the client"));
        }
        self.mask.copy_from_slice(&h[h.len() - 4..]);
        self.mask_pos = 0;
        if h[0] & 0x70 != 0 {
            return Err(Violation::protocol(
                "reserved bits set (no extension was agreed)",
            ));
        }
        self.frame = match opcode {
            0x0 | 0x2 => {
                if opcode == 0x0 && !self.in_message {
                    return Err(Violation::protocol("continuation frame outside a message"));
                }
                if opcode == 0x2 && self.in_message {
                    return Err(Violation::protocol("new message inside a fragmented one"));
                }
                self.message_len = self.message_len.saturating_add(len);
                if self.message_len > self.max_message {
                    return Err(Violation {
                        code: 1009,
                        reason: format!(
                            "websocket message of {} bytes or more, over the limit of {}",
                            self.message_len, self.max_message
                        ),
                    });
                }
                self.in_message = !fin;
                if fin {
                    self.message_len = 0;
                }
                Frame::Data
            }
            0x1 => {
                return Err(Violation {
                    code: 1003,
                    reason: "text frame (MQTT goes in binary frames)".into(),
                })
            }
            0x8..=0xa => {
                if !fin || len > 125 {
                    return Err(Violation::protocol("fragmented or long control frame"));
                }
                match opcode {
                    0x8 => Frame::Close,
                    0x9 => Frame::Ping,
                    _ => Frame::Pong,
                }
            }
            _ => return Err(Violation::protocol("reserved opcode")),
        };
        self.remaining = len;
        if len == 0 {
            self.end_frame();
        }
        Ok(())
    }

    /// The payload of the current frame is complete.
    fn end_frame(&mut self) {
        match self.frame {
            Frame::Ping => self.pong = Some(std::mem::take(&mut self.control)),
            Frame::Close => {
                // Echo the status code (RFC 6455 5.5.1), then no more reads.
                let code = match self.control.get(..2) {
                    Some(c) => c.to_vec(),
                    None => Vec::new(),
                };
                self.queue_close(&code);
                self.read_done = true;
                self.control = Vec::new();
            }
            Frame::Pong => self.control = Vec::new(),
            Frame::Data | Frame::Header => {}
        }
        self.frame = Frame::Header;
    }

    /// Queues a close frame with this payload (empty, or a code and reason) behind whatever
    /// is owed; nothing is written after it.
    fn queue_close(&mut self, payload: &[u8]) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        self.pong = None;
        push_frame(&mut self.out, 0x88, payload);
    }
}

/// The header length the bytes seen so far call for: 2 until the second byte is in, then
/// 2 + extended length + mask key (an unmasked header is 4 bytes shorter; `start_frame`
/// refuses it).
fn header_len(h: &[u8]) -> usize {
    if h.len() < 2 {
        return 2;
    }
    let ext = match h[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if h[1] & 0x80 != 0 { 4 } else { 0 }
}

/// Appends a frame (server side: unmasked) to `out`.
fn push_frame(out: &mut Vec<u8>, first: u8, payload: &[u8]) {
    let (h, n) = frame_header(first, payload.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
}

fn frame_header(first: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = first;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= 0xffff {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// A broken rule of the protocol: the close code to send and the error to return.
struct Violation {
    code: u16,
    reason: String,
}

impl Violation {
    fn protocol(reason: &str) -> Violation {
        Violation {
            code: 1002,
            reason: reason.into(),
        }
    }
}

impl<S: AsyncWrite + Unpin> WsStream<S> {
    /// Writes what is owed (`out`, then a pending pong) until done or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.out.is_empty() {
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
