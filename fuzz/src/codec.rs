//! Helpers shared by the codec targets: a comparable form of `herald::codec::Packet` (which
//! has no `PartialEq`) and an encoder for every packet the broker decodes.

use bytes::{BufMut, BytesMut};
use herald::codec::{self, Packet, Qos};

/// Everything `herald::codec::decode` reports about a packet, in a form that can be compared.
/// The CONNECT protocol name is not kept: Herald decodes "MQIsdp" 3 to the same struct as
/// "MQTT" 4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Norm {
    Connect {
        keep_alive: u16,
        client_id: String,
        clean: bool,
        will: Option<(String, Vec<u8>, u8, bool)>,
        login: Option<(String, Vec<u8>)>,
    },
    Publish {
        dup: bool,
        qos: u8,
        retain: bool,
        topic: String,
        pkid: u16,
        payload: Vec<u8>,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(Result<String, String>, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        topics: Vec<String>,
    },
    PingReq,
    Disconnect,
}

pub fn norm(p: &Packet) -> Norm {
    match p {
        Packet::Connect(c) => Norm::Connect {
            keep_alive: c.keep_alive,
            client_id: c.client_id.clone(),
            clean: c.clean_session,
            will: c
                .last_will
                .as_ref()
                .map(|w| (w.topic.clone(), w.message.to_vec(), w.qos as u8, w.retain)),
            login: c
                .login
                .as_ref()
                .map(|l| (l.username.clone(), l.password.to_vec())),
        },
        Packet::Publish(p) => Norm::Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: p.topic.clone(),
            pkid: p.pkid,
            payload: p.payload.to_vec(),
        },
        Packet::PubAck(id) => Norm::PubAck(*id),
        Packet::PubRec(id) => Norm::PubRec(*id),
        Packet::PubRel(id) => Norm::PubRel(*id),
        Packet::PubComp(id) => Norm::PubComp(*id),
        Packet::Subscribe(s) => Norm::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .iter()
                .map(|(f, q)| (f.clone(), *q as u8))
                .collect(),
        },
        Packet::Unsubscribe(u) => Norm::Unsubscribe {
            pkid: u.pkid,
            topics: u.topics.clone(),
        },
        Packet::PingReq => Norm::PingReq,
        Packet::Disconnect => Norm::Disconnect,
    }
}

/// Any byte as a valid QoS (3 and above as 2): the fuzzer's input picks one.
pub fn qos(n: u8) -> Qos {
    Qos::try_from(n.min(2)).unwrap_or(Qos::ExactlyOnce)
}

/// Encodes `p` the way a client would send it: with Herald's own encoders where it has one
/// (PUBLISH, the acks, PINGREQ, a plain CONNECT), by hand otherwise. `None` when a field is
/// too long to be encoded at all.
pub fn encode(p: &Norm, buf: &mut BytesMut) -> Option<()> {
    match p {
        Norm::Connect {
            keep_alive,
            client_id,
            clean,
            will,
            login,
        } => {
            let too_long = |s: &[u8]| s.len() > usize::from(u16::MAX);
            if login
                .as_ref()
                .is_some_and(|(u, p)| too_long(u.as_bytes()) || too_long(p))
            {
                return None;
            }
            if *clean && will.is_none() {
                let login = login.as_ref().map(|(u, p)| (u.as_str(), p.as_slice()));
                codec::encode_connect(buf, client_id, *keep_alive, login);
                return Some(());
            }
            let mut flags = (*clean as u8) << 1;
            let mut body = BytesMut::new();
            body.put_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0]);
            body.put_u16(*keep_alive);
            put_field(&mut body, client_id.as_bytes())?;
            if let Some((topic, message, q, retain)) = will {
                flags |= 0x04 | q << 3 | (*retain as u8) << 5;
                put_field(&mut body, topic.as_bytes())?;
                put_field(&mut body, message)?;
            }
            if let Some((user, pass)) = login {
                // Herald decodes a missing password as "": sending an empty one is the same.
                flags |= 0x80 | 0x40;
                put_field(&mut body, user.as_bytes())?;
                put_field(&mut body, pass)?;
            }
            body[7] = flags;
            frame(buf, 0x10, &body)
        }
        Norm::Publish {
            dup,
            qos: q,
            retain,
            topic,
            pkid,
            payload,
        } => {
            if topic.len() > usize::from(u16::MAX) {
                return None;
            }
            codec::encode_publish(buf, topic, payload, qos(*q), *pkid, *retain, *dup);
            Some(())
        }
        Norm::PubAck(id) => {
            codec::encode_puback(buf, *id);
            Some(())
        }
        Norm::PubRec(id) => {
            codec::encode_pubrec(buf, *id);
            Some(())
        }
        Norm::PubRel(id) => {
            codec::encode_pubrel(buf, *id);
            Some(())
        }
        Norm::PubComp(id) => {
            codec::encode_pubcomp(buf, *id);
            Some(())
        }
        Norm::Subscribe { pkid, filters } => {
            let mut body = BytesMut::new();
            body.put_u16(*pkid);
            for (f, q) in filters {
                let f = f.as_ref().unwrap_or_else(|e| e);
                put_field(&mut body, f.as_bytes())?;
                body.put_u8(*q);
            }
            frame(buf, 0x82, &body)
        }
        Norm::Unsubscribe { pkid, topics } => {
            let mut body = BytesMut::new();
            body.put_u16(*pkid);
            for t in topics {
                put_field(&mut body, t.as_bytes())?;
            }
            frame(buf, 0xA2, &body)
        }
        Norm::PingReq => {
            codec::encode_pingreq(buf);
            Some(())
        }
        Norm::Disconnect => {
            buf.put_slice(&[0xE0, 0]);
            Some(())
        }
    }
}

/// A length-prefixed MQTT string or binary field.
pub fn put_field(buf: &mut BytesMut, field: &[u8]) -> Option<()> {
    buf.put_u16(u16::try_from(field.len()).ok()?);
    buf.put_slice(field);
    Some(())
}

/// Fixed header (minimal remaining-length encoding) and body.
pub fn frame(buf: &mut BytesMut, byte1: u8, body: &[u8]) -> Option<()> {
    let mut len = body.len();
    if len > 268_435_455 {
        return None;
    }
    buf.put_u8(byte1);
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        buf.put_u8(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    buf.put_slice(body);
    Some(())
}

/// Decodes exactly one packet from `bytes`, which must be consumed completely.
pub fn decode_one(bytes: &[u8]) -> Result<Option<Norm>, codec::DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let p = codec::decode(&mut buf, usize::MAX)?;
    if p.is_some() {
        assert!(
            buf.is_empty(),
            "decode left {} bytes of one packet",
            buf.len()
        );
    }
    Ok(p.as_ref().map(norm))
}

/// decode(encode(p)) == p.
pub fn check_roundtrip(p: &Norm) {
    let mut buf = BytesMut::new();
    if encode(p, &mut buf).is_none() {
        return;
    }
    match decode_one(&buf) {
        Ok(Some(q)) => assert_eq!(&q, p, "round trip changed the packet: {buf:02x?}"),
        other => panic!("re-encoded {p:?} as {buf:02x?}, which decodes to {other:?}"),
    }
}
