//! The Redis outbox against a private redis-server (no persistence) on a free loopback
//! port, one per test.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::AsyncCommands;

use super::*;
use crate::outbox::{Enqueued, Limits, RouteHint};

/// `RedisOutbox::enqueue` without the route: submitted at call time, like the original.
fn put(
    store: &RedisOutbox,
    client: &Arc<str>,
    qos: Qos,
    msg: &Arc<Message>,
) -> impl std::future::Future<Output = Result<Enqueued, StoreError>> {
    let f = store.enqueue(client, qos, msg);
    async move { f.await.map(|(e, _)| e) }
}

#[test]
fn members_carry_their_sequence_number() {
    let m = Message {
        topic: "push/d|1".into(),
        payload: Bytes::from_static(b"a|b\0c"),
        qos: Qos::ExactlyOnce,
        retain: true,
        expires_at: 12345,
        born_us: 0,
        forwarded: false,
    };
    let mut member = b"42|".to_vec();
    member.extend(m.envelope(m.qos));
    assert_eq!(decode_member(member), Some((42, m)));
    assert_eq!(decode_member(b"x|\x01".to_vec()), None);
}

/// A private redis-server (no persistence) on a free loopback port, killed on drop.
struct TestRedis {
    child: std::process::Child,
    port: u16,
}

impl TestRedis {
    fn start() -> TestRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server in PATH");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server not up");
            std::thread::sleep(Duration::from_millis(10));
        }
        TestRedis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A plain connection, to set up or inspect keys behind the store's back.
    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn msg(payload: &'static [u8]) -> Arc<Message> {
    Arc::new(Message {
        topic: "push/x".into(),
        payload: Bytes::from_static(payload),
        qos: Qos::AtLeastOnce,
        retain: false,
        expires_at: 0,
        born_us: 0,
        forwarded: false,
    })
}

async fn outbox(redis: &TestRedis, overflow: OverflowPolicy) -> RedisOutbox {
    outbox_with(redis, overflow, false).await
}

async fn outbox_with(redis: &TestRedis, overflow: OverflowPolicy, routes: bool) -> RedisOutbox {
    let limits = Limits {
        max_queued: 2,
        max_queued_bytes: 1 << 20,
        overflow,
        max_total: 0,
        max_total_bytes: 0,
    };
    outbox_limits(redis, limits, routes).await
}

async fn outbox_limits(redis: &TestRedis, limits: Limits, routes: bool) -> RedisOutbox {
    let redis = Redis::connect(&redis.url(), None).await.unwrap();
    RedisOutbox::open(redis, limits, Duration::from_secs(60), 0, routes)
}

/// A cluster node reads each receiver's route with its enqueue: present, absent, and a
/// failing client in the same script call.
#[tokio::test]
async fn routed_enqueue_returns_the_route_read_after_the_store() {
    let redis = TestRedis::start();
    let store = outbox_with(&redis, OverflowPolicy::DropOldest, true).await;
    let mut raw = redis.conn().await;
    let _: () = raw
        .hset_multiple(
            keys::client(Client::Route, "a"),
            &[("node", "n1"), ("inc", "42"), ("epoch", "3")],
        )
        .await
        .unwrap();
    let _: () = raw
        .set(keys::client(Client::Outbox, "bad"), "x")
        .await
        .unwrap();
    let (a, b, bad): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "bad".into());
    let calls = [
        store.enqueue(&a, Qos::AtLeastOnce, &msg(b"1")),
        store.enqueue(&bad, Qos::AtLeastOnce, &msg(b"x")),
        store.enqueue(&b, Qos::AtLeastOnce, &msg(b"2")),
    ];
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await);
    }
    let hint = RouteHint {
        node: "n1".into(),
        inc: 42,
    };
    assert_eq!(
        results[0].as_ref().unwrap(),
        &(Enqueued::Stored(1), Some(hint))
    );
    assert!(results[1].is_err(), "{:?}", results[1]);
    assert_eq!(results[2].as_ref().unwrap(), &(Enqueued::Stored(1), None));
}

/// Enqueues submitted together share one script call: a failing client (a key of the
/// wrong type) fails alone, the cap applies message by message, and each outbox gets
/// its TTL.
#[tokio::test]
async fn one_batch_keeps_per_message_semantics() {
    let redis = TestRedis::start();
    let store = outbox(&redis, OverflowPolicy::DropOldest).await;
    let mut raw = redis.conn().await;
    let _: () = raw
        .set(keys::client(Client::Outbox, "bad"), "x")
        .await
        .unwrap();
    let (a, bad): (Arc<str>, Arc<str>) = ("a".into(), "bad".into());
    // Submitted before any is awaited: one pipeline, one script call.
    let calls = [
        put(&store, &a, Qos::AtLeastOnce, &msg(b"1")),
        put(&store, &bad, Qos::AtLeastOnce, &msg(b"x")),
        put(&store, &a, Qos::AtLeastOnce, &msg(b"2")),
        put(&store, &a, Qos::AtLeastOnce, &msg(b"3")),
    ];
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await);
    }
    assert!(matches!(results[0], Ok(Enqueued::Stored(1))));
    assert!(results[1].is_err(), "{:?}", results[1]);
    assert!(matches!(results[2], Ok(Enqueued::Stored(2))));
    assert!(matches!(results[3], Ok(Enqueued::Stored(3))));
    // Cap 2, drop oldest: 1 went.
    let left: Vec<u64> = store
        .fetch("a", 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, [2, 3]);
    let ttl: i64 = raw.pttl(keys::client(Client::Outbox, "a")).await.unwrap();
    assert!(ttl > 50_000, "outbox TTL {ttl}");
    // An error reply of one command is not an outage.
    assert!(store.redis.health().check().is_ok());
    assert!(matches!(
        put(&store, &a, Qos::AtLeastOnce, &msg(b"4")).await,
        Ok(Enqueued::Stored(4))
    ));
}

#[tokio::test]
async fn drop_new_rejects_without_a_sequence_number() {
    let redis = TestRedis::start();
    let store = outbox(&redis, OverflowPolicy::DropNew).await;
    let a: Arc<str> = "a".into();
    let calls = [
        put(&store, &a, Qos::AtLeastOnce, &msg(b"1")),
        put(&store, &a, Qos::AtLeastOnce, &msg(b"2")),
        put(&store, &a, Qos::AtLeastOnce, &msg(b"3")),
    ];
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    assert_eq!(
        results,
        [Enqueued::Stored(1), Enqueued::Stored(2), Enqueued::Rejected]
    );
    store.ack(&a, 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.len("a").await.unwrap() != 1 {
        assert!(std::time::Instant::now() < deadline, "ack not applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        put(&store, &a, Qos::AtLeastOnce, &msg(b"4")).await.unwrap(),
        Enqueued::Stored(3)
    );
}

async fn seqs(store: &RedisOutbox, client: &str) -> Vec<u64> {
    let entries = store.fetch(client, 0, 100).await.unwrap();
    entries.iter().map(|e| e.seq).collect()
}

/// `session.max_queued_bytes` on Redis: the oldest give way (or the newest is refused),
/// acknowledged entries stop counting once the running count is recounted.
#[tokio::test]
async fn byte_budget_per_client() {
    let redis = TestRedis::start();
    let kib: &'static [u8] = &[b'x'; 1000];
    // Each envelope is 13 + 6 (topic) + 1000 bytes: three fit in 3100.
    let limits = |overflow| Limits {
        max_queued: 100,
        max_queued_bytes: 3100,
        overflow,
        max_total: 0,
        max_total_bytes: 0,
    };
    let store = outbox_limits(&redis, limits(OverflowPolicy::DropOldest), false).await;
    let a: Arc<str> = "a".into();
    for _ in 0..5 {
        put(&store, &a, Qos::AtLeastOnce, &msg(kib)).await.unwrap();
    }
    assert_eq!(seqs(&store, "a").await, [3, 4, 5]);
    for seq in [3, 4, 5] {
        store.ack(&a, seq).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.len("a").await.unwrap() != 0 {
        assert!(std::time::Instant::now() < deadline, "acks not applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The running count still says 3 KB; the recount finds the outbox empty.
    for _ in 0..3 {
        put(&store, &a, Qos::AtLeastOnce, &msg(kib)).await.unwrap();
    }
    assert_eq!(seqs(&store, "a").await, [6, 7, 8]);
    drop(store);

    let redis = TestRedis::start();
    let store = outbox_limits(&redis, limits(OverflowPolicy::DropNew), false).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(put(&store, &a, Qos::AtLeastOnce, &msg(kib)).await.unwrap());
    }
    assert_eq!(
        got,
        [
            Enqueued::Stored(1),
            Enqueued::Stored(2),
            Enqueued::Stored(3),
            Enqueued::Rejected
        ]
    );
    // A clean session starts from nothing, and leaves no per-client key but the
    // sequence counter.
    let mut raw = redis.conn().await;
    let _: () = raw.set(keys::client(Client::Sent, "a"), 2).await.unwrap();
    store.attach("a", true).await.unwrap();
    let mut left: Vec<String> = raw.keys("herald:*{a}").await.unwrap();
    left.sort();
    assert_eq!(left, [keys::client(Client::Seq, "a")]);
}

/// The sent watermark covers every number written and not acknowledged.
#[tokio::test]
async fn sent_watermark_skips_numbers_acknowledged_with_it() {
    let redis = TestRedis::start();
    let store = outbox(&redis, OverflowPolicy::DropOldest).await;
    let mut raw = redis.conn().await;
    let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
    // Queued before the writer runs: one batch. a: 5 and 7 acknowledged, 6 not; b: all.
    for (c, seq) in [(&a, 5), (&a, 6), (&a, 7), (&b, 9)] {
        store.mark_sent(c, seq).await;
    }
    for (c, seq) in [(&a, 5), (&a, 7), (&b, 9)] {
        store.ack(c, seq).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let sent: Option<u64> = raw.get(keys::client(Client::Sent, "a")).await.unwrap();
        if let Some(sent) = sent {
            assert_eq!(sent, 6);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "watermark not written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b_sent: Option<u64> = raw.get(keys::client(Client::Sent, "b")).await.unwrap();
    assert_eq!(b_sent, None);
}
