//! The RFC 6455 frame codec: incoming headers are collected and checked, payloads unmasked
//! in place, control frames handled; outgoing frames are written unmasked (server side).

use super::{Frame, WsStream};

impl<S> WsStream<S> {
    /// Takes the frames out of `buf` (bytes just read), leaving the data payload, unmasked,
    /// at its front; returns how many bytes that is. Control frames are handled here.
    pub(super) fn decode(&mut self, buf: &mut [u8]) -> Result<usize, Violation> {
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
    pub(super) fn queue_close(&mut self, payload: &[u8]) {
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
pub(super) fn push_frame(out: &mut Vec<u8>, first: u8, payload: &[u8]) {
    let (h, n) = frame_header(first, payload.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
}

pub(super) fn frame_header(first: u8, len: usize) -> ([u8; 10], usize) {
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
pub(super) struct Violation {
    pub(super) code: u16,
    pub(super) reason: String,
}

impl Violation {
    fn protocol(reason: &str) -> Violation {
        Violation {
            code: 1002,
            reason: reason.into(),
        }
    }
}
