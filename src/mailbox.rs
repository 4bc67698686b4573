//! A live connection's mailbox: how the broker hands messages to a connection task.
//!
//! Deliberately small (a lock, a deque that allocates only when used, two flags) because every
//! idle connection owns one. For QoS 1/2 a mailbox item is only a hint: the message is already
//! in the outbox, so when the mailbox is full the hint is dropped and `lost_hint` tells the
//! connection to re-read its outbox. QoS 0 messages live only here and are dropped (counted)
//! when it is full: that is what bounds the memory a slow reader can cost.
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

use crate::codec::Qos;
use crate::metrics;
use crate::outbox::Message;

#[derive(Debug)]
pub enum Delivery {
    /// In the outbox under `seq`, to be sent at `qos` (1 or 2).
    Stored {
        seq: u64,
        qos: Qos,
        msg: Arc<Message>,
    },
    /// QoS 0: exists nowhere else.
    Direct(Arc<Message>),
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
    queue: Mutex<Vec<Delivery>>,
    /// The one connection task waiting on this mailbox; lighter than a `Notify`, which
    /// matters because the wait is part of every idle connection's state.
    waker: AtomicWaker,
    signal: AtomicBool,
    lost_hint: AtomicBool,
    /// The connection could not read its outbox and wants a wake-up from the periodic pass.
    retry: AtomicBool,
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
            queue: Mutex::new(Vec::new()),
            waker: AtomicWaker::new(),
            signal: AtomicBool::new(false),
            lost_hint: AtomicBool::new(false),
            retry: AtomicBool::new(false),
            kick: AtomicU8::new(0),
            done: AtomicBool::new(false),
            last_seen: AtomicU64::new(crate::outbox::now_ms()),
            seen: AtomicU64::new(0),
            expire_after: u64::from(keep_alive_secs) * 1500,
            conn_id,
        }
    }

    /// Queues `d` unless `cap` items wait already (`session.max_mailbox`).
    pub fn push(&self, d: Delivery, cap: usize) {
        {
            let mut q = self.queue.lock();
            if q.len() >= cap {
                match d {
                    Delivery::Direct(_) => {
                        metrics::dropped(metrics::Drop::MailboxFull);
                        return;
                    }
                    Delivery::Stored { .. } => {
                        self.lost_hint.store(true, Ordering::Release);
                    }
                }
            } else {
                q.push(d);
            }
        }
        self.notify();
    }

    fn notify(&self) {
        self.signal.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Moves everything queued into `out`.
    pub fn drain(&self, out: &mut Vec<Delivery>) {
        let mut q = self.queue.lock();
        out.append(&mut q);
        if q.capacity() > 64 {
            q.shrink_to_fit();
        }
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

    /// Asks the periodic pass for a wake-up (after a failed outbox read).
    pub fn want_retry(&self) {
        self.retry.store(true, Ordering::Release);
    }

    /// The periodic pass: kicks the connection if the client has been silent for 1.5 times
    /// its keepalive, and wakes it if it asked for a retry.
    pub fn check(&self, now_ms: u64) {
        if self.retry.swap(false, Ordering::AcqRel) {
            self.notify();
        }
        if self.expire_after > 0
            && now_ms.saturating_sub(self.last_seen.load(Ordering::Relaxed)) >= self.expire_after
        {
            self.kick(Kick::Keepalive);
        }
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
