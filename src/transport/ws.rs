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
//! An idle `WsStream` is its inner stream plus 88 bytes.
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

/// tungstenite's request callback: path and subprotocol. (Its signature is tungstenite's.)
#[allow(clippy::result_large_err)]
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
    /// Header bytes of the incoming frame collected so far (at most 2 + 8 + 4); during a
    /// close frame's payload, its status code.
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
    /// Payload bytes of the incoming frame still to come (never more than `max_message`).
    remaining: u32,
    /// Bytes of the open data message so far, and the limit.
    message_len: u32,
    max_message: u32,
    /// Payload of the latest ping not yet answered (while `frame` is `Ping`: being read).
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
            max_message: max_packet.saturating_add(16).min(u32::MAX as usize) as u32,
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
            let take = (self.remaining as usize).min(buf.len() - at);
            let mask = self.mask;
            let pos = self.mask_pos as usize;
            let chunk = &mut buf[at..at + take];
            for (i, b) in chunk.iter_mut().enumerate() {
                *b ^= mask[(pos + i) & 3];
            }
            self.mask_pos = ((pos + take) & 3) as u8;
            match self.frame {
                Frame::Data => {
                    buf.copy_within(at..at + take, out);
                    out += take;
                }
                Frame::Ping => {
                    if let Some(p) = self.pong.as_mut() {
                        p.extend_from_slice(&buf[at..at + take]);
                    }
                }
                Frame::Close => {
                    for &b in &buf[at..at + take] {
                        if self.hdr_len < 2 {
                            self.hdr[self.hdr_len as usize] = b;
                            self.hdr_len += 1;
                        }
                    }
                }
                Frame::Pong | Frame::Header => {}
            }
            at += take;
            self.remaining -= take as u32;
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
                let total = self.message_len as u64 + len;
                if total > self.max_message as u64 {
                    return Err(Violation {
                        code: 1009,
                        reason: format!(
                            "websocket message of {total} bytes or more, over the limit of {}",
                            self.max_message
                        ),
                    });
                }
                self.message_len = total as u32;
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
                    0x9 => {
                        // Replaces an older ping not answered yet.
                        self.pong = Some(Vec::with_capacity(len as usize));
                        Frame::Ping
                    }
                    _ => Frame::Pong,
                }
            }
            _ => return Err(Violation::protocol("reserved opcode")),
        };
        self.remaining = len as u32;
        if len == 0 {
            self.end_frame();
        }
        Ok(())
    }

    /// The payload of the current frame is complete.
    fn end_frame(&mut self) {
        match self.frame {
            Frame::Close => {
                // Echo the status code (RFC 6455 5.5.1), then no more reads.
                let code = self.hdr;
                let n = if self.hdr_len == 2 { 2 } else { 0 };
                self.hdr_len = 0;
                self.queue_close(&code[..n]);
                self.read_done = true;
            }
            Frame::Ping | Frame::Pong | Frame::Data | Frame::Header => {}
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

#[cfg(test)]
mod tests {
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::net::TcpStream;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    use super::super::test_pki;
    use super::*;

    /// CONNECT, client id "dev42", keepalive 60, clean session.
    const CONNECT: &[u8] = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05dev42";
    const PINGREQ: &[u8] = b"\xc0\x00";
    /// SUBSCRIBE push/dev42 QoS 1, packet id 1.
    const SUBSCRIBE: &[u8] = b"\x82\x10\x00\x01\x00\x0bpush/dev42\x01";

    type Client = WebSocketStream<TcpStream>;

    /// A server-side `accept` and a tungstenite client offering `protocols` on `path`.
    async fn upgrade(
        path: &str,
        protocols: Option<&str>,
        max_packet: usize,
    ) -> (
        io::Result<WsStream<TcpStream>>,
        Result<(Client, Response), tungstenite::Error>,
    ) {
        let (s, c) = test_pki::tcp_pair().await;
        let mut req = format!("ws://127.0.0.1{path}")
            .into_client_request()
            .unwrap();
        if let Some(p) = protocols {
            req.headers_mut()
                .insert(http::header::SEC_WEBSOCKET_PROTOCOL, p.parse().unwrap());
        }
        let (s, c) = tokio::join!(
            accept(s, max_packet),
            tokio_tungstenite::client_async(req, c)
        );
        (s, c.map(|(c, r)| (c, r.map(|_| ()))))
    }

    async fn connected(protocols: Option<&str>) -> (WsStream<TcpStream>, Client, Response) {
        let (s, c) = upgrade("/mqtt", protocols, 1024).await;
        let (c, r) = c.unwrap();
        (s.unwrap(), c, r)
    }

    fn protocol(r: &Response) -> Option<&str> {
        r.headers()
            .get(http::header::SEC_WEBSOCKET_PROTOCOL)
            .map(|v| v.to_str().unwrap())
    }

    #[tokio::test]
    async fn mqtt_packets_across_and_within_frames() {
        let (mut s, mut c, r) = connected(Some("mqtt")).await;
        assert_eq!(protocol(&r), Some("mqtt"));
        // CONNECT split across two frames, then two packets in one frame.
        c.send(Message::binary(&CONNECT[..5])).await.unwrap();
        c.send(Message::binary(&CONNECT[5..])).await.unwrap();
        c.send(Message::binary([SUBSCRIBE, PINGREQ].concat()))
            .await
            .unwrap();
        let want = [CONNECT, SUBSCRIBE, PINGREQ].concat();
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);

        // Each write is one binary message.
        s.write_all(b"\x20\x02\x00\x00").await.unwrap();
        s.write_all(b"\x90\x03\x00\x01\x01").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            c.next().await.unwrap().unwrap(),
            Message::binary(&b"\x20\x02\x00\x00"[..])
        );
        assert_eq!(
            c.next().await.unwrap().unwrap(),
            Message::binary(&b"\x90\x03\x00\x01\x01"[..])
        );

        // A write longer than one frame takes: sent as frames of 16 KiB, the rest is the
        // caller's next write.
        let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        s.write_all(&big).await.unwrap();
        s.flush().await.unwrap();
        let mut got = Vec::new();
        while got.len() < big.len() {
            match c.next().await.unwrap().unwrap() {
                Message::Binary(b) => {
                    assert!(b.len() <= MAX_OUT_FRAME);
                    got.extend_from_slice(&b);
                }
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(got, big);
    }

    #[tokio::test]
    async fn subprotocols() {
        let (_, _, r) = connected(Some("mqttv3.1")).await;
        assert_eq!(protocol(&r), Some("mqttv3.1"));
        let (_, _, r) = connected(Some("chat, mqttv3.1, mqtt")).await;
        assert_eq!(protocol(&r), Some("mqtt"));
        // None offered, or none we know: accepted without the header.
        let (_, _, r) = connected(None).await;
        assert_eq!(protocol(&r), None);
        let (s, c) = upgrade("/mqtt", Some("chat"), 1024).await;
        assert!(s.is_ok());
        // tungstenite's client insists on an answer to its offer; a browser would too.
        assert!(c.is_err());
    }

    #[tokio::test]
    async fn other_paths_are_refused() {
        let (s, c) = upgrade("/", Some("mqtt"), 1024).await;
        let e = s.err().expect("upgraded on /");
        assert!(e.to_string().contains("path / not found"), "{e}");
        match c {
            Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 404),
            other => panic!("{:?}", other.map(|_| ())),
        }
        let (s, _) = upgrade("/mqtt/x", Some("mqtt"), 1024).await;
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn ping_is_answered_close_is_eof() {
        let (mut s, mut c, _) = connected(Some("mqtt")).await;
        let server = tokio::spawn(async move {
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.map(|_| all)
        });
        c.send(Message::Ping(b"hi"[..].into())).await.unwrap();
        assert_eq!(
            c.next().await.unwrap().unwrap(),
            Message::Pong(b"hi"[..].into())
        );
        c.send(Message::binary(PINGREQ)).await.unwrap();
        c.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
        assert_eq!(server.await.unwrap().unwrap(), PINGREQ);
        // The close is echoed with the same code.
        match c.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
            m => panic!("{m:?}"),
        }
    }

    async fn refused(max_packet: usize, msg: Message, code: CloseCode, why: &str) {
        let (s, c) = upgrade("/mqtt", Some("mqtt"), max_packet).await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap().0);
        c.send(msg).await.unwrap();
        let mut buf = [0u8; 256];
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(why), "{e}");
        match c.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, code),
            m => panic!("{m:?}"),
        }
        // Reads after the error: EOF, writes: refused.
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        assert!(s.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn text_frames_and_oversized_messages_are_refused() {
        refused(
            1024,
            Message::text("CONNECT"),
            CloseCode::Unsupported,
            "text frame",
        )
        .await;
        refused(
            100,
            Message::binary(vec![0u8; 117]),
            CloseCode::Size,
            "over the limit of 116",
        )
        .await;
        // At the limit, and the limit counts a whole fragmented message.
        let (s, c) = upgrade("/mqtt", Some("mqtt"), 100).await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap().0);
        c.send(Message::binary(vec![7u8; 116])).await.unwrap();
        let mut got = [0u8; 116];
        s.read_exact(&mut got).await.unwrap();
        let (server, mut client) = tokio::io::duplex(4096);
        let mut s = WsStream::new(server, 100);
        client
            .write_all(&client_frame(0x02, &[1u8; 100]))
            .await
            .unwrap();
        client
            .write_all(&client_frame(0x80, &[2u8; 17]))
            .await
            .unwrap();
        let mut got = vec![0u8; 100];
        s.read_exact(&mut got).await.unwrap();
        let e = s.read(&mut got).await.unwrap_err();
        assert!(e.to_string().contains("117 bytes"), "{e}");
    }

    #[tokio::test]
    async fn shutdown_sends_a_close_frame() {
        let (mut s, mut c, _) = connected(Some("mqtt")).await;
        s.write_all(b"\xd0\x00").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(
            c.next().await.unwrap().unwrap(),
            Message::binary(&b"\xd0\x00"[..])
        );
        match c.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
            m => panic!("{m:?}"),
        }
    }

    /// A masked client frame, by hand.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let (mut h, n) = frame_header(first, payload.len());
        h[1] |= 0x80;
        let mut f = h[..n].to_vec();
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Parses the server's (unmasked) frames: (first byte, payload) each.
    fn server_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        while !b.is_empty() {
            assert_eq!(b[1] & 0x80, 0, "server frames are not masked");
            let (len, at) = match b[1] {
                126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            frames.push((b[0], b[at..at + len].to_vec()));
            b = &b[at + len..];
        }
        frames
    }

    /// Fed one byte at a time, with a fragmented message, a ping between its fragments,
    /// 16-bit and 64-bit lengths and an empty frame: the data comes out whole and in order.
    #[tokio::test]
    async fn frames_fed_byte_by_byte() {
        let (server, mut client): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
        let mut s = WsStream::new(server, 200_000);
        let mid: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 13) as u8).collect();
        let mut wire = client_frame(0x02, b"ab"); // binary, not final
        wire.extend(client_frame(0x89, b"p1")); // ping inside the message
        wire.extend(client_frame(0x00, &mid)); // continuation, not final
        wire.extend(client_frame(0x80, b"")); // final, empty
        wire.extend(client_frame(0x82, &big));
        wire.extend(client_frame(0x88, &1000u16.to_be_bytes()));
        let want = [&b"ab"[..], &mid, &big].concat();
        let feed = tokio::spawn(async move {
            for b in wire {
                client.write_all(&[b]).await.unwrap();
            }
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, want);
        s.shutdown().await.unwrap();
        drop(s);
        let back = server_frames(&feed.await.unwrap());
        assert_eq!(
            back,
            vec![
                (0x8a, b"p1".to_vec()),
                (0x88, 1000u16.to_be_bytes().to_vec())
            ]
        );
    }

    /// A stream without vectored writes (the other write path).
    struct NoVectored(DuplexStream);

    impl AsyncRead for NoVectored {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for NoVectored {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A socket that takes a few bytes at a time: every frame still goes out whole, in
    /// order, and a pong never lands inside a data frame; with and without vectored writes.
    #[tokio::test]
    async fn short_writes_keep_frames_whole() {
        async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut s: WsStream<S>, client: DuplexStream) {
            let mut client = client;
            let reader = tokio::spawn(async move {
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                back
            });
            let a: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
            s.write_all(&a).await.unwrap();
            s.pong = Some(b"pp".to_vec());
            s.write_all(b"xyz").await.unwrap();
            s.shutdown().await.unwrap();
            drop(s);
            let frames = server_frames(&reader.await.unwrap());
            assert_eq!(
                frames,
                vec![
                    (0x82, a),
                    (0x8a, b"pp".to_vec()),
                    (0x82, b"xyz".to_vec()),
                    (0x88, 1000u16.to_be_bytes().to_vec())
                ]
            );
        }
        let (server, client) = tokio::io::duplex(7);
        assert!(server.is_write_vectored());
        run(WsStream::new(server, 1024), client).await;
        let (server, client) = tokio::io::duplex(7);
        let s = WsStream::new(NoVectored(server), 1024);
        assert!(!s.get_ref().is_write_vectored());
        run(s, client).await;
    }

    #[tokio::test]
    async fn protocol_errors() {
        for (wire, why) in [
            (
                client_frame(0x80, b"x"),
                "continuation frame outside a message",
            ),
            (
                [client_frame(0x02, b"x"), client_frame(0x82, b"y")].concat(),
                "new message inside",
            ),
            (client_frame(0x09, b"x"), "fragmented or long control frame"),
            (
                client_frame(0x89, &[0u8; 126]),
                "fragmented or long control frame",
            ),
            (client_frame(0xc2, b"x"), "reserved bits"),
            (client_frame(0x83, b"x"), "reserved opcode"),
            (b"\x82\x01x".to_vec(), "unmasked frame"),
        ] {
            let (server, mut client) = tokio::io::duplex(4096);
            let mut s = WsStream::new(server, 1024);
            client.write_all(&wire).await.unwrap();
            let mut buf = [0u8; 64];
            let e = loop {
                match s.read(&mut buf).await {
                    Ok(n) => assert!(n > 0, "EOF instead of {why}"),
                    Err(e) => break e,
                }
            };
            assert!(e.to_string().contains(why), "{e} is not {why}");
            drop(s);
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            let frames = server_frames(&back);
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].0, 0x88);
            assert_eq!(&frames[0].1[..2], &1002u16.to_be_bytes());
        }
    }

    /// The connection ends inside a frame: an error, not a clean EOF.
    #[tokio::test]
    async fn eof_inside_a_frame() {
        let (server, mut client) = tokio::io::duplex(4096);
        let mut s = WsStream::new(server, 1024);
        let f = client_frame(0x82, b"hello");
        client.write_all(&f[..f.len() - 2]).await.unwrap();
        drop(client);
        let mut got = Vec::new();
        let e = s.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"hel");
    }

    /// WebSocket over TLS: the TLS handshake, then the upgrade on the TLS stream.
    #[tokio::test]
    async fn over_tls() {
        let dir = tempfile::tempdir().unwrap();
        let ca = test_pki::ca(dir.path(), "ca");
        let l = test_pki::server_leaf(dir.path(), "server", &ca, &rcgen::PKCS_ECDSA_P256_SHA256);
        let tls = super::super::TlsServer::load(&l.cert, &l.key, None).unwrap();
        let (s, c) = test_pki::tcp_pair().await;
        let connector =
            tokio_rustls::TlsConnector::from(super::super::client_config(&ca.pem, None).unwrap());
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut req = "wss://localhost/mqtt".into_client_request().unwrap();
        req.headers_mut().insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            "mqtt".parse().unwrap(),
        );
        let (s, c) = tokio::join!(
            async {
                let (t, _) = tls.accept(s).await?;
                accept(t, 1024).await
            },
            async {
                let t = connector.connect(name, c).await.unwrap();
                tokio_tungstenite::client_async(req, t).await
            }
        );
        let (mut s, (mut c, _)) = (s.unwrap(), c.unwrap());
        c.send(Message::binary(CONNECT)).await.unwrap();
        let mut got = vec![0u8; CONNECT.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, CONNECT);
        s.write_all(b"\x20\x02\x00\x00").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            c.next().await.unwrap().unwrap(),
            Message::binary(&b"\x20\x02\x00\x00"[..])
        );
    }

    #[test]
    fn idle_size() {
        // The state on top of the inner stream (see the module doc).
        let overhead = std::mem::size_of::<WsStream<()>>();
        assert!(overhead <= 88, "{overhead}");
        let _ = Role::Server;
    }
}
