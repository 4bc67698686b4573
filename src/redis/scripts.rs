//! Every Lua script Herald runs, with the KEYS and ARGV each takes. The outbox and the
//! cluster call them; key names come from `keys`, in the orders documented here.
//!
//! Scripts are loaded whenever the store (re)connects and called by hash. The outbox's
//! enqueue goes by EVALSHA alone: a script missing after a Redis restart fails the call
//! instead of being loaded and retried on the side, which could let a later enqueue
//! overtake an earlier one. The cluster's scripts go through redis-rs `Script`, which loads
//! on NOSCRIPT: their calls are not ordered against each other.

use redis::Script;

/// Enqueues a batch of messages, in order. KEYS: per message, the outbox, seq and qbytes
/// keys of its client, and in a cluster also its route key (stride 4). ARGV: the count cap,
/// the drop-new flag, the TTL in ms (0: none), the stride, the byte cap, then each
/// message's envelope. Returns per message its seq (0: rejected, outbox full) and the
/// number of entries dropped for room, or -1 and the error of a message whose commands
/// failed (the others are stored all the same, as one script per message would have); with
/// stride 4 also the route's node and incarnation (nil without a route), read after the
/// store, so that the node that stored the message knows where to forward it without
/// another round trip. This is the one place the outbox reads a cluster key, for that round
/// trip. The TTL of each outbox that took a message is refreshed once: the script runs at
/// one instant, so once is the same as per message.
///
/// The byte count (`qbytes`, envelope bytes) is raised by every enqueue and lowered by no
/// ack (acks are a pipelined range delete that does not know sizes): it is an upper bound,
/// made exact by counting the outbox's members only when it says the budget would be
/// exceeded, and reset when the outbox is found empty. A device that keeps up never pays
/// for a count.
///
/// Keys of many clients in one call: fine on one Redis (plain or behind Sentinel). Redis
/// Cluster would need one call per hash slot (group the batch by `{client}` slot).
pub const ENQUEUE: &str = r#"
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

/// A connection starts. KEYS: the client's session state (`keys::SESSION_STATE`: outbox,
/// sent, session, subs, qbytes). ARGV[1]: '1' for a clean session, which deletes them all
/// first. Returns {session present (0/1), sent watermark}.
pub const ATTACH: &str = r#"
local present = redis.call('EXISTS', KEYS[3])
if ARGV[1] == '1' then
  redis.call('DEL', unpack(KEYS, 1, 5))
  present = 0
else
  redis.call('SET', KEYS[3], '1')
end
local sent = tonumber(redis.call('GET', KEYS[2]) or '0')
return {present, sent}
"#;

/// CONNECT on a cluster node: bump the client's epoch and make this node its route, in one
/// step. KEYS: route, epoch. ARGV: node id, incarnation. Returns {epoch, previous node (''
/// if none), previous incarnation, previous epoch}.
pub const CLAIM: &str = r#"
local e = redis.call('INCR', KEYS[2])
redis.call('PERSIST', KEYS[2])
local old = redis.call('HMGET', KEYS[1], 'node', 'inc', 'epoch')
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'inc', ARGV[2], 'epoch', e)
return {e, old[1] or '', old[2] or '0', old[3] or '0'}
"#;

/// A connection on a cluster node ended: remove the route only if it still names this
/// node, incarnation and epoch (the client may be connected elsewhere by now), and with a
/// clean session also the client's session state, in the same step, so that a session the
/// client opened meanwhile on another node is never wiped. KEYS: route, epoch, then the
/// session state (`keys::SESSION_STATE`, 5 keys). ARGV: node id, incarnation, epoch, '1' to
/// clear. Returns 1 if the route was removed. The epoch counter of a clean client expires
/// after a day, so that backends that connect with a fresh random id each time leave
/// nothing behind, while a connection that outlived its kick by less than that is still
/// fenced.
pub const RELEASE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'node', 'inc', 'epoch')
if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] or r[3] ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' then
  redis.call('DEL', unpack(KEYS, 3, 7))
  redis.call('PEXPIRE', KEYS[2], 86400000)
end
return 1
"#;

/// A node stops gracefully. KEYS: its alive key, its filters key, the interest counter.
/// ARGV: the alive value it wrote (so a successor under the same id is left alone).
/// Returns the new interest version.
pub const UNREGISTER: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1], KEYS[2]) end
return redis.call('INCR', KEYS[3])
"#;

/// The scripts, hashed once.
pub struct Scripts {
    pub enqueue: Script,
    pub attach: Script,
    pub claim: Script,
    pub release: Script,
    pub unregister: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            enqueue: Script::new(ENQUEUE),
            attach: Script::new(ATTACH),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            unregister: Script::new(UNREGISTER),
        }
    }

    /// Loads the scripts the outbox calls by hash alone (the others load themselves).
    pub(super) async fn load(
        &self,
        conn: &mut redis::aio::ConnectionManager,
    ) -> redis::RedisResult<()> {
        self.enqueue.load_async(conn).await?;
        self.attach.load_async(conn).await?;
        Ok(())
    }
}
