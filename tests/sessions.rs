//! Clean and persistent sessions, takeover, offline queueing with DUP, the outbox cap. The
//! tests that check a counter run a broker process of their own (`process::Broker`); the
//! rest an in-process one.

mod common;

use common::process::Broker;
use common::*;

#[tokio::test]
async fn clean_session_discards_subscriptions_and_queued_messages() {
    let server = start().await;
    let addr = server.local_addr();
    let (mut dev, present) = Raw::connect_ok(addr, &Opts::new("cs-dev").clean(false)).await;
    assert!(!present, "a brand new client has no session");
    dev.sub("cs/t", QoS::AtLeastOnce).await;
    dev.disconnect().await;
    wait_offline(&server, "cs-dev").await;

    let mut publisher = Raw::connect(addr, "cs-pub").await;
    publisher
        .publish("cs/t", b"queued", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(outbox_len(&server, "cs-dev").await, 1);

    let (mut dev, present) = Raw::connect_ok(addr, &Opts::new("cs-dev").clean(true)).await;
    assert!(!present, "clean session must answer session present = 0");
    assert_eq!(outbox_len(&server, "cs-dev").await, 0);
    dev.sub("cs/marker", QoS::AtMostOnce).await;
    // The old subscription is gone: a new message on cs/t does not arrive either.
    publisher
        .publish("cs/t", b"new", QoS::AtLeastOnce, false)
        .await;
    dev.expect_nothing_before_marker(&mut publisher, "cs/marker")
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn persistent_session_resumes_subscriptions_and_queued_messages() {
    let server = start().await;
    let addr = server.local_addr();
    let opts = Opts::new("ps-dev").clean(false);
    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.sub("ps/t", QoS::AtLeastOnce).await;
    dev.disconnect().await;
    wait_offline(&server, "ps-dev").await;

    let mut publisher = Raw::connect(addr, "ps-pub").await;
    publisher
        .publish("ps/t", b"while-away", QoS::AtLeastOnce, false)
        .await;

    let (mut dev, present) = Raw::connect_ok(addr, &opts).await;
    assert!(
        present,
        "persistent session must answer session present = 1"
    );
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        ("ps/t", "while-away")
    );
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert!(!p.dup, "never sent before, so DUP = 0");
    dev.puback(p.pkid).await;

    // The subscription itself came back, without a new SUBSCRIBE.
    publisher
        .publish("ps/t", b"live", QoS::AtLeastOnce, false)
        .await;
    let p = dev.expect_publish().await;
    assert_eq!(text(&p), "live");
    dev.puback(p.pkid).await;
    wait_until(WAIT, "outbox drained", async || {
        outbox_len(&server, "ps-dev").await == 0
    })
    .await;
    server.shutdown().await;
}

/// A broker process of its own, so that its takeover count is this test's.
#[tokio::test]
async fn second_connection_with_same_id_takes_over_and_fires_the_will() {
    let broker = Broker::start("").await;
    let addr = broker.addr();
    let mut watcher = Raw::connect(addr, "to-watcher").await;
    watcher.sub("to/will", QoS::AtLeastOnce).await;

    let first_opts = Opts::new("to-dev").will("to/will", b"first-gone", QoS::AtLeastOnce, false);
    let (mut first, _) = Raw::connect_ok(addr, &first_opts).await;
    let (mut second, _) = Raw::connect_ok(addr, &Opts::new("to-dev")).await;

    first.expect_closed(WAIT).await;
    let will = watcher.expect_publish().await;
    assert_eq!(text(&will), "first-gone");
    broker
        .assert_metric("herald_session_takeovers_total", 1.0)
        .await;

    // The newer connection owns the id now.
    second.sub("to/t", QoS::AtMostOnce).await;
    watcher
        .publish("to/t", b"for-second", QoS::AtMostOnce, false)
        .await;
    assert_eq!(text(&second.expect_publish().await), "for-second");
}

#[tokio::test]
async fn takeover_of_a_persistent_session_keeps_its_state() {
    let server = start().await;
    let addr = server.local_addr();
    let opts = Opts::new("tp-dev").clean(false);
    let (mut first, _) = Raw::connect_ok(addr, &opts).await;
    first.sub("tp/t", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(addr, "tp-pub").await;
    publisher
        .publish("tp/t", b"one", QoS::AtLeastOnce, false)
        .await;
    let p1 = first.expect_publish().await;

    // The first connection never acks; the second must get the message again as a resend.
    let (mut second, present) = Raw::connect_ok(addr, &opts).await;
    assert!(present);
    first.expect_closed(WAIT).await;
    let again = second.expect_publish().await;
    assert_eq!(text(&again), "one");
    assert!(again.dup);
    assert_eq!(again.pkid, p1.pkid);
    server.shutdown().await;
}

#[tokio::test]
async fn offline_queue_resends_unacked_first_with_dup_then_the_rest_in_order() {
    let server = start().await;
    let addr = server.local_addr();
    let opts = Opts::new("oq-dev").clean(false);
    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.sub("oq/t", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(addr, "oq-pub").await;
    publisher
        .publish("oq/t", b"m1", QoS::AtLeastOnce, false)
        .await;
    let first = dev.expect_publish().await;
    assert_eq!(text(&first), "m1");
    assert!(!first.dup);

    // Gone without acking m1 (no DISCONNECT either: a dropped network).
    drop(dev);
    wait_offline(&server, "oq-dev").await;
    for m in ["m2", "m3", "m4"] {
        publisher
            .publish("oq/t", m.as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    assert_eq!(outbox_len(&server, "oq-dev").await, 4);

    let (mut dev, present) = Raw::connect_ok(addr, &opts).await;
    assert!(present);
    let resent = dev.expect_publish().await;
    assert_eq!(text(&resent), "m1");
    assert!(resent.dup, "a resend carries DUP = 1");
    assert_eq!(resent.pkid, first.pkid, "a resend keeps its packet id");
    let mut ids = vec![resent.pkid];
    for want in ["m2", "m3", "m4"] {
        let p = dev.expect_publish().await;
        assert_eq!(text(&p), want, "queued messages in publish order");
        assert!(!p.dup, "{want} was never sent before");
        assert_eq!(p.qos, QoS::AtLeastOnce);
        ids.push(p.pkid);
    }
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "packet ids {ids:?}");
    for id in ids {
        dev.puback(id).await;
    }
    wait_until(WAIT, "outbox drained", async || {
        outbox_len(&server, "oq-dev").await == 0
    })
    .await;
    server.shutdown().await;
}

/// Five pushes for offline `id` whose outbox holds 3, with `session.overflow = overflow`, on
/// a broker process of its own: the two that do not fit are counted under `reason` (and
/// nothing else is); returns what `id` gets when it comes back.
async fn fill_offline_outbox(overflow: &str, reason: &str, id: &str) -> Vec<String> {
    let broker = Broker::start(&format!(
        "[session]\nmax_queued_messages = 3\noverflow = \"{overflow}\"\n"
    ))
    .await;
    let addr = broker.addr();
    let opts = Opts::new(id).clean(false);
    let (dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.disconnect().await;
    // No connection left: its session is saved.
    broker.wait_connections(0).await;

    let mut backend = Raw::connect(addr, "backend").await;
    for i in 1..=5 {
        let m = format!("n{i}");
        // Still PUBACKed when full: MQTT 3.1.1 has no negative PUBACK.
        backend
            .publish(&format!("push/{id}"), m.as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    broker
        .assert_metric(
            &format!(r#"herald_messages_dropped_total{{reason="{reason}"}}"#),
            2.0,
        )
        .await;

    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = dev.expect_publish().await;
        dev.puback(p.pkid).await;
        got.push(text(&p));
    }
    // A QoS 0 push is never stored, so it comes after whatever the outbox still held.
    let rest = dev.until_marker(&mut backend, &format!("push/{id}")).await;
    assert!(rest.is_empty(), "only 3 were kept, got more: {rest:?}");
    got
}

#[tokio::test]
async fn full_outbox_drop_oldest_keeps_the_newest() {
    let got = fill_offline_outbox("drop_oldest", "outbox_full_oldest", "cap-oldest").await;
    assert_eq!(got, ["n3", "n4", "n5"]);
}

#[tokio::test]
async fn full_outbox_drop_new_keeps_the_first() {
    let got = fill_offline_outbox("drop_new", "outbox_full_new", "cap-new").await;
    assert_eq!(got, ["n1", "n2", "n3"]);
}

#[tokio::test]
async fn only_messages_written_before_are_resent_with_dup() {
    let server = start_with(|c| c.session.max_inflight = 2).await;
    let addr = server.local_addr();
    let opts = Opts::new("wd-dev").clean(false);
    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.sub("wd/t", QoS::AtLeastOnce).await;
    dev.sub("wd/marker", QoS::AtMostOnce).await;
    let mut publisher = Raw::connect(addr, "wd-pub").await;
    for i in 1..=5 {
        publisher
            .publish("wd/t", format!("d{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    // The window of 2 means d3..d5 were never on the wire.
    let sent = dev.until_marker(&mut publisher, "wd/marker").await;
    assert_eq!(sent.iter().map(text).collect::<Vec<_>>(), ["d1", "d2"]);
    drop(dev);
    wait_offline(&server, "wd-dev").await;

    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    for (i, want_dup) in [(1, true), (2, true), (3, false), (4, false), (5, false)] {
        let p = dev.expect_publish().await;
        assert_eq!(text(&p), format!("d{i}"));
        assert_eq!(p.dup, want_dup, "DUP of d{i}");
        if i <= 2 {
            assert_eq!(p.pkid, sent[i - 1].pkid, "d{i} keeps its packet id");
        }
        dev.puback(p.pkid).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn long_offline_queue_is_replayed_in_order_through_a_small_window() {
    let server = start_with(|c| c.session.max_inflight = 3).await;
    let addr = server.local_addr();
    let opts = Opts::new("lq-dev").clean(false);
    let (dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.disconnect().await;
    wait_offline(&server, "lq-dev").await;
    let mut backend = Raw::connect(addr, "lq-backend").await;
    for i in 0..50 {
        backend
            .publish(
                "push/lq-dev",
                format!("{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    // Live messages published during the replay queue up behind it.
    for i in 50..60 {
        backend
            .publish(
                "push/lq-dev",
                format!("{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    for i in 0..60 {
        let p = dev.expect_publish().await;
        assert_eq!(text(&p), i.to_string());
        dev.puback(p.pkid).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn takeover_by_a_clean_session_discards_the_old_state() {
    let server = start().await;
    let addr = server.local_addr();
    let (mut first, _) = Raw::connect_ok(addr, &Opts::new("tc-dev").clean(false)).await;
    first.sub("tc/t", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(addr, "tc-pub").await;
    publisher
        .publish("tc/t", b"unacked", QoS::AtLeastOnce, false)
        .await;
    first.expect_publish().await;

    let (mut second, present) = Raw::connect_ok(addr, &Opts::new("tc-dev")).await;
    assert!(!present);
    first.expect_closed(WAIT).await;
    second.sub("tc/marker", QoS::AtMostOnce).await;
    publisher
        .publish("tc/t", b"after", QoS::AtLeastOnce, false)
        .await;
    second
        .expect_nothing_before_marker(&mut publisher, "tc/marker")
        .await;
    assert_eq!(outbox_len(&server, "tc-dev").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn outbound_qos2_pubrel_is_resent_after_reconnect() {
    let server = start().await;
    let addr = server.local_addr();
    let opts = Opts::new("rel-dev").clean(false);
    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.sub("rel/t", QoS::ExactlyOnce).await;
    let mut publisher = Raw::connect(addr, "rel-pub").await;
    publisher
        .publish("rel/t", b"x", QoS::ExactlyOnce, false)
        .await;
    let p = dev.expect_publish().await;
    dev.pubrec(p.pkid).await;
    assert!(matches!(dev.expect(WAIT).await, Packet::PubRel(r) if r.pkid == p.pkid));
    // Gone before PUBCOMP.
    drop(dev);
    wait_offline(&server, "rel-dev").await;

    let (mut dev, present) = Raw::connect_ok(addr, &opts).await;
    assert!(present);
    match dev.expect(WAIT).await {
        Packet::PubRel(r) => assert_eq!(r.pkid, p.pkid),
        other => panic!("expected the PUBREL again, got {other:?}"),
    }
    dev.pubcomp(p.pkid).await;
    // The message itself is not sent again: PUBREC already took it.
    dev.sub("rel/marker", QoS::AtMostOnce).await;
    dev.expect_nothing_before_marker(&mut publisher, "rel/marker")
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn inbound_qos2_duplicate_is_suppressed_across_a_reconnect() {
    let server = start().await;
    let addr = server.local_addr();
    let mut sub = Raw::connect(addr, "iq-sub").await;
    sub.sub("iq/t", QoS::AtMostOnce).await;
    let opts = Opts::new("iq-pub").clean(false);
    let (mut publisher, _) = Raw::connect_ok(addr, &opts).await;
    publisher
        .send_raw(&publish_bytes(b"iq/t", b"once", 2, 9, false, false))
        .await
        .unwrap();
    assert!(matches!(publisher.expect(WAIT).await, Packet::PubRec(r) if r.pkid == 9));
    drop(publisher);
    wait_offline(&server, "iq-pub").await;

    // The publisher never saw the PUBREC, as far as it knows, and resends after reconnecting.
    let (mut publisher, present) = Raw::connect_ok(addr, &opts).await;
    assert!(present);
    publisher
        .send_raw(&publish_bytes(b"iq/t", b"once", 2, 9, false, true))
        .await
        .unwrap();
    assert!(matches!(publisher.expect(WAIT).await, Packet::PubRec(r) if r.pkid == 9));
    publisher.pubrel(9).await;
    assert!(matches!(publisher.expect(WAIT).await, Packet::PubComp(c) if c.pkid == 9));
    let got = sub.until_marker(&mut publisher, "iq/t").await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), ["once"]);
    server.shutdown().await;
}

/// A broker process of its own, so that its count of expired messages is this test's.
#[tokio::test]
async fn queued_messages_expire_after_message_ttl() {
    let broker = Broker::start("[session]\nmessage_ttl = \"200ms\"\n").await;
    let addr = broker.addr();
    let opts = Opts::new("ttl-dev").clean(false);
    let (dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.disconnect().await;
    // No connection left: its session is saved.
    broker.wait_connections(0).await;
    let mut backend = Raw::connect(addr, "ttl-backend").await;
    backend
        .publish("push/ttl-dev", b"stale", QoS::AtLeastOnce, false)
        .await;
    // The one sleep that is the point of the test: let the TTL pass.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    backend
        .publish("push/ttl-dev", b"fresh", QoS::AtLeastOnce, false)
        .await;

    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    let p = dev.expect_publish().await;
    assert_eq!(text(&p), "fresh", "the expired message is not delivered");
    dev.puback(p.pkid).await;
    if !skip_under_redis(
        "queued_messages_expire_after_message_ttl: the expired message is counted",
        "Herald bug: the Redis store's ENQUEUE script sets the outbox key's PEXPIRE to \
         message_ttl, so Redis deletes a whole outbox once its newest message expires and \
         those messages are never counted in herald_messages_dropped_total{reason=\"expired\"}",
    ) {
        broker
            .assert_metric(r#"herald_messages_dropped_total{reason="expired"}"#, 1.0)
            .await;
    }
}

#[tokio::test]
async fn clean_session_state_ends_with_its_connection() {
    let server = start().await;
    let addr = server.local_addr();
    let mut dev = Raw::connect(addr, "ce-dev").await;
    dev.sub("ce/t", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(addr, "ce-pub").await;
    publisher
        .publish("ce/t", b"unacked", QoS::AtLeastOnce, false)
        .await;
    dev.expect_publish().await;
    assert_eq!(outbox_len(&server, "ce-dev").await, 1);
    drop(dev);
    wait_offline(&server, "ce-dev").await;
    assert_eq!(
        outbox_len(&server, "ce-dev").await,
        0,
        "unacked message dropped with the session"
    );
    // No subscription left to store for either.
    publisher
        .publish("ce/t", b"later", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(outbox_len(&server, "ce-dev").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn unsubscribe_in_a_persistent_session_lasts_across_reconnect() {
    let server = start().await;
    let addr = server.local_addr();
    let opts = Opts::new("pu-dev").clean(false);
    let (mut dev, _) = Raw::connect_ok(addr, &opts).await;
    dev.sub("pu/a", QoS::AtLeastOnce).await;
    dev.sub("pu/b", QoS::AtLeastOnce).await;
    dev.unsubscribe(&["pu/a"]).await;
    dev.disconnect().await;
    wait_offline(&server, "pu-dev").await;

    let mut publisher = Raw::connect(addr, "pu-pub").await;
    publisher
        .publish("pu/a", b"a", QoS::AtLeastOnce, false)
        .await;
    publisher
        .publish("pu/b", b"b", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(outbox_len(&server, "pu-dev").await, 1);
    let (mut dev, present) = Raw::connect_ok(addr, &opts).await;
    assert!(present);
    let p = dev.expect_publish().await;
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("pu/b", "b"));
    server.shutdown().await;
}
