//! The receipt webhook (`http.receipt_webhook`): final states (`acked`, `expired`,
//! `dropped`) queued by the store and POSTed in batches by one task per node.
//!
//! Delivery is at least once: a batch leaves its queue only after the webhook answered
//! 2xx; a failure is retried with backoff (0.1 s doubling to 30 s), for ever, while the
//! queue keeps its bound (`http.receipt_queue`: the oldest are dropped, counted as
//! `herald_limit_hits_total{limit="receipt_queue"}`). Nothing here is on the delivery
//! path: the store only appends.
//!
//! The queue is the memory store's `MemQueue`, or with Redis the node's hook stream
//! (`herald:hooks:{<node id>}`, appended by the outbox's ack writer in the round trip after
//! the records): a node killed before its POST finds the stream again when it restarts
//! under the same node id, and while it stays away another node posts them (`adopt`).
//!
//! The body: `{"receipts": [{"id", "client_id", "state", "at"}, ...]}`, at most `BATCH`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Event, ReceiptId, State};
use crate::config::Secret;
use crate::lograte::{self, Reason};
use crate::metrics;
use crate::redis::{Redis, StoreError};

/// Receipts in one POST.
pub const BATCH: usize = 256;
const POST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The Redis feed is also read this often without a wake-up (events a previous run of this
/// node left, a wake-up lost to a full batch).
const POLL: Duration = Duration::from_secs(1);

/// The memory store's queue.
pub struct MemQueue {
    inner: Mutex<Queued>,
    max: usize,
    max_bytes: usize,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct Queued {
    events: VecDeque<(u64, Event)>,
    bytes: usize,
    next: u64,
}

impl MemQueue {
    pub fn new(max: usize, max_bytes: usize, wake: Arc<Notify>) -> MemQueue {
        MemQueue {
            inner: Mutex::default(),
            max,
            max_bytes,
            wake,
        }
    }

    pub fn push(&self, e: Event) {
        let mut q = self.inner.lock();
        q.bytes += e.size();
        let n = q.next;
        q.next += 1;
        q.events.push_back((n, e));
        while q.events.len() > self.max || q.bytes > self.max_bytes {
            let Some((_, old)) = q.events.pop_front() else {
                break;
            };
            q.bytes -= old.size();
            metrics::limit_hit("receipt_queue");
        }
        drop(q);
        self.wake.notify_one();
    }

    fn peek(&self) -> (Vec<Event>, u64) {
        let q = self.inner.lock();
        let batch: Vec<_> = q.events.iter().take(BATCH).collect();
        let last = batch.last().map_or(0, |(n, _)| n + 1);
        (batch.into_iter().map(|(_, e)| e.clone()).collect(), last)
    }

    /// Removes what was posted: numbers below `upto` (some may have been dropped meanwhile).
    fn remove(&self, upto: u64) {
        let mut q = self.inner.lock();
        while q.events.front().is_some_and(|(n, _)| *n < upto) {
            if let Some((_, e)) = q.events.pop_front() {
                q.bytes -= e.size();
            }
        }
    }
}

/// Where the poster reads from.
pub enum Feed {
    Memory(Arc<MemQueue>),
    /// A node's hook stream (`keys::hooks(node)`).
    Redis {
        redis: Redis,
        node: String,
        key: String,
    },
}

/// A hook stream entry as XRANGE returns it: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// What a batch read from a feed needs to be removed once posted.
enum Posted {
    Memory(u64),
    Redis(Vec<String>),
}

impl Feed {
    async fn peek(&self) -> Result<(Vec<Event>, Posted), StoreError> {
        match self {
            Feed::Memory(q) => {
                let (events, upto) = q.peek();
                Ok((events, Posted::Memory(upto)))
            }
            Feed::Redis { redis, key, .. } => {
                let mut c = redis::cmd("XRANGE");
                c.arg(key).arg("-").arg("+").arg("COUNT").arg(BATCH);
                let raw: Vec<StreamEntry> = redis.query(&c).await?;
                let mut ids = Vec::with_capacity(raw.len());
                let mut events = Vec::with_capacity(raw.len());
                for (id, fields) in raw {
                    // An entry that does not parse is removed with the batch, not posted.
                    if let Some(e) = stream_event(&fields) {
                        events.push(e);
                    }
                    ids.push(id);
                }
                Ok((events, Posted::Redis(ids)))
            }
        }
    }

    async fn remove(&self, posted: Posted) -> Result<(), StoreError> {
        match (self, posted) {
            (Feed::Memory(q), Posted::Memory(upto)) => {
                q.remove(upto);
                Ok(())
            }
            (Feed::Redis { redis, key, .. }, Posted::Redis(ids)) if !ids.is_empty() => {
                let mut c = redis::cmd("XDEL");
                c.arg(key).arg(ids);
                redis.query::<i64>(&c).await.map(|_| ())
            }
            _ => Ok(()),
        }
    }
}

/// The fields the ack writer gives a hook stream entry (`writer::hook_events`): `c` client,
/// `q` seq, `l` lineage, `s` state, `t` unix ms.
pub fn stream_fields(e: &Event) -> [(&'static str, String); 5] {
    [
        ("c", e.id.client.to_string()),
        ("q", e.id.seq.to_string()),
        ("l", e.id.lineage.to_string()),
        ("s", e.state.name().to_string()),
        ("t", e.at_ms.to_string()),
    ]
}

fn stream_event(fields: &[(String, Vec<u8>)]) -> Option<Event> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    Some(Event {
        id: ReceiptId {
            client: Arc::from(get("c")?),
            seq: get("q")?.parse().ok()?,
            lineage: get("l")?.parse().ok()?,
        },
        state: State::parse(get("s")?)?,
        at_ms: get("t")?.parse().ok()?,
    })
}

/// What one turn of a poster did.
pub(super) enum Step {
    Posted,
    /// Nothing to post: wait for a wake-up.
    Empty,
    /// The store or the webhook failed; the turn already waited its backoff.
    Failed,
    Stopped,
}

/// The webhook's client: every POST bounded by `POST_TIMEOUT`.
pub(super) fn client() -> Option<reqwest::Client> {
    match reqwest::Client::builder().timeout(POST_TIMEOUT).build() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "receipt webhook client could not be built; receipts are not posted");
            None
        }
    }
}

/// POSTs what `feed` holds to `url` until `stop`. With Redis, also posts what dead nodes
/// left in their hook streams (`adopt`).
pub async fn run(feed: Feed, wake: Arc<Notify>, url: Secret, stop: CancellationToken) {
    let Some(client) = client() else {
        return;
    };
    if let Feed::Redis { redis, node, .. } = &feed {
        let adopt = super::adopt::run(
            redis.clone(),
            node.clone(),
            client.clone(),
            url.clone(),
            stop.clone(),
        );
        tokio::spawn(adopt);
    }
    let idle = match feed {
        Feed::Redis { .. } => POLL,
        Feed::Memory(_) => Duration::from_secs(3600),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match step(&feed, &client, url.expose(), &mut backoff, &stop).await {
            Step::Stopped => return,
            Step::Empty => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(idle) => {}
                    _ = stop.cancelled() => return,
                }
            }
            Step::Posted | Step::Failed => {}
        }
    }
}

/// Posts one batch of `feed`, and removes it once the webhook took it.
pub(super) async fn step(
    feed: &Feed,
    client: &reqwest::Client,
    url: &str,
    backoff: &mut Duration,
    stop: &CancellationToken,
) -> Step {
    let (events, posted) = match feed.peek().await {
        Ok(b) => b,
        // The store is down: its own health check says so; try again later.
        Err(_) if pause(stop, POLL).await => return Step::Stopped,
        Err(_) => return Step::Failed,
    };
    if events.is_empty() {
        if matches!(posted, Posted::Redis(ref ids) if !ids.is_empty()) {
            let _ = feed.remove(posted).await;
            return Step::Posted;
        }
        return Step::Empty;
    }
    match post(client, url, &events).await {
        Ok(()) => {
            metrics::receipt_post(true, events.len());
            *backoff = Duration::from_millis(100);
            if let Err(e) = feed.remove(posted).await {
                // Posted and kept: posted again later (at least once).
                tracing::debug!(error = %e, "posted receipts not removed from the hook stream");
            }
            Step::Posted
        }
        Err(why) => {
            metrics::receipt_post(false, events.len());
            if lograte::allow(Reason::Webhook) {
                // The URL is not logged: it may carry credentials.
                tracing::warn!(reason = %why, retry_in = ?*backoff, "receipt webhook failed");
            }
            if pause(stop, *backoff).await {
                return Step::Stopped;
            }
            *backoff = (*backoff * 2).min(MAX_BACKOFF);
            Step::Failed
        }
    }
}

/// Sleeps `d`; true if stopped meanwhile.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.cancelled() => true,
    }
}

async fn post(client: &reqwest::Client, url: &str, events: &[Event]) -> Result<(), String> {
    let body = serde_json::json!({
        "receipts": events.iter().map(Event::json).collect::<Vec<_>>(),
    });
    let r = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        // Without the URL, which reqwest's errors include.
        .map_err(|e| e.without_url().to_string())?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", r.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> Event {
        Event {
            id: ReceiptId {
                client: Arc::from("d"),
                seq,
                lineage: 0,
            },
            state: State::Acked,
            at_ms: seq,
        }
    }

    #[test]
    fn the_memory_queue_drops_the_oldest_and_removes_only_what_was_posted() {
        let q = MemQueue::new(3, 1 << 20, Arc::default());
        for s in 1..=4 {
            q.push(ev(s));
        }
        let (events, upto) = q.peek();
        assert_eq!(
            events.iter().map(|e| e.id.seq).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        q.push(ev(5));
        q.remove(upto);
        assert_eq!(q.peek().0.iter().map(|e| e.id.seq).collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn stream_entries_roundtrip() {
        let e = ev(9);
        let fields: Vec<(String, Vec<u8>)> = stream_fields(&e)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes()))
            .collect();
        assert_eq!(stream_event(&fields), Some(e));
    }
}
