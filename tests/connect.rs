//! CONNECT handling, client ids, connect timeout and keepalive. The tests that check a
//! counter run a broker process of their own (`process::Broker`); the rest an in-process one.

mod common;

use std::time::Duration;

use common::process::Broker;
use common::*;

#[tokio::test]
async fn mqtt_level_4_is_accepted() {
    let server = start().await;
    let (_c, ack) = Raw::connect_with(server.local_addr(), &Opts::new("v4")).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(!ack.session_present);
    server.shutdown().await;
}

#[tokio::test]
async fn mqisdp_level_3_is_accepted_and_works() {
    let server = start().await;
    let addr = server.local_addr();
    let opts = Opts::new("v31").protocol("MQIsdp", 3);
    let (mut c, ack) = Raw::connect_with(addr, &opts).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    // An MQTT 3.1 client is a full client, not only accepted at the door.
    c.sub("v31/t", QoS::AtLeastOnce).await;
    c.publish("v31/t", b"hi", QoS::AtLeastOnce, false).await;
    let p = c.expect_publish().await;
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("v31/t", "hi"));
    server.shutdown().await;
}

#[tokio::test]
async fn unsupported_levels_get_connack_1_then_close() {
    let server = start().await;
    for level in [5, 6, 3] {
        let opts = Opts::new("future").protocol("MQTT", level);
        let (mut c, ack) = Raw::connect_with(server.local_addr(), &opts).await;
        assert_eq!(
            ack.code,
            ConnectReturnCode::RefusedProtocolVersion,
            "level {level}"
        );
        c.expect_closed(WAIT).await;
    }
    server.shutdown().await;
}

/// A broker process of its own: both bad first packets are counted, and nothing else.
#[tokio::test]
async fn first_packet_not_connect_closes() {
    let broker = Broker::start("").await;
    let mut c = Raw::open(broker.addr()).await;
    c.send_raw(&[0xC0, 0]).await.unwrap();
    c.expect_closed(WAIT).await;
    let mut c = Raw::open(broker.addr()).await;
    c.send_raw(&publish_bytes(b"a", b"x", 0, 0, false, false))
        .await
        .unwrap();
    c.expect_closed(WAIT).await;
    broker
        .assert_metric("herald_malformed_packets_total", 2.0)
        .await;
}

#[tokio::test]
async fn second_connect_closes() {
    let server = start().await;
    let mut c = Raw::connect(server.local_addr(), "twice").await;
    c.send_raw(&Opts::new("twice").encode()).await.unwrap();
    c.expect_closed(WAIT).await;
    server.shutdown().await;
}

#[tokio::test]
async fn empty_client_id_with_clean_session_gets_an_id_and_works() {
    let server = start().await;
    let addr = server.local_addr();
    let (mut anon, ack) = Raw::connect_with(addr, &Opts::new("")).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let (mut anon2, ack2) = Raw::connect_with(addr, &Opts::new("")).await;
    assert_eq!(ack2.code, ConnectReturnCode::Success);
    anon.sub("anon/t", QoS::AtLeastOnce).await;
    anon2.sub("anon/t", QoS::AtMostOnce).await;

    // Two anonymous clients must get different ids: if they shared one, the second would
    // have taken the first over.
    let mut publisher = Raw::connect(addr, "anon-pub").await;
    publisher
        .publish("anon/t", b"to-anon", QoS::AtLeastOnce, false)
        .await;
    let p = anon.expect_publish().await;
    assert_eq!(text(&p), "to-anon");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    anon.puback(p.pkid).await;
    assert_eq!(text(&anon2.expect_publish().await), "to-anon");
    server.shutdown().await;
}

#[tokio::test]
async fn empty_client_id_without_clean_session_gets_connack_2() {
    let server = start().await;
    let (mut c, ack) = Raw::connect_with(server.local_addr(), &Opts::new("").clean(false)).await;
    assert_eq!(ack.code, ConnectReturnCode::BadClientId);
    c.expect_closed(WAIT).await;
    server.shutdown().await;
}

/// A broker process of its own, so that its count of connect timeouts is this test's.
#[tokio::test]
async fn socket_without_connect_is_closed_after_connect_timeout() {
    const TIMEOUTS: &str = r#"herald_connections_rejected_total{reason="connect_timeout"}"#;
    let broker = Broker::start("[server]\nconnect_timeout = \"300ms\"\n").await;
    // Taken before the socket opens, so never later than the broker's clock starts.
    let started = tokio::time::Instant::now();
    let mut c = Raw::open(broker.addr()).await;
    c.expect_closed(Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "closed after {waited:?}, before the 300 ms connect timeout"
    );
    broker.assert_metric(TIMEOUTS, 1.0).await;

    // A partial CONNECT does not buy more time either.
    let started = tokio::time::Instant::now();
    let mut c = Raw::open(broker.addr()).await;
    let connect = Opts::new("slow").encode();
    c.send_raw(&connect[..5]).await.unwrap();
    c.expect_closed(Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "a partial CONNECT closed after {waited:?}, want the 300 ms connect timeout"
    );
    broker.assert_metric(TIMEOUTS, 2.0).await;
}

/// Keepalive 1 s: the broker closes the silent connection once 1.5 s have passed since the
/// CONNECT, not before (the lower bound is exact: the clock starts before the CONNECT is
/// sent), and the will shows the close was abnormal. The broker checks keepalives every
/// 250 ms; the upper bound leaves seconds more for a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_disconnected_after_one_and_a_half_keepalives() {
    let server = start().await;
    let addr = server.local_addr();
    let mut watcher = Raw::connect(addr, "ka-watcher").await;
    watcher.sub("ka/will", QoS::AtLeastOnce).await;
    let opts =
        Opts::new("ka-silent")
            .keepalive(1)
            .will("ka/will", b"gone", QoS::AtLeastOnce, false);
    let started = tokio::time::Instant::now();
    let (mut silent, _) = Raw::connect_ok(addr, &opts).await;

    let closed = silent
        .closed_within(Duration::from_secs(10))
        .await
        .expect("a client silent past 1.5 x its keepalive still connected after 10 s");
    let waited = closed - started;
    // The broker's keepalive clock counts whole milliseconds of wall-clock time.
    assert!(
        waited >= Duration::from_millis(1490),
        "keepalive 1 s: closed {waited:?} after the CONNECT, before 1.5 s"
    );
    assert!(
        waited <= Duration::from_secs(5),
        "keepalive 1 s: closed {waited:?} after the CONNECT, want about 1.5 s"
    );
    let will = watcher.expect_publish().await;
    assert_eq!(
        (will.topic.as_str(), text(&will).as_str()),
        ("ka/will", "gone")
    );
    server.shutdown().await;
}

/// Keepalive 1 s, a PINGREQ every 250 ms for 2.5 s (well past the 1.5 s a silent client
/// gets): each is answered and the connection stays. A ping may come 1.25 s late on a loaded
/// machine before the broker could rightly close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingreq_gets_pingresp_and_keeps_the_connection_alive() {
    let server = start().await;
    let (mut c, _) = Raw::connect_ok(server.local_addr(), &Opts::new("pinger").keepalive(1)).await;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        c.ping().await;
    }
    c.sub("still/here", QoS::AtMostOnce).await;
    server.shutdown().await;
}
