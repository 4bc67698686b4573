//! Prometheus metrics.
//!
//! One process-wide recorder (metrics-exporter-prometheus) holds the counters and gauges; it
//! is installed only when the metrics listener is on (`init`), so a node without one counts
//! into nothing. The counters on hot paths are registered once and kept as handles, so
//! counting a message is an atomic add rather than a registry lookup. Histograms are
//! Herald's own (`histogram`), and `/metrics` is rendered in a stable order with the process
//! metrics merged in (`exposition`, `process`). Every name and its help text is in
//! `DESCRIPTIONS`.

mod descriptions;
mod exposition;
mod histogram;
mod process;

use descriptions::DESCRIPTIONS;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use exposition::Extra;
use histogram::{Histogram, DELIVERY_US, OPERATION_US};

/// Whether the metrics listener is on: histograms (and the clock reads they need) are
/// skipped when it is not.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether the metrics listener is on (samples nobody can read are not taken).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

struct Handles {
    prometheus: Option<PrometheusHandle>,
    delivery: [[Histogram; 2]; 2],
    store_ops: [Histogram; 3],
    connect: Histogram,
    connacks: [Counter; 6],
    bytes_received: Counter,
    bytes_sent: Counter,
    redelivered: Counter,
    sessions: [Gauge; 2],
    outbox_messages: Gauge,
    outbox_oldest: Gauge,
    store_up: Gauge,
    store_ping: Gauge,
    ready: Gauge,
    draining: Gauge,
    peers: Gauge,
    links_up: Gauge,
    mailbox_bytes: Gauge,
    connections_active: Gauge,
    connections_total: Counter,
    rejected_max_connections: Counter,
    connect_timeouts: Counter,
    handshake_failures: Counter,
    rejected_memory: Counter,
    rejected_descriptors: Counter,
    memory_guard_level: Gauge,
    stalls: Counter,
    malformed: Counter,
    received: [Counter; 3],
    sent: [Counter; 3],
    acked: Counter,
    stored: Counter,
    drops: [Counter; 9],
    store_errors: Counter,
    takeovers: Counter,
    limits: [Counter; LIMITS.len()],
    wills: Counter,
    broadcasts: Counter,
    /// Devices a broadcast was handed to, and skipped (mailbox full).
    broadcast_devices: [Counter; 2],
    forwards: [Counter; 3],
    forwards_received: [Counter; 3],
    forward_failures: Counter,
    stale_routes: Counter,
    sweep_wakeups: Counter,
    remote_kicks: Counter,
    auth_failures: [Counter; AUTH_FAILURES.len()],
    acl_denied: [Counter; 2],
    log_suppressed: [Counter; crate::lograte::REASONS.len()],
}

/// What crosses the node-to-node link; each is its own `kind` label.
#[derive(Debug, Clone, Copy)]
pub enum Forward {
    /// A stored push (or a QoS 0 one) for a device on the peer.
    Push = 0,
    /// An ordinary-topic publish for the peer's subscribers.
    Publish = 1,
    /// "Close your connection of this client."
    Kick = 2,
}

const FORWARD_KINDS: [&str; 3] = ["push", "publish", "kick"];

/// Why a message was dropped; each is its own `reason` label.
#[derive(Debug, Clone, Copy)]
pub enum Drop {
    /// A QoS 0 message found the receiver's mailbox full (slow reader).
    MailboxFull = 0,
    OutboxFullOldest = 1,
    OutboxFullNew = 2,
    Expired = 3,
    /// No subscriber matched.
    NoReceiver = 4,
    /// The memory store holds `store.max_messages` already.
    StoreFull = 5,
    /// The receiver's ACL no longer lets it read the topic (a reloaded `deny`).
    AclDenied = 6,
    /// Emptied by the backend (`DELETE /v1/clients/{id}/outbox`).
    Deleted = 7,
    /// Replaced by a newer push with the same collapse key before it was sent.
    Collapsed = 8,
}

const DROP_REASONS: [&str; 9] = [
    "mailbox_full",
    "outbox_full_oldest",
    "outbox_full_new",
    "expired",
    "no_receiver",
    "store_full",
    "acl_denied",
    "deleted",
    "collapsed",
];

/// Why a login was refused; each is its own `reason` label of `herald_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// A password-file user with the wrong password.
    BadPassword = 0,
    /// A username that is not in the password file (and no token key to try).
    UnknownUser = 1,
    /// A token with a bad signature, a malformed one, or `alg: none`.
    BadToken = 2,
    /// A valid token past its `exp`.
    ExpiredToken = 3,
    /// The proven identity (token `sub`, certificate) is not the client id asked for, or a
    /// user asked for a client id its ACL does not give it.
    ClientId = 4,
    /// No credentials, and anonymous clients are refused.
    Anonymous = 5,
    /// Too many failures from this address: closed before any password work.
    Blocked = 6,
    /// A will to a topic the client may not publish to.
    Will = 7,
    /// A connection to the cluster port without the cluster secret.
    ClusterSecret = 8,
    /// A client id in Herald's internal `$herald/` space on a client listener.
    Reserved = 9,
}

const AUTH_FAILURES: [&str; 10] = [
    "bad_password",
    "unknown_user",
    "bad_token",
    "expired_token",
    "client_id",
    "anonymous",
    "blocked",
    "will",
    "cluster_secret",
    "reserved",
];

impl AuthFailure {
    /// The `reason` label, also used in log lines.
    pub fn label(self) -> &'static str {
        AUTH_FAILURES[self as usize]
    }
}

/// What an ACL refused.
#[derive(Debug, Clone, Copy)]
pub enum Denied {
    Publish = 0,
    Subscribe = 1,
}

fn handles() -> &'static Handles {
    static H: OnceLock<Handles> = OnceLock::new();
    H.get_or_init(|| {
        // Another recorder may already be installed (an embedding program's); then ours only
        // counts into that one and `render` has nothing of its own to show.
        let prometheus = enabled()
            .then(|| {
                let recorder = PrometheusBuilder::new().build_recorder();
                let handle = recorder.handle();
                metrics::set_global_recorder(recorder).ok().map(|_| handle)
            })
            .flatten();
        for (name, help) in DESCRIPTIONS {
            metrics::describe_counter!(*name, *help);
        }
        let qos = |name: &'static str| ["0", "1", "2"].map(|q| metrics::counter!(name, "qos" => q));
        let delivery = || [Histogram::new(DELIVERY_US), Histogram::new(DELIVERY_US)];
        Handles {
            prometheus,
            delivery: [delivery(), delivery()],
            store_ops: STORE_OPS.map(|_| Histogram::new(OPERATION_US)),
            connect: Histogram::new(OPERATION_US),
            connacks: ["0", "1", "2", "3", "4", "5"]
                .map(|c| metrics::counter!("herald_connack_total", "code" => c)),
            bytes_received: metrics::counter!("herald_bytes_received_total"),
            bytes_sent: metrics::counter!("herald_bytes_sent_total"),
            redelivered: metrics::counter!("herald_messages_redelivered_total"),
            sessions: ["online", "offline"]
                .map(|s| metrics::gauge!("herald_sessions", "state" => s)),
            outbox_messages: metrics::gauge!("herald_outbox_messages"),
            outbox_oldest: metrics::gauge!("herald_outbox_oldest_age_seconds"),
            store_up: metrics::gauge!("herald_store_up"),
            store_ping: metrics::gauge!("herald_store_ping_seconds"),
            ready: metrics::gauge!("herald_ready"),
            draining: metrics::gauge!("herald_draining"),
            peers: metrics::gauge!("herald_cluster_peers"),
            links_up: metrics::gauge!("herald_cluster_links_up"),
            mailbox_bytes: metrics::gauge!("herald_mailbox_bytes"),
            connections_active: metrics::gauge!("herald_connections_active"),
            connections_total: metrics::counter!("herald_connections_total"),
            rejected_max_connections: metrics::counter!(
                "herald_connections_rejected_total", "reason" => "max_connections"),
            connect_timeouts: metrics::counter!(
                "herald_connections_rejected_total", "reason" => "connect_timeout"),
            handshake_failures: metrics::counter!(
                "herald_connections_rejected_total", "reason" => "handshake"),
            rejected_memory: metrics::counter!(
                "herald_connections_rejected_total", "reason" => "memory"),
            rejected_descriptors: metrics::counter!(
                "herald_connections_rejected_total", "reason" => "descriptors"),
            memory_guard_level: metrics::gauge!("herald_memory_guard_level"),
            stalls: metrics::counter!("herald_stalls_total"),
            malformed: metrics::counter!("herald_malformed_packets_total"),
            received: qos("herald_messages_received_total"),
            sent: qos("herald_messages_sent_total"),
            acked: metrics::counter!("herald_messages_acked_total"),
            stored: metrics::counter!("herald_messages_stored_total"),
            drops: DROP_REASONS
                .map(|r| metrics::counter!("herald_messages_dropped_total", "reason" => r)),
            store_errors: metrics::counter!("herald_store_errors_total"),
            takeovers: metrics::counter!("herald_session_takeovers_total"),
            limits: LIMITS.map(|l| metrics::counter!("herald_limit_hits_total", "limit" => l)),
            wills: metrics::counter!("herald_wills_published_total"),
            broadcasts: metrics::counter!("herald_broadcasts_total"),
            broadcast_devices: ["handed", "skipped"]
                .map(|r| metrics::counter!("herald_broadcast_devices_total", "result" => r)),
            forwards: FORWARD_KINDS
                .map(|k| metrics::counter!("herald_cluster_forwards_total", "kind" => k)),
            forwards_received: FORWARD_KINDS
                .map(|k| metrics::counter!("herald_cluster_forwards_received_total", "kind" => k)),
            forward_failures: metrics::counter!("herald_cluster_forward_failures_total"),
            stale_routes: metrics::counter!("herald_cluster_stale_routes_total"),
            sweep_wakeups: metrics::counter!("herald_cluster_sweep_wakeups_total"),
            remote_kicks: metrics::counter!("herald_cluster_remote_kicks_total"),
            auth_failures: AUTH_FAILURES
                .map(|r| metrics::counter!("herald_auth_failures_total", "reason" => r)),
            acl_denied: ["publish", "subscribe"]
                .map(|a| metrics::counter!("herald_acl_denied_total", "action" => a)),
            log_suppressed: crate::lograte::REASONS.map(
                |r| metrics::counter!("herald_log_lines_suppressed_total", "reason" => r.label()),
            ),
        }
    })
}

/// Registers everything so that `/metrics` lists every series from the start. `enabled`:
/// the metrics listener is on (the first call decides, for the whole process).
pub fn init(enabled: bool) {
    if enabled {
        ENABLED.store(true, Ordering::Relaxed);
    }
    handles();
}

pub fn connection_opened() {
    let h = handles();
    h.connections_total.increment(1);
    h.connections_active.increment(1.0);
}

pub fn connection_closed() {
    handles().connections_active.decrement(1.0);
}

pub fn rejected_max_connections() {
    handles().rejected_max_connections.increment(1);
}

pub fn connect_timeout() {
    handles().connect_timeouts.increment(1);
}

/// A TLS or WebSocket handshake failed (bad certificate, wrong path, not TLS at all).
pub fn handshake_failed() {
    handles().handshake_failures.increment(1);
}

/// CONNACK 3 because the memory guard is at its refusing level.
pub fn rejected_memory() {
    handles().rejected_memory.increment(1);
}

/// A new connection closed at once because descriptors ran short.
pub fn rejected_descriptors() {
    handles().rejected_descriptors.increment(1);
}

/// 0 normal, 1 not reading publishers, 2 also refusing connections (`memguard`).
pub fn memory_guard_level(level: u8) {
    handles().memory_guard_level.set(f64::from(level));
}

/// The node's periodic task ran far too late (the process was paused or starved).
pub fn stall() {
    handles().stalls.increment(1);
}

pub fn malformed() {
    handles().malformed.increment(1);
}

pub fn received(qos: u8) {
    handles().received[qos.min(2) as usize].increment(1);
}

pub fn sent(qos: u8) {
    handles().sent[qos.min(2) as usize].increment(1);
}

pub fn acked() {
    handles().acked.increment(1);
}

pub fn stored() {
    handles().stored.increment(1);
}

pub fn dropped(reason: Drop) {
    handles().drops[reason as usize].increment(1);
}

/// `n` messages dropped at once for `reason` (an outbox emptied whole).
pub fn dropped_many(reason: Drop, n: u64) {
    handles().drops[reason as usize].increment(n);
}

/// A receipt's state changed (`receipts`).
pub fn receipt(state: &'static str) {
    metrics::counter!("herald_receipts_total", "state" => state).increment(1);
}

/// A POST of `n` receipts to the webhook, answered 2xx or not.
pub fn receipt_post(ok: bool, n: usize) {
    let result = if ok { "ok" } else { "failed" };
    metrics::counter!("herald_receipt_webhook_posts_total", "result" => result).increment(1);
    if ok {
        metrics::counter!("herald_receipt_webhook_receipts_total").increment(n as u64);
    }
}

/// An answer of the backend HTTP API (`http_api`), by endpoint and status code.
pub fn http_response(endpoint: &'static str, status: u16) {
    metrics::counter!("herald_http_responses_total", "endpoint" => endpoint, "status" => status.to_string())
        .increment(1);
}

pub fn store_error() {
    handles().store_errors.increment(1);
}

/// The `limit` labels of `herald_limit_hits_total`, registered at start.
const LIMITS: [&str; 12] = [
    "store_write_queue",
    "store_max_messages",
    "store_max_bytes",
    "session_max_queued_bytes",
    "session_max_mailbox_bytes",
    "server_max_write_buffer",
    "server_max_connect_size",
    "large_connects",
    "server_max_memory",
    "cluster_link_bytes",
    "session_max_subscriptions",
    "retained_waiting",
];

/// A configured or built-in bound was reached.
pub fn limit_hit(limit: &'static str) {
    match LIMITS.iter().position(|l| *l == limit) {
        Some(i) => handles().limits[i].increment(1),
        None => metrics::counter!("herald_limit_hits_total", "limit" => limit).increment(1),
    }
}

pub fn takeover() {
    handles().takeovers.increment(1);
}

pub fn will_published() {
    handles().wills.increment(1);
}

/// A broadcast started its fan-out on this node (asked by the HTTP API here or by a peer).
pub fn broadcast() {
    handles().broadcasts.increment(1);
}

/// A broadcast's fan-out on this node: `handed` devices got it in their mailbox, `skipped`
/// had a full one.
pub fn broadcast_devices(handed: u64, skipped: u64) {
    let h = handles();
    h.broadcast_devices[0].increment(handed);
    h.broadcast_devices[1].increment(skipped);
}

pub fn forwarded(kind: Forward) {
    handles().forwards[kind as usize].increment(1);
}

pub fn forward_received(kind: Forward) {
    handles().forwards_received[kind as usize].increment(1);
}

/// A forward could not be handed to its peer (link down, queue full, no answer).
pub fn forward_failed() {
    handles().forward_failures.increment(1);
}

/// A route naming a dead node or an old incarnation was ignored.
pub fn stale_route() {
    handles().stale_routes.increment(1);
}

/// The sweep found a connected client with outbox entries it had not been told about.
pub fn sweep_wakeup() {
    handles().sweep_wakeups.increment(1);
}

/// A connection closed because its client connected to another node.
pub fn remote_kick() {
    handles().remote_kicks.increment(1);
}

/// A refused login (or cluster link).
pub fn auth_failure(reason: AuthFailure) {
    handles().auth_failures[reason as usize].increment(1);
}

/// A PUBLISH dropped or a SUBSCRIBE filter refused by the ACL (or a reserved `$` topic).
pub fn acl_denied(action: Denied) {
    handles().acl_denied[action as usize].increment(1);
}

/// A log line of `reason` left out by the rate limit (`lograte`).
pub fn log_suppressed(reason: crate::lograte::Reason) {
    handles().log_suppressed[reason as usize].increment(1);
}

/// Where a delivered message came from: the `path` label of the delivery latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Published on this node, or read from the outbox.
    Local = 0,
    /// Handed over by another node on the node-to-node link (hop 2).
    Forwarded = 1,
}

/// A store operation timed by `herald_store_op_duration_seconds`.
#[derive(Debug, Clone, Copy)]
pub enum StoreOp {
    Enqueue = 0,
    Ack = 1,
    Attach = 2,
}

const STORE_OPS: [&str; 3] = ["enqueue", "ack", "attach"];

/// The start of something timed, or `None` when metrics are off (no clock read then).
pub fn clock() -> Option<Instant> {
    enabled().then(Instant::now)
}

/// `clock` for one call in `SAMPLED` per thread: for operations of about a microsecond
/// (the memory store's), where two clock reads each would cost more than the operation.
pub fn sampled_clock() -> Option<Instant> {
    const SAMPLED: u32 = 64;
    thread_local! {
        static CALLS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    if !enabled() {
        return None;
    }
    let n = CALLS.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    n.is_multiple_of(SAMPLED).then(Instant::now)
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros().min(u128::from(u64::MAX)) as u64
}

/// A message reached its device: `born_us` is its `Message::born_us` (0: unknown, an
/// envelope from before it was recorded, not counted).
pub fn delivered(path: Path, replay: bool, born_us: u64, now: &mut crate::message::Now) {
    if !enabled() || born_us == 0 {
        return;
    }
    let us = now.us().saturating_sub(born_us);
    handles().delivery[path as usize][usize::from(replay)].record_us(us);
}

pub fn store_op(op: StoreOp, started: Option<Instant>) {
    if let Some(t) = started {
        store_op_until(op, t, Instant::now());
    }
}

/// `store_op` for a batch that ended at `end` (one clock read for all of it).
pub fn store_op_until(op: StoreOp, started: Instant, end: Instant) {
    let us = end.saturating_duration_since(started).as_micros();
    handles().store_ops[op as usize].record_us(us.min(u128::from(u64::MAX)) as u64);
}

/// A CONNECT was answered (any return code).
pub fn connect_answered(code: u8, started: Option<Instant>) {
    let h = handles();
    h.connacks[usize::from(code.min(5))].increment(1);
    if let Some(t) = started {
        h.connect.record_us(micros(t));
    }
}

/// Bytes read from a client connection's socket.
pub fn bytes_received(n: usize) {
    handles().bytes_received.increment(n as u64);
}

/// Bytes written to a client connection's socket.
pub fn bytes_sent(n: usize) {
    handles().bytes_sent.increment(n as u64);
}

/// A PUBLISH resent with DUP=1 (after a reconnect, or a crash).
pub fn redelivered() {
    handles().redelivered.increment(1);
}

/// The node's state, set by its periodic sample (`server`); `None` leaves a gauge as it
/// was (e.g. the Redis store's outbox figures between two samples).
#[derive(Debug, Default, Clone, Copy)]
pub struct Sample {
    pub online: Option<usize>,
    pub offline: Option<usize>,
    pub outbox_messages: Option<u64>,
    pub outbox_oldest_secs: Option<f64>,
    pub mailbox_bytes: Option<usize>,
    pub store_up: Option<bool>,
    pub store_ping_secs: Option<f64>,
    pub peers: Option<usize>,
    pub links_up: Option<usize>,
}

pub fn record_sample(s: &Sample) {
    let h = handles();
    let set = |g: &Gauge, v: Option<f64>| {
        if let Some(v) = v {
            g.set(v);
        }
    };
    set(&h.sessions[0], s.online.map(|v| v as f64));
    set(&h.sessions[1], s.offline.map(|v| v as f64));
    set(&h.outbox_messages, s.outbox_messages.map(|v| v as f64));
    set(&h.outbox_oldest, s.outbox_oldest_secs);
    set(&h.mailbox_bytes, s.mailbox_bytes.map(|v| v as f64));
    set(&h.store_up, s.store_up.map(|u| f64::from(u8::from(u))));
    set(&h.store_ping, s.store_ping_secs);
    set(&h.peers, s.peers.map(|v| v as f64));
    set(&h.links_up, s.links_up.map(|v| v as f64));
}

/// What `/readyz` answers, and whether the node is draining.
pub fn readiness(ready: bool, draining: bool) {
    let h = handles();
    h.ready.set(f64::from(u8::from(ready)));
    h.draining.set(f64::from(u8::from(draining)));
}

/// The Prometheus text exposition of every metric, in a stable order.
pub fn render() -> String {
    let h = handles();
    let Some(prometheus) = &h.prometheus else {
        return String::new();
    };
    let mut extras = process::families();
    let mut delivery = String::new();
    for (p, path) in ["local", "forwarded"].iter().enumerate() {
        for (r, replay) in ["false", "true"].iter().enumerate() {
            let labels = format!("path=\"{path}\",replay=\"{replay}\"");
            h.delivery[p][r].render(&mut delivery, "herald_delivery_latency_seconds", &labels);
        }
    }
    let mut ops = String::new();
    for (i, op) in STORE_OPS.iter().enumerate() {
        let labels = format!("op=\"{op}\"");
        h.store_ops[i].render(&mut ops, "herald_store_op_duration_seconds", &labels);
    }
    let mut connect = String::new();
    h.connect
        .render(&mut connect, "herald_connect_duration_seconds", "");
    let build = format!(
        "herald_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        env!("HERALD_COMMIT")
    );
    extras.extend([
        Extra {
            name: "herald_delivery_latency_seconds",
            help: "Time from a message being taken for storing (QoS 1/2) or received (QoS 0) to the device's PUBACK (QoS 2: PUBREC; QoS 0: the write). path: forwarded if it crossed the node-to-node link; replay: delivered on a later connection than the one it was stored for.",
            kind: "histogram",
            samples: delivery,
        },
        Extra {
            name: "herald_store_op_duration_seconds",
            help: "Duration of store operations, including any wait in the store's write queue.",
            kind: "histogram",
            samples: ops,
        },
        Extra {
            name: "herald_connect_duration_seconds",
            help: "Time from a CONNECT packet to its CONNACK (authentication, session attach, route claim).",
            kind: "histogram",
            samples: connect,
        },
        Extra {
            name: "herald_build_info",
            help: "Herald's version and the commit it was built from; always 1.",
            kind: "gauge",
            samples: build,
        },
    ]);
    exposition::render(&prometheus.render(), extras)
}
