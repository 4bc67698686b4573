//! A live connection's mailbox: how the broker hands messages to a connection task.
//!
//! Deliberately small (a lock, a deque that allocates only when used, two flags) because every
//! idle connection owns one. For QoS 1/2 a mailbox item is only a hint: the message is already
//! in the outbox, so when the mailbox is full the hint is dropped and `lost_hint` tells the
//! connection to re-read its outbox. QoS 0 messages live only here and are dropped (counted)
//! when it is full: that is what bounds the memory a slow reader can cost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
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

pub struct Mailbox {
    queue: Mutex<VecDeque<Delivery>>,
    wake: Notify,
    lost_hint: AtomicBool,
    kicked: AtomicBool,
    done: AtomicBool,
    /// Wakes `wait_done` and `wait_kicked`; each re-checks its own flag.
    state_wake: Notify,
    cap: usize,
}

impl Mailbox {
    pub fn new(cap: usize) -> Mailbox {
        Mailbox {
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            lost_hint: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            done: AtomicBool::new(false),
            state_wake: Notify::new(),
            cap,
        }
    }

    pub fn push(&self, d: Delivery) {
        {
            let mut q = self.queue.lock();
            if q.len() >= self.cap {
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
                q.push_back(d);
            }
        }
        self.wake.notify_one();
    }

    /// Moves everything queued into `out`.
    pub fn drain(&self, out: &mut VecDeque<Delivery>) {
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

    pub async fn wait(&self) {
        self.wake.notified().await
    }

    /// Asks the connection to close (a newer connection took the client id over).
    pub fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        self.wake.notify_one();
        self.state_wake.notify_waiters();
    }

    pub fn is_kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    /// Resolves once the connection has been kicked. A connection with a full write buffer
    /// stops waiting on `wait` (it takes no deliveries), and a peer that stopped reading is
    /// exactly the half-dead connection a takeover replaces: this is how it still hears.
    pub async fn wait_kicked(&self) {
        loop {
            let notified = self.state_wake.notified();
            if self.is_kicked() {
                return;
            }
            notified.await;
        }
    }

    /// The connection has finished its cleanup (will published, session saved).
    pub fn mark_done(&self) {
        self.done.store(true, Ordering::Release);
        self.state_wake.notify_waiters();
    }

    pub async fn wait_done(self: &Arc<Self>) {
        loop {
            let notified = self.state_wake.notified();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}
