//! MQTT 3.1.1 wire format: the one boundary between bytes and Herald's own packet types.
//!
//! From `mqttbytes` Herald takes the framing check (`mqttbytes::check`: is a whole packet
//! in the buffer, within the size limit) and the PUBLISH parser, which are correct and
//! fast; the result is turned into Herald's `Publish` at once. The rest is hand-written:
//! `mqttbytes` is lenient where a broker must be strict (reserved flag bits, wildcard
//! topics in PUBLISH, empty SUBSCRIBE, U+0000 in strings), it does not know the MQTT 3.1
//! "MQIsdp" protocol name, and it reads a CONNECT password as a UTF-8 string where 3.1.1
//! makes it binary data. So CONNECT, SUBSCRIBE, UNSUBSCRIBE and the acks are parsed here,
//! and the rest of Herald sees only well-formed packets in Herald's types (`Qos` from
//! `message`). Outgoing packets are encoded here directly into the connection's write
//! buffer; PUBLISH in particular is written from shared message parts without building an
//! intermediate struct.
//!
//! Every UTF-8 string field (CONNECT's protocol name, client id, will topic and user name,
//! PUBLISH's topic, SUBSCRIBE's and UNSUBSCRIBE's filters) that is not valid UTF-8 or holds
//! U+0000 makes the packet malformed, which closes the connection (MQTT 3.1.1, 1.5.3). The
//! password and the will payload are binary data and are not checked. A filter that is valid
//! UTF-8 but not a valid filter (`a#`, `a/#/b`) is not malformed: SUBSCRIBE refuses it with
//! 0x80 and the connection stays.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use crate::message::Qos;

/// CONNECT, as Herald reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub keep_alive: u16,
    pub client_id: String,
    pub clean_session: bool,
    pub last_will: Option<Will>,
    pub login: Option<Login>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub message: Bytes,
    pub qos: Qos,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub username: String,
    /// Binary data in MQTT 3.1.1 (a token, a hash, any bytes): never turned into text.
    pub password: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: Qos,
    pub retain: bool,
    pub topic: String,
    /// 0 at QoS 0.
    pub pkid: u16,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub topics: Vec<String>,
}

/// A packet a client may send to the broker.
#[derive(Debug)]
pub enum Packet {
    Connect(Connect),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect,
}

#[derive(Debug)]
pub struct Subscribe {
    pub pkid: u16,
    /// `Err(filter)` marks a filter that is a clean UTF-8 string but not a valid filter
    /// (`a#`): it is refused with 0x80 in the SUBACK rather than closing the connection, as
    /// Mosquitto and EMQX clients expect.
    pub filters: Vec<(Result<String, String>, Qos)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// CONNECT with a protocol level we do not speak: answer CONNACK 1, then close.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
}

impl From<mqttbytes::Error> for DecodeError {
    fn from(e: mqttbytes::Error) -> Self {
        use mqttbytes::Error as E;
        DecodeError::Malformed(match e {
            E::InvalidQoS(_) => "invalid QoS",
            E::TopicNotUtf8 => "string is not valid UTF-8",
            E::PacketIdZero => "packet id 0",
            E::MalformedRemainingLength => "bad remaining length",
            E::InvalidPacketType(_) => "unknown packet type",
            E::PayloadRequired => "packet needs a body",
            E::BoundaryCrossed(_) => "string runs past the packet end",
            E::IncorrectPacketFormat => "incorrect packet format",
            E::PayloadSizeLimitExceeded(_) => "packet too large",
            _ => "malformed packet",
        })
    }
}

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
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::Malformed("QoS 3"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(DecodeError::Malformed("DUP set on QoS 0"));
            }
            let p = mqttbytes::v4::Publish::read(header, frame)?;
            check_topic_name(&p.topic)?;
            Packet::Publish(Publish {
                dup: p.dup,
                // Checked above: 0, 1 or 2.
                qos: Qos::try_from(qos).map_err(|_| DecodeError::Malformed("QoS 3"))?,
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

fn put_remaining_len(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

pub fn encode_connack(buf: &mut BytesMut, session_present: bool, code: u8) {
    buf.put_slice(&[0x20, 2, session_present as u8, code]);
}

fn encode_id_packet(buf: &mut BytesMut, byte1: u8, pkid: u16) {
    buf.put_slice(&[byte1, 2]);
    buf.put_u16(pkid);
}

pub fn encode_puback(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0x40, pkid);
}

pub fn encode_pubrec(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0x50, pkid);
}

pub fn encode_pubrel(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0x62, pkid);
}

pub fn encode_pubcomp(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0x70, pkid);
}

pub fn encode_unsuback(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0xB0, pkid);
}

pub fn encode_pingresp(buf: &mut BytesMut) {
    buf.put_slice(&[0xD0, 0]);
}

/// `codes`: granted QoS per filter, 0x80 for a refusal.
pub fn encode_suback(buf: &mut BytesMut, pkid: u16, codes: &[u8]) {
    buf.put_u8(0x90);
    put_remaining_len(buf, 2 + codes.len());
    buf.put_u16(pkid);
    buf.put_slice(codes);
}

/// Packets a client receives, as far as the node-to-node link (which is an MQTT client of
/// its peer) needs them.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerPacket {
    ConnAck(u8),
    PubAck(u16),
    PingResp,
}

/// Takes one CONNACK, PUBACK or PINGRESP off `buf`; anything else is an error.
pub fn decode_from_server(buf: &mut BytesMut) -> Result<Option<ServerPacket>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let want = match byte1 {
        0x20 | 0x40 => 4,
        0xD0 => 2,
        _ => return Err(DecodeError::Malformed("unexpected packet from peer")),
    };
    if buf.len() < want {
        return Ok(None);
    }
    if usize::from(buf[1]) != want - 2 {
        return Err(DecodeError::Malformed("bad remaining length"));
    }
    let p = buf.split_to(want);
    Ok(Some(match byte1 {
        0x20 => ServerPacket::ConnAck(p[3]),
        0x40 => ServerPacket::PubAck(u16::from_be_bytes([p[2], p[3]])),
        _ => ServerPacket::PingResp,
    }))
}

/// CONNECT with a clean session, no will; `login` = (user name, password).
pub fn encode_connect(
    buf: &mut BytesMut,
    client_id: &str,
    keep_alive: u16,
    login: Option<(&str, &[u8])>,
) {
    let login_len = login.map_or(0, |(u, p)| 2 + u.len() + 2 + p.len());
    buf.put_u8(0x10);
    put_remaining_len(buf, 10 + 2 + client_id.len() + login_len);
    buf.put_u16(4);
    buf.put_slice(b"MQTT");
    let flags = if login.is_some() {
        0x02 | 0x80 | 0x40
    } else {
        0x02
    };
    buf.put_slice(&[4, flags]);
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

pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0]);
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

/// An upper bound of the encoded size of a PUBLISH (any QoS), for the write budget.
pub fn publish_len(topic_len: usize, payload_len: usize) -> usize {
    // Fixed header (1 + up to 4 length bytes), topic length, packet id.
    9 + topic_len + payload_len
}

/// Writes a PUBLISH; `pkid` is ignored for QoS 0.
pub fn encode_publish(
    buf: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    qos: Qos,
    pkid: u16,
    retain: bool,
    dup: bool,
) {
    let qos_bits = qos as u8;
    let len = 2 + topic.len() + if qos_bits > 0 { 2 } else { 0 } + payload.len();
    buf.reserve(len + 5);
    buf.put_u8(0x30 | (dup as u8) << 3 | qos_bits << 1 | retain as u8);
    put_remaining_len(buf, len);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic.as_bytes());
    if qos_bits > 0 {
        buf.put_u16(pkid);
    }
    buf.put_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_prefix_reads_size_and_will() {
        let mut b = BytesMut::new();
        encode_connect(&mut b, "dev1", 30, None);
        let whole = b.len();
        assert_eq!(connect_prefix(&b[..1]), None);
        assert_eq!(connect_prefix(&b[..2]), Some((whole, None)));
        assert_eq!(connect_prefix(&b), Some((whole, Some(false))));
        // 0x10, remaining length 200,000 (3 bytes), "MQTT", level 4, flags with a will.
        let big = [
            0x10, 0xc0, 0x9a, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x06,
        ];
        assert_eq!(connect_prefix(&big), Some((4 + 200_000, Some(true))));
    }

    #[test]
    fn link_client_side_roundtrip() {
        let mut b = BytesMut::new();
        encode_connect(&mut b, "$node/a", 30, Some(("a", b"s3cret")));
        match decode(&mut b, 1024) {
            Ok(Some(Packet::Connect(c))) => {
                assert_eq!(c.client_id, "$node/a");
                assert!(c.clean_session);
                assert_eq!(c.keep_alive, 30);
                let login = c.login.expect("login");
                assert_eq!(
                    (login.username.as_str(), &login.password[..]),
                    ("a", &b"s3cret"[..])
                );
            }
            other => panic!("{other:?}"),
        }
        encode_connack(&mut b, false, 0);
        encode_puback(&mut b, 7);
        encode_pingresp(&mut b);
        b.put_u8(0x40);
        assert_eq!(
            decode_from_server(&mut b).unwrap(),
            Some(ServerPacket::ConnAck(0))
        );
        assert_eq!(
            decode_from_server(&mut b).unwrap(),
            Some(ServerPacket::PubAck(7))
        );
        assert_eq!(
            decode_from_server(&mut b).unwrap(),
            Some(ServerPacket::PingResp)
        );
        assert_eq!(decode_from_server(&mut b).unwrap(), None, "half a PUBACK");
        encode_pingreq(&mut b);
        b.put_u8(0);
        assert!(
            decode_from_server(&mut b).is_err(),
            "a PUBACK with the wrong length"
        );
    }

    fn decode_all(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(bytes), 1024)
    }

    fn connect_bytes(name: &str, level: u8, flags: u8, id: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend((name.len() as u16).to_be_bytes());
        body.extend(name.as_bytes());
        body.push(level);
        body.push(flags);
        body.extend(30u16.to_be_bytes());
        body.extend((id.len() as u16).to_be_bytes());
        body.extend(id.as_bytes());
        let mut out = vec![0x10, body.len() as u8];
        out.extend(body);
        out
    }

    #[test]
    fn connect_mqtt_and_mqisdp() {
        for (name, level) in [("MQTT", 4), ("MQIsdp", 3)] {
            match decode_all(&connect_bytes(name, level, 0x02, "a")) {
                Ok(Some(Packet::Connect(c))) => {
                    assert_eq!(c.client_id, "a");
                    assert!(c.clean_session);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn connect_level_5_is_unsupported() {
        assert_eq!(
            decode_all(&connect_bytes("MQTT", 5, 0x02, "a")).unwrap_err(),
            DecodeError::UnsupportedProtocol(5)
        );
    }

    #[test]
    fn connect_reserved_flag() {
        assert!(decode_all(&connect_bytes("MQTT", 4, 0x03, "a")).is_err());
    }

    #[test]
    fn partial_packet_waits() {
        let full = connect_bytes("MQTT", 4, 0x02, "abc");
        assert!(decode_all(&full[..full.len() - 1]).unwrap().is_none());
    }

    #[test]
    fn publish_roundtrip() {
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, "a/b", b"hi", Qos::AtLeastOnce, 7, true, true);
        match decode(&mut buf, 1024) {
            Ok(Some(Packet::Publish(p))) => {
                assert_eq!(p.topic, "a/b");
                assert_eq!(p.pkid, 7);
                assert!(p.retain && p.dup);
                assert_eq!(&p.payload[..], b"hi");
            }
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn publish_rejects_qos3_and_wildcards() {
        assert!(decode_all(&[0x36, 5, 0, 1, b'a', 0, 1]).is_err());
        assert!(decode_all(&[0x30, 3, 0, 1, b'#']).is_err());
        assert!(decode_all(&[0x38, 3, 0, 1, b'a']).is_err());
    }

    #[test]
    fn subscribe_flags_and_filters() {
        // SUBSCRIBE with wrong reserved flags.
        assert!(decode_all(&[0x80, 6, 0, 1, 0, 1, b'a', 0]).is_err());
        match decode_all(&[0x82, 12, 0, 1, 0, 1, b'a', 1, 0, 3, b'a', b'#', b'b', 0]) {
            Ok(Some(Packet::Subscribe(s))) => {
                assert_eq!(s.filters.len(), 2);
                assert!(s.filters[0].0.is_ok());
                assert!(s.filters[1].0.is_err());
            }
            other => panic!("{other:?}"),
        }
        assert!(decode_all(&[0x82, 2, 0, 1]).is_err());
    }

    /// CONNECT with a will and a login; every field is raw bytes so a test can put anything
    /// in any of them.
    fn connect_with_fields(id: &[u8], will: (&[u8], &[u8]), user: &[u8], pass: &[u8]) -> Vec<u8> {
        let mut body = vec![
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            4,
            0x02 | 0x04 | 0x80 | 0x40,
            0,
            30,
        ];
        for field in [id, will.0, will.1, user, pass] {
            body.extend((field.len() as u16).to_be_bytes());
            body.extend(field);
        }
        with_header(0x10, &body)
    }

    fn with_header(byte1: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![byte1, body.len() as u8];
        out.extend(body);
        out
    }

    #[test]
    fn u0000_in_any_string_field_is_malformed() {
        let nul = DecodeError::Malformed("string contains U+0000");
        let fine = connect_with_fields(b"id", (b"w/t", b"bye"), b"user", b"pw");
        assert!(matches!(decode_all(&fine), Ok(Some(Packet::Connect(_)))));
        for bad in [
            connect_with_fields(b"i\0d", (b"w/t", b"bye"), b"user", b"pw"),
            connect_with_fields(b"id", (b"w/\0t", b"bye"), b"user", b"pw"),
            connect_with_fields(b"id", (b"w/t", b"bye"), b"us\0er", b"pw"),
        ] {
            assert_eq!(decode_all(&bad).unwrap_err(), nul, "{bad:02x?}");
        }
        let mut name = connect_bytes("MQTT", 4, 0x02, "a");
        name[5] = 0;
        assert!(decode_all(&name).is_err(), "protocol name");

        // SUBSCRIBE: one clean filter and one with U+0000 closes, not SUBACK 0x80.
        let sub = with_header(0x82, &[0, 1, 0, 1, b'a', 0, 0, 3, b'a', 0, b'b', 0]);
        assert_eq!(decode_all(&sub).unwrap_err(), nul);
        let sub = with_header(0x82, &[0, 1, 0, 3, b'a', 0xC3, 0x28, 0]);
        assert!(decode_all(&sub).is_err(), "invalid UTF-8 filter");

        let unsub = with_header(0xA2, &[0, 1, 0, 1, b'a', 0, 2, 0, b'b']);
        assert_eq!(decode_all(&unsub).unwrap_err(), nul);
        let unsub = with_header(0xA2, &[0, 1, 0, 2, 0xC3, 0x28]);
        assert!(decode_all(&unsub).is_err(), "invalid UTF-8 filter");
        match decode_all(&with_header(
            0xA2,
            &[0, 1, 0, 1, b'a', 0, 3, b'a', b'/', b'#'],
        )) {
            Ok(Some(Packet::Unsubscribe(u))) => {
                assert_eq!(u.pkid, 1);
                assert_eq!(u.topics, ["a", "a/#"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            decode_all(&with_header(0xA2, &[0, 0, 0, 1, b'a'])).is_err(),
            "id 0"
        );
        assert!(
            decode_all(&with_header(0xA2, &[0, 1])).is_err(),
            "no filters"
        );
        assert!(
            decode_all(&with_header(0xA2, &[0, 1, 0, 5, b'a'])).is_err(),
            "short"
        );

        let mut publish = BytesMut::new();
        encode_publish(&mut publish, "a\0b", b"x", Qos::AtMostOnce, 0, false, false);
        assert!(decode(&mut publish, 1024).is_err());
    }

    #[test]
    fn passwords_are_binary() {
        let c = connect_with_fields(b"id", (b"w/t", b"x"), b"user", b"\xff\xfe\x00k");
        match decode_all(&c) {
            Ok(Some(Packet::Connect(c))) => {
                assert_eq!(&c.login.expect("login").password[..], b"\xff\xfe\x00k");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn u0000_in_binary_fields_is_data() {
        let c = connect_with_fields(b"id", (b"w/t", b"b\0ye"), b"user", b"p\0w");
        match decode_all(&c) {
            Ok(Some(Packet::Connect(c))) => {
                assert_eq!(&c.login.expect("login").password[..], b"p\0w");
                assert_eq!(&c.last_will.expect("will").message[..], b"b\0ye");
            }
            other => panic!("{other:?}"),
        }
        let mut publish = BytesMut::new();
        encode_publish(
            &mut publish,
            "a/b",
            b"\0\0",
            Qos::AtMostOnce,
            0,
            false,
            false,
        );
        match decode(&mut publish, 1024) {
            Ok(Some(Packet::Publish(p))) => assert_eq!(&p.payload[..], b"\0\0"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_and_unknown() {
        assert_eq!(
            decode(&mut BytesMut::from(&[0x30, 0xff, 0x7f][..]), 100).unwrap_err(),
            DecodeError::TooLarge(16383)
        );
        assert!(decode_all(&[0xF0, 0]).is_err());
        assert!(decode_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
    }
}
