//! PUBLISH at QoS 0, 1 and 2 in both directions, QoS downgrade, the in-flight window, and a
//! real client (rumqttc) round trip.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn qos1_publish_gets_puback_with_its_packet_id() {
    let server = start().await;
    let mut c = Raw::connect(server.local_addr(), "q1").await;
    c.send_raw(&publish_bytes(b"q1/t", b"x", 1, 4242, false, false))
        .await
        .unwrap();
    match c.expect(WAIT).await {
        Packet::PubAck(a) => assert_eq!(a.pkid, 4242),
        p => panic!("expected PUBACK, got {p:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn qos0_publish_is_delivered_without_ack() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "q0-sub").await;
    sub.sub("q0/t", QoS::ExactlyOnce).await;
    let mut publisher = Raw::connect(addr, "q0-pub").await;
    publisher
        .publish("q0/t", b"zero", QoS::AtMostOnce, false)
        .await;
    let p = sub.expect_publish().await;
    assert_eq!(
        (p.qos, p.dup, text(&p).as_str()),
        (QoS::AtMostOnce, false, "zero")
    );
    // Nothing else comes for it, the publisher included (no ack for QoS 0).
    publisher.sub("q0/m", QoS::AtMostOnce).await;
    let mut other = Raw::connect(addr, "q0-other").await;
    publisher
        .expect_nothing_before_marker(&mut other, "q0/m")
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn qos2_inbound_flow_delivers_a_duplicate_publish_only_once() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "q2-sub").await;
    sub.sub("q2/t", QoS::AtMostOnce).await;
    let mut publisher = Raw::connect(addr, "q2-pub").await;

    publisher
        .send_raw(&publish_bytes(b"q2/t", b"once", 2, 77, false, false))
        .await
        .unwrap();
    match publisher.expect(WAIT).await {
        Packet::PubRec(r) => assert_eq!(r.pkid, 77),
        p => panic!("expected PUBREC, got {p:?}"),
    }
    // The publisher did not see the PUBREC (as far as it knows) and resends.
    publisher
        .send_raw(&publish_bytes(b"q2/t", b"once", 2, 77, false, true))
        .await
        .unwrap();
    match publisher.expect(WAIT).await {
        Packet::PubRec(r) => assert_eq!(r.pkid, 77),
        p => panic!("expected PUBREC again, got {p:?}"),
    }
    publisher.pubrel(77).await;
    match publisher.expect(WAIT).await {
        Packet::PubComp(c) => assert_eq!(c.pkid, 77),
        p => panic!("expected PUBCOMP, got {p:?}"),
    }

    let got = sub.until_marker(&mut publisher, "q2/t").await;
    let texts: Vec<String> = got.iter().map(text).collect();
    assert_eq!(texts, ["once"], "exactly once into the broker");

    // After PUBREL the id is free again: a new message with it is a new message.
    publisher
        .send_raw(&publish_bytes(b"q2/t", b"again", 2, 77, false, false))
        .await
        .unwrap();
    assert!(matches!(publisher.expect(WAIT).await, Packet::PubRec(r) if r.pkid == 77));
    publisher.pubrel(77).await;
    assert!(matches!(publisher.expect(WAIT).await, Packet::PubComp(c) if c.pkid == 77));
    let got = sub.until_marker(&mut publisher, "q2/t").await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), ["again"]);
    server.shutdown().await;
}

#[tokio::test]
async fn outbound_qos_is_the_lower_of_message_and_subscription() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "min-sub").await;
    let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    for (s, q) in qos.iter().enumerate() {
        sub.sub(&format!("min/{s}"), *q).await;
    }
    let mut publisher = Raw::connect(addr, "min-pub").await;
    for (p, pub_qos) in qos.iter().enumerate() {
        for s in 0..3 {
            publisher
                .publish(
                    &format!("min/{s}"),
                    format!("{p}{s}").as_bytes(),
                    *pub_qos,
                    false,
                )
                .await;
        }
    }
    let mut seen = Vec::new();
    for _ in 0..9 {
        let m = sub.expect_publish().await;
        let t = text(&m);
        let (p, s) = (t.as_bytes()[0] - b'0', t.as_bytes()[1] - b'0');
        assert_eq!(m.qos as u8, p.min(s), "published at {p}, subscribed at {s}");
        match m.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => sub.puback(m.pkid).await,
            QoS::ExactlyOnce => sub.pubrec(m.pkid).await,
        }
        seen.push(t);
    }
    seen.sort();
    assert_eq!(seen, ["00", "01", "02", "10", "11", "12", "20", "21", "22"]);
    server.shutdown().await;
}

#[tokio::test]
async fn qos2_outbound_flow_pubrec_pubrel_pubcomp() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "q2o-sub").await;
    sub.sub("q2o/t", QoS::ExactlyOnce).await;
    let mut publisher = Raw::connect(addr, "q2o-pub").await;
    publisher
        .publish("q2o/t", b"exactly", QoS::ExactlyOnce, false)
        .await;

    let p = sub.expect_publish().await;
    assert_eq!((p.qos, text(&p).as_str()), (QoS::ExactlyOnce, "exactly"));
    assert_ne!(p.pkid, 0);
    sub.pubrec(p.pkid).await;
    match sub.expect(WAIT).await {
        Packet::PubRel(r) => assert_eq!(r.pkid, p.pkid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    // Checked before PUBCOMP is sent, so it is PUBREC that released the entry. Waited for:
    // the Redis store writes acks in the background (see src/outbox/redis.rs).
    wait_until(WAIT, "PUBREC releases the outbox entry", async || {
        outbox_len(&server, "q2o-sub").await == 0
    })
    .await;
    sub.pubcomp(p.pkid).await;

    // The flow is finished: nothing is resent, and the connection is in a state to go on.
    publisher
        .publish("q2o/t", b"next", QoS::ExactlyOnce, false)
        .await;
    let n = sub.expect_publish().await;
    assert_eq!((text(&n).as_str(), n.dup), ("next", false));
    server.shutdown().await;
}

#[tokio::test]
async fn inflight_window_holds_the_rest_in_order() {
    let server = start_with(|c| c.session.max_inflight = 2).await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "win-sub").await;
    sub.sub("win/t", QoS::AtLeastOnce).await;
    sub.sub("win/marker", QoS::AtMostOnce).await;
    let mut publisher = Raw::connect(addr, "win-pub").await;
    for i in 1..=5 {
        publisher
            .publish("win/t", format!("w{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }

    let first = sub.until_marker(&mut publisher, "win/marker").await;
    assert_eq!(
        first.iter().map(text).collect::<Vec<_>>(),
        ["w1", "w2"],
        "only max_inflight unacked messages on the wire"
    );
    // Each PUBACK frees one slot, which the next message in order takes, and only that one.
    let mut unacked: std::collections::VecDeque<Publish> = first.into();
    for i in 3..=5 {
        let oldest = unacked.pop_front().unwrap();
        sub.puback(oldest.pkid).await;
        let released = sub.until_marker(&mut publisher, "win/marker").await;
        assert_eq!(
            released.iter().map(text).collect::<Vec<_>>(),
            [format!("w{i}")]
        );
        unacked.extend(released);
    }
    for p in unacked {
        sub.puback(p.pkid).await;
    }
    wait_until(WAIT, "outbox drained", async || {
        outbox_len(&server, "win-sub").await == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn rumqttc_qos1_round_trip() {
    use rumqttc::{AsyncClient, Event, Incoming};

    let server = start().await;
    let addr = server.local_addr();
    let mut opts = common::mqtt_options("rumq-1", addr);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .subscribe("rumq/t", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish("rumq/t", rumqttc::QoS::AtLeastOnce, false, "hello")
        .await
        .unwrap();

    let (mut suback, mut puback, mut received) = (false, false, None);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(suback && puback && received.is_some()) {
        let ev = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("rumqttc events in time")
            .expect("rumqttc connection");
        match ev {
            Event::Incoming(Incoming::ConnAck(a)) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success)
            }
            Event::Incoming(Incoming::SubAck(a)) => {
                assert_eq!(
                    a.return_codes,
                    [rumqttc::SubscribeReasonCode::Success(
                        rumqttc::QoS::AtLeastOnce
                    )]
                );
                suback = true;
            }
            Event::Incoming(Incoming::PubAck(_)) => puback = true,
            Event::Incoming(Incoming::Publish(p)) => received = Some(p),
            _ => {}
        }
    }
    let p = received.unwrap();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("rumq/t", &b"hello"[..])
    );
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    // rumqttc acks on its own; the broker then forgets the message.
    wait_until(WAIT, "rumqttc ack reached the outbox", async || {
        let _ = tokio::time::timeout(Duration::from_millis(5), eventloop.poll()).await;
        outbox_len(&server, "rumq-1").await == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn packets_split_into_single_bytes_are_reassembled() {
    let server = start().await;
    let mut c = Raw::open(server.local_addr()).await;
    let mut bytes = Opts::new("bytewise").encode();
    bytes.extend(subscribe_bytes(0x82, 1, &[("bw/t", QoS::AtLeastOnce)]));
    bytes.extend(publish_bytes(b"bw/t", b"slowly", 1, 2, false, false));
    for b in bytes {
        c.send_raw(&[b]).await.unwrap();
    }
    assert!(
        matches!(c.expect(WAIT).await, Packet::ConnAck(a) if a.code == ConnectReturnCode::Success)
    );
    assert!(matches!(c.expect(WAIT).await, Packet::SubAck(a) if a.pkid == 1));
    let mut got_puback = false;
    let mut got_publish = false;
    while !(got_puback && got_publish) {
        match c.expect(WAIT).await {
            Packet::PubAck(a) if a.pkid == 2 => got_puback = true,
            Packet::Publish(p) if text(&p) == "slowly" => got_publish = true,
            p => panic!("unexpected {p:?}"),
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn packets_sent_together_with_connect_are_all_handled() {
    let server = start().await;
    let mut c = Raw::open(server.local_addr()).await;
    let mut bytes = Opts::new("burst").encode();
    bytes.extend(subscribe_bytes(0x82, 1, &[("burst/t", QoS::AtMostOnce)]));
    bytes.extend(publish_bytes(b"burst/t", b"a", 0, 0, false, false));
    bytes.extend([0xC0, 0]);
    c.send_raw(&bytes).await.unwrap();
    assert!(matches!(c.expect(WAIT).await, Packet::ConnAck(_)));
    assert!(matches!(c.expect(WAIT).await, Packet::SubAck(_)));
    let mut rest = vec![c.expect(WAIT).await, c.expect(WAIT).await];
    rest.sort_by_key(|p| matches!(p, Packet::PingResp));
    assert!(
        matches!(&rest[0], Packet::Publish(p) if text(p) == "a"),
        "{rest:?}"
    );
    assert!(matches!(rest[1], Packet::PingResp));
    server.shutdown().await;
}

#[tokio::test]
async fn large_payload_round_trip() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "big-sub").await;
    sub.sub("big/t", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(addr, "big-pub").await;
    // 3-byte remaining length.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    publisher
        .publish("big/t", &payload, QoS::AtLeastOnce, false)
        .await;
    let p = sub.expect_publish().await;
    assert_eq!(p.payload.len(), payload.len());
    assert!(p.payload[..] == payload[..]);
    server.shutdown().await;
}
