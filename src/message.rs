//! The types every part of Herald shares: a message, its QoS, the client id, packet ids, the
//! clock messages expire by, and the envelope: the one binary form in which a message is
//! stored (Redis outbox and retained messages) and forwarded (node-to-node link).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};

/// A client id, shared by every table that names the client.
pub type ClientId = Arc<str>;

/// MQTT quality of service. Ordered, so that the QoS a subscriber gets is
/// `msg.qos.min(granted)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

/// A QoS byte that is not 0, 1 or 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidQos(pub u8);

impl TryFrom<u8> for Qos {
    type Error = InvalidQos;

    fn try_from(n: u8) -> Result<Qos, InvalidQos> {
        match n {
            0 => Ok(Qos::AtMostOnce),
            1 => Ok(Qos::AtLeastOnce),
            2 => Ok(Qos::ExactlyOnce),
            _ => Err(InvalidQos(n)),
        }
    }
}

/// A message inside Herald. Shared (`Arc`) between all receivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    /// Unix milliseconds after which the message is dropped undelivered; 0 = never.
    pub expires_at: u64,
    /// Unix microseconds when Herald took the message (just before storing it): where the
    /// delivery latency is measured from, also after a restart or on another node. 0 =
    /// unknown (a version 1 envelope).
    pub born_us: u64,
    /// It reached this node over the node-to-node link (hop 2): the latency's `path`.
    /// Not stored.
    pub forwarded: bool,
    /// The backend asked for a delivery receipt (HTTP `receipt=true`): the session reports
    /// when it writes and when the device acknowledges it (`receipts`).
    pub receipt: bool,
}

/// Unix time in milliseconds: what `Message::expires_at` is measured in. Wall-clock time,
/// because an expiry stored in Redis is read by other nodes and after restarts.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix time in microseconds: `Message::born_us`. Wall-clock, like `now_ms`, so that a
/// message stored on one node is timed on another.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The wall clock in µs, read at most once for a batch of packets (a read of the clock
/// costs about 50 ns, a PUBLISH or a PUBACK handled from a full read buffer less than a
/// microsecond): the first that needs it reads it, the rest of the batch shares it.
#[derive(Debug, Default)]
pub struct Now(Option<u64>);

impl Now {
    pub fn us(&mut self) -> u64 {
        *self.0.get_or_insert_with(now_us)
    }
}

/// MQTT packet id for an outbox sequence number: never 0, and the same on every node.
pub fn packet_id(seq: u64) -> u16 {
    (seq % 65535) as u16 + 1
}

/// Envelope layout version (the first byte), so that a layout can be told apart. Version 1
/// had no `born_us`; it is still read. Version 3 adds a flags byte (bit 0: `receipt`) after
/// `born_us`, and is written only for a message that has a flag, so that a node of the
/// version before reads every message it could before.
const ENVELOPE_V1: u8 = 1;
const ENVELOPE_V2: u8 = 2;
const ENVELOPE_V3: u8 = 3;
const FLAG_RECEIPT: u8 = 1;
/// Version, QoS, retain, expiry, topic length (version 1).
const ENVELOPE_V1_HEAD: usize = 1 + 1 + 1 + 8 + 2;
/// Version 2 adds `born_us` after the expiry.
const ENVELOPE_HEAD: usize = ENVELOPE_V1_HEAD + 8;

impl Message {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at != 0 && self.expires_at <= now_ms
    }

    /// What the byte budgets count for a message: its topic and payload (the fixed costs of
    /// a queued message are bounded by the message counts next to each byte budget).
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }

    /// Bytes `put_envelope` writes.
    pub fn envelope_len(&self) -> usize {
        ENVELOPE_HEAD + usize::from(self.receipt) + self.topic.len() + self.payload.len()
    }

    /// Writes the envelope, with `qos` (the QoS it is delivered at, which may be lower than
    /// the publisher's): version u8 (2), qos u8, retain u8, expires_at u64, born_us u64,
    /// topic (u16 length + bytes), payload (the rest), big-endian. Topics are at most
    /// 65,535 bytes (MQTT). A message with a receipt: version 3, flags u8 after `born_us`.
    pub fn put_envelope(&self, b: &mut impl BufMut, qos: Qos) {
        b.put_u8(if self.receipt {
            ENVELOPE_V3
        } else {
            ENVELOPE_V2
        });
        b.put_u8(qos as u8);
        b.put_u8(self.retain as u8);
        b.put_u64(self.expires_at);
        b.put_u64(self.born_us);
        if self.receipt {
            b.put_u8(FLAG_RECEIPT);
        }
        b.put_u16(self.topic.len() as u16);
        b.put_slice(self.topic.as_bytes());
        b.put_slice(&self.payload);
    }

    /// The envelope as a vector (retained messages).
    pub fn envelope(&self, qos: Qos) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.envelope_len());
        self.put_envelope(&mut b, qos);
        b
    }

    /// Reads an envelope; the payload shares `raw`'s memory. `None` if it is not one
    /// (another version, a bad QoS, a topic that is not UTF-8, too short).
    pub fn from_envelope(mut raw: Bytes) -> Option<Message> {
        let version = *raw.first()?;
        let head = match version {
            ENVELOPE_V1 => ENVELOPE_V1_HEAD,
            ENVELOPE_V2 => ENVELOPE_HEAD,
            ENVELOPE_V3 => ENVELOPE_HEAD + 1,
            _ => return None,
        };
        if raw.len() < head {
            return None;
        }
        raw.advance(1);
        let qos = Qos::try_from(raw.get_u8()).ok()?;
        let retain = raw.get_u8() != 0;
        let expires_at = raw.get_u64();
        let born_us = if version >= ENVELOPE_V2 {
            raw.get_u64()
        } else {
            0
        };
        let flags = if version >= ENVELOPE_V3 {
            raw.get_u8()
        } else {
            0
        };
        let tlen = usize::from(raw.get_u16());
        if raw.len() < tlen {
            return None;
        }
        let topic = std::str::from_utf8(&raw[..tlen])
            .ok()
            .map(Arc::<str>::from)?;
        raw.advance(tlen);
        Some(Message {
            topic,
            payload: raw,
            qos,
            retain,
            expires_at,
            born_us,
            forwarded: false,
            receipt: flags & FLAG_RECEIPT != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_never_zero() {
        assert_eq!(packet_id(0), 1);
        assert_eq!(packet_id(65534), 65535);
        assert_eq!(packet_id(65535), 1);
    }

    #[test]
    fn qos_bytes_and_order() {
        assert_eq!(Qos::try_from(1), Ok(Qos::AtLeastOnce));
        assert_eq!(Qos::try_from(3), Err(InvalidQos(3)));
        assert_eq!(Qos::ExactlyOnce.min(Qos::AtLeastOnce), Qos::AtLeastOnce);
        assert!(Qos::AtMostOnce < Qos::ExactlyOnce);
    }

    #[test]
    fn envelope_roundtrip() {
        let m = Message {
            topic: "push/d|1".into(),
            payload: Bytes::from_static(b"a|b\0c"),
            qos: Qos::ExactlyOnce,
            retain: true,
            expires_at: 12345,
            born_us: 1_700_000_000_000_000,
            forwarded: false,
            receipt: false,
        };
        let raw = m.envelope(m.qos);
        assert_eq!(raw.len(), m.envelope_len());
        assert_eq!(Message::from_envelope(Bytes::from(raw)), Some(m.clone()));
        let tracked = Message {
            receipt: true,
            ..m.clone()
        };
        let raw = tracked.envelope(m.qos);
        assert_eq!((raw[0], raw.len()), (3, tracked.envelope_len()));
        assert_eq!(Message::from_envelope(Bytes::from(raw)), Some(tracked));
        let lower = Message::from_envelope(Bytes::from(m.envelope(Qos::AtLeastOnce))).unwrap();
        assert_eq!(lower.qos, Qos::AtLeastOnce);
        assert!(Message::from_envelope(Bytes::from_static(b"\x02garbage-----")).is_none());
        let long_topic = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        assert!(Message::from_envelope(Bytes::copy_from_slice(&long_topic)).is_none());
        let bad_qos = [1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(Message::from_envelope(Bytes::copy_from_slice(&bad_qos)).is_none());
        // A version 1 envelope (before born_us) still reads, with the time unknown.
        let v1 = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, b't', b'p'];
        let old = Message::from_envelope(Bytes::copy_from_slice(&v1)).unwrap();
        assert_eq!(
            (&*old.topic, &old.payload[..], old.born_us),
            ("t", &b"p"[..], 0)
        );
    }
}
