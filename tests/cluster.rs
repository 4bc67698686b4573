//! The cluster: several real `herald` processes (`--cluster-listen`) sharing one private
//! `redis-server`, killed with SIGKILL where a test says so. Each test starts its own Redis
//! and nodes on free loopback ports, so the tests run in parallel.
//!
//! What is checked (ARCHITECTURE.md sections 3 and 7): a push published on one node reaches a
//! device on another (two hops) and is in the device's outbox in Redis before the publisher's
//! PUBACK; a client id that moves between nodes leaves exactly one open connection and loses
//! no message, also when the kick is lost; a killed node loses nothing that was acknowledged
//! (resends keep DUP=1 and their packet id on the new node); a lost forward is made up by the
//! sweep; a node restarted with the same id is usable at once; ordinary topics, retained
//! messages and wills cross nodes, a persistent subscriber can move between nodes, and a dead
//! node does not block publishing; clustering needs the Redis store.
//!
//! Every node is a `process::Broker` logging at `info` (or `$HERALD_CLUSTER_LOG`, e.g.
//! `herald=debug`) to a file in the test's temp dir; when a test fails, the end of each
//! node's log and its non-zero metrics are printed with the failure.
//!
//! Waiting is on events (a packet, a closed socket, a metric or a Redis key reaching a value),
//! never fixed sleeps: interest in an ordinary topic takes a moment to reach other nodes, so
//! tests publish QoS 0 probes until one arrives (`wait_interest`). Metrics are scraped from
//! the nodes, processes of this test's own: every count, and every comparison with a value
//! read earlier, is about this test alone.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{
    free_port, outbox_len_in, route_node, run_briefly, Broker, Launch, RedisServer,
};
use common::{text, wait_until, ConnectReturnCode, Event, Opts, Packet, Publish, QoS, Raw};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A config that makes the sweep (the recovery of lost forwards) run every second.
const SHORT_SWEEP: &str = "[cluster]\nsweep_interval = \"1s\"\n";

/// Payload of the QoS 0 probes of `wait_interest`; receivers skip them.
const PROBE: &[u8] = b"--probe--";

// ---------------------------------------------------------------------------------------
// Nodes and their Redis

/// One test's Redis and temp dir (config files, node logs).
struct Cluster {
    redis: RedisServer,
    dir: tempfile::TempDir,
    /// The TOML every node of this cluster reads.
    config: String,
}

impl Cluster {
    /// A private Redis; `config`, if any, is the TOML every node of this cluster reads.
    fn new(config: Option<&str>) -> Cluster {
        // AOF as always, fsync once a second: these tests kill brokers, not Redis.
        let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
        let dir = tempfile::tempdir().expect("temp dir");
        Cluster {
            redis,
            dir,
            config: config.unwrap_or_default().to_string(),
        }
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        self.redis.conn().await
    }

    /// A node with id `id` whose node-to-node listener is on an ephemeral port (advertised
    /// as bound).
    async fn node(&self, id: &str) -> Broker {
        self.node_with(NodeArgs::new(Some(id))).await
    }

    async fn node_with(&self, args: NodeArgs) -> Broker {
        let mut argv: Vec<String> = vec!["--cluster-listen".into(), args.cluster_listen.clone()];
        if let Some(id) = &args.id {
            argv.extend(["--node-id".into(), id.clone()]);
        }
        if let Some(a) = &args.advertise {
            argv.extend(["--cluster-advertise".into(), a.clone()]);
        }
        let how = Launch {
            name: Some(args.id.clone().unwrap_or_else(|| "default-id".into())),
            args: argv,
            redis_url: Some(self.redis.url()),
            log_level: Some(std::env::var("HERALD_CLUSTER_LOG").unwrap_or_else(|_| "info".into())),
            dir: Some(self.dir.path().to_path_buf()),
            ..Launch::default()
        };
        Broker::launch(&self.config, how).await
    }
}

struct NodeArgs {
    id: Option<String>,
    cluster_listen: String,
    advertise: Option<String>,
}

impl NodeArgs {
    fn new(id: Option<&str>) -> NodeArgs {
        NodeArgs {
            id: id.map(String::from),
            cluster_listen: "127.0.0.1:0".into(),
            advertise: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client helpers

/// The next PUBLISH within `wait` (other packets are skipped, probes too); `None` on timeout.
/// Panics if the connection closes.
async fn recv_within(c: &mut Raw, wait: Duration) -> Option<Publish> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next(left).await {
            Event::Packet(Packet::Publish(p)) if &p.payload[..] == PROBE => {}
            Event::Packet(Packet::Publish(p)) => return Some(p),
            Event::Packet(_) => {}
            Event::Timeout => return None,
            Event::Closed => panic!("connection closed while waiting for a PUBLISH"),
        }
    }
}

async fn recv(c: &mut Raw, wait: Duration, what: &str) -> Publish {
    let started = Instant::now();
    match recv_within(c, wait).await {
        Some(p) => p,
        None => panic!("{what}: nothing arrived within {:?}", started.elapsed()),
    }
}

/// PUBACK that does not panic on a broken connection (a device whose node was killed).
async fn try_puback(c: &mut Raw, pkid: u16) -> bool {
    c.send_raw(&common::frame(0x40, &pkid.to_be_bytes()))
        .await
        .is_ok()
}

/// `Raw::closed_within` for a connection moved into a task of its own.
async fn closed_at(mut c: Raw, wait: Duration) -> Option<Instant> {
    c.closed_within(wait).await
}

/// Publishes QoS 0 probes on `topic` from `publisher` until `subscriber` gets one: the
/// subscription made on another node is now known to the publisher's node.
async fn wait_interest(subscriber: &mut Raw, publisher: &mut Raw, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        publisher
            .publish(topic, PROBE, QoS::AtMostOnce, false)
            .await;
        match subscriber.next(Duration::from_millis(50)).await {
            Event::Packet(Packet::Publish(p)) if p.topic == topic && &p.payload[..] == PROBE => {
                return
            }
            // A late probe of an earlier topic.
            Event::Packet(Packet::Publish(p)) if &p.payload[..] == PROBE => {}
            Event::Packet(p) => panic!("while probing {topic}: unexpected {p:?}"),
            Event::Closed => panic!("subscriber closed while probing {topic}"),
            Event::Timeout => {}
        }
        assert!(
            Instant::now() < deadline,
            "a subscription to {topic} made on another node never became visible (5 s of probes)"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Two hops

/// Device on B, backend on A: the push goes A -> B -> device, and is in the device's outbox
/// in Redis before A acknowledges it. The sweep is left at its 5 s default, so delivery
/// within 2 s can only come from the forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_crosses_two_hops_and_is_stored_before_puback() {
    let cluster = Cluster::new(None);
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let mut redis = cluster.redis().await;

    let (mut device, _) = Raw::connect_ok(b.addr(), &Opts::new("dev-2hop").clean(false)).await;
    assert_eq!(
        route_node(&mut redis, "dev-2hop").await.as_deref(),
        Some("b"),
        "CONNECT on node b records the route"
    );

    // The Raw client: PUBACK, then at once the outbox holds the message.
    let mut backend = Raw::connect(a.addr(), "backend-raw").await;
    backend
        .publish("push/dev-2hop", b"raw-1", QoS::AtLeastOnce, false)
        .await;
    let n = outbox_len_in(&mut redis, "dev-2hop").await;
    assert!(n >= 1, "PUBACK sent while the outbox holds {n} messages");
    let p = recv(
        &mut device,
        Duration::from_secs(2),
        "raw-1 at the device on b",
    )
    .await;
    assert_eq!(p.topic, "push/dev-2hop");
    assert_eq!(text(&p), "raw-1");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    let mut expected_forwards = 1.0;
    // Not acknowledged by the device yet: the entries stay.
    let mut pkids = vec![p.pkid];

    // The real mosquitto_pub: it exits 0 only after the PUBACK.
    if which("mosquitto_pub") {
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p"])
                .arg(a.addr().port().to_string())
                .args(["-V", "mqttv311", "-i", "backend-mosq", "-q", "1"])
                .args(["-t", "push/dev-2hop", "-m", "mosq-1"])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("mosquitto_pub did not finish within 10 s")
        .expect("run mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let n = outbox_len_in(&mut redis, "dev-2hop").await;
        assert!(
            n >= 2,
            "mosquitto_pub got its PUBACK while the outbox holds {n} messages"
        );
        let p = recv(
            &mut device,
            Duration::from_secs(2),
            "mosq-1 at the device on b",
        )
        .await;
        assert_eq!(text(&p), "mosq-1");
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_ne!(p.pkid, pkids[0], "two in-flight messages share a packet id");
        pkids.push(p.pkid);
        expected_forwards += 1.0;
    } else {
        eprintln!("SKIPPED: mosquitto_pub part of the two-hop test: mosquitto_pub not on PATH");
    }

    let sent = a
        .metric(r#"herald_cluster_forwards_total{kind="push"}"#)
        .await;
    let got = b
        .metric(r#"herald_cluster_forwards_received_total{kind="push"}"#)
        .await;
    assert!(sent >= expected_forwards, "node a forwarded {sent} pushes");
    assert!(
        got >= expected_forwards,
        "node b received {got} forwarded pushes"
    );

    // The device acknowledges both: the outbox drains (delete on device PUBACK).
    for pkid in pkids {
        device.puback(pkid).await;
    }
    wait_until(
        Duration::from_secs(3),
        "the outbox is empty after the PUBACKs",
        async || outbox_len_in(&mut redis, "dev-2hop").await == 0,
    )
    .await;

    // QoS 0 crosses too, and is never stored.
    backend
        .publish("push/dev-2hop", b"q0", QoS::AtMostOnce, false)
        .await;
    let p = recv(
        &mut device,
        Duration::from_secs(2),
        "QoS 0 push at the device on b",
    )
    .await;
    assert_eq!(
        (text(&p).as_str(), p.qos, p.dup),
        ("q0", QoS::AtMostOnce, false)
    );
    assert_eq!(
        outbox_len_in(&mut redis, "dev-2hop").await,
        0,
        "QoS 0 was stored"
    );
}

fn which(binary: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(binary).is_file()))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// 2. Takeover across nodes

/// X on A, then the same id on B while a backend keeps publishing to X through A: A closes
/// the old connection within 1 s of the new CONNECT, and every message is received on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_across_nodes_closes_the_old_connection_and_loses_nothing() {
    let cluster = Cluster::new(Some(SHORT_SWEEP));
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;

    let (mut old, _) = Raw::connect_ok(a.addr(), &Opts::new("x").clean(false)).await;
    let mut backend = Raw::connect(a.addr(), "backend").await;
    for i in 0..10 {
        backend
            .publish("push/x", i.to_string().as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    // The old connection gets them (never acknowledged).
    let first = recv(&mut old, Duration::from_secs(2), "first message on node a").await;
    assert_eq!(text(&first), "0");
    let old_closed = tokio::spawn(closed_at(old, Duration::from_secs(5)));

    // More messages while X moves: 10..59, each acknowledged to the backend.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let during = tokio::spawn(async move {
        let mut started = Some(started_tx);
        for i in 10..60 {
            backend
                .publish("push/x", i.to_string().as_bytes(), QoS::AtLeastOnce, false)
                .await;
            if i == 20 {
                let _ = started.take().unwrap().send(());
            }
        }
        backend
    });
    started_rx.await.unwrap();

    let connect_sent = Instant::now();
    let (mut new, present) = Raw::connect_ok(b.addr(), &Opts::new("x").clean(false)).await;
    let connack = connect_sent.elapsed();
    assert!(present, "the persistent session made on a is present on b");

    let closed = old_closed
        .await
        .unwrap()
        .expect("node a did not close the old connection within 5 s of the takeover");
    assert!(
        closed >= connect_sent,
        "the old connection closed before the new CONNECT"
    );
    let took = closed - connect_sent;
    assert!(
        took <= Duration::from_secs(1),
        "old connection closed {took:?} after the new CONNECT (CONNACK after {connack:?})"
    );

    let mut seen = HashSet::new();
    let mut copies = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 60 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(p) = recv_within(&mut new, left).await else {
            let mut missing: Vec<u32> = (0..60).filter(|i| !seen.contains(i)).collect();
            missing.sort();
            panic!("after the takeover, still missing {missing:?} after 10 s");
        };
        seen.insert(text(&p).parse::<u32>().expect("numeric payload"));
        copies += 1;
        new.puback(p.pkid).await;
    }
    let mut backend = during.await.unwrap();
    eprintln!(
        "takeover: old connection closed {took:?} after CONNECT; 60 messages, {} duplicates",
        copies - 60
    );

    // The kick went from b to a over the node-to-node link.
    assert!(
        b.metric(r#"herald_cluster_forwards_total{kind="kick"}"#)
            .await
            >= 1.0,
        "node b sent no kick"
    );
    assert!(
        a.metric("herald_cluster_remote_kicks_total").await >= 1.0,
        "node a counted no remote kick"
    );

    // The new connection keeps working.
    backend
        .publish("push/x", b"after", QoS::AtLeastOnce, false)
        .await;
    let p = recv(
        &mut new,
        Duration::from_secs(3),
        "a push after the takeover",
    )
    .await;
    assert_eq!(text(&p), "after");
}

/// X connects to A, B, A, B, each CONNECT completing: the first three connections are closed
/// within 3 s of the last CONNACK, the last one stays open and gets a push sent afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_between_nodes_leaves_only_the_last_connection() {
    let cluster = Cluster::new(Some(SHORT_SWEEP));
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;

    let mut conns = Vec::new();
    for node in [&a, &b, &a, &b] {
        let (c, _) = Raw::connect_ok(node.addr(), &Opts::new("flap").clean(false)).await;
        conns.push(c);
    }
    let last_connack = Instant::now();
    let mut last = conns.pop().unwrap();
    let closing: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(closed_at(c, Duration::from_secs(5))))
        .collect();
    for (i, h) in closing.into_iter().enumerate() {
        let node = ["a", "b", "a"][i];
        let at = h
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("connection {} (node {node}) still open 5 s later", i + 1));
        let after = at.saturating_duration_since(last_connack);
        assert!(
            after <= Duration::from_secs(3),
            "connection {} (node {node}) closed {after:?} after the last CONNACK",
            i + 1
        );
    }
    // The last one is open, and the only client connection left on either node.
    last.ping().await;
    wait_until(
        Duration::from_secs(3),
        "one client connection is active over both nodes",
        async || {
            a.metric("herald_connections_active").await
                + b.metric("herald_connections_active").await
                == 1.0
        },
    )
    .await;
    assert_eq!(
        route_node(&mut cluster.redis().await, "flap")
            .await
            .as_deref(),
        Some("b"),
        "the route names the last node"
    );

    let mut backend = Raw::connect(a.addr(), "backend").await;
    backend
        .publish("push/flap", b"after-flap", QoS::AtLeastOnce, false)
        .await;
    let p = recv(
        &mut last,
        Duration::from_secs(2),
        "a push to the last connection",
    )
    .await;
    assert_eq!(text(&p), "after-flap");
    last.puback(p.pkid).await;
    last.ping().await;
}

// ---------------------------------------------------------------------------------------
// 3. Node loss

/// 100 devices on B; a backend publishes 2,000 QoS 1 messages to them through A; B is
/// killed mid-stream and the devices move to C. Every acknowledged message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_loses_no_acknowledged_message() {
    const DEVICES: usize = 100;
    const MESSAGES: usize = 2000;
    const KILL_AT: usize = 700;
    const WINDOW: usize = 100;

    let cluster = Cluster::new(Some(SHORT_SWEEP));
    let a = cluster.node("a").await;
    let mut b = cluster.node("b").await;
    let c = cluster.node("c").await;
    let fallback = c.addr();

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(HashSet::<usize>::new()));
    let mut devices = Vec::new();
    for d in 0..DEVICES {
        let id = format!("d{d:03}");
        let (conn, _) = Raw::connect_ok(b.addr(), &Opts::new(&id).clean(false)).await;
        devices.push(tokio::spawn(device_loop(
            id,
            conn,
            fallback,
            seen.clone(),
            stop.clone(),
        )));
    }

    let body = async {
        // Pipelined publisher on A: up to WINDOW unacknowledged.
        let mut backend = Raw::connect(a.addr(), "backend").await;
        let mut inflight: HashMap<u16, usize> = HashMap::new();
        let mut acked = Vec::new();
        let mut next = 0;
        while acked.len() < MESSAGES {
            while next < MESSAGES && inflight.len() < WINDOW {
                let topic = format!("push/d{:03}", next % DEVICES);
                let pkid = backend
                    .send_publish(
                        &topic,
                        format!("m{next}").as_bytes(),
                        QoS::AtLeastOnce,
                        false,
                    )
                    .await;
                inflight.insert(pkid, next);
                next += 1;
            }
            match backend.next(Duration::from_secs(10)).await {
                Event::Packet(Packet::PubAck(ack)) => {
                    let i = inflight
                        .remove(&ack.pkid)
                        .expect("PUBACK for an unknown id");
                    acked.push(i);
                    if acked.len() == KILL_AT {
                        b.kill();
                    }
                }
                e => panic!(
                    "publisher on a: expected a PUBACK ({} acknowledged so far), got {e:?}",
                    acked.len()
                ),
            }
        }
        acked
    };
    let acked = tokio::time::timeout(Duration::from_secs(40), body)
        .await
        .expect("the 2,000 publishes were not all acknowledged within 40 s");
    assert!(!b.is_running(), "node b was killed mid-stream");

    // Wait until every acknowledged message has been received at least once.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let missing: Vec<usize> = {
            let seen = seen.lock().unwrap();
            acked
                .iter()
                .copied()
                .filter(|i| !seen.contains(i))
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        // A device task that ended early panicked: show why.
        if let Some(i) = devices.iter().position(|h| h.is_finished()) {
            stop.store(true, Ordering::Relaxed);
            let r = devices.swap_remove(i).await;
            panic!("device task ended early: {:?}", r.err());
        }
        if Instant::now() >= deadline {
            stop.store(true, Ordering::Relaxed);
            panic!(
                "{} acknowledged message(s) never arrived, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(20)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut received = 0;
    let mut slowest_reconnect = Duration::ZERO;
    let mut out_of_order = Vec::new();
    let mut bad_resends = Vec::new();
    let mut resends_without_dup = 0;
    for h in devices {
        let (id, got, reconnect) = h.await.unwrap();
        received += got.len();
        slowest_reconnect = slowest_reconnect.max(reconnect.unwrap_or_default());
        // First receptions in publish order (ARCHITECTURE.md 1.5); a copy received again has
        // the packet id of the first (1.3), also when node c sends it. Its DUP flag (1.4) is
        // counted here and asserted by `resend_after_the_owner_dies_has_dup_and_its_packet_id`.
        let mut firsts: HashMap<usize, u16> = HashMap::new();
        let mut last = None;
        for (i, pkid, dup) in got {
            match firsts.get(&i) {
                None => {
                    firsts.insert(i, pkid);
                    if last.is_some_and(|l| i < l) {
                        out_of_order.push(format!("{id}: m{i} after m{}", last.unwrap()));
                    }
                    last = Some(i);
                }
                Some(&first) => {
                    if pkid != first {
                        bad_resends.push(format!(
                            "{id}: m{i} again with packet id {pkid} (first: {first})"
                        ));
                    }
                    if !dup {
                        resends_without_dup += 1;
                    }
                }
            }
        }
    }
    eprintln!(
        "node loss: {} acknowledged, {received} received, {} duplicates ({resends_without_dup} \
         without DUP=1), slowest reconnect to c {slowest_reconnect:?}",
        acked.len(),
        received - acked.len()
    );
    assert!(
        slowest_reconnect < Duration::from_secs(3),
        "a device's CONNECT to node c took {slowest_reconnect:?} (b is dead: no waiting on it)"
    );
    assert!(
        out_of_order.is_empty(),
        "first receptions out of order: {out_of_order:?}"
    );
    assert!(
        bad_resends.is_empty(),
        "{} resend(s) with another packet id: {:?}",
        bad_resends.len(),
        &bad_resends[..bad_resends.len().min(20)]
    );

    // Everything was acknowledged by the devices: the outboxes drain.
    let mut redis = cluster.redis().await;
    wait_until(
        Duration::from_secs(5),
        "every device outbox is empty",
        async || {
            for d in 0..DEVICES {
                if outbox_len_in(&mut redis, &format!("d{d:03}")).await > 0 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    drop(c);
}

/// A device: acknowledges and records every message ("m<i>"); when its node goes away it
/// reconnects to `fallback` with its persistent session. Returns its id, what it received
/// in order (index, packet id, DUP), and how long the reconnect's CONNACK took.
async fn device_loop(
    id: String,
    mut conn: Raw,
    fallback: SocketAddr,
    seen: Arc<Mutex<HashSet<usize>>>,
    stop: Arc<AtomicBool>,
) -> (String, Vec<(usize, u16, bool)>, Option<Duration>) {
    let mut got = Vec::new();
    let mut reconnect = None;
    loop {
        match conn.next(Duration::from_millis(100)).await {
            Event::Packet(Packet::Publish(p)) => {
                let i: usize = text(&p)
                    .strip_prefix('m')
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{id}: unexpected payload {p:?}"));
                assert_eq!(
                    p.topic,
                    format!("push/{id}"),
                    "{id} got another device's message"
                );
                got.push((i, p.pkid, p.dup));
                seen.lock().unwrap().insert(i);
                if p.qos != QoS::AtMostOnce {
                    let _ = try_puback(&mut conn, p.pkid).await;
                }
            }
            Event::Packet(_) => {}
            Event::Timeout => {
                if stop.load(Ordering::Relaxed) {
                    return (id, got, reconnect);
                }
            }
            Event::Closed => {
                assert!(
                    reconnect.is_none(),
                    "{id}: node c closed the connection too"
                );
                let started = Instant::now();
                let (c, ack) = Raw::connect_with(fallback, &Opts::new(&id).clean(false)).await;
                assert_eq!(ack.code, ConnectReturnCode::Success, "{id}: CONNACK from c");
                assert!(ack.session_present, "{id}: session present on c");
                reconnect = Some(started.elapsed());
                conn = c;
            }
        }
    }
}

/// ARCHITECTURE.md section 7, "owner node killed after sending, before the device's PUBACK":
/// redelivered on reconnect with DUP=1 and the same packet id. The device on B gets a push
/// (forwarded from A) and does not acknowledge it; B is killed at once; on C the message comes
/// again with DUP=1 and the same packet id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_after_the_owner_dies_has_dup_and_its_packet_id() {
    let cluster = Cluster::new(Some(SHORT_SWEEP));
    let a = cluster.node("a").await;
    let mut b = cluster.node("b").await;
    let c = cluster.node("c").await;

    let (mut device, _) = Raw::connect_ok(b.addr(), &Opts::new("dev-dup").clean(false)).await;
    let mut backend = Raw::connect(a.addr(), "backend").await;
    backend
        .publish("push/dev-dup", b"once", QoS::AtLeastOnce, false)
        .await;
    let first = recv(&mut device, Duration::from_secs(2), "the push on b").await;
    assert!(!first.dup, "a first send has DUP=0");
    b.kill();
    drop(device);

    let (mut device, present) = Raw::connect_ok(c.addr(), &Opts::new("dev-dup").clean(false)).await;
    assert!(present);
    let again = recv(&mut device, Duration::from_secs(2), "the resend on c").await;
    assert_eq!(text(&again), "once");
    assert_eq!(
        again.pkid, first.pkid,
        "a resend keeps its packet id across nodes"
    );
    assert!(
        again.dup,
        "a message b wrote to the device before dying was resent by c with DUP=0 \
         (the sent watermark was not in Redis before the write)"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Lost forwards

/// A TCP proxy in front of a node's node-to-node listener, which the test can cut.
struct Proxy {
    addr: SocketAddr,
    inner: Arc<Mutex<ProxyInner>>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyInner {
    cut: bool,
    accepted: usize,
    links: Vec<tokio::task::AbortHandle>,
    /// Connections accepted while cut: held open, never read nor forwarded (a blackhole).
    held: Vec<TcpStream>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(ProxyInner {
            cut: false,
            accepted: 0,
            links: Vec::new(),
            held: Vec::new(),
        }));
        let state = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                let mut g = state.lock().unwrap();
                g.accepted += 1;
                if g.cut {
                    g.held.push(down);
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                g.links.push(link.abort_handle());
            }
        });
        Proxy { addr, inner, task }
    }

    fn accepted(&self) -> usize {
        self.inner.lock().unwrap().accepted
    }

    /// Drops every forwarded connection; new ones are accepted and then ignored.
    fn cut(&self) {
        let mut g = self.inner.lock().unwrap();
        g.cut = true;
        for l in g.links.drain(..) {
            l.abort();
        }
    }

    /// Forwards again; the blackholed connections are closed.
    fn heal(&self) {
        let mut g = self.inner.lock().unwrap();
        g.cut = false;
        g.held.clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// The link A -> B goes through a proxy (B advertises the proxy). With the link cut,
/// a push published on A still reaches the device on B, by B's sweep (1 s); after the link
/// is healed, pushes are forwarded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_forwards_are_recovered_by_the_sweep() {
    let cluster = Cluster::new(Some(SHORT_SWEEP));
    let b_cluster = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = Proxy::start(b_cluster).await;
    let mut args = NodeArgs::new(Some("b"));
    args.cluster_listen = b_cluster.to_string();
    args.advertise = Some(proxy.addr.to_string());
    let b = cluster.node_with(args).await;
    let a = cluster.node("a").await;

    let (mut device, _) = Raw::connect_ok(b.addr(), &Opts::new("dev-cut").clean(false)).await;
    let mut backend = Raw::connect(a.addr(), "backend").await;

    // Through the proxy first.
    backend
        .publish("push/dev-cut", b"before-cut", QoS::AtLeastOnce, false)
        .await;
    let p = recv(&mut device, Duration::from_secs(2), "before-cut").await;
    assert_eq!(text(&p), "before-cut");
    device.puback(p.pkid).await;
    assert!(
        proxy.accepted() >= 1,
        "node a reached b without dialing its advertised address (the proxy)"
    );

    proxy.cut();
    let received_before = b
        .metric(r#"herald_cluster_forwards_received_total{kind="push"}"#)
        .await;
    let wakeups_before = b.metric("herald_cluster_sweep_wakeups_total").await;
    for i in 1..=3 {
        let started = Instant::now();
        backend
            .publish(
                "push/dev-cut",
                format!("cut-{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "PUBACK took {:?} with the link cut",
            started.elapsed()
        );
    }
    let published = Instant::now();
    for i in 1..=3 {
        let left = Duration::from_secs(3).saturating_sub(published.elapsed());
        let p = recv(
            &mut device,
            left,
            &format!("cut-{i} with the link cut (sweep 1 s)"),
        )
        .await;
        assert_eq!(text(&p), format!("cut-{i}"));
        device.puback(p.pkid).await;
    }
    eprintln!(
        "lost forwards: delivered {:?} after the publishes",
        published.elapsed()
    );
    assert_eq!(
        b.metric(r#"herald_cluster_forwards_received_total{kind="push"}"#)
            .await,
        received_before,
        "node b received a forward through a cut link"
    );
    assert!(
        b.metric("herald_cluster_sweep_wakeups_total").await > wakeups_before,
        "the sweep on b delivered the messages but did not count a wakeup"
    );

    // Healed: a dials b again and pushes are forwarded (not only swept) again.
    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let payload = format!("healed-{n}");
        backend
            .publish("push/dev-cut", payload.as_bytes(), QoS::AtLeastOnce, false)
            .await;
        let p = recv(&mut device, Duration::from_secs(3), &payload).await;
        assert_eq!(text(&p), payload);
        device.puback(p.pkid).await;
        if b.metric(r#"herald_cluster_forwards_received_total{kind="push"}"#)
            .await
            > received_before
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after the link healed, node a still does not forward to b"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------
// 5. Restart with the same node id

/// B is killed and restarted with the same id and ports: a route naming the old incarnation
/// is ignored at once (PUBACK without delay, counted as stale), and the device back on B
/// gets pushes through A within 2 s, long before node_ttl (10 s) and the sweep (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_with_the_same_id_is_used_at_once() {
    let cluster = Cluster::new(None);
    let a = cluster.node("a").await;
    let mut args = NodeArgs::new(Some("b"));
    args.cluster_listen = format!("127.0.0.1:{}", free_port());
    let mut b = cluster.node_with(args).await;

    let (mut device, _) = Raw::connect_ok(b.addr(), &Opts::new("dev-r").clean(false)).await;
    let mut backend = Raw::connect(a.addr(), "backend").await;
    backend
        .publish("push/dev-r", b"before", QoS::AtLeastOnce, false)
        .await;
    let p = recv(&mut device, Duration::from_secs(2), "before the restart").await;
    assert_eq!(text(&p), "before");
    device.puback(p.pkid).await;
    // The ack is applied before b dies (a ping is answered after the PUBACK is read).
    device.ping().await;

    b.kill();
    assert!(
        closed_at(device, Duration::from_secs(2)).await.is_some(),
        "the device saw b die"
    );
    let stale_before = a.metric("herald_cluster_stale_routes_total").await;
    b.restart().await;

    // The route still names b's previous incarnation: stored and acknowledged at once.
    let started = Instant::now();
    backend
        .publish("push/dev-r", b"while-away", QoS::AtLeastOnce, false)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "PUBACK took {:?} for a device routed to a dead incarnation",
        started.elapsed()
    );
    // Ignored as stale by a (its cached alive table already names the new incarnation) or
    // by the new b (the forward names the old one); either way, counted.
    wait_until(
        Duration::from_secs(2),
        "a or the new b counts the route to b's old incarnation as stale",
        async || {
            a.metric("herald_cluster_stale_routes_total").await - stale_before
                + b.metric("herald_cluster_stale_routes_total").await
                >= 1.0
        },
    )
    .await;

    let started = Instant::now();
    let (mut device, present) = Raw::connect_ok(b.addr(), &Opts::new("dev-r").clean(false)).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "CONNACK took {:?} on the restarted node",
        started.elapsed()
    );
    assert!(present, "session present on the restarted node");
    let p = recv(
        &mut device,
        Duration::from_secs(2),
        "the message published while away",
    )
    .await;
    assert_eq!(text(&p), "while-away");
    device.puback(p.pkid).await;

    let forwards_before = b
        .metric(r#"herald_cluster_forwards_received_total{kind="push"}"#)
        .await;
    let started = Instant::now();
    backend
        .publish("push/dev-r", b"after", QoS::AtLeastOnce, false)
        .await;
    let p = recv(
        &mut device,
        Duration::from_secs(2),
        "a push through a after b's restart",
    )
    .await;
    assert_eq!(text(&p), "after");
    eprintln!(
        "restart: push after the restart took {:?}",
        started.elapsed()
    );
    assert!(
        b.metric(r#"herald_cluster_forwards_received_total{kind="push"}"#)
            .await
            > forwards_before,
        "the new incarnation of b got the push by its sweep, not by a forward"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Ordinary topics

/// A subscriber on B gets what is published on A: a wildcard (#, +) and an exact filter,
/// one copy each; a retained message published on A reaches a later subscriber on B with
/// RETAIN=1; the will of a client on A reaches the subscriber on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_topics_retained_and_wills_cross_nodes() {
    let cluster = Cluster::new(Some(SHORT_SWEEP));
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;

    let mut sub = Raw::connect(b.addr(), "watcher").await;
    sub.sub("news/#", QoS::AtLeastOnce).await;
    sub.sub("sensors/+/temp", QoS::AtLeastOnce).await;
    sub.sub("alerts/fire", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(a.addr(), "publisher").await;
    wait_interest(&mut sub, &mut publisher, "news/probe").await;
    wait_interest(&mut sub, &mut publisher, "sensors/probe/temp").await;
    wait_interest(&mut sub, &mut publisher, "alerts/fire").await;

    for (topic, payload) in [
        ("news/x", "hello"),
        ("sensors/k1/temp", "21.5"),
        ("alerts/fire", "fire!"),
    ] {
        publisher
            .publish(topic, payload.as_bytes(), QoS::AtLeastOnce, false)
            .await;
        let p = recv(&mut sub, Duration::from_secs(2), &format!("{topic} on b")).await;
        assert_eq!((p.topic.as_str(), text(&p).as_str()), (topic, payload));
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert!(!p.retain);
        sub.puback(p.pkid).await;
    }
    // One copy each: nothing else before a marker published after them.
    let extra: Vec<_> = sub
        .until_marker(&mut publisher, "news/marker")
        .await
        .into_iter()
        .filter(|p| &p.payload[..] != PROBE)
        .collect();
    assert!(extra.is_empty(), "extra copies on b: {extra:?}");

    // Retained on a, a later subscriber on b.
    publisher
        .publish("cfg/r1", b"ret-1", QoS::AtLeastOnce, true)
        .await;
    // Retained messages are sent right after the SUBACK; should b learn of them a moment
    // late, a new subscription a little later gets it (noted: tighter is better).
    let mut late = Raw::connect(b.addr(), "late").await;
    let published = Instant::now();
    let mut attempts = 0;
    let p = loop {
        attempts += 1;
        late.sub("cfg/#", QoS::AtLeastOnce).await;
        if let Some(p) = recv_within(&mut late, Duration::from_millis(500)).await {
            break p;
        }
        assert!(
            published.elapsed() < Duration::from_secs(3),
            "a retained message published on a never reached a new subscriber on b \
             ({attempts} subscriptions over 3 s)"
        );
        late.unsubscribe(&["cfg/#"]).await;
    };
    if attempts > 1 {
        eprintln!(
            "NOTE: retained message reached b only on subscription {attempts}, {:?} after its PUBACK",
            published.elapsed()
        );
    }
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("cfg/r1", "ret-1"));
    assert!(
        p.retain,
        "a retained message to a new subscriber has RETAIN=1"
    );

    // A will of a client on a.
    let (doomed, _) = Raw::connect_ok(
        a.addr(),
        &Opts::new("doomed").will("news/will", b"gone", QoS::AtLeastOnce, false),
    )
    .await;
    drop(doomed); // the socket closes without DISCONNECT
    let p = recv(
        &mut sub,
        Duration::from_secs(3),
        "the will of a client on a",
    )
    .await;
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("news/will", "gone"));
    assert!(
        a.metric(r#"herald_cluster_forwards_total{kind="publish"}"#)
            .await
            >= 1.0,
        "node a forwarded no ordinary publish"
    );
}

// ---------------------------------------------------------------------------------------
// Beyond the brief: a moving persistent subscriber, a lost kick, a dead node's interest

/// A persistent subscriber to `news/#` made on B goes offline; a QoS 1 publish on A is kept
/// for it; it comes back on C, gets that message, and from then on gets each new message on
/// its topics exactly once (its old node no longer serves it too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_subscriber_moves_between_nodes() {
    let cluster = Cluster::new(Some(SHORT_SWEEP));
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let c = cluster.node("c").await;

    let (mut w, _) = Raw::connect_ok(b.addr(), &Opts::new("wanderer").clean(false)).await;
    w.sub("news/#", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(a.addr(), "publisher").await;
    wait_interest(&mut w, &mut publisher, "news/probe").await;
    w.disconnect().await;

    publisher
        .publish("news/offline-1", b"kept", QoS::AtLeastOnce, false)
        .await;

    let (mut w, present) = Raw::connect_ok(c.addr(), &Opts::new("wanderer").clean(false)).await;
    assert!(present, "the session made on b is present on c");
    let p = recv(
        &mut w,
        Duration::from_secs(3),
        "the message kept while offline",
    )
    .await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        ("news/offline-1", "kept")
    );
    w.puback(p.pkid).await;

    // Its subscription now lives on c.
    wait_interest(&mut w, &mut publisher, "news/probe").await;
    publisher
        .publish("news/online-1", b"once", QoS::AtLeastOnce, false)
        .await;
    let p = recv(&mut w, Duration::from_secs(2), "a live message on c").await;
    assert_eq!(text(&p), "once");
    w.puback(p.pkid).await;
    let mut copies = vec![p];
    // Nothing else before a marker (published after, from the same node): no second copy
    // stored by b for its old, offline subscription. The sweep (1 s) would deliver such a
    // copy even if its forward were lost, so wait past it.
    let deadline = Instant::now() + Duration::from_millis(1500);
    while let Some(p) =
        recv_within(&mut w, deadline.saturating_duration_since(Instant::now())).await
    {
        w.puback(p.pkid).await;
        copies.push(p);
    }
    let extra: Vec<_> = copies[1..]
        .iter()
        .map(|p| (p.topic.clone(), text(p), p.dup))
        .collect();
    assert!(
        extra.is_empty(),
        "the subscriber that moved from b to c got more: {extra:?} (b still stores for its old subscription?)"
    );
    drop((b, c));
}

/// A kick lost on the way (the link to the old node is cut) is made up by the old node's
/// sweep: the old connection is closed within a couple of sweep intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_kick_is_recovered_by_the_sweep() {
    let cluster = Cluster::new(Some(SHORT_SWEEP));
    let b_cluster = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = Proxy::start(b_cluster).await;
    let mut args = NodeArgs::new(Some("b"));
    args.cluster_listen = b_cluster.to_string();
    args.advertise = Some(proxy.addr.to_string());
    let b = cluster.node_with(args).await;
    let a = cluster.node("a").await;

    let (old, _) = Raw::connect_ok(b.addr(), &Opts::new("kicked").clean(false)).await;
    let old_closed = tokio::spawn(closed_at(old, Duration::from_secs(5)));
    proxy.cut();

    let connect_sent = Instant::now();
    let (mut new, present) = Raw::connect_ok(a.addr(), &Opts::new("kicked").clean(false)).await;
    assert!(present);
    let closed = old_closed
        .await
        .unwrap()
        .expect("node b never closed the old connection (kick lost, sweep every 1 s)");
    let took = closed.saturating_duration_since(connect_sent);
    eprintln!("lost kick: old connection closed {took:?} after the new CONNECT");
    assert!(
        took <= Duration::from_secs(3),
        "old connection closed {took:?} after the new CONNECT (sweep every 1 s)"
    );
    assert!(
        b.metric("herald_cluster_remote_kicks_total").await >= 1.0,
        "node b closed the connection without counting a remote kick"
    );

    // The new connection is the one that works.
    let mut backend = Raw::connect(a.addr(), "backend").await;
    backend
        .publish("push/kicked", b"to-new", QoS::AtLeastOnce, false)
        .await;
    let p = recv(
        &mut new,
        Duration::from_secs(2),
        "a push to the new connection",
    )
    .await;
    assert_eq!(text(&p), "to-new");
}

/// B has a subscriber to `news/#` and is killed; C has one too. A QoS 1 publish on A to
/// `news/...` is still acknowledged at once (B's subscriber is gone with B: its session is
/// served again where it reconnects) and reaches the subscriber on C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_does_not_block_publishes_on_ordinary_topics() {
    let cluster = Cluster::new(Some(SHORT_SWEEP));
    let a = cluster.node("a").await;
    let mut b = cluster.node("b").await;
    let c = cluster.node("c").await;

    let mut on_b = Raw::connect(b.addr(), "sub-b").await;
    on_b.sub("news/#", QoS::AtLeastOnce).await;
    let mut on_c = Raw::connect(c.addr(), "sub-c").await;
    on_c.sub("news/#", QoS::AtLeastOnce).await;
    let mut publisher = Raw::connect(a.addr(), "publisher").await;
    wait_interest(&mut on_b, &mut publisher, "news/probe").await;
    wait_interest(&mut on_c, &mut publisher, "news/probe").await;

    b.kill();
    assert!(
        closed_at(on_b, Duration::from_secs(2)).await.is_some(),
        "the subscriber on b saw b die"
    );

    // Until a PUBACK: a refused publish (connection closed) is retried on a new connection,
    // as a client would, so that the failure says how long publishing was blocked.
    let started = Instant::now();
    let mut refusals = 0;
    'retry: loop {
        let pkid = publisher
            .send_publish("news/after-kill", b"still-works", QoS::AtLeastOnce, false)
            .await;
        loop {
            match publisher.next(Duration::from_secs(15)).await {
                Event::Packet(Packet::PubAck(ack)) if ack.pkid == pkid => break 'retry,
                Event::Packet(_) => {}
                Event::Closed if started.elapsed() < Duration::from_secs(20) => {
                    refusals += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    publisher = Raw::connect(a.addr(), "publisher").await;
                    continue 'retry;
                }
                e => panic!(
                    "publisher on a: no PUBACK {:?} after node b died: {e:?}",
                    started.elapsed()
                ),
            }
        }
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "PUBACK on an ordinary topic took {took:?} ({refusals} attempt(s) refused with the \
         connection closed) because a node with a subscriber had died"
    );
    let p = recv(
        &mut on_c,
        Duration::from_secs(2),
        "the publish at the subscriber on c",
    )
    .await;
    assert_eq!(text(&p), "still-works");
}

// ---------------------------------------------------------------------------------------
// 7. Config

#[test]
fn cluster_listen_needs_the_redis_store() {
    let out = run_briefly(&["--listen", "127.0.0.1:0", "--cluster-listen", "127.0.0.1:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(
        err.contains("cluster.listen"),
        "names cluster.listen: {err}"
    );

    let out = run_briefly(&[
        "--listen",
        "127.0.0.1:0",
        "--store",
        "memory",
        "--cluster-listen",
        "127.0.0.1:0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(
        err.contains("cluster.listen"),
        "names cluster.listen: {err}"
    );

    // The same from the TOML file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, "[cluster]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = run_briefly(&[
        "--listen",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(
        err.contains("cluster.listen"),
        "names cluster.listen: {err}"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Default node id

/// Without --node-id a node is `<hostname>:<client port>`, which routes name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_node_id_is_hostname_and_client_port() {
    let cluster = Cluster::new(None);
    let node = cluster.node_with(NodeArgs::new(None)).await;
    let (_device, _) = Raw::connect_ok(node.addr(), &Opts::new("dev-id").clean(false)).await;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    assert_eq!(
        route_node(&mut cluster.redis().await, "dev-id").await,
        Some(format!("{host}:{}", node.addr().port()))
    );
}

/// Forwards for one device can overtake each other (each waits for its own route lookup).
/// A fresh connection that has not read any entry yet must then read its outbox rather
/// than take the first hint as the start: with the sweep out of reach, every message still
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overtaking_forwards_to_fresh_devices_lose_nothing() {
    const DEVICES: usize = 40;
    const EACH: usize = 25;
    let cluster = Cluster::new(Some("[cluster]\nsweep_interval = \"60s\"\n"));
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let (d, _) = Raw::connect_ok(b.addr(), &Opts::new(&format!("ovt-{i}")).clean(false)).await;
        devices.push(d);
    }
    let mut backend = Raw::connect(a.addr(), "backend-ovt").await;
    let mut unacked = std::collections::HashSet::new();
    for n in 0..EACH {
        for i in 0..DEVICES {
            let pkid = backend
                .send_publish(
                    &format!("push/ovt-{i}"),
                    n.to_string().as_bytes(),
                    QoS::AtLeastOnce,
                    false,
                )
                .await;
            unacked.insert(pkid);
        }
    }
    while !unacked.is_empty() {
        match backend.expect(Duration::from_secs(10)).await {
            Packet::PubAck(ack) => assert!(unacked.remove(&ack.pkid)),
            p => panic!("backend got {p:?}"),
        }
    }
    let receivers = devices
        .into_iter()
        .enumerate()
        .map(|(i, mut d)| async move {
            let mut got = std::collections::BTreeSet::new();
            while got.len() < EACH {
                let Some(p) = recv_within(&mut d, Duration::from_secs(5)).await else {
                    panic!("ovt-{i}: only {} of {EACH} arrived: {got:?}", got.len());
                };
                try_puback(&mut d, p.pkid).await;
                got.insert(text(&p).parse::<usize>().expect("numeric payload"));
            }
        });
    futures::future::join_all(receivers).await;
}

// ---------------------------------------------------------------------------------------
// The link over TLS

/// With `cluster.tls`, nodes dial each other over TLS (certificates for 127.0.0.1 from the
/// test CA) and a push still crosses two hops at once: the sweep is set to a minute, so
/// only the forward over the link can deliver it within the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_crosses_a_tls_link() {
    let pki = common::pki::Pki::get();
    let server = pki.server();
    let config = format!(
        "[cluster]\nsweep_interval = \"60s\"\ntls = true\ntls_ca = {:?}\n[tls]\ncert = {:?}\nkey = {:?}\n",
        pki.ca_path(),
        server.cert,
        server.key
    );
    let cluster = Cluster::new(Some(&config));
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let (mut device, _) = Raw::connect_ok(b.addr(), &Opts::new("dev-tls-link").clean(false)).await;
    let mut backend = Raw::connect(a.addr(), "backend-tls-link").await;
    backend
        .publish("push/dev-tls-link", b"over tls", QoS::AtLeastOnce, false)
        .await;
    let p = recv(
        &mut device,
        Duration::from_secs(3),
        "the push over the TLS link",
    )
    .await;
    assert_eq!(text(&p), "over tls");
    assert_eq!(
        b.metric(r#"herald_cluster_forwards_received_total{kind="push"}"#)
            .await,
        1.0,
        "delivered by a forward over the link, not by a sweep"
    );
}
