//! `storm`: a reconnect storm. A node dies and all its devices reconnect to another one at
//! once; each CONNECT attaches a persistent session (in Herald with `--store redis`, a
//! session attach in Redis, and in a cluster a route claim too) and the session's queued
//! messages are replayed.
//!
//! 1. `--devices` persistent sessions (clean session = false, each subscribed to push/<id> at
//!    QoS 1) are made and left offline (`park_sessions`, `--concurrency` in flight).
//! 2. `--queued` QoS 1 messages per device are published while they are offline (every one
//!    PUBACKed, so stored, before the storm).
//! 3. All devices reconnect at once: a task each, TCP connect and CONNECT as fast as this
//!    tool opens sockets, or at most `--storm-concurrency` in flight. CONNACK 3 (server
//!    unavailable, Herald's documented back-pressure refusal) and a connection error (TCP
//!    connect failed, closed or timed out before CONNACK) are retried after
//!    `--refused-backoff` (doubling with each retry up to 8 times that, plus up to 100 %
//!    jitter), until `--timeout` after the storm's start; any other refusal is final.
//!
//! Figures: seconds from the storm's start until every device is connected (CONNACK 0 with
//! session present = 1) and until every queued message has arrived; CONNACK latency (the
//! attempt that succeeded: TCP connect start to CONNACK) p50/p99/max and its TCP connect
//! part; refusals by CONNACK code (3 apart), retries and connection errors; the broker's CPU
//! (and with `--store-pid` the store's: Redis CPU seconds) over the storm, per reconnect;
//! with `--store-addr` the Redis commands per reconnect (`INFO commandstats` before the
//! storm and once its acknowledgements have settled); with `--metrics-addr` Herald's own
//! count of takeovers and CONNACKs by code, its CONNECT-to-CONNACK and store attach times.
//! The kernel's counters (machine-wide) show SYNs dropped for a full accept queue and sent
//! again, and a note shows how many devices connected in each quarter second: a dropped SYN
//! is sent again 1 s later, then 3 s, so a storm that overflows the listen backlog comes
//! back in waves. The targets: all connected within
//! `--target-secs` (3 s), no error other than counted CONNACK 3. A missed target is a note,
//! not a failure; a device that never connects, a lost session or a lost message is.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{now_ns, Client, Hello, Target};
use crate::procstat::{tcp_ext, Probe};
use crate::redisstat;
use crate::report::ScenarioResult;
use crate::Opts;

use super::devices::{device_id, park_sessions, wipe_sessions, Deliveries, Device};
use super::publisher::{publish_qos1, report_pub, PubPlan};
use super::{check_fds, new_hist, serve, Fleet};

/// What the reconnecting devices saw, beyond `Fleet`'s bookkeeping.
struct Storm {
    fleet: Fleet,
    /// CONNACKs by return code (0 to 5; anything higher counts as 5).
    connacks: [AtomicU64; 6],
    /// TCP connect failed, or the connection closed or failed before its CONNACK.
    conn_errors: AtomicU64,
    /// No CONNACK within --handshake-timeout.
    timeouts: AtomicU64,
    /// The attempt that succeeded: TCP connect start to CONNACK 0.
    connack: Mutex<Histogram<u64>>,
    /// Its TCP connect part (SYN to connected).
    tcp: Mutex<Histogram<u64>>,
    /// When each device got its CONNACK 0, from the storm's start.
    connected_at: Mutex<Histogram<u64>>,
    /// The first few errors that were retried.
    retried: Mutex<Vec<String>>,
}

impl Storm {
    fn note_retried(&self, e: String) {
        let mut v = self.retried.lock().unwrap();
        if v.len() < 5 {
            v.push(e);
        }
    }
}

struct Ctx {
    target: Target,
    keep_alive: u16,
    login: Option<(String, Vec<u8>)>,
    handshake_timeout: Duration,
    backoff: Duration,
    /// now_ns() of the storm's start, and when a device gives up.
    t0: u64,
    deadline: u64,
    sem: Option<Arc<Semaphore>>,
    storm: Arc<Storm>,
    stop: CancellationToken,
}

/// Up to 100 % jitter, from the device and the attempt (no RNG needed).
fn jitter(i: usize, attempt: u32) -> f64 {
    let mut x = (i as u64) ^ (u64::from(attempt) << 40) ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x % 1000) as f64 / 1000.0
}

/// One device's reconnect: attempts until CONNACK 0 (then it serves its connection until
/// `stop`), a final refusal, or the deadline.
async fn reconnect(ctx: Arc<Ctx>, i: usize, mut dev: Device, id: String) {
    let st = &ctx.storm;
    let hello = Hello {
        client_id: &id,
        clean: false,
        keep_alive: ctx.keep_alive,
        subscribe: None,
        login: ctx.login.as_ref().map(|(u, p)| (u.as_str(), p.as_slice())),
    };
    let mut attempt: u32 = 0;
    loop {
        if attempt > 0 {
            if now_ns() >= ctx.deadline {
                st.fleet.failed.fetch_add(1, Relaxed);
                st.fleet
                    .note_error(format!("{id}: not connected after {attempt} attempts"));
                st.fleet.notify.notify_one();
                return;
            }
            st.fleet.retries.fetch_add(1, Relaxed);
            let factor = f64::from(1u32 << (attempt - 1).min(3)) * (1.0 + jitter(i, attempt));
            tokio::time::sleep(ctx.backoff.mul_f64(factor)).await;
        }
        attempt += 1;
        let permit = match &ctx.sem {
            Some(s) => Some(s.acquire().await),
            None => None,
        };
        let start = now_ns();
        let res = tokio::time::timeout(ctx.handshake_timeout, async {
            let stream = ctx.target.connect(i).await?;
            let tcp_ns = now_ns();
            Client::handshake(stream, &hello, &mut dev, 16 * 1024)
                .await
                .map(|c| (c, tcp_ns))
        })
        .await;
        let end = now_ns();
        drop(permit);
        let (c, tcp_ns) = match res {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                st.conn_errors.fetch_add(1, Relaxed);
                st.note_retried(format!("{id}: {e}"));
                continue;
            }
            Err(_) => {
                st.timeouts.fetch_add(1, Relaxed);
                st.note_retried(format!(
                    "{id}: no CONNACK within {:?}",
                    ctx.handshake_timeout
                ));
                continue;
            }
        };
        let (present, code) = c.connack.unwrap_or((false, 255));
        st.connacks[usize::from(code.min(5))].fetch_add(1, Relaxed);
        match code {
            0 => {}
            // Server unavailable: back-pressure, try again shortly.
            3 => continue,
            _ => {
                st.fleet.failed.fetch_add(1, Relaxed);
                st.fleet
                    .note_error(format!("{id}: CONNACK return code {code}"));
                st.fleet.notify.notify_one();
                return;
            }
        }
        st.connack.lock().unwrap().saturating_record(end - start);
        st.tcp.lock().unwrap().saturating_record(tcp_ns - start);
        st.connected_at
            .lock()
            .unwrap()
            .saturating_record(end.saturating_sub(ctx.t0));
        if !present {
            st.fleet.not_present.fetch_add(1, Relaxed);
        }
        st.fleet.connected.fetch_add(1, Relaxed);
        st.fleet.last_connect_ns.fetch_max(end, Relaxed);
        st.fleet.notify.notify_one();
        serve(c, &mut dev, ctx.keep_alive, &ctx.stop, &st.fleet).await;
        return;
    }
}

/// A Prometheus histogram: cumulative counts by upper bound, sum and count.
#[derive(Default, Clone)]
struct Hist {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Hist {
    /// `self - before`, bucket by bucket.
    fn since(&self, before: &Hist) -> Hist {
        Hist {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| {
                    let c0 = before
                        .buckets
                        .iter()
                        .find(|b| b.0 == le)
                        .map_or(0.0, |b| b.1);
                    (le, c - c0)
                })
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The upper bound of the bucket that holds quantile `q` (seconds).
    fn quantile(&self, q: f64) -> Option<f64> {
        let want = q * self.count;
        let mut b = self.buckets.clone();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b.iter().find(|&&(_, c)| c >= want).map(|&(le, _)| le)
    }

    /// `<key>_mean_us`, `<key>_p50_le_us` and `<key>_p99_le_us`.
    fn report(&self, r: &mut ScenarioResult, key: &str) {
        if self.count <= 0.0 {
            return;
        }
        r.metric(&format!("{key}_mean_us"), self.sum / self.count * 1e6);
        for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
            r.opt_metric(
                &format!("{key}_{name}_le_us"),
                self.quantile(q).map(|s| s * 1e6),
            );
        }
    }
}

/// Herald's own counters from its Prometheus endpoint (`--metrics-listen`): takeovers,
/// CONNACKs by code, CONNECT-to-CONNACK time and the store's attach time.
#[derive(Default, Clone)]
struct BrokerCounts {
    takeovers: f64,
    connacks: [f64; 6],
    connect: Hist,
    attach: Hist,
}

fn broker_counts(addr: SocketAddr) -> Result<BrokerCounts, String> {
    let t = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, t).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("{addr}: {e}"))?;
    Ok(parse_metrics(&text))
}

/// The counters and histograms `BrokerCounts` holds, from Prometheus text.
fn parse_metrics(text: &str) -> BrokerCounts {
    let mut out = BrokerCounts::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let (hist, rest) = if let Some(rest) = name.strip_prefix("herald_connect_duration_seconds")
        {
            (&mut out.connect, rest)
        } else if let Some(rest) = name
            .strip_prefix("herald_store_op_duration_seconds")
            .filter(|r| r.contains("op=\"attach\""))
        {
            (&mut out.attach, rest)
        } else {
            if name == "herald_session_takeovers_total" {
                out.takeovers = v;
            } else if let Some(code) = name
                .strip_prefix("herald_connack_total{code=\"")
                .and_then(|r| r.split('"').next())
                .and_then(|c| c.parse::<usize>().ok())
            {
                out.connacks[code.min(5)] += v;
            }
            continue;
        };
        if rest.starts_with("_sum") {
            hist.sum = v;
        } else if rest.starts_with("_count") {
            hist.count = v;
        } else if let Some(le) = rest.split("le=\"").nth(1).and_then(|l| l.split('"').next()) {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            hist.buckets.push((le, v));
        }
    }
    out
}

pub async fn storm(o: &Opts, target: &Target, pub_target: &Target) -> ScenarioResult {
    let name = o.named("storm");
    let n = o.devices;
    let mut r = ScenarioResult::new(&name, format!("{name}-{n}"));
    let per = o.queued;
    let total = n as u64 * per;
    r.param("devices", n);
    if pub_target.addr != target.addr {
        r.param("devices_on", target.addr.to_string());
        r.param("publisher_on", pub_target.addr.to_string());
    }
    r.param("queued_per_device", per);
    r.param(
        "storm_concurrency",
        if o.storm_concurrency == 0 {
            "unlimited".to_string()
        } else {
            o.storm_concurrency.to_string()
        },
    );
    r.param("refused_backoff_ms", o.refused_backoff * 1000.0);
    r.param("target_secs", o.target_secs);
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
    let t_setup = now_ns();
    park_sessions(o, target, n).await.report(&mut r, "setup: ");
    if !r.ok {
        return r;
    }
    r.metric("setup_secs", (now_ns() - t_setup) as f64 / 1e9);
    // The broker has closed every socket; give it a moment to file the sessions away.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 2. Queue `per` messages for each offline device.
    let deliveries = Arc::new(Deliveries::new(n as u64));
    if total > 0 {
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
        let st = publish_qos1(o, pub_target, plan, &deliveries).await;
        report_pub(&mut r, &st);
        if !r.ok {
            return r;
        }
    }

    // 3. The storm.
    let counts0 = o.metrics_addr.map(broker_counts);
    let kernel0 = tcp_ext();
    let redis0 = o.store_addr.map(redisstat::read);
    let storm = Arc::new(Storm {
        fleet: Fleet::default(),
        connacks: Default::default(),
        conn_errors: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        connack: Mutex::new(new_hist()),
        tcp: Mutex::new(new_hist()),
        connected_at: Mutex::new(new_hist()),
        retried: Mutex::new(Vec::new()),
    });
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mark = probe.mark();
    let t0 = now_ns();
    let ctx = Arc::new(Ctx {
        target: target.clone(),
        keep_alive: o.keepalive,
        login: o.login().map(|(u, p)| (u.to_string(), p.to_vec())),
        handshake_timeout: Duration::from_secs_f64(o.handshake_timeout),
        backoff: Duration::from_secs_f64(o.refused_backoff.max(0.0)),
        t0,
        deadline: t0 + (o.timeout * 1e9) as u64,
        sem: (o.storm_concurrency > 0).then(|| Arc::new(Semaphore::new(o.storm_concurrency))),
        storm: storm.clone(),
        stop: stop.clone(),
    });
    for i in 0..n {
        let dev = Device::new(deliveries.clone(), i as u64, false);
        tracker.spawn(reconnect(ctx.clone(), i, dev, device_id(o, i)));
    }
    tracker.close();
    let budget = Duration::from_secs_f64(o.timeout + 5.0);
    storm.fleet.wait_handshakes(n as u64, budget).await;
    deliveries.wait(total, budget).await;
    let cpu = probe.since(&mark);
    let t_end = now_ns();
    // The last PUBACKs' store writes (acks) are part of a reconnect's cost too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_settled = probe.since(&mark);
    let redis1 = o.store_addr.map(redisstat::read);
    let counts1 = o.metrics_addr.map(broker_counts);
    let kernel1 = tcp_ext();

    let fl = &storm.fleet;
    let connected = fl.connected.load(Relaxed);
    r.metric("connected", connected as f64);
    let all_connected_secs = (connected == n as u64)
        .then(|| fl.last_connect_ns.load(Relaxed).saturating_sub(t0) as f64 / 1e9);
    r.opt_metric("all_connected_secs", all_connected_secs);
    deliveries.report(&mut r, total);
    let delivered = deliveries.delivered.load(Relaxed);
    if delivered >= total && connected == n as u64 {
        let last = deliveries
            .last_ns
            .load(Relaxed)
            .max(fl.last_connect_ns.load(Relaxed));
        r.metric("all_delivered_secs", last.saturating_sub(t0) as f64 / 1e9);
    }
    let us = |ns: u64| ns as f64 / 1e3;
    for (key, h) in [("connack", &storm.connack), ("tcp_connect", &storm.tcp)] {
        let h = h.lock().unwrap();
        if !h.is_empty() {
            r.metric(&format!("{key}_p50_us"), us(h.value_at_quantile(0.50)));
            r.metric(&format!("{key}_p99_us"), us(h.value_at_quantile(0.99)));
            r.metric(&format!("{key}_max_us"), us(h.max()));
        }
    }
    {
        let h = storm.connected_at.lock().unwrap();
        if !h.is_empty() {
            r.metric("connected_p50_secs", h.value_at_quantile(0.50) as f64 / 1e9);
            r.metric("connected_p99_secs", h.value_at_quantile(0.99) as f64 / 1e9);
            // The shape of the storm: waves 1 s and 3 s apart are SYNs the kernel dropped
            // for a full accept queue, sent again.
            let step = 250_000_000u64;
            let counts: Vec<String> = h
                .iter_linear(step)
                .map(|v| v.count_since_last_iteration().to_string())
                .collect();
            r.notes
                .push(format!("connected per 0.25 s: {}", counts.join(" ")));
        }
    }
    let codes: Vec<u64> = storm.connacks.iter().map(|c| c.load(Relaxed)).collect();
    for (code, &c) in codes.iter().enumerate() {
        if c > 0 || code == 3 {
            r.metric(&format!("connack_{code}"), c as f64);
        }
    }
    let refused_other: u64 = codes[1..].iter().sum::<u64>() - codes[3];
    r.metric("refused_other", refused_other as f64);
    let conn_errors = storm.conn_errors.load(Relaxed);
    let timeouts = storm.timeouts.load(Relaxed);
    r.metric("conn_errors", conn_errors as f64);
    r.metric("handshake_timeouts", timeouts as f64);
    let storm_secs = t_end.saturating_sub(t0) as f64 / 1e9;
    r.metric("storm_secs", storm_secs);
    r.opt_metric("broker_cpu_pct", cpu.broker_pct);
    r.opt_metric("store_cpu_pct", cpu.store_pct);
    r.opt_metric("bench_cpu_pct", cpu.own_pct);
    r.opt_metric("broker_cpu_secs", cpu_settled.broker_secs);
    r.opt_metric("store_cpu_secs", cpu_settled.store_secs);
    if connected > 0 {
        let per = |s: Option<f64>| s.map(|s| s * 1e6 / connected as f64);
        r.opt_metric("broker_cpu_us_per_conn", per(cpu_settled.broker_secs));
        r.opt_metric("store_cpu_us_per_conn", per(cpu_settled.store_secs));
    }
    match (redis0, redis1) {
        (Some(Ok(a)), Some(Ok(b))) => redisstat::report_per(&mut r, &a, &b, connected, "conn"),
        (Some(Err(e)), _) | (_, Some(Err(e))) => r.notes.push(format!("redis stats: {e}")),
        _ => {}
    }
    match (counts0, counts1) {
        (Some(Ok(a)), Some(Ok(b))) => {
            r.metric("broker_takeovers", b.takeovers - a.takeovers);
            for code in 0..6 {
                let d = b.connacks[code] - a.connacks[code];
                if d > 0.0 || code == 3 {
                    r.metric(&format!("broker_connack_{code}"), d);
                }
            }
            // Where the time went on the broker's side: CONNECT read to CONNACK, and the
            // store's attach within it (from the histograms' buckets: upper bounds).
            b.connect.since(&a.connect).report(&mut r, "broker_connect");
            b.attach.since(&a.attach).report(&mut r, "broker_attach");
        }
        (Some(Err(e)), _) | (_, Some(Err(e))) => r.notes.push(format!("broker metrics: {e}")),
        _ => {}
    }

    // The kernel's side (machine-wide counters): SYNs dropped for a full accept queue (the
    // client sends them again after 1 s, then 3 s, ...), and the clients' SYN resends.
    if let (Some(a), Some(b)) = (kernel0, kernel1) {
        for (name, key) in [
            ("ListenOverflows", "kernel_listen_overflows"),
            ("TCPSynRetrans", "kernel_syn_retrans"),
            ("SyncookiesSent", "kernel_syncookies_sent"),
        ] {
            if let (Some(x), Some(y)) = (a.get(name), b.get(name)) {
                r.metric(key, y.saturating_sub(*x) as f64);
            }
        }
        let dropped = r.metrics.get("kernel_listen_overflows").copied();
        if let Some(d) = dropped.filter(|&d| d > 0.0) {
            r.notes.push(format!(
                "the kernel dropped {d:.0} SYNs for a full accept queue (listen backlog): those \
                 devices tried again 1 s later (TCP's SYN resend), some of them 3 s later"
            ));
        }
    }

    // The targets.
    let within = all_connected_secs.is_some_and(|s| s <= o.target_secs);
    r.notes.push(format!(
        "target: all {n} connected within {} s: {} ({})",
        o.target_secs,
        if within { "met" } else { "NOT met" },
        match all_connected_secs {
            Some(s) => format!("{s:.3} s"),
            None => format!("{connected} of {n} connected"),
        }
    ));
    let other_errors = refused_other + conn_errors + timeouts + fl.failed.load(Relaxed);
    r.notes.push(format!(
        "target: no error other than CONNACK 3: {} ({} CONNACK 3 retried, {} connection \
         errors, {} handshake timeouts, {} other refusals)",
        if other_errors == 0 { "met" } else { "NOT met" },
        codes[3],
        conn_errors,
        timeouts,
        refused_other
    ));
    for e in storm.retried.lock().unwrap().iter() {
        r.notes.push(format!("retried: {e}"));
    }
    let np = fl.not_present.load(Relaxed);
    if np > 0 {
        r.error(format!(
            "{np} devices reconnected without their session (session present = 0)"
        ));
    }

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
    fl.report(&mut r, "");
    if let Err(e) = wipe_sessions(o, target, n).await {
        r.error(e);
    }
    probe.check_alive(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_herald_metrics() {
        let text = "HTTP/1.0 200 OK\r\n\r\n# TYPE herald_connack_total counter\n\
            herald_connack_total{code=\"0\"} 10\nherald_connack_total{code=\"3\"} 4\n\
            herald_session_takeovers_total 2\n\
            herald_connect_duration_seconds_bucket{le=\"0.01\"} 5\n\
            herald_connect_duration_seconds_bucket{le=\"0.1\"} 9\n\
            herald_connect_duration_seconds_bucket{le=\"+Inf\"} 10\n\
            herald_connect_duration_seconds_sum 0.5\n\
            herald_connect_duration_seconds_count 10\n\
            herald_store_op_duration_seconds_bucket{op=\"ack\",le=\"0.01\"} 7\n\
            herald_store_op_duration_seconds_bucket{op=\"attach\",le=\"0.01\"} 3\n\
            herald_store_op_duration_seconds_count{op=\"attach\"} 3\n";
        let b = parse_metrics(text);
        assert_eq!(b.connacks, [10.0, 0.0, 0.0, 4.0, 0.0, 0.0]);
        assert_eq!(b.takeovers, 2.0);
        assert_eq!(b.connect.count, 10.0);
        assert_eq!(b.connect.quantile(0.5), Some(0.01));
        assert_eq!(b.connect.quantile(0.9), Some(0.1));
        assert_eq!(b.connect.quantile(0.99), Some(f64::INFINITY));
        assert_eq!(b.attach.buckets, vec![(0.01, 3.0)]);
        assert_eq!(b.attach.count, 3.0);
        let d = b.connect.since(&BrokerCounts::default().connect);
        assert_eq!(d.count, 10.0);
        let mut r = ScenarioResult::new("storm", "storm");
        d.report(&mut r, "broker_connect");
        assert_eq!(r.metrics.get("broker_connect_mean_us"), Some(&50_000.0));
        assert_eq!(r.metrics.get("broker_connect_p50_le_us"), Some(&10_000.0));
    }

    #[test]
    fn jitter_is_a_fraction() {
        for i in 0..1000 {
            for a in 1..5 {
                let j = jitter(i, a);
                assert!((0.0..1.0).contains(&j));
            }
        }
        assert_ne!(jitter(1, 1), jitter(2, 1));
    }
}
