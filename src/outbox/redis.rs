//! Redis outbox: durable, shared by every node of a cluster.
//!
//! Keys (all of one client under the hash tag `{cid}`, so a script touching one client
//! touches one slot and also runs on Redis Cluster; the enqueue script batches many clients,
//! see `ENQUEUE` for what Cluster would need):
//! - `herald:seq:{cid}`: INCR counter; never expires, so sequence numbers (and packet ids)
//!   never repeat for a client while one of its connections may still hold a cursor.
//! - `herald:outbox:{cid}`: ZSET, score = seq, member = `<seq>|<envelope>`. Its TTL is
//!   refreshed to `message_ttl` on every enqueue; single messages expire by the time in
//!   their envelope, checked on read.
//! - `herald:qbytes:{cid}`: an upper bound of the outbox's envelope bytes, for
//!   `session.max_queued_bytes` (see `ENQUEUE`); expires and is deleted with the outbox.
//! - `herald:sent:{cid}`: highest seq written to the wire and still queued when written
//!   (DUP on redelivery; a number acknowledged by then needs no resend, see `apply`).
//!   Deleted with the outbox when a clean session starts.
//! - `herald:session:{cid}`: present while the client has a persistent session.
//! - `herald:subs:{cid}`: HASH filter -> QoS of a persistent session.
//! - `herald:subscribers`: SET of client ids with subscriptions (an index read at start).
//! - `herald:retained`: HASH topic -> envelope.
//!
//! Enqueues and attach are awaited: the publisher's PUBACK waits for the enqueue's reply.
//! Enqueues are queued in call order and written in pipelines, one Lua call per run of
//! enqueues (not per message: Redis spends less per message). Acks and sent watermarks are
//! written by a background task in pipelines: losing an ack only means a duplicate later,
//! never a lost message. A watermark is written ahead: `mark_sent` queues it with a barrier
//! and the connection writes the PUBLISH once the barrier answers, so a resend after a crash
//! carries DUP = 1 (if the write fails the PUBLISH still goes out, DUP being all that is at
//! stake). Attach waits for the watermarks queued before it.
//! No connection is held per MQTT client: the hot path (enqueues and retained writes, then
//! acks and watermarks) runs on two connections of its own, one per writer task, speaking
//! RESP through `resp.rs` (pipelines encoded in place, replies read in place); every other
//! call shares one redis-rs multiplexed connection, pipelined by the driver.
//!
//! Availability: any I/O error or timeout marks the store down (logged once). While down,
//! calls fail at once without touching Redis (CONNECT gets CONNACK 3, QoS 1 is not
//! acknowledged), and one task pings Redis with backoff until it answers (logged once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use tokio::sync::{mpsc, oneshot, Notify};

use super::resp::{self, Replies, Reply};
use super::{now_ms, Attach, Enqueued, Entry, Limits, Message, RouteHint, StoreError};
use crate::codec::Qos;
use crate::config::OverflowPolicy;
use crate::metrics;

/// Enqueues a batch of messages, in order: KEYS are the outbox, seq and byte-count keys of
/// each message (and, in a cluster, its route key: stride 4), ARGV the cap, the drop-new
/// flag, the TTL in ms (0: none), the stride, the byte cap and each message's envelope.
/// Returns the seq (0: rejected, outbox full) and dropped count of each message, or -1 and
/// the error of a message whose commands failed (the others are stored all the same, as one
/// script per message would have); with stride 4 also the route's node and incarnation (nil
/// without a route), read after the store, so that the node that stored the message knows
/// where to forward it without another round trip. The TTL of each outbox that took a
/// message is refreshed once: the script runs at one instant, so once is the same as per
/// message.
///
/// The byte count (`herald:qbytes:{cid}`, envelope bytes) is raised by every enqueue and
/// lowered by no ack (acks are a pipelined range delete that does not know sizes): it is
/// an upper bound, made exact by counting the outbox's members only when it says the
/// budget would be exceeded, and reset when the outbox is found empty. A device that keeps
/// up never pays for a count.
///
/// Keys of many clients in one call: fine on one Redis (plain or behind Sentinel). Redis
/// Cluster would need one call per hash slot (group the batch by `{client}` slot).
const ENQUEUE: &str = r#"
local cap = tonumber(ARGV[1])
local drop_new = ARGV[2] == '1'
local ttl = ARGV[3]
local stride = tonumber(ARGV[4])
local bcap = tonumber(ARGV[5])
local function size_of(member)
  return #member - string.find(member, '|', 1, true)
end
local function one(box, counter, qbytes, envelope)
  local size = #envelope
  local n = redis.call('ZCARD', box)
  local b = size
  if n == 0 then
    redis.call('SET', qbytes, size)
  else
    b = redis.call('INCRBY', qbytes, size)
    if b > bcap then
      b = size
      for _, m in ipairs(redis.call('ZRANGE', box, 0, -1)) do b = b + size_of(m) end
      redis.call('SET', qbytes, b)
    end
  end
  local dropped = 0
  if n >= cap or (n > 0 and b > bcap) then
    if drop_new then
      redis.call('SET', qbytes, b - size)
      return 0, 0
    end
    while n > 0 and (n >= cap or b > bcap) do
      local m = redis.call('ZPOPMIN', box)
      b = b - size_of(m[1])
      n = n - 1
      dropped = dropped + 1
    end
    redis.call('SET', qbytes, b)
  end
  local seq = redis.call('INCR', counter)
  -- One number-to-string conversion, used for the score and the member.
  local s = tostring(seq)
  redis.call('ZADD', box, s, s .. '|' .. envelope)
  return seq, dropped
end
local per = stride == 4 and 4 or 2
local out = {}
local refresh = {}
for i = 1, #ARGV - 5 do
  local k = stride * (i - 1)
  local o = per * (i - 1)
  local box = KEYS[k + 1]
  local ok, seq, dropped = pcall(one, box, KEYS[k + 2], KEYS[k + 3], ARGV[i + 5])
  if ok then
    out[o + 1] = seq
    out[o + 2] = dropped
    if seq ~= 0 then refresh[box] = KEYS[k + 3] end
  else
    out[o + 1] = -1
    out[o + 2] = type(seq) == 'table' and seq.err or tostring(seq)
  end
  if per == 4 then
    local route = redis.call('HMGET', KEYS[k + 4], 'node', 'inc')
    out[o + 3] = route[1]
    out[o + 4] = route[2]
  end
end
if ttl ~= '0' then
  for box, qbytes in pairs(refresh) do
    redis.call('PEXPIRE', box, ttl)
    redis.call('PEXPIRE', qbytes, ttl)
  end
end
return out
"#;

const ATTACH: &str = r#"
local present = redis.call('EXISTS', KEYS[3])
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  present = 0
else
  redis.call('SET', KEYS[3], '1')
end
local sent = tonumber(redis.call('GET', KEYS[2]) or '0')
return {present, sent}
"#;

/// Upper bound on any one Redis call, so that a stalled Redis never hangs a client.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The answer to an ordered write: for an enqueue (sequence number or 0, dropped entries).
type OrderedReply = oneshot::Sender<Result<Applied, StoreError>>;

/// What Redis answered for one ordered write.
#[derive(Debug, Default, Clone)]
struct Applied {
    /// The enqueue's sequence number (0: rejected), and entries dropped for room.
    seq: u64,
    dropped: u64,
    /// The client's route after the store (cluster only).
    route: Option<RouteHint>,
}

/// A write whose order matters (enqueue, retained): submitted synchronously, so the order of
/// calls is the order Redis applies them in, whatever order their futures are polled in.
/// Encoded by the writer task, straight into its pipeline buffer.
enum Ordered {
    Enqueue {
        client: Arc<str>,
        qos: Qos,
        msg: Arc<Message>,
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
    fn reply(self) -> OrderedReply {
        match self {
            Ordered::Enqueue { reply, .. } | Ordered::Retained { reply, .. } => reply,
        }
    }
}

/// What every enqueue passes to the script besides the message.
struct EnqueueArgs {
    sha: String,
    cap: u64,
    byte_cap: u64,
    drop_new: bool,
    ttl_ms: u64,
    /// Read each receiver's route with its enqueue (a cluster node).
    routes: bool,
}

/// Ordered writes waiting for the next pipeline; beyond this, publishes are refused (counted).
const MAX_QUEUED_WRITES: usize = 65_536;

enum Write {
    Ack(Arc<str>, u64),
    Sent(Arc<str>, u64),
    /// Answered once every write queued before it is applied (or given up).
    Barrier(oneshot::Sender<()>),
}

struct Health {
    up: AtomicBool,
    wake: Notify,
}

pub struct RedisOutbox {
    link: Arc<Link>,
    scripts: Arc<Scripts>,
    health: Arc<Health>,
    writes: mpsc::Sender<Write>,
    ordered: mpsc::Sender<Ordered>,
}

/// `herald:<kind>:{<client>}`. Built by hand: this runs several times per message, and
/// `format!` costs more than the rest of building the command.
pub fn key(kind: &str, client: &str) -> String {
    let mut k = String::with_capacity(10 + kind.len() + client.len());
    k.push_str("herald:");
    k.push_str(kind);
    k.push_str(":{");
    k.push_str(client);
    k.push('}');
    k
}

fn envelope_len(msg: &Message) -> usize {
    13 + msg.topic.len() + msg.payload.len()
}

fn put_envelope(b: &mut impl BufMut, msg: &Message, qos: Qos) {
    b.put_u8(1); // envelope version
    b.put_u8(qos as u8);
    b.put_u8(msg.retain as u8);
    b.put_u64(msg.expires_at);
    b.put_u16(msg.topic.len() as u16);
    b.put_slice(msg.topic.as_bytes());
    b.put_slice(&msg.payload);
}

fn encode(msg: &Message, qos: Qos) -> Vec<u8> {
    let mut b = Vec::with_capacity(envelope_len(msg));
    put_envelope(&mut b, msg, qos);
    b
}

fn decode(raw: &[u8]) -> Option<Message> {
    if raw.len() < 13 || raw[0] != 1 {
        return None;
    }
    let qos = match raw[1] {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        2 => Qos::ExactlyOnce,
        _ => return None,
    };
    let expires_at = u64::from_be_bytes(raw[3..11].try_into().ok()?);
    let tlen = u16::from_be_bytes(raw[11..13].try_into().ok()?) as usize;
    let topic = std::str::from_utf8(raw.get(13..13 + tlen)?).ok()?;
    Some(Message {
        topic: Arc::from(topic),
        payload: Bytes::copy_from_slice(&raw[13 + tlen..]),
        qos,
        retain: raw[2] != 0,
        expires_at,
    })
}

/// `<seq>|<envelope>` as stored in the ZSET.
fn decode_member(raw: &[u8]) -> Option<(u64, Message)> {
    let bar = raw.iter().position(|&b| b == b'|')?;
    let seq = std::str::from_utf8(&raw[..bar]).ok()?.parse().ok()?;
    Some((seq, decode(&raw[bar + 1..])?))
}

fn qos_from(n: u8) -> Qos {
    match n {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        _ => Qos::ExactlyOnce,
    }
}

/// The Lua scripts, loaded into Redis whenever a connection (re)starts. Called by hash only
/// (EVALSHA): a script missing after a Redis restart fails the call instead of being loaded
/// and retried on the side, which could let a later enqueue overtake an earlier one.
struct Scripts {
    enqueue: Script,
    attach: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            enqueue: Script::new(ENQUEUE),
            attach: Script::new(ATTACH),
        }
    }

    async fn load(&self, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
        self.enqueue.load_async(conn).await?;
        self.attach.load_async(conn).await?;
        Ok(())
    }
}

fn evalsha(script: &Script, keys: &[String]) -> redis::Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(script.get_hash()).arg(keys.len()).arg(keys);
    c
}

impl RedisOutbox {
    /// Connects to `url` (fails at start if Redis cannot be reached: a misconfigured URL
    /// should stop the broker, not leave it refusing every client).
    pub async fn connect(
        url: &str,
        ca: Option<&std::path::Path>,
        limits: Limits,
        ttl: Duration,
        wait_replicas: u32,
        routes: bool,
    ) -> Result<RedisOutbox, StoreError> {
        let shown = redacted_url(url);
        let unavailable =
            |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("{shown}: {e}"));
        let link = Arc::new(Link::open(url, ca).await.map_err(|e| unavailable(&e))?);
        let scripts = Arc::new(Scripts::new());
        scripts
            .load(&mut link.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let health = Arc::new(Health {
            up: AtomicBool::new(true),
            wake: Notify::new(),
        });
        let (tx, rx) = mpsc::channel(MAX_QUEUED_WRITES);
        tokio::spawn(write_loop(Hot::new(&link), rx, health.clone()));
        let (ordered, orx) = mpsc::channel(MAX_QUEUED_WRITES);
        let args = EnqueueArgs {
            sha: scripts.enqueue.get_hash().to_string(),
            cap: limits.max_queued as u64,
            byte_cap: limits.max_queued_bytes as u64,
            drop_new: limits.overflow == OverflowPolicy::DropNew,
            ttl_ms: ttl.as_millis() as u64,
            routes,
        };
        tokio::spawn(ordered_loop(
            Hot::new(&link),
            orx,
            health.clone(),
            args,
            wait_replicas,
        ));
        tokio::spawn(health_loop(link.clone(), health.clone(), scripts.clone()));
        Ok(RedisOutbox {
            link,
            scripts,
            health,
            writes: tx,
            ordered,
        })
    }

    /// Checks a `store.redis_url` without connecting.
    pub fn validate_url(url: &str) -> Result<(), String> {
        let r = match url.strip_prefix("redis+sentinel://") {
            Some(rest) => sentinel_client(rest).map(|_| ()),
            None => redis::Client::open(url).map(|_| ()),
        };
        r.map_err(|e| format!("{}: {e}", redacted_url(url)))
    }

    fn check_up(&self) -> Result<(), StoreError> {
        if self.health.up.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(StoreError::Unavailable("redis is down".into()))
        }
    }

    fn failed(&self, e: redis::RedisError) -> StoreError {
        failed(&self.health, e)
    }

    /// Runs one call under the call timeout, marking the store down on I/O trouble.
    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.check_up()?;
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => {
                mark_down(&self.health, "timed out");
                Err(StoreError::Unavailable("redis call timed out".into()))
            }
        }
    }

    /// Queues a write behind every write submitted before it; `make` gets the reply sender.
    fn submit(
        &self,
        make: impl FnOnce(OrderedReply) -> Ordered,
    ) -> oneshot::Receiver<Result<Applied, StoreError>> {
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.check_up() {
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

    pub(super) fn enqueue(
        &self,
        client: &Arc<str>,
        qos: Qos,
        msg: &Arc<Message>,
    ) -> impl std::future::Future<Output = Result<Enqueued, StoreError>> + Send + 'static {
        let routed = self.enqueue_routed(client, qos, msg);
        async move { routed.await.map(|(e, _)| e) }
    }

    /// `enqueue`, with the client's route as it was right after the store (a cluster node;
    /// `None` elsewhere or without a route).
    pub(super) fn enqueue_routed(
        &self,
        client: &Arc<str>,
        qos: Qos,
        msg: &Arc<Message>,
    ) -> impl std::future::Future<Output = Result<(Enqueued, Option<RouteHint>), StoreError>>
           + Send
           + 'static {
        let reply = self.submit(|reply| Ordered::Enqueue {
            client: client.clone(),
            qos,
            msg: msg.clone(),
            reply,
        });
        async move {
            let Applied {
                seq,
                dropped,
                route,
            } = reply
                .await
                .map_err(|_| StoreError::Unavailable("store writer stopped".into()))??;
            for _ in 0..dropped {
                metrics::dropped(metrics::Drop::OutboxFullOldest);
            }
            if seq == 0 {
                metrics::dropped(metrics::Drop::OutboxFullNew);
                return Ok((Enqueued::Rejected, None));
            }
            metrics::stored();
            Ok((Enqueued::Stored(seq), route))
        }
    }

    pub(super) async fn fetch(
        &self,
        client: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut conn = self.link.conn();
        let outbox = key("outbox", client);
        let raw: Vec<Vec<u8>> = self
            .call(conn.zrangebyscore_limit(&outbox, from, "+inf", 0, limit as isize))
            .await?;
        let now = now_ms();
        let mut out = Vec::with_capacity(raw.len());
        let mut expired = Vec::new();
        for member in &raw {
            match decode_member(member) {
                Some((seq, msg)) if msg.is_expired(now) => expired.push(seq),
                Some((seq, msg)) => out.push(Entry {
                    seq,
                    qos: msg.qos,
                    msg: Arc::new(msg),
                }),
                None => {
                    // Not ours or corrupt: skipping it keeps the device's stream moving.
                    tracing::warn!(client, "undecodable outbox entry skipped");
                }
            }
        }
        for seq in expired {
            metrics::dropped(metrics::Drop::Expired);
            self.ack(&Arc::from(client), seq).await;
        }
        Ok(out)
    }

    pub(super) async fn ack(&self, client: &Arc<str>, seq: u64) {
        let _ = self.writes.send(Write::Ack(client.clone(), seq)).await;
    }

    /// Queues the watermark write; the receiver completes once Redis has it (or the write
    /// failed: the message is then sent anyway, DUP being the only thing at stake).
    pub(super) async fn mark_sent(&self, client: &Arc<str>, seq: u64) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        let _ = self.writes.send(Write::Sent(client.clone(), seq)).await;
        let _ = self.writes.send(Write::Barrier(done)).await;
        rx
    }

    pub(super) async fn attach(&self, client: &str, clean: bool) -> Result<Attach, StoreError> {
        // Watermarks go over the writer's own connection: wait for the ones queued so far
        // (a connection taken over a moment ago), or this read could miss them and resend
        // without DUP.
        let (done, flushed) = oneshot::channel();
        if self.writes.send(Write::Barrier(done)).await.is_ok() {
            let _ = tokio::time::timeout(CALL_TIMEOUT, flushed).await;
        }
        let mut conn = self.link.conn();
        let keys = [
            key("outbox", client),
            key("sent", client),
            key("session", client),
            key("subs", client),
            key("qbytes", client),
        ];
        let mut cmd = evalsha(&self.scripts.attach, &keys);
        cmd.arg(if clean { "1" } else { "0" });
        let (present, sent): (u8, u64) = self.call(cmd.query_async(&mut conn)).await?;
        if clean {
            self.unindex(client).await?;
        }
        Ok(Attach {
            sent_watermark: sent,
            session_present: present == 1,
        })
    }

    async fn unindex(&self, client: &str) -> Result<(), StoreError> {
        let mut conn = self.link.conn();
        self.call(conn.srem::<_, _, ()>("herald:subscribers", client))
            .await
    }

    pub(super) async fn clear(&self, client: &str) -> Result<(), StoreError> {
        let mut conn = self.link.conn();
        let keys = [
            key("outbox", client),
            key("sent", client),
            key("qbytes", client),
            key("session", client),
            key("subs", client),
        ];
        self.call(conn.del::<_, ()>(&keys)).await?;
        self.unindex(client).await
    }

    pub(super) async fn len(&self, client: &str) -> Result<usize, StoreError> {
        let mut conn = self.link.conn();
        self.call(conn.zcard(key("outbox", client))).await
    }

    pub(super) async fn save_subscription(
        &self,
        client: &str,
        filter: &str,
        qos: Qos,
    ) -> Result<(), StoreError> {
        let mut conn = self.link.conn();
        let mut p = redis::pipe();
        p.hset(key("subs", client), filter, qos as u8)
            .ignore()
            .sadd("herald:subscribers", client)
            .ignore();
        self.call(p.query_async::<()>(&mut conn)).await
    }

    pub(super) async fn remove_subscription(
        &self,
        client: &str,
        filter: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.link.conn();
        self.call(conn.hdel::<_, _, ()>(key("subs", client), filter))
            .await
    }

    pub(super) async fn load_subscriptions(
        &self,
    ) -> Result<Vec<(String, String, Qos)>, StoreError> {
        let mut conn = self.link.conn();
        let clients: Vec<String> = self.call(conn.smembers("herald:subscribers")).await?;
        let mut out = Vec::new();
        for chunk in clients.chunks(500) {
            let mut p = redis::pipe();
            for c in chunk {
                p.hgetall(key("subs", c));
            }
            let maps: Vec<HashMap<String, u8>> = self.call(p.query_async(&mut conn)).await?;
            for (c, subs) in chunk.iter().zip(maps) {
                for (filter, qos) in subs {
                    out.push((c.clone(), filter, qos_from(qos)));
                }
            }
        }
        Ok(out)
    }

    pub(super) fn set_retained(
        &self,
        msg: &Message,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let envelope = (!msg.payload.is_empty()).then(|| encode(msg, msg.qos));
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

    /// Subscriptions stored for one persistent session (a cluster node loads them when the
    /// client connects to it).
    pub(super) async fn client_subscriptions(
        &self,
        client: &str,
    ) -> Result<Vec<(String, Qos)>, StoreError> {
        let mut conn = self.link.conn();
        let subs: HashMap<String, u8> = self.call(conn.hgetall(key("subs", client))).await?;
        Ok(subs.into_iter().map(|(f, q)| (f, qos_from(q))).collect())
    }

    /// Runs a command for another part of Herald (the cluster's route table and node
    /// registry) with the outbox's connection, health tracking and timeout.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.link.conn();
        self.call(cmd.query_async(&mut conn)).await
    }

    pub async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        p: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.link.conn();
        self.call(p.query_async(&mut conn)).await
    }

    /// Runs a Lua script (loaded on first use and after a Redis restart).
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.link.conn();
        self.call(call.invoke_async(&mut conn)).await
    }

    pub fn is_up(&self) -> bool {
        self.health.up.load(Ordering::Acquire)
    }

    pub(super) async fn load_retained(&self) -> Result<Vec<Message>, StoreError> {
        let mut conn = self.link.conn();
        let all: HashMap<String, Vec<u8>> = self.call(conn.hgetall("herald:retained")).await?;
        Ok(all.values().filter_map(|v| decode(v)).collect())
    }
}

/// Where the Redis connection comes from: one address, or the current master of a Sentinel
/// set (`redis+sentinel://host:port[,host:port...]/service[/db]`), looked up again after
/// every outage so that a failover is followed.
struct Link {
    sentinel: Option<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
    /// For the hot path's own connections to a `rediss://` server.
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    current: parking_lot::RwLock<Current>,
    /// Bumped when the store comes back after an outage: the hot-path connections (`Hot`)
    /// are made again then, to whatever server `current` names.
    epoch: AtomicU64,
}

/// The server in use: a connection manager for the cold commands, and its address and
/// settings for the hot path's own connections.
struct Current {
    manager: ConnectionManager,
    info: redis::ConnectionInfo,
}

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(CALL_TIMEOUT))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
}

async fn current(client: redis::Client) -> redis::RedisResult<Current> {
    let info = client.get_connection_info().clone();
    let manager = match tokio::time::timeout(
        CALL_TIMEOUT,
        ConnectionManager::new_with_config(client, manager_config()),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => {
            return Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )))
        }
    };
    Ok(Current { manager, info })
}

impl Link {
    async fn open(url: &str, ca: Option<&std::path::Path>) -> redis::RedisResult<Link> {
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            let (client, tls) = if url.starts_with("rediss://") {
                redis_tls(url, ca)?
            } else {
                (redis::Client::open(url)?, None)
            };
            let current = current(client).await?;
            return Ok(Link {
                sentinel: None,
                tls,
                current: parking_lot::RwLock::new(current),
                epoch: AtomicU64::new(0),
            });
        };
        let mut sentinel = sentinel_client(rest)?;
        let current = current(sentinel.async_get_client().await?).await?;
        Ok(Link {
            sentinel: Some(tokio::sync::Mutex::new(sentinel)),
            tls: None,
            current: parking_lot::RwLock::new(current),
            epoch: AtomicU64::new(0),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.current.read().manager.clone()
    }

    fn info(&self) -> redis::ConnectionInfo {
        self.current.read().info.clone()
    }

    /// After an outage: with Sentinel, connect to whoever is master now. A plain URL's
    /// connection manager reconnects by itself.
    async fn refresh(&self) -> redis::RedisResult<()> {
        if let Some(sentinel) = &self.sentinel {
            let client = sentinel.lock().await.async_get_client().await?;
            let fresh = current(client).await?;
            *self.current.write() = fresh;
        }
        Ok(())
    }
}

/// A hot-path connection of one writer task: made on first use, dropped after any failure,
/// and made again after an outage (the server may have restarted or changed).
struct Hot {
    link: Arc<Link>,
    conn: Option<resp::Conn>,
    epoch: u64,
}

impl Hot {
    fn new(link: &Arc<Link>) -> Hot {
        Hot {
            link: link.clone(),
            conn: None,
            epoch: 0,
        }
    }

    /// One pipeline of `replies` commands, under the call timeout. Any failure drops the
    /// connection and marks the store down.
    async fn round_trip(
        &mut self,
        out: &[u8],
        replies: usize,
        health: &Health,
    ) -> Result<&[u8], StoreError> {
        let Hot { link, conn, epoch } = self;
        let attempt = async {
            let now = link.epoch.load(Ordering::Acquire);
            let c = match conn {
                Some(c) if *epoch == now => c,
                _ => {
                    *conn = None;
                    let fresh = resp::Conn::connect(&link.info(), link.tls.as_ref()).await?;
                    *epoch = now;
                    conn.insert(fresh)
                }
            };
            c.round_trip(out, replies).await
        };
        let why = match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("redis call timed out".to_string()),
        };
        match why {
            None => match conn {
                Some(c) => Ok(c.replies()),
                None => Err(StoreError::Unavailable("redis connection lost".into())),
            },
            Some(why) => {
                *conn = None;
                mark_down(health, &why);
                metrics::store_error();
                Err(StoreError::Unavailable(why))
            }
        }
    }
}

/// `[:password@]host:port[,host:port...]/service[/db]` after the scheme.
/// A `rediss://` client for the cold commands and the same trust for the hot path: the CA in
/// `store.redis_ca` (managed Redis with a private CA) or the system's roots.
fn redis_tls(
    url: &str,
    ca: Option<&std::path::Path>,
) -> redis::RedisResult<(
    redis::Client,
    Option<Arc<tokio_rustls::rustls::ClientConfig>>,
)> {
    let fail = |e: String| redis::RedisError::from(std::io::Error::other(e));
    let (client, config) = match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| fail(format!("store.redis_ca: {}: {e}", path.display())))?;
            let client = redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )?;
            let config = crate::transport::client_config(path, None)
                .map_err(|e| fail(format!("store.redis_ca: {e}")))?;
            (client, config)
        }
        None => {
            let client = redis::Client::open(url)?;
            let config = system_roots().map_err(fail)?;
            (client, config)
        }
    };
    Ok((client, Some(config)))
}

/// A client config that trusts the system's roots (a managed Redis with a public CA).
fn system_roots() -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use tokio_rustls::rustls;
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err("rediss://: no trusted roots found on this system; set store.redis_ca".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `url` with its password replaced by `***`, for logs and errors.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // Userinfo ends at the last '@' before the path; a password may itself hold '@'.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{shown}{}", &rest[at..])
}

fn sentinel_client(spec: &str) -> redis::RedisResult<redis::sentinel::SentinelClient> {
    use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
    let invalid = |why: &str| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "bad sentinel URL",
            why.to_string(),
        ))
    };
    let (auth, rest) = match spec.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, spec),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or_else(|| invalid("missing /service"))?;
    let mut path = path.split('/');
    let service = path
        .next()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("missing service name"))?;
    let db: i64 = match path.next() {
        Some(d) if !d.is_empty() => d.parse().map_err(|_| invalid("db is not a number"))?,
        _ => 0,
    };
    let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
    let mut redis_info = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(password) = auth.and_then(|a| a.strip_prefix(':').or(Some(a))) {
        if !password.is_empty() {
            redis_info = redis_info.set_password(password);
        }
    }
    let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis_info);
    SentinelClient::build(sentinels, service, Some(node), SentinelServerType::Master)
}

fn failed(health: &Health, e: redis::RedisError) -> StoreError {
    // A missing script (Redis restarted) or a read-only server (a demoted master after a
    // Sentinel failover) is fixed the same way as a lost connection: reconnect and reload.
    let server_gone = matches!(
        e.kind(),
        redis::ErrorKind::Server(
            redis::ServerErrorKind::NoScript | redis::ServerErrorKind::ReadOnly
        )
    );
    if server_gone
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
    {
        mark_down(health, &e.to_string());
    }
    metrics::store_error();
    StoreError::Unavailable(e.to_string())
}

/// An error reply on the hot path, with the same rules as `failed`.
fn error_reply(health: &Health, e: &[u8]) -> StoreError {
    let why = String::from_utf8_lossy(e).into_owned();
    if e.starts_with(b"NOSCRIPT") || e.starts_with(b"READONLY") {
        mark_down(health, &why);
    }
    metrics::store_error();
    StoreError::Unavailable(why)
}

/// Redis answered out of step with what was asked: nothing on that connection can be
/// trusted any more.
fn out_of_step(health: &Health, hot: &mut Hot, e: resp::Error) -> StoreError {
    hot.conn = None;
    let why = e.to_string();
    mark_down(health, &why);
    metrics::store_error();
    StoreError::Unavailable(why)
}

fn mark_down(health: &Health, why: &str) {
    if health.up.swap(false, Ordering::AcqRel) {
        tracing::error!(
            error = why,
            "redis unavailable: refusing new connections, holding QoS 1 acks"
        );
        health.wake.notify_one();
    }
}

/// While the store is down, tries Redis with backoff until it answers and has the scripts.
async fn health_loop(link: Arc<Link>, health: Arc<Health>, scripts: Arc<Scripts>) {
    loop {
        health.wake.notified().await;
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = async {
                link.refresh().await?;
                scripts.load(&mut link.conn()).await
            };
            let ready = tokio::time::timeout(CALL_TIMEOUT, attempt).await;
            if matches!(ready, Ok(Ok(()))) {
                link.epoch.fetch_add(1, Ordering::AcqRel);
                health.up.store(true, Ordering::Release);
                tracing::warn!("redis available again");
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

/// Appends the enqueue script for `run` (all `Ordered::Enqueue`) to the pipeline in `out`.
fn encode_enqueues(out: &mut BytesMut, run: &[Ordered], args: &EnqueueArgs) {
    let stride = if args.routes { 4 } else { 3 };
    resp::array(out, 8 + (stride + 1) * run.len());
    resp::bulk(out, b"EVALSHA");
    resp::bulk(out, args.sha.as_bytes());
    resp::bulk_u64(out, (stride * run.len()) as u64);
    for o in run {
        if let Ordered::Enqueue { client, .. } = o {
            resp::bulk_key(out, "outbox", client);
            resp::bulk_key(out, "seq", client);
            resp::bulk_key(out, "qbytes", client);
            if args.routes {
                resp::bulk_key(out, "route", client);
            }
        }
    }
    resp::bulk_u64(out, args.cap);
    resp::bulk(out, if args.drop_new { b"1" } else { b"0" });
    resp::bulk_u64(out, args.ttl_ms);
    resp::bulk_u64(out, stride as u64);
    resp::bulk_u64(out, args.byte_cap);
    for o in run {
        if let Ordered::Enqueue { qos, msg, .. } = o {
            resp::bulk_header(out, envelope_len(msg));
            put_envelope(out, msg, *qos);
            resp::end(out);
        }
    }
}

/// Appends a retained write (HSET, or HDEL without an envelope) to the pipeline in `out`.
fn encode_retained(out: &mut BytesMut, topic: &str, envelope: Option<&[u8]>) {
    resp::array(out, if envelope.is_some() { 4 } else { 3 });
    resp::bulk(out, if envelope.is_some() { b"HSET" } else { b"HDEL" });
    resp::bulk(out, b"herald:retained");
    resp::bulk(out, topic.as_bytes());
    if let Some(e) = envelope {
        resp::bulk(out, e);
    }
}

/// Reads the enqueue script's reply for a run of `n` messages into `results`. An error
/// reply fails the whole run; anything else unexpected means the stream is out of step.
fn enqueue_replies(
    r: &mut Replies<'_>,
    n: usize,
    routes: bool,
    health: &Health,
    results: &mut Vec<Result<Applied, StoreError>>,
) -> Result<(), resp::Error> {
    let per = if routes { 4 } else { 2 };
    match r.next()? {
        Reply::Array(Some(len)) if len == per * n => {}
        Reply::Error(e) => {
            let e = error_reply(health, e);
            results.extend(std::iter::repeat_n(Err(e), n));
            return Ok(());
        }
        other => {
            return Err(resp::Error::Protocol(format!(
                "unexpected enqueue reply {other:?}"
            )))
        }
    }
    for _ in 0..n {
        let mut applied = match (r.next()?, r.next()?) {
            (Reply::Int(seq), Reply::Int(dropped)) if seq >= 0 && dropped >= 0 => Ok(Applied {
                seq: seq as u64,
                dropped: dropped as u64,
                route: None,
            }),
            (Reply::Int(-1), Reply::Bulk(Some(e))) => Err(error_reply(health, e)),
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
        Reply::Error(e) => Err(error_reply(health, e)),
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
async fn ordered_loop(
    mut hot: Hot,
    mut rx: mpsc::Receiver<Ordered>,
    health: Arc<Health>,
    args: EnqueueArgs,
    wait_replicas: u32,
) {
    let mut batch = Vec::with_capacity(512);
    let mut results = Vec::with_capacity(512);
    // The batch in pipeline order: a run of this many enqueues (one script call), or 0 for
    // a retained write.
    let mut parts = Vec::with_capacity(16);
    let mut out = BytesMut::with_capacity(64 * 1024);
    while rx.recv_many(&mut batch, 512).await > 0 {
        if !health.up.load(Ordering::Acquire) {
            // Submitted just before the store went down: fail at once, like new calls.
            for o in batch.drain(..) {
                let _ = o
                    .reply()
                    .send(Err(StoreError::Unavailable("redis is down".into())));
            }
            continue;
        }
        out.clear();
        parts.clear();
        let mut i = 0;
        while i < batch.len() {
            if let Ordered::Retained {
                topic, envelope, ..
            } = &batch[i]
            {
                encode_retained(&mut out, topic, envelope.as_deref());
                parts.push(0);
                i += 1;
                continue;
            }
            // Retained writes split runs, so that the pipeline keeps submission order.
            let run = batch[i..]
                .iter()
                .take_while(|o| matches!(o, Ordered::Enqueue { .. }))
                .count();
            encode_enqueues(&mut out, &batch[i..i + run], &args);
            parts.push(run);
            i += run;
        }
        let mut replies = parts.len();
        if wait_replicas > 0 {
            resp::array(&mut out, 3);
            resp::bulk(&mut out, b"WAIT");
            resp::bulk_u64(&mut out, wait_replicas as u64);
            resp::bulk_u64(&mut out, CALL_TIMEOUT.as_millis() as u64 / 2);
            replies += 1;
        }
        results.clear();
        let outcome = match hot.round_trip(&out, replies, &health).await {
            Ok(buf) => {
                let mut r = Replies::new(buf);
                let parsed = (|| {
                    for &n in &parts {
                        if n == 0 {
                            results.push(retained_reply(&mut r, &health)?);
                        } else {
                            enqueue_replies(&mut r, n, args.routes, &health, &mut results)?;
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
                    Err(e) => Err(out_of_step(&health, &mut hot, e)),
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
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

/// Writes acks and sent watermarks in pipelines: one round trip for everything queued.
async fn write_loop(mut hot: Hot, mut rx: mpsc::Receiver<Write>, health: Arc<Health>) {
    let mut batch = Vec::with_capacity(1024);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let (mut acks, mut sent, mut barriers) = (Vec::new(), Vec::new(), Vec::new());
    while rx.recv_many(&mut batch, 1024).await > 0 {
        for w in batch.drain(..) {
            match w {
                Write::Ack(c, seq) => acks.push(Keyed::new(c, seq)),
                Write::Sent(c, seq) => sent.push(Keyed::new(c, seq)),
                Write::Barrier(b) => barriers.push(b),
            }
        }
        if health.up.load(Ordering::Acquire) {
            apply(&mut hot, &mut out, &mut acks, &mut sent, &health).await;
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

/// Writes one batch of acks and watermarks. On failure the store is marked down.
async fn apply(
    hot: &mut Hot,
    out: &mut BytesMut,
    acks: &mut [Keyed],
    sent: &mut [Keyed],
    health: &Health,
) {
    out.clear();
    let mut commands = 0;
    // A device acknowledges in order, so one client's acks in a batch are mostly a run of
    // consecutive numbers: one ZREMRANGEBYSCORE per run.
    acks.sort_unstable_by(Keyed::order);
    let mut i = 0;
    while i < acks.len() {
        let run = &acks[i];
        let mut last = run.seq;
        let mut j = i + 1;
        while j < acks.len() && acks[j].seq == last + 1 && acks[j].same_client(run) {
            last += 1;
            j += 1;
        }
        resp::array(out, 4);
        resp::bulk(out, b"ZREMRANGEBYSCORE");
        resp::bulk_key(out, "outbox", &run.client);
        resp::bulk_u64(out, run.seq);
        resp::bulk_u64(out, last);
        commands += 1;
        i = j;
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
                resp::bulk_key(out, "sent", &here.client);
                resp::bulk_u64(out, seq);
                commands += 1;
            }
        }
    }
    if commands == 0 {
        return;
    }
    let Ok(buf) = hot.round_trip(out, commands, health).await else {
        return;
    };
    let mut r = Replies::new(buf);
    let checked = (|| {
        for _ in 0..commands {
            match r.next()? {
                Reply::Error(e) => {
                    let _ = error_reply(health, e);
                }
                other => r.skip(other)?,
            }
        }
        Ok(())
    })();
    if let Err(e) = checked {
        let _ = out_of_step(health, hot, e);
    }
}

#[cfg(test)]
mod url_tests {
    use super::redacted_url;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redacted_url("redis://:pw@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(
            redacted_url("rediss://u:p@ss@h:1/2"),
            "rediss://u:***@h:1/2"
        );
        assert_eq!(redacted_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(
            redacted_url("redis+sentinel://:pw@a:1,b:2/m/0"),
            "redis+sentinel://:***@a:1,b:2/m/0"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_roundtrip() {
        let m = Message {
            topic: "push/d|1".into(),
            payload: Bytes::from_static(b"a|b\0c"),
            qos: Qos::ExactlyOnce,
            retain: true,
            expires_at: 12345,
        };
        let mut member = b"42|".to_vec();
        member.extend(encode(&m, m.qos));
        let (seq, back) = decode_member(&member).unwrap();
        assert_eq!(seq, 42);
        assert_eq!(back, m);
        assert!(decode(b"\x02garbage-----").is_none());
        assert!(decode(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]).is_none());
    }

    /// A private redis-server (no persistence) on a free loopback port, killed on drop.
    struct TestRedis {
        child: std::process::Child,
        port: u16,
    }

    impl TestRedis {
        fn start() -> TestRedis {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap();
            let child = std::process::Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server in PATH");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(std::time::Instant::now() < deadline, "redis-server not up");
                std::thread::sleep(Duration::from_millis(10));
            }
            TestRedis { child, port }
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }

        /// A plain connection, to set up or inspect keys behind the store's back.
        async fn conn(&self) -> redis::aio::MultiplexedConnection {
            redis::Client::open(self.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn msg(payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: "push/x".into(),
            payload: Bytes::from_static(payload),
            qos: Qos::AtLeastOnce,
            retain: false,
            expires_at: 0,
        })
    }

    async fn outbox(redis: &TestRedis, overflow: OverflowPolicy) -> RedisOutbox {
        outbox_with(redis, overflow, false).await
    }

    async fn outbox_with(redis: &TestRedis, overflow: OverflowPolicy, routes: bool) -> RedisOutbox {
        let limits = Limits {
            max_queued: 2,
            max_queued_bytes: 1 << 20,
            overflow,
            max_total: 0,
            max_total_bytes: 0,
        };
        outbox_limits(redis, limits, routes).await
    }

    async fn outbox_limits(redis: &TestRedis, limits: Limits, routes: bool) -> RedisOutbox {
        RedisOutbox::connect(
            &redis.url(),
            None,
            limits,
            Duration::from_secs(60),
            0,
            routes,
        )
        .await
        .unwrap()
    }

    /// A cluster node reads each receiver's route with its enqueue: present, absent, and a
    /// failing client in the same script call.
    #[tokio::test]
    async fn routed_enqueue_returns_the_route_read_after_the_store() {
        let redis = TestRedis::start();
        let store = outbox_with(&redis, OverflowPolicy::DropOldest, true).await;
        let mut raw = redis.conn().await;
        let _: () = raw
            .hset_multiple(
                "herald:route:{a}",
                &[("node", "n1"), ("inc", "42"), ("epoch", "3")],
            )
            .await
            .unwrap();
        let _: () = raw.set("herald:outbox:{bad}", "x").await.unwrap();
        let (a, b, bad): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "bad".into());
        let calls = [
            store.enqueue_routed(&a, Qos::AtLeastOnce, &msg(b"1")),
            store.enqueue_routed(&bad, Qos::AtLeastOnce, &msg(b"x")),
            store.enqueue_routed(&b, Qos::AtLeastOnce, &msg(b"2")),
        ];
        let mut results = Vec::new();
        for c in calls {
            results.push(c.await);
        }
        let hint = RouteHint {
            node: "n1".into(),
            inc: 42,
        };
        assert_eq!(
            results[0].as_ref().unwrap(),
            &(Enqueued::Stored(1), Some(hint))
        );
        assert!(results[1].is_err(), "{:?}", results[1]);
        assert_eq!(results[2].as_ref().unwrap(), &(Enqueued::Stored(1), None));
    }

    /// Enqueues submitted together share one script call: a failing client (a key of the
    /// wrong type) fails alone, the cap applies message by message, and each outbox gets
    /// its TTL.
    #[tokio::test]
    async fn one_batch_keeps_per_message_semantics() {
        let redis = TestRedis::start();
        let store = outbox(&redis, OverflowPolicy::DropOldest).await;
        let mut raw = redis.conn().await;
        let _: () = raw.set("herald:outbox:{bad}", "x").await.unwrap();
        let (a, bad): (Arc<str>, Arc<str>) = ("a".into(), "bad".into());
        // Submitted before any is awaited: one pipeline, one script call.
        let calls = [
            store.enqueue(&a, Qos::AtLeastOnce, &msg(b"1")),
            store.enqueue(&bad, Qos::AtLeastOnce, &msg(b"x")),
            store.enqueue(&a, Qos::AtLeastOnce, &msg(b"2")),
            store.enqueue(&a, Qos::AtLeastOnce, &msg(b"3")),
        ];
        let mut results = Vec::new();
        for c in calls {
            results.push(c.await);
        }
        assert!(matches!(results[0], Ok(Enqueued::Stored(1))));
        assert!(results[1].is_err(), "{:?}", results[1]);
        assert!(matches!(results[2], Ok(Enqueued::Stored(2))));
        assert!(matches!(results[3], Ok(Enqueued::Stored(3))));
        // Cap 2, drop oldest: 1 went.
        let left: Vec<u64> = store
            .fetch("a", 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, [2, 3]);
        let ttl: i64 = raw.pttl("herald:outbox:{a}").await.unwrap();
        assert!(ttl > 50_000, "outbox TTL {ttl}");
        // An error reply of one command is not an outage.
        assert!(store.check_up().is_ok());
        assert!(matches!(
            store.enqueue(&a, Qos::AtLeastOnce, &msg(b"4")).await,
            Ok(Enqueued::Stored(4))
        ));
    }

    #[tokio::test]
    async fn drop_new_rejects_without_a_sequence_number() {
        let redis = TestRedis::start();
        let store = outbox(&redis, OverflowPolicy::DropNew).await;
        let a: Arc<str> = "a".into();
        let calls = [
            store.enqueue(&a, Qos::AtLeastOnce, &msg(b"1")),
            store.enqueue(&a, Qos::AtLeastOnce, &msg(b"2")),
            store.enqueue(&a, Qos::AtLeastOnce, &msg(b"3")),
        ];
        let mut results = Vec::new();
        for c in calls {
            results.push(c.await.unwrap());
        }
        assert_eq!(
            results,
            [Enqueued::Stored(1), Enqueued::Stored(2), Enqueued::Rejected]
        );
        store.ack(&a, 1).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.len("a").await.unwrap() != 1 {
            assert!(std::time::Instant::now() < deadline, "ack not applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            store
                .enqueue(&a, Qos::AtLeastOnce, &msg(b"4"))
                .await
                .unwrap(),
            Enqueued::Stored(3)
        );
    }

    async fn seqs(store: &RedisOutbox, client: &str) -> Vec<u64> {
        let entries = store.fetch(client, 0, 100).await.unwrap();
        entries.iter().map(|e| e.seq).collect()
    }

    /// `session.max_queued_bytes` on Redis: the oldest give way (or the newest is refused),
    /// acknowledged entries stop counting once the running count is recounted.
    #[tokio::test]
    async fn byte_budget_per_client() {
        let redis = TestRedis::start();
        let kib: &'static [u8] = &[b'x'; 1000];
        // Each envelope is 13 + 6 (topic) + 1000 bytes: three fit in 3100.
        let limits = |overflow| Limits {
            max_queued: 100,
            max_queued_bytes: 3100,
            overflow,
            max_total: 0,
            max_total_bytes: 0,
        };
        let store = outbox_limits(&redis, limits(OverflowPolicy::DropOldest), false).await;
        let a: Arc<str> = "a".into();
        for _ in 0..5 {
            store
                .enqueue(&a, Qos::AtLeastOnce, &msg(kib))
                .await
                .unwrap();
        }
        assert_eq!(seqs(&store, "a").await, [3, 4, 5]);
        for seq in [3, 4, 5] {
            store.ack(&a, seq).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.len("a").await.unwrap() != 0 {
            assert!(std::time::Instant::now() < deadline, "acks not applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The running count still says 3 KB; the recount finds the outbox empty.
        for _ in 0..3 {
            store
                .enqueue(&a, Qos::AtLeastOnce, &msg(kib))
                .await
                .unwrap();
        }
        assert_eq!(seqs(&store, "a").await, [6, 7, 8]);
        drop(store);

        let redis = TestRedis::start();
        let store = outbox_limits(&redis, limits(OverflowPolicy::DropNew), false).await;
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(
                store
                    .enqueue(&a, Qos::AtLeastOnce, &msg(kib))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(
            got,
            [
                Enqueued::Stored(1),
                Enqueued::Stored(2),
                Enqueued::Stored(3),
                Enqueued::Rejected
            ]
        );
        // A clean session starts from nothing, and leaves no per-client key but the
        // sequence counter.
        let mut raw = redis.conn().await;
        let _: () = raw.set("herald:sent:{a}", 2).await.unwrap();
        store.attach("a", true).await.unwrap();
        let mut left: Vec<String> = raw.keys("herald:*{a}").await.unwrap();
        left.sort();
        assert_eq!(left, ["herald:seq:{a}"]);
    }

    /// The sent watermark covers every number written and not acknowledged.
    #[tokio::test]
    async fn sent_watermark_skips_numbers_acknowledged_with_it() {
        let redis = TestRedis::start();
        let store = outbox(&redis, OverflowPolicy::DropOldest).await;
        let mut raw = redis.conn().await;
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        // Queued before the writer runs: one batch. a: 5 and 7 acknowledged, 6 not; b: all.
        for (c, seq) in [(&a, 5), (&a, 6), (&a, 7), (&b, 9)] {
            store.mark_sent(c, seq).await;
        }
        for (c, seq) in [(&a, 5), (&a, 7), (&b, 9)] {
            store.ack(c, seq).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let sent: Option<u64> = raw.get("herald:sent:{a}").await.unwrap();
            if let Some(sent) = sent {
                assert_eq!(sent, 6);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "watermark not written"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let b_sent: Option<u64> = raw.get("herald:sent:{b}").await.unwrap();
        assert_eq!(b_sent, None);
    }
}
