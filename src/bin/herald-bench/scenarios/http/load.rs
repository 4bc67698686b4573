//! The HTTP side of `http`: lanes, each a keep-alive HTTP/1.1 connection (hyper's client)
//! with one request in flight, pushing to its own share of the devices.
//!
//! A device belongs to one lane (device % lanes), and a lane sends its next request only
//! after the answer to the last, so a device's messages are stored in the order they were
//! numbered and the devices can check it, exactly as with the single MQTT publisher.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use hyper::Method;
use serde::Deserialize;
use tokio::time::Instant;

use crate::client::{now_ns, put_stamped};

use super::super::devices::Deliveries;
use super::api::{Api, Conn};

/// Accepted but not yet delivered per device, at most, when the plan bounds the lag: half of
/// Herald's default outbox cap (`session.max_queued_messages`, 1,000), so that nothing is
/// dropped for overflow even with a batch's worth more in flight.
const DEVICE_LAG: u64 = 500;

#[derive(Clone, Copy)]
pub(super) enum Kind {
    /// `POST /v1/push/{id}?qos=1` plus this (e.g. `&receipt=true`).
    One { query: &'static str },
    /// `POST /v1/push` with this many messages.
    Batch { size: usize },
}

pub(super) struct Plan {
    pub(super) kind: Kind,
    pub(super) lanes: usize,
    pub(super) devices: usize,
    /// The phase's first round (sequence number / devices).
    pub(super) floor: u64,
    pub(super) duration: Duration,
    /// Requests per second over all lanes; None: as fast as the answers come.
    pub(super) rate: Option<f64>,
    /// Accepted but not yet delivered, at most (and `DEVICE_LAG` per device).
    pub(super) max_lag: Option<u64>,
    pub(super) payload: usize,
}

/// What the lanes sent, shared while they run.
#[derive(Default)]
pub(super) struct Sent {
    pub(super) requests: AtomicU64,
    /// Messages answered 202: each must reach its device.
    pub(super) accepted: AtomicU64,
    /// The highest round any lane used.
    pub(super) last_round: AtomicU64,
    /// How late the latest request was against the fixed rate, ns.
    pub(super) max_late_ns: AtomicU64,
    pub(super) errors: Mutex<Vec<String>>,
}

impl Sent {
    fn error(&self, e: String) {
        let mut errs = self.errors.lock().unwrap();
        if errs.len() < 5 {
            errs.push(e);
        }
    }
}

/// Runs the lanes of `plan` (connected first, so connecting is not in the figures) until
/// its duration is over. Returns what they sent and when they started.
pub(super) async fn run(
    api: &Arc<Api>,
    plan: Plan,
    ids: &Arc<Vec<String>>,
    d: &Arc<Deliveries>,
) -> (Arc<Sent>, u64) {
    let sent = Arc::new(Sent::default());
    sent.last_round.store(plan.floor, Relaxed);
    let lanes = plan.lanes.clamp(1, plan.devices.max(1));
    let mut conns = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        match api.connect().await {
            Ok(c) => conns.push(c),
            Err(e) => {
                sent.error(e);
                return (sent, now_ns());
            }
        }
    }
    let plan = Arc::new(Plan { lanes, ..plan });
    let start = Instant::now();
    let start_ns = now_ns();
    let mut tasks = Vec::with_capacity(lanes);
    for (j, conn) in conns.into_iter().enumerate() {
        let lane = Lane {
            j,
            api: api.clone(),
            plan: plan.clone(),
            ids: ids.clone(),
            d: d.clone(),
            sent: sent.clone(),
            conn,
            start,
        };
        tasks.push(tokio::spawn(lane.run()));
    }
    for t in tasks {
        if let Err(e) = t.await {
            sent.error(format!("HTTP lane: {e}"));
        }
    }
    (sent, start_ns)
}

struct Lane {
    j: usize,
    api: Arc<Api>,
    plan: Arc<Plan>,
    ids: Arc<Vec<String>>,
    d: Arc<Deliveries>,
    sent: Arc<Sent>,
    conn: Conn,
    start: Instant,
}

/// A lane's devices, taken in turn, and what each was sent (accepted) in this phase.
struct Cycle {
    mine: Vec<usize>,
    accepted: Vec<u64>,
    cursor: usize,
    round: u64,
    devices: u64,
}

impl Cycle {
    /// The next message: (position in `mine`, device, sequence number).
    fn next(&mut self) -> (usize, usize, u64) {
        let pos = self.cursor;
        let dev = self.mine[pos];
        let seq = self.round * self.devices + dev as u64;
        self.cursor += 1;
        if self.cursor == self.mine.len() {
            self.cursor = 0;
            self.round += 1;
        }
        (pos, dev, seq)
    }

    /// Whether some device of the lane has more than `DEVICE_LAG` accepted and not yet
    /// delivered.
    fn behind(&self, d: &Deliveries) -> bool {
        self.mine.iter().zip(&self.accepted).any(|(&dev, &a)| {
            let got = d.per_device.get(dev).map_or(a, |c| c.load(Relaxed));
            a.saturating_sub(got) > DEVICE_LAG
        })
    }
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

#[derive(Deserialize)]
struct BatchResult {
    status: u16,
}

impl Lane {
    async fn run(mut self) {
        let p = self.plan.clone();
        let mine: Vec<usize> = (self.j..p.devices).step_by(p.lanes).collect();
        if mine.is_empty() {
            return;
        }
        let mut cycle = Cycle {
            accepted: vec![0; mine.len()],
            mine,
            cursor: 0,
            round: p.floor,
            devices: p.devices as u64,
        };
        let mut k: u64 = 0;
        let mut buf = BytesMut::new();
        let mut batch = Vec::new();
        while self.pace(k, &cycle).await {
            k += 1;
            let done = match p.kind {
                Kind::One { query } => {
                    let (pos, dev, seq) = cycle.next();
                    put_stamped(&mut buf, now_ns(), seq, p.payload);
                    let path = format!("/v1/push/{}?qos=1{query}", self.ids[dev]);
                    let ok = self.one(&path, buf.split().freeze(), seq).await;
                    cycle.accepted[pos] += u64::from(ok);
                    ok
                }
                Kind::Batch { size } => {
                    let mut body = String::from("{\"messages\":[");
                    batch.clear();
                    for i in 0..size {
                        let (pos, dev, seq) = cycle.next();
                        batch.push(pos);
                        put_stamped(&mut buf, now_ns(), seq, p.payload);
                        let b64 = base64::engine::general_purpose::STANDARD.encode(&buf);
                        buf.clear();
                        if i > 0 {
                            body.push(',');
                        }
                        // Device ids are made of the id prefix and digits: quote through
                        // serde_json all the same, as a backend would.
                        let id = serde_json::to_string(&self.ids[dev]).unwrap_or_default();
                        body.push_str(&format!(
                            "{{\"client_id\":{id},\"payload\":\"{b64}\",\
                             \"payload_encoding\":\"base64\",\"qos\":1}}"
                        ));
                    }
                    body.push_str("]}");
                    let ok = self.batch(Bytes::from(body), size).await;
                    if ok {
                        for &pos in &batch {
                            cycle.accepted[pos] += 1;
                        }
                    }
                    ok
                }
            };
            if !done {
                break;
            }
        }
        self.sent.last_round.fetch_max(cycle.round, Relaxed);
    }

    /// Waits for the `k`-th request's turn: its time at a fixed rate, and room under the
    /// lag bounds. False when the phase is over.
    async fn pace(&self, k: u64, cycle: &Cycle) -> bool {
        let p = &self.plan;
        if let Some(rate) = p.rate {
            let due = self.start
                + Duration::from_secs_f64((k * p.lanes as u64 + self.j as u64) as f64 / rate);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep_until(due).await;
            } else {
                let late = (now - due).as_nanos() as u64;
                self.sent.max_late_ns.fetch_max(late, Relaxed);
            }
        }
        if let Some(lag) = p.max_lag {
            // Several lanes wait here at once, and `Deliveries::notify` wakes only one
            // waiter: poll instead (a millisecond is the timer's grain anyway).
            loop {
                let accepted = self.sent.accepted.load(Relaxed);
                let behind = accepted.saturating_sub(self.d.delivered.load(Relaxed));
                if behind <= lag && !cycle.behind(&self.d) {
                    break;
                }
                if self.start.elapsed() >= p.duration {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        self.start.elapsed() < p.duration
    }

    async fn one(&mut self, path: &str, body: Bytes, seq: u64) -> bool {
        self.sent.requests.fetch_add(1, Relaxed);
        match self
            .api
            .call(&mut self.conn, Method::POST, path, false, body)
            .await
        {
            Ok((202, _, at)) => {
                self.sent.accepted.fetch_add(1, Relaxed);
                if let Some(t) = &self.d.track {
                    t.acked(seq, at);
                }
                true
            }
            Ok((status, body, _)) => {
                self.sent.error(format!(
                    "POST {path}: {status} {}",
                    String::from_utf8_lossy(&body)
                ));
                false
            }
            Err(e) => {
                self.sent.error(e);
                false
            }
        }
    }

    /// A batch: every entry must come back 202 (a lane stops at the first that does not,
    /// since its devices would then see a gap).
    async fn batch(&mut self, body: Bytes, size: usize) -> bool {
        self.sent.requests.fetch_add(1, Relaxed);
        let answer = self
            .api
            .call(&mut self.conn, Method::POST, "/v1/push", true, body)
            .await;
        let (status, body) = match answer {
            Ok((status, body, _)) => (status, body),
            Err(e) => {
                self.sent.error(e);
                return false;
            }
        };
        let parsed = (status == 200)
            .then(|| serde_json::from_slice::<BatchAnswer>(&body).ok())
            .flatten();
        let Some(a) = parsed else {
            self.sent.error(format!(
                "POST /v1/push: {status} {}",
                String::from_utf8_lossy(&body)
            ));
            return false;
        };
        let ok = a.results.iter().filter(|r| r.status == 202).count();
        self.sent.accepted.fetch_add(ok as u64, Relaxed);
        if ok != size || a.results.len() != size {
            self.sent.error(format!(
                "POST /v1/push: {ok} of {size} messages accepted ({} results)",
                a.results.len()
            ));
            return false;
        }
        true
    }
}
