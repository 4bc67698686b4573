//! `login-storm` (issue 10): push latency before, during and after a storm of password
//! logins.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{now_ns, Client, Hello, Ignore, Target};
use crate::procstat::Probe;
use crate::report::ScenarioResult;
use crate::Opts;

use super::devices::{devices_online, wipe_sessions, Deliveries, Online};
use super::publisher::{publish_qos1, report_pub, PubPlan};
use super::{check_fds, new_hist, put_latency, serve, Fleet};

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
    let (online, connected) = devices_online(po, target, n, &deliveries, true).await;
    let Online {
        fleet,
        stop,
        tracker,
    } = online;
    if let Err(e) = connected {
        r.error(e);
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
