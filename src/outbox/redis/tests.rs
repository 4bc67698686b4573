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
    let f = store.enqueue(client, qos, msg, false);
    async move { f.await.map(|s| s.outcome) }
}

/// Sequence numbers start from Redis's clock: results as offsets from `base`.
fn offsets(got: &[Enqueued], base: u64) -> Vec<Option<u64>> {
    got.iter()
        .map(|e| match e {
            Enqueued::Stored(seq) => Some(seq - base),
            Enqueued::Rejected => None,
        })
        .collect()
}

fn seq(e: &Enqueued) -> u64 {
    match e {
        Enqueued::Stored(seq) => *seq,
        Enqueued::Rejected => panic!("rejected"),
    }
}

#[test]
fn entries_carry_their_sequence_number_and_liveness() {
    let m = Message {
        topic: "push/d|1".into(),
        payload: Bytes::from_static(b"a|b\0c"),
        qos: Qos::ExactlyOnce,
        retain: true,
        expires_at: 12345,
        born_us: 0,
        forwarded: false,
        receipt: false,
    };
    let entry =
        |id: &str, field: &[u8]| (id.to_string(), vec![(field.to_vec(), m.envelope(m.qos))]);
    assert_eq!(
        decode_entry(entry("0-42", b"l")),
        Some((42, true, m.clone()))
    );
    assert_eq!(
        decode_entry(entry("0-43", b"d")),
        Some((43, false, m.clone()))
    );
    assert_eq!(decode_entry(entry("7-43", b"d")), None);
    assert_eq!(
        decode_entry(("0-1".into(), vec![(b"d".to_vec(), b"\x01".to_vec())])),
        None
    );
    let mut b = bytes::BytesMut::new();
    writer::put_id(&mut b, 1_796_186_186_703_025);
    assert_eq!(&b[..], b"$18\r\n0-1796186186703025\r\n");
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
        receipt: false,
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
    let notes = super::notes::Notes {
        hook_sha: redis.scripts().hook.get_hash().to_string(),
        ttl_ms: 86_400_000,
        hook: None,
    };
    RedisOutbox::open(
        redis,
        limits,
        Duration::from_secs(60),
        0,
        routes,
        2048,
        notes,
        false,
    )
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
        store.enqueue(&a, Qos::AtLeastOnce, &msg(b"1"), false),
        store.enqueue(&bad, Qos::AtLeastOnce, &msg(b"x"), false),
        store.enqueue(&b, Qos::AtLeastOnce, &msg(b"2"), false),
    ];
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await);
    }
    let hint = RouteHint {
        node: "n1".into(),
        inc: 42,
    };
    // A route means a live connection somewhere: stored live.
    let first = results[0].as_ref().unwrap();
    assert_eq!((&first.route, first.live), (&Some(hint), true));
    assert!(results[1].is_err(), "{:?}", results[1]);
    let third = results[2].as_ref().unwrap();
    assert_eq!((&third.route, third.live), (&None, false));
    let entries = store.fetch("a", 0, 10).await.unwrap();
    assert!(entries[0].live);
    assert!(!store.fetch("b", 0, 10).await.unwrap()[0].live);
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
    assert!(results[1].is_err(), "{:?}", results[1]);
    let base = seq(results[0].as_ref().unwrap());
    let got: Vec<Enqueued> = [0, 2, 3]
        .iter()
        .map(|&i| *results[i].as_ref().unwrap())
        .collect();
    assert_eq!(offsets(&got, base), [Some(0), Some(1), Some(2)]);
    // Cap 2, drop oldest: the first went.
    assert_eq!(seqs(&store, "a").await, [base + 1, base + 2]);
    // The key outlives its newest message by the TTL (60 s) at least.
    let ttl: i64 = raw.pttl(keys::client(Client::Outbox, "a")).await.unwrap();
    assert!(ttl > 60_000, "outbox TTL {ttl}");
    // An error reply of one command is not an outage.
    assert!(store.redis.health().check().is_ok());
    assert_eq!(
        put(&store, &a, Qos::AtLeastOnce, &msg(b"4")).await.unwrap(),
        Enqueued::Stored(base + 3)
    );
    // Later batches know the outbox is full without being told: the cap holds.
    for _ in 0..10 {
        put(&store, &a, Qos::AtLeastOnce, &msg(b"5")).await.unwrap();
    }
    assert_eq!(seqs(&store, "a").await, [base + 12, base + 13]);
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
    let base = seq(&results[0]);
    assert_eq!(offsets(&results, base), [Some(0), Some(1), None]);
    assert!(store.ack(&a, base, store.lineage("a")).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.len("a").await.unwrap() != 1 {
        assert!(std::time::Instant::now() < deadline, "ack not applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The refused message used up its number.
    assert_eq!(
        put(&store, &a, Qos::AtLeastOnce, &msg(b"4")).await.unwrap(),
        Enqueued::Stored(base + 3)
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
    // Each envelope is 21 + 6 (topic) + 1000 bytes: three fit in 3100.
    let limits = |overflow| Limits {
        max_queued: 100,
        max_queued_bytes: 3100,
        overflow,
        max_total: 0,
        max_total_bytes: 0,
    };
    let store = outbox_limits(&redis, limits(OverflowPolicy::DropOldest), false).await;
    let a: Arc<str> = "a".into();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(put(&store, &a, Qos::AtLeastOnce, &msg(kib)).await.unwrap());
    }
    let base = seq(&got[0]);
    assert_eq!(seqs(&store, "a").await, [base + 2, base + 3, base + 4]);
    for n in 2..5 {
        assert!(store.ack(&a, base + n, store.lineage("a")).await);
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
    assert_eq!(seqs(&store, "a").await, [base + 5, base + 6, base + 7]);
    drop(store);

    let redis = TestRedis::start();
    let store = outbox_limits(&redis, limits(OverflowPolicy::DropNew), false).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(put(&store, &a, Qos::AtLeastOnce, &msg(kib)).await.unwrap());
    }
    let base = seq(&got[0]);
    assert_eq!(offsets(&got, base), [Some(0), Some(1), Some(2), None]);
    // A persistent session's connection learns the newest entry (live ones up to it go out
    // with DUP).
    let attached = store.attach("a", false, 7).await.unwrap();
    assert_eq!(attached.replay_to, base + 2);
    // Once the connection ended and said what it wrote, the next one knows exactly; a
    // connection that is not the newest one any more says nothing.
    store.finish(&a, base + 1, 6).await;
    store.flush().await;
    assert_eq!(
        store.attach("a", false, 9).await.unwrap().replay_to,
        base + 2
    );
    store.finish(&a, base + 1, 9).await;
    store.flush().await;
    let attached = store.attach("a", false, 10).await.unwrap();
    assert_eq!((attached.sent_watermark, attached.replay_to), (base + 1, 0));
    // Taken off by that attach: a crash of connection 10 leaves it conservative again.
    let attached = store.attach("a", false, 11).await.unwrap();
    assert_eq!(
        (attached.sent_watermark, attached.replay_to),
        (base + 1, base + 2)
    );
    // A clean session starts from nothing, and leaves no per-client key.
    let mut raw = redis.conn().await;
    let _: () = raw.set(keys::client(Client::Sent, "a"), 2).await.unwrap();
    store.attach("a", true, 8).await.unwrap();
    let left: Vec<String> = raw.keys("herald:*{a}").await.unwrap();
    assert_eq!(left, Vec::<String>::new());
    // A new stream numbers above the old one.
    let again = put(&store, &a, Qos::AtLeastOnce, &msg(b"x")).await.unwrap();
    assert!(seq(&again) > base + 3, "{again:?} after {base}");
}

/// The layout before streams (a ZSET and a counter per client) moves into streams at
/// start, with the same numbers, and the next message follows them.
#[tokio::test]
async fn the_old_layout_moves_into_streams() {
    let redis = TestRedis::start();
    let mut raw = redis.conn().await;
    let member = |seq: u64, payload: &'static [u8]| {
        let mut m = format!("{seq}|").into_bytes();
        m.extend(msg(payload).envelope(Qos::AtLeastOnce));
        m
    };
    let old = keys::client(Client::LegacyOutbox, "a");
    let _: () = raw.zadd(&old, member(5, b"five"), 5).await.unwrap();
    let _: () = raw.zadd(&old, member(6, b"six"), 6).await.unwrap();
    let _: () = raw.pexpire(&old, 90_000).await.unwrap();
    let _: () = raw
        .set(keys::client(Client::LegacySeq, "a"), 6)
        .await
        .unwrap();
    let _: () = raw
        .set(keys::client(Client::LegacySeq, "gone"), 3)
        .await
        .unwrap();
    let store = outbox(&redis, OverflowPolicy::DropOldest).await;
    store.upgrade().await.unwrap();
    let entries = store.fetch("a", 0, 10).await.unwrap();
    let got: Vec<(u64, &[u8])> = entries
        .iter()
        .map(|e| (e.seq, &e.msg.payload[..]))
        .collect();
    assert_eq!(got, [(5, &b"five"[..]), (6, &b"six"[..])]);
    let a: Arc<str> = "a".into();
    assert_eq!(
        put(&store, &a, Qos::AtLeastOnce, &msg(b"7")).await.unwrap(),
        Enqueued::Stored(7)
    );
    let mut left: Vec<String> = raw.keys("herald:*").await.unwrap();
    left.sort();
    assert_eq!(
        left,
        [
            keys::client(Client::Outbox, "a"),
            keys::LAYOUT.to_string(),
            keys::client(Client::Qbytes, "a"),
        ]
    );
    let ttl: i64 = raw.pttl(keys::client(Client::Outbox, "a")).await.unwrap();
    assert!(ttl > 60_000, "TTL kept or refreshed: {ttl}");
    // Done once: the marker says so.
    let _: () = raw.zadd(&old, member(1, b"late"), 1).await.unwrap();
    store.upgrade().await.unwrap();
    let still: bool = raw.exists(&old).await.unwrap();
    assert!(still);
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
        assert!(store.ack(c, seq, store.lineage(c)).await);
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

/// The byte cap counts this writer's own messages at their size, so small pushes measure
/// the outbox only when the count cap could be near; big ones still hit the byte cap on
/// time.
#[tokio::test]
async fn own_messages_count_at_their_size() {
    let redis = TestRedis::start();
    let limits = Limits {
        max_queued: 1000,
        max_queued_bytes: 16 * 2048,
        overflow: OverflowPolicy::DropOldest,
        max_total: 0,
        max_total_bytes: 0,
    };
    let store = outbox_limits(&redis, limits, false).await;
    let a: Arc<str> = "a".into();
    for _ in 0..300 {
        put(&store, &a, Qos::AtLeastOnce, &msg(b"small"))
            .await
            .unwrap();
    }
    let mut raw = redis.conn().await;
    let xlen_calls = |info: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_xlen:calls="))
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut raw)
        .await
        .unwrap();
    // Once for the first message; 16 KB of 2 KB envelopes would have meant every 16th.
    assert_eq!(xlen_calls(&info), 1, "{info}");
    assert_eq!(store.len("a").await.unwrap(), 300);
    let big: &'static [u8] = &[b'b'; 1500];
    for _ in 0..30 {
        put(&store, &a, Qos::AtLeastOnce, &msg(big)).await.unwrap();
    }
    let entries: Vec<RawEntry> = redis::cmd("XRANGE")
        .arg(keys::client(Client::Outbox, "a"))
        .arg("-")
        .arg("+")
        .query_async(&mut raw)
        .await
        .unwrap();
    let bytes: usize = entries.iter().map(|(_, f)| f[0].1.len()).sum();
    assert!(bytes <= 16 * 2048, "{bytes} bytes kept");
    assert!(entries.len() < 330, "nothing dropped");
}
