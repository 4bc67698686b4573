//! Broadcast: one payload to every device connected to this node right now, each on its own
//! push topic (`POST /v1/broadcast` here, or a peer's `$cluster/bcast` frame).
//!
//! Live only: nothing is written to any outbox. Storing it for offline devices would be one
//! outbox write per device that ever connected (millions), for a message that is only worth
//! something now; a device that is offline, or whose mailbox is full, does not get it.
//!
//! It must not hold up other deliveries. The connections are listed in one pass over the
//! client table (as the gauges' `Broker::census` does every few seconds), then handed the
//! message `CHUNK` at a time, the task yielding between chunks so that the worker thread
//! serves connections and stores in between. A hand-off is `Mailbox::push`: a short lock and
//! a deque push, never a wait; a full mailbox skips that device (counted).

use std::sync::Arc;

use bytes::Bytes;

use crate::broker::Broker;
use crate::mailbox::Delivery;
use crate::message::{now_us, Message, Qos};
use crate::metrics;

/// Devices handed the message between two yields: small enough that a chunk takes tens of
/// microseconds, large enough that the yields cost little next to the pushes.
const CHUNK: usize = 256;

/// Fan-outs running at once on this node; the next ones wait their turn. Each holds a list
/// of every connection while it runs: a backend sending many broadcasts at once must not
/// make the node hold that many lists.
static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// What a fan-out on this node did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanned {
    /// Devices whose mailbox took the message.
    pub handed: u64,
    /// Devices skipped: their mailbox was full.
    pub skipped: u64,
}

/// Hands `payload` to every connection on this node at `qos`. `from_peer`: asked by another
/// node (the delivery metrics' `path` label).
pub async fn fan_out(broker: &Broker, payload: Bytes, qos: Qos, from_peer: bool) -> Fanned {
    let mut fanned = Fanned::default();
    let Some(template) = broker.push_template() else {
        return fanned;
    };
    // Never closed, so the permit always comes.
    let _turn = RUNNING.acquire().await.ok();
    metrics::broadcast();
    let limits = broker.mailbox_limits();
    let born_us = now_us();
    let connected = broker.connected();
    for (i, chunk) in connected.chunks(CHUNK).enumerate() {
        if i > 0 {
            tokio::task::yield_now().await;
        }
        for (client, mailbox) in chunk {
            let msg = Arc::new(Message {
                topic: Arc::from(template.topic_for(client)),
                payload: payload.clone(),
                qos,
                retain: false,
                expires_at: 0,
                born_us,
                forwarded: from_peer,
                receipt: false,
            });
            if mailbox.push(delivery(msg), limits) {
                fanned.handed += 1;
            } else {
                fanned.skipped += 1;
            }
        }
    }
    metrics::broadcast_devices(fanned.handed, fanned.skipped);
    fanned
}

fn delivery(msg: Arc<Message>) -> Delivery {
    match msg.qos {
        Qos::AtMostOnce => Delivery::Direct(msg),
        _ => Delivery::Live(msg),
    }
}
