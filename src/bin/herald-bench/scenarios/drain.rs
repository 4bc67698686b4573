//! `drain`: devices go offline, QoS 1 messages are queued for them, all reconnect: time
//! until every message has arrived.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{now_ns, Target};
use crate::procstat::Probe;
use crate::report::ScenarioResult;
use crate::Opts;

use super::devices::{park_sessions, spawn_devices, wipe_sessions, Deliveries};
use super::publisher::{publish_qos1, report_pub, PubPlan};
use super::{check_fds, Fleet};

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
    park_sessions(o, target, n).await.report(&mut r, "setup: ");
    if !r.ok {
        return r;
    }
    // The broker has closed every socket; give it a moment to file the sessions away.
    tokio::time::sleep(Duration::from_millis(200)).await;

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
