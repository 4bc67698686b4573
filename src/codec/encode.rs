//! Broker-to-client packets, written straight into the connection's write buffer.

use bytes::{BufMut, BytesMut};

use super::Qos;

pub(super) fn put_remaining_len(buf: &mut BytesMut, mut len: usize) {
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
