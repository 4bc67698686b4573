//! Bad input: each malformed packet closes its own connection, is counted, and leaves every
//! other client working.
//!
//! The tests that check the count run a broker process of their own (`process::Broker`):
//! the count is exactly what this test sent.

mod common;

use common::process::Broker;
use common::*;

/// Connects a bystander pair, then a client that sends `bad` after a good CONNECT, on a
/// broker process of its own with `toml` as its config. Asserts that the bad client is
/// closed, that this one malformed packet is counted, and that the bystanders still complete
/// a QoS 1 round trip afterwards.
async fn closes_only_its_own_connection(bad: &[u8], toml: &str) {
    let broker = Broker::start(toml).await;
    let addr = broker.addr();
    let mut sub = Raw::connect(addr, "bystander-sub").await;
    sub.sub("by/t", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(addr, "bystander-pub").await;

    let mut evil = Raw::connect(addr, "evil").await;
    // Whether the broker has closed before the write ends is a race; the close is what counts.
    let _ = evil.send_raw(bad).await;
    evil.expect_closed(WAIT).await;
    broker
        .assert_metric("herald_malformed_packets_total", 1.0)
        .await;

    publisher
        .publish("by/t", b"still", QoS::AtLeastOnce, false)
        .await;
    let p = sub.expect_publish().await;
    assert_eq!(text(&p), "still");
    sub.puback(p.pkid).await;
    sub.ping().await;
}

#[tokio::test]
async fn remaining_length_with_five_continuation_bytes() {
    closes_only_its_own_connection(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], "").await;
}

#[tokio::test]
async fn unknown_packet_type_15() {
    closes_only_its_own_connection(&[0xF0, 0x00], "").await;
}

#[tokio::test]
async fn server_to_client_packet_type_from_a_client() {
    // CONNACK sent by a client.
    closes_only_its_own_connection(&[0x20, 0x02, 0x00, 0x00], "").await;
}

#[tokio::test]
async fn publish_with_qos_3() {
    closes_only_its_own_connection(&[0x36, 5, 0, 1, b'a', 0, 1], "").await;
}

#[tokio::test]
async fn publish_with_wildcard_in_topic() {
    closes_only_its_own_connection(&publish_bytes(b"a/+/c", b"x", 0, 0, false, false), "").await;
}

#[tokio::test]
async fn publish_with_hash_in_topic() {
    closes_only_its_own_connection(&publish_bytes(b"a/#", b"x", 1, 3, false, false), "").await;
}

#[tokio::test]
async fn publish_with_invalid_utf8_topic() {
    closes_only_its_own_connection(
        &publish_bytes(&[b'a', 0xC3, 0x28], b"x", 0, 0, false, false),
        "",
    )
    .await;
}

#[tokio::test]
async fn publish_with_empty_topic() {
    closes_only_its_own_connection(&publish_bytes(b"", b"x", 0, 0, false, false), "").await;
}

#[tokio::test]
async fn oversized_packet() {
    let big = publish_bytes(b"by/t", &[b'x'; 200], 1, 9, false, false);
    closes_only_its_own_connection(&big, "[server]\nmax_packet_size = 64\n").await;
}

#[tokio::test]
async fn subscribe_with_reserved_flags_clear() {
    let bad = subscribe_bytes(0x80, 1, &[("by/t", QoS::AtMostOnce)]);
    closes_only_its_own_connection(&bad, "").await;
}

#[tokio::test]
async fn subscribe_with_qos_3_option() {
    let mut bad = subscribe_bytes(0x82, 1, &[("by/t", QoS::AtMostOnce)]);
    *bad.last_mut().unwrap() = 3;
    closes_only_its_own_connection(&bad, "").await;
}

#[tokio::test]
async fn pingreq_with_reserved_flags_set() {
    closes_only_its_own_connection(&[0xC1, 0x00], "").await;
}

#[tokio::test]
async fn pubrel_with_wrong_flags() {
    closes_only_its_own_connection(&[0x60, 0x02, 0x00, 0x01], "").await;
}

#[tokio::test]
async fn connect_with_reserved_flag_set_is_closed_without_connack() {
    let mut connect = Opts::new("bad-flags").encode();
    // Connect flags: after fixed header (2), protocol name (6) and level (1).
    connect[9] |= 0x01;
    connect_is_closed_without_connack(&connect).await;
}

#[tokio::test]
async fn packet_at_max_packet_size_is_accepted() {
    let server = start_with(|c| c.server.max_packet_size = 64).await;
    let mut c = Raw::connect(server.local_addr(), "at-limit").await;
    c.sub("lim/t", QoS::AtMostOnce).await;
    // Remaining length: 2 + 5 (topic) + 2 (packet id) + 55 = 64.
    let exact = publish_bytes(b"lim/t", &[b'x'; 55], 1, 5, false, false);
    assert_eq!(exact[1], 64);
    c.send_raw(&exact).await.unwrap();
    let mut acked = false;
    let mut delivered = false;
    while !(acked && delivered) {
        match c.expect(WAIT).await {
            Packet::PubAck(a) if a.pkid == 5 => acked = true,
            Packet::Publish(p) if p.payload.len() == 55 => delivered = true,
            p => panic!("unexpected {p:?}"),
        }
    }
    server.shutdown().await;
}

// U+0000 is forbidden in every UTF-8 string of MQTT 3.1.1 (1.5.3): the connection is closed,
// as for any malformed packet. Binary fields (password, payloads) may hold it.

/// Sends `connect` as the first packet, on a broker process of its own: the broker must
/// close without a CONNACK and count it, once; another client stays connected.
async fn connect_is_closed_without_connack(connect: &[u8]) {
    let broker = Broker::start("").await;
    let mut ok = Raw::connect(broker.addr(), "fine").await;
    let mut c = Raw::open(broker.addr()).await;
    let _ = c.send_raw(connect).await;
    c.expect_closed(WAIT).await;
    broker
        .assert_metric("herald_malformed_packets_total", 1.0)
        .await;
    ok.ping().await;
}

#[tokio::test]
async fn u0000_in_client_id() {
    connect_is_closed_without_connack(&Opts::new("dev\0ice").encode()).await;
}

#[tokio::test]
async fn u0000_in_will_topic() {
    let opts = Opts::new("willer").will("wills/\0x", b"gone", QoS::AtMostOnce, false);
    connect_is_closed_without_connack(&opts.encode()).await;
}

#[tokio::test]
async fn u0000_in_user_name() {
    let connect = Opts::new("user0").encode_with(Some("us\0er"), Some(b"pw"));
    connect_is_closed_without_connack(&connect).await;
}

#[tokio::test]
async fn u0000_in_subscribe_filter() {
    // Not SUBACK 0x80 for that filter (what an invalid but clean filter gets): a close.
    let bad = subscribe_bytes(
        0x82,
        1,
        &[("by/t", QoS::AtMostOnce), ("by/\0t", QoS::AtMostOnce)],
    );
    closes_only_its_own_connection(&bad, "").await;
}

#[tokio::test]
async fn u0000_in_unsubscribe_filter() {
    // `expect_closed` fails on any packet, so no UNSUBACK may arrive before the close.
    let mut body = vec![0, 7];
    for f in [&b"by/t"[..], b"by/\0t"] {
        body.extend((f.len() as u16).to_be_bytes());
        body.extend(f);
    }
    closes_only_its_own_connection(&frame(0xA2, &body), "").await;
}

#[tokio::test]
async fn u0000_in_publish_topic() {
    closes_only_its_own_connection(&publish_bytes(b"by/\0t", b"x", 1, 4, false, false), "").await;
}

#[tokio::test]
async fn invalid_filters_without_u0000_still_get_0x80_and_the_connection_stays() {
    let server = start().await;
    let mut c = Raw::connect(server.local_addr(), "bad-filters").await;
    let codes = c
        .subscribe(&[
            ("a#", QoS::AtMostOnce),
            ("a/#/b", QoS::AtMostOnce),
            ("ok/t", QoS::AtMostOnce),
        ])
        .await;
    use SubscribeReasonCode::{Failure, Success};
    assert_eq!(codes, [Failure, Failure, Success(QoS::AtMostOnce)]);
    c.unsubscribe(&["a#", "ok/t"]).await;
    c.ping().await;
    server.shutdown().await;
}

#[tokio::test]
async fn u0000_in_a_password_is_data() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("nul", "p\0w")]);
    let server = start_with(|c| c.auth.password_file = Some(passwd.clone())).await;
    let login = |pass: &'static [u8]| {
        let addr = server.local_addr();
        async move {
            let mut c = Raw::open(addr).await;
            c.send_raw(&Opts::new("nul").encode_with(Some("nul"), Some(pass)))
                .await
                .unwrap();
            match c.expect(WAIT).await {
                Packet::ConnAck(a) => (c, a.code),
                p => panic!("expected CONNACK, got {p:?}"),
            }
        }
    };
    let (_, code) = login(b"p").await;
    assert_eq!(
        code,
        ConnectReturnCode::BadUserNamePassword,
        "the bytes after U+0000 count"
    );
    let (mut c, code) = login(b"p\0w").await;
    assert_eq!(code, ConnectReturnCode::Success);
    c.ping().await;
    server.shutdown().await;
}

#[tokio::test]
async fn u0000_in_a_payload_is_data() {
    let server = start().await;
    let mut sub = Raw::connect(server.local_addr(), "nul-sub").await;
    sub.sub("nul/t", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(server.local_addr(), "nul-pub").await;
    publisher
        .publish("nul/t", b"a\0b\0", QoS::AtLeastOnce, false)
        .await;
    let p = sub.expect_publish().await;
    assert_eq!(&p.payload[..], b"a\0b\0");
    sub.puback(p.pkid).await;
    // A will payload is binary too.
    let will = Opts::new("nul-will").will("nul/t", b"\0", QoS::AtMostOnce, false);
    let (w, _) = Raw::connect_ok(server.local_addr(), &will).await;
    drop(w);
    let p = sub.expect_publish().await;
    assert_eq!(&p.payload[..], b"\0");
    server.shutdown().await;
}
