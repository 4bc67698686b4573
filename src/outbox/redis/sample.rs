//! The Redis store's gauges (`herald_outbox_messages`, `herald_outbox_oldest_age_seconds`,
//! `herald_sessions{state="offline"}`): a periodic sample, not counts maintained per
//! message (a shared counter would be a key every enqueue touches, the one thing a store
//! that must scale out on Redis Cluster cannot have).
//!
//! Every `SAMPLE_EVERY` each node tries to take the sampling lease (`keys::SAMPLE_LEASE`,
//! SET NX PX); the one that gets it SCANs the keyspace (1,000 keys a call; on Redis Cluster
//! every primary in turn, as SCAN walks only the node it is sent to), reads each
//! outbox's size and first entry, counts the persistent sessions and those with a route,
//! and writes the result to `keys::STATS`, which every node reads into its gauges. So the
//! figures are store-wide, the same on every node (use `max` across nodes, not `sum`), and
//! at most one sample old. Cost: one pass over the keyspace per interval for the whole
//! cluster; the SCAN alone took 1.4 s of Redis CPU per million keys here. So the lease is
//! held for `SLOWDOWN` times as long as the pass took (at least the interval): the sample
//! never takes more than about 5 % of Redis, and at tens of millions of keys it is simply
//! less frequent.
//!
//! The same pass finds outboxes whose oldest entry has expired and that nobody reads (their
//! device stays away): it removes the expired entries, counts them
//! (`herald_messages_dropped_total{reason="expired"}`) and reports tracked ones `expired`
//! (`receipts`), before the key's own TTL would make them vanish uncounted. An outbox key
//! outlives its newest message by at least the TTL refresh interval (`writer`), which is at
//! least a second; a store so large that the pass comes less often than that can still lose
//! some of these to the key's TTL, uncounted.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use tokio::sync::mpsc;

use super::writer::Write;
use crate::message::{now_ms, now_us, Message};
use crate::redis::keys;
use crate::redis::{Redis, StoreError};

/// Outboxes one pass expires at most; the rest wait for the next pass.
const EXPIRE_PER_PASS: usize = 10_000;

pub const SAMPLE_EVERY: Duration = Duration::from_secs(30);

/// The next sample comes no sooner than this many times the last one's duration.
const SLOWDOWN: u32 = 20;

/// The store-wide figures of the last sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub messages: u64,
    /// Unix µs of the oldest queued message with a known time (0: none).
    pub oldest_born_us: u64,
    /// Persistent sessions in the store.
    pub sessions: u64,
    /// Of those, the ones with a route (connected to a cluster node).
    pub routed: u64,
}

/// Runs until the process ends, keeping `latest` up to date.
pub async fn run(redis: Redis, latest: Arc<Mutex<Option<Stats>>>, writes: mpsc::Sender<Write>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease = format!(
        "{:x}",
        crate::message::now_us() ^ u64::from(std::process::id())
    );
    loop {
        every.tick().await;
        if !redis.health().is_up() {
            continue;
        }
        let mut take = redis::cmd("SET");
        take.arg(keys::SAMPLE_LEASE)
            .arg(&lease)
            .arg("NX")
            .arg("PX")
            .arg((SAMPLE_EVERY.as_millis() * 9 / 10) as u64);
        if let Ok(Some(_)) = redis.query::<Option<String>>(&take).await {
            let started = tokio::time::Instant::now();
            match scan(&redis).await {
                Ok((s, stale)) => {
                    let hold = (started.elapsed() * SLOWDOWN).max(SAMPLE_EVERY * 9 / 10);
                    let _ = write(&redis, &s, hold).await;
                    for cid in stale {
                        let _ = expire_outbox(&redis, &writes, cid).await;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "store sample failed"),
            }
        }
        if let Ok(s) = read(&redis).await {
            *latest.lock() = s;
        }
    }
}

/// The store's figures, and the clients whose oldest queued entry has expired.
async fn scan(redis: &Redis) -> Result<(Stats, Vec<String>), StoreError> {
    let mut stats = Stats::default();
    let mut stale = Vec::new();
    let now = now_ms();
    let (outbox, session) = (
        keys::client_prefix(keys::Client::Outbox),
        keys::client_prefix(keys::Client::Session),
    );
    let mut walk = redis.scan("herald:*", 1000);
    while let Some(found) = redis.scan_next(&mut walk).await? {
        let mut cmds = Vec::new();
        let mut outboxes = 0;
        for k in &found {
            if k.starts_with(&outbox) {
                let mut n = redis::cmd("XLEN");
                n.arg(k);
                cmds.push(n);
                let mut first = redis::cmd("XRANGE");
                first.arg(k).arg("-").arg("+").arg("COUNT").arg(1);
                cmds.push(first);
                outboxes += 1;
            }
        }
        let mut sessions = 0;
        for k in &found {
            if let Some(cid) = k.strip_prefix(&session).and_then(|r| r.strip_suffix('}')) {
                cmds.push(redis::Cmd::exists(keys::client(keys::Client::Route, cid)));
                sessions += 1;
            }
        }
        if cmds.is_empty() {
            continue;
        }
        let replies: Vec<redis::Value> = redis.query_each(&cmds).await?;
        let mut it = replies.into_iter();
        let mut boxes = found.iter().filter(|k| k.starts_with(&outbox));
        for _ in 0..outboxes {
            let (n, first) = (it.next(), it.next());
            let key = boxes.next();
            stats.messages +=
                redis::from_redis_value::<u64>(n.unwrap_or(redis::Value::Nil)).unwrap_or(0);
            let first: Vec<super::RawEntry> = first
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default();
            let first = first
                .into_iter()
                .next()
                .and_then(|(_, fields)| fields.into_iter().next())
                .and_then(|(_, envelope)| Message::from_envelope(Bytes::from(envelope)));
            if let (Some(m), Some(k)) = (&first, key) {
                let cid = k.strip_prefix(&outbox).and_then(|r| r.strip_suffix('}'));
                if let Some(cid) = cid.filter(|_| m.is_expired(now)) {
                    if stale.len() < EXPIRE_PER_PASS {
                        stale.push(cid.to_string());
                    }
                }
            }
            if let Some(born) = first.map(|m| m.born_us).filter(|b| *b > 0) {
                if stats.oldest_born_us == 0 || born < stats.oldest_born_us {
                    stats.oldest_born_us = born;
                }
            }
        }
        stats.sessions += sessions;
        for v in it {
            if redis::from_redis_value::<u64>(v).unwrap_or(0) == 1 {
                stats.routed += 1;
            }
        }
    }
    Ok((stats, stale))
}

/// Removes the expired entries at the head of `cid`'s outbox (entries expire in order
/// unless a push set its own shorter `ttl`: those behind a live one wait for a read).
async fn expire_outbox(
    redis: &Redis,
    writes: &mpsc::Sender<Write>,
    cid: String,
) -> Result<(), StoreError> {
    let lineage = redis.lineage(&cid);
    let mut c = redis::cmd("XRANGE");
    c.arg(keys::client(keys::Client::Outbox, &cid))
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1000);
    let raw: Vec<super::RawEntry> = redis.query(&c).await?;
    let now = now_ms();
    let expired: Vec<(u64, bool)> = raw
        .into_iter()
        .filter_map(super::decode_entry)
        .take_while(|(_, _, m)| m.is_expired(now))
        .map(|(seq, _, m)| (seq, m.receipt))
        .collect();
    super::expire(writes, &Arc::from(cid), lineage, &expired).await;
    Ok(())
}

/// Stores the sample, and holds the lease for `hold` from now (the sample's own pace).
async fn write(redis: &Redis, s: &Stats, hold: Duration) -> Result<(), StoreError> {
    // The result, then the lease's extension: two slots, two steps on a cluster, so a
    // result that could not be written leaves the lease short and another node samples
    // sooner.
    let mut result = redis::pipe();
    result
        .cmd("HSET")
        .arg(keys::STATS)
        .arg("messages")
        .arg(s.messages)
        .arg("oldest_born_us")
        .arg(s.oldest_born_us)
        .arg("sessions")
        .arg(s.sessions)
        .arg("routed")
        .arg(s.routed)
        .cmd("PEXPIRE")
        .arg(keys::STATS)
        .arg((hold.max(SAMPLE_EVERY).as_millis() * 3) as u64);
    let mut lease = redis::pipe();
    lease
        .cmd("PEXPIRE")
        .arg(keys::SAMPLE_LEASE)
        .arg(hold.as_millis() as u64);
    redis.query_steps(&[result, lease]).await
}

async fn read(redis: &Redis) -> Result<Option<Stats>, StoreError> {
    let mut c = redis::cmd("HMGET");
    c.arg(keys::STATS)
        .arg("messages")
        .arg("oldest_born_us")
        .arg("sessions")
        .arg("routed");
    let v: Vec<Option<u64>> = redis.query(&c).await?;
    Ok(match v.as_slice() {
        [Some(messages), Some(oldest_born_us), Some(sessions), Some(routed)] => Some(Stats {
            messages: *messages,
            oldest_born_us: *oldest_born_us,
            sessions: *sessions,
            routed: *routed,
        }),
        _ => None,
    })
}

/// The age of the oldest message, in seconds, from a sample's time.
pub fn oldest_age_secs(s: &Stats) -> f64 {
    if s.oldest_born_us == 0 {
        0.0
    } else {
        now_us().saturating_sub(s.oldest_born_us) as f64 / 1e6
    }
}
