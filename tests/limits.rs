//! Limits: a slow reader cannot make the broker grow or stall, and max_connections.
//!
//! The tests that need a counter (drops for a stalled reader, refused connections) run a
//! broker process of their own (`process::Broker`), so that every count is theirs.

mod common;

use std::time::Duration;

use tokio::net::TcpSocket;

use common::process::Broker;
use common::*;

const MAILBOX_FULL: &str = r#"herald_messages_dropped_total{reason="mailbox_full"}"#;

/// Buffers small enough that a reader who stops reading overflows them in a few messages.
const SMALL_BUFFERS: &str = "[server]\nmax_write_buffer = 16384\n[session]\nmax_mailbox = 100\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_drops_qos0_keeps_qos1_and_others_keep_working() {
    let broker = Broker::start(SMALL_BUFFERS).await;
    let addr = broker.addr();

    // Returns once QoS 0 messages for it have been dropped, and counted.
    let mut slow = stalled_reader(
        &broker,
        Opts::new("slow"),
        &[("slow/q0", QoS::AtMostOnce), ("slow/q1", QoS::AtLeastOnce)],
    )
    .await;
    let mut bystander = Raw::connect(addr, "fast").await;
    bystander.sub("fast/t", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(addr, "publisher").await;

    // QoS 1 for the stalled reader is stored, not dropped: these are the first messages this
    // broker stores (the flood was QoS 0, its sync messages had no subscriber).
    for i in 0..10 {
        publisher
            .publish(
                "slow/q1",
                format!("k{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    broker
        .assert_metric("herald_messages_stored_total", 10.0)
        .await;

    // Everyone else is served as usual meanwhile.
    publisher
        .publish("fast/t", b"ok", QoS::AtLeastOnce, false)
        .await;
    let p = bystander.expect_publish().await;
    assert_eq!(text(&p), "ok");
    bystander.puback(p.pkid).await;
    bystander.ping().await;

    // Once it reads again, the slow reader gets every QoS 1 message, in order.
    let mut next = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while next < 10 {
        let p = match slow
            .next(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            Event::Packet(Packet::Publish(p)) => p,
            e => panic!("slow reader draining: {e:?}"),
        };
        if p.qos == QoS::AtLeastOnce {
            assert_eq!(text(&p), format!("k{next}"));
            slow.puback(p.pkid).await;
            next += 1;
        }
    }
}

/// A broker process of its own: the refusal is counted, once.
#[tokio::test]
async fn connection_over_max_connections_is_closed_without_connack() {
    let broker = Broker::start("[server]\nmax_connections = 2\n").await;
    let addr = broker.addr();
    let mut a = Raw::connect(addr, "mc-a").await;
    let b = Raw::connect(addr, "mc-b").await;

    let mut third = Raw::open(addr).await;
    let _ = third.send_raw(&Opts::new("mc-c").encode()).await;
    third.expect_closed(WAIT).await;
    broker
        .assert_metric(
            r#"herald_connections_rejected_total{reason="max_connections"}"#,
            1.0,
        )
        .await;

    // A freed slot can be used again.
    b.disconnect().await;
    let mut slot_free = false;
    for _ in 0..100 {
        let mut c = Raw::open(addr).await;
        let _ = c.send_raw(&Opts::new("mc-c").encode()).await;
        if let Event::Packet(Packet::ConnAck(ack)) = c.next(WAIT).await {
            assert_eq!(ack.code, ConnectReturnCode::Success);
            slot_free = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(slot_free, "a closed connection frees its slot");
    a.ping().await;
}

/// Connects a client with a tiny receive window that then reads nothing, subscribes it to
/// `subs` and floods the first of them with QoS 0: 1 KB messages until the broker drops some
/// for it (the broker is the test's own, so its drops are this reader's), then 10 MB more in
/// 64 KB messages, so that whatever the kernel buffers hold, its connection task ends up with
/// a full write buffer and a socket that does not drain.
async fn stalled_reader(broker: &Broker, opts: Opts, subs: &[(&str, QoS)]) -> Raw {
    let addr = broker.addr();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = Raw::from_stream(socket.connect(addr).await.unwrap()).await;
    slow.send_raw(&opts.encode()).await.unwrap();
    assert!(matches!(slow.expect(WAIT).await, Packet::ConnAck(_)));
    for (filter, qos) in subs {
        slow.sub(filter, *qos).await;
    }
    let topic = subs[0].0;

    let mut flooder = Raw::connect(addr, &format!("{}-flooder", opts.id)).await;
    let payload = vec![b'x'; 1024];
    let mut sent = 0;
    while broker.metric(MAILBOX_FULL).await == 0.0 {
        assert!(
            sent < 64 * 1024,
            "no QoS 0 drop after {sent} KB to a stalled reader"
        );
        for _ in 0..256 {
            flooder
                .publish(topic, &payload, QoS::AtMostOnce, false)
                .await;
        }
        sent += 256;
        // Its PUBACK comes after everything published before it has been routed.
        flooder.publish("sync", b"", QoS::AtLeastOnce, false).await;
    }
    // The first drops may only mean the connection task fell behind a burst.
    let big = vec![b'y'; 64 * 1024];
    for _ in 0..160 {
        flooder.publish(topic, &big, QoS::AtMostOnce, false).await;
    }
    flooder.publish("sync", b"", QoS::AtLeastOnce, false).await;
    slow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_closes_a_connection_stuck_on_a_full_socket() {
    let broker = Broker::start(SMALL_BUFFERS).await;
    let addr = broker.addr();
    // Keepalive 0: nothing but the takeover can end the old connection.
    let opts = Opts::new("stuck").keepalive(0).clean(false);
    let mut old = stalled_reader(&broker, opts, &[("stuck/t", QoS::AtMostOnce)]).await;

    let started = tokio::time::Instant::now();
    let (_new, present) = Raw::connect_ok(addr, &Opts::new("stuck").clean(false)).await;
    assert!(present);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(1),
        "CONNACK for the new connection took {waited:?}"
    );
    // The old socket drains to EOF: the broker closed it.
    assert!(
        old.closed_within(WAIT).await.is_some(),
        "old connection still open after takeover"
    );
    broker
        .assert_metric("herald_session_takeovers_total", 1.0)
        .await;
}

#[tokio::test]
async fn subscriptions_per_client_are_bounded() {
    let server = start_with(|c| c.session.max_subscriptions = 3).await;
    let mut c = Raw::connect(server.local_addr(), "many-subs").await;
    let codes = c
        .subscribe(&[
            ("m/1", QoS::AtMostOnce),
            ("m/2", QoS::AtMostOnce),
            ("m/3", QoS::AtMostOnce),
            ("m/4", QoS::AtMostOnce),
        ])
        .await;
    assert_eq!(codes[3], SubscribeReasonCode::Failure, "{codes:?}");
    assert!(codes[..3]
        .iter()
        .all(|c| *c == SubscribeReasonCode::Success(QoS::AtMostOnce)));
    // A filter it holds may be subscribed again (a new QoS), and its own push topic is free.
    let codes = c
        .subscribe(&[
            ("m/1", QoS::AtLeastOnce),
            ("push/many-subs", QoS::AtLeastOnce),
        ])
        .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
    // Room again after an unsubscribe.
    c.unsubscribe(&["m/2"]).await;
    let codes = c.subscribe(&[("m/4", QoS::AtMostOnce)]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtMostOnce)]);
    server.shutdown().await;
}
