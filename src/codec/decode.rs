//! Client-to-broker packets from bytes: `mqttbytes` frames them and parses PUBLISH, the
//! rest is parsed here (see the parent module for why).

use bytes::{Buf, Bytes, BytesMut};

use super::{Connect, DecodeError, Login, Packet, Publish, Qos, Subscribe, Unsubscribe, Will};

/// Takes one complete packet off the front of `buf`, `Ok(None)` if more bytes are needed.
pub fn decode(buf: &mut BytesMut, max_size: usize) -> Result<Option<Packet>, DecodeError> {
    let header = match mqttbytes::check(buf.iter(), max_size) {
        Ok(h) => h,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => return Err(DecodeError::TooLarge(n)),
        Err(e) => return Err(e.into()),
    };
    let byte1 = buf[0];
    let (kind, flags) = (byte1 >> 4, byte1 & 0x0f);
    let frame = buf.split_to(header.frame_length()).freeze();
    // Skip the fixed header: type byte plus 1..4 remaining-length bytes.
    let mut body = frame.slice(frame.len() - remaining_len(&frame)..);

    let expect_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(DecodeError::Malformed("reserved flag bits set"))
        }
    };
    let id_only = |body: &mut Bytes| -> Result<u16, DecodeError> {
        if body.len() != 2 {
            return Err(DecodeError::Malformed("bad length for an ack"));
        }
        let id = body.get_u16();
        if id == 0 {
            return Err(DecodeError::Malformed("packet id 0"));
        }
        Ok(id)
    };

    let packet = match kind {
        1 => {
            expect_flags(0)?;
            Packet::Connect(decode_connect(&mut body)?)
        }
        3 => {
            let qos =
                Qos::try_from((flags >> 1) & 0b11).map_err(|_| DecodeError::Malformed("QoS 3"))?;
            if qos == Qos::AtMostOnce && flags & 0b1000 != 0 {
                return Err(DecodeError::Malformed("DUP set on QoS 0"));
            }
            let p = mqttbytes::v4::Publish::read(header, frame)?;
            check_topic_name(&p.topic)?;
            Packet::Publish(Publish {
                dup: p.dup,
                qos,
                retain: p.retain,
                topic: p.topic,
                pkid: p.pkid,
                payload: p.payload,
            })
        }
        4 => {
            expect_flags(0)?;
            Packet::PubAck(id_only(&mut body)?)
        }
        5 => {
            expect_flags(0)?;
            Packet::PubRec(id_only(&mut body)?)
        }
        6 => {
            expect_flags(0b0010)?;
            Packet::PubRel(id_only(&mut body)?)
        }
        7 => {
            expect_flags(0)?;
            Packet::PubComp(id_only(&mut body)?)
        }
        8 => {
            expect_flags(0b0010)?;
            Packet::Subscribe(decode_subscribe(&mut body)?)
        }
        10 => {
            expect_flags(0b0010)?;
            Packet::Unsubscribe(decode_unsubscribe(&mut body)?)
        }
        12 | 14 => {
            expect_flags(0)?;
            if !body.is_empty() {
                return Err(DecodeError::Malformed("body on an empty packet"));
            }
            if kind == 12 {
                Packet::PingReq
            } else {
                Packet::Disconnect
            }
        }
        2 | 9 | 11 | 13 => return Err(DecodeError::Malformed("server-to-client packet")),
        _ => return Err(DecodeError::Malformed("unknown packet type")),
    };
    Ok(Some(packet))
}

/// Length of the packet body: the frame minus type byte and remaining-length bytes.
fn remaining_len(frame: &[u8]) -> usize {
    let mut n = 0usize;
    let mut shift = 0;
    for b in frame.iter().skip(1).take(4) {
        n |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    n
}

fn take_u8(b: &mut Bytes) -> Result<u8, DecodeError> {
    if b.is_empty() {
        return Err(DecodeError::Malformed("packet ends early"));
    }
    Ok(b.get_u8())
}

fn take_u16(b: &mut Bytes) -> Result<u16, DecodeError> {
    if b.len() < 2 {
        return Err(DecodeError::Malformed("packet ends early"));
    }
    Ok(b.get_u16())
}

fn take_bytes(b: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = take_u16(b)? as usize;
    if len > b.len() {
        return Err(DecodeError::Malformed("string runs past the packet end"));
    }
    Ok(b.split_to(len))
}

/// A UTF-8 string field of CONNECT, SUBSCRIBE or UNSUBSCRIBE (PUBLISH's topic, which
/// `mqttbytes` reads, gets the same checks in `check_topic_name`).
fn take_string(b: &mut Bytes) -> Result<String, DecodeError> {
    let raw = take_bytes(b)?;
    let s = String::from_utf8(raw.to_vec())
        .map_err(|_| DecodeError::Malformed("string is not valid UTF-8"))?;
    if s.contains('\0') {
        return Err(DecodeError::Malformed("string contains U+0000"));
    }
    Ok(s)
}

fn decode_connect(b: &mut Bytes) -> Result<Connect, DecodeError> {
    let name = take_string(b)?;
    let level = take_u8(b)?;
    match (name.as_str(), level) {
        ("MQTT", 4) | ("MQIsdp", 3) => {}
        ("MQTT", _) | ("MQIsdp", _) => return Err(DecodeError::UnsupportedProtocol(level)),
        _ => return Err(DecodeError::Malformed("unknown protocol name")),
    }
    let flags = take_u8(b)?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let keep_alive = take_u16(b)?;
    let client_id = take_string(b)?;
    let last_will = if flags & 0x04 != 0 {
        let topic = take_string(b)?;
        check_topic_name(&topic)?;
        let message = take_bytes(b)?;
        let qos =
            Qos::try_from((flags >> 3) & 0b11).map_err(|_| DecodeError::Malformed("will QoS 3"))?;
        Some(Will {
            topic,
            message,
            qos,
            retain: flags & 0x20 != 0,
        })
    } else {
        if flags & 0x38 != 0 {
            return Err(DecodeError::Malformed("will flags without a will"));
        }
        None
    };
    let has_user = flags & 0x80 != 0;
    let has_pass = flags & 0x40 != 0;
    if has_pass && !has_user {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let username = if has_user {
        take_string(b)?
    } else {
        String::new()
    };
    let password = if has_pass {
        take_bytes(b)?
    } else {
        Bytes::new()
    };
    if !b.is_empty() {
        return Err(DecodeError::Malformed(
            "trailing bytes after CONNECT payload",
        ));
    }
    Ok(Connect {
        keep_alive,
        client_id,
        clean_session: flags & 0x02 != 0,
        last_will,
        login: has_user.then_some(Login { username, password }),
    })
}

fn decode_subscribe(b: &mut Bytes) -> Result<Subscribe, DecodeError> {
    let pkid = take_u16(b)?;
    if pkid == 0 {
        return Err(DecodeError::Malformed("packet id 0"));
    }
    let mut filters = Vec::new();
    while !b.is_empty() {
        let filter = take_string(b)?;
        let options = take_u8(b)?;
        let qos = Qos::try_from(options)
            .map_err(|_| DecodeError::Malformed("bad subscription options"))?;
        let filter = if crate::topic::valid_filter(&filter) {
            Ok(filter)
        } else {
            Err(filter)
        };
        filters.push((filter, qos));
    }
    if filters.is_empty() {
        return Err(DecodeError::Malformed("SUBSCRIBE without filters"));
    }
    Ok(Subscribe { pkid, filters })
}

fn decode_unsubscribe(b: &mut Bytes) -> Result<Unsubscribe, DecodeError> {
    let pkid = take_u16(b)?;
    if pkid == 0 {
        return Err(DecodeError::Malformed("packet id 0"));
    }
    let mut topics = Vec::new();
    while !b.is_empty() {
        topics.push(take_string(b)?);
    }
    if topics.is_empty() {
        return Err(DecodeError::Malformed("UNSUBSCRIBE without filters"));
    }
    Ok(Unsubscribe { pkid, topics })
}

fn check_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.is_empty() {
        return Err(DecodeError::Malformed("empty topic name"));
    }
    if topic.contains(['+', '#']) {
        return Err(DecodeError::Malformed("wildcard in topic name"));
    }
    if topic.contains('\0') {
        return Err(DecodeError::Malformed("topic contains U+0000"));
    }
    Ok(())
}

/// The largest CONNECT MQTT 3.1.1 allows: a 5-byte fixed header, a 10-byte variable header
/// and five length-prefixed fields (client id, will topic, will message, user name,
/// password) of at most 65,535 bytes each.
pub const MAX_CONNECT_SIZE: usize = 5 + 10 + 5 * (2 + 65_535);

/// What the first bytes of a CONNECT still arriving say: its whole size (fixed header
/// included) and, once the flags byte is in, whether it carries a will. `None`: too few
/// bytes to tell the size, or not a CONNECT's header (`decode` answers those).
pub fn connect_prefix(buf: &[u8]) -> Option<(usize, Option<bool>)> {
    let (mut len, mut i) = (0usize, 1usize);
    loop {
        let b = *buf.get(i)?;
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    let will = match (buf.get(i), buf.get(i + 1)) {
        (Some(&hi), Some(&lo)) => {
            let name = usize::from(u16::from_be_bytes([hi, lo]));
            buf.get(i + 2 + name + 1).map(|flags| flags & 0x04 != 0)
        }
        _ => None,
    };
    Some((i + len, will))
}
