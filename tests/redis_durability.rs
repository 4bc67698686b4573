//! Durability with `--store redis`: real `herald` and `redis-server` processes, killed with
//! SIGKILL. What a publisher saw acknowledged must reach the device, in order.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::process::{self, Herald, RedisServer};
use common::{text, wait_until, ConnectReturnCode, Opts, Packet, QoS, Raw, WAIT};

/// Publishes `n` QoS 1 messages "0".."n-1" to `topic`, pipelined, and waits for every PUBACK.
async fn publish_acked(addr: SocketAddr, topic: &str, n: usize) {
    let mut publisher = Raw::connect(addr, "backend").await;
    let mut unacked = std::collections::HashSet::new();
    for i in 0..n {
        let pkid = publisher
            .send_publish(topic, i.to_string().as_bytes(), QoS::AtLeastOnce, false)
            .await;
        unacked.insert(pkid);
    }
    while !unacked.is_empty() {
        match publisher.expect(Duration::from_secs(5)).await {
            Packet::PubAck(a) => assert!(unacked.remove(&a.pkid), "stray PUBACK {}", a.pkid),
            p => panic!("publisher got {p:?}"),
        }
    }
    publisher.disconnect().await;
}

/// Connects `id` with a persistent session and receives `n` messages, acking each; asserts
/// they are "0".."n-1" in order.
async fn receive_in_order(device: &mut Raw, n: usize) {
    for i in 0..n {
        let p = device.expect_publish().await;
        assert_eq!(text(&p), i.to_string(), "message {i} out of order");
        device.puback(p.pkid).await;
    }
}

/// Retries CONNECT until the broker accepts it (it refuses with rc 3 while Redis is down).
async fn connect_when_available(addr: SocketAddr, opts: &Opts, within: Duration) -> Raw {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            let mut c = Raw::from_stream(stream).await;
            if c.send_raw(&opts.encode()).await.is_ok() {
                if let common::Event::Packet(Packet::ConnAck(a)) = c.next(WAIT).await {
                    if a.code == ConnectReturnCode::Success {
                        return c;
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "broker did not accept {} in time",
            opts.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register_offline_device(addr: SocketAddr, id: &str) {
    let (device, present) = Raw::connect_ok(addr, &Opts::new(id).clean(false)).await;
    assert!(!present);
    device.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_kill_9_of_herald() {
    let redis = RedisServer::start();
    let mut herald = Herald::start(&redis.url(), &[]);
    register_offline_device(herald.addr, "dev1").await;
    publish_acked(herald.addr, "push/dev1", 1000).await;

    herald.kill();
    herald.restart();

    let (mut device, present) = Raw::connect_ok(herald.addr, &Opts::new("dev1").clean(false)).await;
    assert!(present, "the persistent session must survive the restart");
    receive_in_order(&mut device, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_a_redis_restart() {
    let mut redis = RedisServer::start();
    let herald = Herald::start(&redis.url(), &[]);
    register_offline_device(herald.addr, "dev2").await;
    publish_acked(herald.addr, "push/dev2", 200).await;

    redis.kill();
    redis.restart();

    let opts = Opts::new("dev2").clean(false);
    let mut device = connect_when_available(herald.addr, &opts, Duration::from_secs(10)).await;
    receive_in_order(&mut device, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_refuses_connects_keeps_old_ones_and_recovers() {
    let mut redis = RedisServer::start();
    let herald = Herald::start(&redis.url(), &[]);
    register_offline_device(herald.addr, "dev3").await;
    publish_acked(herald.addr, "push/dev3", 10).await;
    let mut idle = Raw::connect(herald.addr, "idle-device").await;
    let mut backend = Raw::connect(herald.addr, "backend2").await;

    redis.kill();

    // A QoS 1 publish that cannot be stored is not acknowledged: the connection is closed
    // so the client resends after reconnecting.
    backend
        .send_publish("push/dev3", b"unstored", QoS::AtLeastOnce, false)
        .await;
    backend.expect_closed(Duration::from_secs(5)).await;

    // New clients are refused with "server unavailable", at once.
    let started = Instant::now();
    let (_, ack) = Raw::connect_with(herald.addr, &Opts::new("dev3").clean(false)).await;
    assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refusal took {:?}",
        started.elapsed()
    );

    // Connections that do not need Redis keep working.
    idle.ping().await;

    redis.restart();
    let opts = Opts::new("dev3").clean(false);
    let mut device = connect_when_available(herald.addr, &opts, Duration::from_secs(10)).await;
    receive_in_order(&mut device, 10).await;
    idle.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_retained_survive_restart() {
    let redis = RedisServer::start();
    let mut herald = Herald::start(&redis.url(), &[]);
    let (mut sub, _) = Raw::connect_ok(herald.addr, &Opts::new("watcher").clean(false)).await;
    sub.sub("news/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut p = Raw::connect(herald.addr, "pub").await;
    p.publish("cfg/a", b"retained-a", QoS::AtLeastOnce, true)
        .await;
    p.disconnect().await;

    herald.kill();
    herald.restart();

    let mut p = Raw::connect(herald.addr, "pub").await;
    p.publish("news/x", b"while-offline", QoS::AtLeastOnce, false)
        .await;
    let (mut sub, present) = Raw::connect_ok(herald.addr, &Opts::new("watcher").clean(false)).await;
    assert!(present);
    let got = sub.expect_publish().await;
    assert_eq!(
        (got.topic.as_str(), text(&got).as_str()),
        ("news/x", "while-offline")
    );

    let mut late = Raw::connect(herald.addr, "late").await;
    late.sub("cfg/#", QoS::AtLeastOnce).await;
    let r = late.expect_publish().await;
    assert!(r.retain);
    assert_eq!(text(&r), "retained-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_after_crash_has_dup_and_same_packet_id() {
    let redis = RedisServer::start();
    let mut herald = Herald::start(&redis.url(), &[]);
    let (mut device, _) = Raw::connect_ok(herald.addr, &Opts::new("dev4").clean(false)).await;
    let mut p = Raw::connect(herald.addr, "pub").await;
    p.publish("push/dev4", b"first", QoS::AtLeastOnce, false)
        .await;
    let first = device.expect_publish().await;
    assert!(!first.dup);
    // Not acknowledged. Stored while the device was connected: no watermark is needed,
    // the entry itself says it may have been sent.
    herald.kill();
    herald.restart();

    let (mut device, _) = Raw::connect_ok(herald.addr, &Opts::new("dev4").clean(false)).await;
    let again = device.expect_publish().await;
    assert_eq!(text(&again), "first");
    assert!(again.dup, "a resend must carry DUP=1");
    assert_eq!(again.pkid, first.pkid, "a resend keeps its packet id");
    // A message stored after this connection started is its own: DUP=0 first.
    p = Raw::connect(herald.addr, "pub").await;
    p.publish("push/dev4", b"second", QoS::AtLeastOnce, false)
        .await;
    let second = device.expect_publish().await;
    assert_eq!(text(&second), "second");
    assert!(!second.dup, "a first delivery carries DUP=0");
}

/// A message queued while the device was away goes out from the outbox after the sent
/// watermark is written; after a crash it comes again with DUP=1, and one queued and never
/// sent comes with DUP=0.
#[tokio::test]
async fn redelivery_of_a_message_queued_offline_has_dup() {
    let redis = RedisServer::start();
    let mut herald = Herald::start(&redis.url(), &[]);
    let mut conn = redis.conn().await;
    // A push to a device that has not connected yet is queued for it.
    let mut p = Raw::connect(herald.addr, "pub").await;
    p.publish("push/dev5", b"queued", QoS::AtLeastOnce, false)
        .await;
    let (mut device, _) = Raw::connect_ok(herald.addr, &Opts::new("dev5").clean(false)).await;
    let first = device.expect_publish().await;
    assert_eq!(text(&first), "queued");
    assert!(!first.dup);
    wait_until(WAIT, "the sent watermark is written", async || {
        process::sent_watermark(&mut conn, "dev5").await.is_some()
    })
    .await;
    drop(device);
    herald.kill();
    herald.restart();
    let mut p = Raw::connect(herald.addr, "pub").await;
    p.publish("push/dev5", b"later", QoS::AtLeastOnce, false)
        .await;
    let (mut device, _) = Raw::connect_ok(herald.addr, &Opts::new("dev5").clean(false)).await;
    let again = device.expect_publish().await;
    assert_eq!(text(&again), "queued");
    assert!(again.dup, "a resend must carry DUP=1");
    assert_eq!(again.pkid, first.pkid);
    let later = device.expect_publish().await;
    assert_eq!(text(&later), "later");
    assert!(!later.dup, "never sent before: DUP=0");
}

#[test]
fn herald_exits_when_redis_is_unreachable_at_start() {
    let port = process::free_port();
    let out = std::process::Command::new(Herald::binary())
        .args(["--listen", "127.0.0.1:0", "--store", "redis", "--redis-url"])
        .arg(format!("redis://127.0.0.1:{port}/0"))
        .output()
        .expect("run herald");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&port.to_string()),
        "stderr should name the redis address: {err}"
    );
}

/// Polls `query` on the Redis at `port` until `done` holds for its answer.
async fn wait_redis<T: redis::FromRedisValue + std::fmt::Debug>(
    port: u16,
    query: redis::Cmd,
    done: impl Fn(&T) -> bool,
) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // A new connection each time: a failover kills the clients of the promoted replica.
        let got = match client.get_multiplexed_async_connection().await {
            Ok(mut conn) => query.query_async::<T>(&mut conn).await,
            Err(e) => Err(e),
        };
        if matches!(&got, Ok(v) if done(v)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis on {port} never reached the expected state: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_acknowledged_messages() {
    // Diskless sync normally waits 5 s for more replicas before it starts.
    let mut master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start_replica_of(master.port);
    let mut info = redis::cmd("INFO");
    info.arg("replication");
    wait_redis::<String>(master.port, info, |r| r.contains("state=online")).await;
    let sentinel = process::Sentinel::start(master.port, "herald");
    let mut replicas = redis::cmd("SENTINEL");
    replicas.arg("replicas").arg("herald");
    wait_redis::<Vec<redis::Value>>(sentinel.port, replicas, |r| r.len() == 1).await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, "[store]\nredis_wait_replicas = 1\n").unwrap();
    let url = format!("redis+sentinel://127.0.0.1:{}/herald", sentinel.port);
    let herald = Herald::start(&url, &["--config", config.to_str().unwrap()]);
    register_offline_device(herald.addr, "dev5").await;
    publish_acked(herald.addr, "push/dev5", 100).await;

    master.kill();
    let mut info = redis::cmd("INFO");
    info.arg("replication");
    wait_redis::<String>(replica.port, info, |r| r.contains("role:master")).await;

    let opts = Opts::new("dev5").clean(false);
    let mut device = connect_when_available(herald.addr, &opts, Duration::from_secs(15)).await;
    receive_in_order(&mut device, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_interrupted_by_an_outage_resumes_on_the_same_connection() {
    let mut redis = RedisServer::start();
    let herald = Herald::start(&redis.url(), &[]);
    register_offline_device(herald.addr, "dev7").await;
    publish_acked(herald.addr, "push/dev7", 100).await;

    // The first window (32) arrives; Redis goes away before the device acknowledges it, so
    // reading the next window fails.
    let (mut device, _) = Raw::connect_ok(herald.addr, &Opts::new("dev7").clean(false)).await;
    let mut first = Vec::new();
    for _ in 0..32 {
        first.push(device.expect_publish().await);
    }
    redis.kill();
    for p in &first {
        device.puback(p.pkid).await;
    }
    // The connection stays up through the outage...
    device.ping().await;

    redis.restart();
    // ...and the rest of the queue follows on it once Redis is back, in order.
    for i in 32..100 {
        let p = match device.expect(Duration::from_secs(10)).await {
            Packet::Publish(p) => p,
            other => panic!("expected message {i}, got {other:?}"),
        };
        assert_eq!(text(&p), i.to_string(), "message {i} out of order");
        device.puback(p.pkid).await;
    }
}

/// A Redis that may lose its last writes when killed (`appendfsync everysec`) may come back
/// without entries a device read, and number new entries with their numbers: the device's
/// connection through the restart is ended at its next PUBACK rather than let that PUBACK
/// delete a newer entry (with `appendfsync always`, the replay above goes on instead).
/// After reconnecting, everything acknowledged to the publisher since arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_may_lose_writes_ends_connections_that_read_before_it() {
    let mut redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let herald = Herald::start(&redis.url(), &[]);
    register_offline_device(herald.addr, "dev9").await;
    publish_acked(herald.addr, "push/dev9", 1).await;
    let opts = Opts::new("dev9").clean(false);
    let (mut device, _) = Raw::connect_ok(herald.addr, &opts).await;
    let read = device.expect_publish().await;
    redis.kill();
    redis.restart();
    // Its PUBACK finds the store gone (or, once Herald has seen the restart, ends the
    // connection).
    let _ = device
        .send_raw(&common::frame(0x40, &read.pkid.to_be_bytes()))
        .await;
    for payload in ["after-0", "after-1"] {
        wait_until(WAIT, "a push acknowledged after the restart", async || {
            let Ok(stream) = tokio::net::TcpStream::connect(herald.addr).await else {
                return false;
            };
            let mut publisher = Raw::from_stream(stream).await;
            if publisher.send_raw(&Opts::new("backend9").encode()).await.is_err() {
                return false;
            }
            if !matches!(publisher.next(WAIT).await, common::Event::Packet(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success)
            {
                return false;
            }
            publisher
                .send_publish("push/dev9", payload.as_bytes(), QoS::AtLeastOnce, false)
                .await;
            matches!(publisher.next(WAIT).await, common::Event::Packet(Packet::PubAck(_)))
        })
        .await;
    }
    // The old connection ends at the latest when it acknowledges what it gets now.
    let deadline = Instant::now() + WAIT;
    loop {
        match device
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            common::Event::Closed => break,
            common::Event::Packet(Packet::Publish(p)) => {
                let _ = device
                    .send_raw(&common::frame(0x40, &p.pkid.to_be_bytes()))
                    .await;
            }
            e => panic!("expected the connection through the restart to end, got {e:?}"),
        }
    }
    let (mut device, _) = Raw::connect_ok(herald.addr, &opts).await;
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("after-1") {
        let p = device.expect_publish().await;
        device.puback(p.pkid).await;
        got.push(text(&p));
    }
    assert!(got.contains(&"after-0".to_string()), "got {got:?}");
}
