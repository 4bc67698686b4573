use bytes::{BufMut, BytesMut};

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
