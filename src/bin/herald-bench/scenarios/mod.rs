//! The five scenarios of issue 3: idle, push, push-rate, qos0, drain; those of issue 10:
//! handshake and login-storm; and churn (issue 12).
//!
//! Every long-lived connection is one task; a publisher is two (writer and PUBACK reader).
//! Handshakes go through one semaphore so that at most `--concurrency` are in flight.
//!
//! - here: what every scenario shares: `Fleet` (connection bookkeeping), `open_retry`,
//!   `serve` (a connected client's life), latency histograms.
//! - `idle`: connect N clients, sit idle.
//! - `devices`: persistent-session devices on push/<id> and their delivery bookkeeping
//!   (push, push-rate, drain, login-storm).
//! - `publisher`: the QoS 1 publisher those devices get their messages from.
//! - `push`: push and push-rate.
//! - `drain`: offline devices, queued messages, reconnect.
//! - `qos0`: QoS 0 publisher-subscriber pairs.
//! - `churn`: the qos0 pairs while other clients SUBSCRIBE and UNSUBSCRIBE (issue 12).
//! - `handshake`, `login_storm`: issue 10.
//! - `storm`: a reconnect storm (persistent sessions with queued messages, all back at once).
//! - `http`: the backend HTTP API against MQTT push (issue 15); `track`: its per-message
//!   acknowledgement and arrival times.

mod churn;
mod devices;
mod drain;
mod handshake;
mod http;
mod idle;
mod login_storm;
mod publisher;
mod push;
mod qos0;
mod storm;
mod track;

pub use churn::churn;
pub use drain::drain;
pub use handshake::handshake;
pub use http::http;
pub use idle::idle;
pub use login_storm::login_storm;
pub use push::push;
pub use qos0::qos0;
pub use storm::storm;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{now_ns, Client, Hello, OnPublish, Target};
use crate::procstat::{self};
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
