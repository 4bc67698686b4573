//! What goes to the client: deliveries from the mailbox, entries read from the outbox (in
//! order, a window at a time), resends with DUP after the sent watermark, retained QoS 0
//! messages waiting for room, all within the write buffer's byte budget
//! (`server.max_write_buffer`). The socket itself is written by `Session::poll_io`.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, InFlight, Session, NOT_STORED};
use crate::codec;
use crate::mailbox::Delivery;
use crate::message::{packet_id, Message, Now, Qos};
use crate::metrics;
use crate::outbox::{Entry, StoreError};
use crate::receipts::State;

/// Retained QoS 0 messages one connection may have waiting (`Pending::retained`); more
/// are dropped and counted.
const MAX_RETAINED_WAITING: usize = 100_000;

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Session<S> {
    /// Takes what the mailbox holds, as much as the write buffer has room for: QoS 0
    /// messages are written, stored ones sent if they are next in line. What does not fit
    /// stays in the mailbox (`mail` stays set) until the socket takes more.
    pub(super) async fn take_mail(&mut self) -> Result<(), End> {
        let mut deliveries = Vec::new();
        let room = self.write_room();
        self.mail = self
            .mailbox
            .drain(&mut deliveries, room, self.wbuf.is_empty());
        let mut now = Now::default();
        let mut behind = false;
        for d in deliveries {
            behind |= self.take_delivery(d, &mut now).await;
        }
        if self.mailbox.take_lost_hint() {
            self.backlog = true;
        }
        // An entry numbered below the cursor: usually a hint that came late, but also what a
        // failover that lost entries this connection read looks like (the numbers are used
        // again): then the connection ends and its device reads the outbox as it is now.
        if behind && !self.broker.outbox().is_current(&self.client, self.lineage) {
            return Err(End::store_lost_writes());
        }
        Ok(())
    }

    /// True for an outbox entry numbered below the cursor.
    async fn take_delivery(&mut self, d: Delivery, now: &mut Now) -> bool {
        match d {
            Delivery::Direct(msg) => {
                if !self.may_read(&msg.topic) {
                    return false;
                }
                codec::encode_publish(
                    &mut self.wbuf,
                    &msg.topic,
                    &msg.payload,
                    Qos::AtMostOnce,
                    0,
                    msg.retain,
                    false,
                );
                metrics::sent(0);
                metrics::delivered(path_of(&msg), false, msg.born_us, now);
            }
            Delivery::Live(msg) => {
                if self.may_read(&msg.topic) {
                    self.send_live(&msg);
                }
            }
            Delivery::Stored {
                seq,
                qos,
                msg,
                live,
            } => {
                if seq < self.next_seq {
                    return true;
                }
                if self.backlog {
                    return false;
                }
                // Before the first entry of a connection there is no cursor to compare with
                // (`next_seq` 0), and hints may arrive out of order (a remote store finishes
                // publishes in batches, forwards from other nodes overtake each other):
                // taking the first hint as the start could skip a lower number whose hint
                // comes next. The first entry is read from the outbox instead.
                let in_order = seq == self.next_seq && self.next_seq != 0;
                if in_order
                    && self.window_free() > 0
                    && self.fits(&msg)
                    && self
                        .send_entry(Entry {
                            seq,
                            qos,
                            msg,
                            live,
                        })
                        .await
                {
                    return false;
                }
                // A gap or a full window: the outbox has it, read it from there in order.
                self.backlog = true;
            }
        }
        false
    }

    /// Reads queued entries from the outbox while the window has room.
    pub(super) async fn fill_window(&mut self) -> Result<(), StoreError> {
        while self.backlog
            && self.window_free() > 0
            && self.wbuf.len() < self.broker.config().server.max_write_buffer
        {
            let want = self.window_free();
            let entries = self
                .broker
                .outbox()
                .fetch(&self.client, self.next_seq, want)
                .await?;
            let complete = entries.len() < want;
            for e in entries {
                if !self.fits(&e.msg) {
                    // Read again from `next_seq` once the socket has taken more.
                    metrics::limit_hit("server_max_write_buffer");
                    return Ok(());
                }
                if !self.send_entry(e).await {
                    return Ok(());
                }
            }
            if complete {
                self.backlog = false;
            }
        }
        Ok(())
    }

    /// Writes one outbox entry. False if its packet id is still taken (a stuck message
    /// 65535 entries back), in which case it waits.
    async fn send_entry(&mut self, e: Entry) -> bool {
        let pkid = packet_id(e.seq);
        if self.inflight.iter().any(|f| f.pkid == pkid) || self.awaiting_pubcomp(pkid) {
            return false;
        }
        if !self.may_read(&e.msg.topic) {
            // Removed as if acknowledged, and counted: the reader lost the right to it.
            self.next_seq = e.seq + 1;
            self.mailbox.saw(e.seq);
            // A lineage that changed is noticed by the next PUBACK or delivery.
            let _ = self
                .broker
                .outbox()
                .ack(&self.client, e.seq, self.lineage)
                .await;
            if e.msg.receipt {
                self.note(e.seq, State::Dropped).await;
            }
            return true;
        }
        let dup = e.seq <= self.sent_watermark
            || (e.live && self.pending.as_ref().is_some_and(|p| e.seq <= p.replay_to));
        codec::encode_publish(
            &mut self.wbuf,
            &e.msg.topic,
            &e.msg.payload,
            e.qos,
            pkid,
            e.msg.retain,
            dup,
        );
        metrics::sent(e.qos as u8);
        if dup {
            metrics::redelivered();
        }
        self.inflight.push(InFlight {
            seq: e.seq,
            pkid,
            qos: e.qos,
            born_us: e.msg.born_us,
            path: path_of(&e.msg),
            // The connection id is when it started (`Broker::new_conn_id`).
            replay: e.msg.born_us < self.mailbox.conn_id(),
            receipt: e.msg.receipt,
        });
        if e.msg.receipt {
            self.note(e.seq, State::Sent).await;
        }
        self.next_seq = e.seq + 1;
        self.mailbox.saw(e.seq);
        if !dup && !e.live {
            // Entries sent in order: the newest watermark covers the ones before it. A live
            // entry needs none: a later connection resends every live one with DUP.
            if let Some(gate) = self.broker.outbox().mark_sent(&self.client, e.seq).await {
                self.sent_gate = Some(gate);
            }
        }
        true
    }

    /// A tracked message's state changed (`receipts`). The future owns what it needs: a
    /// session is not `Sync`, so no borrow of it may be held across an await.
    pub(super) fn note(&self, seq: u64, state: State) -> impl Future<Output = ()> + Send {
        let (broker, client, lineage) = (self.broker.clone(), self.client.clone(), self.lineage);
        async move { broker.outbox().note(&client, seq, lineage, state).await }
    }

    /// Writes a live-only QoS 1 message (a broadcast). Its packet id is not an outbox
    /// entry's: half the id space ahead of the next entry's, or the first free one after
    /// it. So no entry in flight has it, and an entry that comes to need it while it is in
    /// flight waits for its PUBACK (`send_entry`): 32,768 entries later, or by chance before
    /// the connection's first outbox read (the cursor is still 0).
    fn send_live(&mut self, msg: &Message) {
        let mut pkid = packet_id(self.next_seq.wrapping_add(32_768));
        // Ends: fewer than 65,535 ids are in use (`session.max_inflight` <= 1024).
        while self.inflight.iter().any(|f| f.pkid == pkid) || self.awaiting_pubcomp(pkid) {
            pkid = pkid % u16::MAX + 1;
        }
        codec::encode_publish(
            &mut self.wbuf,
            &msg.topic,
            &msg.payload,
            Qos::AtLeastOnce,
            pkid,
            false,
            false,
        );
        metrics::sent(1);
        self.inflight.push(InFlight {
            seq: NOT_STORED,
            pkid,
            qos: Qos::AtLeastOnce,
            born_us: msg.born_us,
            path: path_of(msg),
            replay: false,
            receipt: false,
        });
    }

    pub(super) fn window_free(&self) -> usize {
        let used = self.inflight.len() + self.data.as_ref().map_or(0, |d| d.awaiting_pubcomp.len());
        self.broker
            .config()
            .session
            .max_inflight
            .saturating_sub(used)
    }

    /// Bytes the write buffer may still take (`server.max_write_buffer`).
    fn write_room(&self) -> usize {
        self.broker
            .config()
            .server
            .max_write_buffer
            .saturating_sub(self.wbuf.len())
    }

    /// Whether a PUBLISH of `msg` may be appended now: within the budget, or alone in an
    /// empty buffer (a message larger than the budget still goes out, by itself).
    fn fits(&self, msg: &Message) -> bool {
        self.wbuf.is_empty()
            || codec::publish_len(msg.topic.len(), msg.payload.len()) <= self.write_room()
    }

    /// Queues retained QoS 0 messages for `write_retained`, up to `MAX_RETAINED_WAITING`.
    pub(super) fn queue_retained(&mut self, msgs: Vec<Arc<Message>>) {
        if msgs.is_empty() {
            return;
        }
        let p = self.pending.get_or_insert_with(Default::default);
        for m in msgs {
            if p.retained.len() >= MAX_RETAINED_WAITING {
                metrics::dropped(metrics::Drop::MailboxFull);
                metrics::limit_hit("retained_waiting");
                continue;
            }
            p.retained.push_back(m);
        }
    }

    pub(super) fn has_retained(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| !p.retained.is_empty())
    }

    /// Writes waiting retained QoS 0 messages while the write buffer has room.
    pub(super) fn write_retained(&mut self) {
        while let Some(msg) = self
            .pending
            .as_mut()
            .and_then(|p| p.retained.front().cloned())
        {
            if !self.fits(&msg) {
                return;
            }
            if let Some(p) = self.pending.as_mut() {
                p.retained.pop_front();
            }
            if self.may_read(&msg.topic) {
                codec::encode_publish(
                    &mut self.wbuf,
                    &msg.topic,
                    &msg.payload,
                    Qos::AtMostOnce,
                    0,
                    true,
                    false,
                );
                metrics::sent(0);
            }
        }
        if let Some(p) = self.pending.as_mut() {
            if p.retained.is_empty() && p.retained.capacity() > 64 {
                p.retained = Default::default();
            }
        }
    }

    /// Read access at delivery (only with authentication on); a refusal drops the message,
    /// counted.
    fn may_read(&self, topic: &str) -> bool {
        let Some(p) = self.extras.as_ref().and_then(|x| x.principal.as_ref()) else {
            return true;
        };
        if self.broker.auth().may_read(p, &self.client, topic) {
            return true;
        }
        metrics::dropped(metrics::Drop::AclDenied);
        tracing::debug!(client = %self.client, topic = %topic, "not delivered: the ACL no longer allows reading it");
        false
    }
}

fn path_of(msg: &Message) -> metrics::Path {
    if msg.forwarded {
        metrics::Path::Forwarded
    } else {
        metrics::Path::Local
    }
}
