//! The five scenarios of issue 3: idle, push, push-rate, qos0, drain; and those of issue 10:
//! handshake and login-storm.
//!
//! Every long-lived connection is one task; a publisher is two (writer and PUBACK reader).
//! Handshakes go through one semaphore so that at most `--concurrency` are in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{self, now_ns, Client, Hello, Ignore, OnPublish, Target};
use crate::procstat::{self, Probe};
use crate::redisstat;
use crate::report::ScenarioResult;
use crate::Opts;

/// Latency histogram in nanoseconds, 1 µs resolution, up to 10 minutes.
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 600_000_000_000, 3).expect("histogram bounds")
}

fn put_latency(r: &mut ScenarioResult, h: &Histogram<u64>) {
    if h.is_empty() {
        return;
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    r.metric("p50_us", us(h.value_at_quantile(0.50)));
    r.metric("p90_us", us(h.value_at_quantile(0.90)));
    r.metric("p99_us", us(h.value_at_quantile(0.99)));
    r.metric("p999_us", us(h.value_at_quantile(0.999)));
    r.metric("max_us", us(h.max()));
    r.metric("latency_samples", h.len() as f64);
}

/// Connection bookkeeping shared by the tasks of one group of clients.
#[derive(Default)]
struct Fleet {
    connected: AtomicU64,
    failed: AtomicU64,
    /// Lost after the handshake (closed by the broker or an I/O error).
    lost: AtomicU64,
    retries: AtomicU64,
    /// now_ns() of the last successful handshake.
    last_connect_ns: AtomicU64,
    not_present: AtomicU64,
    errors: Mutex<Vec<String>>,
    notify: Notify,
}

impl Fleet {
    fn note_error(&self, e: String) {
        let mut errs = self.errors.lock().unwrap();
        if errs.len() < 5 {
            errs.push(e);
        }
    }

    fn done(&self) -> u64 {
        self.connected.load(Relaxed) + self.failed.load(Relaxed)
    }

    /// Waits until `n` handshakes have finished (either way). False on timeout.
    async fn wait_handshakes(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if self.done() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.done() >= n;
            }
        }
    }

    fn report(&self, r: &mut ScenarioResult, prefix: &str) {
        let failed = self.failed.load(Relaxed);
        let lost = self.lost.load(Relaxed);
        r.metric(
            &format!("{prefix}retries"),
            self.retries.load(Relaxed) as f64,
        );
        if failed > 0 {
            r.error(format!("{prefix}{failed} connections failed"));
        }
        if lost > 0 {
            r.error(format!("{prefix}{lost} connections lost after connecting"));
        }
        for e in self.errors.lock().unwrap().iter() {
            r.errors.push(format!("{prefix}{e}"));
        }
    }
}

/// Opens a connection, retrying a few times (a full accept queue, a port still in use).
async fn open_retry<H: OnPublish>(
    o: &Opts,
    target: &Target,
    i: usize,
    hello: &Hello<'_>,
    h: &mut H,
    read_size: usize,
    fleet: &Fleet,
) -> Option<Client> {
    let mut last = String::new();
    for attempt in 0..4 {
        if attempt > 0 {
            fleet.retries.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
        }
        let t = Duration::from_secs_f64(o.handshake_timeout);
        match tokio::time::timeout(t, Client::open(target, i, hello, h, read_size)).await {
            Ok(Ok(c)) => {
                fleet.connected.fetch_add(1, Relaxed);
                fleet.last_connect_ns.fetch_max(now_ns(), Relaxed);
                fleet.notify.notify_one();
                return Some(c);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = "handshake timed out".into(),
        }
    }
    fleet.failed.fetch_add(1, Relaxed);
    fleet.note_error(format!("{}: {last}", hello.client_id));
    fleet.notify.notify_one();
    None
}

/// A connected client's life after the handshake: read (and acknowledge), ping, and on
/// `stop` send DISCONNECT.
async fn serve<H: OnPublish>(
    mut c: Client,
    h: &mut H,
    keep_alive: u16,
    stop: &CancellationToken,
    fleet: &Fleet,
) {
    let period = Duration::from_millis(u64::from(keep_alive.max(1)) * 750);
    let mut ping = tokio::time::interval_at(Instant::now() + period, period);
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        tokio::select! {
            biased;
            _ = &mut cancelled => {
                c.disconnect(Duration::from_secs(2)).await;
                return;
            }
            r = c.read_some(h) => match r {
                Ok(true) => {}
                Ok(false) => {
                    fleet.lost.fetch_add(1, Relaxed);
                    fleet.note_error("connection closed by the broker".into());
                    return;
                }
                Err(e) => {
                    fleet.lost.fetch_add(1, Relaxed);
                    fleet.note_error(format!("read: {e}"));
                    return;
                }
            },
            _ = ping.tick(), if keep_alive > 0 => {
                if let Err(e) = c.ping().await {
                    fleet.lost.fetch_add(1, Relaxed);
                    fleet.note_error(format!("ping: {e}"));
                    return;
                }
            }
        }
    }
}

/// Refuses to start a run that would hit the open-files limit half way.
fn check_fds(r: &mut ScenarioResult, conns: usize) -> bool {
    if let Some(limit) = procstat::fd_limit() {
        if conns as u64 + 64 > limit {
            r.error(format!(
                "{conns} connections need more than this process's open-files limit ({limit}); \
                 run several herald-bench processes or raise ulimit -n"
            ));
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------------------
// idle

pub async fn idle(o: &Opts, target: &Target, n: usize) -> ScenarioResult {
    let name = o.named("idle");
    let mut r = ScenarioResult::new(&name, format!("{name}-{n}"));
    r.param("clients", n);
    r.param("idle_secs", o.idle_secs);
    r.param("keepalive", o.keepalive);
    r.param("subscribe", !o.no_subscribe);
    r.param("concurrency", o.concurrency);
    if !check_fds(&mut r, n) {
        return r;
    }
    let probe = Probe::new(&o.broker_pid, o.store_pid);
    let rss0 = probe.rss();
    let fleet = Arc::new(Fleet::default());
    let sem = Arc::new(Semaphore::new(o.concurrency));
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let cpu_connect = probe.mark();
    let t0 = now_ns();
    for i in 0..n {
        let (o, target, fleet, sem, stop) = (
            o.clone(),
            target.clone(),
            fleet.clone(),
            sem.clone(),
            stop.clone(),
        );
        tracker.spawn(async move {
            let id = format!("{}{i}", o.idle_prefix);
            let topic = format!("push/{id}");
            let hello = Hello {
                client_id: &id,
                clean: true,
                keep_alive: o.keepalive,
                subscribe: (!o.no_subscribe).then_some((topic.as_str(), 1)),
                login: o.login(),
            };
            let c = {
                let _permit = sem.acquire().await;
                open_retry(&o, &target, i, &hello, &mut Ignore, 256, &fleet).await
            };
            if let Some(c) = c {
                serve(c, &mut Ignore, o.keepalive, &stop, &fleet).await;
            }
        });
    }
    tracker.close();
    let budget = Duration::from_secs_f64(o.timeout + n as f64 / 200.0);
    if !fleet.wait_handshakes(n as u64, budget).await {
        r.error(format!(
            "only {} of {n} handshakes finished in {budget:?}",
            fleet.done()
        ));
    }
    let connect_cpu = probe.since(&cpu_connect);
    let connected = fleet.connected.load(Relaxed);
    let connect_secs = (fleet.last_connect_ns.load(Relaxed).saturating_sub(t0)) as f64 / 1e9;
    r.metric("connected", connected as f64);
    r.metric("connect_secs", connect_secs);
    if connect_secs > 0.0 {
        r.metric("connect_rate", connected as f64 / connect_secs);
    }
    r.opt_metric("connect_cpu_pct", connect_cpu.broker_pct);
    r.opt_metric("connect_bench_cpu_pct", connect_cpu.own_pct);
    // What a connection costs the broker, whoever set the pace (the load generator's core
    // can be the limit of the connect rate).
    if connected > 0 {
        r.opt_metric(
            "connect_cpu_us",
            connect_cpu.broker_secs.map(|s| s * 1e6 / connected as f64),
        );
    }
    let rss1 = probe.rss();

    let idle_mark = probe.mark();
    tokio::time::sleep(Duration::from_secs_f64(o.idle_secs)).await;
    let idle_cpu = probe.since(&idle_mark);
    let rss2 = probe.rss();
    r.opt_metric("idle_cpu_pct", idle_cpu.broker_pct);
    r.opt_metric("idle_bench_cpu_pct", idle_cpu.own_pct);
    r.opt_metric("rss_before", rss0.map(|v| v as f64));
    r.opt_metric("rss_after_connect", rss1.map(|v| v as f64));
    r.opt_metric("rss_after_idle", rss2.map(|v| v as f64));
    if let (Some(a), Some(b)) = (rss0, rss2) {
        if connected > 0 {
            r.metric("rss_per_conn", (b as f64 - a as f64) / connected as f64);
        }
    }
    if let (Some(a), Some(b)) = (rss0, rss1) {
        if connected > 0 {
            r.metric(
                "rss_per_conn_after_connect",
                (b as f64 - a as f64) / connected as f64,
            );
        }
    }
    r.metric("lost_during_idle", fleet.lost.load(Relaxed) as f64);
    probe.check_alive(&mut r);

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
    fleet.report(&mut r, "");
    r
}

// ---------------------------------------------------------------------------------------
// devices: shared by push, push-rate and drain

/// Delivery bookkeeping of all devices of a scenario.
struct Deliveries {
    devices: u64,
    /// Messages counted once each (first arrival).
    delivered: AtomicU64,
    dups: AtomicU64,
    /// A device got message n+k (k > 0) while expecting n: reordered or lost.
    gaps: AtomicU64,
    /// Warm-up messages (sequence numbers with `WARMUP` set), counted apart.
    warm: AtomicU64,
    misrouted: AtomicU64,
    bad_payload: AtomicU64,
    last_ns: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    /// login-storm: latencies by when the message was sent: before `phase_start`, from
    /// there to `phase_end`, after (both u64::MAX until set).
    phase_start: AtomicU64,
    phase_end: AtomicU64,
    phase_hists: [Mutex<Histogram<u64>>; 3],
    /// Record into `phase_hists` too (set when login-storm's measured baseline starts).
    phased: AtomicBool,
    notify: Notify,
}

impl Deliveries {
    fn new(devices: u64) -> Self {
        Deliveries {
            devices,
            delivered: AtomicU64::new(0),
            dups: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            warm: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            bad_payload: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            hist: Mutex::new(new_hist()),
            phase_start: AtomicU64::new(u64::MAX),
            phase_end: AtomicU64::new(u64::MAX),
            phase_hists: [
                Mutex::new(new_hist()),
                Mutex::new(new_hist()),
                Mutex::new(new_hist()),
            ],
            phased: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    /// Which phase a message sent at `ts` belongs to (0 before, 1 during, 2 after).
    fn phase(&self, ts: u64) -> usize {
        if ts < self.phase_start.load(Relaxed) {
            0
        } else if ts <= self.phase_end.load(Relaxed) {
            1
        } else {
            2
        }
    }

    /// Waits until `n` messages have been delivered. False on timeout.
    async fn wait(&self, n: u64, timeout: Duration) -> bool {
        self.wait_for(&self.delivered, n, timeout).await
    }

    async fn wait_for(&self, count: &AtomicU64, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if count.load(Relaxed) >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return count.load(Relaxed) >= n;
            }
        }
    }

    fn report(&self, r: &mut ScenarioResult, expected: u64) {
        let delivered = self.delivered.load(Relaxed);
        r.metric("delivered", delivered as f64);
        r.metric("duplicates", self.dups.load(Relaxed) as f64);
        let gaps = self.gaps.load(Relaxed);
        let mis = self.misrouted.load(Relaxed);
        let bad = self.bad_payload.load(Relaxed);
        if delivered < expected {
            r.error(format!("{delivered} of {expected} messages delivered"));
        }
        if gaps > 0 {
            r.error(format!(
                "{gaps} messages arrived out of order or went missing"
            ));
        }
        if mis > 0 {
            r.error(format!("{mis} messages reached the wrong device"));
        }
        if bad > 0 {
            r.error(format!("{bad} payloads without a benchmark stamp"));
        }
    }
}

/// A device: message `seq` belongs to device `seq % devices` and is its `seq / devices`-th.
struct Device {
    shared: Arc<Deliveries>,
    index: u64,
    warm: u64,
    next: u64,
    new: u64,
    latency: bool,
    /// Latency samples of this read: (send time, latency).
    samples: Vec<(u64, u64)>,
}

impl Device {
    fn new(shared: Arc<Deliveries>, index: u64, latency: bool) -> Self {
        Device {
            shared,
            index,
            warm: 0,
            next: 0,
            new: 0,
            latency,
            samples: Vec::new(),
        }
    }
}

impl OnPublish for Device {
    fn publish(&mut self, _qos: u8, _dup: bool, _topic: &[u8], payload: &[u8], now: u64) {
        let Some((ts, seq)) = client::stamp(payload) else {
            self.shared.bad_payload.fetch_add(1, Relaxed);
            return;
        };
        if seq & WARMUP != 0 {
            if (seq & !WARMUP) % self.shared.devices != self.index {
                self.shared.misrouted.fetch_add(1, Relaxed);
            } else {
                self.warm += 1;
            }
            return;
        }
        if seq % self.shared.devices != self.index {
            self.shared.misrouted.fetch_add(1, Relaxed);
            return;
        }
        let idx = seq / self.shared.devices;
        if idx < self.next {
            self.shared.dups.fetch_add(1, Relaxed);
            return;
        }
        if idx > self.next {
            self.shared.gaps.fetch_add(idx - self.next, Relaxed);
        }
        self.next = idx + 1;
        self.new += 1;
        if self.latency {
            self.samples.push((ts, now.saturating_sub(ts)));
        }
    }

    fn batch_end(&mut self, now: u64) {
        if self.warm > 0 {
            self.shared.warm.fetch_add(self.warm, Relaxed);
            self.warm = 0;
            self.shared.notify.notify_one();
        }
        if !self.samples.is_empty() {
            let mut h = self.shared.hist.lock().unwrap();
            for &(_, s) in &self.samples {
                h.saturating_record(s);
            }
            drop(h);
            if self.shared.phased.load(Relaxed) {
                for &(ts, s) in &self.samples {
                    let p = self.shared.phase(ts);
                    self.shared.phase_hists[p]
                        .lock()
                        .unwrap()
                        .saturating_record(s);
                }
            }
            self.samples.clear();
        }
        if self.new > 0 {
            self.shared.delivered.fetch_add(self.new, Relaxed);
            self.shared.last_ns.fetch_max(now, Relaxed);
            self.new = 0;
            self.shared.notify.notify_one();
        }
    }
}

fn device_id(o: &Opts, i: usize) -> String {
    format!("{}{i}", o.id_prefix)
}

/// Connects every device id with a clean session and disconnects it: whatever a previous
/// run left in the broker is gone. Not with `--no-wipe` (a fresh broker).
async fn wipe_sessions(o: &Opts, target: &Target, n: usize) -> Result<(), String> {
    if o.no_wipe {
        return Ok(());
    }
    let fleet = Arc::new(Fleet::default());
    let sem = Arc::new(Semaphore::new(o.concurrency));
    let tracker = TaskTracker::new();
    for i in 0..n {
        let (o, target, fleet, sem) = (o.clone(), target.clone(), fleet.clone(), sem.clone());
        tracker.spawn(async move {
            let _permit = sem.acquire().await;
            let id = device_id(&o, i);
            let hello = Hello {
                client_id: &id,
                clean: true,
                keep_alive: o.keepalive,
                subscribe: None,
                login: o.login(),
            };
            if let Some(c) = open_retry(&o, &target, i, &hello, &mut Ignore, 256, &fleet).await {
                c.disconnect(Duration::from_secs(2)).await;
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    match fleet.failed.load(Relaxed) {
        0 => Ok(()),
        f => Err(format!(
            "session cleanup: {f} connections failed: {:?}",
            fleet.errors.lock().unwrap()
        )),
    }
}

/// Starts `n` device tasks (persistent sessions). `subscribe`: SUBSCRIBE push/<id> at QoS 1
/// in the handshake. `expect_session`: count CONNACKs without session present.
#[allow(clippy::too_many_arguments)]
fn spawn_devices(
    o: &Opts,
    target: &Target,
    n: usize,
    subscribe: bool,
    expect_session: bool,
    deliveries: &Arc<Deliveries>,
    latency: bool,
    fleet: &Arc<Fleet>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) {
    let sem = Arc::new(Semaphore::new(o.concurrency));
    for i in 0..n {
        let (o, target, fleet, sem, stop, d) = (
            o.clone(),
            target.clone(),
            fleet.clone(),
            sem.clone(),
            stop.clone(),
            deliveries.clone(),
        );
        tracker.spawn(async move {
            let id = device_id(&o, i);
            let topic = format!("push/{id}");
            let hello = Hello {
                client_id: &id,
                clean: false,
                keep_alive: o.keepalive,
                subscribe: subscribe.then_some((topic.as_str(), 1)),
                login: o.login(),
            };
            let mut dev = Device::new(d, i as u64, latency);
            let c = {
                let _permit = sem.acquire().await;
                open_retry(&o, &target, i, &hello, &mut dev, 16 * 1024, &fleet).await
            };
            let Some(c) = c else { return };
            if expect_session && !c.session_present() {
                fleet.not_present.fetch_add(1, Relaxed);
            }
            serve(c, &mut dev, o.keepalive, &stop, &fleet).await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// the QoS 1 publisher

/// Set in the sequence number of warm-up messages (`--warmup`), which devices count apart.
const WARMUP: u64 = 1 << 63;

struct PubPlan {
    /// Messages go to push/<prefix><seq % devices>.
    devices: usize,
    /// Added to the sequence number in the payload (`WARMUP` for warm-up messages).
    seq_base: u64,
    /// Stop after this many messages...
    count: Option<u64>,
    /// ...or after this long.
    duration: Option<Duration>,
    /// Offered rate (msgs/s); None: as fast as the window allows.
    rate: Option<f64>,
    /// Unacknowledged (no PUBACK yet) messages at most.
    window: u64,
    /// Published but not yet delivered to a device, at most (None: no bound).
    max_lag: Option<u64>,
    payload: usize,
    /// ...or when this is cancelled.
    stop: Option<CancellationToken>,
}

#[derive(Default)]
struct PubStats {
    sent: u64,
    acked: u64,
    start_ns: u64,
    send_end_ns: u64,
    acked_ns: u64,
    /// Largest number of messages the sender was behind the offered rate.
    max_behind: u64,
    error: Option<String>,
}

/// Publishes QoS 1 stamped messages round-robin to the devices' push topics, waits for
/// every PUBACK.
async fn publish_qos1(o: &Opts, target: &Target, plan: PubPlan, d: &Arc<Deliveries>) -> PubStats {
    let mut st = PubStats::default();
    let id = format!("bench-pub-{}", std::process::id());
    let hello = Hello {
        client_id: &id,
        clean: true,
        keep_alive: 0,
        subscribe: None,
        login: o.login(),
    };
    let fleet = Fleet::default();
    let Some(c) = open_retry(o, target, usize::MAX / 2, &hello, &mut Ignore, 4096, &fleet).await
    else {
        st.error = Some(format!("publisher: {:?}", fleet.errors.lock().unwrap()));
        return st;
    };
    let (mut rd, mut wr) = c.into_stream().into_split();
    let acked = Arc::new(AtomicU64::new(0));
    let ack_notify = Arc::new(Notify::new());
    let reader = {
        let (acked, ack_notify) = (acked.clone(), ack_notify.clone());
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                buf.reserve(16 * 1024);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => return "publisher: closed by the broker".to_string(),
                    Ok(_) => {}
                    Err(e) => return format!("publisher read: {e}"),
                }
                let mut n = 0;
                let mut off = 0;
                loop {
                    match client::parse(&buf[off..]) {
                        Ok(Some((p, len))) => {
                            off += len;
                            if let client::Packet::PubAck = p {
                                n += 1;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return format!("publisher: {e}"),
                    }
                }
                buf.advance(off);
                if n > 0 {
                    acked.fetch_add(n, Relaxed);
                    ack_notify.notify_one();
                }
            }
        })
    };

    let topics: Vec<Vec<u8>> = (0..plan.devices)
        .map(|i| format!("push/{}", device_id(o, i)).into_bytes())
        .collect();
    let window = plan.window.clamp(1, 60_000);
    let batch_max: u64 = 512;
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let start = Instant::now();
    st.start_ns = now_ns();
    let mut sent: u64 = 0;
    loop {
        let elapsed = start.elapsed();
        if plan.count.is_some_and(|c| sent >= c)
            || plan.duration.is_some_and(|d| elapsed >= d)
            || plan.stop.as_ref().is_some_and(|s| s.is_cancelled())
        {
            break;
        }
        let in_flight = sent - acked.load(Relaxed);
        let mut room = window.saturating_sub(in_flight);
        if let Some(lag) = plan.max_lag {
            let behind = sent.saturating_sub(d.delivered.load(Relaxed));
            room = room.min(lag.saturating_sub(behind));
        }
        if let Some(c) = plan.count {
            room = room.min(c - sent);
        }
        if let Some(rate) = plan.rate {
            // Messages whose scheduled time has come.
            let due = (elapsed.as_secs_f64() * rate) as u64 + 1;
            let behind = due.saturating_sub(sent);
            st.max_behind = st.max_behind.max(behind.saturating_sub(1));
            if behind == 0 {
                let next = start + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(next).await;
                continue;
            }
            room = room.min(behind);
        }
        // Without a rate, write only once a good batch fits: a broker that acknowledges one
        // message per segment would otherwise cost a write per message here.
        let min_batch = if plan.rate.is_some() || sent == acked.load(Relaxed) {
            1
        } else {
            (window / 16).clamp(1, 64)
        };
        if room < min_batch {
            // Wait for a PUBACK or a delivery, whichever bounds us.
            tokio::select! {
                _ = ack_notify.notified() => {}
                _ = d.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if reader.is_finished() {
                break;
            }
            continue;
        }
        let batch = room.min(batch_max);
        let ts = now_ns();
        for _ in 0..batch {
            let topic = &topics[(sent % plan.devices as u64) as usize];
            let pkid = (sent % 65535) as u16 + 1;
            client::encode_publish(
                &mut wbuf,
                topic,
                1,
                pkid,
                ts,
                plan.seq_base | sent,
                plan.payload,
            );
            sent += 1;
        }
        if let Err(e) = wr.write_all(&wbuf).await {
            st.error = Some(format!("publisher write: {e}"));
            break;
        }
        wbuf.clear();
    }
    st.sent = sent;
    st.send_end_ns = now_ns();
    // Every PUBACK.
    let deadline = Instant::now() + Duration::from_secs_f64(o.timeout);
    loop {
        let notified = ack_notify.notified();
        if acked.load(Relaxed) >= sent || reader.is_finished() {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    st.acked = acked.load(Relaxed);
    st.acked_ns = now_ns();
    if st.acked < sent && st.error.is_none() {
        st.error = Some(match reader.is_finished() {
            true => match reader.await {
                Ok(e) => e,
                Err(_) => "publisher reader stopped".into(),
            },
            false => format!("publisher: {} of {sent} PUBACKs", st.acked),
        });
    } else {
        reader.abort();
    }
    let _ = wr.write_all(&[0xE0, 0]).await;
    let _ = wr.shutdown().await;
    st
}

fn report_pub(r: &mut ScenarioResult, st: &PubStats) {
    r.metric("published", st.sent as f64);
    r.metric("publisher_acked", st.acked as f64);
    let secs = (st.acked_ns - st.start_ns) as f64 / 1e9;
    if secs > 0.0 {
        // Acknowledged by the broker (stored), per second.
        r.metric("publish_rate", st.acked as f64 / secs);
    }
    if let Some(e) = &st.error {
        r.error(e.clone());
    }
}

// ---------------------------------------------------------------------------------------
// push and push-rate

/// `--warmup`: one message to each device, all delivered before the measured phase starts
/// (so a cluster's node-to-node link is up and every connection has sent something). One
/// message per device is in flight at a time, so none can overtake another of the same
/// device. Devices count these apart (`WARMUP`); the figures never include them.
async fn warm_up(
    o: &Opts,
    pub_target: &Target,
    n: usize,
    d: &Arc<Deliveries>,
    r: &mut ScenarioResult,
) {
    let plan = PubPlan {
        devices: n,
        seq_base: WARMUP,
        count: Some(n as u64),
        duration: None,
        rate: None,
        window: o.window,
        max_lag: None,
        payload: o.payload,
        stop: None,
    };
    let t0 = now_ns();
    let st = publish_qos1(o, pub_target, plan, d).await;
    let done = d
        .wait_for(&d.warm, n as u64, Duration::from_secs_f64(o.timeout))
        .await;
    r.metric("warmup_secs", (now_ns() - t0) as f64 / 1e9);
    if let Some(e) = st.error {
        r.error(format!("warm-up: {e}"));
    } else if !done {
        r.error(format!(
            "warm-up: {} of {n} messages delivered",
            d.warm.load(Relaxed)
        ));
    }
}

/// `target`: where the devices connect; `pub_target`: where the publisher does (the same
/// broker, or another node of a cluster).
pub async fn push(
    o: &Opts,
    target: &Target,
    pub_target: &Target,
    rate: Option<f64>,
) -> ScenarioResult {
    let name = o.named(if rate.is_some() { "push-rate" } else { "push" });
    let mut r = ScenarioResult::new(&name, &name);
    let n = o.devices;
    r.param("devices", n);
    if pub_target.addr != target.addr {
        r.param("devices_on", target.addr.to_string());
        r.param("publisher_on", pub_target.addr.to_string());
    }
    r.param("window", o.window);
    r.param("payload", o.payload);
    match (rate, o.messages) {
        (None, Some(m)) => r.param("messages", m),
        _ => r.param("secs", o.secs),
    }
    if let Some(rate) = rate {
        r.param("rate", rate);
    } else {
        r.param("max_lag", o.max_lag);
    }
    if !check_fds(&mut r, n) {
        return r;
    }
    if let Err(e) = wipe_sessions(o, target, n).await {
        r.error(e);
        return r;
    }
    let probe = Probe::new(&o.broker_pid, o.store_pid);
    let deliveries = Arc::new(Deliveries::new(n as u64));
    let fleet = Arc::new(Fleet::default());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    spawn_devices(
        o,
        target,
        n,
        true,
        false,
        &deliveries,
        true,
        &fleet,
        &stop,
        &tracker,
    );
    tracker.close();
    let budget = Duration::from_secs_f64(o.timeout + n as f64 / 200.0);
    fleet.wait_handshakes(n as u64, budget).await;
    if fleet.connected.load(Relaxed) < n as u64 {
        r.error(format!(
            "only {} of {n} devices connected",
            fleet.connected.load(Relaxed)
        ));
    } else {
        if o.warmup {
            warm_up(o, pub_target, n, &deliveries, &mut r).await;
        }
        let redis0 = o.store_addr.map(redisstat::read);
        let mark = probe.mark();
        let plan = PubPlan {
            devices: n,
            seq_base: 0,
            count: if rate.is_none() { o.messages } else { None },
            duration: (rate.is_some() || o.messages.is_none())
                .then(|| Duration::from_secs_f64(o.secs)),
            rate,
            window: o.window,
            // At most 500 undelivered per device: below the brokers' 1000-message queue cap,
            // so nothing is dropped for overflow.
            max_lag: rate
                .is_none()
                .then_some(o.max_lag.min(n as u64 * 500).max(1)),
            payload: o.payload,
            stop: None,
        };
        let st = publish_qos1(o, pub_target, plan, &deliveries).await;
        deliveries
            .wait(st.sent, Duration::from_secs_f64(o.timeout))
            .await;
        let cpu = probe.since(&mark);
        let redis1 = o.store_addr.map(redisstat::read);
        report_pub(&mut r, &st);
        deliveries.report(&mut r, st.sent);
        let delivered = deliveries.delivered.load(Relaxed);
        match (redis0, redis1) {
            (Some(Ok(a)), Some(Ok(b))) => redisstat::report(&mut r, &a, &b, delivered),
            (Some(Err(e)), _) | (_, Some(Err(e))) => r.notes.push(format!("redis stats: {e}")),
            _ => {}
        }
        let secs = deliveries.last_ns.load(Relaxed).saturating_sub(st.start_ns) as f64 / 1e9;
        if secs > 0.0 {
            r.metric("msgs_per_sec", delivered as f64 / secs);
            r.metric("secs", secs);
        }
        if let Some(rate) = rate {
            let send_secs = (st.send_end_ns - st.start_ns) as f64 / 1e9;
            r.metric("achieved_rate", st.sent as f64 / send_secs.max(1e-9));
            r.metric("max_behind_schedule", st.max_behind as f64);
            if (st.sent as f64) < 0.95 * rate * o.secs {
                r.notes.push(format!(
                    "offered {rate} msgs/s but only {:.0} msgs/s could be sent \
                     (window {} full or publisher too slow)",
                    st.sent as f64 / send_secs.max(1e-9),
                    o.window
                ));
            }
        }
        put_latency(&mut r, &deliveries.hist.lock().unwrap());
        cpu.report(&mut r, "", delivered);
        r.opt_metric("bench_cpu_pct", cpu.own_pct);
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
    fleet.report(&mut r, "");
    if let Err(e) = wipe_sessions(o, target, n).await {
        r.error(e);
    }
    probe.check_alive(&mut r);
    r
}

// ---------------------------------------------------------------------------------------
// drain

pub async fn drain(o: &Opts, target: &Target, pub_target: &Target) -> ScenarioResult {
    let name = o.named("drain");
    let mut r = ScenarioResult::new(&name, &name);
    let n = o.devices;
    let per = o.per_device;
    let total = n as u64 * per;
    r.param("devices", n);
    if pub_target.addr != target.addr {
        r.param("devices_on", target.addr.to_string());
        r.param("publisher_on", pub_target.addr.to_string());
    }
    r.param("per_device", per);
    r.param("window", o.window);
    r.param("payload", o.payload);
    if !check_fds(&mut r, n) {
        return r;
    }
    if let Err(e) = wipe_sessions(o, target, n).await {
        r.error(e);
        return r;
    }
    let probe = Probe::new(&o.broker_pid, o.store_pid);

    // 1. Persistent sessions, subscribed, then offline.
    {
        let fleet = Arc::new(Fleet::default());
        let sem = Arc::new(Semaphore::new(o.concurrency));
        let tracker = TaskTracker::new();
        for i in 0..n {
            let (o, target, fleet, sem) = (o.clone(), target.clone(), fleet.clone(), sem.clone());
            tracker.spawn(async move {
                let _permit = sem.acquire().await;
                let id = device_id(&o, i);
                let topic = format!("push/{id}");
                let hello = Hello {
                    client_id: &id,
                    clean: false,
                    keep_alive: o.keepalive,
                    subscribe: Some((&topic, 1)),
                    login: o.login(),
                };
                if let Some(c) = open_retry(&o, &target, i, &hello, &mut Ignore, 256, &fleet).await
                {
                    c.disconnect(Duration::from_secs(2)).await;
                }
            });
        }
        tracker.close();
        tracker.wait().await;
        fleet.report(&mut r, "setup: ");
        if !r.ok {
            return r;
        }
        // The broker has closed every socket; give it a moment to file the sessions away.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 2. Publish while they are offline.
    let deliveries = Arc::new(Deliveries::new(n as u64));
    let plan = PubPlan {
        devices: n,
        seq_base: 0,
        count: Some(total),
        duration: None,
        rate: None,
        window: o.window,
        max_lag: None,
        payload: o.payload,
        stop: None,
    };
    let store_mark = probe.mark();
    let st = publish_qos1(o, pub_target, plan, &deliveries).await;
    // Storing: every message is in the broker's store once it is acknowledged.
    probe
        .since(&store_mark)
        .report(&mut r, "publish_", st.acked);
    report_pub(&mut r, &st);
    if !r.ok {
        return r;
    }
    let rss_queued = probe.rss();
    r.opt_metric("rss_with_queue", rss_queued.map(|v| v as f64));
    r.opt_metric("store_rss_with_queue", probe.store_rss().map(|v| v as f64));

    // 3. Everyone back: time until every message has arrived.
    let fleet = Arc::new(Fleet::default());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mark = probe.mark();
    let t0 = now_ns();
    spawn_devices(
        o,
        target,
        n,
        false,
        true,
        &deliveries,
        false,
        &fleet,
        &stop,
        &tracker,
    );
    tracker.close();
    deliveries
        .wait(total, Duration::from_secs_f64(o.timeout + n as f64 / 200.0))
        .await;
    let cpu = probe.since(&mark);
    fleet
        .wait_handshakes(n as u64, Duration::from_secs(5))
        .await;
    deliveries.report(&mut r, total);
    let delivered = deliveries.delivered.load(Relaxed);
    let secs = deliveries.last_ns.load(Relaxed).saturating_sub(t0) as f64 / 1e9;
    if delivered > 0 {
        r.metric("drain_secs", secs);
        r.metric("msgs_per_sec", delivered as f64 / secs.max(1e-9));
    }
    r.metric(
        "reconnect_secs",
        fleet.last_connect_ns.load(Relaxed).saturating_sub(t0) as f64 / 1e9,
    );
    cpu.report(&mut r, "", delivered);
    r.opt_metric("bench_cpu_pct", cpu.own_pct);
    let np = fleet.not_present.load(Relaxed);
    if np > 0 {
        r.error(format!(
            "{np} devices reconnected without their session (session present = 0)"
        ));
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
    fleet.report(&mut r, "");
    if let Err(e) = wipe_sessions(o, target, n).await {
        r.error(e);
    }
    probe.check_alive(&mut r);
    r
}

// ---------------------------------------------------------------------------------------
// qos0

/// One publisher-subscriber pair's shared state.
struct Pair {
    /// 1 + the highest sequence number the subscriber has seen.
    seen: AtomicU64,
    received: AtomicU64,
    reordered: AtomicU64,
    last_ns: AtomicU64,
    notify: Notify,
}

struct Subscriber {
    pair: Arc<Pair>,
    hist: Arc<Mutex<Histogram<u64>>>,
    samples: Vec<u64>,
    seen: u64,
    new: u64,
}

impl OnPublish for Subscriber {
    fn publish(&mut self, _qos: u8, _dup: bool, _topic: &[u8], payload: &[u8], now: u64) {
        let Some((ts, seq)) = client::stamp(payload) else {
            return;
        };
        if seq < self.seen {
            self.pair.reordered.fetch_add(1, Relaxed);
            return;
        }
        self.seen = seq + 1;
        self.new += 1;
        self.samples.push(now.saturating_sub(ts));
    }

    fn batch_end(&mut self, now: u64) {
        if self.new > 0 {
            let mut h = self.hist.lock().unwrap();
            for &s in &self.samples {
                h.saturating_record(s);
            }
            drop(h);
            self.samples.clear();
            self.pair.received.fetch_add(self.new, Relaxed);
            self.pair.seen.store(self.seen, Relaxed);
            self.pair.last_ns.fetch_max(now, Relaxed);
            self.new = 0;
            self.pair.notify.notify_one();
        }
    }
}

pub async fn qos0(o: &Opts, target: &Target, pairs: usize) -> ScenarioResult {
    let name = o.named("qos0");
    let mut r = ScenarioResult::new(&name, format!("{name}-{pairs}"));
    r.param("pairs", pairs);
    r.param("secs", o.secs);
    r.param("payload", o.payload);
    r.param("lag", o.lag);
    let probe = Probe::new(&o.broker_pid, o.store_pid);
    let hist = Arc::new(Mutex::new(new_hist()));
    let fleet = Arc::new(Fleet::default());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let run = format!("{}-{}", std::process::id(), now_ns() % 1_000_000);
    let mut states = Vec::new();
    for p in 0..pairs {
        let pair = Arc::new(Pair {
            seen: AtomicU64::new(0),
            received: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            notify: Notify::new(),
        });
        states.push(pair.clone());
        let (o, target, fleet, stop, hist) = (
            o.clone(),
            target.clone(),
            fleet.clone(),
            stop.clone(),
            hist.clone(),
        );
        let run = run.clone();
        tracker.spawn(async move {
            let id = format!("q0sub-{run}-{p}");
            let topic = format!("bench/qos0/{run}/{p}");
            let hello = Hello {
                client_id: &id,
                clean: true,
                keep_alive: o.keepalive,
                subscribe: Some((&topic, 0)),
                login: o.login(),
            };
            let mut sub = Subscriber {
                pair,
                hist,
                samples: Vec::new(),
                seen: 0,
                new: 0,
            };
            if let Some(c) = open_retry(&o, &target, p, &hello, &mut sub, 64 * 1024, &fleet).await {
                serve(c, &mut sub, o.keepalive, &stop, &fleet).await;
            }
        });
    }
    tracker.close();
    fleet
        .wait_handshakes(pairs as u64, Duration::from_secs_f64(o.timeout))
        .await;
    if fleet.connected.load(Relaxed) < pairs as u64 {
        r.error("not every subscriber connected");
        stop.cancel();
        fleet.report(&mut r, "");
        return r;
    }

    // Publishers: connect all, then start together.
    let pub_fleet = Fleet::default();
    let mut pubs = Vec::new();
    for p in 0..pairs {
        let id = format!("q0pub-{run}-{p}");
        let hello = Hello {
            client_id: &id,
            clean: true,
            keep_alive: 0,
            subscribe: None,
            login: o.login(),
        };
        match open_retry(o, target, pairs + p, &hello, &mut Ignore, 256, &pub_fleet).await {
            Some(c) => pubs.push(c.into_stream()),
            None => {
                r.error(format!("publisher: {:?}", pub_fleet.errors.lock().unwrap()));
                stop.cancel();
                return r;
            }
        }
    }
    let mark = probe.mark();
    let t0 = now_ns();
    let secs = Duration::from_secs_f64(o.secs);
    let mut handles = Vec::new();
    for (p, mut stream) in pubs.into_iter().enumerate() {
        let pair = states[p].clone();
        let topic = format!("bench/qos0/{run}/{p}").into_bytes();
        let (lag, payload) = (o.lag.max(1), o.payload);
        handles.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut wbuf = BytesMut::with_capacity(64 * 1024);
            let (mut sent, mut floor, mut stalls) = (0u64, 0u64, 0u64);
            while start.elapsed() < secs {
                let seen = pair.seen.load(Relaxed).max(floor);
                let room = lag.saturating_sub(sent - seen.min(sent));
                if room == 0 {
                    let notified = pair.notify.notified();
                    if tokio::time::timeout(Duration::from_secs(1), notified)
                        .await
                        .is_err()
                    {
                        // The newest messages were dropped: nothing will move `seen`.
                        stalls += 1;
                        floor = sent;
                    }
                    continue;
                }
                let ts = now_ns();
                for _ in 0..room.min(256) {
                    client::encode_publish(&mut wbuf, &topic, 0, 0, ts, sent, payload);
                    sent += 1;
                }
                if stream.write_all(&wbuf).await.is_err() {
                    break;
                }
                wbuf.clear();
            }
            let _ = stream.write_all(&[0xE0, 0]).await;
            (sent, stalls, stream)
        }));
    }
    let mut sent_total = 0;
    let mut stalls = 0;
    let mut sent_per_pair = Vec::new();
    let mut streams = Vec::new();
    for h in handles {
        if let Ok((s, st, stream)) = h.await {
            sent_total += s;
            stalls += st;
            sent_per_pair.push(s);
            streams.push(stream);
        }
    }
    // What is still on its way: wait until it stops coming.
    for (p, &s) in sent_per_pair.iter().enumerate() {
        let pair = &states[p];
        loop {
            let notified = pair.notify.notified();
            if pair.seen.load(Relaxed) >= s {
                break;
            }
            if tokio::time::timeout(Duration::from_secs(1), notified)
                .await
                .is_err()
            {
                break;
            }
        }
    }
    let cpu = probe.since(&mark);
    drop(streams);
    let received: u64 = states.iter().map(|p| p.received.load(Relaxed)).sum();
    let reordered: u64 = states.iter().map(|p| p.reordered.load(Relaxed)).sum();
    let last = states
        .iter()
        .map(|p| p.last_ns.load(Relaxed))
        .max()
        .unwrap_or(t0);
    let secs = last.saturating_sub(t0) as f64 / 1e9;
    r.metric("published", sent_total as f64);
    r.metric("delivered", received as f64);
    r.metric("dropped", sent_total.saturating_sub(received) as f64);
    r.metric("stalls", stalls as f64);
    if secs > 0.0 {
        r.metric("msgs_per_sec", received as f64 / secs);
        r.metric("secs", secs);
    }
    put_latency(&mut r, &hist.lock().unwrap());
    r.opt_metric("broker_cpu_pct", cpu.broker_pct);
    r.opt_metric("store_cpu_pct", cpu.store_pct);
    r.opt_metric("bench_cpu_pct", cpu.own_pct);
    if reordered > 0 {
        r.error(format!("{reordered} messages arrived out of order"));
    }
    if received < sent_total {
        r.error(format!(
            "{} of {sent_total} QoS 0 messages were not delivered",
            sent_total - received
        ));
    }
    if received == 0 {
        r.error("nothing delivered");
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    fleet.report(&mut r, "");
    probe.check_alive(&mut r);
    r
}

// ---------------------------------------------------------------------------------------
// handshake (issue 10)

/// Client id prefix for connections that may log in: `<user>-<base>` with --username (so
/// Herald lets the user have it without an ACL file), `<base>` without.
fn login_prefix(o: &Opts, base: &str) -> String {
    match &o.username {
        Some(u) => format!("{u}-{base}"),
        None => base.to_string(),
    }
}

/// `n` fresh connections (TCP connect, TLS handshake with --tls, CONNECT..CONNACK), at most
/// `--concurrency` in flight; each sends DISCONNECT and closes right after its CONNACK, so
/// the broker's CPU per connection includes the close, and few sockets are open at a time.
pub async fn handshake(o: &Opts, target: &Target, n: usize) -> ScenarioResult {
    let name = o.named("handshake");
    let mut r = ScenarioResult::new(&name, format!("{name}-{n}"));
    r.param("connections", n);
    r.param("concurrency", o.concurrency);
    r.param("login", o.username.is_some());
    r.param("tls_verify", o.tls && !o.tls_no_verify);
    let probe = Probe::new(&o.broker_pid, o.store_pid);
    let fleet = Arc::new(Fleet::default());
    let sem = Arc::new(Semaphore::new(o.concurrency.max(1)));
    let hist = Arc::new(Mutex::new(new_hist()));
    let tracker = TaskTracker::new();
    let prefix = Arc::new(login_prefix(o, "hs"));
    let mark = probe.mark();
    let t0 = now_ns();
    for i in 0..n {
        let (o, target, fleet, sem, hist, prefix) = (
            o.clone(),
            target.clone(),
            fleet.clone(),
            sem.clone(),
            hist.clone(),
            prefix.clone(),
        );
        tracker.spawn(async move {
            let id = format!("{prefix}{i}");
            let hello = Hello {
                client_id: &id,
                clean: true,
                keep_alive: o.keepalive,
                subscribe: None,
                login: o.login(),
            };
            let permit = sem.acquire().await;
            let start = now_ns();
            let c = open_retry(&o, &target, i, &hello, &mut Ignore, 256, &fleet).await;
            let took = now_ns() - start;
            drop(permit);
            if let Some(c) = c {
                hist.lock().unwrap().saturating_record(took);
                c.disconnect(Duration::from_secs(2)).await;
            }
        });
    }
    tracker.close();
    let budget = Duration::from_secs_f64(o.timeout + n as f64 / 200.0);
    if !fleet.wait_handshakes(n as u64, budget).await {
        r.error(format!(
            "only {} of {n} handshakes finished in {budget:?}",
            fleet.done()
        ));
    }
    let cpu = probe.since(&mark);
    let connected = fleet.connected.load(Relaxed);
    let secs = fleet.last_connect_ns.load(Relaxed).saturating_sub(t0) as f64 / 1e9;
    r.metric("connected", connected as f64);
    r.metric("connect_secs", secs);
    if secs > 0.0 {
        r.metric("connect_rate", connected as f64 / secs);
    }
    r.opt_metric("broker_cpu_pct", cpu.broker_pct);
    r.opt_metric("bench_cpu_pct", cpu.own_pct);
    if connected > 0 {
        let per = |s: Option<f64>| s.map(|s| s * 1e6 / connected as f64);
        r.opt_metric("broker_cpu_us_per_conn", per(cpu.broker_secs));
        r.opt_metric("bench_cpu_us_per_conn", per(cpu.own_secs));
        // Connections the broker would take per second of one core, whoever set the pace.
        r.opt_metric(
            "conns_per_broker_cpu_sec",
            cpu.broker_secs
                .filter(|&s| s > 0.0)
                .map(|s| connected as f64 / s),
        );
    }
    put_latency(&mut r, &hist.lock().unwrap());
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    fleet.report(&mut r, "");
    probe.check_alive(&mut r);
    r
}

// ---------------------------------------------------------------------------------------
// login-storm (issue 10)

/// What the storm's controller found.
#[derive(Default)]
struct Storm {
    ok: u64,
    failed: u64,
    errors: Vec<String>,
    secs: f64,
    broker_cpu_pct: Option<f64>,
    broker_secs: Option<f64>,
    bench_cpu_pct: Option<f64>,
    baseline_broker_cpu_pct: Option<f64>,
    login_hist: Option<Histogram<u64>>,
}

/// Devices (no credentials, so the broker must allow anonymous clients) get QoS 1 pushes at
/// `--rate` from the start; after `--baseline-secs`, `--logins` clients connect with
/// `--username`/`--password` (each one argon2 verification on a password-file broker), at
/// most `--login-concurrency` in flight and each tried once; `--after-secs` after the last
/// CONNACK the publisher stops. Push latency is split by the time a message was sent:
/// before the storm, during it (first login started .. last CONNACK), after it.
pub async fn login_storm(o: &Opts, target: &Target, pub_target: &Target) -> ScenarioResult {
    let name = o.named("login-storm");
    let mut r = ScenarioResult::new(&name, &name);
    let n = o.devices;
    let logins = o.logins;
    r.param("devices", n);
    r.param("rate", o.rate);
    r.param("window", o.window);
    r.param("payload", o.payload);
    r.param("logins", logins);
    r.param("login_concurrency", o.login_concurrency);
    r.param("baseline_secs", o.baseline_secs);
    r.param("after_secs", o.after_secs);
    let Some(user) = o.username.clone() else {
        r.error("login-storm needs --username (and --password) for the storm's clients");
        return r;
    };
    if !check_fds(&mut r, n + logins) {
        return r;
    }
    // Devices and publisher without credentials.
    let mut plain = o.clone();
    plain.username = None;
    let po = &plain;
    if let Err(e) = wipe_sessions(po, target, n).await {
        r.error(e);
        return r;
    }
    let probe = Probe::new(&o.broker_pid, o.store_pid);
    let deliveries = Arc::new(Deliveries::new(n as u64));
    let fleet = Arc::new(Fleet::default());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    spawn_devices(
        po,
        target,
        n,
        true,
        false,
        &deliveries,
        true,
        &fleet,
        &stop,
        &tracker,
    );
    tracker.close();
    let budget = Duration::from_secs_f64(o.timeout + n as f64 / 200.0);
    fleet.wait_handshakes(n as u64, budget).await;
    if fleet.connected.load(Relaxed) < n as u64 {
        r.error(format!(
            "only {} of {n} devices connected",
            fleet.connected.load(Relaxed)
        ));
        stop.cancel();
        fleet.report(&mut r, "");
        return r;
    }

    deliveries.phased.store(true, Relaxed);
    let pub_stop = CancellationToken::new();
    let plan = PubPlan {
        devices: n,
        seq_base: 0,
        count: None,
        duration: None,
        rate: Some(o.rate),
        window: o.window,
        max_lag: None,
        payload: o.payload,
        stop: Some(pub_stop.clone()),
    };
    let storm_stop = CancellationToken::new();
    let storm_tracker = TaskTracker::new();
    let mark = probe.mark();
    let controller = async {
        let mut st = Storm::default();
        tokio::time::sleep(Duration::from_secs_f64(o.baseline_secs)).await;
        st.baseline_broker_cpu_pct = probe.since(&mark).broker_pct;
        let storm_mark = probe.mark();
        let t0 = now_ns();
        deliveries.phase_start.store(t0, Relaxed);
        let storm_fleet = Arc::new(Fleet::default());
        let sem = Arc::new(Semaphore::new(o.login_concurrency.max(1)));
        let hist = Arc::new(Mutex::new(new_hist()));
        for i in 0..logins {
            let (o, target, fleet, sem, hist, stop, user) = (
                o.clone(),
                target.clone(),
                storm_fleet.clone(),
                sem.clone(),
                hist.clone(),
                storm_stop.clone(),
                user.clone(),
            );
            storm_tracker.spawn(async move {
                let id = format!("{user}-storm{i}");
                let hello = Hello {
                    client_id: &id,
                    clean: true,
                    keep_alive: o.keepalive,
                    subscribe: None,
                    login: o.login(),
                };
                let permit = sem.acquire().await;
                let start = now_ns();
                let t = Duration::from_secs_f64(o.login_timeout);
                // Tried once: a retry would be a second argon2 verification.
                let res = tokio::time::timeout(
                    t,
                    Client::open(&target, n + 1 + i, &hello, &mut Ignore, 256),
                )
                .await;
                let end = now_ns();
                drop(permit);
                match res {
                    Ok(Ok(c)) => {
                        hist.lock().unwrap().saturating_record(end - start);
                        fleet.connected.fetch_add(1, Relaxed);
                        fleet.last_connect_ns.fetch_max(end, Relaxed);
                        fleet.notify.notify_one();
                        serve(c, &mut Ignore, o.keepalive, &stop, &fleet).await;
                    }
                    Ok(Err(e)) => {
                        fleet.failed.fetch_add(1, Relaxed);
                        fleet.note_error(format!("{id}: {e}"));
                        fleet.notify.notify_one();
                    }
                    Err(_) => {
                        fleet.failed.fetch_add(1, Relaxed);
                        fleet.note_error(format!("{id}: no CONNACK within {t:?}"));
                        fleet.notify.notify_one();
                    }
                }
            });
        }
        storm_tracker.close();
        storm_fleet
            .wait_handshakes(
                logins as u64,
                Duration::from_secs_f64(o.login_timeout + logins as f64 / 10.0),
            )
            .await;
        let t1 = now_ns();
        deliveries.phase_end.store(t1, Relaxed);
        let cpu = probe.since(&storm_mark);
        st.secs = (t1 - t0) as f64 / 1e9;
        st.broker_cpu_pct = cpu.broker_pct;
        st.broker_secs = cpu.broker_secs;
        st.bench_cpu_pct = cpu.own_pct;
        st.ok = storm_fleet.connected.load(Relaxed);
        st.failed = storm_fleet.failed.load(Relaxed);
        st.errors = storm_fleet.errors.lock().unwrap().clone();
        st.login_hist = Some(hist.lock().unwrap().clone());
        tokio::time::sleep(Duration::from_secs_f64(o.after_secs)).await;
        pub_stop.cancel();
        st
    };
    let (pst, storm) = tokio::join!(publish_qos1(po, pub_target, plan, &deliveries), controller);
    deliveries
        .wait(pst.sent, Duration::from_secs_f64(o.timeout))
        .await;
    let cpu = probe.since(&mark);
    report_pub(&mut r, &pst);
    deliveries.report(&mut r, pst.sent);
    let send_secs = (pst.send_end_ns - pst.start_ns) as f64 / 1e9;
    r.metric("achieved_rate", pst.sent as f64 / send_secs.max(1e-9));
    r.metric("max_behind_schedule", pst.max_behind as f64);
    put_latency(&mut r, &deliveries.hist.lock().unwrap());
    for (i, phase) in ["before", "storm", "after"].iter().enumerate() {
        let h = deliveries.phase_hists[i].lock().unwrap();
        if h.is_empty() {
            continue;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        r.metric(&format!("{phase}_p50_us"), us(h.value_at_quantile(0.50)));
        r.metric(&format!("{phase}_p99_us"), us(h.value_at_quantile(0.99)));
        r.metric(&format!("{phase}_max_us"), us(h.max()));
        r.metric(&format!("{phase}_samples"), h.len() as f64);
    }
    r.metric("logins_ok", storm.ok as f64);
    r.metric("logins_failed", storm.failed as f64);
    r.metric("storm_secs", storm.secs);
    if storm.secs > 0.0 {
        r.metric("logins_per_sec", storm.ok as f64 / storm.secs);
    }
    if let Some(h) = storm.login_hist.as_ref().filter(|h| !h.is_empty()) {
        let us = |ns: u64| ns as f64 / 1e3;
        r.metric("login_p50_us", us(h.value_at_quantile(0.50)));
        r.metric("login_p99_us", us(h.value_at_quantile(0.99)));
        r.metric("login_max_us", us(h.max()));
    }
    r.opt_metric("baseline_broker_cpu_pct", storm.baseline_broker_cpu_pct);
    r.opt_metric("storm_broker_cpu_pct", storm.broker_cpu_pct);
    r.opt_metric("storm_bench_cpu_pct", storm.bench_cpu_pct);
    if storm.ok > 0 {
        r.opt_metric(
            "storm_broker_cpu_us_per_login",
            storm.broker_secs.map(|s| s * 1e6 / storm.ok as f64),
        );
    }
    cpu.report(&mut r, "", deliveries.delivered.load(Relaxed));
    r.opt_metric("bench_cpu_pct", cpu.own_pct);
    if storm.failed > 0 {
        r.error(format!(
            "{} of {logins} logins failed: {:?}",
            storm.failed, storm.errors
        ));
    }
    storm_stop.cancel();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), storm_tracker.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
    fleet.report(&mut r, "");
    if let Err(e) = wipe_sessions(po, target, n).await {
        r.error(e);
    }
    probe.check_alive(&mut r);
    r
}
