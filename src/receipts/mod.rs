//! Delivery receipts: what became of a message a backend pushed with `receipt=true`.
//!
//! A tracked message carries `Message::receipt` (stored in its envelope). Its states:
//! `queued` (in the outbox), `sent` (written to the device, not acknowledged), then one of
//! `acked` (the device's PUBACK for that exact seq), `expired` or `dropped`. The first final
//! state wins: a message redelivered after a crash and acknowledged again is reported once.
//!
//! - `mod.rs` (here): the id, the states, the event a webhook gets;
//! - `table.rs`: the memory store's records;
//! - `hooks.rs`: the queue of final states waiting for the webhook, and the task that POSTs
//!   them (at least once, with backoff, never on the delivery path);
//! - `adopt.rs`: with Redis, posting what a dead node left in its hook stream.
//!
//! Who writes what: the session notes `sent` and `acked` (`Outbox::note`), the store notes
//! `expired` when it reads an expired entry and `dropped` when it drops one. With Redis, the
//! records are `herald:rcpt:{cid}:<lineage>.<seq>` (`sent`) and `...<seq>.f` (the final
//! state), `"<state> <unix ms>"`, TTL `http.receipt_ttl`, each written `SET NX` by the
//! outbox's ack writer in the same pipeline as the acks;
//! a final state also goes to the node's hook stream, so that a node killed before its
//! webhook POST posts it after its restart. `queued` is not written: a message with no
//! record that is still in its outbox is queued.

mod adopt;
pub mod hooks;
mod table;

use std::sync::Arc;

use base64::Engine;
use serde_json::{json, Value};

use crate::message::{now_ms, Message};

pub use table::Table;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Queued,
    Sent,
    Acked,
    Expired,
    Dropped,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Sent => "sent",
            State::Acked => "acked",
            State::Expired => "expired",
            State::Dropped => "dropped",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "queued" => State::Queued,
            "sent" => State::Sent,
            "acked" => State::Acked,
            "expired" => State::Expired,
            "dropped" => State::Dropped,
            _ => return None,
        })
    }

    /// The states a webhook is told about; after one, the record no longer changes.
    pub fn is_final(self) -> bool {
        matches!(self, State::Acked | State::Expired | State::Dropped)
    }
}

/// What a receipt id names: the outbox entry (client, seq) in one copy of the client's keys
/// (`lineage`: after a failover that lost writes, a seq may name a newer message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptId {
    pub client: Arc<str>,
    pub seq: u64,
    pub lineage: u16,
}

/// Id layout version, the first byte: lets a later layout be told apart.
const ID_V1: u8 = 1;

impl ReceiptId {
    /// Opaque to users: base64url of version, lineage, seq, client id.
    pub fn encode(&self) -> String {
        let mut b = Vec::with_capacity(11 + self.client.len());
        b.push(ID_V1);
        b.extend_from_slice(&self.lineage.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(self.client.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// `None` for anything `encode` did not make.
    pub fn decode(s: &str) -> Option<ReceiptId> {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.as_bytes())
            .ok()?;
        if b.len() < 12 || b[0] != ID_V1 {
            return None;
        }
        let lineage = u16::from_be_bytes([b[1], b[2]]);
        let seq = u64::from_be_bytes(b[3..11].try_into().ok()?);
        let client = std::str::from_utf8(&b[11..]).ok()?;
        Some(ReceiptId {
            client: Arc::from(client),
            seq,
            lineage,
        })
    }
}

/// A state change of a tracked message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: ReceiptId,
    pub state: State,
    /// Unix milliseconds.
    pub at_ms: u64,
}

impl Event {
    /// What the webhook and `GET /v1/messages/{id}` say.
    pub fn json(&self) -> Value {
        json!({
            "id": self.id.encode(),
            "client_id": &*self.id.client,
            "state": self.state.name(),
            "at": rfc3339_ms(self.at_ms),
        })
    }

    /// What an event costs a queue in memory (its client id and fixed fields).
    pub fn size(&self) -> usize {
        64 + self.id.client.len()
    }
}

/// The state of a tracked message that is still in its outbox with no record: `queued`
/// (since it was stored), or `expired` (since its expiry) when its TTL ran out and no read
/// has removed it yet. `None` for a message that is not tracked.
pub fn unrecorded(msg: &Message) -> Option<(State, u64)> {
    if !msg.receipt {
        None
    } else if msg.is_expired(now_ms()) {
        Some((State::Expired, msg.expires_at))
    } else {
        Some((State::Queued, msg.born_us / 1000))
    }
}

/// A record as stored: `"<state> <unix ms>"`.
pub fn record(state: State, at_ms: u64) -> String {
    format!("{} {at_ms}", state.name())
}

pub fn parse_record(v: &[u8]) -> Option<(State, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (state, at) = s.split_once(' ')?;
    Some((State::parse(state)?, at.parse().ok()?))
}

pub fn rfc3339_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_roundtrip_and_refuse_garbage() {
        let id = ReceiptId {
            client: Arc::from("dev/ü 1"),
            seq: 1_764_000_000_000_123,
            lineage: 7,
        };
        assert_eq!(ReceiptId::decode(&id.encode()), Some(id));
        for bad in ["", "AQ", "not base64!", "AAAAAAAAAAAAAAAAAA"] {
            assert_eq!(ReceiptId::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn records_roundtrip() {
        assert_eq!(
            parse_record(record(State::Acked, 42).as_bytes()),
            Some((State::Acked, 42))
        );
        assert_eq!(parse_record(b"gone 1"), None);
        assert_eq!(parse_record(b"acked"), None);
        assert_eq!(rfc3339_ms(1_000), "1970-01-01T00:00:01.000Z");
    }
}
