//! `idle`: N clients connect and stay idle (issue 3): connect rate, broker RSS per
//! connection, broker CPU while idle.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{now_ns, Hello, Ignore, Target};
use crate::procstat::Probe;
use crate::report::ScenarioResult;
use crate::Opts;

use super::{check_fds, open_retry, serve, Fleet};

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
    // The broker's CPU per idle connection per minute: what the node's periodic work costs
    // a connection that only sits there (from /proc's 10 ms ticks: over 30 s with 19,000
    // connections one tick is about 1 µs here).
    if connected > 0 && o.idle_secs > 0.0 {
        r.opt_metric(
            "idle_cpu_us_per_conn_min",
            idle_cpu
                .broker_secs
                .map(|s| s * 1e6 / connected as f64 / (o.idle_secs / 60.0)),
        );
    }
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
