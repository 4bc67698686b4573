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
//!
//! Files:
//! - `mod.rs` (here): the `WsStream` state;
//! - `handshake.rs`: the HTTP upgrade (`accept`);
//! - `frame.rs`: the RFC 6455 frame codec: incoming headers, unmasking, control frames, the
//!   frames we send;
//! - `stream.rs`: `WsStream` as `AsyncRead + AsyncWrite`: what is read and written when;
//! - `tests.rs`: unit tests.

mod frame;
mod handshake;
mod stream;
#[cfg(test)]
mod tests;

pub use handshake::{accept, PATH};

/// What the bytes being read belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Between frames: the next bytes are a header.
    Header,
    /// Payload of a binary (or continuation) frame: goes to the reader.
    Data,
    /// Payload of a control frame: a ping's is kept in `pong` for the answer, a close's code in
    /// `hdr`; a pong's is dropped.
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
}
