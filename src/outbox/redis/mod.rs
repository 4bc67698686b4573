//! Redis outbox: durable, shared by every node of a cluster. Keys and scripts are
//! `crate::redis`'s (`keys`, `scripts::ENQUEUE`, `scripts::ATTACH`); this module is the
//! outbox's API over them, and `writer` holds the two tasks that write the hot path.
//!
//! Enqueues and attach are awaited: the publisher's PUBACK waits for the enqueue's reply.
//! Enqueues are submitted in call order and written in pipelines by `writer`. Acks and sent
//! watermarks are written by the other writer task (see `writer` for the rules). Attach
//! waits for the watermarks queued before it. No connection is held per MQTT client.

mod migrate;
pub(super) mod notes;
mod sample;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Attach, Enqueued, Entry, Limits, StoreError, Stored};
use crate::config::OverflowPolicy;
use crate::message::{now_ms, Message, Qos};
use crate::metrics;
use crate::receipts::{self, Event, ReceiptId, State};
use crate::redis::keys::{self, Client};
use crate::redis::{Redis, CALL_TIMEOUT};
use writer::{Applied, EnqueueArgs, Ordered, OrderedReply, Write, MAX_QUEUED_WRITES};

pub struct RedisOutbox {
    redis: Redis,
    writes: mpsc::Sender<Write>,
    ordered: mpsc::Sender<Ordered>,
    /// The last store-wide sample (`sample`).
    stats: Arc<parking_lot::Mutex<Option<sample::Stats>>>,
    /// The collapse index's bound (`session.max_queued_messages`) and TTL (the outbox's).
    collapse_keys: usize,
    collapse_ttl_ms: u64,
}

/// The seq of an entry id `0-<seq>`.
fn seq_of(id: &str) -> Option<u64> {
    id.strip_prefix("0-")?.parse().ok()
}

/// One stream entry as XRANGE returns it: its id, then its fields and values (one: `d`, or
/// `l` for stored live, and the envelope).
pub(super) type RawEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

fn decode_entry(raw: RawEntry) -> Option<(u64, bool, Message)> {
    let (id, fields) = raw;
    let seq = seq_of(&id)?;
    let (field, envelope) = fields.into_iter().next()?;
    let msg = Message::from_envelope(Bytes::from(envelope))?;
    Some((seq, field == b"l", msg))
}

/// A stored QoS byte; anything above 2 was never written by Herald.
fn stored_qos(n: u8) -> Option<Qos> {
    Qos::try_from(n).ok()
}

/// Removes expired entries (`(seq, tracked)`) as acks, counting them, and notes the tracked
/// ones `expired`. Shared by a read (`fetch`) and the store's background pass (`sample`).
async fn expire(
    writes: &mpsc::Sender<Write>,
    client: &Arc<str>,
    lineage: u16,
    expired: &[(u64, bool)],
) {
    let at_ms = now_ms();
    for &(seq, tracked) in expired {
        metrics::dropped(metrics::Drop::Expired);
        let _ = writes
            .send(Write::Ack(client.clone(), seq, lineage, None))
            .await;
        if tracked {
            let id = ReceiptId {
                client: client.clone(),
                seq,
                lineage,
            };
            let e = Event {
                id,
                state: State::Expired,
                at_ms,
            };
            let _ = writes.send(Write::Note(e)).await;
        }
    }
}

impl RedisOutbox {
    /// Starts the writer tasks on `redis`. `routes`: read each receiver's route with its
    /// enqueue (a cluster node).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open(
        redis: Redis,
        limits: Limits,
        ttl: Duration,
        wait_replicas: u32,
        routes: bool,
        max_envelope: usize,
        receipts: notes::Notes,
        sample: bool,
    ) -> RedisOutbox {
        let (tx, rx) = mpsc::channel(MAX_QUEUED_WRITES);
        tokio::spawn(writer::write_loop(
            redis.hot(),
            rx,
            redis.health().clone(),
            redis.scripts().finish.get_hash().to_string(),
            receipts,
        ));
        let (ordered, orx) = mpsc::channel(MAX_QUEUED_WRITES);
        let args = EnqueueArgs {
            sha: redis.scripts().enqueue.get_hash().to_string(),
            cap: limits.max_queued as u64,
            byte_cap: limits.max_queued_bytes as u64,
            drop_new: limits.overflow == OverflowPolicy::DropNew,
            ttl_ms: ttl.as_millis() as u64,
            routes,
            max_envelope: max_envelope as u64,
        };
        tokio::spawn(writer::ordered_loop(
            redis.hot(),
            orx,
            redis.health().clone(),
            args,
            wait_replicas,
        ));
        let stats = Arc::default();
        if sample {
            tokio::spawn(sample::run(redis.clone(), Arc::clone(&stats), tx.clone()));
        }
        RedisOutbox {
            redis,
            writes: tx,
            ordered,
            stats,
            collapse_keys: limits.max_queued.max(1),
            collapse_ttl_ms: if ttl.is_zero() {
                u64::from(u32::MAX)
            } else {
                ttl.as_millis() as u64 * 2
            },
        }
    }

    fn submit(
        &self,
        make: impl FnOnce(OrderedReply) -> Ordered,
    ) -> oneshot::Receiver<Result<Applied, StoreError>> {
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.redis.health().check() {
            let _ = reply.send(Err(e));
            return rx;
        }
        if let Err(e) = self.ordered.try_send(make(reply)) {
            let (why, o) = match e {
                mpsc::error::TrySendError::Full(o) => ("store write queue full", o),
                mpsc::error::TrySendError::Closed(o) => ("store writer stopped", o),
            };
            metrics::limit_hit("store_write_queue");
            let _ = o.reply().send(Err(StoreError::Unavailable(why.into())));
        }
        rx
    }

    /// Appends `msg`; with it, the client's route as it was right after the store (a
    /// cluster node; `None` elsewhere or without a route), and whether it was stored as
    /// live. `live`: a connection of the client is registered on this node now.
    pub(super) fn enqueue(
        &self,
        client: &Arc<str>,
        qos: Qos,
        msg: &Arc<Message>,
        live: bool,
    ) -> impl std::future::Future<Output = Result<Stored, StoreError>> + Send + 'static {
        let reply = self.submit(|reply| Ordered::Enqueue {
            client: client.clone(),
            qos,
            msg: msg.clone(),
            live,
            reply,
        });
        async move {
            let Applied {
                seq,
                dropped,
                route,
                live,
            } = reply
                .await
                .map_err(|_| StoreError::Unavailable("store writer stopped".into()))??;
            for _ in 0..dropped {
                metrics::dropped(metrics::Drop::OutboxFullOldest);
            }
            if seq == 0 {
                metrics::dropped(metrics::Drop::OutboxFullNew);
                return Ok(Stored {
                    outcome: Enqueued::Rejected,
                    route: None,
                    live,
                });
            }
            metrics::stored();
            Ok(Stored {
                outcome: Enqueued::Stored(seq),
                route,
                live,
            })
        }
    }

    pub(super) async fn fetch(
        &self,
        client: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let lineage = self.redis.lineage(client);
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(keys::client(Client::Outbox, client))
            .arg(format!("0-{from}"))
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let raw: Vec<RawEntry> = self.redis.query(&cmd).await?;
        let now = now_ms();
        let mut out = Vec::with_capacity(raw.len());
        let mut expired = Vec::new();
        for entry in raw {
            match decode_entry(entry) {
                Some((seq, _, msg)) if msg.is_expired(now) => expired.push((seq, msg.receipt)),
                Some((seq, live, msg)) => out.push(Entry {
                    seq,
                    qos: msg.qos,
                    msg: Arc::new(msg),
                    live,
                }),
                None => {
                    // Not ours or corrupt: skipping it keeps the device's stream moving.
                    tracing::warn!(client, "undecodable outbox entry skipped");
                }
            }
        }
        let client: Arc<str> = Arc::from(client);
        expire(&self.writes, &client, lineage, &expired).await;
        Ok(out)
    }

    /// A tracked message's state changed (`receipts`); written with the next acks.
    pub(super) async fn note(&self, e: Event) {
        let _ = self.writes.send(Write::Note(e)).await;
    }

    /// The record of a tracked message: its own, or `queued` while the entry is in the
    /// outbox (never written: see `receipts`). `None` when neither, or when the client's
    /// keys are no longer the copy the id was given under.
    pub(super) async fn receipt(&self, id: &ReceiptId) -> Result<Option<(State, u64)>, StoreError> {
        if self.redis.lineage(&id.client) != id.lineage {
            return Ok(None);
        }
        let mut get = redis::cmd("MGET");
        get.arg(keys::receipt(&id.client, id.lineage, id.seq, true))
            .arg(keys::receipt(&id.client, id.lineage, id.seq, false));
        let records: Vec<Option<Vec<u8>>> = self.redis.query(&get).await?;
        if let Some(r) = records
            .iter()
            .flatten()
            .find_map(|r| receipts::parse_record(r))
        {
            return Ok(Some(r));
        }
        let entry = format!("0-{}", id.seq);
        let mut c = redis::cmd("XRANGE");
        c.arg(keys::client(Client::Outbox, &id.client))
            .arg(&entry)
            .arg(&entry);
        let raw: Vec<RawEntry> = self.redis.query(&c).await?;
        Ok(raw
            .into_iter()
            .next()
            .and_then(decode_entry)
            .and_then(|(_, _, m)| receipts::unrecorded(&m)))
    }

    /// See `Store::collapse` and `scripts::COLLAPSE`.
    pub(super) async fn collapse(
        &self,
        client: &str,
        key: &str,
        seq: u64,
    ) -> Result<Option<(u64, bool)>, StoreError> {
        let keys = [
            keys::client(Client::Outbox, client),
            keys::client(Client::Sent, client),
            keys::client(Client::Collapse, client),
        ];
        let (old, tracked): (u64, u8) = self
            .redis
            .evalsha(
                &self.redis.scripts().collapse,
                &keys,
                &[
                    key,
                    &seq.to_string(),
                    &self.collapse_keys.to_string(),
                    &self.collapse_ttl_ms.to_string(),
                ],
            )
            .await?;
        Ok((old != 0).then_some((old, tracked == 1)))
    }

    /// Waits (at most the call timeout) for the acks and watermarks queued so far.
    pub(super) async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.writes.send(Write::Barrier(done)).await.is_ok() {
            let _ = tokio::time::timeout(CALL_TIMEOUT, flushed).await;
        }
    }

    pub(super) fn ping_secs(&self) -> f64 {
        self.redis.health().ping_secs()
    }

    pub(super) fn sample(&self) -> Option<super::OutboxSample> {
        let s = (*self.stats.lock())?;
        Some(super::OutboxSample {
            messages: s.messages,
            oldest_age_secs: sample::oldest_age_secs(&s),
            sessions: Some((s.sessions, s.routed)),
        })
    }

    /// See `Redis::lineage`.
    pub(super) fn lineage(&self, client: &str) -> u16 {
        self.redis.lineage(client)
    }

    /// False, and nothing deleted, if `client`'s keys are no longer the copy read under
    /// `lineage` (`Redis::lineage`).
    pub(super) async fn ack(&self, client: &Arc<str>, seq: u64, lineage: u16) -> bool {
        if self.redis.lineage(client) != lineage {
            return false;
        }
        let t = metrics::clock();
        let _ = self
            .writes
            .send(Write::Ack(client.clone(), seq, lineage, t))
            .await;
        true
    }

    /// Queues the watermark write; the receiver completes once Redis has it (or the write
    /// failed: the message is then sent anyway, DUP being the only thing at stake).
    pub(super) async fn mark_sent(&self, client: &Arc<str>, seq: u64) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        let _ = self.writes.send(Write::Sent(client.clone(), seq)).await;
        let _ = self.writes.send(Write::Barrier(done)).await;
        rx
    }

    /// A persistent session's connection `conn` ended having written entries up to `seq`
    /// (`scripts::FINISH`).
    pub(super) async fn finish(&self, client: &Arc<str>, seq: u64, conn: u64) {
        let _ = self
            .writes
            .send(Write::Finish(client.clone(), seq, conn))
            .await;
    }

    pub(super) async fn attach(
        &self,
        client: &str,
        clean: bool,
        conn: u64,
    ) -> Result<Attach, StoreError> {
        // Watermarks go over the writer's own connection: wait for the ones queued so far
        // (a connection taken over a moment ago), or this read could miss them and resend
        // without DUP.
        self.flush().await;
        let lineage = self.redis.lineage(client);
        let (present, sent, newest, subscribed): (u8, u64, u64, u8) = self
            .redis
            .evalsha(
                &self.redis.scripts().attach,
                &keys::session_state(client),
                &[if clean { "1" } else { "0" }, &conn.to_string()],
            )
            .await?;
        // Only a persistent session stores subscriptions (and joins the index): one key
        // for all clients, not touched per clean CONNECT.
        if subscribed == 1 {
            self.unindex(client).await?;
        }
        Ok(Attach {
            sent_watermark: sent,
            session_present: present == 1,
            replay_to: newest,
            lineage,
        })
    }

    /// Takes `client` out of the index of clients with stored subscriptions.
    pub(super) async fn unindex(&self, client: &str) -> Result<(), StoreError> {
        self.redis
            .query(redis::cmd("SREM").arg(keys::SUBSCRIBERS).arg(client))
            .await
    }

    pub(super) async fn clear(&self, client: &str) -> Result<(), StoreError> {
        self.redis
            .query::<()>(redis::cmd("DEL").arg(&keys::session_state(client)))
            .await
    }

    /// Deletes every entry of the outbox; returns how many. `XTRIM MAXLEN 0` rather than
    /// `DEL`: the stream key stays with its last id, so sequence numbers keep growing (a
    /// connected device's cursor and the sent watermark stay valid), and it is one atomic
    /// command, so an entry added meanwhile is either counted here or kept. The byte
    /// estimate (`qbytes`) is left high; the enqueue script measures exactly whenever the
    /// estimate says the cap is reached, so a high one only measures sooner.
    /// Empties `client`'s outbox (`scripts::EMPTY`): how many entries, and the seqs of the
    /// tracked ones, which the caller reports `dropped`.
    pub(super) async fn delete_all(&self, client: &str) -> Result<(usize, Vec<u64>), StoreError> {
        let (n, tracked): (usize, Vec<String>) = self
            .redis
            .evalsha(
                &self.redis.scripts().empty,
                &[keys::client(Client::Outbox, client)],
                &[],
            )
            .await?;
        Ok((n, tracked.iter().filter_map(|s| s.parse().ok()).collect()))
    }

    /// The number of entries and the `born_us` of the oldest, in one round trip (both
    /// commands read the same key, so the same slot on a cluster).
    pub(super) async fn queued(&self, client: &str) -> Result<(usize, Option<u64>), StoreError> {
        let key = keys::client(Client::Outbox, client);
        let mut len = redis::cmd("XLEN");
        len.arg(&key);
        let mut first = redis::cmd("XRANGE");
        first.arg(&key).arg("-").arg("+").arg("COUNT").arg(1);
        let (n, oldest): (usize, Vec<RawEntry>) = self.redis.query_each(&[len, first]).await?;
        // An entry that does not decode has no age to give: the answer says null, as the
        // delivery path skips it.
        let born = oldest
            .into_iter()
            .next()
            .and_then(decode_entry)
            .map(|(_, _, msg)| msg.born_us);
        Ok((n, born))
    }

    /// Read through the ack writer's pipeline (`Write::Len`): no call of its own.
    pub(super) async fn len(&self, client: &str) -> Result<usize, StoreError> {
        self.redis.health().check()?;
        let (reply, rx) = oneshot::channel();
        let _ = self.writes.send(Write::Len(Arc::from(client), reply)).await;
        match rx.await {
            Ok(Some(n)) => Ok(n as usize),
            _ => Err(StoreError::Unavailable("outbox length not read".into())),
        }
    }

    /// The highest sequence number in each client's outbox (0 if empty), in one round trip
    /// (one pipeline, or one command per client's slot at once on a cluster).
    pub(super) async fn newest(&self, clients: &[&str]) -> Result<Vec<u64>, StoreError> {
        let cmds: Vec<redis::Cmd> = clients
            .iter()
            .map(|c| {
                let mut cmd = redis::cmd("XREVRANGE");
                cmd.arg(keys::client(Client::Outbox, c))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1);
                cmd
            })
            .collect();
        let replies: Vec<Vec<RawEntry>> = self.redis.query_each(&cmds).await?;
        Ok(replies
            .iter()
            .map(|v| v.first().and_then(|(id, _)| seq_of(id)).unwrap_or(0))
            .collect())
    }

    pub(super) async fn save_subscription(
        &self,
        client: &str,
        filter: &str,
        qos: Qos,
    ) -> Result<(), StoreError> {
        // The client's hash and the index are in two slots on a cluster. Either order is
        // safe: the index is read only at start, and an indexed client with no hash loads
        // nothing.
        self.redis
            .query_each(&[
                redis::Cmd::hset(keys::client(Client::Subs, client), filter, qos as u8),
                redis::Cmd::sadd(keys::SUBSCRIBERS, client),
            ])
            .await
    }

    pub(super) async fn remove_subscription(
        &self,
        client: &str,
        filter: &str,
    ) -> Result<(), StoreError> {
        self.redis
            .query(
                redis::cmd("HDEL")
                    .arg(keys::client(Client::Subs, client))
                    .arg(filter),
            )
            .await
    }

    pub(super) async fn load_subscriptions(
        &self,
    ) -> Result<Vec<(String, String, Qos)>, StoreError> {
        let clients: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(keys::SUBSCRIBERS))
            .await?;
        let mut out = Vec::new();
        for chunk in clients.chunks(500) {
            let cmds: Vec<redis::Cmd> = chunk
                .iter()
                .map(|c| redis::Cmd::hgetall(keys::client(Client::Subs, c)))
                .collect();
            let maps: Vec<HashMap<String, u8>> = self.redis.query_each(&cmds).await?;
            for (c, subs) in chunk.iter().zip(maps) {
                for (filter, qos) in subs {
                    if let Some(qos) = stored_qos(qos) {
                        out.push((c.clone(), filter, qos));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Subscriptions stored for one persistent session (a cluster node loads them when the
    /// client connects to it).
    pub(super) async fn client_subscriptions(
        &self,
        client: &str,
    ) -> Result<Vec<(String, Qos)>, StoreError> {
        let subs: HashMap<String, u8> = self
            .redis
            .query(redis::cmd("HGETALL").arg(keys::client(Client::Subs, client)))
            .await?;
        Ok(subs
            .into_iter()
            .filter_map(|(f, q)| Some((f, stored_qos(q)?)))
            .collect())
    }

    pub(super) fn set_retained(
        &self,
        msg: &Message,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let envelope = (!msg.payload.is_empty()).then(|| msg.envelope(msg.qos));
        let reply = self.submit(|reply| Ordered::Retained {
            topic: msg.topic.clone(),
            envelope,
            reply,
        });
        async move {
            reply
                .await
                .map_err(|_| StoreError::Unavailable("store writer stopped".into()))??;
            Ok(())
        }
    }

    pub(super) async fn upgrade(&self) -> Result<(), StoreError> {
        migrate::run(&self.redis).await
    }

    pub(super) async fn load_retained(&self) -> Result<Vec<Message>, StoreError> {
        let all: HashMap<String, Vec<u8>> = self
            .redis
            .query(redis::cmd("HGETALL").arg(keys::RETAINED))
            .await?;
        Ok(all
            .into_values()
            .filter_map(|v| Message::from_envelope(Bytes::from(v)))
            .collect())
    }
}
