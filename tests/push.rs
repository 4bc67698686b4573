//! The push model: every client is subscribed to `push/<its id>` at QoS 1 on CONNECT, a
//! backend's PUBACK means the message is in the device's outbox, and push topics are
//! isolated from everyone but their owner.

mod common;

use common::*;

#[tokio::test]
async fn client_receives_its_push_topic_without_subscribing() {
    let server = start().await;
    let addr = server.local_addr();
    let mut dev = Raw::connect(addr, "dev1").await;
    let mut backend = Raw::connect(addr, "backend").await;
    backend
        .publish("push/dev1", b"hello", QoS::AtLeastOnce, false)
        .await;
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        ("push/dev1", "hello")
    );
    assert_eq!(p.qos, QoS::AtLeastOnce);
    dev.puback(p.pkid).await;

    // The implicit subscription is QoS 1: a QoS 2 push arrives at QoS 1.
    backend
        .publish("push/dev1", b"two", QoS::ExactlyOnce, false)
        .await;
    let p = dev.expect_publish().await;
    assert_eq!((text(&p).as_str(), p.qos), ("two", QoS::AtLeastOnce));
    dev.puback(p.pkid).await;
    wait_until(WAIT, "dev1 outbox drained", async || {
        outbox_len(&server, "dev1").await == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn puback_to_the_backend_means_the_message_is_in_the_outbox() {
    let server = start().await;
    let addr = server.local_addr();
    let (dev, _) = Raw::connect_ok(addr, &Opts::new("dev42").clean(false)).await;
    dev.disconnect().await;
    wait_offline(&server, "dev42").await;

    let mut backend = Raw::connect(addr, "backend").await;
    // `publish` returns as soon as the PUBACK is read.
    backend
        .publish("push/dev42", b"m1", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(outbox_len(&server, "dev42").await, 1);
    backend
        .publish("push/dev42", b"m2", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(outbox_len(&server, "dev42").await, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_may_not_subscribe_to_another_clients_push_topic() {
    let server = start().await;
    let mut x = Raw::connect(server.local_addr(), "X").await;
    let codes = x
        .subscribe(&[
            ("push/Y", QoS::AtLeastOnce),
            ("push/X", QoS::ExactlyOnce),
            ("other/t", QoS::AtMostOnce),
        ])
        .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Failure,
            // Its own push topic is fine, at most at the push QoS.
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtMostOnce),
        ]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn push_messages_never_reach_wildcard_subscribers() {
    let server = start().await;
    let addr = server.local_addr();
    let mut owner = Raw::connect(addr, "iso-dev").await;
    let mut snoopers = Vec::new();
    for (i, filter) in ["#", "+/+", "push/#", "push/+"].iter().enumerate() {
        let mut c = Raw::connect(addr, &format!("snoop{i}")).await;
        c.sub(filter, QoS::AtLeastOnce).await;
        c.sub("iso/marker", QoS::AtMostOnce).await;
        snoopers.push(c);
    }
    let mut backend = Raw::connect(addr, "backend").await;
    backend
        .publish("push/iso-dev", b"secret", QoS::AtLeastOnce, false)
        .await;
    backend
        .publish("push/iso-dev", b"secret0", QoS::AtMostOnce, false)
        .await;

    let p = owner.expect_publish().await;
    assert_eq!(text(&p), "secret");
    let p = owner.expect_publish().await;
    assert_eq!(text(&p), "secret0");
    // One marker publish reaches every snooper; each must see it first.
    backend
        .publish("iso/marker", MARKER, QoS::AtMostOnce, false)
        .await;
    for s in &mut snoopers {
        let p = s.expect_publish().await;
        assert_eq!((p.topic.as_str(), &p.payload[..]), ("iso/marker", MARKER));
    }
    // Nor is it stored for them.
    for i in 0..4 {
        assert_eq!(outbox_len(&server, &format!("snoop{i}")).await, 0);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn push_topics_are_not_retained() {
    let server = start().await;
    let addr = server.local_addr();
    let mut backend = Raw::connect(addr, "backend").await;
    backend
        .publish("push/rdev", b"r", QoS::AtLeastOnce, true)
        .await;
    // A retained push would be readable by the next wildcard subscriber.
    let mut snoop = Raw::connect(addr, "rsnoop").await;
    snoop.sub("push/#", QoS::AtLeastOnce).await;
    snoop.sub("r/marker", QoS::AtMostOnce).await;
    snoop
        .expect_nothing_before_marker(&mut backend, "r/marker")
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn offline_device_gets_queued_pushes_in_order_on_reconnect() {
    let server = start().await;
    let addr = server.local_addr();
    let opts = Opts::new("dev-off").clean(false);
    let (dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.disconnect().await;
    wait_offline(&server, "dev-off").await;

    let mut backend = Raw::connect(addr, "backend").await;
    for i in 1..=5 {
        backend
            .publish(
                "push/dev-off",
                format!("p{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    let (mut dev, present) = Raw::connect_ok(addr, &opts).await;
    assert!(present);
    // A push published after the reconnect comes after the queued ones.
    backend
        .publish("push/dev-off", b"p6", QoS::AtLeastOnce, false)
        .await;
    for i in 1..=6 {
        let p = dev.expect_publish().await;
        assert_eq!(text(&p), format!("p{i}"));
        assert!(!p.dup);
        dev.puback(p.pkid).await;
    }
    wait_until(WAIT, "dev-off outbox drained", async || {
        outbox_len(&server, "dev-off").await == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn push_disabled_makes_push_topics_ordinary() {
    let server = start_with(|c| c.push.enabled = false).await;
    let addr = server.local_addr();
    let mut x = Raw::connect(addr, "pX").await;
    let mut watcher = Raw::connect(addr, "pw").await;
    watcher.sub("#", QoS::AtLeastOnce).await;
    // Another client's push topic can be subscribed to now.
    x.sub("push/pY", QoS::AtLeastOnce).await;
    x.sub("px/marker", QoS::AtMostOnce).await;

    let mut backend = Raw::connect(addr, "backend").await;
    backend
        .publish("push/pX", b"to-x", QoS::AtLeastOnce, false)
        .await;
    let p = watcher.expect_publish().await;
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("push/pX", "to-x"));
    watcher.puback(p.pkid).await;
    // pX has no implicit subscription any more.
    x.expect_nothing_before_marker(&mut backend, "px/marker")
        .await;
    backend
        .publish("push/pY", b"to-y", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(text(&x.expect_publish().await), "to-y");
    server.shutdown().await;
}

#[tokio::test]
async fn custom_push_template() {
    let server = start_with(|c| c.push.topic_template = "dev/{client_id}/inbox".into()).await;
    let addr = server.local_addr();
    let mut dev = Raw::connect(addr, "d7").await;
    let mut backend = Raw::connect(addr, "backend").await;
    backend
        .publish("dev/d7/inbox", b"in", QoS::AtLeastOnce, false)
        .await;
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        ("dev/d7/inbox", "in")
    );
    let codes = backend
        .subscribe(&[("dev/d7/inbox", QoS::AtLeastOnce)])
        .await;
    assert_eq!(codes, [SubscribeReasonCode::Failure]);
    server.shutdown().await;
}

/// The interop push flow with a real client library: a persistent device goes away, five
/// pushes are published, the device comes back with the same id and receives all five in
/// order, without ever sending SUBSCRIBE.
#[tokio::test]
async fn rumqttc_device_gets_pushes_published_while_offline() {
    use rumqttc::{AsyncClient, Event, Incoming};
    use std::time::Duration;

    let server = start().await;
    let addr = server.local_addr();
    let device = || {
        let mut opts = common::mqtt_options("rq-dev", addr);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(false);
        AsyncClient::new(opts, 10)
    };
    let next_event = async |eventloop: &mut rumqttc::EventLoop| {
        tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("rumqttc event in time")
            .expect("rumqttc connection")
    };

    let (client, mut eventloop) = device();
    match next_event(&mut eventloop).await {
        Event::Incoming(Incoming::ConnAck(a)) => assert!(!a.session_present),
        e => panic!("expected CONNACK, got {e:?}"),
    }
    client.disconnect().await.unwrap();
    while !matches!(
        next_event(&mut eventloop).await,
        Event::Outgoing(rumqttc::Outgoing::Disconnect)
    ) {}
    drop(eventloop);
    wait_offline(&server, "rq-dev").await;

    let mut backend = Raw::connect(addr, "rq-backend").await;
    for i in 1..=5 {
        backend
            .publish(
                "push/rq-dev",
                format!("msg {i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }

    let (_client, mut eventloop) = device();
    let mut got = Vec::new();
    while got.len() < 5 {
        match next_event(&mut eventloop).await {
            Event::Incoming(Incoming::ConnAck(a)) => assert!(a.session_present),
            Event::Incoming(Incoming::Publish(p)) => {
                assert_eq!(p.topic, "push/rq-dev");
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            _ => {}
        }
    }
    assert_eq!(got, ["msg 1", "msg 2", "msg 3", "msg 4", "msg 5"]);
    // rumqttc acknowledges each; the outbox empties.
    wait_until(WAIT, "rq-dev outbox drained", async || {
        let _ = tokio::time::timeout(Duration::from_millis(5), eventloop.poll()).await;
        outbox_len(&server, "rq-dev").await == 0
    })
    .await;
    server.shutdown().await;
}
