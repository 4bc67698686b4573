//! `qos0`: publisher-subscriber pairs at QoS 0, each publisher at most `--lag` messages
//! ahead of its subscriber (so nothing is dropped for a full queue): msgs/s and latency.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{self, now_ns, Hello, Ignore, OnPublish, Stream, Target};
use crate::procstat::{Mark, Probe};
use crate::report::ScenarioResult;
use crate::Opts;

use super::{new_hist, open_retry, put_latency, serve, Fleet};

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
    let Some(mut p) = Pairs::connect(o, target, pairs, &mut r).await else {
        return r;
    };
    let sent = p.publish(o, &probe).await;
    p.finish(sent, &probe, &mut r).await;
    r
}

/// The pairs of one run, connected: subscribers reading, publishers not yet sending. `churn`
/// runs its churn clients around them.
pub(super) struct Pairs {
    states: Vec<Arc<Pair>>,
    hist: Arc<Mutex<Histogram<u64>>>,
    fleet: Arc<Fleet>,
    stop: CancellationToken,
    tracker: TaskTracker,
    pubs: Vec<Stream>,
    run: String,
}

/// What the publishers of `Pairs::publish` sent.
pub(super) struct Sent {
    t0: u64,
    mark: Mark,
    total: u64,
    stalls: u64,
    per_pair: Vec<u64>,
    /// Kept open until the rest has arrived: a broker may drop what a closed publisher sent.
    streams: Vec<Stream>,
}

impl Pairs {
    /// Connects `pairs` subscribers, then their publishers (connection indexes 0 .. 2 *
    /// pairs). None, with the error in `r`, if one of them does not connect.
    pub(super) async fn connect(
        o: &Opts,
        target: &Target,
        pairs: usize,
        r: &mut ScenarioResult,
    ) -> Option<Pairs> {
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
                if let Some(c) =
                    open_retry(&o, &target, p, &hello, &mut sub, 64 * 1024, &fleet).await
                {
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
            fleet.report(r, "");
            return None;
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
                    return None;
                }
            }
        }
        Some(Pairs {
            states,
            hist,
            fleet,
            stop,
            tracker,
            pubs,
            run,
        })
    }

    /// Every publisher sends for `--secs`, at most `--lag` messages ahead of its subscriber.
    pub(super) async fn publish(&mut self, o: &Opts, probe: &Probe) -> Sent {
        let mark = probe.mark();
        let t0 = now_ns();
        let secs = Duration::from_secs_f64(o.secs);
        let mut handles = Vec::new();
        for (p, mut stream) in std::mem::take(&mut self.pubs).into_iter().enumerate() {
            let pair = self.states[p].clone();
            let topic = format!("bench/qos0/{}/{p}", self.run).into_bytes();
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
        let mut out = Sent {
            t0,
            mark,
            total: 0,
            stalls: 0,
            per_pair: Vec::new(),
            streams: Vec::new(),
        };
        for h in handles {
            if let Ok((s, st, stream)) = h.await {
                out.total += s;
                out.stalls += st;
                out.per_pair.push(s);
                out.streams.push(stream);
            }
        }
        out
    }

    /// Waits for what is still on its way, puts the figures (and what went wrong) in `r`,
    /// disconnects the subscribers.
    pub(super) async fn finish(self, sent: Sent, probe: &Probe, r: &mut ScenarioResult) {
        let states = &self.states;
        // What is still on its way: wait until it stops coming.
        for (p, &s) in sent.per_pair.iter().enumerate() {
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
        let cpu = probe.since(&sent.mark);
        drop(sent.streams);
        let (t0, sent_total) = (sent.t0, sent.total);
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
        r.metric("stalls", sent.stalls as f64);
        if secs > 0.0 {
            r.metric("msgs_per_sec", received as f64 / secs);
            r.metric("secs", secs);
        }
        put_latency(r, &self.hist.lock().unwrap());
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
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await;
        self.fleet.report(r, "");
        probe.check_alive(r);
    }
}
