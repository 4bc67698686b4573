//! `http` (issue 15): Herald's backend HTTP API against MQTT QoS 1 push, on one broker in
//! one run, the same devices online throughout.
//!
//! Phases, `--secs` each: (a) `mqtt`: the push scenario's publisher (window, lag bound);
//! (b) `http`: `POST /v1/push/{id}?qos=1` on `--http-concurrency` keep-alive connections;
//! (c) `batch`: `POST /v1/push` with `--batch-size` messages, `--batch-concurrency` in
//! flight; (d) `receipt`: (b) with `receipt=true`, unless Herald refuses the parameter;
//! (e) `mqtt_rate` and `http_rate`: MQTT, then HTTP, at `--http-rate` msgs/s, with the time
//! from each message's PUBACK or 202 to its arrival at the device (`Track`).
//!
//! Each phase numbers its messages from a round of its own (`Deliveries::next_phase`), so
//! a device checks order and duplicates per phase and no count leaks into the next one.
//! Metrics carry the phase as a prefix (`http_msgs_per_sec`, `mqtt_rate_ack_p99_us`, ...).
//!
//! - here: the phases and their figures;
//! - `api`: the HTTP client (hyper, keep-alive connections) and the receipt probe;
//! - `load`: the HTTP lanes.

mod api;
mod load;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crate::client::Target;
use crate::procstat::Probe;
use crate::redisstat;
use crate::report::ScenarioResult;
use crate::Opts;

use super::devices::{device_id, devices_online, wipe_sessions, Deliveries};
use super::publisher::{publish_qos1, PubPlan};
use super::{check_fds, put_latency};
use api::Api;
use load::{Kind, Plan};

/// Above this share of its core (%), the load generator may have set a phase's pace.
const BUSY_PCT: f64 = 80.0;

/// What a phase sent, for `Run::phase` to wait on and report.
struct Sent {
    /// Messages accepted (PUBACK or 202): each must reach its device.
    count: u64,
    start_ns: u64,
    send_end_ns: u64,
    /// The last round used: the next phase starts above it.
    last_round: u64,
    errors: Vec<String>,
    /// Requests (HTTP) or PUBLISH packets (MQTT).
    requests: u64,
    max_late_ns: u64,
}

struct Run<'a> {
    o: &'a Opts,
    pub_target: &'a Target,
    api: Arc<Api>,
    ids: Arc<Vec<String>>,
    d: Arc<Deliveries>,
    probe: Probe,
    floor: u64,
}

pub async fn http(o: &Opts, target: &Target, pub_target: &Target) -> ScenarioResult {
    let name = o.named("http");
    let mut r = ScenarioResult::new("http", &name);
    let n = o.devices.max(1);
    r.param("devices", n);
    r.param("secs", o.secs);
    r.param("payload", o.payload);
    r.param("window", o.window);
    r.param("http_concurrency", o.http_concurrency);
    r.param("batch_size", o.batch_size);
    r.param("batch_concurrency", o.batch_concurrency);
    r.param("rate", o.http_rate);
    // bench.sh gives the Redis column its store's address and pid.
    let redis = o.store_addr.is_some() || o.store_pid.is_some();
    r.param("store", if redis { "redis" } else { "memory" });
    let Some(addr) = o.http_addr else {
        r.error("--http-addr is required (Herald's --http-listen)");
        return r;
    };
    let api = match Api::new(addr, o.http_token.as_deref()) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            r.error(e);
            return r;
        }
    };
    if !check_fds(&mut r, n + o.http_concurrency + o.batch_concurrency + 8) {
        return r;
    }
    if let Err(e) = wipe_sessions(o, target, n).await {
        r.error(e);
        return r;
    }
    // Room for one fixed-rate phase, with slack for lanes that end a request late.
    let tracked = (o.http_rate * o.secs).ceil() as usize + 2 * o.http_concurrency + n;
    let d = Arc::new(Deliveries::with_track(n as u64, tracked));
    let (online, connected) = devices_online(o, target, n, &d, true).await;
    match connected {
        Err(e) => r.error(e),
        Ok(()) => {
            let mut run = Run {
                o,
                pub_target,
                api,
                ids: Arc::new((0..n).map(|i| device_id(o, i)).collect()),
                d,
                probe: Probe::new(&o.broker_pid, o.store_pid),
                floor: 0,
            };
            run.all(&mut r).await;
        }
    }
    online.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), online.tracker.wait()).await;
    online.fleet.report(&mut r, "");
    if let Err(e) = wipe_sessions(o, target, n).await {
        r.error(e);
    }
    Probe::new(&o.broker_pid, o.store_pid).check_alive(&mut r);
    r
}

/// Readings at the start of a phase.
struct Begun {
    mark: crate::procstat::Mark,
    redis: Option<Result<redisstat::Stats, String>>,
}

impl Run<'_> {
    async fn all(&mut self, r: &mut ScenarioResult) {
        let o = self.o;
        let lag = o.max_lag.min(o.devices as u64 * 500).max(1);
        let one = Kind::One { query: "" };
        let b = self.begin("mqtt");
        let sent = self.mqtt(None).await;
        let mqtt = self.end(r, "mqtt", b, sent).await;
        let b = self.begin("http");
        let sent = self.http(one, o.http_concurrency, None, Some(lag)).await;
        let http = self.end(r, "http", b, sent).await;
        let batch = Kind::Batch {
            size: o.batch_size.max(1),
        };
        let b = self.begin("batch");
        let sent = self.http(batch, o.batch_concurrency, None, Some(lag)).await;
        let batch = self.end(r, "batch", b, sent).await;
        ratio(r, "http_vs_mqtt_pct", http, mqtt);
        ratio(r, "batch_vs_mqtt_pct", batch, mqtt);
        if self.receipts_supported(r).await {
            let receipt = Kind::One {
                query: "&receipt=true",
            };
            let b = self.begin("receipt");
            let sent = self
                .http(receipt, o.http_concurrency, None, Some(lag))
                .await;
            let receipt = self.end(r, "receipt", b, sent).await;
            if let (Some(without), Some(with)) = (http, receipt) {
                r.metric("receipt_drop_pct", (1.0 - with / without) * 100.0);
            }
        }
        let rate = Some(o.http_rate);
        let b = self.begin("mqtt_rate");
        let sent = self.mqtt(rate).await;
        self.end(r, "mqtt_rate", b, sent).await;
        let b = self.begin("http_rate");
        let sent = self.http(one, o.http_concurrency, rate, None).await;
        self.end(r, "http_rate", b, sent).await;
    }

    /// A phase starts: its messages from the next free round, fresh counts, CPU and Redis
    /// readings.
    fn begin(&self, prefix: &str) -> Begun {
        eprintln!("herald-bench: http: phase {prefix}");
        self.d.next_phase(self.floor);
        Begun {
            redis: self.o.store_addr.map(redisstat::read),
            mark: self.probe.mark(),
        }
    }

    /// A phase ends once all its messages have arrived (or --timeout): delivered msgs/s,
    /// latency, CPU (and Redis commands) per message as metrics under `prefix`.
    async fn end(
        &mut self,
        r: &mut ScenarioResult,
        prefix: &str,
        begun: Begun,
        sent: Sent,
    ) -> Option<f64> {
        let o = self.o;
        let d = self.d.clone();
        d.wait(sent.count, Duration::from_secs_f64(o.timeout)).await;
        let cpu = self.probe.since(&begun.mark);
        let redis1 = o.store_addr.map(redisstat::read);
        self.floor = sent.last_round.max(self.floor) + 1;
        let delivered = d.delivered.load(Relaxed);
        let p = |k: &str| format!("{prefix}_{k}");
        r.metric(&p("sent"), sent.count as f64);
        r.metric(&p("requests"), sent.requests as f64);
        r.metric(&p("delivered"), delivered as f64);
        for e in &sent.errors {
            r.error(format!("{prefix}: {e}"));
        }
        if delivered < sent.count {
            r.error(format!(
                "{prefix}: {delivered} of {} messages delivered",
                sent.count
            ));
        }
        for (what, c) in [
            ("duplicates", &d.dups),
            ("out of order or missing", &d.gaps),
            ("at the wrong device", &d.misrouted),
            ("without a benchmark stamp", &d.bad_payload),
        ] {
            match c.load(Relaxed) {
                0 => {}
                x => r.error(format!("{prefix}: {x} messages {what}")),
            }
        }
        let secs = d.last_ns.load(Relaxed).saturating_sub(sent.start_ns) as f64 / 1e9;
        let rate = (secs > 0.0).then(|| delivered as f64 / secs);
        r.opt_metric(&p("msgs_per_sec"), rate);
        let send_secs = sent.send_end_ns.saturating_sub(sent.start_ns) as f64 / 1e9;
        if send_secs > 0.0 {
            r.metric(&p("achieved_rate"), sent.count as f64 / send_secs);
        }
        if sent.max_late_ns > 0 {
            r.metric(&p("max_late_us"), sent.max_late_ns as f64 / 1000.0);
        }
        // The shared helpers write unprefixed names: collect them apart, then prefix.
        let mut tmp = ScenarioResult::new("http", "");
        put_latency(&mut tmp, &d.hist.lock().unwrap());
        // Acknowledgement times are kept for a fixed-rate phase's messages; a saturating
        // phase sends far more, and its first ones alone would say little.
        if let Some(t) = d
            .track
            .as_ref()
            .filter(|t| sent.count as usize <= t.capacity())
        {
            let paired = t.paired();
            if paired.pairs > 0 {
                let us = |q: f64| paired.hist.value_at_quantile(q) as f64 / 1000.0;
                tmp.metric("ack_p50_us", us(0.5));
                tmp.metric("ack_p99_us", us(0.99));
                tmp.metric("ack_max_us", paired.hist.max() as f64 / 1000.0);
                tmp.metric(
                    "device_first_pct",
                    paired.device_first as f64 * 100.0 / paired.pairs as f64,
                );
                tmp.metric("ack_pairs", paired.pairs as f64);
            }
        } else if prefix.ends_with("_rate") {
            r.notes.push(format!(
                "{prefix}: {} messages, more than the {} whose acknowledgement times were kept",
                sent.count,
                tracked_capacity(&d)
            ));
        }
        cpu.report(&mut tmp, "", delivered);
        tmp.opt_metric("bench_cpu_pct", cpu.own_pct);
        if delivered > 0 {
            let per_msg = cpu.own_secs.map(|s| s * 1e6 / delivered as f64);
            tmp.opt_metric("bench_cpu_us_per_msg", per_msg);
        }
        if let (Some(Ok(a)), Some(Ok(b))) = (&begun.redis, &redis1) {
            redisstat::report(&mut tmp, a, b, delivered);
        }
        for (k, v) in tmp.metrics {
            r.metric(&p(&k), v);
        }
        if let Some(own) = cpu.own_pct.filter(|&c| c > BUSY_PCT) {
            r.notes.push(format!(
                "{prefix}: the load generator used {own:.0} % of a core: it may have set \
                 this phase's pace (compare the broker CPU per message)"
            ));
        }
        rate
    }

    /// The MQTT publisher of `push` (window, lag bound), or at a fixed rate.
    async fn mqtt(&self, rate: Option<f64>) -> Sent {
        let (o, floor) = (self.o, self.floor);
        let n = self.ids.len();
        let plan = PubPlan {
            devices: n,
            seq_base: floor * n as u64,
            count: None,
            duration: Some(Duration::from_secs_f64(o.secs)),
            rate,
            window: o.window,
            // As in `push`: at most 500 undelivered per device, below the outbox cap.
            max_lag: rate
                .is_none()
                .then_some(o.max_lag.min(n as u64 * 500).max(1)),
            payload: o.payload,
            stop: None,
        };
        let st = publish_qos1(o, self.pub_target, plan, &self.d).await;
        Sent {
            count: st.sent,
            start_ns: st.start_ns,
            send_end_ns: st.send_end_ns,
            last_round: floor + st.sent / n as u64 + 1,
            errors: st.error.into_iter().collect(),
            requests: st.sent,
            max_late_ns: 0,
        }
    }

    async fn http(
        &self,
        kind: Kind,
        lanes: usize,
        rate: Option<f64>,
        max_lag: Option<u64>,
    ) -> Sent {
        let o = self.o;
        let plan = Plan {
            kind,
            lanes,
            devices: self.ids.len(),
            floor: self.floor,
            duration: Duration::from_secs_f64(o.secs),
            rate,
            max_lag,
            payload: o.payload,
        };
        let (sent, start_ns) = load::run(&self.api, plan, &self.ids, &self.d).await;
        let errors = std::mem::take(&mut *sent.errors.lock().unwrap());
        Sent {
            count: sent.accepted.load(Relaxed),
            start_ns,
            send_end_ns: crate::client::now_ns(),
            last_round: sent.last_round.load(Relaxed),
            errors,
            requests: sent.requests.load(Relaxed),
            max_late_ns: sent.max_late_ns.load(Relaxed),
        }
    }

    /// Whether Herald takes `receipt=true` (`api::probe_receipts`). A 400 means this Herald
    /// does not know the parameter yet: noted, and the receipt phase is skipped.
    async fn receipts_supported(&self, r: &mut ScenarioResult) -> bool {
        match api::probe_receipts(&self.api).await {
            Ok((202, _)) => {
                r.param("receipts", "supported");
                true
            }
            Ok((400, body)) => {
                let why = "receipts: not supported by this Herald (400)";
                eprintln!("herald-bench: {why}");
                r.param("receipts", "not supported (400)");
                r.notes.push(format!(
                    "{why}: {}; the receipt phase (d) was skipped",
                    String::from_utf8_lossy(&body).trim()
                ));
                false
            }
            Ok((status, body)) => {
                r.error(format!(
                    "receipt probe: {status} {}",
                    String::from_utf8_lossy(&body)
                ));
                false
            }
            Err(e) => {
                r.error(format!("receipt probe: {e}"));
                false
            }
        }
    }
}

fn tracked_capacity(d: &Deliveries) -> usize {
    d.track.as_ref().map_or(0, |t| t.capacity())
}

/// `a / b` in percent, when both phases gave a figure.
fn ratio(r: &mut ScenarioResult, key: &str, a: Option<f64>, b: Option<f64>) {
    if let (Some(a), Some(b)) = (a, b) {
        if b > 0.0 {
            r.metric(key, a / b * 100.0);
        }
    }
}
