//! `push` (as fast as the window allows) and `push-rate` (a fixed offered rate): QoS 1 to
//! online devices, delivered msgs/s and end-to-end latency.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crate::client::{now_ns, Target};
use crate::procstat::Probe;
use crate::redisstat;
use crate::report::ScenarioResult;
use crate::Opts;

use super::devices::{devices_online, wipe_sessions, Deliveries};
use super::publisher::{publish_qos1, report_pub, PubPlan, WARMUP};
use super::{check_fds, put_latency};

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
    let (online, connected) = devices_online(o, target, n, &deliveries, true).await;
    if let Err(e) = connected {
        r.error(e);
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
    online.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), online.tracker.wait()).await;
    online.fleet.report(&mut r, "");
    if let Err(e) = wipe_sessions(o, target, n).await {
        r.error(e);
    }
    probe.check_alive(&mut r);
    r
}
