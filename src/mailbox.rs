//! A live connection's mailbox: how the broker hands messages to a connection task.
//!
//! Deliberately small (a lock, a deque that allocates only when used, two flags) because every
//! idle connection owns one. For QoS 1/2 a mailbox item is only a hint: the message is already
//! in the outbox, so when the mailbox is full the hint is dropped and `lost_hint` tells the
//! connection to re-read its outbox. QoS 0 messages live only here and are dropped (counted)
//! when it is full, in messages or in bytes: that is what bounds the memory a slow reader
//! can cost. The connection takes only as many bytes as its write buffer has room for; the
//! rest waits here.
//!
//! The mailbox is also how a connection is told to close (takeover, keepalive expiry, server
//! shutdown) and where its keepalive clock lives: one broker-wide task checks every
//! connection's `last_seen` instead of each connection owning a timer.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use futures::task::AtomicWaker;
use parking_lot::Mutex;

use std::task::{Context, Poll};
use tokio::sync::Notify;

use crate::message::Message;
use crate::message::Qos;
use crate::metrics;

#[derive(Debug)]
pub enum Delivery {
    /// In the outbox under `seq`, to be sent at `qos` (1 or 2).
    Stored {
        seq: u64,
        qos: Qos,
        msg: Arc<Message>,
        /// Stored as live (`outbox::Entry::live`).
        live: bool,
    },
    /// QoS 0: exists nowhere else.
    Direct(Arc<Message>),
    /// QoS 1 but live only (a broadcast): in no outbox, so, like QoS 0, dropped when the
    /// mailbox is full, and not resent on another connection.
    Live(Arc<Message>),
}

impl Delivery {
    pub fn msg(&self) -> &Message {
        match self {
            Delivery::Stored { msg, .. } | Delivery::Direct(msg) | Delivery::Live(msg) => msg,
        }
    }
}

/// A mailbox's bounds (`session.max_mailbox`, `session.max_mailbox_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub count: usize,
    pub bytes: usize,
}

#[derive(Default)]
struct Queue {
    items: std::collections::VecDeque<Delivery>,
    /// `Message::size` summed over `items`.
    bytes: usize,
}

/// Why a connection was asked to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// A newer connection took the client id over.
    Takeover = 1,
    /// Silent for 1.5 times its keepalive.
    Keepalive = 2,
    /// The server is stopping.
    Shutdown = 3,
}

pub struct Mailbox {
    queue: Mutex<Queue>,
    /// The one connection task waiting on this mailbox; lighter than a `Notify`, which
    /// matters because the wait is part of every idle connection's state.
    waker: AtomicWaker,
    signal: AtomicBool,
    lost_hint: AtomicBool,
    kick: AtomicU8,
    done: AtomicBool,
    /// Unix ms of the last packet from the client.
    last_seen: AtomicU64,
    /// Highest outbox sequence number the connection has written (the cluster sweep
    /// compares it with the outbox to find lost forwards).
    seen: AtomicU64,
    /// 1.5 times the keepalive, in ms; 0 = no keepalive.
    expire_after: u64,
    /// Tells this connection from a newer one of the same client.
    conn_id: u64,
}

/// Wakes every `wait_done`: one for the process instead of one per mailbox, since only a
/// takeover waits and every idle connection would pay for its own.
static DONE: Notify = Notify::const_new();

impl Mailbox {
    pub fn new(keep_alive_secs: u16, conn_id: u64) -> Mailbox {
        Mailbox {
            queue: Mutex::new(Queue::default()),
            waker: AtomicWaker::new(),
            signal: AtomicBool::new(false),
            lost_hint: AtomicBool::new(false),
            kick: AtomicU8::new(0),
            done: AtomicBool::new(false),
            last_seen: AtomicU64::new(crate::message::now_ms()),
            seen: AtomicU64::new(0),
            expire_after: u64::from(keep_alive_secs) * 1500,
            conn_id,
        }
    }

    /// Queues `d` unless that would exceed `limits` (an empty mailbox takes one message of
    /// any size). False if it was not queued (a broadcast counts the devices it skipped).
    pub fn push(&self, d: Delivery, limits: Limits) -> bool {
        {
            let mut q = self.queue.lock();
            let size = d.msg().size();
            let over_bytes = !q.items.is_empty() && q.bytes + size > limits.bytes;
            if q.items.len() >= limits.count || over_bytes {
                if over_bytes {
                    metrics::limit_hit("session_max_mailbox_bytes");
                }
                match d {
                    Delivery::Direct(_) | Delivery::Live(_) => {
                        metrics::dropped(metrics::Drop::MailboxFull);
                        return false;
                    }
                    Delivery::Stored { .. } => {
                        self.lost_hint.store(true, Ordering::Release);
                    }
                }
                self.notify();
                return false;
            }
            q.bytes += size;
            q.items.push_back(d);
        }
        self.notify();
        true
    }

    fn notify(&self) {
        self.signal.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Moves deliveries into `out`, oldest first, while the encoded size estimate of what
    /// it took stays within `room` bytes; `alone`: the first may be larger than `room`
    /// (the caller's buffer is empty). True if deliveries are left.
    pub fn drain(&self, out: &mut Vec<Delivery>, mut room: usize, alone: bool) -> bool {
        let mut q = self.queue.lock();
        while let Some(d) = q.items.front() {
            let size = d.msg().size();
            let wire = crate::codec::publish_len(d.msg().topic.len(), d.msg().payload.len());
            if wire > room && !(alone && out.is_empty()) {
                break;
            }
            room = room.saturating_sub(wire);
            q.bytes -= size;
            if let Some(d) = q.items.pop_front() {
                out.push(d);
            }
        }
        if q.items.is_empty() && q.items.capacity() > 64 {
            q.items = Default::default();
        }
        !q.items.is_empty()
    }

    /// True once if a stored message's hint was dropped since the last call.
    pub fn take_lost_hint(&self) -> bool {
        self.lost_hint.swap(false, Ordering::AcqRel)
    }

    /// Ready when something was pushed or the connection was kicked since the last time it
    /// was ready. Only one task may wait.
    pub fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.signal.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Asks the connection to close. The first reason sticks.
    pub fn kick(&self, why: Kick) {
        let _ = self
            .kick
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
        self.notify();
    }

    pub fn kicked(&self) -> Option<Kick> {
        match self.kick.load(Ordering::Acquire) {
            1 => Some(Kick::Takeover),
            2 => Some(Kick::Keepalive),
            3 => Some(Kick::Shutdown),
            _ => None,
        }
    }

    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    pub fn saw(&self, seq: u64) {
        self.seen.store(seq, Ordering::Relaxed);
    }

    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    /// Makes the connection read its outbox again (as if a hint had been dropped).
    pub fn reread(&self) {
        self.lost_hint.store(true, Ordering::Release);
        self.notify();
    }

    /// A packet arrived from the client.
    pub fn touch(&self, now_ms: u64) {
        self.last_seen.store(now_ms, Ordering::Relaxed);
    }

    /// Wakes the connection with nothing to do but look again (its socket, its mailbox).
    pub fn wake(&self) {
        self.notify();
    }

    /// Bytes of the deliveries waiting (the census behind `herald_mailbox_bytes`).
    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().bytes
    }

    /// When the client's keepalive runs out: 1.5 times it after its last packet, counting
    /// silence from `silence_from` at the earliest. `None` without a keepalive.
    pub fn deadline(&self, silence_from: u64) -> Option<u64> {
        let last = self.last_seen.load(Ordering::Relaxed).max(silence_from);
        (self.expire_after > 0).then(|| last + self.expire_after)
    }

    /// The connection has finished (`mark_done`).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// The connection has finished its cleanup (will published, session saved).
    pub fn mark_done(&self) {
        self.done.store(true, Ordering::Release);
        DONE.notify_waiters();
    }

    pub async fn wait_done(self: &Arc<Self>) {
        loop {
            let notified = DONE.notified();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}
