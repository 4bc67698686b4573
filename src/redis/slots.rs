//! Redis Cluster's key space, as the hot path needs it without redis-rs: which hash slot a
//! key is in (`key_slot`), which shard serves each slot (`SlotMap`, read from
//! `CLUSTER SLOTS`), and where a `MOVED` or `ASK` error reply sends a command
//! (`parse_redirect`). No I/O here: `endpoint` asks Redis and hands the reply in.

use std::fmt;

/// Redis Cluster always has this many hash slots.
pub const SLOTS: usize = 16384;

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis hashes keys with.
/// Table-driven: the hot path hashes a key per message.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

/// The hash slot of `key`, as Redis computes it: if the key holds a `{` followed later by a
/// `}` with at least one byte between them, only the bytes between the first `{` and the
/// first `}` after it are hashed (the hash tag), so keys sharing a tag share a slot.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS as u16
}

/// The part of `key` Redis hashes.
fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    let after = &key[open + 1..];
    match after.iter().position(|&b| b == b'}') {
        // "{}" is no tag: the whole key is hashed.
        Some(len) if len > 0 => &after[..len],
        _ => key,
    }
}

/// A node's address as the cluster announces it. An empty host means "the host you asked":
/// Redis sends that when a node does not know its own address (see `SlotMap::from_cluster_slots`
/// and `parse_redirect`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub host: String,
    pub port: u16,
}

impl Addr {
    pub fn new(host: impl Into<String>, port: u16) -> Addr {
        Addr {
            host: host.into(),
            port,
        }
    }

    /// `host:port`, `[v6]:port` or a bare `v6:port` (the port is after the last colon).
    pub fn parse(s: &str) -> Option<Addr> {
        let (host, port) = s.rsplit_once(':')?;
        let port = port.parse().ok()?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Some(Addr::new(host, port))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One primary and its replicas: the unit that owns slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub primary: Addr,
    pub replicas: Vec<Addr>,
}

/// Which shard serves each of the 16384 slots, at the time the cluster was asked.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Per slot, an index into `shards`, or `UNSERVED`.
    owner: Box<[u16]>,
    shards: Vec<Shard>,
}

const UNSERVED: u16 = u16::MAX;

impl SlotMap {
    /// No slot served: before the cluster was first asked.
    pub fn empty() -> SlotMap {
        SlotMap {
            owner: vec![UNSERVED; SLOTS].into_boxed_slice(),
            shards: Vec::new(),
        }
    }

    /// Reads a `CLUSTER SLOTS` reply: one entry per slot range, `[start, end, primary,
    /// replica...]`, each node `[host, port, id?, metadata?]`. Ranges that share a primary
    /// are one shard. A host that is empty or `?` is `asked_host`, the host of the node that
    /// answered (Redis does not know its own address then).
    pub fn from_cluster_slots(reply: &redis::Value, asked_host: &str) -> Result<SlotMap, String> {
        let mut map = SlotMap::empty();
        for range in array(reply, "CLUSTER SLOTS reply")? {
            let range = array(range, "slot range")?;
            let [start, end, primary, replicas @ ..] = range else {
                return Err(format!("slot range of {} elements", range.len()));
            };
            let (start, end) = (slot(start)?, slot(end)?);
            if start > end {
                return Err(format!("slot range {start}-{end}"));
            }
            let primary = node(primary, asked_host)?;
            let replicas = replicas
                .iter()
                .map(|r| node(r, asked_host))
                .collect::<Result<Vec<_>, _>>()?;
            let index = match map.shards.iter().position(|s| s.primary == primary) {
                Some(i) => i,
                None => {
                    if map.shards.len() >= usize::from(UNSERVED) {
                        return Err("more shards than slots".into());
                    }
                    map.shards.push(Shard {
                        primary,
                        replicas: Vec::new(),
                    });
                    map.shards.len() - 1
                }
            };
            let shard = &mut map.shards[index];
            for r in replicas {
                if !shard.replicas.contains(&r) {
                    shard.replicas.push(r);
                }
            }
            for s in start..=end {
                map.owner[usize::from(s)] = index as u16;
            }
        }
        Ok(map)
    }

    /// Every shard, each once, in the order the reply named them.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn shard(&self, index: usize) -> Option<&Shard> {
        self.shards.get(index)
    }

    /// The index of the shard serving `slot`; `None` if no shard does (or `slot` is out of
    /// range).
    pub fn shard_of_slot(&self, slot: u16) -> Option<usize> {
        match self.owner.get(usize::from(slot)) {
            Some(&UNSERVED) | None => None,
            Some(&i) => Some(usize::from(i)),
        }
    }

    pub fn shard_of_key(&self, key: &[u8]) -> Option<usize> {
        self.shard_of_slot(key_slot(key))
    }

    /// The primary serving `slot`.
    pub fn primary(&self, slot: u16) -> Option<&Addr> {
        self.shard_of_slot(slot)
            .and_then(|i| self.shards.get(i))
            .map(|s| &s.primary)
    }

    /// The index of the shard whose primary is `addr` (a `MOVED` target, say).
    pub fn shard_by_primary(&self, addr: &Addr) -> Option<usize> {
        self.shards.iter().position(|s| &s.primary == addr)
    }

    /// How many slots a shard serves.
    pub fn served(&self) -> usize {
        self.owner.iter().filter(|&&o| o != UNSERVED).count()
    }

    /// Whether every slot is served: what a cluster needs to accept every key.
    pub fn is_complete(&self) -> bool {
        self.served() == SLOTS
    }

    /// The served slot ranges, in slot order: `(first, last, shard index)`.
    pub fn ranges(&self) -> Vec<(u16, u16, usize)> {
        let mut out: Vec<(u16, u16, usize)> = Vec::new();
        for (s, &o) in self.owner.iter().enumerate() {
            if o == UNSERVED {
                continue;
            }
            let s = s as u16;
            match out.last_mut() {
                Some((_, last, shard)) if *last + 1 == s && *shard == usize::from(o) => *last = s,
                _ => out.push((s, s, usize::from(o))),
            }
        }
        out
    }
}

impl fmt::Debug for SlotMap {
    // 16384 owners are no use in a log line: ranges and shards are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotMap")
            .field("ranges", &self.ranges())
            .field("shards", &self.shards)
            .finish()
    }
}

fn array<'a>(v: &'a redis::Value, what: &str) -> Result<&'a [redis::Value], String> {
    match v {
        redis::Value::Array(items) => Ok(items),
        other => Err(format!("{what}: expected an array, got {other:?}")),
    }
}

fn slot(v: &redis::Value) -> Result<u16, String> {
    match v {
        redis::Value::Int(n) if (0..SLOTS as i64).contains(n) => Ok(*n as u16),
        other => Err(format!("bad slot {other:?}")),
    }
}

fn text(v: &redis::Value) -> Option<&str> {
    match v {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn node(v: &redis::Value, asked_host: &str) -> Result<Addr, String> {
    let fields = array(v, "node")?;
    let (Some(host), Some(port)) = (fields.first(), fields.get(1)) else {
        return Err(format!("node of {} fields", fields.len()));
    };
    let host = text(host).ok_or_else(|| format!("bad node host {host:?}"))?;
    let port = match port {
        redis::Value::Int(p) => u16::try_from(*p).ok(),
        other => text(other).and_then(|p| p.parse().ok()),
    }
    .ok_or_else(|| format!("bad node port {port:?}"))?;
    let host = if host.is_empty() || host == "?" {
        asked_host
    } else {
        host
    };
    Ok(Addr::new(host, port))
}

/// Where a cluster error reply sends a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// The slot lives on `to` now: send there, and the slot map is stale.
    Moved { slot: u16, to: Addr },
    /// The slot is being migrated: send this one command to `to`, preceded by `ASKING`; the
    /// slot map stays as it is.
    Ask { slot: u16, to: Addr },
}

impl Redirect {
    pub fn slot(&self) -> u16 {
        match self {
            Redirect::Moved { slot, .. } | Redirect::Ask { slot, .. } => *slot,
        }
    }

    pub fn to(&self) -> &Addr {
        match self {
            Redirect::Moved { to, .. } | Redirect::Ask { to, .. } => to,
        }
    }
}

/// Reads `MOVED <slot> <host:port>` or `ASK <slot> <host:port>` (with or without RESP's
/// leading `-`); `None` for any other error. The host is empty when Redis does not know it
/// (`MOVED 1 :7001`): it is then the host of the node that answered.
pub fn parse_redirect(error: &[u8]) -> Option<Redirect> {
    let error = error.strip_prefix(b"-").unwrap_or(error);
    let text = std::str::from_utf8(error).ok()?.trim_end();
    let mut parts = text.split(' ');
    let kind = parts.next()?;
    let slot: u16 = parts.next()?.parse().ok()?;
    let to = Addr::parse(parts.next()?)?;
    if parts.next().is_some() || usize::from(slot) >= SLOTS {
        return None;
    }
    match kind {
        "MOVED" => Some(Redirect::Moved { slot, to }),
        "ASK" => Some(Redirect::Ask { slot, to }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn crc16_is_xmodem() {
        // The standard check value of CRC-16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn hash_tags_follow_redis_rules() {
        let following = key_slot(b"{user1000}.following");
        assert_eq!(following, key_slot(b"{user1000}.followers"));
        assert_eq!(following, key_slot(b"user1000"));
        // Herald's per-client keys share their client's slot.
        assert_eq!(
            key_slot(b"herald:outbox:{dev42}"),
            key_slot(b"herald:seq:{dev42}")
        );
        assert_eq!(key_slot(b"herald:outbox:{dev42}"), key_slot(b"dev42"));
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        // Only the first '{' counts, and the first '}' after it.
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        // No closing brace: the whole key.
        assert_eq!(key_slot(b"foo{bar"), crc16(b"foo{bar") % 16384);
        assert_eq!(key_slot(b"}{"), crc16(b"}{") % 16384);
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn node_value(host: &str, port: i64, id: &str) -> Value {
        // Redis 7 adds a fourth field (networking metadata) that is not read.
        Value::Array(vec![
            bulk(host),
            Value::Int(port),
            bulk(id),
            Value::Array(vec![]),
        ])
    }

    fn range(start: i64, end: i64, nodes: Vec<Value>) -> Value {
        let mut v = vec![Value::Int(start), Value::Int(end)];
        v.extend(nodes);
        Value::Array(v)
    }

    fn three_shards() -> Value {
        Value::Array(vec![
            range(
                0,
                5460,
                vec![
                    node_value("10.0.0.1", 7000, "a"),
                    node_value("10.0.0.4", 7003, "d"),
                ],
            ),
            range(
                5461,
                10922,
                vec![
                    node_value("10.0.0.2", 7001, "b"),
                    node_value("10.0.0.5", 7004, "e"),
                ],
            ),
            range(
                10923,
                16383,
                vec![
                    node_value("10.0.0.3", 7002, "c"),
                    node_value("10.0.0.6", 7005, "f"),
                ],
            ),
        ])
    }

    #[test]
    fn slot_map_from_cluster_slots() {
        let map = SlotMap::from_cluster_slots(&three_shards(), "seed").unwrap();
        assert!(map.is_complete());
        assert_eq!(map.shards().len(), 3);
        assert_eq!(map.primary(0), Some(&Addr::new("10.0.0.1", 7000)));
        assert_eq!(map.primary(5460), Some(&Addr::new("10.0.0.1", 7000)));
        assert_eq!(map.primary(5461), Some(&Addr::new("10.0.0.2", 7001)));
        assert_eq!(map.primary(16383), Some(&Addr::new("10.0.0.3", 7002)));
        assert_eq!(map.primary(16384), None);
        // "foo" is slot 12182: the third shard.
        assert_eq!(map.shard_of_key(b"foo"), Some(2));
        let third = map.shard(2).unwrap();
        assert_eq!(third.replicas, vec![Addr::new("10.0.0.6", 7005)]);
        assert_eq!(map.shard_by_primary(&Addr::new("10.0.0.2", 7001)), Some(1));
        assert_eq!(
            map.ranges(),
            vec![(0, 5460, 0), (5461, 10922, 1), (10923, 16383, 2)]
        );
    }

    #[test]
    fn ranges_of_one_primary_are_one_shard() {
        let reply = Value::Array(vec![
            range(0, 99, vec![node_value("h", 1, "a")]),
            range(100, 199, vec![node_value("h", 2, "b")]),
            // Slot 200 is being served by "a" again (after a migration): same shard.
            range(
                200,
                200,
                vec![node_value("h", 1, "a"), node_value("h", 3, "c")],
            ),
        ]);
        let map = SlotMap::from_cluster_slots(&reply, "seed").unwrap();
        assert_eq!(map.shards().len(), 2);
        assert_eq!(map.shard_of_slot(200), Some(0));
        assert_eq!(map.shard(0).unwrap().replicas, vec![Addr::new("h", 3)]);
        assert_eq!(map.shard_of_slot(201), None);
        assert!(!map.is_complete());
        assert_eq!(map.ranges(), vec![(0, 99, 0), (100, 199, 1), (200, 200, 0)]);
    }

    #[test]
    fn unknown_hosts_are_the_asked_host() {
        let reply = Value::Array(vec![range(
            0,
            16383,
            vec![
                Value::Array(vec![bulk(""), Value::Int(7000)]),
                Value::Array(vec![bulk("?"), Value::Int(7001)]),
            ],
        )]);
        let map = SlotMap::from_cluster_slots(&reply, "127.0.0.1").unwrap();
        assert_eq!(map.primary(42), Some(&Addr::new("127.0.0.1", 7000)));
        assert_eq!(
            map.shard(0).unwrap().replicas,
            vec![Addr::new("127.0.0.1", 7001)]
        );
    }

    #[test]
    fn bad_replies_are_errors_not_panics() {
        let bad = [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![range(0, 16384, vec![node_value("h", 1, "a")])]),
            Value::Array(vec![range(10, 5, vec![node_value("h", 1, "a")])]),
            Value::Array(vec![range(-1, 5, vec![node_value("h", 1, "a")])]),
            Value::Array(vec![range(0, 5, vec![node_value("h", 70000, "a")])]),
            Value::Array(vec![range(0, 5, vec![Value::Array(vec![bulk("h")])])]),
            Value::Array(vec![range(0, 5, vec![Value::Int(3)])]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(5)])]),
        ];
        for reply in bad {
            assert!(
                SlotMap::from_cluster_slots(&reply, "seed").is_err(),
                "{reply:?}"
            );
        }
        let empty = SlotMap::from_cluster_slots(&Value::Array(vec![]), "seed").unwrap();
        assert!(!empty.is_complete());
        assert_eq!(empty.primary(0), None);
    }

    #[test]
    fn redirects() {
        assert_eq!(
            parse_redirect(b"MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved {
                slot: 3999,
                to: Addr::new("127.0.0.1", 6381)
            })
        );
        let ask = parse_redirect(b"-ASK 12182 10.1.2.3:7002\r\n").unwrap();
        assert_eq!(
            ask,
            Redirect::Ask {
                slot: 12182,
                to: Addr::new("10.1.2.3", 7002)
            }
        );
        assert_eq!(ask.slot(), 12182);
        assert_eq!(ask.to().to_string(), "10.1.2.3:7002");
        // IPv6, bare or bracketed, and an unknown host.
        assert_eq!(
            parse_redirect(b"MOVED 1 ::1:7000").map(|r| r.to().clone()),
            Some(Addr::new("::1", 7000))
        );
        assert_eq!(
            parse_redirect(b"MOVED 1 [::1]:7000").map(|r| r.to().to_string()),
            Some("[::1]:7000".to_string())
        );
        assert_eq!(
            parse_redirect(b"MOVED 1 :7000").map(|r| r.to().clone()),
            Some(Addr::new("", 7000))
        );
        for other in [
            &b"ERR unknown command"[..],
            b"NOSCRIPT No matching script",
            b"MOVED",
            b"MOVED x 1.2.3.4:5",
            b"MOVED 16384 1.2.3.4:5",
            b"MOVED 1 1.2.3.4",
            b"MOVED 1 1.2.3.4:99999",
            b"ASK 1 1.2.3.4:5 extra",
            b"TRYAGAIN Multiple keys request during rehashing of slot",
            b"CLUSTERDOWN The cluster is down",
            b"\xff\xfe",
        ] {
            assert_eq!(
                parse_redirect(other),
                None,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(Addr::parse("h:1"), Some(Addr::new("h", 1)));
        assert_eq!(Addr::parse("h"), None);
        assert_eq!(Addr::parse("h:"), None);
        assert_eq!(Addr::new("::1", 2).to_string(), "[::1]:2");
        assert_eq!(Addr::new("h", 2).to_string(), "h:2");
    }
}
