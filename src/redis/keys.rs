//! The Redis key schema: the only place a key name is spelled (the tests use it too).
//!
//! Every key of one client carries the hash tag `{<client id>}`, so that a script touching
//! one client touches one hash slot. Owners (the module that writes the key; others may only
//! read it where noted):
//!
//! | key | type | owner | what |
//! | --- | --- | --- | --- |
//! | `herald:box:{cid}` | STREAM | outbox | the outbox: entry id `0-<seq>`, one field, `d` (stored while no connection was live) or `l` (stored while one was), value = the envelope; TTL `session.message_ttl` plus a refresh interval (`scripts::ENQUEUE`) |
//! | `herald:qbytes:{cid}` | string | outbox | `<seq> <bytes>`: the outbox held at most `<bytes>` of envelopes when `<seq>` was added (`session.max_queued_bytes`) |
//! | `herald:sent:{cid}` | string | outbox | `<seq>`: highest seq of a `d` entry written to the wire (DUP on resend); `<seq> c`: the highest of any entry, written as the last connection ended (`scripts::ATTACH`) |
//! | `herald:outbox:{cid}`, `herald:seq:{cid}` | ZSET, string | outbox | the layout before streams: moved into `box` by the first node of this version to start (`scripts::MIGRATE`), then deleted |
//! | `herald:layout` | string | outbox | `2` once no key of the layout before streams is left |
//! | `herald:session:{cid}` | string | outbox | present while the client has a persistent session; the id of its newest connection |
//! | `herald:subs:{cid}` | HASH | outbox | filter -> QoS of a persistent session |
//! | `herald:subscribers` | SET | outbox | client ids with stored subscriptions (read at start) |
//! | `herald:retained` | HASH | outbox | topic -> envelope |
//! | `herald:route:{cid}` | HASH | cluster | node / inc / epoch of the client's connection; read by the outbox's enqueue script (see `scripts::ENQUEUE`) |
//! | `herald:epoch:{cid}` | string (INCR) | cluster | fencing counter of the client's connections |
//! | `herald:alive:{node}` | string, TTL | cluster | "<incarnation> <address>" while the node lives |
//! | `herald:nodes` | SET | cluster | node ids |
//! | `herald:filters:{node}` | SET | cluster | topic filters the node has subscribers for |
//! | `herald:interest` | string (INCR) | cluster | bumped whenever a node's filters change |
//! | `herald:collapse:{cid}` | HASH, PX | outbox | collapse key -> seq of the newest HTTP push with it (`scripts::COLLAPSE`); TTL as the outbox's |
//! | `herald:rcpt:{cid}:<lineage>.<seq>`, `...<seq>.f` | string, PX | outbox (ack writer) | `<state> <unix ms>` of a message pushed with `receipt=true`: `sent`, and its final state (`acked`, `expired`, `dropped`), each `SET NX` so the first one stays; TTL `http.receipt_ttl`; read by the HTTP API |
//! | `herald:hooks:{node}` | STREAM | outbox (ack writer) appends, `receipts::hooks` removes | final receipt states waiting for the node's webhook POST (`scripts::HOOK`), at most `http.receipt_queue` |
//! | `herald:hooknodes` | SET | receipts | node ids with a hook stream (`receipts::adopt`) |
//! | `herald:hooklease:{node}` | string, PX | receipts | which live node posts a dead node's hook stream |
//! | `herald:sample` | string, PX | outbox | the sampling lease: which node samples the store next (`outbox::redis::sample`) |
//! | `herald:stats` | HASH, PX | outbox | the last sample: messages, oldest_born_us, sessions, routed |

use bytes::{BufMut, BytesMut};

use super::resp;

const PREFIX: &str = "herald:";

/// The keys of one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Outbox,
    /// The ZSET outbox of the layout before streams (moved into `Outbox` when met).
    LegacyOutbox,
    LegacySeq,
    Qbytes,
    Sent,
    Session,
    Subs,
    Route,
    Epoch,
    /// HASH collapse key -> seq of the newest push with it (`scripts::COLLAPSE`).
    Collapse,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Outbox => "box",
            Client::LegacyOutbox => "outbox",
            Client::LegacySeq => "seq",
            Client::Qbytes => "qbytes",
            Client::Sent => "sent",
            Client::Session => "session",
            Client::Subs => "subs",
            Client::Route => "route",
            Client::Epoch => "epoch",
            Client::Collapse => "collapse",
        }
    }
}

/// `herald:<kind>:{<client>}`. Built by hand: this runs several times per message, and
/// `format!` costs more than the rest of building the command.
pub fn client(kind: Client, client: &str) -> String {
    let name = kind.name();
    let mut k = String::with_capacity(PREFIX.len() + name.len() + 3 + client.len());
    k.push_str(PREFIX);
    k.push_str(name);
    k.push_str(":{");
    k.push_str(client);
    k.push('}');
    k
}

/// The Redis Cluster hash slot of every key of `client`, or `None` when its keys do not
/// share one: an id that starts with `}` makes the hash tag empty, so Redis hashes each
/// whole key (such a client cannot be stored on a cluster; its calls fail with CROSSSLOT).
pub fn client_slot(client: &str) -> Option<u16> {
    if client.is_empty() || client.starts_with('}') {
        return None;
    }
    // The tag Redis sees: the id up to its first `}`.
    let tag = &client[..client.find('}').unwrap_or(client.len())];
    let mut k = Vec::with_capacity(tag.len() + 2);
    k.push(b'{');
    k.extend_from_slice(tag.as_bytes());
    k.push(b'}');
    Some(super::slots::key_slot(&k))
}

/// `herald:<kind>:{`: what every key of that kind starts with (the store sample's SCAN).
pub fn client_prefix(kind: Client) -> String {
    format!("{PREFIX}{}:{{", kind.name())
}

/// The same key as a RESP bulk string, written in place into a pipeline.
pub(crate) fn put_client(b: &mut BytesMut, kind: Client, client: &str) {
    let name = kind.name();
    resp::bulk_header(b, PREFIX.len() + name.len() + 3 + client.len());
    b.put_slice(PREFIX.as_bytes());
    b.put_slice(name.as_bytes());
    b.put_slice(b":{");
    b.put_slice(client.as_bytes());
    b.put_u8(b'}');
    resp::end(b);
}

/// A client's session state: what a clean session starts without and leaves nothing of
/// (the cluster's keys stay). Scripts take these as five consecutive KEYS, in this order.
pub const SESSION_STATE: [Client; 5] = [
    Client::Outbox,
    Client::Sent,
    Client::Session,
    Client::Subs,
    Client::Qbytes,
];

pub fn session_state(cid: &str) -> [String; 5] {
    SESSION_STATE.map(|k| client(k, cid))
}

/// The store's key layout version (`outbox::redis::migrate`).
pub const LAYOUT: &str = "herald:layout";
/// SET of client ids with stored subscriptions.
pub const SUBSCRIBERS: &str = "herald:subscribers";
/// HASH topic -> envelope of every retained message.
pub const RETAINED: &str = "herald:retained";
/// The store sample's lease (string, PX).
pub const SAMPLE_LEASE: &str = "herald:sample";
/// The store sample's result (HASH, PX).
pub const STATS: &str = "herald:stats";
/// SET of node ids.
pub const NODES: &str = "herald:nodes";
/// Counter bumped whenever a node's filters change.
pub const INTEREST: &str = "herald:interest";

/// `herald:rcpt:{<client>}:<lineage>.<seq>`: a tracked message's `sent` record (same slot
/// as the client's other keys); with `.f` appended, its final state's.
pub fn receipt(cid: &str, lineage: u16, seq: u64, last: bool) -> String {
    let mut k = client(Client::Outbox, cid);
    k.replace_range(PREFIX.len()..PREFIX.len() + 3, "rcpt");
    k.push(':');
    k.push_str(&lineage.to_string());
    k.push('.');
    k.push_str(&seq.to_string());
    if last {
        k.push_str(".f");
    }
    k
}

/// `herald:hooks:{<node>}`.
pub fn hooks(node: &str) -> String {
    format!("{PREFIX}hooks:{{{node}}}")
}

/// SET of node ids that have a hook stream (`receipts::adopt`).
pub const HOOK_NODES: &str = "herald:hooknodes";

/// `herald:hooklease:{<node>}`: who posts a dead node's hook stream.
pub fn hooks_lease(node: &str) -> String {
    format!("{PREFIX}hooklease:{{{node}}}")
}

/// `herald:alive:{<node>}`.
pub fn alive(node: &str) -> String {
    format!("{PREFIX}alive:{{{node}}}")
}

/// `herald:filters:{<node>}`.
pub fn filters(node: &str) -> String {
    format!("{PREFIX}filters:{{{node}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(client(Client::Outbox, "d|1"), "herald:box:{d|1}");
        let mut b = BytesMut::new();
        put_client(&mut b, Client::Sent, "dev|1");
        assert_eq!(&b[..], b"$19\r\nherald:sent:{dev|1}\r\n");
        assert_eq!(alive("n1"), "herald:alive:{n1}");
        assert_eq!(receipt("d}1", 3, 42, false), "herald:rcpt:{d}1}:3.42");
        assert_eq!(receipt("d", 0, 7, true), "herald:rcpt:{d}:0.7.f");
        assert_eq!(hooks("n1"), "herald:hooks:{n1}");
        assert_eq!(filters("n1"), "herald:filters:{n1}");
        assert_eq!(session_state("a")[4], "herald:qbytes:{a}");
        for id in ["dev-1", "a}b", "x{y", "{z}", "ü"] {
            let slot = super::super::slots::key_slot(client(Client::Outbox, id).as_bytes());
            assert_eq!(client_slot(id), Some(slot), "{id}");
            let other = super::super::slots::key_slot(client(Client::Qbytes, id).as_bytes());
            assert_eq!(slot, other, "{id}");
        }
        assert_eq!(client_slot("}x"), None);
        assert_eq!(client_slot(""), None);
    }
}
