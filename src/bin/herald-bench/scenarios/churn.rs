//! `churn` (issue 12): the locks every publish and every SUBSCRIBE take, under load. The
//! QoS 0 pairs of `qos0` publish for `--secs` while `--churn` other clients SUBSCRIBE to a
//! wildcard filter and UNSUBSCRIBE again, each as fast as its SUBACK and UNSUBACK come back.
//! A SUBSCRIBE writes the subscription table that every publish reads, and looks up the
//! retained messages its filter matches; with `--churn 0` this is the plain qos0 baseline,
//! measured by the same code.
//!
//! Filters: `churn/<i>/+/x` (client i; it matches no retained message), or with
//! `--churn-retained` `r/<a>/+`, `a` moving on with every SUBSCRIBE. `--retained N` first
//! stores N retained messages (QoS 0) on `r/<a>/<b>`, `--retained-fanout` (default 4) of them
//! under each `a`: a churn SUBSCRIBE then matches only those few, so what it measures is
//! the broker's lookup among the N, not the delivery of what it finds. They are cleared
//! (empty retained PUBLISHes) after the run. Only standard MQTT 3.1.1, so Mosquitto runs it
//! the same way.
//!
//! Figures: the qos0 ones (delivered msgs/s, latency p50/p99) and the churn clients'
//! SUBSCRIBE + UNSUBSCRIBE round trips per second during the publishing, with their SUBACK
//! and UNSUBACK latency; a result per `--pairs` value, named `churn-<pairs>-<churn>`, then
//! `-rsub` with `--churn-retained` and `-r<N>` with `--retained N`. When the pairs saturate
//! the broker, a SUBSCRIBE queues behind their messages like everything else, so compare
//! runs at the same `--pairs`. Not part of `all` nor of `scripts/bench.sh`: a targeted
//! measurement.
//! A lock contends only when the broker runs on two cores, so pin Herald to two (its
//! runtime then has two workers) and herald-bench to the same two, e.g.
//!
//! ```text
//! taskset -c 0,1 target/release/herald --listen 127.0.0.1:18830 &   # memory store
//! B="taskset -c 0,1 target/release/herald-bench churn --port 18830 --broker-pid $! --pairs 4 --secs 10"
//! $B --churn 0                                     # baseline: qos0 alone
//! $B --churn 8                                     # subscription table
//! $B --churn 8 --churn-retained                    # + retained lookup, nothing retained
//! $B --churn 8 --churn-retained --retained 100000  # + retained lookup among 100,000
//! ```
//!
//! Mosquitto the same way, e.g. `taskset -c 0,1 mosquitto -c mosquitto.conf` with the
//! settings of `scripts/bench.sh` (`listener 18831 127.0.0.1`, `allow_anonymous true`) and
//! `set_tcp_nodelay true`: with Nagle's algorithm on (its default) an UNSUBACK written behind
//! the retained messages waits for this tool's delayed ACK, about 40 ms, and that, not the
//! broker, sets the churn rate. Mosquitto is single-threaded, so there the figures show the
//! work per SUBSCRIBE, not contention.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{self, now_ns, Client, Hello, OnPublish, Target};
use crate::procstat::Probe;
use crate::report::ScenarioResult;
use crate::Opts;

use super::qos0::Pairs;
use super::{check_fds, new_hist, open_retry, Fleet};

/// Counts the messages a connection receives (retained ones, for the churn clients).
#[derive(Default)]
struct Count(u64);

impl OnPublish for Count {
    fn publish(&mut self, _: u8, _: bool, _: &[u8], _: &[u8], _: u64) {
        self.0 += 1;
    }
}

/// What the churn clients share.
struct Churn {
    /// SUBSCRIBE + UNSUBSCRIBE round trips completed, all clients.
    cycles: AtomicU64,
    /// Latencies are recorded only while this is set (the publishing phase).
    measuring: AtomicBool,
    suback: Mutex<Histogram<u64>>,
    unsuback: Mutex<Histogram<u64>>,
    retained: AtomicU64,
    refused: AtomicU64,
}

/// Which filter churn client `i` subscribes to the `k`-th time.
#[derive(Clone, Copy)]
struct Filters {
    retained: bool,
    clients: u64,
    /// The number of `r/<a>` groups the retained messages are in (at least 1).
    groups: u64,
}

impl Filters {
    fn filter(&self, i: usize, k: u64) -> String {
        if self.retained {
            // Successive SUBSCRIBEs (of all clients) go to different groups, as different
            // subscribers' would: one filter over and over would measure a lookup whose
            // nodes stay in the CPU's cache.
            let a = (i as u64 + k * self.clients) % self.groups;
            format!("r/{a}/+")
        } else {
            format!("churn/{i}/+/x")
        }
    }

    fn describe(&self) -> &'static str {
        if self.retained {
            "r/<a>/+"
        } else {
            "churn/<i>/+/x"
        }
    }
}

pub async fn churn(o: &Opts, target: &Target, pairs: usize) -> ScenarioResult {
    let name = o.named("churn");
    let mut variant = format!("{name}-{pairs}-{}", o.churn);
    if o.churn_retained {
        variant.push_str("-rsub");
    }
    if o.retained > 0 {
        variant.push_str(&format!("-r{}", o.retained));
    }
    let mut r = ScenarioResult::new(&name, variant);
    let fanout = o.retained_fanout.max(1);
    let filters = Filters {
        retained: o.churn_retained,
        clients: o.churn.max(1) as u64,
        groups: o.retained.div_ceil(fanout).max(1) as u64,
    };
    r.param("pairs", pairs);
    r.param("secs", o.secs);
    r.param("payload", o.payload);
    r.param("lag", o.lag);
    r.param("churn", o.churn);
    r.param("churn_filter", filters.describe());
    r.param("retained", o.retained);
    r.param("retained_fanout", fanout);
    if !check_fds(&mut r, 2 * pairs + o.churn + 1) {
        return r;
    }
    let probe = Probe::new(&o.broker_pid, o.store_pid);
    let run = format!("{}-{}", std::process::id(), now_ns() % 1_000_000);
    // Connection indexes (source addresses) after those of the pairs.
    let first_conn = 2 * pairs;
    if o.retained > 0 {
        let t = now_ns();
        match retain(o, target, first_conn, &run, o.retained, fanout, false).await {
            Ok(()) => r.metric("retained_setup_secs", (now_ns() - t) as f64 / 1e9),
            Err(e) => {
                r.error(format!("storing the retained messages: {e}"));
                return r;
            }
        }
    }

    let shared = Arc::new(Churn {
        cycles: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        suback: Mutex::new(new_hist()),
        unsuback: Mutex::new(new_hist()),
        retained: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let fleet = Arc::new(Fleet::default());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    for i in 0..o.churn {
        let (o, target, shared, fleet, stop, run) = (
            o.clone(),
            target.clone(),
            shared.clone(),
            fleet.clone(),
            stop.clone(),
            run.clone(),
        );
        tracker.spawn(async move {
            let id = format!("churn-{run}-{i}");
            let conn = first_conn + 1 + i;
            churn_client(&o, &target, &id, conn, i, filters, &shared, &fleet, &stop).await;
        });
    }
    tracker.close();
    let budget = Duration::from_secs_f64(o.timeout + o.churn as f64 / 200.0);
    fleet.wait_handshakes(o.churn as u64, budget).await;
    let churn_ok = fleet.connected.load(Relaxed) == o.churn as u64;
    if !churn_ok {
        r.error(format!(
            "only {} of {} churn clients connected",
            fleet.connected.load(Relaxed),
            o.churn
        ));
    }

    if churn_ok {
        if let Some(mut p) = Pairs::connect(o, target, pairs, &mut r).await {
            shared.measuring.store(true, Relaxed);
            let (c0, t0) = (shared.cycles.load(Relaxed), now_ns());
            let sent = p.publish(o, &probe).await;
            let (c1, t1) = (shared.cycles.load(Relaxed), now_ns());
            shared.measuring.store(false, Relaxed);
            p.finish(sent, &probe, &mut r).await;
            if o.churn > 0 {
                let secs = (t1 - t0) as f64 / 1e9;
                r.metric("churn_cycles", (c1 - c0) as f64);
                r.metric("churn_subs_per_sec", (c1 - c0) as f64 / secs.max(1e-9));
                if c1 == c0 {
                    r.error("no churn client completed a SUBSCRIBE + UNSUBSCRIBE");
                }
            }
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    if o.churn > 0 {
        let us = |ns: u64| ns as f64 / 1000.0;
        for (key, h) in [("suback", &shared.suback), ("unsuback", &shared.unsuback)] {
            let h = h.lock().unwrap();
            if !h.is_empty() {
                r.metric(
                    &format!("churn_{key}_p50_us"),
                    us(h.value_at_quantile(0.50)),
                );
                r.metric(
                    &format!("churn_{key}_p99_us"),
                    us(h.value_at_quantile(0.99)),
                );
                r.metric(&format!("churn_{key}_max_us"), us(h.max()));
            }
        }
        let all = shared.cycles.load(Relaxed);
        let retained = shared.retained.load(Relaxed);
        if all > 0 {
            r.metric("churn_retained_per_sub", retained as f64 / all as f64);
        }
        if o.churn_retained && o.retained > 0 && retained == 0 {
            r.error("the churn clients' SUBSCRIBEs got none of the retained messages");
        }
        let refused = shared.refused.load(Relaxed);
        if refused > 0 {
            r.error(format!("{refused} churn SUBSCRIBEs refused (0x80)"));
        }
    }
    if o.churn > 0 {
        fleet.report(&mut r, "churn: ");
    }
    if o.retained > 0 {
        if let Err(e) = retain(o, target, first_conn, &run, o.retained, fanout, true).await {
            r.error(format!("clearing the retained messages: {e}"));
        }
    }
    r
}

/// One churn client: SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, again, until `stop`.
#[allow(clippy::too_many_arguments)]
async fn churn_client(
    o: &Opts,
    target: &Target,
    id: &str,
    conn: usize,
    i: usize,
    filters: Filters,
    shared: &Churn,
    fleet: &Fleet,
    stop: &CancellationToken,
) {
    let hello = Hello {
        client_id: id,
        clean: true,
        keep_alive: o.keepalive,
        subscribe: None,
        login: o.login(),
    };
    let mut count = Count::default();
    let Some(mut c) = open_retry(o, target, conn, &hello, &mut count, 16 * 1024, fleet).await
    else {
        return;
    };
    // Recorded here and merged at the end: a shared lock per sample would be contention of
    // this tool's own.
    let (mut sub_h, mut unsub_h) = (new_hist(), new_hist());
    let wait = Duration::from_secs_f64(o.timeout);
    let mut k: u64 = 0;
    let failed = loop {
        let filter = filters.filter(i, k);
        // Odd packet ids for SUBSCRIBE, the next one for its UNSUBSCRIBE: never 0.
        let pkid = (k % 32_767) as u16 * 2 + 1;
        let t0 = now_ns();
        let acked = c.subacks;
        if let Err(e) = c.subscribe(pkid, &filter, 0).await {
            break Some(format!("write SUBSCRIBE: {e}"));
        }
        match read_until(&mut c, &mut count, |c| c.subacks > acked, wait, stop).await {
            Ok(true) => {}
            Ok(false) => break None,
            Err(e) => break Some(format!("SUBACK: {e}")),
        }
        let t1 = now_ns();
        let acked = c.unsubacks;
        if let Err(e) = c.unsubscribe(pkid + 1, &filter).await {
            break Some(format!("write UNSUBSCRIBE: {e}"));
        }
        match read_until(&mut c, &mut count, |c| c.unsubacks > acked, wait, stop).await {
            Ok(true) => {}
            Ok(false) => break None,
            Err(e) => break Some(format!("UNSUBACK: {e}")),
        }
        let t2 = now_ns();
        if shared.measuring.load(Relaxed) {
            sub_h.saturating_record(t1 - t0);
            unsub_h.saturating_record(t2 - t1);
        }
        shared.cycles.fetch_add(1, Relaxed);
        k += 1;
    };
    let _ = shared.suback.lock().unwrap().add(&sub_h);
    let _ = shared.unsuback.lock().unwrap().add(&unsub_h);
    shared.retained.fetch_add(count.0, Relaxed);
    shared.refused.fetch_add(c.refused_subs as u64, Relaxed);
    match failed {
        Some(e) => {
            fleet.lost.fetch_add(1, Relaxed);
            fleet.note_error(format!("{id}: {e}"));
        }
        None => c.disconnect(Duration::from_secs(2)).await,
    }
}

/// Reads until `done`. Ok(false): `stop` came first.
async fn read_until(
    c: &mut Client,
    h: &mut Count,
    done: impl Fn(&Client) -> bool,
    wait: Duration,
    stop: &CancellationToken,
) -> Result<bool, String> {
    let deadline = Instant::now() + wait;
    while !done(c) {
        tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            res = tokio::time::timeout_at(deadline, c.read_some(h)) => match res {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Err("connection closed by the broker".into()),
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Err(_) => return Err(format!("no answer within {wait:?}")),
            },
        }
    }
    Ok(true)
}

/// Stores `n` retained messages on `r/<a>/<b>` (`fanout` per `a`), or with `clear` removes
/// them, over one connection.
async fn retain(
    o: &Opts,
    target: &Target,
    conn: usize,
    run: &str,
    n: usize,
    fanout: usize,
    clear: bool,
) -> Result<(), String> {
    let id = format!("churn-retain-{run}");
    let hello = Hello {
        client_id: &id,
        clean: true,
        keep_alive: 0,
        subscribe: None,
        login: o.login(),
    };
    let fleet = Fleet::default();
    let mut count = Count::default();
    let Some(mut c) = open_retry(o, target, conn, &hello, &mut count, 64 * 1024, &fleet).await
    else {
        return Err(format!("{:?}", fleet.errors.lock().unwrap()));
    };
    let payload = if clear { 0 } else { o.payload.max(1) };
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    for j in 0..n {
        let topic = format!("r/{}/{}", j / fanout, j % fanout);
        client::encode_retained(&mut wbuf, topic.as_bytes(), payload);
        if wbuf.len() >= 60 * 1024 || j + 1 == n {
            c.stream
                .write_all(&wbuf)
                .await
                .map_err(|e| format!("write: {e}"))?;
            wbuf.clear();
        }
    }
    // A broker handles one connection's packets in order: once the SUBACK of this SUBSCRIBE
    // is back, every PUBLISH before it has been handled, and the last group's retained
    // messages (delivered for it) show they were stored.
    let last = (n - 1) / fanout;
    let expect = if clear { 0 } else { n - last * fanout } as u64;
    let wait = Duration::from_secs_f64(o.timeout);
    let never = CancellationToken::new();
    c.subscribe(1, &format!("r/{last}/+"), 0)
        .await
        .map_err(|e| format!("write SUBSCRIBE: {e}"))?;
    read_until(&mut c, &mut count, |c| c.subacks > 0, wait, &never).await?;
    if expect > 0 {
        let got = |count: &Count| count.0 >= expect;
        let deadline = Instant::now() + wait;
        while !got(&count) {
            match tokio::time::timeout_at(deadline, c.read_some(&mut count)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Err("connection closed by the broker".into()),
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Err(_) => {
                    return Err(format!(
                        "{} of the {expect} retained messages of r/{last}/+ came back",
                        count.0
                    ))
                }
            }
        }
    }
    c.disconnect(Duration::from_secs(2)).await;
    Ok(())
}
