//! Redis Cluster as Herald's store: the test cluster itself (tests/common/redis_cluster.rs),
//! the cold path (`herald::redis::Redis` on `redis+cluster://`: commands, pipelines and
//! scripts on every shard, through a failover and a slot migration with ASK then MOVED; the
//! calls for keys of many slots, `query_each`, `query_steps` and `scan`, against one
//! redis-server too) and the `herald` binary started on a cluster: persistent
//! subscriptions saved and loaded across shards, three Herald nodes sharing the store
//! (registry, QoS 0 push in two hops, interest, the sweep, a graceful stop), the store
//! sample and the layout move over every primary. Herald's keys are read back on the
//! primary of their slot (`RedisCluster::query_key`), not through Herald's client.
//!
//! Each test starts its own 6-node cluster (3 primaries, 1 replica each); without
//! redis-server and redis-cli installed each prints a SKIPPED line and passes.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::process::{free_port, Broker, Herald, Launch};
use common::redis_cluster::{RedisCluster, Setup};
use common::{text, wait_until, Event, Opts, Packet, QoS, Raw};
use herald::redis::keys::{self, Client};
use herald::redis::slots::key_slot;
use herald::redis::Redis;

/// How long a test waits for the store to follow a change of the cluster (a failover is
/// about 4 s of it). Only reached on failure.
const FOLLOW: Duration = Duration::from_secs(30);

fn cmd(args: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// One key per shard of `cluster`, `prefix` then a number, in the order of the slot
/// map's shards.
fn key_per_primary(cluster: &RedisCluster, prefix: &str) -> Vec<String> {
    let map = cluster.slot_map();
    let mut keys: Vec<Option<String>> = vec![None; map.shards().len()];
    for i in 0.. {
        let key = format!("{prefix}{i}");
        if let Some(shard) = map.shard_of_key(key.as_bytes()) {
            keys[shard].get_or_insert(key);
        }
        if keys.iter().all(Option::is_some) {
            break;
        }
    }
    keys.into_iter().flatten().collect()
}

async fn get(redis: &Redis, key: &str) -> Option<String> {
    redis
        .query(&cmd(&["GET", key]))
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

async fn set(redis: &Redis, key: &str, value: &str) {
    let _: () = redis
        .query(&cmd(&["SET", key, value]))
        .await
        .unwrap_or_else(|e| panic!("SET {key}: {e}"));
}

/// Whether the replica `node` has `key` = `value` (READONLY lets a replica answer for its
/// primary's slots).
fn replica_has(cluster: &RedisCluster, node: usize, key: &str, value: &str) -> bool {
    let mut p = redis::pipe();
    p.cmd("READONLY").ignore().cmd("GET").arg(key);
    let got: redis::RedisResult<(Option<String>,)> = cluster.query_pipe(node, &p);
    matches!(got, Ok((Some(v),)) if v == value)
}

#[test]
fn the_fixture_starts_a_cluster_that_agrees_with_herald_on_slots() {
    let started = Instant::now();
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let took = started.elapsed();
    // For the record: how long the fixture takes to start (6 processes, create, agree).
    eprintln!("redis cluster (3 primaries, 3 replicas) ready in {took:?}");
    assert_eq!(cluster.len(), 6);
    let map = cluster.slot_map();
    assert!(map.is_complete());
    assert_eq!(map.shards().len(), 3);
    for shard in map.shards() {
        assert_eq!(shard.replicas.len(), 1, "{shard:?}");
    }
    assert_eq!(cluster.primaries().len(), 3);
    // Herald's slot function against Redis's own, on plain keys, tags, and Herald's keys.
    let mut keys: Vec<String> = vec![
        "foo".into(),
        "".into(),
        "{user1000}.following".into(),
        "{user1000}.followers".into(),
        "foo{}{bar}".into(),
        "foo{{bar}}zap".into(),
        "herald:outbox:{dev42}".into(),
        "herald:retained".into(),
    ];
    keys.extend((0..200).map(|i| format!("key:{i}:{{tag{}}}", i % 7)));
    for key in &keys {
        let redis_slot: i64 = cluster
            .query(0, &cmd(&["CLUSTER", "KEYSLOT", key]))
            .expect("CLUSTER KEYSLOT");
        assert_eq!(i64::from(key_slot(key.as_bytes())), redis_slot, "{key:?}");
    }
    assert_eq!(key_slot(b"foo"), 12182);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_calls_work_on_every_shard() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let redis = Redis::connect(&cluster.url(), None)
        .await
        .expect("connect to the cluster");

    // Plain commands, one key per shard.
    let keys = key_per_primary(&cluster, "cold:");
    assert_eq!(keys.len(), 3);
    for k in &keys {
        set(&redis, k, &format!("v-{k}")).await;
    }
    for k in &keys {
        assert_eq!(get(&redis, k).await, Some(format!("v-{k}")));
    }
    // Each really is on its own primary.
    let on: std::collections::HashSet<usize> = keys
        .iter()
        .map(|k| cluster.primary_for_slot(key_slot(k.as_bytes())))
        .collect();
    assert_eq!(on.len(), 3);

    // A pipeline of one slot (one client's keys share a hash tag).
    let mut p = redis::pipe();
    p.cmd("SET").arg("herald:a:{dev1}").arg("1").ignore();
    p.cmd("INCR").arg("herald:b:{dev1}");
    p.cmd("GET").arg("herald:a:{dev1}");
    let (n, a): (i64, String) = redis.query_pipe(&p).await.expect("one-slot pipeline");
    assert_eq!((n, a.as_str()), (1, "1"));

    // Keys of several shards in one pipeline are refused, cleanly: the store stays up.
    let mut p = redis::pipe();
    for k in &keys {
        p.cmd("GET").arg(k);
    }
    let cross: Result<Vec<Option<String>>, _> = redis.query_pipe(&p).await;
    assert!(
        cross.is_err(),
        "a cross-slot pipeline went through: {cross:?}"
    );
    assert!(
        redis.health().is_up(),
        "a cross-slot pipeline took the store down"
    );

    // Scripts: the outbox's are on every node, replicas too (SCRIPT LOAD went to all).
    let hashes = [
        redis.scripts().enqueue.get_hash().to_string(),
        redis.scripts().attach.get_hash().to_string(),
    ];
    for node in 0..cluster.len() {
        let exists: Vec<bool> = cluster
            .query(node, &cmd(&["SCRIPT", "EXISTS", &hashes[0], &hashes[1]]))
            .expect("SCRIPT EXISTS");
        assert_eq!(exists, vec![true, true], "node {node}");
    }
    // invoke (loads on NOSCRIPT) and evalsha, on each shard's key.
    let script = redis::Script::new("return redis.call('GET', KEYS[1])");
    for k in &keys {
        let mut call = script.prepare_invoke();
        call.key(k.as_str());
        let got: String = redis.invoke(&call).await.expect("invoke");
        assert_eq!(got, format!("v-{k}"));
        let got: String = redis
            .evalsha(&script, std::slice::from_ref(k), &[])
            .await
            .expect("evalsha");
        assert_eq!(got, format!("v-{k}"));
    }

    // The probe pings through the cluster connection.
    wait_until(
        Duration::from_secs(5),
        "the probe has measured a PING",
        async || redis.health().ping_secs() > 0.0,
    )
    .await;

    // The slot map for the hot path, and a refresh of it.
    let map = redis.slots().expect("a cluster has a slot map");
    assert!(map.is_complete());
    assert_eq!(map.shards().len(), 3);
    for k in &keys {
        let primary = map.primary(key_slot(k.as_bytes())).expect("served");
        assert_eq!(
            primary.port,
            cluster.port(cluster.primary_for_slot(key_slot(k.as_bytes())))
        );
    }
    let again = redis.refresh_slots().await.expect("refresh");
    assert_eq!(*again, *map);
    assert!(redis.health().is_up());
}

/// The calls made for keys of many slots (`Redis::query_each`, `query_steps`, `scan`, and
/// an MGET, which redis-rs splits by slot), on a cluster and, with the same keys, on one
/// redis-server: same results on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_slot_cold_calls_give_the_same_results_on_a_cluster_and_one_server() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let one = common::process::RedisServer::start();
    let keys = key_per_primary(&cluster, "each:");
    assert_eq!(keys.len(), 3);
    for url in [cluster.url(), one.url()] {
        let redis = Redis::connect(&url, None).await.expect("connect");
        cross_slot_calls(&redis, &keys).await;
        assert!(redis.health().is_up(), "{url}");
    }
    // On the cluster the scan found the keys of every shard: they really are spread.
    let scanned = cluster.keys("walk:*");
    assert_eq!(scanned.len(), 300);
    let map = cluster.slot_map();
    let shards: std::collections::HashSet<_> = scanned
        .iter()
        .filter_map(|k| map.shard_of_key(k.as_bytes()))
        .collect();
    assert_eq!(shards.len(), 3);
}

async fn cross_slot_calls(redis: &Redis, keys: &[String]) {
    // Independent commands, one per shard, replies in the commands' order.
    let sets: Vec<redis::Cmd> = keys
        .iter()
        .map(|k| redis::Cmd::set(k, format!("v-{k}")))
        .collect();
    let _: () = redis.query_each(&sets).await.expect("SET on every shard");
    let mut gets: Vec<redis::Cmd> = keys.iter().map(redis::Cmd::get).collect();
    gets.push(redis::Cmd::get("each:missing"));
    let got: Vec<Option<String>> = redis.query_each(&gets).await.expect("GET");
    let mut want: Vec<Option<String>> = keys.iter().map(|k| Some(format!("v-{k}"))).collect();
    want.push(None);
    assert_eq!(got, want);
    // Replies of different types, read as a tuple as from a pipeline.
    let (members, n): (Vec<String>, Option<u64>) = redis
        .query_each(&[
            redis::Cmd::smembers("each:set"),
            redis::Cmd::get("each:none"),
        ])
        .await
        .expect("tuple");
    assert!(members.is_empty() && n.is_none());
    let none: Vec<Option<String>> = redis.query_each(&[]).await.expect("no command");
    assert!(none.is_empty());
    // An MGET across shards comes back in order.
    let mget: Vec<Option<String>> = redis
        .query(redis::cmd("MGET").arg(keys).arg("each:missing"))
        .await
        .expect("MGET");
    assert_eq!(mget, want);

    // Ordered steps: a MULTI on one slot, then a counter in another.
    let mut replace = redis::pipe();
    replace
        .atomic()
        .del("steps:{s}")
        .sadd("steps:{s}", &["a", "b"][..]);
    let mut bump = redis::pipe();
    bump.incr("steps:n", 1);
    redis
        .query_steps(&[replace.clone(), bump.clone()])
        .await
        .expect("steps");
    redis.query_steps(&[replace, bump]).await.expect("steps");
    let (mut set, n): (Vec<String>, u64) = redis
        .query_each(&[
            redis::Cmd::smembers("steps:{s}"),
            redis::Cmd::get("steps:n"),
        ])
        .await
        .expect("read the steps");
    set.sort();
    assert_eq!((set, n), (vec!["a".to_string(), "b".to_string()], 2));
    // An error inside a MULTI fails the call, on either store.
    let mut wrong = redis::pipe();
    wrong.atomic().incr("steps:{s}", 1);
    let err = redis.query_steps(&[wrong]).await;
    assert!(err.is_err(), "INCR of a set went through: {err:?}");

    // A walk over the whole keyspace, many batches, every key once.
    let writes: Vec<redis::Cmd> = (0..300)
        .map(|i| redis::Cmd::set(format!("walk:{i}"), i))
        .collect();
    let _: () = redis.query_each(&writes).await.expect("300 SETs");
    let mut walk = redis.scan("walk:*", 50);
    let mut seen = Vec::new();
    while let Some(batch) = redis.scan_next(&mut walk).await.expect("SCAN") {
        seen.extend(batch);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 300, "keys found by the walk");
}

/// A primary is SIGKILLed: its replica takes over, and the cold calls reach the data
/// again on their own (redis-rs follows the new topology; the store recovers if it was
/// marked down meanwhile). The old primary, restarted, rejoins as a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_calls_follow_a_failover() {
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let redis = Redis::connect(&cluster.url(), None)
        .await
        .expect("connect to the cluster");
    let keys = key_per_primary(&cluster, "fo:");
    for k in &keys {
        set(&redis, k, &format!("v-{k}")).await;
    }
    let victim_key = &keys[0];
    let slot = key_slot(victim_key.as_bytes());
    let replica = cluster.replicas_for_slot(slot)[0];
    let value = format!("v-{victim_key}");
    // Replication is asynchronous: kill only once the replica has the key.
    let deadline = Instant::now() + FOLLOW;
    while !replica_has(&cluster, replica, victim_key, &value) {
        assert!(
            Instant::now() < deadline,
            "the replica never got {victim_key}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Whether the store was marked down meanwhile (the probe's PING reaches every primary).
    let went_down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = tokio::spawn({
        let (redis, went_down) = (redis.clone(), went_down.clone());
        async move {
            loop {
                if !redis.health().is_up() {
                    went_down.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let killed = cluster.kill_primary_for_slot(slot);
    let started = Instant::now();
    let promoted = tokio::task::block_in_place(|| cluster.wait_failover(slot));
    assert_eq!(promoted, replica, "the replica took over");
    let failover = started.elapsed();

    // Every key, the failed-over one included, through the same `Redis`.
    let deadline = Instant::now() + FOLLOW;
    for k in &keys {
        loop {
            let got: Result<Option<String>, _> = redis.query(&cmd(&["GET", k])).await;
            match got {
                Ok(v) => {
                    assert_eq!(v, Some(format!("v-{k}")), "{k} after the failover");
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "GET {k} still fails: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    let recovered = started.elapsed();
    wait_until(FOLLOW, "the store is up", async || redis.health().is_up()).await;
    // Writes go to the new primary.
    set(&redis, victim_key, "after").await;
    let _: () = cluster
        .query(promoted, &cmd(&["GET", victim_key]))
        .map(|v: String| assert_eq!(v, "after"))
        .expect("GET on the new primary");
    let map = redis.refresh_slots().await.expect("refresh");
    assert_eq!(
        map.primary(slot).map(|a| a.port),
        Some(cluster.port(promoted))
    );
    watch.abort();
    eprintln!(
        "failover: cluster agreed after {failover:?}, every key readable after {recovered:?}, \
         store marked down meanwhile: {}",
        went_down.load(std::sync::atomic::Ordering::Relaxed)
    );

    // The old primary comes back as the new one's replica.
    tokio::task::block_in_place(|| cluster.restart(killed));
    assert_eq!(cluster.primary_for_slot(slot), promoted);
    assert_eq!(cluster.replicas_for_slot(slot), vec![killed]);
    assert_eq!(get(&redis, victim_key).await.as_deref(), Some("after"));
}

/// A slot moves to another primary while the store is in use: while half-moved the old
/// primary answers ASK for the keys it gave away, after the move MOVED; the cold calls
/// follow both, and the store never goes down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_calls_follow_a_slot_migration() {
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let redis = Redis::connect(&cluster.url(), None)
        .await
        .expect("connect to the cluster");
    let keys: Vec<String> = (0..10).map(|i| format!("herald:m{i}:{{mig}}")).collect();
    let slot = key_slot(b"{mig}");
    for k in &keys {
        set(&redis, k, &format!("v-{k}")).await;
    }
    let from = cluster.primary_for_slot(slot);
    let to = cluster.other_primary(slot);

    cluster.migrate_slot_begin(slot, to);
    // Nothing moved yet: the old primary still serves them.
    assert_eq!(get(&redis, &keys[0]).await, Some(format!("v-{}", keys[0])));

    assert_eq!(cluster.migrate_slot_keys(slot), keys.len());
    // The old primary now sends its clients on with ASK...
    let direct: redis::RedisResult<Option<String>> = cluster.query(from, &cmd(&["GET", &keys[0]]));
    let err = direct.expect_err("the old primary still answered for a moved key");
    assert_eq!(err.code(), Some("ASK"), "{err}");
    // ...which the cold calls follow, reads and writes alike.
    for k in &keys {
        assert_eq!(get(&redis, k).await, Some(format!("v-{k}")));
    }
    set(&redis, "herald:new:{mig}", "during").await;
    let mut asking = redis::pipe();
    asking
        .cmd("ASKING")
        .ignore()
        .cmd("GET")
        .arg("herald:new:{mig}");
    let (on_target,): (Option<String>,) = cluster
        .query_pipe(to, &asking)
        .expect("GET on the importing primary");
    assert_eq!(on_target.as_deref(), Some("during"));
    // ASK does not move the slot: the map still names the old primary.
    let map = redis.refresh_slots().await.expect("refresh");
    assert_eq!(map.primary(slot).map(|a| a.port), Some(cluster.port(from)));

    cluster.migrate_slot_end(slot);
    // The old primary now answers MOVED...
    let direct: redis::RedisResult<Option<String>> = cluster.query(from, &cmd(&["GET", &keys[0]]));
    let err = direct.expect_err("the old primary still answered after the move");
    assert_eq!(err.code(), Some("MOVED"), "{err}");
    // ...which the cold calls follow.
    for k in &keys {
        assert_eq!(get(&redis, k).await, Some(format!("v-{k}")));
    }
    assert_eq!(
        get(&redis, "herald:new:{mig}").await.as_deref(),
        Some("during")
    );
    let map = redis.refresh_slots().await.expect("refresh");
    assert_eq!(map.primary(slot).map(|a| a.port), Some(cluster.port(to)));
    assert!(redis.health().is_up(), "a redirect took the store down");
}

/// A whole shard stops: the store goes down (the probe's PING reaches every primary), and
/// comes back by itself when the shard does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_down_while_a_shard_is_and_recovers() {
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let redis = Redis::connect(&cluster.url(), None)
        .await
        .expect("connect to the cluster");
    let keys = key_per_primary(&cluster, "sh:");
    for k in &keys {
        set(&redis, k, "v").await;
    }
    let shard = cluster.stop_shard(key_slot(keys[0].as_bytes()));
    assert_eq!(shard.len(), 2);
    wait_until(FOLLOW, "the store is marked down", async || {
        !redis.health().is_up()
    })
    .await;
    tokio::task::block_in_place(|| cluster.start_shard(&shard));
    wait_until(FOLLOW, "the store is up again", async || {
        redis.health().is_up()
    })
    .await;
    for k in &keys {
        assert_eq!(get(&redis, k).await.as_deref(), Some("v"));
    }
}

/// Passwords: the cluster client authenticates with the URL's, and no log line shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_starts_on_a_cluster_with_a_password_and_accepts_connections() {
    const PASSWORD: &str = "cluster-s3cret";
    let setup = Setup {
        password: Some(PASSWORD),
        ..Setup::default()
    };
    let Some(cluster) = RedisCluster::start_with(3, 1, setup) else {
        return;
    };
    assert!(cluster.url().contains(PASSWORD));
    let (herald, log) = start_herald(&cluster, "herald-pw");
    // CONNECT runs the attach script on the client's shard: one client per shard.
    for id in ["dev-a", "dev-b", "dev-c", "dev-d", "dev-e", "dev-f"] {
        let (c, present) = Raw::connect_ok(herald.addr, &Opts::new(id).clean(false)).await;
        assert!(!present);
        c.disconnect().await;
    }
    let (c, present) = Raw::connect_ok(herald.addr, &Opts::new("dev-a").clean(false)).await;
    assert!(present, "the session was stored in the cluster");
    c.disconnect().await;
    drop(herald);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !logged.contains(PASSWORD),
        "the password reached the log:\n{logged}"
    );
    // Without the password the cluster refuses, and Herald fails at start.
    let url = cluster.url().replace(&format!(":{PASSWORD}@"), "");
    let out = common::process::run_briefly(&["--store", "redis", "--redis-url", &url]);
    assert!(
        !out.status.success(),
        "herald started without the cluster's password"
    );
}

fn start_herald(cluster: &RedisCluster, name: &str) -> (Herald, std::path::PathBuf) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = cluster.dir().join(format!("{name}.log"));
    let args: Vec<String> = [
        "--listen",
        &addr.to_string(),
        "--store",
        "redis",
        "--redis-url",
        &cluster.url(),
        "--log-level",
        "info",
    ]
    .map(String::from)
    .into();
    (Herald::start_args(addr, args, &log), log)
}

/// `rediss+cluster://`: every node over TLS only, trusted through `store.redis_ca`. The
/// cold calls go through redis-rs's TLS, the probe through Herald's own RESP connections
/// (as the hot path's will), so both verify the nodes' certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_calls_and_the_probe_work_over_tls() {
    let setup = Setup {
        tls: true,
        ..Setup::default()
    };
    let Some(cluster) = RedisCluster::start_with(3, 1, setup) else {
        return;
    };
    assert!(cluster.url().starts_with("rediss+cluster://"));
    let ca = common::pki::Pki::get().ca_path();
    let redis = Redis::connect(&cluster.url(), Some(&ca))
        .await
        .expect("connect to the TLS cluster with store.redis_ca");
    let keys = key_per_primary(&cluster, "tls:");
    for k in &keys {
        set(&redis, k, "over-tls").await;
        assert_eq!(get(&redis, k).await.as_deref(), Some("over-tls"));
    }
    wait_until(
        Duration::from_secs(5),
        "the probe has measured a round",
        async || redis.health().ping_secs() > 0.0,
    )
    .await;
    assert!(redis.health().is_up());
    // The nodes the hot path will dial are named for TLS.
    let map = redis.slots().expect("slot map");
    for shard in map.shards() {
        let info = redis.node_info(&shard.primary);
        assert!(
            matches!(info.addr(), redis::ConnectionAddr::TcpTls { port, .. } if *port == shard.primary.port),
            "{:?}",
            info.addr()
        );
    }
    // A certificate from a CA it was not told to trust: refused at start.
    let other = common::pki::Pki::get().other_ca_path();
    let refused = Redis::connect(&cluster.url(), Some(&other)).await;
    assert!(refused.is_err(), "connected to a cluster it cannot verify");

    // A broker on it accepts a persistent session (CONNECT runs the attach script).
    let mut config = herald::Config::default();
    config.server.listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.store.kind = herald::config::StoreKind::Redis;
    config.store.redis_url = cluster.url();
    config.store.redis_ca = Some(ca);
    let server = herald::Server::start(config)
        .await
        .expect("herald on rediss+cluster://");
    let (c, _) = Raw::connect_ok(server.local_addr(), &Opts::new("dev-tls").clean(false)).await;
    c.disconnect().await;
    server.shutdown().await;
}

/// A QoS 1 push stored in the cluster and delivered after a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_pushes_through_a_cluster() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let (herald, _log) = start_herald(&cluster, "herald-push");
    let (device, _) = Raw::connect_ok(herald.addr, &Opts::new("dev-push").clean(false)).await;
    device.disconnect().await;
    let mut backend = Raw::connect(herald.addr, "backend").await;
    for i in 0..3 {
        backend
            .publish(
                "push/dev-push",
                format!("m{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    let (mut device, present) =
        Raw::connect_ok(herald.addr, &Opts::new("dev-push").clean(false)).await;
    assert!(present);
    for i in 0..3 {
        let p = device.expect_publish().await;
        assert_eq!(text(&p), format!("m{i}"));
        device.puback(p.pkid).await;
    }
}

// ---------------------------------------------------------------------------------------
// Herald processes on a cluster: the cold calls that touch keys of many slots

/// How long a test waits for a message between nodes or a sample. Only reached on failure.
const ARRIVE: Duration = Duration::from_secs(5);

/// Names `prefix` then a number, `per_shard` of them for each shard of `cluster`, chosen by
/// the shard of `key(name)`, grouped by shard.
fn names_per_shard(
    cluster: &RedisCluster,
    prefix: &str,
    per_shard: usize,
    key: impl Fn(&str) -> String,
) -> Vec<Vec<String>> {
    let map = cluster.slot_map();
    let mut names = vec![Vec::new(); map.shards().len()];
    for i in 0.. {
        let name = format!("{prefix}{i}");
        if let Some(shard) = map.shard_of_key(key(&name).as_bytes()) {
            if names[shard].len() < per_shard {
                names[shard].push(name);
            }
        }
        if names.iter().all(|n| n.len() == per_shard) {
            return names;
        }
    }
    unreachable!()
}

/// Client ids spread over every shard (a client's keys all share its slot).
fn clients_per_shard(cluster: &RedisCluster, prefix: &str, per_shard: usize) -> Vec<String> {
    names_per_shard(cluster, prefix, per_shard, |id| {
        keys::client(Client::Session, id)
    })
    .concat()
}

/// A `Broker` (a herald process with a metrics listener) on `cluster`, its log in the
/// cluster's directory; `node` makes it a node of a Herald cluster with that id.
async fn broker_on(cluster: &RedisCluster, name: &str, node: Option<&str>, toml: &str) -> Broker {
    let mut args = Vec::new();
    if let Some(id) = node {
        args = ["--cluster-listen", "127.0.0.1:0", "--node-id", id]
            .map(String::from)
            .into();
    }
    let how = Launch {
        name: Some(name.into()),
        args,
        redis_url: Some(cluster.url()),
        dir: Some(cluster.dir().to_path_buf()),
        ..Launch::default()
    };
    Broker::launch(toml, how).await
}

/// The next PUBLISH within `ARRIVE`, other packets skipped.
async fn publish_within(c: &mut Raw, what: &str) -> common::Publish {
    let deadline = Instant::now() + ARRIVE;
    loop {
        match c
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Event::Packet(Packet::Publish(p)) => return p,
            Event::Packet(_) => {}
            other => panic!("{what}: {other:?} instead of a PUBLISH"),
        }
    }
}

/// Persistent sessions on every shard subscribe to ordinary topics (each client's hash on
/// its own shard, the index `herald:subscribers` on one), Herald is killed and started
/// again, and the subscriptions it loads from every shard at start deliver without a new
/// SUBSCRIBE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_subscriptions_are_saved_and_loaded_across_shards() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let ids = clients_per_shard(&cluster, "sub-", 2);
    let map = cluster.slot_map();
    let index = map.shard_of_key(keys::SUBSCRIBERS.as_bytes());
    assert!(
        ids.iter()
            .any(|id| map.shard_of_key(keys::client(Client::Subs, id).as_bytes()) != index),
        "no subscriber on another shard than the index"
    );
    let mut herald = broker_on(&cluster, "subs", None, "").await;
    for (i, id) in ids.iter().enumerate() {
        let (mut c, _) = Raw::connect_ok(herald.addr(), &Opts::new(id).clean(false)).await;
        c.sub(&format!("news/{i}"), QoS::AtLeastOnce).await;
        c.sub("all/+", QoS::AtMostOnce).await;
        c.disconnect().await;
    }
    herald.wait_connections(0).await;
    // In the store: each client's hash on its own shard, every client in the index.
    for id in &ids {
        let key = keys::client(Client::Subs, id);
        let subs: std::collections::HashMap<String, u8> = cluster
            .query_key(&key, redis::cmd("HGETALL").arg(&key))
            .expect("HGETALL");
        assert_eq!(subs.len(), 2, "{key}: {subs:?}");
    }
    let mut indexed: Vec<String> = cluster
        .query_key(
            keys::SUBSCRIBERS,
            redis::cmd("SMEMBERS").arg(keys::SUBSCRIBERS),
        )
        .expect("SMEMBERS");
    indexed.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(indexed, want);

    herald.kill();
    herald.restart().await;
    let mut subscribers = Vec::new();
    for id in &ids {
        let (c, present) = Raw::connect_ok(herald.addr(), &Opts::new(id).clean(false)).await;
        assert!(present, "{id}'s session");
        subscribers.push(c);
    }
    let mut publisher = Raw::connect(herald.addr(), "publisher").await;
    for (i, c) in subscribers.iter_mut().enumerate() {
        let topic = format!("news/{i}");
        publisher
            .publish(&topic, topic.as_bytes(), QoS::AtMostOnce, false)
            .await;
        let p = publish_within(c, &topic).await;
        assert_eq!(
            (p.topic.as_str(), text(&p)),
            (topic.as_str(), topic.clone())
        );
    }
    publisher
        .publish("all/x", b"everyone", QoS::AtMostOnce, false)
        .await;
    for (c, id) in subscribers.iter_mut().zip(&ids) {
        let p = publish_within(c, id).await;
        assert_eq!((p.topic.as_str(), text(&p).as_str()), ("all/x", "everyone"));
    }
}

/// Publishes QoS 0 probes on `topic` until `subscriber` gets one: its node's filters have
/// reached the publisher's node.
async fn wait_interest(subscriber: &mut Raw, publisher: &mut Raw, topic: &str) {
    const PROBE: &[u8] = b"--probe--";
    let deadline = Instant::now() + ARRIVE;
    loop {
        publisher
            .publish(topic, PROBE, QoS::AtMostOnce, false)
            .await;
        match subscriber.next(Duration::from_millis(50)).await {
            Event::Packet(Packet::Publish(p)) if &p.payload[..] == PROBE && p.topic == topic => {
                return
            }
            Event::Packet(Packet::Publish(p)) if &p.payload[..] == PROBE => {}
            Event::Timeout => {}
            other => panic!("while probing {topic}: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "a subscription to {topic} never reached the publisher's node"
        );
    }
}

/// The message stored in `client`'s outbox as `seq`, written as the outbox writes it (a
/// `d` entry, the envelope), with the birth time `born_us`.
fn store_directly(cluster: &RedisCluster, client: &str, seq: u64, body: &str, born_us: u64) {
    let msg = herald::message::Message {
        topic: format!("push/{client}").into(),
        payload: bytes::Bytes::copy_from_slice(body.as_bytes()),
        qos: herald::message::Qos::AtLeastOnce,
        retain: false,
        expires_at: 0,
        born_us,
        forwarded: false,
        receipt: false,
    };
    let key = keys::client(Client::Outbox, client);
    let _: String = cluster
        .query_key(
            &key,
            redis::cmd("XADD")
                .arg(&key)
                .arg(format!("0-{seq}"))
                .arg("d")
                .arg(msg.envelope(herald::message::Qos::AtLeastOnce)),
        )
        .expect("XADD");
}

/// Three Herald nodes on one Redis Cluster, their alive and filters keys on three shards:
/// each sees the others (the registry's reads cross slots); a QoS 0 push published on a
/// reaches a device on b (two hops, the route read from the device's shard); a
/// subscription made on b is seen by a and c (interest written on b's shard, the counter
/// on another); the sweep on b reads its devices' routes and outboxes on every shard and
/// delivers an entry that no forward announced; b's graceful stop deletes its keys and the
/// others forget it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_nodes_share_a_cluster_store() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let config = "[cluster]\nsweep_interval = \"1s\"\ndrain_duration = \"1s\"\n";
    let nodes = names_per_shard(&cluster, "node-", 1, keys::alive).concat();
    let a = broker_on(&cluster, "a", Some(&nodes[0]), config).await;
    let mut b = broker_on(&cluster, "b", Some(&nodes[1]), config).await;
    let c = broker_on(&cluster, "c", Some(&nodes[2]), config).await;
    for n in [&a, &b, &c] {
        n.assert_metric("herald_cluster_peers", 2.0).await;
    }

    // Devices on b, one per shard; the backend on a.
    let devices = clients_per_shard(&cluster, "dev-", 1);
    let mut on_b = Vec::new();
    for id in &devices {
        let (d, _) = Raw::connect_ok(b.addr(), &Opts::new(id).clean(false)).await;
        on_b.push(d);
    }
    let mut backend = Raw::connect(a.addr(), "backend").await;
    for (d, id) in on_b.iter_mut().zip(&devices) {
        backend
            .publish(&format!("push/{id}"), b"q0", QoS::AtMostOnce, false)
            .await;
        let p = publish_within(d, id).await;
        assert_eq!(
            (p.topic.as_str(), text(&p).as_str(), p.qos),
            (format!("push/{id}").as_str(), "q0", QoS::AtMostOnce)
        );
    }

    // Interest crosses nodes: a subscriber on b, publishers on a and c.
    let mut watcher = Raw::connect(b.addr(), "watcher").await;
    watcher.sub("news/#", QoS::AtMostOnce).await;
    let mut from_c = Raw::connect(c.addr(), "from-c").await;
    wait_interest(&mut watcher, &mut backend, "news/a").await;
    wait_interest(&mut watcher, &mut from_c, "news/c").await;
    backend
        .publish("news/a", b"hello", QoS::AtMostOnce, false)
        .await;
    let p = publish_within(&mut watcher, "news from a").await;
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("news/a", "hello"));

    // An entry in each device's outbox that no forward announced (a lost hint): b's sweep
    // finds it and the device gets it.
    let born = herald::message::now_us();
    for (i, id) in devices.iter().enumerate() {
        store_directly(&cluster, id, 1 + i as u64, &format!("swept-{id}"), born);
    }
    for (d, id) in on_b.iter_mut().zip(&devices) {
        let p = publish_within(d, "an entry the sweep found").await;
        assert_eq!(text(&p), format!("swept-{id}"));
    }
    b.wait_metric("herald_cluster_sweep_wakeups_total", devices.len() as f64)
        .await;

    // b stops gracefully: its alive and filters keys go, then the counter moves.
    let interest = |cluster: &RedisCluster| -> u64 {
        cluster
            .query_key(keys::INTEREST, redis::cmd("GET").arg(keys::INTEREST))
            .expect("GET interest")
    };
    let before = interest(&cluster);
    let filters = keys::filters(&nodes[1]);
    let listed: Vec<String> = cluster
        .query_key(&filters, redis::cmd("SMEMBERS").arg(&filters))
        .expect("SMEMBERS");
    assert_eq!(listed, vec!["news/#".to_string()]);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &b.pid().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let status = b.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "b did not exit 0: {status:?}"
    );
    let alive = keys::alive(&nodes[1]);
    let left: (Option<String>, bool) = (
        cluster
            .query_key(&alive, redis::cmd("GET").arg(&alive))
            .expect("GET alive"),
        cluster
            .query_key(&filters, redis::cmd("EXISTS").arg(&filters))
            .expect("EXISTS filters"),
    );
    assert_eq!(left, (None, false), "b's keys after its stop");
    assert!(
        interest(&cluster) > before,
        "the interest counter did not move"
    );
    for n in [&a, &c] {
        wait_until(ARRIVE, "the others forget b", async || {
            n.metric("herald_cluster_peers").await == 1.0
        })
        .await;
    }
}

/// A QoS 1 push published on node a is stored in the device's outbox (on its shard),
/// acknowledged, delivered by node b, and deleted on the device's PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_push_crosses_two_hops_on_a_cluster_store() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let a = broker_on(&cluster, "a", Some("qa"), "").await;
    let b = broker_on(&cluster, "b", Some("qb"), "").await;
    a.assert_metric("herald_cluster_peers", 1.0).await;
    let devices = clients_per_shard(&cluster, "q1-", 1);
    let mut on_b = Vec::new();
    for id in &devices {
        let (d, _) = Raw::connect_ok(b.addr(), &Opts::new(id).clean(false)).await;
        on_b.push(d);
    }
    let mut backend = Raw::connect(a.addr(), "backend").await;
    for (d, id) in on_b.iter_mut().zip(&devices) {
        backend
            .publish(&format!("push/{id}"), b"q1", QoS::AtLeastOnce, false)
            .await;
        let p = publish_within(d, id).await;
        assert_eq!((text(&p).as_str(), p.qos), ("q1", QoS::AtLeastOnce));
        d.puback(p.pkid).await;
    }
    for id in &devices {
        let key = keys::client(Client::Outbox, id);
        wait_until(ARRIVE, "the outbox drains on the PUBACK", async || {
            cluster
                .query_key::<u64>(&key, redis::cmd("XLEN").arg(&key))
                .is_ok_and(|n| n == 0)
        })
        .await;
    }
    drop(b);
}

/// The store sample walks every primary and reads each outbox and route on its own shard:
/// sessions and messages spread over three shards are all counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_sample_counts_every_shard() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let ids = clients_per_shard(&cluster, "sampled-", 2);
    let first = broker_on(&cluster, "first", None, "").await;
    for id in &ids {
        let (c, _) = Raw::connect_ok(first.addr(), &Opts::new(id).clean(false)).await;
        c.disconnect().await;
    }
    first.wait_connections(0).await;
    // Pushes while they are away: client i holds i + 1.
    let mut backend = Raw::connect(first.addr(), "backend").await;
    let mut messages = 0;
    for (i, id) in ids.iter().enumerate() {
        for n in 0..=i {
            backend
                .publish(
                    &format!("push/{id}"),
                    format!("m{n}").as_bytes(),
                    QoS::AtLeastOnce,
                    false,
                )
                .await;
            messages += 1;
        }
    }
    backend.disconnect().await;
    drop(first);
    // Two sessions (on two shards) have a route: online on some node, not offline.
    for id in [&ids[0], &ids[ids.len() - 1]] {
        let key = keys::client(Client::Route, id);
        let _: () = cluster
            .query_key(
                &key,
                redis::cmd("HSET")
                    .arg(&key)
                    .arg("node")
                    .arg("elsewhere")
                    .arg("inc")
                    .arg(1)
                    .arg("epoch")
                    .arg(1),
            )
            .map(|_: u64| ())
            .expect("HSET route");
    }
    // The first node took the sampling lease at its start: free it for the next one, which
    // then samples as it starts.
    let _: u64 = cluster
        .query_key(
            keys::SAMPLE_LEASE,
            redis::cmd("DEL").arg(keys::SAMPLE_LEASE),
        )
        .expect("DEL lease");
    let sampler = broker_on(&cluster, "sampler", Some("sampler"), "").await;
    sampler
        .assert_metric("herald_outbox_messages", messages as f64)
        .await;
    sampler
        .assert_metric(
            r#"herald_sessions{state="offline"}"#,
            (ids.len() - 2) as f64,
        )
        .await;
    let age = sampler.metric("herald_outbox_oldest_age_seconds").await;
    assert!(age > 0.0 && age < 60.0, "oldest age {age}");
    let stats: Vec<u64> = cluster
        .query_key(
            keys::STATS,
            redis::cmd("HMGET")
                .arg(keys::STATS)
                .arg("messages")
                .arg("sessions")
                .arg("routed"),
        )
        .expect("HMGET stats");
    assert_eq!(stats, vec![messages, ids.len() as u64, 2]);
}

/// A stream entry as XRANGE returns it: its id, its fields and values.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Outboxes of the layout before streams (a ZSET of `<seq>|<envelope>` and a counter per
/// client) on every shard: the first Herald to start finds them on every primary and moves
/// each into its stream, same numbers, and marks the store done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_move_finds_old_outboxes_on_every_shard() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let ids = clients_per_shard(&cluster, "old-", 2);
    for (i, id) in ids.iter().enumerate() {
        let old = keys::client(Client::LegacyOutbox, id);
        for seq in [10 + i as u64, 11 + i as u64] {
            let msg = herald::message::Message {
                topic: format!("push/{id}").into(),
                payload: bytes::Bytes::from(format!("m{seq}")),
                qos: herald::message::Qos::AtLeastOnce,
                retain: false,
                expires_at: 0,
                born_us: 1,
                forwarded: false,
                receipt: false,
            };
            let mut member = format!("{seq}|").into_bytes();
            member.extend(msg.envelope(herald::message::Qos::AtLeastOnce));
            let _: u64 = cluster
                .query_key(&old, redis::cmd("ZADD").arg(&old).arg(seq).arg(member))
                .expect("ZADD");
        }
        let counter = keys::client(Client::LegacySeq, id);
        let _: () = cluster
            .query_key(&counter, redis::cmd("SET").arg(&counter).arg(11 + i))
            .expect("SET");
    }
    let _herald = broker_on(&cluster, "mover", None, "").await;
    for (i, id) in ids.iter().enumerate() {
        let stream = keys::client(Client::Outbox, id);
        let entries: Vec<StreamEntry> = cluster
            .query_key(&stream, redis::cmd("XRANGE").arg(&stream).arg("-").arg("+"))
            .expect("XRANGE");
        let ids_got: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            ids_got,
            [format!("0-{}", 10 + i), format!("0-{}", 11 + i)],
            "{stream}"
        );
    }
    assert!(cluster.keys("herald:outbox:*").is_empty());
    assert!(cluster.keys("herald:seq:*").is_empty());
    let layout: Option<String> = cluster
        .query_key(keys::LAYOUT, redis::cmd("GET").arg(keys::LAYOUT))
        .expect("GET layout");
    assert_eq!(layout.as_deref(), Some("2"));
}
