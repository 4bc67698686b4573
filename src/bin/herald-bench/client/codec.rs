//! The client's codec: packets from the broker parsed in place from the read buffer,
//! packets to it encoded into a write buffer (a whole batch of PUBLISH in one).

use bytes::{BufMut, BytesMut};

/// A packet from the broker, borrowing from the read buffer.
#[derive(Debug)]
pub enum Packet<'a> {
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish {
        qos: u8,
        dup: bool,
        pkid: u16,
        topic: &'a [u8],
        payload: &'a [u8],
    },
    PubAck(u16),
    PubRec,
    PubRel(u16),
    PubComp,
    SubAck {
        codes: &'a [u8],
    },
    UnsubAck,
    PingResp,
}

/// Parses one packet off the front of `buf`: the packet and its length, or `None` if
/// incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        if i > 4 {
            return Err("bad remaining length");
        }
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let total = i + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[i..total];
    let b0 = buf[0];
    let id = |body: &[u8]| {
        if body.len() < 2 {
            Err("short packet")
        } else {
            Ok(u16::from_be_bytes([body[0], body[1]]))
        }
    };
    let p = match b0 >> 4 {
        2 => {
            if body.len() != 2 {
                return Err("bad CONNACK");
            }
            Packet::ConnAck {
                session_present: body[0] & 1 != 0,
                code: body[1],
            }
        }
        3 => {
            let qos = (b0 >> 1) & 3;
            let tl = id(body)? as usize;
            let mut off = 2 + tl;
            if body.len() < off {
                return Err("PUBLISH topic runs past the packet");
            }
            let topic = &body[2..off];
            let pkid = if qos > 0 {
                let p = id(&body[off..])?;
                off += 2;
                p
            } else {
                0
            };
            Packet::Publish {
                qos,
                dup: b0 & 8 != 0,
                pkid,
                topic,
                payload: &body[off..],
            }
        }
        4 => Packet::PubAck(id(body)?),
        5 => {
            id(body)?;
            Packet::PubRec
        }
        6 => Packet::PubRel(id(body)?),
        7 => {
            id(body)?;
            Packet::PubComp
        }
        9 => {
            id(body)?;
            Packet::SubAck { codes: &body[2..] }
        }
        11 => Packet::UnsubAck,
        13 => Packet::PingResp,
        _ => return Err("unexpected packet type from the broker"),
    };
    Ok(Some((p, total)))
}

fn put_len(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

/// CONNECT, with a user name and password when `login` is given.
pub fn encode_connect(
    buf: &mut BytesMut,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    login: Option<(&str, &[u8])>,
) {
    let extra = login.map_or(0, |(u, p)| 2 + u.len() + 2 + p.len());
    buf.put_u8(0x10);
    put_len(buf, 10 + 2 + client_id.len() + extra);
    buf.put_u16(4);
    buf.put_slice(b"MQTT");
    buf.put_u8(4);
    let mut flags = if clean { 0x02 } else { 0 };
    if login.is_some() {
        flags |= 0xC0;
    }
    buf.put_u8(flags);
    buf.put_u16(keep_alive);
    buf.put_u16(client_id.len() as u16);
    buf.put_slice(client_id.as_bytes());
    if let Some((user, password)) = login {
        buf.put_u16(user.len() as u16);
        buf.put_slice(user.as_bytes());
        buf.put_u16(password.len() as u16);
        buf.put_slice(password);
    }
}

pub fn encode_subscribe(buf: &mut BytesMut, pkid: u16, filter: &str, qos: u8) {
    buf.put_u8(0x82);
    put_len(buf, 2 + 2 + filter.len() + 1);
    buf.put_u16(pkid);
    buf.put_u16(filter.len() as u16);
    buf.put_slice(filter.as_bytes());
    buf.put_u8(qos);
}

pub fn encode_unsubscribe(buf: &mut BytesMut, pkid: u16, filter: &str) {
    buf.put_u8(0xA2);
    put_len(buf, 2 + 2 + filter.len());
    buf.put_u16(pkid);
    buf.put_u16(filter.len() as u16);
    buf.put_slice(filter.as_bytes());
}

/// A QoS 0 PUBLISH with the retain flag and `payload_len` zero bytes; 0 bytes clears the
/// topic's retained message.
pub fn encode_retained(buf: &mut BytesMut, topic: &[u8], payload_len: usize) {
    let len = 2 + topic.len() + payload_len;
    buf.reserve(len + 5);
    buf.put_u8(0x31);
    put_len(buf, len);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    buf.put_bytes(0, payload_len);
}

/// Length of the stamp at the front of every benchmark payload.
pub const STAMP_LEN: usize = 16;

/// A PUBLISH whose payload starts with the send time and a sequence number (little-endian
/// u64 each), zero-padded to `payload_len`.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish(
    buf: &mut BytesMut,
    topic: &[u8],
    qos: u8,
    pkid: u16,
    ts_ns: u64,
    seq: u64,
    payload_len: usize,
) {
    let payload_len = payload_len.max(STAMP_LEN);
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload_len;
    buf.reserve(len + 5);
    buf.put_u8(0x30 | qos << 1);
    put_len(buf, len);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    if qos > 0 {
        buf.put_u16(pkid);
    }
    put_stamped(buf, ts_ns, seq, payload_len);
}

/// A benchmark payload: the send time and a sequence number (little-endian u64 each),
/// zero-padded to `payload_len` (at least `STAMP_LEN`).
pub fn put_stamped(buf: &mut BytesMut, ts_ns: u64, seq: u64, payload_len: usize) {
    buf.put_u64_le(ts_ns);
    buf.put_u64_le(seq);
    buf.put_bytes(0, payload_len.max(STAMP_LEN) - STAMP_LEN);
}

/// (send time, sequence number) of a benchmark payload.
pub fn stamp(payload: &[u8]) -> Option<(u64, u64)> {
    if payload.len() < STAMP_LEN {
        return None;
    }
    let ts = u64::from_le_bytes(payload[0..8].try_into().ok()?);
    let seq = u64::from_le_bytes(payload[8..16].try_into().ok()?);
    Some((ts, seq))
}

pub fn encode_puback(buf: &mut BytesMut, pkid: u16) {
    buf.put_slice(&[0x40, 2]);
    buf.put_u16(pkid);
}
