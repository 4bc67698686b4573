//! Packets from the client, one `handle_*` method per packet type (`handle_packet`
//! dispatches), and what they share: the ACL checks, the acknowledgement of stored
//! publishes (`published`) and the inbound QoS 2 state (`incoming_qos2`: packet ids taken,
//! so that a resend before PUBREL is acknowledged and not delivered twice).

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{reserved_topic, End, Session};
use crate::broker::SessionData;
use crate::codec::{self, Packet, Publish, Subscribe, Unsubscribe};
use crate::lograte::{self, Reason};
use crate::message::{Message, Now, Qos};
use crate::metrics::{self, Denied};
use crate::outbox::StoreError;
use crate::receipts::State;

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Session<S> {
    /// Decodes and handles every complete packet in `rbuf`.
    pub(super) async fn handle_input(&mut self) -> Result<(), End> {
        let max_packet = self.broker.config().server.max_packet_size;
        let mut now = Now::default();
        loop {
            match codec::decode(&mut self.rbuf, max_packet) {
                Ok(Some(p)) => self.handle_packet(p, &mut now).await?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    metrics::malformed();
                    if lograte::allow(Reason::Malformed) {
                        tracing::warn!(client = %self.client, error = %e, "closing connection");
                    }
                    return Err(End::Abnormal(e.to_string()));
                }
            }
        }
    }

    /// `now`: the clock of this batch of packets (message birth, delivery latency).
    async fn handle_packet(&mut self, p: Packet, now: &mut Now) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.handle_publish(p, now).await?,
            Packet::PubAck(pkid) => self.handle_puback(pkid, now).await?,
            Packet::PubRec(pkid) => self.handle_pubrec(pkid, now).await?,
            Packet::PubRel(pkid) => self.handle_pubrel(pkid),
            Packet::PubComp(pkid) => self.handle_pubcomp(pkid),
            Packet::Subscribe(s) => self.handle_subscribe(s).await?,
            Packet::Unsubscribe(u) => self.handle_unsubscribe(u).await?,
            Packet::PingReq => self.handle_pingreq(),
            Packet::Disconnect => self.handle_disconnect()?,
            Packet::Connect(_) => {
                metrics::malformed();
                return Err(End::Abnormal("second CONNECT".into()));
            }
        }
        Ok(())
    }

    async fn handle_publish(&mut self, p: Publish, now: &mut Now) -> Result<(), End> {
        metrics::received(p.qos as u8);
        let (qos, pkid) = (p.qos, p.pkid);
        if qos == Qos::ExactlyOnce
            && self
                .data
                .as_ref()
                .is_some_and(|d| d.incoming_qos2.contains(&pkid))
        {
            // A resend of a message we already took: acknowledge, do not route twice.
            codec::encode_pubrec(&mut self.wbuf, pkid);
            return Ok(());
        }
        if !self.may_publish(&p.topic) {
            // MQTT 3.1.1 has no negative PUBACK: like Mosquitto, finish the handshake and
            // drop the message, which never reaches a store or a receiver.
            tracing::debug!(client = %self.client, topic = %p.topic, "publish refused by the ACL");
            match qos {
                Qos::AtMostOnce => {}
                Qos::AtLeastOnce => codec::encode_puback(&mut self.wbuf, pkid),
                Qos::ExactlyOnce => codec::encode_pubrec(&mut self.wbuf, pkid),
            }
            return Ok(());
        }
        let msg = Message {
            topic: Arc::from(p.topic),
            // Own allocation: the read buffer it came in may hold other packets, and a stored
            // message can live for days.
            payload: Bytes::copy_from_slice(&p.payload),
            qos,
            retain: p.retain,
            expires_at: 0,
            born_us: now.us(),
            forwarded: false,
            receipt: false,
        };
        let size = msg.size();
        self.publisher = true;
        let stored = self.broker.publish(msg);
        if self.broker.outbox().is_remote() {
            // Stored concurrently with the next publishes instead of one round trip each.
            if qos == Qos::ExactlyOnce {
                self.data_mut().incoming_qos2.insert(pkid);
            }
            let p = self.pending.get_or_insert_with(Default::default);
            if qos == Qos::ExactlyOnce {
                p.qos2.push(pkid);
            }
            p.bytes += size;
            p.stores
                .push_back(Box::pin(async move { (qos, pkid, size, stored.await) }));
            return Ok(());
        }
        let r = stored.await;
        self.published(qos, pkid, r)
    }

    /// A publish from this client is stored (or not): acknowledge it.
    pub(super) fn published(
        &mut self,
        qos: Qos,
        pkid: u16,
        r: Result<(), StoreError>,
    ) -> Result<(), End> {
        if qos == Qos::ExactlyOnce {
            if let Some(p) = self.pending.as_mut() {
                p.qos2.retain(|&p| p != pkid);
            }
            if r.is_err() {
                // Not stored: the resend after reconnecting must be taken, not skipped.
                if let Some(d) = self.data.as_mut() {
                    d.incoming_qos2.remove(&pkid);
                }
            }
        }
        if let Err(e) = r {
            // No acknowledgement: closing makes the client resend after reconnecting.
            if lograte::allow(Reason::NotStored) {
                tracing::warn!(client = %self.client, error = %e, "publish not stored");
            }
            if let Some(p) = self.pending.as_mut() {
                p.not_stored = true;
            }
            return Err(End::Abnormal(format!("store: {e}")));
        }
        // Publishes after one that was not stored may be stored all the same (a store that
        // fails one call and not the next: one slot's error, WAIT short on one shard), and
        // `finish` drains them. Acknowledging them would break publish order (MQTT 3.1.1,
        // 4.6): the client would see a later message acknowledged and resend only the
        // earlier one, which its receiver then gets after the later one. Unacknowledged,
        // both are resent in order (a duplicate at most).
        let withhold = self.pending.as_ref().is_some_and(|p| p.not_stored);
        match qos {
            Qos::AtMostOnce => {}
            Qos::AtLeastOnce if withhold => {}
            Qos::AtLeastOnce => codec::encode_puback(&mut self.wbuf, pkid),
            Qos::ExactlyOnce => {
                // Stored: its resend must be recognised, acknowledged or not.
                self.data_mut().incoming_qos2.insert(pkid);
                if !withhold {
                    codec::encode_pubrec(&mut self.wbuf, pkid);
                }
            }
        }
        Ok(())
    }

    /// PUBACK for a QoS 1 message we sent.
    async fn handle_puback(&mut self, pkid: u16, now: &mut Now) -> Result<(), End> {
        self.acked(pkid, Qos::AtLeastOnce, now).await?;
        Ok(())
    }

    /// PUBREC for a QoS 2 message we sent: it leaves the outbox and waits for PUBCOMP. A
    /// PUBREC for one already released (a resend) is answered again.
    async fn handle_pubrec(&mut self, pkid: u16, now: &mut Now) -> Result<(), End> {
        if self.acked(pkid, Qos::ExactlyOnce, now).await? || self.awaiting_pubcomp(pkid) {
            if !self.awaiting_pubcomp(pkid) {
                self.data_mut().awaiting_pubcomp.push(pkid);
            }
            codec::encode_pubrel(&mut self.wbuf, pkid);
        }
        Ok(())
    }

    /// PUBREL for a QoS 2 message from the client: its packet id is free again.
    fn handle_pubrel(&mut self, pkid: u16) {
        if let Some(d) = self.data.as_mut() {
            d.incoming_qos2.remove(&pkid);
        }
        codec::encode_pubcomp(&mut self.wbuf, pkid);
    }

    /// PUBCOMP ends a QoS 2 message we sent.
    fn handle_pubcomp(&mut self, pkid: u16) {
        if let Some(d) = self.data.as_mut() {
            d.awaiting_pubcomp.retain(|&p| p != pkid);
        }
    }

    async fn handle_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let mut codes = Vec::with_capacity(s.filters.len());
        for (filter, qos) in &s.filters {
            codes.push(match filter {
                Ok(f) if !self.may_subscribe(f) => {
                    tracing::debug!(client = %self.client, filter = %f, "subscription refused by the ACL");
                    0x80
                }
                Ok(f) => self
                    .broker
                    .subscribe(&self.client, !self.clean, f, *qos)
                    .await
                    .map_err(|e| End::Abnormal(format!("store: {e}")))?,
                Err(f) => {
                    if lograte::allow(Reason::InvalidFilter) {
                        tracing::info!(client = %self.client, filter = %f, "invalid topic filter refused");
                    }
                    0x80
                }
            });
        }
        codec::encode_suback(&mut self.wbuf, s.pkid, &codes);
        // A filter named twice in one SUBSCRIBE gets its retained messages once, at
        // its last grant: 1,000 copies of one filter must not send 1,000 copies.
        let mut seen = std::collections::HashSet::new();
        let mut last = vec![false; codes.len()];
        for (i, (filter, _)) in s.filters.iter().enumerate().rev() {
            last[i] = filter.as_ref().is_ok_and(|f| seen.insert(f.as_str()));
        }
        drop(seen);
        for (((filter, _), code), last) in s.filters.iter().zip(&codes).zip(last) {
            if let (Ok(f), Some(granted), true) = (filter, Qos::try_from(*code).ok(), last) {
                let qos0 = self
                    .broker
                    .send_retained(&self.client, f, granted)
                    .await
                    .map_err(|e| End::Abnormal(format!("store: {e}")))?;
                self.queue_retained(qos0);
            }
        }
        Ok(())
    }

    async fn handle_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), End> {
        for f in &u.topics {
            self.broker
                .unsubscribe(&self.client, !self.clean, f)
                .await
                .map_err(|e| End::Abnormal(format!("store: {e}")))?;
        }
        codec::encode_unsuback(&mut self.wbuf, u.pkid);
        Ok(())
    }

    fn handle_pingreq(&mut self) {
        codec::encode_pingresp(&mut self.wbuf);
    }

    /// The client's own end: its will is not published (`End::Clean`).
    fn handle_disconnect(&self) -> Result<(), End> {
        Err(End::Clean)
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) for an in-flight message: delete it from the outbox.
    /// Ends the connection if the store lost the copy of the outbox it was read from.
    async fn acked(&mut self, pkid: u16, qos: Qos, now: &mut Now) -> Result<bool, End> {
        let Some(i) = self
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.qos == qos)
        else {
            return Ok(false);
        };
        let f = self.inflight.remove(i);
        let seq = f.seq;
        metrics::delivered(f.path, f.replay, f.born_us, now);
        if seq == super::NOT_STORED {
            return Ok(true);
        }
        metrics::acked();
        if !self
            .broker
            .outbox()
            .ack(&self.client, seq, self.lineage)
            .await
        {
            return Err(End::store_lost_writes());
        }
        if f.receipt {
            self.note(seq, State::Acked).await;
        }
        Ok(true)
    }

    /// Herald's internal topics are never a client's; the rest is the ACL's to say (which
    /// counts its refusals).
    fn may_publish(&self, topic: &str) -> bool {
        if reserved_topic(topic) {
            metrics::acl_denied(Denied::Publish);
            return false;
        }
        match self.extras.as_ref().and_then(|x| x.principal.as_ref()) {
            Some(p) => self.broker.auth().may_publish(p, &self.client, topic),
            None => true,
        }
    }

    fn may_subscribe(&self, filter: &str) -> bool {
        if reserved_topic(filter) {
            metrics::acl_denied(Denied::Subscribe);
            return false;
        }
        match self.extras.as_ref().and_then(|x| x.principal.as_ref()) {
            Some(p) => self.broker.auth().may_subscribe(p, &self.client, filter),
            None => true,
        }
    }

    fn data_mut(&mut self) -> &mut SessionData {
        self.data.get_or_insert_with(Default::default)
    }
}
