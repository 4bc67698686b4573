//! Receipt records on the Redis store, written by the ack writer (`writer::write_loop`):
//! each state change is one `SET NX` in the same pipeline as the acks, so a receipt costs
//! no round trip of its own; the final states it reports go to the node's
//! hook stream (`scripts::HOOK`) in the next round trip, and only when a webhook is
//! configured.
//!
//! Between the two round trips a node can die having written `acked` but not the hook
//! entry: that receipt is readable by `GET /v1/messages/{id}` but not posted. The window
//! is one round trip; a webhook that is down (the case that matters) is covered, since the
//! hook entry is in Redis before any POST is tried.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::Notify;

use crate::metrics;
use crate::receipts::{self, hooks, Event};
use crate::redis::keys;
use crate::redis::resp::{self, Replies, Reply};
use crate::redis::{slots, Health, Hot, Part};

/// What the ack writer needs to write receipts.
pub(in crate::outbox) struct Notes {
    pub(in crate::outbox) hook_sha: String,
    /// `http.receipt_ttl` in ms.
    pub(in crate::outbox) ttl_ms: u64,
    /// With a webhook: the node's hook stream, its cap, and the poster to wake.
    pub(in crate::outbox) hook: Option<Hook>,
}

pub(in crate::outbox) struct Hook {
    pub(in crate::outbox) key: String,
    pub(in crate::outbox) cap: usize,
    pub(in crate::outbox) wake: Arc<Notify>,
}

/// Appends the write of `e`'s record; returns its slot. Two keys per message, each written
/// `SET NX`, so the first write of each stays with no script and no read: `sent` (a later
/// connection's resend keeps the first time) and the final state (the first of `acked`,
/// `expired`, `dropped` wins; its `OK` is what tells the webhook).
pub(super) fn encode(out: &mut BytesMut, notes: &Notes, e: &Event) -> u16 {
    let key = keys::receipt(&e.id.client, e.id.lineage, e.id.seq, e.state.is_final());
    resp::array(out, 6);
    resp::bulk(out, b"SET");
    resp::bulk(out, key.as_bytes());
    resp::bulk(out, receipts::record(e.state, e.at_ms).as_bytes());
    resp::bulk(out, b"NX");
    resp::bulk(out, b"PX");
    resp::bulk_u64(out, notes.ttl_ms);
    keys::client_slot(&e.id.client).unwrap_or_else(|| slots::key_slot(key.as_bytes()))
}

/// Reads the replies of a batch's records (`events` in order) from `r`: the events that
/// reached a final state now.
pub(super) fn finals<'e>(
    r: &mut Replies<'_>,
    events: &'e [Event],
    health: &Health,
) -> Result<Vec<&'e Event>, resp::Error> {
    let mut out = Vec::new();
    for e in events {
        match r.next()? {
            Reply::Status(_) if e.state.is_final() => out.push(e),
            Reply::Error(why) => {
                let _ = health.error_reply(why);
            }
            other => r.skip(other)?,
        }
        metrics::receipt(e.state.name());
    }
    Ok(out)
}

/// Appends `finals` to the hook stream, and wakes the poster.
pub(super) async fn hook(
    hot: &mut Hot,
    out: &mut BytesMut,
    notes: &Notes,
    finals: &[&Event],
    health: &Health,
) {
    let Some(hook) = notes.hook.as_ref().filter(|_| !finals.is_empty()) else {
        return;
    };
    out.clear();
    resp::array(out, 5 + 5 * finals.len());
    resp::bulk(out, b"EVALSHA");
    resp::bulk(out, notes.hook_sha.as_bytes());
    resp::bulk(out, b"1");
    resp::bulk(out, hook.key.as_bytes());
    resp::bulk_u64(out, hook.cap as u64);
    for e in finals {
        for (_, v) in hooks::stream_fields(e) {
            resp::bulk(out, v.as_bytes());
        }
    }
    let parts = [Part {
        slot: slots::key_slot(hook.key.as_bytes()),
        end: out.len(),
    }];
    let Ok(buf) = hot.round_trip_parts(out, &parts, 0, health).await else {
        return;
    };
    match Replies::new(buf).next() {
        Ok(Reply::Int(trimmed)) => {
            for _ in 0..trimmed {
                metrics::limit_hit("receipt_queue");
            }
        }
        Ok(Reply::Error(why)) => {
            let _ = health.error_reply(why);
        }
        _ => {}
    }
    hook.wake.notify_one();
}
