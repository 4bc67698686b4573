//! Operating Herald (issue 13), on real `herald` processes of each test's own: the health
//! endpoints and what turns readiness off (a hung Redis, a drain), the drain of a cluster
//! node over HTTP (its devices' connections closed, the node gone with status 0), the
//! delivery latency histogram by path and replay, redeliveries, CONNACKs by code, refused
//! CONNECTs and connections in the log, and the Redis store's sampled gauges.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::process::{Broker, Launch, RedisServer};
use common::{http, wait_until, ConnectReturnCode, Event, Opts, Packet, QoS, Raw, WAIT};

/// Waits until `/readyz` answers `status`.
async fn wait_ready_status(b: &Broker, status: u16, within: Duration) {
    let addr = b.metrics_addr();
    wait_until(within, &format!("/readyz answering {status}"), async || {
        http(addr, "GET", "/readyz").await.0 == status
    })
    .await;
}

/// A persistent device subscribed to its push topic at QoS 1.
async fn device(addr: SocketAddr, id: &str) -> Raw {
    let (mut c, ack) = Raw::connect_with(addr, &Opts::new(id).clean(false)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    c.sub(&format!("push/{id}"), QoS::AtLeastOnce).await;
    c
}

/// The next PUBLISH (other packets skipped), unacknowledged.
async fn next_publish(c: &mut Raw) -> common::Publish {
    loop {
        match c.next(WAIT * 5).await {
            Event::Packet(Packet::Publish(p)) => return p,
            Event::Packet(_) => {}
            other => panic!("waiting for a PUBLISH: {other:?}"),
        }
    }
}

#[tokio::test]
async fn health_endpoints_and_drain_refused_on_a_single_node() {
    let b = Broker::start("").await;
    let m = b.metrics_addr();
    assert_eq!(http(m, "GET", "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http(m, "GET", "/readyz").await, (200, "ready\n".into()));
    let (code, body) = http(m, "POST", "/admin/drain").await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(http(m, "GET", "/nothing").await.0, 404);
    b.assert_metric("herald_ready", 1.0).await;
    b.assert_metric("herald_store_up", 1.0).await;
    // Still serving: the refused drain changed nothing.
    let c = Raw::connect(b.addr(), "after-drain-refused").await;
    c.disconnect().await;
}

#[tokio::test]
async fn refused_connects_are_counted_by_code_and_logged() {
    let b = Broker::start("").await;
    let (_c, ack) = Raw::connect_with(b.addr(), &Opts::new("$herald/not-a-node")).await;
    assert_eq!(ack.code, ConnectReturnCode::BadClientId);
    b.assert_metric("herald_connack_total{code=\"2\"}", 1.0)
        .await;
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("refused CONNECT"))
        .unwrap_or_else(|| panic!("no refused CONNECT line in:\n{log}"));
    assert!(line.contains("INFO") && line.contains("code=2"), "{line}");
    assert!(line.contains("$herald/not-a-node"), "{line}");
}

#[tokio::test]
async fn connections_are_logged_at_info_only_when_asked() {
    let quiet = Broker::start("").await;
    let loud = Broker::start("[log]\nconnections = true\n").await;
    for b in [&quiet, &loud] {
        let c = Raw::connect(b.addr(), "logged-device").await;
        c.disconnect().await;
        b.wait_connections(0).await;
    }
    let said = |b: &Broker, what: &str| {
        b.log()
            .lines()
            .any(|l| l.contains("INFO") && l.contains("logged-device") && l.ends_with(what))
    };
    assert!(said(&loud, " connected") || loud.log().contains("connected client=logged-device"));
    assert!(loud.log().contains("disconnected"), "{}", loud.log());
    assert!(!said(&quiet, " connected") && !quiet.log().contains("disconnected"));
}

#[tokio::test]
async fn delivery_latency_by_replay_and_redeliveries() {
    let b = Broker::start("").await;
    let live = "herald_delivery_latency_seconds_count{path=\"local\",replay=\"false\"}";
    let replay = "herald_delivery_latency_seconds_count{path=\"local\",replay=\"true\"}";
    let mut dev = device(b.addr(), "lat-dev").await;
    let mut publisher = Raw::connect(b.addr(), "lat-pub").await;

    // Live: delivered and acknowledged on the connection it was stored for.
    publisher
        .publish("push/lat-dev", b"live", QoS::AtLeastOnce, false)
        .await;
    let p = next_publish(&mut dev).await;
    dev.puback(p.pkid).await;
    b.assert_metric(live, 1.0).await;

    // Stored while the device is away: a replay on its next connection. The first copy
    // goes unacknowledged, so the one after that is a redelivery (DUP).
    dev.disconnect().await;
    b.wait_connections(1).await;
    publisher
        .publish("push/lat-dev", b"stored", QoS::AtLeastOnce, false)
        .await;
    let (mut dev, _) = Raw::connect_ok(b.addr(), &Opts::new("lat-dev").clean(false)).await;
    let first = next_publish(&mut dev).await;
    assert!(!first.dup);
    drop(dev);
    b.wait_connections(1).await;
    let (mut dev, _) = Raw::connect_ok(b.addr(), &Opts::new("lat-dev").clean(false)).await;
    let again = next_publish(&mut dev).await;
    assert!(again.dup, "the resend carries DUP");
    dev.puback(again.pkid).await;
    b.assert_metric(replay, 1.0).await;
    b.assert_metric(live, 1.0).await;
    b.assert_metric("herald_messages_redelivered_total", 1.0)
        .await;
    let sum = b
        .metric("herald_delivery_latency_seconds_sum{path=\"local\",replay=\"true\"}")
        .await;
    assert!(sum > 0.0 && sum < 60.0, "replay latency sum {sum}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_hung_redis() {
    let redis = RedisServer::start();
    let how = Launch {
        redis_url: Some(redis.url()),
        ..Launch::default()
    };
    let b = Broker::launch("", how).await;
    wait_ready_status(&b, 200, WAIT).await;
    // A Redis that hangs with no traffic flowing: only the active probe can see it.
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &redis.pid().to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    let hung = tokio::time::Instant::now();
    wait_ready_status(&b, 503, Duration::from_secs(6)).await;
    println!("readyz 503 {:?} after Redis hung", hung.elapsed());
    let (_, why) = http(b.metrics_addr(), "GET", "/readyz").await;
    assert!(why.contains("store down"), "{why}");
    let resumed = std::process::Command::new("kill")
        .args(["-CONT", &redis.pid().to_string()])
        .status()
        .expect("kill -CONT");
    assert!(resumed.success());
    wait_ready_status(&b, 200, Duration::from_secs(15)).await;
    b.assert_metric("herald_store_up", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_gauges_come_from_the_store_sample() {
    let redis = RedisServer::start();
    let launch = || Launch {
        redis_url: Some(redis.url()),
        ..Launch::default()
    };
    let a = Broker::launch("", launch()).await;
    // A persistent session that went away with two messages queued.
    let dev = device(a.addr(), "sampled-dev").await;
    dev.disconnect().await;
    a.wait_connections(0).await;
    let mut publisher = Raw::connect(a.addr(), "sampled-pub").await;
    for m in [&b"one"[..], b"two"] {
        publisher
            .publish("push/sampled-dev", m, QoS::AtLeastOnce, false)
            .await;
    }
    publisher.disconnect().await;
    // `a` sampled when it started and holds the lease for this interval: the next node
    // to start takes it once it is gone, and samples at once.
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("DEL")
        .arg(herald::redis::keys::SAMPLE_LEASE)
        .query_async(&mut conn)
        .await
        .expect("DEL lease");
    let b = Broker::launch("", launch()).await;
    b.assert_metric("herald_outbox_messages", 2.0).await;
    b.assert_metric("herald_sessions{state=\"offline\"}", 1.0)
        .await;
    let age = b.metric("herald_outbox_oldest_age_seconds").await;
    assert!(age > 0.0 && age < 60.0, "oldest age {age}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_drains_over_http_and_exits_zero() {
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = "[cluster]\ndrain_duration = \"1s\"\n";
    let node = |id: &str| Launch {
        name: Some(id.into()),
        args: vec![
            "--cluster-listen".into(),
            "127.0.0.1:0".into(),
            "--node-id".into(),
            id.into(),
        ],
        redis_url: Some(redis.url()),
        dir: Some(dir.path().to_path_buf()),
        ..Launch::default()
    };
    let a = Broker::launch(config, node("drain-a")).await;
    let mut b = Broker::launch(config, node("drain-b")).await;
    wait_ready_status(&b, 200, WAIT).await;

    // Hop 1 on a, hop 2 on b: the forwarded path of the latency. A connection's first
    // entry is read from the outbox (no cursor yet to check a hint against: local); the
    // next one, in order, is the forwarded message itself.
    let mut devices = Vec::new();
    for i in 0..10 {
        devices.push(device(b.addr(), &format!("drain-dev-{i}")).await);
    }
    let mut publisher = Raw::connect(a.addr(), "drain-pub").await;
    for m in [&b"first"[..], b"second"] {
        publisher
            .publish("push/drain-dev-0", m, QoS::AtLeastOnce, false)
            .await;
        let p = next_publish(&mut devices[0]).await;
        assert_eq!(&p.payload[..], m);
        devices[0].puback(p.pkid).await;
    }
    b.assert_metric(
        "herald_delivery_latency_seconds_count{path=\"forwarded\",replay=\"false\"}",
        1.0,
    )
    .await;
    b.wait_metric("herald_cluster_peers", 1.0).await;
    // A link to every live peer, dialled before any forward needs it: b has forwarded
    // nothing to a.
    b.wait_metric("herald_cluster_links_up", 1.0).await;
    b.assert_metric("herald_cluster_forwards_total{kind=\"push\"}", 0.0)
        .await;

    let started = tokio::time::Instant::now();
    let (code, body) = http(b.metrics_addr(), "POST", "/admin/drain").await;
    assert_eq!(code, 202, "{body}");
    let (code, why) = http(b.metrics_addr(), "GET", "/readyz").await;
    assert_eq!(code, 503);
    assert!(why.contains("draining"), "{why}");
    // Every device is closed, in batches over the drain (not all at once).
    let watchers: Vec<_> = devices
        .into_iter()
        .map(|mut d| tokio::spawn(async move { d.closed_within(Duration::from_secs(10)).await }))
        .collect();
    let mut closed = Vec::new();
    for w in watchers {
        closed.push(w.await.expect("watcher").expect("closed by the drain"));
    }
    closed.sort();
    let spread = closed[closed.len() - 1] - closed[0];
    assert!(
        spread >= Duration::from_millis(300),
        "closed within {spread:?}: one storm"
    );
    let status = b
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("b exits after its drain");
    assert!(status.success(), "{status}");
    println!(
        "drained in {:?}, closes spread over {spread:?}",
        started.elapsed()
    );
    // b's devices come back on a: their sessions and routes are intact.
    let (mut dev, present) =
        Raw::connect_ok(a.addr(), &Opts::new("drain-dev-3").clean(false)).await;
    assert!(present, "the session survived the drain");
    publisher
        .publish("push/drain-dev-3", b"after", QoS::AtLeastOnce, false)
        .await;
    let p = next_publish(&mut dev).await;
    assert_eq!(&p.payload[..], b"after");
    let mut conn = redis.conn().await;
    assert_eq!(
        common::process::route_node(&mut conn, "drain-dev-3")
            .await
            .as_deref(),
        Some("drain-a")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cuts_the_drain_short() {
    let redis = RedisServer::start();
    let how = Launch {
        args: vec![
            "--cluster-listen".into(),
            "127.0.0.1:0".into(),
            "--node-id".into(),
            "impatient".into(),
        ],
        redis_url: Some(redis.url()),
        ..Launch::default()
    };
    let mut b = Broker::launch("[cluster]\ndrain_duration = \"60s\"\n", how).await;
    let mut devices = Vec::new();
    for i in 0..20 {
        devices.push(device(b.addr(), &format!("impatient-dev-{i}")).await);
    }
    let term = || {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &b.pid().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(ok.success());
    };
    term();
    // The drain has begun (a minute of it): not ready any more.
    wait_ready_status(&b, 503, WAIT).await;
    let second = tokio::time::Instant::now();
    term();
    let status = b
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the second SIGTERM ends the process at once");
    println!("exited {:?} after the second SIGTERM", second.elapsed());
    assert!(!status.success(), "cut short: {status}");
    assert!(b.log().contains("second stop signal"), "{}", b.log());
}
