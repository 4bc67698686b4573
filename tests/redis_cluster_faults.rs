//! Faults of a Redis Cluster under Herald while pushes flow: real `redis-server` nodes
//! (tests/common/redis_cluster.rs, 3 primaries with a replica each), a real `herald`
//! process (`process::Broker`) on `redis+cluster://`, a publisher and devices over MQTT.
//!
//! - a primary SIGKILLed mid-stream with `store.redis_wait_replicas = 1`: its replica is
//!   promoted and nothing acknowledged is lost;
//! - a slot migrated (IMPORTING/MIGRATING, keys moved, slot handed over) while its clients'
//!   pushes flow: the hot path follows ASK then MOVED and nothing is lost or refused;
//! - a whole shard down, then back: the store is down for every client meanwhile (CONNACK 3,
//!   no PUBACK), and everything recovers without restarting Herald.
//!
//! The publisher keeps a window of QoS 1 pushes in flight, round robin over its devices,
//! and resends whatever was not acknowledged when Herald closes its connection (a new
//! attempt, with a payload of its own: `<index>:<attempt>`). Every acknowledged attempt
//! must reach its device, the first copies in the order they were acknowledged; a copy of
//! an attempt the device already had (Herald's resend of the same entry) must carry DUP=1
//! and the same packet id. Devices acknowledge everything at once and reconnect whenever
//! Herald closes them (CONNACK 3 while the store is down is retried).
//!
//! Also: no PUBACK follows a publish that was not stored while later ones were (the bug
//! the failover test found: `no_acknowledgement_follows_a_publish_that_was_not_stored`).
//! A failover that loses entries a device has read makes the new primary number new entries
//! with their numbers: the device's connection is ended rather than let a late PUBACK
//! delete a push acknowledged after the failover
//! (`a_late_puback_for_a_lost_entry_does_not_delete_a_newer_push`). Ignored, a known
//! limitation: the clients of a slot being migrated are refused
//! (`clients_of_a_migrating_slot_connect_and_get_their_first_push`).
//!
//! Without redis-server and redis-cli installed each test prints a SKIPPED line and
//! passes.

mod common;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{Broker, Launch};
use common::redis_cluster::RedisCluster;
use common::{frame, http, publish_bytes, ConnectReturnCode, Event, Opts, Packet, QoS, Raw, WAIT};
use herald::redis::keys::client_slot;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

/// How long a test waits for Herald to follow a change of the cluster, or for messages to
/// arrive. Only reached on failure.
const FOLLOW: Duration = Duration::from_secs(30);

/// QoS 1 pushes the publisher keeps in flight (over all its devices).
const WINDOW: usize = 32;

/// How long the publisher waits for a PUBACK or the end of its connection: a store call
/// gives up after 3 s (`redis::CALL_TIMEOUT`), so anything longer is a stuck publish.
const PUBACK_WAIT: Duration = Duration::from_secs(10);

/// Every outbox may hold everything a test pushes (the default cap, 1000, would drop the
/// oldest and count them, which is not what these tests are about).
const CONFIG: &str = "[session]\nmax_queued_messages = 60000\n";

/// Starts a `herald` process on `cluster` with `toml` as its config.
async fn start_herald(cluster: &RedisCluster, toml: &str) -> Broker {
    Broker::launch(
        toml,
        Launch {
            name: Some("herald".into()),
            redis_url: Some(cluster.url()),
            dir: Some(cluster.dir().to_path_buf()),
            ..Launch::default()
        },
    )
    .await
}

/// `n` client ids `<prefix>-<i>` whose keys are on the shard serving `slot`.
fn ids_on_shard_of(cluster: &RedisCluster, slot: u16, prefix: &str, n: usize) -> Vec<String> {
    let map = cluster.slot_map();
    let shard = map.shard_of_slot(slot).expect("slot served");
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|id| client_slot(id).and_then(|s| map.shard_of_slot(s)) == Some(shard))
        .take(n)
        .collect()
}

/// A client id `<prefix>-<i>` whose keys are on another shard than `slot`'s.
fn id_off_shard_of(cluster: &RedisCluster, slot: u16, prefix: &str) -> String {
    let map = cluster.slot_map();
    let shard = map.shard_of_slot(slot).expect("slot served");
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| client_slot(id).and_then(|s| map.shard_of_slot(s)) != Some(shard))
        .expect("an id on another shard")
}

/// `n` client ids `<prefix>-<i>` whose keys are all in one hash slot (no hash tag trick:
/// plain ids that happen to hash alike), and that slot.
fn ids_in_one_slot(prefix: &str, n: usize) -> (u16, Vec<String>) {
    let first = format!("{prefix}-0");
    let slot = client_slot(&first).expect("a slot");
    let ids = (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|id| client_slot(id) == Some(slot))
        .take(n)
        .collect();
    (slot, ids)
}

// ---------------------------------------------------------------------------------------
// Clients

/// How often a client was refused or cut off while connecting.
#[derive(Default)]
struct Refusals {
    /// CONNACK 3 (server unavailable): the store is down.
    unavailable: AtomicUsize,
    /// Closed or silent before a CONNACK.
    dropped: AtomicUsize,
}

/// Connects with `opts`, again and again until Herald accepts (CONNACK 0). CONNACK 3 and a
/// connection closed before its CONNACK are retried (counted in `refusals`); any other
/// return code fails the test.
async fn connect_retrying(
    addr: SocketAddr,
    opts: &Opts,
    refusals: &Refusals,
    within: Duration,
) -> Raw {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            let mut c = Raw::from_stream(stream).await;
            if c.send_raw(&opts.encode()).await.is_ok() {
                match c.next(WAIT).await {
                    Event::Packet(Packet::ConnAck(a)) => match a.code {
                        ConnectReturnCode::Success => return c,
                        ConnectReturnCode::ServiceUnavailable => {
                            refusals.unavailable.fetch_add(1, Ordering::Relaxed);
                        }
                        code => panic!("CONNACK {code:?} for {}", opts.id),
                    },
                    Event::Packet(p) => panic!("{} got {p:?} before its CONNACK", opts.id),
                    Event::Closed | Event::Timeout => {
                        refusals.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "herald did not accept {} within {within:?}",
            opts.id
        );
        // Pacing between attempts, not a wait for anything.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The CONNACK a fresh clean-session client gets now.
async fn connack_now(addr: SocketAddr, id: &str) -> ConnectReturnCode {
    let (c, ack) = Raw::connect_with(addr, &Opts::new(id)).await;
    if ack.code == ConnectReturnCode::Success {
        c.disconnect().await;
    }
    ack.code
}

/// One PUBLISH as a device got it.
#[derive(Clone, Debug)]
struct Got {
    payload: String,
    dup: bool,
    pkid: u16,
}

/// A device with a persistent session, in a task of its own: it acknowledges every
/// PUBLISH at once and records it, and reconnects whenever Herald closes it.
struct Device {
    id: String,
    log: Arc<Mutex<Vec<Got>>>,
    /// Connections Herald accepted.
    connects: Arc<AtomicUsize>,
    refusals: Arc<Refusals>,
    task: JoinHandle<()>,
}

impl Device {
    /// Registers the persistent session and leaves: pushes are queued for it from now on.
    async fn register(addr: SocketAddr, id: &str) {
        let (c, _) = Raw::connect_ok(addr, &Opts::new(id).clean(false)).await;
        c.disconnect().await;
    }

    fn spawn(addr: SocketAddr, id: &str) -> Device {
        let log = Arc::new(Mutex::new(Vec::new()));
        let connects = Arc::new(AtomicUsize::new(0));
        let refusals = Arc::new(Refusals::default());
        let task = Device::run(addr, id, &log, &connects, &refusals);
        Device {
            id: id.to_string(),
            log,
            connects,
            refusals,
            task,
        }
    }

    fn run(
        addr: SocketAddr,
        id: &str,
        log: &Arc<Mutex<Vec<Got>>>,
        connects: &Arc<AtomicUsize>,
        refusals: &Arc<Refusals>,
    ) -> JoinHandle<()> {
        let (id, log, connects, refusals) = (
            id.to_string(),
            log.clone(),
            connects.clone(),
            refusals.clone(),
        );
        tokio::spawn(async move {
            // Keepalive well beyond a test's length: the device sends nothing but acks.
            let opts = Opts::new(&id).clean(false).keepalive(600);
            loop {
                let mut conn = connect_retrying(addr, &opts, &refusals, FOLLOW * 2).await;
                connects.fetch_add(1, Ordering::Relaxed);
                loop {
                    match conn.next(Duration::from_secs(3600)).await {
                        Event::Packet(Packet::Publish(p)) => {
                            log.lock().push(Got {
                                payload: String::from_utf8_lossy(&p.payload).into_owned(),
                                dup: p.dup,
                                pkid: p.pkid,
                            });
                            let ack = frame(0x40, &p.pkid.to_be_bytes());
                            if conn.send_raw(&ack).await.is_err() {
                                break;
                            }
                        }
                        Event::Packet(_) | Event::Timeout => {}
                        Event::Closed => break,
                    }
                }
            }
        })
    }

    /// Drops the connection without a DISCONNECT (as a lost network would) and connects
    /// again, keeping the log.
    fn cut(&mut self, addr: SocketAddr) {
        self.task.abort();
        self.task = Device::run(addr, &self.id, &self.log, &self.connects, &self.refusals);
    }

    /// Whether every attempt in `acked` has arrived (in any order).
    fn has_all(&self, acked: &[Attempt]) -> bool {
        let log = self.log.lock();
        let got: std::collections::HashSet<&str> = log.iter().map(|g| g.payload.as_str()).collect();
        acked.iter().all(|a| got.contains(a.payload().as_str()))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One attempt at a push: the device (its index in the publisher's list), the message's
/// index for that device, the attempt's number (unique over the publisher), and when it
/// was sent.
#[derive(Clone, Debug)]
struct Attempt {
    device: usize,
    index: u64,
    attempt: u64,
    sent: Instant,
    /// When its PUBACK came.
    acked: Option<Instant>,
}

impl Attempt {
    fn payload(&self) -> String {
        format!("{}:{}", self.index, self.attempt)
    }
}

/// What the publisher has seen so far.
#[derive(Default)]
struct Published {
    /// Per device, the acknowledged attempts in the order their PUBACKs came.
    acked: Vec<Vec<Attempt>>,
    /// Connections Herald closed under the publisher (a publish it could not store).
    closed: usize,
}

/// A publisher in a task of its own: QoS 1 pushes to `devices`, `WINDOW` in flight, round
/// robin, until `stop`; then it resends until everything it sent is acknowledged, and ends.
struct Publisher {
    state: Arc<Mutex<Published>>,
    stop: Arc<AtomicBool>,
    refusals: Arc<Refusals>,
    task: Option<JoinHandle<()>>,
}

impl Publisher {
    fn spawn(addr: SocketAddr, id: &str, devices: &[String]) -> Publisher {
        let state = Arc::new(Mutex::new(Published {
            acked: vec![Vec::new(); devices.len()],
            closed: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let refusals = Arc::new(Refusals::default());
        let task = tokio::spawn(publish_loop(
            addr,
            id.to_string(),
            devices.to_vec(),
            state.clone(),
            stop.clone(),
            refusals.clone(),
        ));
        Publisher {
            state,
            stop,
            refusals,
            task: Some(task),
        }
    }

    fn acked(&self, device: usize) -> usize {
        self.state.lock().acked[device].len()
    }

    fn closed(&self) -> usize {
        self.state.lock().closed
    }

    /// Fails the test with the task's panic if it ended early.
    async fn check(&mut self) {
        if self.task.as_ref().is_some_and(JoinHandle::is_finished) {
            let task = self.task.take().expect("checked");
            match task.await {
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                r => panic!("the publisher ended before it was stopped: {r:?}"),
            }
        }
    }

    /// Waits until `cond` holds, failing with `what` after `within` or if the publisher
    /// failed.
    async fn wait(&mut self, within: Duration, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            self.check().await;
            if cond(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every device has `more` acknowledged pushes beyond `from[device]`.
    async fn wait_acked(&mut self, from: &[usize], more: usize, what: &str) {
        let what = format!("{more} more pushes are acknowledged to every device ({what})");
        self.wait(FOLLOW, &what, |p| {
            from.iter()
                .enumerate()
                .all(|(d, &n)| p.acked(d) >= n + more)
        })
        .await;
    }

    fn acked_now(&self) -> Vec<usize> {
        self.state.lock().acked.iter().map(Vec::len).collect()
    }

    /// Stops new pushes, waits until everything sent is acknowledged, and returns the
    /// acknowledged attempts per device.
    async fn finish(mut self) -> Vec<Vec<Attempt>> {
        self.stop.store(true, Ordering::Relaxed);
        let task = self.task.take().expect("running");
        match tokio::time::timeout(FOLLOW, task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("publisher: {e}"),
            Err(_) => panic!("the publisher still had unacknowledged pushes after {FOLLOW:?}"),
        }
        std::mem::take(&mut self.state.lock().acked)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

async fn publish_loop(
    addr: SocketAddr,
    id: String,
    devices: Vec<String>,
    state: Arc<Mutex<Published>>,
    stop: Arc<AtomicBool>,
    refusals: Arc<Refusals>,
) {
    let topics: Vec<String> = devices.iter().map(|d| format!("push/{d}")).collect();
    let mut next_index = vec![0u64; devices.len()];
    // Pushes to send (again) before any new one, in their first order.
    let mut resend: VecDeque<(usize, u64)> = VecDeque::new();
    let (mut attempts, mut turn, mut pkid) = (0u64, 0usize, 0u16);
    let opts = Opts::new(&id).keepalive(600);
    loop {
        if stop.load(Ordering::Relaxed) && resend.is_empty() {
            return;
        }
        let mut conn = connect_retrying(addr, &opts, &refusals, FOLLOW * 2).await;
        // In flight on this connection, in the order sent: (packet id, attempt).
        let mut inflight: VecDeque<(u16, Attempt)> = VecDeque::new();
        let closed = 'conn: loop {
            while inflight.len() < WINDOW {
                let (device, index) = match resend.pop_front() {
                    Some(p) => p,
                    None if !stop.load(Ordering::Relaxed) => {
                        let d = turn % devices.len();
                        turn += 1;
                        next_index[d] += 1;
                        (d, next_index[d] - 1)
                    }
                    None => break,
                };
                attempts += 1;
                pkid = pkid.checked_add(1).unwrap_or(1);
                let a = Attempt {
                    device,
                    index,
                    attempt: attempts,
                    sent: Instant::now(),
                    acked: None,
                };
                let bytes = publish_bytes(
                    topics[device].as_bytes(),
                    a.payload().as_bytes(),
                    1,
                    pkid,
                    false,
                    false,
                );
                inflight.push_back((pkid, a));
                if conn.send_raw(&bytes).await.is_err() {
                    break 'conn true;
                }
            }
            if inflight.is_empty() {
                conn.disconnect().await;
                break false;
            }
            match conn.next(PUBACK_WAIT).await {
                Event::Packet(Packet::PubAck(ack)) => {
                    // One connection's PUBACKs come in the order of its publishes.
                    let (sent_id, a) = inflight.pop_front().expect("in flight");
                    assert_eq!(
                        ack.pkid, sent_id,
                        "PUBACK {} out of order (expected {sent_id})",
                        ack.pkid
                    );
                    let mut a = a;
                    a.acked = Some(Instant::now());
                    state.lock().acked[a.device].push(a);
                }
                Event::Packet(p) => panic!("the publisher got {p:?}"),
                Event::Closed => break true,
                Event::Timeout => panic!(
                    "no PUBACK for {:?} and the connection still open after {PUBACK_WAIT:?}",
                    inflight.front()
                ),
            }
        };
        if closed {
            state.lock().closed += 1;
            // Resent in their first order, ahead of anything not sent yet.
            for (_, a) in inflight.into_iter().rev() {
                resend.push_front((a.device, a.index));
            }
        } else {
            return;
        }
    }
}

/// Checks what `device` got against what was acknowledged for it: every acknowledged
/// attempt arrived, the first copies in acknowledgement order (which is publish order);
/// a second copy of one attempt carries DUP=1 and the first copy's packet id; the
/// acknowledged indexes are 0, 1, 2... (each push acknowledged once, in order).
fn check_device(device: &Device, acked: &[Attempt]) -> DeviceSummary {
    let log = device.log.lock().clone();
    let id = &device.id;
    for (k, a) in acked.iter().enumerate() {
        assert_eq!(a.index, k as u64, "{id}: push {k} acknowledged out of turn");
    }
    let mut first: HashMap<&str, (usize, &Got)> = HashMap::new();
    let mut dups = 0;
    for (pos, g) in log.iter().enumerate() {
        match first.get(g.payload.as_str()) {
            None => {
                first.insert(&g.payload, (pos, g));
            }
            Some((at, earlier)) => {
                dups += 1;
                assert!(
                    g.dup,
                    "{id}: {:?} (at {pos}) is a resend of the one at {at} without DUP=1",
                    g.payload
                );
                assert_eq!(
                    g.pkid, earlier.pkid,
                    "{id}: {:?} (at {pos}) resent with another packet id",
                    g.payload
                );
            }
        }
    }
    let mut last: Option<(usize, &Attempt)> = None;
    for a in acked {
        let payload = a.payload();
        let Some(&(pos, _)) = first.get(payload.as_str()) else {
            panic!(
                "{id}: acknowledged push {payload:?} never arrived ({} acknowledged, {} received)",
                acked.len(),
                log.len()
            );
        };
        if let Some((before, b)) = last {
            assert!(
                pos > before,
                "{id}: acknowledged push {payload:?} arrived (at {pos}) before {:?} (at {before}), \
                 which was acknowledged earlier",
                b.payload()
            );
        }
        last = Some((pos, a));
    }
    DeviceSummary {
        acked: acked.len(),
        received: log.len(),
        dups,
        unacked_extra: first.len() - acked.len(),
        connects: device.connects.load(Ordering::Relaxed),
        unavailable: device.refusals.unavailable.load(Ordering::Relaxed),
    }
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug
struct DeviceSummary {
    acked: usize,
    received: usize,
    /// Copies of an attempt the device already had.
    dups: usize,
    /// Attempts that arrived without having been acknowledged (stored, then the
    /// connection was lost before the PUBACK): the publisher's resend makes them extra.
    unacked_extra: usize,
    connects: usize,
    unavailable: usize,
}

/// Checks every device's deliveries: waits until each has every attempt acknowledged for
/// it; then cuts each one's connection and lets it connect again, and waits until its
/// outbox in Redis is empty, so that whatever the outbox still held (acks dropped while
/// the store was down, entries in flight at the cut) came again; then checks each
/// (`check_device`: a second copy must be a resend, DUP=1 with its packet id).
async fn check_deliveries(
    cluster: &RedisCluster,
    addr: SocketAddr,
    devices: &mut [Device],
    acked: &[Vec<Attempt>],
) -> Vec<DeviceSummary> {
    let deadline = Instant::now() + FOLLOW;
    for (d, a) in devices.iter().zip(acked) {
        while !d.has_all(a) {
            if Instant::now() >= deadline {
                // check_device says what is missing.
                return vec![check_device(d, a)];
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for d in devices.iter_mut() {
        d.cut(addr);
    }
    for d in devices.iter() {
        let key = common::keys::outbox(&d.id);
        let slot = client_slot(&d.id).expect("slot");
        let mut xlen = redis::cmd("XLEN");
        xlen.arg(&key);
        let what = format!("{key} is empty after a reconnect");
        common::wait_until(FOLLOW, &what, async || {
            let primary = cluster.primary_for_slot(slot);
            cluster.query::<u64>(primary, &xlen).ok() == Some(0)
        })
        .await;
    }
    devices
        .iter()
        .zip(acked)
        .map(|(d, a)| check_device(d, a))
        .collect()
}

/// How many keys `node` holds in `slot`.
fn keys_in_slot(cluster: &RedisCluster, node: usize, slot: u16) -> usize {
    let mut c = redis::cmd("CLUSTER");
    c.arg("COUNTKEYSINSLOT").arg(slot);
    cluster.query(node, &c).expect("CLUSTER COUNTKEYSINSLOT")
}

/// `/readyz` of `herald`: 200 while the store is up, 503 while it is down.
async fn readyz(herald: &Broker) -> u16 {
    http(herald.metrics_addr(), "GET", "/readyz").await.0
}

// ---------------------------------------------------------------------------------------
// The tests

/// The primary of the devices' shard is SIGKILLed while pushes to them flow, with
/// `store.redis_wait_replicas = 1`: its replica is promoted, the old primary comes back as
/// its replica (until then the shard has no replica, so no write to it can be confirmed),
/// and every push that got a PUBACK reaches its device: the live ones (which may be closed
/// and reconnect) and one that was offline throughout and replays from the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_pushes_survive_a_primary_failover() {
    let started = Instant::now();
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let toml = format!("{CONFIG}[store]\nredis_wait_replicas = 1\n");
    let herald = start_herald(&cluster, &toml).await;
    let pid = herald.pid();
    let addr = herald.addr();

    // Three devices on the victim's shard (two live, one offline until the end), one on
    // another shard.
    let victim = ids_on_shard_of(
        &cluster,
        client_slot("fo-dev-0").expect("slot"),
        "fo-dev",
        3,
    );
    let slot = client_slot(&victim[0]).expect("slot");
    let elsewhere = id_off_shard_of(&cluster, slot, "fo-other");
    let ids = vec![
        victim[0].clone(),
        victim[1].clone(),
        victim[2].clone(),
        elsewhere,
    ];
    Device::register(addr, &ids[2]).await;
    let live = [
        Device::spawn(addr, &ids[0]),
        Device::spawn(addr, &ids[1]),
        Device::spawn(addr, &ids[3]),
    ];
    let mut publisher = Publisher::spawn(addr, "fo-backend", &ids);
    let zero = vec![0; ids.len()];
    publisher
        .wait_acked(&zero, 300, "before the failover")
        .await;
    let flowing = started.elapsed();

    let before = publisher.acked_now();
    let killed = cluster.kill_primary_for_slot(slot);
    // When the primary is dead (SIGKILL, and waited for): pushes sent from here on can
    // reach no replica until the old primary is back.
    let killed_at = Instant::now();
    let promoted = tokio::task::block_in_place(|| cluster.wait_failover(slot));
    let failed_over = killed_at.elapsed();
    assert_ne!(promoted, killed);
    common::wait_until(FOLLOW, "herald says its store is up", async || {
        readyz(&herald).await == 200
    })
    .await;
    let store_up = killed_at.elapsed();
    // The shard has no replica now: WAIT 1 cannot be met there, so the pushes to it are
    // refused (their connection closed) until the old primary is back as the new one's
    // replica, while the other shard's may be acknowledged meanwhile. Twice, before that.
    let closed = publisher.closed();
    let other_before = publisher.acked(3);
    publisher
        .wait(FOLLOW, "pushes refused for want of a replica", |p| {
            p.closed() >= closed + 2
        })
        .await;
    let other_degraded = publisher.acked(3) - other_before;
    let rejoining_at = Instant::now();
    tokio::task::block_in_place(|| cluster.restart(killed));
    assert_eq!(cluster.replicas_for_slot(slot), vec![killed]);
    let rejoined = killed_at.elapsed();
    publisher
        .wait_acked(&before, 300, "after the failover")
        .await;
    let recovered = killed_at.elapsed();
    let closed = publisher.closed();
    let acked = publisher.finish().await;
    // No push to the shard sent after the kill was acknowledged before the old primary
    // began to rejoin: its WAIT could have been met by no replica.
    for a in acked[..3].iter().flatten() {
        let acked_at = a.acked.expect("acknowledged");
        assert!(
            a.sent < killed_at || acked_at >= rejoining_at,
            "{a:?} was sent {:?} after the kill and acknowledged {:?} after it, while its \
             shard had no replica (the old primary began to rejoin {:?} after the kill)",
            a.sent - killed_at,
            acked_at - killed_at,
            rejoining_at - killed_at,
        );
    }

    let [a, b, other] = live;
    let mut devices = [a, b, Device::spawn(addr, &ids[2]), other];
    let summaries = check_deliveries(&cluster, addr, &mut devices, &acked).await;
    assert_eq!(herald.pid(), pid, "herald restarted");
    herald
        .assert_metric("herald_messages_dropped_total", 0.0)
        .await;
    eprintln!(
        "failover: pushes flowing after {flowing:?}; killed node {killed}, node {promoted} \
         promoted after {failed_over:?}, store up after {store_up:?}, {other_degraded} pushes \
         to the other shard acknowledged while the shard had no replica, old primary back as \
         its replica after {rejoined:?}, pushes acknowledged to every device again after \
         {recovered:?}; publisher connections closed by herald: {closed}; acknowledged \
         before the kill: {before:?}; devices: {summaries:#?}; test took {:?}",
        started.elapsed()
    );
}

/// A slot is moved to another primary while pushes to three devices in it flow (two live,
/// one offline until the end): pushes go on while the slot is MIGRATING with its keys
/// still on the old primary, after the keys moved (the old primary answers ASK), and after
/// the slot was handed over (MOVED). The hot path follows both before answering, so the
/// store never goes down, no publish is refused, and every push arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_flow_through_a_slot_migration() {
    let started = Instant::now();
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let herald = start_herald(&cluster, CONFIG).await;
    let addr = herald.addr();
    let (slot, ids) = ids_in_one_slot("mig-dev", 3);
    let from = cluster.primary_for_slot(slot);
    let to = cluster.other_primary(slot);

    Device::register(addr, &ids[2]).await;
    let live = [Device::spawn(addr, &ids[0]), Device::spawn(addr, &ids[1])];
    let mut publisher = Publisher::spawn(addr, "mig-backend", &ids);
    let zero = vec![0; ids.len()];
    publisher
        .wait_acked(&zero, 200, "before the migration")
        .await;

    let mut steps = Vec::new();
    let t = Instant::now();
    cluster.migrate_slot_begin(slot, to);
    let now = publisher.acked_now();
    publisher
        .wait_acked(&now, 200, "while the slot is MIGRATING, keys unmoved")
        .await;
    steps.push(("begin", t.elapsed()));

    let t = Instant::now();
    let moved = tokio::task::block_in_place(|| cluster.migrate_slot_keys(slot));
    // Each device's outbox and its byte count at least (the offline one's session too).
    assert!(moved >= 2 * ids.len(), "only {moved} keys moved");
    let now = publisher.acked_now();
    publisher
        .wait_acked(&now, 200, "after the keys moved (ASK)")
        .await;
    steps.push(("keys", t.elapsed()));
    // The writes since went to the new primary (after ASKING), none to the old one.
    assert_eq!(
        keys_in_slot(&cluster, from, slot),
        0,
        "keys on the old primary"
    );
    assert_eq!(
        keys_in_slot(&cluster, to, slot),
        moved,
        "keys on the new primary"
    );

    let t = Instant::now();
    tokio::task::block_in_place(|| cluster.migrate_slot_end(slot));
    assert_eq!(cluster.primary_for_slot(slot), to);
    let now = publisher.acked_now();
    publisher
        .wait_acked(&now, 200, "after the slot moved (MOVED)")
        .await;
    steps.push(("end", t.elapsed()));

    let closed = publisher.closed();
    let refused = publisher.refusals.unavailable.load(Ordering::Relaxed);
    let acked = publisher.finish().await;
    let live_connects: Vec<usize> = live
        .iter()
        .map(|d| d.connects.load(Ordering::Relaxed))
        .collect();
    let [a, b] = live;
    let mut devices = [a, b, Device::spawn(addr, &ids[2])];
    let summaries = check_deliveries(&cluster, addr, &mut devices, &acked).await;
    eprintln!(
        "migration of slot {slot} from node {from} to node {to}, {moved} keys: {steps:?}; \
         devices: {summaries:#?}; test took {:?}",
        started.elapsed()
    );
    // Redirects are not failures: nothing was refused, no connection was closed.
    assert_eq!(closed, 0, "herald closed the publisher's connection");
    assert_eq!(refused, 0, "the publisher got CONNACK 3");
    assert_eq!(live_connects, [1, 1], "a live device was closed");
    assert_eq!(readyz(&herald).await, 200);
    herald
        .assert_metric("herald_messages_dropped_total", 0.0)
        .await;
}

/// A whole shard (its primary and its replica) is SIGKILLed while pushes flow, then
/// started again. Today's model: the store counts as up only while every primary answers,
/// so while one shard is down the store is down for every client, whatever shard its keys
/// are on: new CONNECTs get CONNACK 3, a push to any device gets no PUBACK (its
/// connection is closed), connections already open stay. When the shard is back, Herald
/// (the same process) recovers by itself: connections are accepted again, the publisher
/// that kept retrying gets its pushes acknowledged, and every acknowledged push arrives,
/// to the live devices and to one offline throughout whose queue was on the stopped shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_down_stops_the_store_for_everyone_until_it_is_back() {
    let started = Instant::now();
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let herald = start_herald(&cluster, CONFIG).await;
    let pid = herald.pid();
    let addr = herald.addr();
    // Two devices on the shard that goes down (one live, one offline until the end), one
    // live elsewhere.
    let down = ids_on_shard_of(
        &cluster,
        client_slot("sh-dev-0").expect("slot"),
        "sh-dev",
        2,
    );
    let slot = client_slot(&down[0]).expect("slot");
    let up = id_off_shard_of(&cluster, slot, "sh-up");
    let ids = vec![down[0].clone(), down[1].clone(), up.clone()];
    Device::register(addr, &ids[1]).await;
    let live = [Device::spawn(addr, &ids[0]), Device::spawn(addr, &ids[2])];
    // Connected before the outage: an idle client, and one publisher per live device for
    // a single push each during it.
    let mut idle = Raw::connect_ok(addr, &Opts::new("sh-idle").keepalive(600))
        .await
        .0;
    let mut probes = Vec::new();
    for i in 0..2 {
        probes.push(Raw::connect(addr, &format!("sh-probe-{i}")).await);
    }
    let mut publisher = Publisher::spawn(addr, "sh-backend", &ids);
    let zero = vec![0; ids.len()];
    publisher.wait_acked(&zero, 200, "before the outage").await;

    let stopped_at = Instant::now();
    let shard = cluster.stop_shard(slot);
    // Herald finds out by itself (its probe asks every primary).
    common::wait_until(FOLLOW, "herald says its store is down", async || {
        readyz(&herald).await == 503
    })
    .await;
    let down_at = Instant::now();
    let noticed = stopped_at.elapsed();
    // New CONNECTs are refused, whichever shard the client's keys are on.
    let fresh_down = ids_on_shard_of(&cluster, slot, "sh-new", 1).remove(0);
    let fresh_up = id_off_shard_of(&cluster, slot, "sh-new");
    for id in [&fresh_down, &fresh_up] {
        assert_eq!(
            connack_now(addr, id).await,
            ConnectReturnCode::ServiceUnavailable,
            "CONNECT of {id} while a shard is down"
        );
    }
    // A push to either device is not acknowledged: the connection is closed instead.
    for (probe, device) in probes.iter_mut().zip([&ids[0], &ids[2]]) {
        let topic = format!("push/{device}");
        probe
            .send_publish(&topic, b"unstored", QoS::AtLeastOnce, false)
            .await;
        probe.expect_closed(Duration::from_secs(5)).await;
    }
    // A connection that needs no store keeps working.
    idle.ping().await;
    assert_eq!(readyz(&herald).await, 503);

    let back_at = Instant::now();
    tokio::task::block_in_place(|| cluster.start_shard(&shard));
    let restarted = back_at.elapsed();
    common::wait_until(FOLLOW, "herald says its store is up", async || {
        readyz(&herald).await == 200
    })
    .await;
    let recovered = back_at.elapsed();
    for id in [&fresh_down, &fresh_up] {
        assert_eq!(
            connack_now(addr, id).await,
            ConnectReturnCode::Success,
            "CONNECT of {id} after the shard is back"
        );
    }
    idle.ping().await;
    let now = publisher.acked_now();
    publisher.wait_acked(&now, 200, "after the outage").await;
    let closed = publisher.closed();
    let refused = publisher.refusals.unavailable.load(Ordering::Relaxed);
    let acked = publisher.finish().await;
    // While the store was down (as Herald said), nothing sent was acknowledged.
    for a in acked.iter().flatten() {
        assert!(
            a.sent < down_at || a.sent >= back_at,
            "{a:?} was sent while the store was down, and acknowledged"
        );
    }
    // The live devices' connections were kept through the outage.
    let live_connects: Vec<usize> = live
        .iter()
        .map(|d| d.connects.load(Ordering::Relaxed))
        .collect();
    let [a, b] = live;
    let mut devices = [a, Device::spawn(addr, &ids[1]), b];
    let summaries = check_deliveries(&cluster, addr, &mut devices, &acked).await;
    eprintln!(
        "shard down: herald noticed after {noticed:?}; shard restarted in {restarted:?}, \
         store up {recovered:?} after the restart began; publisher: {closed} connections \
         closed, {refused} CONNACK 3; devices: {summaries:#?}; test took {:?}",
        started.elapsed()
    );
    assert!(refused > 0, "the publisher was never refused");
    assert_eq!(live_connects, [1, 1], "a live device was closed");
    assert_eq!(herald.pid(), pid, "herald restarted");
    herald
        .assert_metric("herald_messages_dropped_total", 0.0)
        .await;
}

/// Sends `signal` (`-STOP`, `-CONT`) to the cluster's `node`, by the pid the fixture
/// started.
fn signal(cluster: &RedisCluster, node: usize, signal: &str) {
    let pid = cluster.pid(node).expect("node running");
    let ok = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {signal} {pid}");
}

/// A stream entry as XRANGE returns it: its id, then its fields and values.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Reads PUBLISHes on `device`, acknowledging each, until one with `payload` `until`;
/// returns the payloads before it.
async fn read_until(device: &mut Raw, until: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let p = match device.expect(FOLLOW).await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        };
        device.puback(p.pkid).await;
        let text = common::text(&p);
        if text == until {
            return got;
        }
        got.push(text);
    }
}

/// The promoted replica may lack entries that a device has already read from the old
/// primary: entries whose `WAIT` had not succeeded (so no publisher got a PUBACK for them,
/// and losing them is allowed). The new primary numbers the outbox's next entries from its
/// own last id (`XADD 0-*` in `scripts::ENQUEUE`), so pushes acknowledged *after* the
/// failover get those entries' numbers, and with them their packet ids; the device's
/// PUBACK for a lost entry would delete the new entry (`XDEL` by number), and its live
/// connection would skip the new entries (numbers below its cursor). Herald notices the
/// slot's new primary (`redis::lineage`) and ends the connections that read the old copy
/// instead: the device reconnects and gets every push acknowledged after the failover.
///
/// The replica is made to lag by stopping it (SIGSTOP) and cutting its link from the
/// primary, so that the entries written meanwhile are never replicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_puback_for_a_lost_entry_does_not_delete_a_newer_push() {
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let toml = format!("{CONFIG}[store]\nredis_wait_replicas = 1\n");
    let herald = start_herald(&cluster, &toml).await;
    let addr = herald.addr();
    let id = "lag-dev-0";
    let topic = format!("push/{id}");
    let slot = client_slot(id).expect("slot");
    let primary = cluster.primary_for_slot(slot);
    let replica = cluster.replicas_for_slot(slot)[0];
    let device_opts = Opts::new(id).clean(false).keepalive(600);
    let (mut device, _) = Raw::connect_ok(addr, &device_opts).await;
    let mut publisher = Raw::connect(addr, "lag-backend").await;
    publisher
        .publish(&topic, b"replicated", QoS::AtLeastOnce, false)
        .await;
    assert!(read_until(&mut device, "replicated").await.is_empty());

    // The replica stops receiving writes: WAIT 1 times out, no PUBACK, but the entries
    // are on the primary...
    signal(&cluster, replica, "-STOP");
    let mut kill_link = redis::cmd("CLIENT");
    kill_link.arg("KILL").arg("TYPE").arg("replica");
    let links: i64 = cluster.query(primary, &kill_link).expect("CLIENT KILL");
    assert_eq!(links, 1);
    for i in 0..3 {
        let payload = format!("unconfirmed-{i}");
        publisher
            .send_publish(&topic, payload.as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    publisher.expect_closed(FOLLOW).await;
    // ...where the device reads them when it reconnects, and holds its PUBACKs.
    device.disconnect().await;
    let (mut device, _) = Raw::connect_ok(addr, &device_opts).await;
    let mut unconfirmed = Vec::new();
    for i in 0..3 {
        let p = device.expect_publish().await;
        assert_eq!(common::text(&p), format!("unconfirmed-{i}"));
        unconfirmed.push(p.pkid);
    }

    // The primary dies; the replica, without those entries, takes over; the old primary
    // comes back as its replica, so that WAIT 1 can be met again.
    let killed = cluster.kill_primary_for_slot(slot);
    signal(&cluster, replica, "-CONT");
    let promoted = tokio::task::block_in_place(|| cluster.wait_failover(slot));
    tokio::task::block_in_place(|| cluster.restart(killed));
    common::wait_until(FOLLOW, "herald says its store is up", async || {
        readyz(&herald).await == 200
    })
    .await;
    let mut publisher = connect_retrying(
        addr,
        &Opts::new("lag-backend"),
        &Refusals::default(),
        FOLLOW,
    )
    .await;
    for i in 0..3 {
        let payload = format!("after-{i}");
        publisher
            .publish(&topic, payload.as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    // Where they are: their numbers are the unconfirmed entries' (the packet ids tell).
    let mut xrange = redis::cmd("XRANGE");
    xrange.arg(common::keys::outbox(id)).arg("-").arg("+");
    let entries: Vec<StreamEntry> = cluster.query(promoted, &xrange).expect("XRANGE");
    let stored: Vec<String> = entries
        .iter()
        .map(|(entry, fields)| {
            let payload = fields
                .first()
                .map(|(_, e)| e.as_slice())
                .unwrap_or_default();
            let after = payload.windows(6).position(|w| w == b"after-");
            let name = after.map(|p| String::from_utf8_lossy(&payload[p..p + 7]).into_owned());
            format!("{entry} {}", name.unwrap_or_default())
        })
        .collect();
    // The device acknowledges what it read before the failover. Herald ends its connection
    // instead (as soon as it sees those numbers used again, or at the first of these
    // PUBACKs), so the PUBACKs may meet a closed socket.
    for &pkid in &unconfirmed {
        let _ = device.send_raw(&frame(0x40, &pkid.to_be_bytes())).await;
    }
    assert!(
        device.closed_within(FOLLOW).await.is_some(),
        "the connection that read entries the failover lost stays open"
    );
    let (mut device, _) = Raw::connect_ok(addr, &device_opts).await;
    publisher
        .publish(&topic, b"replay-end", QoS::AtLeastOnce, false)
        .await;
    let got = read_until(&mut device, "replay-end").await;
    for i in 0..3 {
        let payload = format!("after-{i}");
        assert!(
            got.contains(&payload),
            "{payload}, acknowledged after the failover, never arrived: got {got:?}; the \
             outbox held {stored:?} before the device acknowledged packet ids {unconfirmed:?}"
        );
    }
}

/// Known limitation, ignored until fixed. While a slot is being migrated, Redis runs a
/// command on several keys only if the node holds all of them, and answers TRYAGAIN
/// otherwise (on the old primary when it holds some, on the new one after ASK when it
/// lacks any). Herald's attach script takes five keys of the client (`keys::SESSION_STATE`:
/// outbox, sent, session, subs, qbytes), some of which are usually missing (`subs` without
/// stored subscriptions, all of them for a new client), so every CONNECT of a client in
/// that slot gets CONNACK 3 until the migration ends (after redis-rs's retries, about
/// 0.4 s each); and the enqueue script's two keys (outbox, qbytes) are both missing for a
/// client that never had a message, so its first push gets no PUBACK (the publisher's
/// connection is closed) after the hot path's TRYAGAIN retries. Nothing is lost; the
/// slot's clients are refused for as long as the migration lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known limitation: multi-key scripts get TRYAGAIN while their slot migrates, \
            so its clients get CONNACK 3 and a new client's first push is refused"]
async fn clients_of_a_migrating_slot_connect_and_get_their_first_push() {
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let herald = start_herald(&cluster, CONFIG).await;
    let addr = herald.addr();
    let (slot, ids) = ids_in_one_slot("mig-new", 2);
    let to = cluster.other_primary(slot);
    // A client with a session and a queued push; another never seen.
    Device::register(addr, &ids[0]).await;
    let mut publisher = Raw::connect(addr, "mig-new-backend").await;
    let topic = format!("push/{}", ids[0]);
    publisher
        .publish(&topic, b"queued", QoS::AtLeastOnce, false)
        .await;

    cluster.migrate_slot_begin(slot, to);
    let (mut device, ack) = Raw::connect_with(addr, &Opts::new(&ids[0]).clean(false)).await;
    assert_eq!(
        ack.code,
        ConnectReturnCode::Success,
        "CONNECT of a client whose slot is MIGRATING"
    );
    assert_eq!(common::text(&device.expect_publish().await), "queued");
    let topic = format!("push/{}", ids[1]);
    publisher
        .send_publish(&topic, b"first", QoS::AtLeastOnce, false)
        .await;
    match publisher.next(FOLLOW).await {
        Event::Packet(Packet::PubAck(_)) => {}
        e => panic!("first push to a new client of a MIGRATING slot: {e:?}"),
    }
}

/// A publish the store refuses while the ones after it on the same connection are stored
/// (on a cluster: a client id whose keys cannot share a slot fails with CROSSSLOT alone,
/// as would a shard whose WAIT falls short): none after it is acknowledged either, so that
/// acknowledgements keep publish order and the client resends them all, in order. A QoS 2
/// message stored that way is still recognised when it is resent: delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledgement_follows_a_publish_that_was_not_stored() {
    let Some(cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let herald = start_herald(&cluster, CONFIG).await;
    let addr = herald.addr();
    Device::register(addr, "order-dev").await;
    let publisher_opts = Opts::new("order-backend").clean(false);
    let (mut publisher, _) = Raw::connect_ok(addr, &publisher_opts).await;
    // One write, so that Herald reads all three before the first one's store answers.
    let mut three = publish_bytes(b"push/}unstorable", b"refused", 1, 1, false, false);
    three.extend(publish_bytes(b"push/order-dev", b"one", 1, 2, false, false));
    three.extend(publish_bytes(b"push/order-dev", b"two", 2, 3, false, false));
    publisher.send_raw(&three).await.expect("send");
    match publisher.next(FOLLOW).await {
        Event::Closed => {}
        e => panic!("expected the connection closed without an acknowledgement, got {e:?}"),
    }
    // "one" and "two" were stored all the same.
    let slot = client_slot("order-dev").expect("slot");
    let mut xlen = redis::cmd("XLEN");
    xlen.arg(common::keys::outbox("order-dev"));
    let stored: u64 = cluster
        .query(cluster.primary_for_slot(slot), &xlen)
        .expect("XLEN");
    assert_eq!(stored, 2);

    // The client resends both after reconnecting, in order.
    let (mut publisher, present) = Raw::connect_ok(addr, &publisher_opts).await;
    assert!(present);
    let mut again = publish_bytes(b"push/order-dev", b"one", 1, 2, false, true);
    again.extend(publish_bytes(b"push/order-dev", b"two", 2, 3, false, true));
    publisher.send_raw(&again).await.expect("send");
    // PUBACK 2 and PUBREC 3, in either order: the resent QoS 2 message is known already and
    // answered at once, while "one" is being stored again.
    let mut answers = Vec::new();
    for _ in 0..2 {
        match publisher.expect(FOLLOW).await {
            Packet::PubAck(a) => answers.push(("PUBACK", a.pkid)),
            Packet::PubRec(r) => answers.push(("PUBREC", r.pkid)),
            p => panic!("expected PUBACK 2 and PUBREC 3, got {p:?}"),
        }
    }
    answers.sort_unstable();
    assert_eq!(answers, [("PUBACK", 2), ("PUBREC", 3)]);
    publisher.pubrel(3).await;
    match publisher.expect(FOLLOW).await {
        Packet::PubComp(c) => assert_eq!(c.pkid, 3),
        p => panic!("expected PUBCOMP 3, got {p:?}"),
    }
    publisher
        .publish("push/order-dev", b"end", QoS::AtLeastOnce, false)
        .await;
    let (mut device, _) = Raw::connect_ok(addr, &Opts::new("order-dev").clean(false)).await;
    let got = read_until(&mut device, "end").await;
    // "one" twice (stored, then its resend: QoS 1 allows it), "two" once.
    assert_eq!(got, ["one", "two", "one"]);
}
