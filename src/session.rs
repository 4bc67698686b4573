//! One client connection, from CONNECT to close: the MQTT protocol state machine.
//!
//! A single task per connection reads packets, drains the mailbox and writes, so the
//! per-connection state needs no locks. Memory at idle is kept near the minimum: the read and
//! write buffers are released whenever they are empty (socket reads go through one scratch
//! buffer per worker thread), and keepalive is one timer that is re-armed only when it fires.
//!
//! Outbound QoS 1/2 follows the outbox: `next_seq` is the first sequence number not yet
//! written; `backlog` says the outbox may hold entries the connection has not seen (start of
//! session, a dropped hint, a full window). While `backlog` is set, mailbox hints are ignored
//! and entries are read from the outbox in order, which is what makes replay come before any
//! newer live message.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use mqttbytes::v4::{Connect, Publish};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, SessionData};
use crate::codec::{self, DecodeError, Packet, Qos};
use crate::mailbox::{Delivery, Mailbox};
use crate::metrics;
use crate::outbox::{packet_id, Entry, Message, StoreError};
use crate::router::ClientId;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; 16 * 1024].into_boxed_slice());
}

/// Reads whatever the socket has into `dst` without keeping a buffer of its own while idle.
async fn read_some<R: AsyncRead + Unpin>(reader: &mut R, dst: &mut BytesMut) -> io::Result<usize> {
    poll_fn(|cx| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let mut rb = ReadBuf::new(&mut s[..]);
            ready!(Pin::new(&mut *reader).poll_read(cx, &mut rb))?;
            dst.extend_from_slice(rb.filled());
            Poll::Ready(Ok(rb.filled().len()))
        })
    })
    .await
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT received: no will.
    Clean,
    /// Server shutdown: no will, the broker is going away.
    Shutdown,
    /// Anything else: the will is published.
    Abnormal(String),
}

pub struct Connection<S> {
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    shutdown: CancellationToken,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(
        broker: Arc<Broker>,
        stream: S,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Self {
        Connection {
            broker,
            stream,
            peer,
            shutdown,
        }
    }

    pub async fn run(mut self) {
        let mut rbuf = BytesMut::new();
        let timeout = self.broker.config.server.connect_timeout;
        let shutdown = self.shutdown.clone();
        let first = tokio::select! {
            r = tokio::time::timeout(timeout, self.read_first(&mut rbuf)) => r,
            _ = shutdown.cancelled() => return,
        };
        let connect = match first {
            Err(_) => {
                metrics::connect_timeout();
                tracing::debug!(peer = %self.peer, "no CONNECT in time");
                return;
            }
            Ok(Err(Some(DecodeError::UnsupportedProtocol(level)))) => {
                tracing::info!(peer = %self.peer, level, "unsupported protocol level");
                let mut out = BytesMut::new();
                codec::encode_connack(&mut out, false, 1);
                let _ = self.stream.write_all(&out).await;
                return;
            }
            Ok(Err(Some(e))) => {
                metrics::malformed();
                tracing::warn!(peer = %self.peer, error = %e, "bad first packet");
                return;
            }
            Ok(Err(None)) => return,
            Ok(Ok(c)) => c,
        };
        let (reader, writer) = tokio::io::split(self.stream);
        let mut session = match Session::start(self.broker, connect, self.peer, writer).await {
            Some(s) => s,
            None => return,
        };
        let end = session.run(reader, rbuf, self.shutdown).await;
        session.finish(end).await;
    }

    /// Reads until one whole packet arrives; it must be CONNECT. `Err(None)`: socket closed.
    async fn read_first(&mut self, rbuf: &mut BytesMut) -> Result<Connect, Option<DecodeError>> {
        let max = self.broker.config.server.max_packet_size;
        loop {
            match codec::decode(rbuf, max) {
                Ok(Some(Packet::Connect(c))) => return Ok(c),
                Ok(Some(_)) => {
                    return Err(Some(DecodeError::Malformed("first packet is not CONNECT")))
                }
                Ok(None) => {}
                Err(e) => return Err(Some(e)),
            }
            match read_some(&mut self.stream, rbuf).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    }
}

/// Publishes from this client still being stored (Redis), in arrival order: their PUBACKs go
/// out in the same order, and the socket is not read while this many are outstanding.
const MAX_PENDING_PUBLISHES: usize = 1024;

type PendingPublish =
    Pin<Box<dyn std::future::Future<Output = (Qos, u16, Result<(), StoreError>)> + Send>>;

struct InFlight {
    seq: u64,
    pkid: u16,
    qos: Qos,
}

struct Session<W> {
    broker: Arc<Broker>,
    client: ClientId,
    peer: SocketAddr,
    conn_id: u64,
    clean: bool,
    will: Option<Message>,
    keep_alive: Option<Duration>,
    mailbox: Arc<Mailbox>,
    writer: W,
    wbuf: BytesMut,
    data: SessionData,
    inflight: VecDeque<InFlight>,
    next_seq: u64,
    backlog: bool,
    sent_watermark: u64,
    pending: FuturesOrdered<PendingPublish>,
}

impl<W: AsyncWrite + Unpin> Session<W> {
    /// Answers CONNECT. `None` if the connection is refused or the socket fails.
    async fn start(
        broker: Arc<Broker>,
        c: Connect,
        peer: SocketAddr,
        mut writer: W,
    ) -> Option<Self> {
        let mut out = BytesMut::new();
        let mut client_id = c.client_id;
        if client_id.is_empty() {
            if !c.clean_session {
                codec::encode_connack(&mut out, false, 2);
                let _ = writer.write_all(&out).await;
                return None;
            }
            client_id = broker.assign_client_id();
        }
        let client: ClientId = Arc::from(client_id);
        let mailbox = Arc::new(Mailbox::new(broker.config.session.max_mailbox));
        let attached = match broker
            .attach(&client, c.clean_session, mailbox.clone())
            .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(client = %client, error = %e, "store unavailable, refusing CONNECT");
                codec::encode_connack(&mut out, false, 3);
                let _ = writer.write_all(&out).await;
                mailbox.mark_done();
                return None;
            }
        };
        tracing::debug!(client = %client, peer = %peer, clean = c.clean_session, "connected");
        codec::encode_connack(&mut out, attached.session_present, 0);
        let will = c.last_will.map(|w| Message {
            topic: Arc::from(w.topic),
            payload: Bytes::copy_from_slice(&w.message),
            qos: w.qos,
            retain: w.retain,
            expires_at: 0,
        });
        let mut s = Session {
            keep_alive: (c.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(c.keep_alive) * 1500)),
            clean: c.clean_session,
            conn_id: attached.conn_id,
            sent_watermark: attached.sent_watermark,
            data: attached.data,
            broker,
            client,
            peer,
            will,
            mailbox,
            writer,
            wbuf: out,
            inflight: VecDeque::new(),
            next_seq: 0,
            backlog: true,
            pending: FuturesOrdered::new(),
        };
        // QoS 2 messages released before the last connection dropped: finish them first.
        for &pkid in &s.data.awaiting_pubcomp {
            codec::encode_pubrel(&mut s.wbuf, pkid);
        }
        Some(s)
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        mut reader: R,
        mut rbuf: BytesMut,
        shutdown: CancellationToken,
    ) -> End {
        let max_packet = self.broker.config.server.max_packet_size;
        let max_wbuf = self.broker.config.server.max_write_buffer;
        let mut last_seen = Instant::now();
        let far = Duration::from_secs(86400 * 365);
        let deadline = sleep_until(last_seen + self.keep_alive.unwrap_or(far));
        tokio::pin!(deadline);
        let mut deliveries = VecDeque::new();

        // Packets that arrived together with CONNECT.
        if let Err(end) = self.handle_input(&mut rbuf, max_packet).await {
            return end;
        }
        loop {
            if let Err(e) = self.fill_window().await {
                return End::Abnormal(format!("store: {e}"));
            }
            let can_take = self.wbuf.len() < max_wbuf;
            let can_read = self.pending.len() < MAX_PENDING_PUBLISHES;
            tokio::select! {
                Some((qos, pkid, r)) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Err(end) = self.published(qos, pkid, r) {
                        return end;
                    }
                }
                r = read_some(&mut reader, &mut rbuf), if can_read => {
                    match r {
                        Ok(0) => return End::Abnormal("connection closed by peer".into()),
                        Ok(_) => {}
                        Err(e) => return End::Abnormal(format!("read: {e}")),
                    }
                    last_seen = Instant::now();
                    if let Err(end) = self.handle_input(&mut rbuf, max_packet).await {
                        return end;
                    }
                    if rbuf.is_empty() {
                        rbuf = BytesMut::new();
                    }
                }
                _ = self.mailbox.wait_kicked(), if !can_take => {
                    return End::Abnormal("taken over by a newer connection".into());
                }
                _ = self.mailbox.wait(), if can_take => {
                    if self.mailbox.is_kicked() {
                        return End::Abnormal("taken over by a newer connection".into());
                    }
                    self.mailbox.drain(&mut deliveries);
                    while let Some(d) = deliveries.pop_front() {
                        self.take_delivery(d).await;
                    }
                    if deliveries.capacity() > 64 {
                        deliveries = VecDeque::new();
                    }
                    if self.mailbox.take_lost_hint() {
                        self.backlog = true;
                    }
                }
                r = self.writer.write_buf(&mut self.wbuf), if !self.wbuf.is_empty() => {
                    if let Err(e) = r {
                        return End::Abnormal(format!("write: {e}"));
                    }
                    if self.wbuf.is_empty() {
                        if let Err(e) = self.writer.flush().await {
                            return End::Abnormal(format!("flush: {e}"));
                        }
                        self.wbuf = BytesMut::new();
                    }
                }
                _ = &mut deadline => {
                    let ka = self.keep_alive.unwrap_or(far);
                    if last_seen.elapsed() >= ka {
                        return End::Abnormal("keepalive timeout".into());
                    }
                    deadline.as_mut().reset(last_seen + ka);
                }
                _ = shutdown.cancelled() => return End::Shutdown,
            }
        }
    }

    /// Decodes and handles every complete packet in `rbuf`.
    async fn handle_input(&mut self, rbuf: &mut BytesMut, max_packet: usize) -> Result<(), End> {
        loop {
            match codec::decode(rbuf, max_packet) {
                Ok(Some(p)) => self.handle_packet(p).await?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    metrics::malformed();
                    tracing::warn!(client = %self.client, peer = %self.peer, error = %e, "closing connection");
                    return Err(End::Abnormal(e.to_string()));
                }
            }
        }
    }

    async fn handle_packet(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.handle_publish(p).await?,
            Packet::PubAck(pkid) => {
                self.acked(pkid, Qos::AtLeastOnce).await?;
            }
            Packet::PubRec(pkid) => {
                if self.acked(pkid, Qos::ExactlyOnce).await?
                    || self.data.awaiting_pubcomp.contains(&pkid)
                {
                    if !self.data.awaiting_pubcomp.contains(&pkid) {
                        self.data.awaiting_pubcomp.push(pkid);
                    }
                    codec::encode_pubrel(&mut self.wbuf, pkid);
                }
            }
            Packet::PubComp(pkid) => self.data.awaiting_pubcomp.retain(|&p| p != pkid),
            Packet::PubRel(pkid) => {
                self.data.incoming_qos2.remove(&pkid);
                codec::encode_pubcomp(&mut self.wbuf, pkid);
            }
            Packet::Subscribe(s) => {
                let mut codes = Vec::with_capacity(s.filters.len());
                for (filter, qos) in &s.filters {
                    codes.push(match filter {
                        Ok(f) => self
                            .broker
                            .subscribe(&self.client, !self.clean, f, *qos)
                            .await
                            .map_err(|e| End::Abnormal(format!("store: {e}")))?,
                        Err(f) => {
                            tracing::info!(client = %self.client, filter = %f, "invalid topic filter refused");
                            0x80
                        }
                    });
                }
                codec::encode_suback(&mut self.wbuf, s.pkid, &codes);
                for ((filter, _), code) in s.filters.iter().zip(&codes) {
                    if let (Ok(f), Some(granted)) = (filter, qos_of(*code)) {
                        self.broker
                            .send_retained(&self.client, f, granted)
                            .await
                            .map_err(|e| End::Abnormal(format!("store: {e}")))?;
                    }
                }
            }
            Packet::Unsubscribe(u) => {
                for f in &u.topics {
                    self.broker
                        .unsubscribe(&self.client, !self.clean, f)
                        .await
                        .map_err(|e| End::Abnormal(format!("store: {e}")))?;
                }
                codec::encode_unsuback(&mut self.wbuf, u.pkid);
            }
            Packet::PingReq => codec::encode_pingresp(&mut self.wbuf),
            Packet::Disconnect => return Err(End::Clean),
            Packet::Connect(_) => {
                metrics::malformed();
                return Err(End::Abnormal("second CONNECT".into()));
            }
        }
        Ok(())
    }

    async fn handle_publish(&mut self, p: Publish) -> Result<(), End> {
        metrics::received(p.qos as u8);
        let (qos, pkid) = (p.qos, p.pkid);
        if qos == Qos::ExactlyOnce && self.data.incoming_qos2.contains(&pkid) {
            // A resend of a message we already took: acknowledge, do not route twice.
            codec::encode_pubrec(&mut self.wbuf, pkid);
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
        };
        let stored = self.broker.publish(msg);
        if self.broker.store.is_remote() {
            // Stored concurrently with the next publishes instead of one round trip each.
            self.pending
                .push_back(Box::pin(async move { (qos, pkid, stored.await) }));
            return Ok(());
        }
        let r = stored.await;
        self.published(qos, pkid, r)
    }

    /// A publish from this client is stored (or not): acknowledge it.
    fn published(&mut self, qos: Qos, pkid: u16, r: Result<(), StoreError>) -> Result<(), End> {
        if let Err(e) = r {
            // No acknowledgement: closing makes the client resend after reconnecting.
            tracing::warn!(client = %self.client, error = %e, "publish not stored");
            return Err(End::Abnormal(format!("store: {e}")));
        }
        match qos {
            Qos::AtMostOnce => {}
            Qos::AtLeastOnce => codec::encode_puback(&mut self.wbuf, pkid),
            Qos::ExactlyOnce => {
                self.data.incoming_qos2.insert(pkid);
                codec::encode_pubrec(&mut self.wbuf, pkid);
            }
        }
        Ok(())
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) for an in-flight message: delete it from the outbox.
    async fn acked(&mut self, pkid: u16, qos: Qos) -> Result<bool, End> {
        let Some(i) = self
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.qos == qos)
        else {
            return Ok(false);
        };
        let seq = self.inflight[i].seq;
        self.inflight.remove(i);
        metrics::acked();
        self.broker.store.ack(&self.client, seq).await;
        Ok(true)
    }

    fn window_free(&self) -> usize {
        let used = self.inflight.len() + self.data.awaiting_pubcomp.len();
        self.broker.config.session.max_inflight.saturating_sub(used)
    }

    async fn take_delivery(&mut self, d: Delivery) {
        match d {
            Delivery::Direct(msg) => {
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
            }
            Delivery::Stored { seq, qos, msg } => {
                if self.backlog || seq < self.next_seq {
                    return;
                }
                let in_order =
                    seq == self.next_seq || self.next_seq == 0 && self.inflight.is_empty();
                if in_order
                    && self.window_free() > 0
                    && self.send_entry(Entry { seq, qos, msg }).await
                {
                    return;
                }
                // A gap or a full window: the outbox has it, read it from there in order.
                self.backlog = true;
            }
        }
    }

    /// Reads queued entries from the outbox while the window has room.
    async fn fill_window(&mut self) -> Result<(), crate::outbox::StoreError> {
        while self.backlog
            && self.window_free() > 0
            && self.wbuf.len() < self.broker.config.server.max_write_buffer
        {
            let want = self.window_free();
            let entries = self
                .broker
                .store
                .fetch(&self.client, self.next_seq, want)
                .await?;
            let complete = entries.len() < want;
            for e in entries {
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
        if self.inflight.iter().any(|f| f.pkid == pkid)
            || self.data.awaiting_pubcomp.contains(&pkid)
        {
            return false;
        }
        let dup = e.seq <= self.sent_watermark;
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
        self.inflight.push_back(InFlight {
            seq: e.seq,
            pkid,
            qos: e.qos,
        });
        self.next_seq = e.seq + 1;
        self.broker.store.mark_sent(&self.client, e.seq).await;
        true
    }

    async fn finish(mut self, mut end: End) {
        // Publishes received before the end are still routed (a QoS 0 publish followed by
        // DISCONNECT must arrive), and acknowledged if the socket still takes it.
        let drain = async {
            while let Some((qos, pkid, r)) = self.pending.next().await {
                if let Err(e) = self.published(qos, pkid, r) {
                    end = e;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        // Best effort: whatever is already encoded (a final PUBACK) goes out.
        if !self.wbuf.is_empty() {
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                self.writer.write_all(&self.wbuf),
            )
            .await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), self.writer.shutdown()).await;
        match &end {
            End::Abnormal(reason) => {
                tracing::debug!(client = %self.client, peer = %self.peer, reason = %reason, "connection lost");
                if let Some(will) = self.will.take() {
                    metrics::will_published();
                    if let Err(e) = self.broker.publish(will).await {
                        tracing::warn!(client = %self.client, error = %e, "will not stored");
                    }
                }
            }
            End::Clean | End::Shutdown => {
                tracing::debug!(client = %self.client, peer = %self.peer, "disconnected");
            }
        }
        let data = std::mem::take(&mut self.data);
        self.broker
            .detach(&self.client, self.conn_id, self.clean, data)
            .await;
        self.mailbox.mark_done();
    }
}

fn qos_of(code: u8) -> Option<Qos> {
    match code {
        0 => Some(Qos::AtMostOnce),
        1 => Some(Qos::AtLeastOnce),
        2 => Some(Qos::ExactlyOnce),
        _ => None,
    }
}
