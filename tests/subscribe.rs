//! SUBSCRIBE/UNSUBSCRIBE, wildcard and `$` rules, overlapping subscriptions, retained
//! messages, and a wildcard subscription from a real client (rumqttc).

mod common;

use std::time::Duration;

use common::*;

fn topics(got: &[Publish]) -> Vec<&str> {
    got.iter().map(|p| p.topic.as_str()).collect()
}

#[tokio::test]
async fn plus_and_hash_match_by_level() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "wc-sub").await;
    sub.sub("s/+/c", QoS::AtMostOnce).await;
    sub.sub("h/#", QoS::AtMostOnce).await;
    sub.sub("m", QoS::AtMostOnce).await;
    let mut publisher = Raw::connect(addr, "wc-pub").await;
    for t in [
        "s/b/c", "s/b/d", "s/b/c/d", "s//c", "s/c", "h", "h/x", "h/x/y", "hx", "x/h",
    ] {
        publisher
            .publish(t, t.as_bytes(), QoS::AtMostOnce, false)
            .await;
    }
    let got = sub.until_marker(&mut publisher, "m").await;
    assert_eq!(topics(&got), ["s/b/c", "s//c", "h", "h/x", "h/x/y"]);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_filters_are_refused_and_valid_ones_in_the_same_subscribe_granted() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "bad-filter").await;
    let codes = sub
        .subscribe(&[
            ("a/#/b", QoS::AtLeastOnce),
            ("ok/t", QoS::AtLeastOnce),
            ("a+", QoS::AtMostOnce),
            ("x/#", QoS::ExactlyOnce),
            ("a/b#", QoS::AtMostOnce),
        ])
        .await;
    use SubscribeReasonCode::{Failure, Success};
    assert_eq!(
        codes,
        [
            Failure,
            Success(QoS::AtLeastOnce),
            Failure,
            Success(QoS::ExactlyOnce),
            Failure
        ]
    );
    // The connection stays up and the granted filters work.
    let mut publisher = Raw::connect(addr, "bad-filter-pub").await;
    publisher
        .publish("ok/t", b"1", QoS::AtMostOnce, false)
        .await;
    publisher.publish("x/y", b"2", QoS::AtMostOnce, false).await;
    assert_eq!(
        topics(&sub.until_marker(&mut publisher, "ok/t").await),
        ["ok/t", "x/y"]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unsubscribe_gets_unsuback_and_stops_delivery() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "uns-sub").await;
    sub.sub("uns/t", QoS::AtLeastOnce).await;
    sub.sub("uns/+", QoS::AtMostOnce).await;
    sub.sub("uns/marker", QoS::AtMostOnce).await;
    let mut publisher = Raw::connect(addr, "uns-pub").await;
    publisher
        .publish("uns/t", b"before", QoS::AtMostOnce, false)
        .await;
    assert_eq!(
        sub.until_marker(&mut publisher, "uns/marker").await.len(),
        1
    );

    // `unsubscribe` asserts the UNSUBACK with the matching packet id.
    sub.unsubscribe(&["uns/t", "uns/+"]).await;
    publisher
        .publish("uns/t", b"after", QoS::AtLeastOnce, false)
        .await;
    publisher
        .publish("uns/x", b"after", QoS::AtMostOnce, false)
        .await;
    sub.sub("uns/marker2", QoS::AtMostOnce).await;
    sub.expect_nothing_before_marker(&mut publisher, "uns/marker2")
        .await;
    // Unsubscribing from a filter never subscribed is still acknowledged.
    sub.unsubscribe(&["never/subscribed"]).await;
    server.shutdown().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "ov-sub").await;
    sub.sub("o/+", QoS::AtMostOnce).await;
    sub.sub("o/#", QoS::AtLeastOnce).await;
    sub.sub("o/x", QoS::AtMostOnce).await;
    let mut publisher = Raw::connect(addr, "ov-pub").await;
    publisher
        .publish("o/x", b"one", QoS::AtLeastOnce, false)
        .await;
    let p = sub.expect_publish().await;
    assert_eq!((text(&p).as_str(), p.qos), ("one", QoS::AtLeastOnce));
    sub.puback(p.pkid).await;
    let rest = sub.until_marker(&mut publisher, "o/x").await;
    assert!(rest.is_empty(), "one copy only, got also {rest:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let server = start().await;
    let addr = server.local_addr();
    let mut hash = Raw::connect(addr, "dl-hash").await;
    hash.sub("#", QoS::AtMostOnce).await;
    let mut plus = Raw::connect(addr, "dl-plus").await;
    plus.sub("+/x", QoS::AtMostOnce).await;
    plus.sub("+/+", QoS::AtMostOnce).await;
    let mut sys = Raw::connect(addr, "dl-sys").await;
    sys.sub("$SYS/#", QoS::AtMostOnce).await;
    sys.sub("m/x", QoS::AtMostOnce).await;
    let mut publisher = Raw::connect(addr, "dl-pub").await;

    publisher
        .publish("$SYS/x", b"sys", QoS::AtMostOnce, false)
        .await;
    publisher
        .publish("$app/x", b"app", QoS::AtMostOnce, false)
        .await;
    // The marker "m/x" matches all three subscribers.
    let got = sys.until_marker(&mut publisher, "m/x").await;
    assert_eq!(topics(&got), ["$SYS/x"]);
    // The same single marker publish reached the other two as well.
    for c in [&mut hash, &mut plus] {
        let p = c.expect_publish().await;
        assert_eq!((p.topic.as_str(), &p.payload[..]), ("m/x", MARKER));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn retained_message_is_sent_with_retain_to_later_subscribers() {
    let server = start().await;
    let addr = server.local_addr();
    let mut live = Raw::connect(addr, "rt-live").await;
    live.sub("rt/t", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(addr, "rt-pub").await;
    publisher
        .publish("rt/t", b"v1", QoS::AtLeastOnce, true)
        .await;

    let p = live.expect_publish().await;
    assert_eq!(text(&p), "v1");
    assert!(
        !p.retain,
        "live delivery to an existing subscriber has RETAIN = 0"
    );
    live.puback(p.pkid).await;

    let mut later = Raw::connect(addr, "rt-later").await;
    later.sub("rt/+", QoS::AtLeastOnce).await;
    let p = later.expect_publish().await;
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("rt/t", "v1"));
    assert!(p.retain, "retained copy has RETAIN = 1");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    later.puback(p.pkid).await;
    server.shutdown().await;
}

#[tokio::test]
async fn retained_message_is_replaced_by_a_newer_one() {
    let server = start().await;
    let addr = server.local_addr();
    let mut publisher = Raw::connect(addr, "rr-pub").await;
    publisher
        .publish("rr/t", b"old", QoS::AtMostOnce, true)
        .await;
    publisher
        .publish("rr/t", b"new", QoS::AtLeastOnce, true)
        .await;
    let mut later = Raw::connect(addr, "rr-later").await;
    later.sub("rr/#", QoS::AtMostOnce).await;
    let got = later.until_marker(&mut publisher, "rr/marker").await;
    assert_eq!(got.len(), 1, "one retained message per topic: {got:?}");
    assert_eq!(text(&got[0]), "new");
    assert!(got[0].retain);
    server.shutdown().await;
}

#[tokio::test]
async fn empty_retained_payload_clears_the_retained_message() {
    let server = start().await;
    let addr = server.local_addr();
    let mut publisher = Raw::connect(addr, "rc-pub").await;
    publisher
        .publish("rc/t", b"keep", QoS::AtLeastOnce, true)
        .await;
    let mut first = Raw::connect(addr, "rc-first").await;
    first.sub("rc/t", QoS::AtMostOnce).await;
    assert_eq!(text(&first.expect_publish().await), "keep");

    publisher.publish("rc/t", b"", QoS::AtLeastOnce, true).await;
    // The clearing message itself still goes to current subscribers.
    let p = first.expect_publish().await;
    assert!(p.payload.is_empty());

    let mut later = Raw::connect(addr, "rc-later").await;
    later.sub("rc/#", QoS::AtMostOnce).await;
    later
        .expect_nothing_before_marker(&mut publisher, "rc/marker")
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn rumqttc_wildcard_subscription_and_retained() {
    use rumqttc::{AsyncClient, Event, Incoming};

    let server = start().await;
    let addr = server.local_addr();
    let mut publisher = Raw::connect(addr, "rq-pub").await;
    publisher
        .publish("rq/sensors/1/temp", b"21", QoS::AtLeastOnce, true)
        .await;

    let mut opts = common::mqtt_options("rumq-wc", addr);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .subscribe("rq/sensors/+/temp", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe("rq/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();

    let mut got = Vec::new();
    let mut subacks = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < 3 {
        let Ok(ev) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
            panic!("rumqttc events in time: {subacks} SUBACKs, got {got:?}");
        };
        let ev = ev.expect("rumqttc connection");
        match ev {
            Event::Incoming(Incoming::SubAck(_)) => {
                subacks += 1;
                if subacks == 2 {
                    publisher
                        .publish("rq/sensors/2/temp", b"22", QoS::AtLeastOnce, false)
                        .await;
                }
            }
            Event::Incoming(Incoming::Publish(p)) => {
                got.push((p.topic.clone(), p.retain, p.qos as u8, p.payload.to_vec()))
            }
            _ => {}
        }
    }
    got.sort();
    assert_eq!(
        got,
        [
            // One retained copy per matching subscription, as Mosquitto does.
            ("rq/sensors/1/temp".into(), true, 0, b"21".to_vec()),
            ("rq/sensors/1/temp".into(), true, 1, b"21".to_vec()),
            ("rq/sensors/2/temp".into(), false, 1, b"22".to_vec()),
        ]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn subscribing_again_replaces_the_qos() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "re-sub").await;
    sub.sub("re/t", QoS::AtMostOnce).await;
    sub.sub("re/t", QoS::ExactlyOnce).await;
    let mut publisher = Raw::connect(addr, "re-pub").await;
    publisher
        .publish("re/t", b"q2", QoS::ExactlyOnce, false)
        .await;
    let p = sub.expect_publish().await;
    assert_eq!((text(&p).as_str(), p.qos), ("q2", QoS::ExactlyOnce));
    sub.pubrec(p.pkid).await;
    assert!(matches!(sub.expect(WAIT).await, Packet::PubRel(r) if r.pkid == p.pkid));
    sub.pubcomp(p.pkid).await;
    let rest = sub.until_marker(&mut publisher, "re/t").await;
    assert!(rest.is_empty(), "one subscription, one copy: {rest:?}");
    server.shutdown().await;
}

/// Retained messages are written as the subscriber reads them, not dropped at the mailbox's
/// bounds: 3,000 of them (more than `max_mailbox`, more bytes than `max_mailbox_bytes`) all
/// arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_retained_messages_all_arrive() {
    let server = start_with(|c| c.session.max_mailbox_bytes = 64 * 1024).await;
    let addr = server.local_addr();
    let mut publisher = Raw::connect(addr, "many-ret-pub").await;
    let payload = vec![b'v'; 500];
    for i in 0..3000 {
        publisher
            .send_publish(&format!("manyret/{i}"), &payload, QoS::AtMostOnce, true)
            .await;
    }
    // In order after the QoS 0 ones: all are retained once this is acknowledged.
    publisher
        .publish("manyret-sync", b"", QoS::AtLeastOnce, false)
        .await;
    let mut sub = Raw::connect(addr, "many-ret-sub").await;
    sub.sub("manyret/#", QoS::AtMostOnce).await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 3000 {
        let p = match sub.next(WAIT).await {
            Event::Packet(Packet::Publish(p)) => p,
            e => panic!("after {} retained messages: {e:?}", seen.len()),
        };
        assert!(p.retain);
        seen.insert(p.topic);
    }
    server.shutdown().await;
}
