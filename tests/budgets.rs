//! Byte budgets against hostile clients: each test runs its own `herald` process (so its RSS
//! and its metrics are its own), attacks it the way issue 11 found it could be run out of
//! memory, and checks that its resident memory stays within a stated bound and that honest
//! clients are still served.
//!
//! Counters are read from that process (`process::Broker`), so they count this test alone.
//!
//! The bounds are generous against what the budgets allow (a few MiB per attacking
//! connection) and far below what the attacks cost before the budgets (hundreds of MiB to
//! GiBs): they tell the two apart without depending on the allocator's exact behaviour.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::process::{Broker, Launch};
use common::*;

const MIB: u64 = 1 << 20;

/// Resident memory of `node` now, bytes.
fn rss(node: &Broker) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A connected client whose socket takes almost nothing: it reads its CONNACK (and what
/// `then` sends and waits for) and nothing after.
async fn non_reader(addr: SocketAddr, id: &str) -> Raw {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut c = Raw::from_stream(socket.connect(addr).await.unwrap()).await;
    c.send_raw(&Opts::new(id).encode()).await.unwrap();
    assert!(matches!(c.expect(WAIT).await, Packet::ConnAck(_)));
    c
}

/// A device that gets a push, in time, while an attack runs: its round trip in ms.
async fn push_round_trip(publisher: &mut Raw, device: &mut Raw, id: &str, n: u32) -> u128 {
    let started = std::time::Instant::now();
    let body = format!("honest-{n}");
    publisher
        .publish(
            &format!("push/{id}"),
            body.as_bytes(),
            QoS::AtLeastOnce,
            false,
        )
        .await;
    let p = device.expect_publish().await;
    assert_eq!(text(&p), body);
    device.puback(p.pkid).await;
    started.elapsed().as_millis()
}

/// Retained amplification: one retained message of 1 MiB, then SUBSCRIBEs that name its
/// topic 1,000 times, or through many overlapping filters, from clients that never read.
/// Before the budgets each such connection cost about 1 GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_amplification_stays_within_the_write_budget() {
    let node = Broker::start("").await;
    let addr = node.addr();
    let mut setter = Raw::connect(addr, "setter").await;
    setter
        .publish("big/r", &vec![b'r'; 1000 * 1024], QoS::AtMostOnce, true)
        .await;
    setter.ping().await;
    let base = rss(&node);

    let mut attackers = Vec::new();
    let same: Vec<(&str, QoS)> = (0..1000).map(|_| ("big/r", QoS::AtMostOnce)).collect();
    let overlapping: Vec<(&str, QoS)> = [
        "big/r", "big/+", "+/r", "#", "big/#", "+/+", "+/#", "big/r/#",
    ]
    .iter()
    .map(|f| (*f, QoS::AtMostOnce))
    .collect();
    for (i, filters) in [&same, &same, &overlapping, &overlapping]
        .iter()
        .enumerate()
    {
        let mut a = non_reader(addr, &format!("amp-{i}")).await;
        a.send_raw(&subscribe_bytes(0x82, 1, filters))
            .await
            .unwrap();
        attackers.push(a);
    }
    // Each attacker gets one copy written (alone in its empty write buffer) and no more:
    // the rest wait as pointers to the one retained message.
    node.wait_metric(r#"herald_messages_sent_total{qos="0"}"#, 4.0)
        .await;
    let mut device = Raw::connect(addr, "honest").await;
    for n in 0..20 {
        let ms = push_round_trip(&mut setter, &mut device, "honest", n).await;
        assert!(ms < 500, "push took {ms} ms during the attack");
    }
    let grown = rss(&node).saturating_sub(base);
    assert!(
        grown < 48 * MIB,
        "RSS grew {} MiB for 4 amplifying connections",
        grown / MIB
    );
    let sent = node.metric(r#"herald_messages_sent_total{qos="0"}"#).await;
    assert!(
        sent <= 8.0,
        "{sent} retained copies written to 4 non-readers"
    );
    drop(attackers);
}

/// Slow readers of large QoS 0 messages (two that never read, one that trickles): each holds
/// at most its write budget plus its mailbox budget, however much flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_large_messages_hold_their_budgets_only() {
    let node = Broker::start("").await;
    let addr = node.addr();
    let base = rss(&node);
    let mut readers = Vec::new();
    for i in 0..2 {
        let mut r = non_reader(addr, &format!("slow-{i}")).await;
        r.sub("slow/t", QoS::AtMostOnce).await;
        readers.push(r);
    }
    let mut trickler = non_reader(addr, "trickle").await;
    trickler.sub("slow/t", QoS::AtMostOnce).await;
    let trickle = tokio::spawn(async move {
        // About 64 KB/s, for as long as the flood lasts.
        let mut buf = vec![0u8; 6400];
        for _ in 0..200 {
            if trickler.stream_mut().read(&mut buf).await.unwrap_or(0) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let mut publisher = Raw::connect(addr, "flood").await;
    let payload = vec![b'x'; 512 * 1024];
    let mut peak = 0;
    for _ in 0..200 {
        publisher
            .publish("slow/t", &payload, QoS::AtMostOnce, false)
            .await;
        peak = peak.max(rss(&node));
    }
    publisher
        .publish("sync", b"", QoS::AtLeastOnce, false)
        .await;
    peak = peak.max(rss(&node));
    node.wait_metric(
        r#"herald_messages_dropped_total{reason="mailbox_full"}"#,
        1.0,
    )
    .await;
    // 100 MiB went to each reader; each may hold ~2 MiB.
    let grown = peak.saturating_sub(base);
    assert!(
        grown < 48 * MIB,
        "RSS peaked {} MiB over the start with three slow readers",
        grown / MIB
    );
    let mut device = Raw::connect(addr, "honest").await;
    push_round_trip(&mut publisher, &mut device, "honest", 0).await;
    trickle.abort();
}

/// Pushes to devices that never connect: `session.max_queued_bytes` keeps the newest of each,
/// `store.max_bytes` bounds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_bytes_are_bounded_per_client_and_in_total() {
    let node =
        Broker::start("[session]\nmax_queued_bytes = \"4MiB\"\n[store]\nmax_bytes = \"32MiB\"\n")
            .await;
    let addr = node.addr();
    let base = rss(&node);
    let mut publisher = Raw::connect(addr, "backend").await;
    let payload = vec![b'p'; 512 * 1024];
    // 12 x 512 KB for one device: the newest 7 fit in 4 MiB.
    for i in 0..12u8 {
        let mut p = payload.clone();
        p[0] = i;
        publisher
            .publish("push/phone", &p, QoS::AtLeastOnce, false)
            .await;
    }
    // 200 x 512 KB over devices that never come: 100 MiB offered, 32 MiB kept.
    for i in 0..200 {
        publisher
            .publish(
                &format!("push/ghost-{i}"),
                &payload,
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    node.wait_metric(r#"herald_limit_hits_total{limit="store_max_bytes"}"#, 1.0)
        .await;
    node.wait_metric(
        r#"herald_limit_hits_total{limit="session_max_queued_bytes"}"#,
        1.0,
    )
    .await;
    let grown = rss(&node).saturating_sub(base);
    assert!(grown < 64 * MIB, "RSS grew {} MiB", grown / MIB);

    let (mut phone, _) = Raw::connect_ok(addr, &Opts::new("phone").clean(false)).await;
    let mut got = Vec::new();
    for _ in 0..7 {
        let p = phone.expect_publish().await;
        got.push(p.payload[0]);
        phone.puback(p.pkid).await;
    }
    assert_eq!(got, (5..12).collect::<Vec<u8>>(), "the newest 7 of 12");
    // And no more: a QoS 0 push is never stored, so it comes after whatever the outbox held.
    let rest = phone.until_marker(&mut publisher, "push/phone").await;
    assert!(
        rest.is_empty(),
        "more than the newest 7 were kept: {:?}",
        rest.iter().map(|p| p.payload[0]).collect::<Vec<_>>()
    );
}

/// Sockets that send the start of a huge CONNECT and stop: without a will they are closed
/// as soon as the header says it is over `server.max_connect_size`; with a will they share
/// one process-wide budget, and those beyond it are closed at once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_connects_are_bounded() {
    let node = Broker::start("").await;
    let addr = node.addr();
    // CONNECT header announcing `len` bytes: "MQTT", level 4, flags, keepalive.
    let header = |len: usize, will: bool| {
        let mut h = fixed_header(0x10, len);
        h.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4]);
        h.push(if will { 0x06 } else { 0x02 });
        h.extend_from_slice(&[0, 30]);
        h
    };

    let base = rss(&node);
    // Without a will: closed at once, each one.
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&header(1 << 20, false)).await.unwrap();
        let _ = s.write_all(&[0u8; 60_000]).await;
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(WAIT, s.read(&mut b)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "not closed: {n:?}");
    }
    node.wait_metric(
        r#"herald_limit_hits_total{limit="server_max_connect_size"}"#,
        50.0,
    )
    .await;
    // With a will (up to the largest valid CONNECT, 320 KB): 64 MiB between them, so of
    // 250 announcing 300 KB (75 MB), at least 20 are closed.
    let mut open = Vec::new();
    for _ in 0..250 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&header(300_000, true)).await.unwrap();
        let _ = s.write_all(&[0u8; 150 * 1024]).await;
        open.push(s);
    }
    node.wait_metric(r#"herald_limit_hits_total{limit="large_connects"}"#, 20.0)
        .await;
    // More than any valid CONNECT, will or not: closed at once.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&header(1 << 20, true)).await.unwrap();
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(WAIT, s.read(&mut b)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "not closed: {n:?}");
    let grown = rss(&node).saturating_sub(base);
    assert!(grown < 96 * MIB, "RSS grew {} MiB", grown / MIB);
    // Honest clients still connect.
    let mut c = Raw::connect(addr, "honest").await;
    c.ping().await;
    drop(open);
}

/// The node paused for longer than its clients' keepalive: no client that kept pinging is
/// cut off (and no will published) when it resumes; the stall is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_does_not_kick_clients_that_kept_pinging() {
    let node = Broker::start("").await;
    let addr = node.addr();
    let mut watcher = Raw::connect(addr, "watcher").await;
    watcher.sub("will/#", QoS::AtMostOnce).await;
    let (mut a, _) = Raw::connect_ok(
        addr,
        &Opts::new("pinger")
            .keepalive(2)
            .will("will/pinger", b"gone", QoS::AtMostOnce, false),
    )
    .await;
    a.ping().await;

    let pid = node.pid().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    // The client keeps pinging while the node is paused: its PINGREQs wait in the socket.
    for _ in 0..10 {
        a.send_raw(&[0xc0, 0]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    signal("-CONT");
    node.wait_metric("herald_stalls_total", 1.0).await;
    // Every PINGREQ gets its answer, and the connection stays.
    for _ in 0..10 {
        match a.expect(WAIT).await {
            Packet::PingResp => {}
            p => panic!("expected PINGRESP, got {p:?}"),
        }
    }
    for _ in 0..4 {
        a.ping().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    watcher
        .publish("will/marker", MARKER, QoS::AtMostOnce, false)
        .await;
    let p = watcher.expect_publish().await;
    assert_eq!(p.topic, "will/marker", "a will was published: {p:?}");
}

/// Out of descriptors: clients beyond the capacity are closed at once (not left hanging),
/// the metrics listener still answers, and connections work again once some close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_closes_new_clients_at_once() {
    let node = Broker::launch(
        "",
        Launch {
            nofile: Some(256),
            ..Launch::default()
        },
    )
    .await;
    let addr = node.addr();
    let mut clients = Vec::new();
    let mut refused = 0;
    for i in 0..240 {
        let mut c = Raw::open(addr).await;
        let _ = c.send_raw(&Opts::new(&format!("fd-{i}")).encode()).await;
        match c.next(WAIT).await {
            Event::Packet(Packet::ConnAck(_)) => clients.push(c),
            Event::Closed => refused += 1,
            e => panic!("client {i} left hanging: {e:?}"),
        }
    }
    // 256 descriptors, a quarter kept back: 192 clients at most.
    assert!(
        (170..=192).contains(&clients.len()),
        "{} connected, {refused} refused",
        clients.len()
    );
    assert!(
        node.metric(r#"herald_connections_rejected_total{reason="descriptors"}"#)
            .await
            >= f64::from(refused)
    );
    assert!(node.log().contains("connection capacity"), "{}", node.log());
    clients.truncate(100);
    for attempt in 0.. {
        let mut c = Raw::open(addr).await;
        let _ = c.send_raw(&Opts::new("after").encode()).await;
        if let Event::Packet(Packet::ConnAck(_)) = c.next(WAIT).await {
            c.ping().await;
            break;
        }
        assert!(attempt < 100, "no connection after descriptors were freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The memory guard: near `server.max_memory` publishers stop being read, and at it new
/// connections get CONNACK 3; both counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_guard_slows_publishers_then_refuses_connections() {
    let node = Broker::start("[server]\nmax_memory = \"96MiB\"\n").await;
    let addr = node.addr();
    let payload = vec![b'm'; 512 * 1024];
    let mut refused = false;
    for i in 0..400 {
        let (mut c, ack) = Raw::connect_with(addr, &Opts::new(&format!("pub-{i}"))).await;
        if ack.code == ConnectReturnCode::ServiceUnavailable {
            refused = true;
            break;
        }
        // One message per connection: the guard reads no more from a publisher.
        let _ = c
            .send_publish(&format!("push/off-{i}"), &payload, QoS::AtLeastOnce, false)
            .await;
        std::mem::forget(c);
    }
    assert!(refused, "no CONNACK 3 before 200 MiB were offered");
    assert!(node.metric("herald_memory_guard_level").await >= 2.0);
    assert!(
        node.metric(r#"herald_connections_rejected_total{reason="memory"}"#)
            .await
            >= 1.0
    );
    assert!(node.log().contains("memory guard"), "{}", node.log());
    // Sampled every 20 ms: what arrives between two samples can overshoot a little.
    assert!(rss(&node) < 128 * MIB, "RSS {} MiB", rss(&node) / MIB);
}
