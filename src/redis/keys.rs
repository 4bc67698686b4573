//! The Redis key schema: the only place a key name is spelled (the tests use it too).
//!
//! Every key of one client carries the hash tag `{<client id>}`, so that a script touching
//! one client touches one hash slot. Owners (the module that writes the key; others may only
//! read it where noted):
//!
//! | key | type | owner | what |
//! | --- | --- | --- | --- |
//! | `herald:seq:{cid}` | string (INCR) | outbox | last sequence number; never expires, so packet ids never repeat while a connection may hold a cursor |
//! | `herald:outbox:{cid}` | ZSET | outbox | score = seq, member = `<seq>\|<envelope>`; TTL `session.message_ttl`, refreshed by each enqueue |
//! | `herald:qbytes:{cid}` | string | outbox | upper bound of the outbox's envelope bytes (`session.max_queued_bytes`) |
//! | `herald:sent:{cid}` | string | outbox | highest seq written to the wire and still queued then (DUP on resend) |
//! | `herald:session:{cid}` | string | outbox | present while the client has a persistent session |
//! | `herald:subs:{cid}` | HASH | outbox | filter -> QoS of a persistent session |
//! | `herald:subscribers` | SET | outbox | client ids with stored subscriptions (read at start) |
//! | `herald:retained` | HASH | outbox | topic -> envelope |
//! | `herald:route:{cid}` | HASH | cluster | node / inc / epoch of the client's connection; read by the outbox's enqueue script (see `scripts::ENQUEUE`) |
//! | `herald:epoch:{cid}` | string (INCR) | cluster | fencing counter of the client's connections |
//! | `herald:alive:{node}` | string, TTL | cluster | "<incarnation> <address>" while the node lives |
//! | `herald:nodes` | SET | cluster | node ids |
//! | `herald:filters:{node}` | SET | cluster | topic filters the node has subscribers for |
//! | `herald:interest` | string (INCR) | cluster | bumped whenever a node's filters change |
//! | `herald:sample` | string, PX | outbox | the sampling lease: which node samples the store next (`outbox::redis::sample`) |
//! | `herald:stats` | HASH, PX | outbox | the last sample: messages, oldest_born_us, sessions, routed |

use bytes::{BufMut, BytesMut};

use super::resp;

const PREFIX: &str = "herald:";

/// The keys of one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Seq,
    Outbox,
    Qbytes,
    Sent,
    Session,
    Subs,
    Route,
    Epoch,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Seq => "seq",
            Client::Outbox => "outbox",
            Client::Qbytes => "qbytes",
            Client::Sent => "sent",
            Client::Session => "session",
            Client::Subs => "subs",
            Client::Route => "route",
            Client::Epoch => "epoch",
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
/// (the sequence counter and the cluster's keys stay). Scripts take these as five
/// consecutive KEYS, in this order.
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
        assert_eq!(client(Client::Outbox, "d|1"), "herald:outbox:{d|1}");
        let mut b = BytesMut::new();
        put_client(&mut b, Client::Sent, "dev|1");
        assert_eq!(&b[..], b"$19\r\nherald:sent:{dev|1}\r\n");
        assert_eq!(alive("n1"), "herald:alive:{n1}");
        assert_eq!(filters("n1"), "herald:filters:{n1}");
        assert_eq!(session_state("a")[4], "herald:qbytes:{a}");
    }
}
