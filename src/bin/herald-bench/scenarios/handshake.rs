//! `handshake` (issue 10): fresh connections as fast as they go, TLS included with
//! `--tls`: connections/s and the broker's CPU per connection.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::client::{now_ns, Hello, Ignore, Target};
use crate::procstat::Probe;
use crate::report::ScenarioResult;
use crate::Opts;

use super::{new_hist, open_retry, put_latency, Fleet};

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
