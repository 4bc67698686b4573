//! Devices: persistent sessions subscribed to push/<id>, and the bookkeeping of what they
//! received (shared by push, push-rate, drain, login-storm and storm).
//!
//! - `wipe_sessions`: every device id once with a clean session (a broker used before).
//! - `park_sessions`: every device's persistent session made and subscribed, then offline
//!   (drain, storm).
//! - `devices_online`: every device connected, subscribed and reading (push, login-storm).
//! - `spawn_devices`: the device tasks themselves.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{self, Hello, Ignore, OnPublish, Target};
use crate::report::ScenarioResult;
use crate::Opts;

use super::publisher::WARMUP;
use super::track::Track;
use super::{new_hist, open_retry, serve, Fleet};

/// Delivery bookkeeping of all devices of a scenario.
pub(super) struct Deliveries {
    pub(super) devices: u64,
    /// Messages counted once each (first arrival).
    pub(super) delivered: AtomicU64,
    pub(super) dups: AtomicU64,
    /// A device got message n+k (k > 0) while expecting n: reordered or lost.
    pub(super) gaps: AtomicU64,
    /// Warm-up messages (sequence numbers with `WARMUP` set), counted apart.
    pub(super) warm: AtomicU64,
    pub(super) misrouted: AtomicU64,
    pub(super) bad_payload: AtomicU64,
    pub(super) last_ns: AtomicU64,
    pub(super) hist: Mutex<Histogram<u64>>,
    /// login-storm: latencies by when the message was sent: before `phase_start`, from
    /// there to `phase_end`, after (both u64::MAX until set).
    pub(super) phase_start: AtomicU64,
    pub(super) phase_end: AtomicU64,
    pub(super) phase_hists: [Mutex<Histogram<u64>>; 3],
    /// Record into `phase_hists` too (set when login-storm's measured baseline starts).
    pub(super) phased: AtomicBool,
    /// http: the round (sequence number / devices) a new phase starts at. A device's first
    /// message of that phase may jump there from wherever the last phase left it, which is
    /// not a gap: the phases number their messages apart so that their counts never mix.
    pub(super) round_floor: AtomicU64,
    /// http: arrival times per message, for "acknowledged -> at the device".
    pub(super) track: Option<Track>,
    /// Messages counted in `delivered`, per device: the HTTP lanes bound each device's
    /// backlog with it, since they do not spread their messages evenly over all devices.
    pub(super) per_device: Vec<AtomicU64>,
    pub(super) notify: Notify,
}

impl Deliveries {
    pub(super) fn new(devices: u64) -> Self {
        Deliveries {
            devices,
            delivered: AtomicU64::new(0),
            dups: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            warm: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            bad_payload: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            hist: Mutex::new(new_hist()),
            phase_start: AtomicU64::new(u64::MAX),
            phase_end: AtomicU64::new(u64::MAX),
            phase_hists: [
                Mutex::new(new_hist()),
                Mutex::new(new_hist()),
                Mutex::new(new_hist()),
            ],
            phased: AtomicBool::new(false),
            round_floor: AtomicU64::new(0),
            track: None,
            per_device: (0..devices).map(|_| AtomicU64::new(0)).collect(),
            notify: Notify::new(),
        }
    }

    /// With arrival times kept for `capacity` messages of a phase (`Track`).
    pub(super) fn with_track(devices: u64, capacity: usize) -> Self {
        Deliveries {
            track: Some(Track::new(capacity)),
            ..Deliveries::new(devices)
        }
    }

    /// http: a new phase whose messages start at round `floor`: the counts, the latency
    /// histogram and the tracked times start again from zero. Call it once everything of the
    /// last phase has arrived.
    pub(super) fn next_phase(&self, floor: u64) {
        self.round_floor.store(floor, Relaxed);
        for c in [
            &self.delivered,
            &self.dups,
            &self.gaps,
            &self.misrouted,
            &self.bad_payload,
            &self.last_ns,
        ] {
            c.store(0, Relaxed);
        }
        for c in &self.per_device {
            c.store(0, Relaxed);
        }
        self.hist.lock().unwrap().reset();
        if let Some(t) = &self.track {
            t.start(floor * self.devices);
        }
    }

    /// Which phase a message sent at `ts` belongs to (0 before, 1 during, 2 after).
    fn phase(&self, ts: u64) -> usize {
        if ts < self.phase_start.load(Relaxed) {
            0
        } else if ts <= self.phase_end.load(Relaxed) {
            1
        } else {
            2
        }
    }

    /// Waits until `n` messages have been delivered. False on timeout.
    pub(super) async fn wait(&self, n: u64, timeout: Duration) -> bool {
        self.wait_for(&self.delivered, n, timeout).await
    }

    pub(super) async fn wait_for(&self, count: &AtomicU64, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if count.load(Relaxed) >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return count.load(Relaxed) >= n;
            }
        }
    }

    pub(super) fn report(&self, r: &mut ScenarioResult, expected: u64) {
        let delivered = self.delivered.load(Relaxed);
        r.metric("delivered", delivered as f64);
        r.metric("duplicates", self.dups.load(Relaxed) as f64);
        let gaps = self.gaps.load(Relaxed);
        let mis = self.misrouted.load(Relaxed);
        let bad = self.bad_payload.load(Relaxed);
        if delivered < expected {
            r.error(format!("{delivered} of {expected} messages delivered"));
        }
        if gaps > 0 {
            r.error(format!(
                "{gaps} messages arrived out of order or went missing"
            ));
        }
        if mis > 0 {
            r.error(format!("{mis} messages reached the wrong device"));
        }
        if bad > 0 {
            r.error(format!("{bad} payloads without a benchmark stamp"));
        }
    }
}

/// A device: message `seq` belongs to device `seq % devices` and is its `seq / devices`-th.
pub(super) struct Device {
    shared: Arc<Deliveries>,
    index: u64,
    warm: u64,
    next: u64,
    new: u64,
    latency: bool,
    /// Latency samples of this read: (send time, latency).
    samples: Vec<(u64, u64)>,
}

impl Device {
    pub(super) fn new(shared: Arc<Deliveries>, index: u64, latency: bool) -> Self {
        Device {
            shared,
            index,
            warm: 0,
            next: 0,
            new: 0,
            latency,
            samples: Vec::new(),
        }
    }
}

impl OnPublish for Device {
    fn publish(&mut self, _qos: u8, _dup: bool, _topic: &[u8], payload: &[u8], now: u64) {
        let Some((ts, seq)) = client::stamp(payload) else {
            self.shared.bad_payload.fetch_add(1, Relaxed);
            return;
        };
        if seq & WARMUP != 0 {
            if (seq & !WARMUP) % self.shared.devices != self.index {
                self.shared.misrouted.fetch_add(1, Relaxed);
            } else {
                self.warm += 1;
            }
            return;
        }
        if seq % self.shared.devices != self.index {
            self.shared.misrouted.fetch_add(1, Relaxed);
            return;
        }
        let idx = seq / self.shared.devices;
        let floor = self.shared.round_floor.load(Relaxed);
        if idx >= floor && self.next < floor {
            self.next = floor;
        }
        if idx < self.next {
            self.shared.dups.fetch_add(1, Relaxed);
            return;
        }
        if idx > self.next {
            self.shared.gaps.fetch_add(idx - self.next, Relaxed);
        }
        self.next = idx + 1;
        self.new += 1;
        if let Some(t) = &self.shared.track {
            t.arrived(seq, now);
        }
        if self.latency {
            self.samples.push((ts, now.saturating_sub(ts)));
        }
    }

    fn batch_end(&mut self, now: u64) {
        if self.warm > 0 {
            self.shared.warm.fetch_add(self.warm, Relaxed);
            self.warm = 0;
            self.shared.notify.notify_one();
        }
        if !self.samples.is_empty() {
            let mut h = self.shared.hist.lock().unwrap();
            for &(_, s) in &self.samples {
                h.saturating_record(s);
            }
            drop(h);
            if self.shared.phased.load(Relaxed) {
                for &(ts, s) in &self.samples {
                    let p = self.shared.phase(ts);
                    self.shared.phase_hists[p]
                        .lock()
                        .unwrap()
                        .saturating_record(s);
                }
            }
            self.samples.clear();
        }
        if self.new > 0 {
            if let Some(c) = self.shared.per_device.get(self.index as usize) {
                c.fetch_add(self.new, Relaxed);
            }
            self.shared.delivered.fetch_add(self.new, Relaxed);
            self.shared.last_ns.fetch_max(now, Relaxed);
            self.new = 0;
            self.shared.notify.notify_one();
        }
    }
}

pub(super) fn device_id(o: &Opts, i: usize) -> String {
    format!("{}{i}", o.id_prefix)
}

/// Connects every device id with a clean session and disconnects it: whatever a previous
/// run left in the broker is gone. Not with `--no-wipe` (a fresh broker).
pub(super) async fn wipe_sessions(o: &Opts, target: &Target, n: usize) -> Result<(), String> {
    if o.no_wipe {
        return Ok(());
    }
    let fleet = Arc::new(Fleet::default());
    let sem = Arc::new(Semaphore::new(o.concurrency));
    let tracker = TaskTracker::new();
    for i in 0..n {
        let (o, target, fleet, sem) = (o.clone(), target.clone(), fleet.clone(), sem.clone());
        tracker.spawn(async move {
            let _permit = sem.acquire().await;
            let id = device_id(&o, i);
            let hello = Hello {
                client_id: &id,
                clean: true,
                keep_alive: o.keepalive,
                subscribe: None,
                login: o.login(),
            };
            if let Some(c) = open_retry(&o, &target, i, &hello, &mut Ignore, 256, &fleet).await {
                c.disconnect(Duration::from_secs(2)).await;
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    match fleet.failed.load(Relaxed) {
        0 => Ok(()),
        f => Err(format!(
            "session cleanup: {f} connections failed: {:?}",
            fleet.errors.lock().unwrap()
        )),
    }
}

/// Starts `n` device tasks (persistent sessions). `subscribe`: SUBSCRIBE push/<id> at QoS 1
/// in the handshake. `expect_session`: count CONNACKs without session present.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_devices(
    o: &Opts,
    target: &Target,
    n: usize,
    subscribe: bool,
    expect_session: bool,
    deliveries: &Arc<Deliveries>,
    latency: bool,
    fleet: &Arc<Fleet>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) {
    let sem = Arc::new(Semaphore::new(o.concurrency));
    for i in 0..n {
        let (o, target, fleet, sem, stop, d) = (
            o.clone(),
            target.clone(),
            fleet.clone(),
            sem.clone(),
            stop.clone(),
            deliveries.clone(),
        );
        tracker.spawn(async move {
            let id = device_id(&o, i);
            let topic = format!("push/{id}");
            let hello = Hello {
                client_id: &id,
                clean: false,
                keep_alive: o.keepalive,
                subscribe: subscribe.then_some((topic.as_str(), 1)),
                login: o.login(),
            };
            let mut dev = Device::new(d, i as u64, latency);
            let c = {
                let _permit = sem.acquire().await;
                open_retry(&o, &target, i, &hello, &mut dev, 16 * 1024, &fleet).await
            };
            let Some(c) = c else { return };
            if expect_session && !c.session_present() {
                fleet.not_present.fetch_add(1, Relaxed);
            }
            serve(c, &mut dev, o.keepalive, &stop, &fleet).await;
        });
    }
}

/// Makes every device's persistent session (clean session = false, SUBSCRIBE push/<id> at
/// QoS 1) and leaves it offline (DISCONNECT), at most `--concurrency` handshakes in flight.
/// The returned fleet holds what failed.
pub(super) async fn park_sessions(o: &Opts, target: &Target, n: usize) -> Arc<Fleet> {
    let fleet = Arc::new(Fleet::default());
    let sem = Arc::new(Semaphore::new(o.concurrency));
    let tracker = TaskTracker::new();
    for i in 0..n {
        let (o, target, fleet, sem) = (o.clone(), target.clone(), fleet.clone(), sem.clone());
        tracker.spawn(async move {
            let _permit = sem.acquire().await;
            let id = device_id(&o, i);
            let topic = format!("push/{id}");
            let hello = Hello {
                client_id: &id,
                clean: false,
                keep_alive: o.keepalive,
                subscribe: Some((&topic, 1)),
                login: o.login(),
            };
            if let Some(c) = open_retry(&o, &target, i, &hello, &mut Ignore, 256, &fleet).await {
                c.disconnect(Duration::from_secs(2)).await;
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    fleet
}

/// Devices online: their tasks (`spawn_devices`: subscribed, reading and acknowledging),
/// what to stop them with and what to wait on.
pub(super) struct Online {
    pub(super) fleet: Arc<Fleet>,
    pub(super) stop: CancellationToken,
    pub(super) tracker: TaskTracker,
}

/// Connects `n` devices (persistent sessions, SUBSCRIBE push/<id> at QoS 1, at most
/// `--concurrency` handshakes in flight) and waits until every handshake has finished, for
/// at most `--timeout` plus 5 ms per device. `Err`: not all of them connected (the devices
/// that did are online all the same: stop them with `Online::stop`).
pub(super) async fn devices_online(
    o: &Opts,
    target: &Target,
    n: usize,
    deliveries: &Arc<Deliveries>,
    latency: bool,
) -> (Online, Result<(), String>) {
    let online = Online {
        fleet: Arc::new(Fleet::default()),
        stop: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    spawn_devices(
        o,
        target,
        n,
        true,
        false,
        deliveries,
        latency,
        &online.fleet,
        &online.stop,
        &online.tracker,
    );
    online.tracker.close();
    let budget = Duration::from_secs_f64(o.timeout + n as f64 / 200.0);
    online.fleet.wait_handshakes(n as u64, budget).await;
    let connected = online.fleet.connected.load(Relaxed);
    let res = if connected < n as u64 {
        Err(format!("only {connected} of {n} devices connected"))
    } else {
        Ok(())
    };
    (online, res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> Vec<u8> {
        let mut b = bytes::BytesMut::new();
        client::put_stamped(&mut b, 1, seq, 16);
        b.to_vec()
    }

    #[test]
    fn a_new_phase_jumps_to_its_round_without_a_gap() {
        let d = Arc::new(Deliveries::new(2));
        let mut dev = Device::new(d.clone(), 1, false);
        for seq in [1, 3, 5] {
            dev.publish(1, false, b"", &msg(seq), 10);
        }
        dev.batch_end(10);
        assert_eq!(d.delivered.load(Relaxed), 3);
        d.next_phase(10);
        for seq in [21, 23] {
            dev.publish(1, false, b"", &msg(seq), 20);
        }
        dev.publish(1, false, b"", &msg(5), 20); // a late one of the last phase
        dev.batch_end(20);
        assert_eq!(d.delivered.load(Relaxed), 2);
        assert_eq!(d.per_device[1].load(Relaxed), 2);
        assert_eq!(d.gaps.load(Relaxed), 0);
        assert_eq!(d.dups.load(Relaxed), 1);
        // Within a phase a skipped message is still a gap.
        dev.publish(1, false, b"", &msg(27), 30);
        assert_eq!(d.gaps.load(Relaxed), 1);
    }
}
