//! Every Lua script Herald runs, with the KEYS and ARGV each takes. The outbox and the
//! cluster call them; key names come from `keys`, in the orders documented here.
//!
//! Scripts are loaded whenever the store (re)connects and called by hash. The outbox's
//! enqueue goes by EVALSHA alone: a script missing after a Redis restart fails the call
//! instead of being loaded and retried on the side, which could let a later enqueue
//! overtake an earlier one. The cluster's scripts go through redis-rs `Script`, which loads
//! on NOSCRIPT: their calls are not ordered against each other.

use redis::Script;

/// Enqueues a batch of messages, in order. KEYS: per message, the outbox and qbytes keys
/// of its client, and in a cluster also its route key (stride 3). ARGV: the count cap, the
/// drop-new flag, the key TTL in ms (0: none), the stride, the byte cap, the largest
/// envelope any message can have, then per message three: the sequence number from which
/// its outbox must be measured (`check`), flags (1: refresh the TTL, 2: a connection of the
/// client is live here), the envelope.
///
/// Returns per message five values: its seq (0: rejected, outbox full; -1 then the error:
/// the others are stored all the same, as one script per message would have), entries
/// dropped for room, if it measured the outbox the seq from which the count cap needs
/// measuring again and the bytes left under the byte cap (else 0 and 0), and 1 if the entry
/// was stored as live; with stride 3 also the route's node and incarnation (nil without a route), read
/// after the store, so that the node that stored the message knows where to forward it
/// without another round trip. This is the one place the outbox reads a cluster key.
///
/// Cost per message, the point of this layout: one XADD. The stream numbers its entries
/// (`0-*`: consecutive, never reused while the key exists), so there is no counter to bump.
/// The count and byte caps are checked without a command per message: the caller passes
/// `check`, the seq below which the outbox cannot be over either cap (it last measured `n`
/// entries and `b` bytes at seq `s`, so at seq `s + k` it holds at most `n + k` entries
/// and `b + k * max_envelope` bytes, whoever added them; the caller counts the messages it
/// added itself at their real size, see `writer::Memo`). Only a message at or above
/// `check` measures: XLEN, and the bytes added since the last measurement (kept in qbytes as
/// `<seq> <bytes>`, an upper bound: acks do not lower it; a full count resets it when it
/// says the budget is gone). The TTL is refreshed when the caller asks (at most once per
/// interval per client and node, see `writer`), so the key outlives its newest message by
/// `session.message_ttl`.
///
/// A stream that does not exist yet is numbered from Redis's clock in microseconds: above
/// every number an earlier stream of the same client used (that would take more than one
/// message per microsecond for its whole life), so a connection's cursor never sees numbers
/// repeat after an outbox expired or a clean session deleted it.
///
/// Keys of many clients in one call: fine on one Redis (plain or behind Sentinel). On Redis
/// Cluster the caller groups a batch by hash slot.
pub const ENQUEUE: &str = r#"
local cap = tonumber(ARGV[1])
local drop_new = ARGV[2] == '1'
local ttl = ARGV[3]
local stride = tonumber(ARGV[4])
local bcap = tonumber(ARGV[5])
local max_env = tonumber(ARGV[6])
local function seq_of(id)
  return tonumber(string.sub(id, 3))
end
local function add(box, field, envelope)
  local id = redis.call('XADD', box, 'NOMKSTREAM', '0-*', field, envelope)
  if id then return seq_of(id) end
  local t = redis.call('TIME')
  local seq = tonumber(t[1]) * 1000000 + tonumber(t[2])
  redis.call('XADD', box, string.format('0-%d', seq), field, envelope)
  return seq
end
local function bytes_of(entries)
  local b = 0
  for _, e in ipairs(entries) do b = b + #e[2][2] end
  return b
end
-- Measures the outbox right after `seq` (`size` bytes) was added and drops for room.
-- Returns whether the new entry stays, the entries dropped, the next check.
local function measure(box, qbytes, seq, size)
  local n = redis.call('XLEN', box)
  local q = redis.call('GET', qbytes)
  local s0, b0
  if q then s0, b0 = string.match(q, '^(%d+) (%d+)$') end
  local b, exact
  if s0 and tonumber(s0) < seq then
    b = tonumber(b0) + bytes_of(redis.call('XRANGE', box, '(0-' .. s0, '+'))
  else
    b, exact = bytes_of(redis.call('XRANGE', box, '-', '+')), true
  end
  if b > bcap and not exact then
    b = bytes_of(redis.call('XRANGE', box, '-', '+'))
  end
  local kept, dropped = true, 0
  if n > 1 and (n > cap or b > bcap) then
    if drop_new then
      redis.call('XDEL', box, string.format('0-%d', seq))
      n, b, kept = n - 1, b - size, false
    else
      local gone = {}
      for _, e in ipairs(redis.call('XRANGE', box, '-', '+')) do
        if n <= 1 or (n <= cap and b <= bcap) then break end
        gone[#gone + 1] = e[1]
        b = b - #e[2][2]
        n = n - 1
      end
      dropped = #gone
      redis.call('XDEL', box, unpack(gone))
    end
  end
  redis.call('SET', qbytes, string.format('%d %d', seq, b))
  return kept, dropped, seq + math.max(cap - n, 0) + 1, math.max(bcap - b, 0)
end
-- Returns the seq (0: dropped), entries dropped for room, and if measured the count check
-- and the bytes left under the cap (else 0, 0).
local function one(box, qbytes, check, field, envelope)
  local seq = add(box, field, envelope)
  if seq < check then return seq, 0, 0, 0 end
  local kept, dropped, count_check, left = measure(box, qbytes, seq, #envelope)
  if not kept then return 0, 0, count_check, left end
  return seq, dropped, count_check, left
end
local per = 5
if stride == 3 then per = 7 end
local out = {}
local checks = {}
local refresh = {}
for i = 1, (#ARGV - 6) / 3 do
  local k = stride * (i - 1)
  local o = per * (i - 1)
  local a = 6 + 3 * (i - 1)
  local box, qbytes = KEYS[k + 1], KEYS[k + 2]
  local flags = tonumber(ARGV[a + 2])
  local live = math.floor(flags / 2) % 2
  local route
  if stride == 3 then
    route = redis.call('HMGET', KEYS[k + 3], 'node', 'inc')
    if route[1] then live = 1 end
  end
  local field = 'd'
  if live == 1 then field = 'l' end
  -- A check measured earlier in this call holds for the client's later messages.
  local check = checks[box] or tonumber(ARGV[a + 1])
  local ok, seq, dropped, count_check, left = pcall(one, box, qbytes, check, field, ARGV[a + 3])
  if ok then
    if count_check ~= 0 then
      checks[box] = math.min(count_check, seq + math.floor(left / max_env) + 1)
    end
    if flags % 2 == 1 then refresh[box] = qbytes end
    out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] =
      seq, dropped, count_check, left, live
  else
    out[o + 1] = -1
    out[o + 2] = type(seq) == 'table' and seq.err or tostring(seq)
    out[o + 3], out[o + 4], out[o + 5] = 0, 0, 0
  end
  if stride == 3 then
    out[o + 6] = route[1]
    out[o + 7] = route[2]
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
/// sent, session, subs, qbytes). ARGV: '1' for a clean session, which deletes them all
/// first; the connection's id, kept in the session key (persistent sessions only) until
/// the next one starts (`FINISH` writes only for the connection named there).
///
/// Returns {session present (0/1), sent watermark, replay_to, had stored subscriptions
/// (0/1: a clean session then leaves the subscriber index)}. The watermark is `<seq>`, or
/// `<seq> c` when the last connection wrote it as it ended (`FINISH`): then it is exact, and
/// `replay_to` is 0. Otherwise that connection may have crashed after writing live entries
/// (which need no watermark, see `ENQUEUE`): `replay_to` is the newest entry's seq, and a
/// live entry up to it goes out with DUP. The `c` is taken off here: this connection may
/// crash too.
pub const ATTACH: &str = r#"
local present = redis.call('EXISTS', KEYS[3])
if ARGV[1] == '1' then
  local subs = redis.call('EXISTS', KEYS[4])
  redis.call('DEL', unpack(KEYS, 1, 5))
  return {0, 0, 0, subs}
end
redis.call('SET', KEYS[3], ARGV[2])
local v = redis.call('GET', KEYS[2])
local sent, ended = 0, false
if v then
  sent = tonumber(string.match(v, '^%d+')) or 0
  ended = string.sub(v, -1) == 'c'
end
if ended then
  redis.call('SET', KEYS[2], string.format('%d', sent), 'KEEPTTL')
  return {present, sent, 0, 0}
end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local last = 0
if newest then last = tonumber(string.sub(newest[1], 3)) end
return {present, sent, last, 0}
"#;

/// A persistent session's connection ends: its exact sent watermark (the highest seq it
/// wrote to the wire, live entries included), marked `c` for `ATTACH`, but only while no
/// newer connection of the client has started. KEYS: sent, session. ARGV: the seq, the
/// connection's id. Returns 1 if written.
pub const FINISH: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. ' c')
return 1
"#;

/// Moves one client's outbox of the layout before streams (a ZSET scored by seq, members
/// `<seq>|<envelope>`) into the stream, same numbers, then deletes the old keys. KEYS: the
/// old outbox, the old counter, the stream, the old byte count (a plain number then, another
/// format now). Returns the entries moved. A client whose stream exists already keeps it: a
/// node of this version wrote it, so the old keys are older.
pub const MIGRATE: &str = r#"
local moved = 0
if redis.call('EXISTS', KEYS[3]) == 0 then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local bar = string.find(m, '|', 1, true)
    if bar then
      redis.call('XADD', KEYS[3], '0-' .. string.sub(m, 1, bar - 1), 'd', string.sub(m, bar + 1))
      moved = moved + 1
    end
  end
  local ttl = redis.call('PTTL', KEYS[1])
  if moved > 0 and ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
return moved
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

/// A node stops gracefully. KEYS: its alive key, its filters key (one slot: the node's
/// hash tag). ARGV: the alive value it wrote (so a successor under the same id is left
/// alone). Returns 1 if the keys were deleted. The caller bumps `herald:interest` after it
/// (another slot on a cluster). Sent as EVAL (`Cluster::unregister`), so not in `Scripts`.
pub const UNREGISTER: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"#;

/// Appends final states to a node's hook stream (`keys::hooks`), keeping at most a cap.
/// KEYS: the stream. ARGV: the cap, then per event five values (client, seq, lineage,
/// state, unix ms; the fields `receipts::hooks::stream_fields` names). Returns how many
/// of the oldest were trimmed to keep the cap.
pub const HOOK: &str = r#"
local cap = tonumber(ARGV[1])
for i = 2, #ARGV, 5 do
  redis.call('XADD', KEYS[1], '*', 'c', ARGV[i], 'q', ARGV[i + 1], 'l', ARGV[i + 2],
    's', ARGV[i + 3], 't', ARGV[i + 4])
end
local n = redis.call('XLEN', KEYS[1])
if n > cap then
  redis.call('XTRIM', KEYS[1], 'MAXLEN', cap)
  return n - cap
end
return 0
"#;

/// A push with a collapse key was stored as `seq` (HTTP `collapse`): the older entry of the
/// same key is deleted if the device was never sent it. KEYS: the outbox, the sent
/// watermark, the client's collapse index (`keys::Client::Collapse`). ARGV: the key, `seq`,
/// the most keys the index keeps (past it, it starts over: a collapse then only misses), its
/// TTL in ms. The index never goes back: a push whose call comes after a newer one's (two
/// requests racing) changes nothing. An entry is left alone unless it was stored with no
/// connection live (`d`: a live one may be on the wire without a watermark, see `ENQUEUE`)
/// and is above the watermark: collapse never drops a message already written. Returns
/// {the deleted seq (0: none), 1 if its envelope asked for a receipt}.
pub const COLLAPSE: &str = r#"
local seq = tonumber(ARGV[2])
-- Numbers reach 2^50 (`ENQUEUE` numbers from the clock in µs): exact in Lua's doubles, but
-- `..` would print one in exponent form, so ids are built from the strings.
local old_id = redis.call('HGET', KEYS[3], ARGV[1]) or '0'
local old = tonumber(old_id) or 0
if old >= seq then return {0, 0} end
if redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[3]) then redis.call('DEL', KEYS[3]) end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
if old == 0 then return {0, 0} end
local id = '0-' .. old_id
local e = redis.call('XRANGE', KEYS[1], id, id)[1]
if not e or e[2][1] ~= 'd' then return {0, 0} end
local sent = tonumber(string.match(redis.call('GET', KEYS[2]) or '0', '^%d+')) or 0
if old <= sent then return {0, 0} end
redis.call('XDEL', KEYS[1], id)
local tracked = 0
if string.byte(e[2][2], 1) == 3 then tracked = 1 end
return {old, tracked}
"#;

/// Empties an outbox (`DELETE /v1/clients/{id}/outbox`). KEYS: the outbox. Returns {entries
/// removed, the seqs (as strings) of those that asked for a receipt (envelope version 3)},
/// read and trimmed in one step, so none is removed unreported. The outbox is bounded
/// (`session.max_queued_messages`), so the read is too. `XTRIM`, not `DEL`: numbering goes on.
pub const EMPTY: &str = r#"
local tracked = {}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  if string.byte(e[2][2], 1) == 3 then tracked[#tracked + 1] = string.sub(e[1], 3) end
end
return {redis.call('XTRIM', KEYS[1], 'MAXLEN', 0), tracked}
"#;

/// An adopter drained a dead node's hook stream (`receipts::adopt`). KEYS: the stream, the
/// node's alive key (one slot: the node's hash tag). Deletes the stream only if it is empty
/// and the node still has no alive key; returns 1 if it did (the caller then unlists it).
pub const HOOKS_DONE: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('XLEN', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#;

/// The scripts, hashed once.
pub struct Scripts {
    pub enqueue: Script,
    pub attach: Script,
    pub migrate: Script,
    pub finish: Script,
    pub hook: Script,
    pub collapse: Script,
    pub hooks_done: Script,
    pub empty: Script,
    pub claim: Script,
    pub release: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            enqueue: Script::new(ENQUEUE),
            attach: Script::new(ATTACH),
            migrate: Script::new(MIGRATE),
            finish: Script::new(FINISH),
            hook: Script::new(HOOK),
            collapse: Script::new(COLLAPSE),
            hooks_done: Script::new(HOOKS_DONE),
            empty: Script::new(EMPTY),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
        }
    }

    /// Loads the scripts the outbox calls by hash alone (the others load themselves).
    pub(super) async fn load(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<()> {
        self.enqueue.load_async(conn).await?;
        self.attach.load_async(conn).await?;
        self.migrate.load_async(conn).await?;
        self.finish.load_async(conn).await?;
        self.hook.load_async(conn).await?;
        self.collapse.load_async(conn).await?;
        self.hooks_done.load_async(conn).await?;
        self.empty.load_async(conn).await?;
        Ok(())
    }
}
