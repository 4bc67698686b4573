//! The outbox's two writer tasks, each with its own hot connection:
//! - `ordered_loop`: enqueues and retained writes, in submission order, in pipelines (one
//!   enqueue script call per run of enqueues, not per message: Redis spends less per
//!   message). The publisher's PUBACK waits for its enqueue's reply. It keeps `Memo`, what
//!   the enqueue script needs to skip work per client (`scripts::ENQUEUE`).
//! - `write_loop`: acks and sent watermarks, in pipelines. Losing an ack only means a
//!   duplicate later, never a lost message. A watermark is written ahead: `mark_sent`
//!   queues it with a barrier and the connection writes the PUBLISH once the barrier
//!   answers, so a resend after a crash carries DUP = 1. Entries stored while the client
//!   was connected (`live`) need none: after a crash every such entry is resent with DUP.

use std::hash::BuildHasher;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

use super::notes::{self, Notes};
use crate::message::{Message, Qos};
use crate::metrics;
use crate::outbox::{RouteHint, StoreError};
use crate::receipts::Event;
use crate::redis::keys::{self, Client};
use crate::redis::resp::{self, Replies, Reply};
use crate::redis::{slots, Health, Hot, Part};

/// The answer to an ordered write: for an enqueue (sequence number or 0, dropped entries).
pub(super) type OrderedReply = oneshot::Sender<Result<Applied, StoreError>>;

/// What Redis answered for one ordered write.
#[derive(Debug, Default, Clone)]
pub(super) struct Applied {
    /// The enqueue's sequence number (0: rejected), and entries dropped for room.
    pub(super) seq: u64,
    pub(super) dropped: u64,
    /// The client's route after the store (cluster only).
    pub(super) route: Option<RouteHint>,
    /// Stored while a connection of the client was live (see `scripts::ENQUEUE`).
    pub(super) live: bool,
}

/// A write whose order matters (enqueue, retained): submitted synchronously, so the order of
/// calls is the order Redis applies them in, whatever order their futures are polled in.
/// Encoded by the writer task, straight into its pipeline buffer.
pub(super) enum Ordered {
    Enqueue {
        client: Arc<str>,
        qos: Qos,
        msg: Arc<Message>,
        /// A connection of the client is registered on this node.
        live: bool,
        reply: OrderedReply,
    },
    /// HSET of the retained message of `topic`, or HDEL without an envelope.
    Retained {
        topic: Arc<str>,
        envelope: Option<Vec<u8>>,
        reply: OrderedReply,
    },
}

impl Ordered {
    pub(super) fn reply(self) -> OrderedReply {
        match self {
            Ordered::Enqueue { reply, .. } | Ordered::Retained { reply, .. } => reply,
        }
    }
}

/// What every enqueue passes to the script besides the message.
pub(super) struct EnqueueArgs {
    pub(super) sha: String,
    pub(super) cap: u64,
    pub(super) byte_cap: u64,
    pub(super) drop_new: bool,
    /// `session.message_ttl`, 0 for none.
    pub(super) ttl_ms: u64,
    /// Read each receiver's route with its enqueue (a cluster node).
    pub(super) routes: bool,
    /// The largest envelope a message can have (from `server.max_packet_size`).
    pub(super) max_envelope: u64,
}

impl EnqueueArgs {
    /// How often one node refreshes a client's outbox TTL at most: an eighth of the TTL,
    /// within 1 s ..= 1 h.
    fn refresh_every_ms(&self) -> u64 {
        (self.ttl_ms / 8).clamp(1_000, 3_600_000)
    }

    /// The key TTL: a message stored just after a refresh still lives its full TTL, and an
    /// outbox nobody reads is still there for the store's next background pass
    /// (`sample`, every 30 s), which counts and reports its expired messages.
    fn key_ttl_ms(&self) -> u64 {
        if self.ttl_ms == 0 {
            0
        } else {
            self.ttl_ms
                + self.refresh_every_ms()
                + 2 * super::sample::SAMPLE_EVERY.as_millis() as u64
        }
    }
}

/// Slots in `Memo`: 2.6 MB per node.
const MEMO_SLOTS: usize = 1 << 16;

/// What the writer remembers per client for the enqueue script (`scripts::ENQUEUE`): the
/// seq from which its outbox must be measured again, and when this node last refreshed its
/// TTL. Direct-mapped, so it never grows; a client that is not in it (never seen, or its
/// slot taken by another) is measured and refreshed, which is always correct, only dearer.
/// A `check` stays valid for whichever node stores next: it bounds what any node can have
/// added since. Slots are found by a keyed hash, so that no client id can be made to collide
/// with another's on purpose and borrow its `check`.
///
/// The byte bound counts every message added since the measurement at the largest
/// envelope, except the ones this writer added itself, whose sizes it knows: with 100-byte
/// pushes against a 1 MB `max_packet_size` the outbox was measured every 15 messages, now
/// every `max_queued_messages` minus what it held (BENCHMARKS.md, issue 14).
struct Memo {
    hasher: std::collections::hash_map::RandomState,
    slots: Vec<Slot>,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// 0: empty.
    hash: u64,
    refreshed_ms: u64,
    /// The seq of the last measurement (0: none), and the count bound it gave.
    base: u64,
    count_check: u64,
    /// Bytes left under the cap at `base`, less what this writer added since, in `own`
    /// messages.
    bytes_left: u64,
    own: u64,
}

impl Slot {
    /// The seq from which the outbox may be over a cap (0: measure now), what `plan` passes:
    /// every message after `base` that is not this writer's counts at the largest envelope.
    fn bound(&self, max_envelope: u64) -> u64 {
        if self.base == 0 {
            return 0;
        }
        let bytes = self.base + self.own + self.bytes_left / max_envelope.max(1) + 1;
        self.count_check.min(bytes)
    }
}

/// What the script answered for one stored message, for `remember`.
#[derive(Clone, Copy)]
struct Stored {
    seq: u64,
    /// The count bound and the bytes left, if it measured (`count_check` 0: it did not).
    count_check: u64,
    bytes_left: u64,
    /// The envelope's size.
    size: u64,
}

impl Memo {
    fn new() -> Memo {
        Memo {
            hasher: Default::default(),
            slots: vec![Slot::default(); MEMO_SLOTS],
        }
    }

    fn hash(&self, client: &str) -> u64 {
        self.hasher.hash_one(client) | 1
    }

    fn get(&self, hash: u64) -> Slot {
        let s = self.slots[hash as usize % MEMO_SLOTS];
        if s.hash == hash {
            s
        } else {
            Slot::default()
        }
    }

    fn put(&mut self, slot: Slot) {
        self.slots[slot.hash as usize % MEMO_SLOTS] = slot;
    }
}

/// The `check` and flags the script gets for one message (see `scripts::ENQUEUE`).
fn plan(memo: &Memo, args: &EnqueueArgs, client: &str, live: bool, now_ms: u64) -> (u64, u8) {
    let slot = memo.get(memo.hash(client));
    let stale =
        slot.hash == 0 || now_ms.saturating_sub(slot.refreshed_ms) >= args.refresh_every_ms();
    let flags = (stale && args.ttl_ms != 0) as u8 | (live as u8) << 1;
    (slot.bound(args.max_envelope), flags)
}

/// Ordered writes waiting for the next pipeline; beyond this, publishes are refused (counted).
pub(super) const MAX_QUEUED_WRITES: usize = 65_536;

pub(super) enum Write {
    /// With the lineage the connection read the entry under (`Redis::lineage`) and when it
    /// was asked for (metrics on): timed until written.
    Ack(Arc<str>, u64, u16, Option<std::time::Instant>),
    Sent(Arc<str>, u64),
    /// A connection ended: its exact watermark, and its id (`scripts::FINISH`).
    Finish(Arc<str>, u64, u64),
    /// A tracked message's state changed (`notes`).
    Note(Event),
    /// The outbox's length (`XLEN`), read in the next pipeline: the HTTP API's `queued`, for
    /// the price of one command in a round trip already made rather than a call of its own.
    Len(Arc<str>, oneshot::Sender<Option<u64>>),
    /// Answered once every write queued before it is applied (or given up).
    Barrier(oneshot::Sender<()>),
}

/// Appends the enqueue script for `run` (all `Ordered::Enqueue`) to the pipeline in `out`;
/// `flags` gets each message's flags (for `remember`).
fn encode_enqueues(
    out: &mut BytesMut,
    run: &[Ordered],
    args: &EnqueueArgs,
    memo: &Memo,
    now_ms: u64,
    flags: &mut Vec<u8>,
) {
    let stride = if args.routes { 3 } else { 2 };
    resp::array(out, 9 + (stride + 3) * run.len());
    resp::bulk(out, b"EVALSHA");
    resp::bulk(out, args.sha.as_bytes());
    resp::bulk_u64(out, (stride * run.len()) as u64);
    for o in run {
        if let Ordered::Enqueue { client, .. } = o {
            keys::put_client(out, Client::Outbox, client);
            keys::put_client(out, Client::Qbytes, client);
            if args.routes {
                keys::put_client(out, Client::Route, client);
            }
        }
    }
    resp::bulk_u64(out, args.cap);
    resp::bulk(out, if args.drop_new { b"1" } else { b"0" });
    resp::bulk_u64(out, args.key_ttl_ms());
    resp::bulk_u64(out, stride as u64);
    resp::bulk_u64(out, args.byte_cap);
    resp::bulk_u64(out, args.max_envelope);
    for o in run {
        if let Ordered::Enqueue {
            client,
            qos,
            msg,
            live,
            ..
        } = o
        {
            let (check, f) = plan(memo, args, client, *live, now_ms);
            flags.push(f);
            resp::bulk_u64(out, check);
            resp::bulk_u64(out, f as u64);
            resp::bulk_header(out, msg.envelope_len());
            msg.put_envelope(out, *qos);
            resp::end(out);
        }
    }
}

/// Keeps what the script answered for `client` (a stored message), for its next ones.
fn remember(memo: &mut Memo, client: &str, s: Stored, flags: u8, now_ms: u64) {
    let hash = memo.hash(client);
    let mut slot = memo.get(hash);
    slot.hash = hash;
    if s.count_check != 0 && s.seq != 0 {
        (slot.base, slot.count_check, slot.bytes_left, slot.own) =
            (s.seq, s.count_check, s.bytes_left, 0);
    } else if s.count_check != 0 {
        // Measured and refused (`drop_new`): measure the next one again.
        slot.base = 0;
    } else if slot.base != 0 {
        slot.own += 1;
        slot.bytes_left = slot.bytes_left.saturating_sub(s.size);
    }
    if flags & 1 != 0 {
        slot.refreshed_ms = now_ms;
    }
    memo.put(slot);
}

/// Appends a retained write (HSET, or HDEL without an envelope) to the pipeline in `out`.
fn encode_retained(out: &mut BytesMut, topic: &str, envelope: Option<&[u8]>) {
    resp::array(out, if envelope.is_some() { 4 } else { 3 });
    resp::bulk(out, if envelope.is_some() { b"HSET" } else { b"HDEL" });
    resp::bulk(out, keys::RETAINED.as_bytes());
    resp::bulk(out, topic.as_bytes());
    if let Some(e) = envelope {
        resp::bulk(out, e);
    }
}

/// Reads the enqueue script's reply for a run of `n` messages into `results`, and what
/// `remember` needs of each into `checks` (`None`: failed; `size` is filled in later). An
/// error reply fails the whole run; anything else unexpected means the stream is out of
/// step.
fn enqueue_replies(
    r: &mut Replies<'_>,
    n: usize,
    routes: bool,
    health: &Health,
    results: &mut Vec<Result<Applied, StoreError>>,
    checks: &mut Vec<Option<Stored>>,
) -> Result<(), resp::Error> {
    let per = if routes { 7 } else { 5 };
    match r.next()? {
        Reply::Array(Some(len)) if len == per * n => {}
        Reply::Error(e) => {
            let e = health.error_reply(e);
            results.extend(std::iter::repeat_n(Err(e), n));
            checks.extend(std::iter::repeat_n(None, n));
            return Ok(());
        }
        other => {
            return Err(resp::Error::Protocol(format!(
                "unexpected enqueue reply {other:?}"
            )))
        }
    }
    for _ in 0..n {
        let reply = (r.next()?, r.next()?, r.next()?, r.next()?, r.next()?);
        let mut applied = match reply {
            (
                Reply::Int(seq),
                Reply::Int(dropped),
                Reply::Int(count_check),
                Reply::Int(left),
                Reply::Int(live),
            ) if seq >= 0 && dropped >= 0 && count_check >= 0 && left >= 0 => {
                checks.push(Some(Stored {
                    seq: seq as u64,
                    count_check: count_check as u64,
                    bytes_left: left as u64,
                    size: 0,
                }));
                Ok(Applied {
                    seq: seq as u64,
                    dropped: dropped as u64,
                    route: None,
                    live: live == 1,
                })
            }
            (Reply::Int(-1), Reply::Bulk(Some(e)), Reply::Int(_), Reply::Int(_), Reply::Int(_)) => {
                checks.push(None);
                Err(health.error_reply(e))
            }
            other => {
                return Err(resp::Error::Protocol(format!(
                    "unexpected enqueue reply {other:?}"
                )))
            }
        };
        if routes {
            let route = match (r.next()?, r.next()?) {
                (Reply::Bulk(Some(node)), Reply::Bulk(Some(inc))) => {
                    let node = std::str::from_utf8(node).ok();
                    let inc = std::str::from_utf8(inc).ok().and_then(|i| i.parse().ok());
                    node.zip(inc).map(|(node, inc)| RouteHint {
                        node: Box::from(node),
                        inc,
                    })
                }
                (Reply::Bulk(_), Reply::Bulk(_)) => None,
                other => {
                    return Err(resp::Error::Protocol(format!(
                        "unexpected route in enqueue reply {other:?}"
                    )))
                }
            };
            if let Ok(a) = &mut applied {
                a.route = route;
            }
        }
        results.push(applied);
    }
    Ok(())
}

/// Reads the reply of a retained write (an integer, or an error).
fn retained_reply(
    r: &mut Replies<'_>,
    health: &Health,
) -> Result<Result<Applied, StoreError>, resp::Error> {
    Ok(match r.next()? {
        Reply::Int(_) => Ok(Applied::default()),
        Reply::Error(e) => Err(health.error_reply(e)),
        other => {
            return Err(resp::Error::Protocol(format!(
                "unexpected retained reply {other:?}"
            )))
        }
    })
}

/// Applies ordered writes in pipelines, in submission order: while one pipeline is out, the
/// next one fills, so the batch size follows the load.
///
/// With `wait_replicas > 0` each pipeline ends in `WAIT`: the writes are acknowledged only
/// once that many replicas have them, so a Sentinel failover cannot lose an acknowledged
/// message. Without it, replication is asynchronous and a failover may lose the last writes.
pub(super) async fn ordered_loop(
    mut hot: Hot,
    mut rx: mpsc::Receiver<Ordered>,
    health: Arc<Health>,
    args: EnqueueArgs,
    wait_replicas: u32,
) {
    let mut batch = Vec::with_capacity(512);
    let mut results = Vec::with_capacity(512);
    let mut memo = Memo::new();
    // Per enqueue in the batch: the flags sent, what the script answered (None: failed).
    let (mut flags, mut checks) = (Vec::with_capacity(512), Vec::with_capacity(512));
    // The batch in pipeline order: a run of this many enqueues (one script call), or 0 for
    // a retained write; and each one's place in `out` and slot.
    let mut runs = Vec::with_capacity(16);
    let mut parts = Vec::with_capacity(16);
    let cluster = hot.is_cluster();
    let retained_slot = slots::key_slot(keys::RETAINED.as_bytes());
    let mut out = BytesMut::with_capacity(64 * 1024);
    while rx.recv_many(&mut batch, 512).await > 0 {
        if !health.is_up() {
            // Submitted just before the store went down: fail at once, like new calls.
            for o in batch.drain(..) {
                let _ = o
                    .reply()
                    .send(Err(StoreError::Unavailable("redis is down".into())));
            }
            continue;
        }
        out.clear();
        runs.clear();
        parts.clear();
        flags.clear();
        checks.clear();
        let now = crate::message::now_ms();
        let mut i = 0;
        while i < batch.len() {
            if let Ordered::Retained {
                topic, envelope, ..
            } = &batch[i]
            {
                encode_retained(&mut out, topic, envelope.as_deref());
                runs.push(0);
                parts.push(Part {
                    slot: retained_slot,
                    end: out.len(),
                });
                i += 1;
                continue;
            }
            // Retained writes split runs, so that the pipeline keeps submission order.
            let run = batch[i..]
                .iter()
                .take_while(|o| matches!(o, Ordered::Enqueue { .. }))
                .count();
            let mut groups = vec![(run, 0)];
            if cluster {
                // One script call per slot: a stable sort keeps each client's order.
                groups = group_by_slot(&mut batch[i..i + run]);
            }
            for (n, slot) in groups {
                encode_enqueues(&mut out, &batch[i..i + n], &args, &memo, now, &mut flags);
                runs.push(n);
                parts.push(Part {
                    slot,
                    end: out.len(),
                });
                i += n;
            }
        }
        results.clear();
        let outcome = match hot
            .round_trip_parts(&mut out, &parts, wait_replicas, &health)
            .await
        {
            Ok(buf) => {
                let mut r = Replies::new(buf);
                let parsed = (|| {
                    for &n in &runs {
                        if n == 0 {
                            results.push(retained_reply(&mut r, &health)?);
                        } else {
                            enqueue_replies(
                                &mut r,
                                n,
                                args.routes,
                                &health,
                                &mut results,
                                &mut checks,
                            )?;
                        }
                    }
                    if wait_replicas == 0 {
                        return Ok(None);
                    }
                    Ok(Some(match r.next()? {
                        Reply::Int(n) => n.max(0) as u64,
                        other => {
                            r.skip(other)?;
                            0
                        }
                    }))
                })();
                match parsed {
                    Ok(None) => Ok(()),
                    Ok(Some(acked)) if acked >= wait_replicas as u64 => Ok(()),
                    Ok(Some(acked)) => {
                        metrics::store_error();
                        Err(StoreError::Unavailable(format!(
                            "{acked} of {wait_replicas} replicas confirmed the write"
                        )))
                    }
                    Err(e) => Err(hot.out_of_step(&health, e)),
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                let enqueued = batch.iter().filter_map(|o| match o {
                    Ordered::Enqueue { client, msg, .. } => Some((client, msg)),
                    Ordered::Retained { .. } => None,
                });
                for (((client, msg), check), &f) in enqueued.zip(&checks).zip(&flags) {
                    if let Some(mut s) = *check {
                        s.size = msg.envelope_len() as u64;
                        remember(&mut memo, client, s, f, now);
                    }
                }
                for (o, r) in batch.drain(..).zip(results.drain(..)) {
                    let _ = o.reply().send(r);
                }
            }
            Err(e) => {
                for o in batch.drain(..) {
                    let _ = o.reply().send(Err(e.clone()));
                }
            }
        }
    }
}

/// Sorts a run of enqueues by the slot of their client's keys (stable: each client's order
/// stays) and returns the groups that share one: their length and slot. A client whose keys
/// do not share a slot (`keys::client_slot`) goes in a group of its own kind, to fail there
/// alone.
fn group_by_slot(run: &mut [Ordered]) -> Vec<(usize, u16)> {
    let key = |o: &Ordered| match o {
        Ordered::Enqueue { client, .. } => match keys::client_slot(client) {
            Some(slot) => (slot, false),
            None => (
                slots::key_slot(keys::client(Client::Outbox, client).as_bytes()),
                true,
            ),
        },
        Ordered::Retained { .. } => (0, true),
    };
    run.sort_by_cached_key(key);
    let mut groups: Vec<((u16, bool), usize)> = Vec::new();
    for o in run.iter() {
        let k = key(o);
        match groups.last_mut() {
            Some((last, n)) if *last == k => *n += 1,
            _ => groups.push((k, 1)),
        }
    }
    groups.into_iter().map(|((slot, _), n)| (n, slot)).collect()
}

/// Writes acks and sent watermarks in pipelines: one round trip for everything queued.
pub(super) async fn write_loop(
    mut hot: Hot,
    mut rx: mpsc::Receiver<Write>,
    health: Arc<Health>,
    finish_sha: String,
    receipts: Notes,
) {
    let mut batch = Vec::with_capacity(1024);
    let mut noted = Vec::new();
    let mut lens = Vec::new();
    let mut out = BytesMut::with_capacity(64 * 1024);
    let (mut acks, mut sent, mut barriers) = (Vec::new(), Vec::new(), Vec::new());
    let mut finished = Vec::new();
    let mut started = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        for w in batch.drain(..) {
            match w {
                // An entry read from a copy of the keys that is gone: its number may be a
                // newer entry's now. Dropped: at worst the entry comes back, with DUP.
                Write::Ack(c, _, lineage, _) if hot.lineage(&c) != lineage => {}
                Write::Ack(c, seq, _, t) => {
                    acks.push(Keyed::new(c, seq));
                    started.extend(t);
                }
                Write::Sent(c, seq) => sent.push(Keyed::new(c, seq)),
                Write::Finish(c, seq, conn) => finished.push((c, seq, conn)),
                // Same rule as an ack: the record would be another message's.
                Write::Note(e) if hot.lineage(&e.id.client) != e.id.lineage => {}
                Write::Note(e) => noted.push(e),
                Write::Len(c, reply) => lens.push((c, reply)),
                Write::Barrier(b) => barriers.push(b),
            }
        }
        if health.is_up() {
            let writes = Writes {
                acks: &mut acks,
                sent: &mut sent,
                finished: &finished,
                finish_sha: &finish_sha,
                noted: &noted,
                receipts: &receipts,
                lens: &mut lens,
            };
            apply(&mut hot, &mut out, writes, &health).await;
        }
        finished.clear();
        noted.clear();
        // Unanswered (the store is down): the caller goes without.
        lens.clear();
        if !started.is_empty() {
            let end = std::time::Instant::now();
            for t in started.drain(..) {
                metrics::store_op_until(metrics::StoreOp::Ack, t, end);
            }
        }
        // Lost acks (Redis down) come back as duplicates after a reconnect: late, never
        // lost.
        acks.clear();
        sent.clear();
        for b in barriers.drain(..) {
            let _ = b.send(());
        }
    }
}

/// A client's sequence number, ordered by a hash of the client id first: sorting a batch
/// then compares integers, not strings. Equal hashes of different clients (however rare)
/// only split a client's numbers into more runs, which stays correct: each run is written
/// in ascending order.
struct Keyed {
    hash: u64,
    seq: u64,
    client: Arc<str>,
}

impl Keyed {
    fn new(client: Arc<str>, seq: u64) -> Keyed {
        // FNV-1a: a few instructions per byte of a short id, no state.
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        for &b in client.as_bytes() {
            hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Keyed { hash, seq, client }
    }

    fn order(&self, other: &Keyed) -> std::cmp::Ordering {
        (self.hash, self.seq)
            .cmp(&(other.hash, other.seq))
            .then_with(|| self.client.cmp(&other.client))
    }

    /// Same client (a pointer comparison when both come from one connection).
    fn same_client(&self, other: &Keyed) -> bool {
        self.hash == other.hash && self.client == other.client
    }
}

/// An entry id, `0-<seq>`, as a bulk string.
pub(super) fn put_id(out: &mut BytesMut, seq: u64) {
    resp::bulk_prefixed_u64(out, b"0-", seq);
}

/// The slot of `client`'s outbox key: its hash tag's, or the whole key's when the id has
/// none (`keys::client_slot`).
fn outbox_slot(client: &str) -> u16 {
    keys::client_slot(client)
        .unwrap_or_else(|| slots::key_slot(keys::client(Client::Outbox, client).as_bytes()))
}

/// One batch of the write loop.
struct Writes<'a> {
    acks: &'a mut [Keyed],
    sent: &'a mut [Keyed],
    /// Connections that ended: client, watermark, connection id.
    finished: &'a [(Arc<str>, u64, u64)],
    finish_sha: &'a str,
    /// Receipt state changes, after everything else (their replies are read).
    noted: &'a [Event],
    receipts: &'a Notes,
    /// Lengths asked for, read after the notes.
    lens: &'a mut Vec<(Arc<str>, oneshot::Sender<Option<u64>>)>,
}

/// Writes one batch of acks and watermarks. On failure the store is marked down.
async fn apply(hot: &mut Hot, out: &mut BytesMut, w: Writes<'_>, health: &Health) {
    let Writes {
        acks,
        sent,
        finished,
        finish_sha,
        noted,
        receipts,
        lens,
    } = w;
    out.clear();
    // Each command is a part of its own: on a cluster they go to their client's node.
    let mut parts = Vec::new();
    let mut cut = |out: &BytesMut, client: &str| {
        parts.push(Part {
            slot: outbox_slot(client),
            end: out.len(),
        });
    };
    // One XDEL per client with all its numbers in the batch.
    acks.sort_unstable_by(Keyed::order);
    let mut i = 0;
    while i < acks.len() {
        let first = &acks[i];
        let n = acks[i..]
            .iter()
            .take_while(|a| a.same_client(first))
            .count();
        resp::array(out, 2 + n);
        resp::bulk(out, b"XDEL");
        keys::put_client(out, Client::Outbox, &first.client);
        for a in &acks[i..i + n] {
            put_id(out, a.seq);
        }
        cut(out, &first.client);
        i += n;
    }
    // A plain SET of each client's highest number: one connection writes a client's
    // watermark in increasing order, and DUP is advisory in MQTT 3.1.1, so a rare race
    // between two nodes costs nothing. The watermark only matters for entries still queued,
    // so a number acknowledged in this same batch is left out: its ack comes first in the
    // pipeline, so the SET could only take effect with it. A client whose numbers were all
    // acknowledged gets no SET (many of them, with devices online).
    sent.sort_unstable_by(Keyed::order);
    let mut a = 0;
    let mut highest = None;
    for (j, here) in sent.iter().enumerate() {
        while a < acks.len() && acks[a].order(here).is_lt() {
            a += 1;
        }
        if acks.get(a).is_none_or(|ack| ack.order(here).is_ne()) {
            highest = Some(here.seq);
        }
        if sent.get(j + 1).is_none_or(|next| !next.same_client(here)) {
            if let Some(seq) = highest.take() {
                resp::array(out, 3);
                resp::bulk(out, b"SET");
                keys::put_client(out, Client::Sent, &here.client);
                resp::bulk_u64(out, seq);
                cut(out, &here.client);
            }
        }
    }
    // After the watermarks written ahead, which they replace.
    for (client, seq, conn) in finished {
        resp::array(out, 7);
        resp::bulk(out, b"EVALSHA");
        resp::bulk(out, finish_sha.as_bytes());
        resp::bulk(out, b"2");
        keys::put_client(out, Client::Sent, client);
        keys::put_client(out, Client::Session, client);
        resp::bulk_u64(out, *seq);
        resp::bulk_u64(out, *conn);
        cut(out, client);
    }
    for e in noted {
        let slot = notes::encode(out, receipts, e);
        parts.push(Part {
            slot,
            end: out.len(),
        });
    }
    for (client, _) in lens.iter() {
        resp::array(out, 2);
        resp::bulk(out, b"XLEN");
        keys::put_client(out, Client::Outbox, client);
        parts.push(Part {
            slot: outbox_slot(client),
            end: out.len(),
        });
    }
    if parts.is_empty() {
        return;
    }
    let commands = parts.len() - noted.len() - lens.len();
    let Ok(buf) = hot.round_trip_parts(out, &parts, 0, health).await else {
        return;
    };
    let mut r = Replies::new(buf);
    let checked = (|| {
        for _ in 0..commands {
            match r.next()? {
                Reply::Error(e) => {
                    let _ = health.error_reply(e);
                }
                other => r.skip(other)?,
            }
        }
        let finals = notes::finals(&mut r, noted, health)?;
        for (_, reply) in lens.drain(..) {
            let n = match r.next()? {
                Reply::Int(n) => u64::try_from(n).ok(),
                other => {
                    r.skip(other)?;
                    None
                }
            };
            let _ = reply.send(n);
        }
        Ok(finals)
    })();
    match checked {
        Ok(finals) => notes::hook(hot, out, receipts, &finals, health).await,
        Err(e) => {
            let _ = hot.out_of_step(health, e);
        }
    }
}
