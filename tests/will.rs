//! The will: published with its QoS and retain flag when a connection ends without
//! DISCONNECT, never after DISCONNECT. (Keepalive timeout: tests/connect.rs; takeover:
//! tests/sessions.rs.)

mod common;

use common::process::Broker;
use common::*;

/// A broker process of its own, so that its count of wills is this test's.
#[tokio::test]
async fn will_is_published_with_its_qos_and_retain_when_the_socket_closes() {
    let broker = Broker::start("").await;
    let addr = broker.addr();
    let mut watcher = Raw::connect(addr, "wl-watcher").await;
    watcher.sub("wl/status", QoS::ExactlyOnce).await;

    let opts = Opts::new("wl-dev").will("wl/status", b"offline", QoS::AtLeastOnce, true);
    let (dev, _) = Raw::connect_ok(addr, &opts).await;
    drop(dev);

    let p = watcher.expect_publish().await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        ("wl/status", "offline")
    );
    assert_eq!(
        p.qos,
        QoS::AtLeastOnce,
        "the will's own QoS (subscription allows 2)"
    );
    assert!(!p.retain, "live delivery: RETAIN = 0");
    watcher.puback(p.pkid).await;
    broker
        .assert_metric("herald_wills_published_total", 1.0)
        .await;

    // Its retain flag made it the topic's retained message.
    let mut later = Raw::connect(addr, "wl-later").await;
    later.sub("wl/status", QoS::AtLeastOnce).await;
    let r = later.expect_publish().await;
    assert_eq!(text(&r), "offline");
    assert!(r.retain);
}

#[tokio::test]
async fn will_qos0_not_retained() {
    let server = start().await;
    let addr = server.local_addr();
    let mut watcher = Raw::connect(addr, "w0-watcher").await;
    watcher.sub("w0/status", QoS::AtLeastOnce).await;
    let opts = Opts::new("w0-dev").will("w0/status", b"bye", QoS::AtMostOnce, false);
    let (dev, _) = Raw::connect_ok(addr, &opts).await;
    drop(dev);
    let p = watcher.expect_publish().await;
    assert_eq!((text(&p).as_str(), p.qos), ("bye", QoS::AtMostOnce));

    let mut later = Raw::connect(addr, "w0-later").await;
    later.sub("w0/#", QoS::AtMostOnce).await;
    later
        .expect_nothing_before_marker(&mut watcher, "w0/marker")
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn will_is_published_on_protocol_error() {
    let server = start().await;
    let addr = server.local_addr();
    let mut watcher = Raw::connect(addr, "we-watcher").await;
    watcher.sub("we/status", QoS::AtLeastOnce).await;
    let opts = Opts::new("we-dev").will("we/status", b"broken", QoS::AtLeastOnce, false);
    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    // PUBLISH with QoS 3.
    dev.send_raw(&[0x36, 5, 0, 1, b'a', 0, 1]).await.unwrap();
    dev.expect_closed(WAIT).await;
    let p = watcher.expect_publish().await;
    assert_eq!(text(&p), "broken");
    server.shutdown().await;
}

#[tokio::test]
async fn will_is_not_published_after_disconnect() {
    let server = start().await;
    let addr = server.local_addr();
    let mut watcher = Raw::connect(addr, "wd-watcher").await;
    watcher.sub("wd/status", QoS::AtLeastOnce).await;
    let opts = Opts::new("wd-dev").will("wd/status", b"should-not", QoS::AtLeastOnce, true);
    let (dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.disconnect().await;
    // The will would be published before the connection's cleanup ends.
    wait_offline(&server, "wd-dev").await;
    watcher
        .expect_nothing_before_marker(&mut Raw::connect(addr, "wd-pub").await, "wd/status")
        .await;
    // Nor retained.
    let mut later = Raw::connect(addr, "wd-later").await;
    later.sub("wd/#", QoS::AtMostOnce).await;
    later
        .expect_nothing_before_marker(&mut watcher, "wd/marker")
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn will_is_published_when_a_second_connect_breaks_the_protocol() {
    let server = start().await;
    let addr = server.local_addr();
    let mut watcher = Raw::connect(addr, "w2-watcher").await;
    watcher.sub("w2/status", QoS::AtLeastOnce).await;
    let opts = Opts::new("w2-dev").will("w2/status", b"twice", QoS::AtLeastOnce, false);
    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.send_raw(&opts.encode()).await.unwrap();
    dev.expect_closed(WAIT).await;
    assert_eq!(text(&watcher.expect_publish().await), "twice");
    server.shutdown().await;
}
