//! One client connection, from CONNECT to close: the MQTT protocol state machine.
//!
//! A single task per connection reads packets, drains the mailbox and writes, so the
//! per-connection state needs no locks. Memory at idle is what decides how many phones a
//! node holds, so an idle connection keeps only what it must (about 1 KB in all, see
//! BENCHMARKS.md):
//! - the task is a `Session` and a small waiting state: it waits in one poll over every
//!   source (`Session::poll_io`: finished stores, the mailbox, the socket), not in a
//!   `select!` of futures, and owns the socket whole instead of split halves;
//! - every step that awaits something larger (the handshake, storing, reading the outbox,
//!   the end) runs in a boxed future that exists only while it runs;
//! - the read and write buffers are released whenever they are empty (socket reads go
//!   through one scratch buffer per worker thread), QoS 2 state is boxed on first use;
//! - keepalive is checked by one broker-wide task and shutdown arrives through the mailbox
//!   (see `mailbox`), so there is no timer or cancellation future per connection.
//!
//! Outbound QoS 1/2 follows the outbox: `next_seq` is the first sequence number not yet
//! written; `backlog` says the outbox may hold entries the connection has not seen (start of
//! session, a dropped hint, a full window). While `backlog` is set, mailbox hints are ignored
//! and entries are read from the outbox in order, which is what makes replay come before any
//! newer live message.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::auth::{Credentials, Principal};
use crate::broker::{Broker, SessionData};
use crate::codec::{self, Connect, DecodeError, Packet, Publish};
use crate::lograte::{self, Reason};
use crate::mailbox::{Delivery, Kick, Mailbox};
use crate::message::{packet_id, ClientId, Message, Qos};
use crate::metrics::{self, AuthFailure, Denied};
use crate::outbox::{Entry, StoreError};

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; 16 * 1024].into_boxed_slice());
}

/// Reads whatever the socket has into `dst` without keeping a buffer of its own while idle.
fn poll_read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    cx: &mut Context<'_>,
    dst: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let mut rb = ReadBuf::new(&mut s[..]);
        ready!(Pin::new(&mut *reader).poll_read(cx, &mut rb))?;
        dst.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    })
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

impl End {
    fn kicked(kick: Kick) -> End {
        match kick {
            Kick::Takeover => End::Abnormal("taken over by a newer connection".into()),
            Kick::Keepalive => End::Abnormal("keepalive timeout".into()),
            Kick::Shutdown => End::Shutdown,
        }
    }
}

pub struct Connection<S> {
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    shutdown: CancellationToken,
    /// The verified client certificate's identity (TLS listeners with `tls.identity`).
    cert_identity: Option<Box<str>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection<S> {
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
            cert_identity: None,
        }
    }

    /// The identity a client certificate proved, used only with `tls.identity = "cert"`.
    pub fn with_cert_identity(mut self, identity: Option<String>) -> Self {
        if self.broker.config().tls.identity == crate::config::TlsIdentity::Cert {
            self.cert_identity = identity.map(String::into_boxed_str);
        }
        self
    }

    /// The connection's task. Its size is what every idle connection costs, so it is built
    /// by a plain function (an async fn would keep its by-value arguments for its whole
    /// life): the opening stage is boxed and exists only while it runs, the session is held
    /// once, and only the serving loop's small state is inline.
    /// `guard` is held until the connection ends.
    pub fn run<G: Send + 'static>(self, guard: G) -> impl std::future::Future<Output = ()> + Send {
        let open = stage(self.open());
        async move {
            let _held = &guard;
            let Some(mut session) = open.await else {
                return;
            };
            let end = session.serve().await;
            stage(session.finish(end)).await;
        }
    }

    /// Handshake, then the session's start: the CONNACK is queued.
    async fn open(mut self) -> Option<Session<S>> {
        let mut rbuf = BytesMut::new();
        let connect = self.handshake(&mut rbuf).await?;
        if self.broker.guard().refusing() {
            metrics::rejected_memory();
            if lograte::allow(Reason::Limit) {
                tracing::warn!(peer = %self.peer, "refused CONNECT: memory guard at server.max_memory");
            }
            return self.refuse(3).await;
        }
        let principal = self.admit(&connect).await?;
        Session::start(
            self.broker,
            connect,
            principal,
            self.peer,
            self.stream,
            rbuf,
            self.shutdown,
        )
        .await
    }

    /// Waits for CONNECT, answering what must be answered before a session exists.
    async fn handshake(&mut self, rbuf: &mut BytesMut) -> Option<Connect> {
        let timeout = self.broker.config().server.connect_timeout;
        let shutdown = self.shutdown.clone();
        let first = tokio::select! {
            r = tokio::time::timeout(timeout, self.read_first(rbuf)) => r,
            _ = shutdown.cancelled() => return None,
        };
        match first {
            Err(_) => {
                metrics::connect_timeout();
                tracing::debug!(peer = %self.peer, "no CONNECT in time");
                None
            }
            Ok(Err(Some(DecodeError::UnsupportedProtocol(level)))) => {
                if lograte::allow(Reason::UnsupportedProtocol) {
                    tracing::info!(peer = %self.peer, level, "unsupported protocol level");
                }
                let mut out = BytesMut::new();
                codec::encode_connack(&mut out, false, 1);
                let _ = self.stream.write_all(&out).await;
                None
            }
            Ok(Err(Some(DecodeError::TooLarge(size)))) => {
                if lograte::allow(Reason::Limit) {
                    tracing::info!(peer = %self.peer, size, "CONNECT too large, closing");
                }
                None
            }
            Ok(Err(Some(e))) => {
                metrics::malformed();
                if lograte::allow(Reason::Malformed) {
                    tracing::warn!(peer = %self.peer, error = %e, "bad first packet");
                }
                None
            }
            Ok(Err(None)) => None,
            Ok(Ok(c)) => Some(c),
        }
    }

    /// Who the client is, and whether it may have this client id and this will: answers
    /// CONNACK 2, 4 or 5 itself when not. Runs before the session attaches, so before any
    /// takeover or route claim: a client can never take another's session.
    async fn admit(&mut self, c: &Connect) -> Option<Option<Principal>> {
        if c.client_id.starts_with(RESERVED_CLIENT_IDS) {
            metrics::auth_failure(AuthFailure::Reserved);
            if lograte::allow(Reason::LoginRefused) {
                tracing::info!(peer = %self.peer, client = %c.client_id, "refused CONNECT: client ids under $herald/ are the cluster's");
            }
            return self.refuse(2).await;
        }
        if let Some(w) = &c.last_will {
            if reserved_topic(&w.topic) {
                metrics::auth_failure(AuthFailure::Will);
                return self.refuse(5).await;
            }
        }
        let auth = self.broker.auth().clone();
        if auth.is_open() {
            return Some(None);
        }
        let login = c.login.as_ref();
        let principal = auth
            .authenticate(Credentials {
                client_id: &c.client_id,
                username: login.map(|l| l.username.as_str()),
                password: login.map(|l| &l.password[..]).filter(|p| !p.is_empty()),
                cert_identity: self.cert_identity.as_deref(),
                peer: self.peer.ip(),
            })
            .await;
        let principal = match principal {
            Ok(p) => p,
            Err(r) => return self.refuse(r.connack_code()).await,
        };
        if let Some(w) = &c.last_will {
            if !auth.may_publish(&principal, &c.client_id, &w.topic) {
                metrics::auth_failure(AuthFailure::Will);
                if lograte::allow(Reason::LoginRefused) {
                    tracing::info!(peer = %self.peer, client = %c.client_id, topic = %w.topic, "refused CONNECT: will to a topic the client may not publish to");
                }
                return self.refuse(5).await;
            }
        }
        Some(Some(principal))
    }

    async fn refuse<T>(&mut self, code: u8) -> Option<T> {
        let mut out = BytesMut::new();
        codec::encode_connack(&mut out, false, code);
        let _ = self.stream.write_all(&out).await;
        None
    }

    /// Reads until one whole packet arrives; it must be CONNECT. `Err(None)`: socket closed.
    /// A CONNECT may announce at most `server.max_connect_size` bytes, or `max_packet_size`
    /// when it carries a will; those large ones also draw on a process-wide budget
    /// (`LARGE_CONNECTS`), so sockets that each send most of a big CONNECT and stop hold at
    /// most that much between them until their connect timeout.
    async fn read_first(&mut self, rbuf: &mut BytesMut) -> Result<Connect, Option<DecodeError>> {
        let server = &self.broker.config().server;
        let (max, small) = (server.max_packet_size, server.max_connect_size);
        let mut reserved: Option<LargeConnect> = None;
        loop {
            match codec::decode(rbuf, max) {
                Ok(Some(Packet::Connect(c))) => return Ok(c),
                Ok(Some(_)) => {
                    return Err(Some(DecodeError::Malformed("first packet is not CONNECT")))
                }
                Ok(None) => {}
                Err(e) => return Err(Some(e)),
            }
            if reserved.is_none() {
                match codec::connect_prefix(rbuf) {
                    Some((size, _)) if size <= small => {}
                    Some((size, Some(true))) if size <= codec::MAX_CONNECT_SIZE => {
                        match LargeConnect::reserve(size) {
                            Some(r) => reserved = Some(r),
                            None => {
                                metrics::limit_hit("large_connects");
                                return Err(Some(DecodeError::TooLarge(size)));
                            }
                        }
                    }
                    // Over the limit without a will, more than any valid CONNECT can be, or
                    // a header that keeps its flags out of reach (a protocol name longer
                    // than any real one).
                    Some((size, will)) if will.is_some() || rbuf.len() >= 16 => {
                        metrics::limit_hit("server_max_connect_size");
                        return Err(Some(DecodeError::TooLarge(size)));
                    }
                    _ => {}
                }
            }
            match poll_fn(|cx| poll_read_some(&mut self.stream, cx, rbuf)).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    }
}

/// Bytes that CONNECTs larger than `server.max_connect_size` (they carry a will) may
/// announce at once over the whole process.
const LARGE_CONNECTS_BUDGET: usize = 64 * 1024 * 1024;
static LARGE_CONNECTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A share of `LARGE_CONNECTS_BUDGET`, given back when the CONNECT has been read (or not).
struct LargeConnect(usize);

impl LargeConnect {
    fn reserve(size: usize) -> Option<LargeConnect> {
        use std::sync::atomic::Ordering::AcqRel;
        let before = LARGE_CONNECTS.fetch_add(size, AcqRel);
        let r = LargeConnect(size);
        (before + size <= LARGE_CONNECTS_BUDGET).then_some(r)
    }
}

impl Drop for LargeConnect {
    fn drop(&mut self) {
        LARGE_CONNECTS.fetch_sub(self.0, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Publishes from this client still being stored (Redis), in arrival order: their PUBACKs go
/// out in the same order, and the socket is not read while this many are outstanding, or
/// while they hold `MAX_PENDING_BYTES` (one publish of any size is always taken).
const MAX_PENDING_PUBLISHES: usize = 1024;
const MAX_PENDING_BYTES: usize = 1024 * 1024;

/// A publish being stored: its QoS, packet id and size when done.
type PendingPublish =
    Pin<Box<dyn std::future::Future<Output = (Qos, u16, usize, Result<(), StoreError>)> + Send>>;

struct InFlight {
    seq: u64,
    pkid: u16,
    qos: Qos,
}

struct Session<S> {
    broker: Arc<Broker>,
    client: ClientId,
    clean: bool,
    /// The will and the proven identity; `None` for the common case of neither (no
    /// authentication configured, no will), so that they cost an idle connection nothing.
    extras: Option<Box<Extras>>,
    mailbox: Arc<Mailbox>,
    /// The socket, read and written by this task alone (no split halves: they cost a shared
    /// allocation per connection).
    io: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// QoS 2 state, allocated on first use.
    data: Option<Box<SessionData>>,
    /// Oldest first; at most `session.max_inflight` (a Vec: 8 bytes smaller than a deque).
    inflight: Vec<InFlight>,
    next_seq: u64,
    backlog: bool,
    sent_watermark: u64,
    /// Created on first use: publishes being stored (remote store), retained messages
    /// waiting for room in the write buffer.
    pending: Option<Box<Pending>>,
    /// The mailbox woke while the write buffer was full: deliveries wait in it.
    mail: bool,
    /// The client has published: the memory guard slows such clients first.
    publisher: bool,
    /// Reading the outbox failed; wait for the next wake-up before trying again.
    retry_later: bool,
    /// The sent watermark for the newest PUBLISH in `wbuf` is being written: the socket
    /// is not written until it is stored (write-ahead, for DUP after a crash).
    sent_gate: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// What a CONNECT gave a session besides its client id.
struct Extras {
    will: Option<Message>,
    /// `None` when authentication is off (every check passes).
    principal: Option<Principal>,
}

/// Work an idle connection does not have, boxed so that it costs idle ones nothing.
#[derive(Default)]
struct Pending {
    /// Publishes from this client still being stored (remote store).
    stores: FuturesOrdered<PendingPublish>,
    /// `Message::size` summed over `stores`.
    bytes: usize,
    /// QoS 2 packet ids among `stores`: in `incoming_qos2` already (a resend must not be
    /// routed twice), to be taken out again if they are never stored.
    qos2: Vec<u16>,
    /// QoS 0 retained messages matched by SUBSCRIBEs, written as the write buffer has room:
    /// shared with the retained store, so a SUBSCRIBE that matches many (or one, many
    /// times) holds pointers here and at most the write budget of copies.
    retained: std::collections::VecDeque<Arc<Message>>,
}

/// Retained QoS 0 messages one connection may have waiting (`Pending::retained`); more
/// are dropped and counted.
const MAX_RETAINED_WAITING: usize = 100_000;

/// What the serving loop has to do after a wake-up.
#[derive(Default)]
struct Woke {
    /// Bytes arrived in the read buffer.
    input: bool,
    /// The write buffer went out completely.
    written: bool,
    /// The mailbox has something (`Session::mail` is set).
    mail: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Session<S> {
    /// Answers CONNECT. `None` if the connection is refused or the socket fails.
    async fn start(
        broker: Arc<Broker>,
        c: Connect,
        principal: Option<Principal>,
        peer: SocketAddr,
        mut io: S,
        rbuf: BytesMut,
        shutdown: CancellationToken,
    ) -> Option<Self> {
        let mut out = BytesMut::new();
        let mut client_id = c.client_id;
        if client_id.is_empty() {
            if !c.clean_session {
                codec::encode_connack(&mut out, false, 2);
                let _ = io.write_all(&out).await;
                return None;
            }
            client_id = broker.assign_client_id();
        }
        let client: ClientId = Arc::from(client_id);
        let mailbox = Arc::new(Mailbox::new(c.keep_alive, broker.new_conn_id()));
        let attached = match broker
            .attach(&client, c.clean_session, mailbox.clone())
            .await
        {
            Ok(a) => a,
            Err(e) => {
                if lograte::allow(Reason::StoreUnavailable) {
                    tracing::warn!(client = %client, error = %e, "store unavailable, refusing CONNECT");
                }
                codec::encode_connack(&mut out, false, 3);
                let _ = io.write_all(&out).await;
                mailbox.mark_done();
                return None;
            }
        };
        // The server may have started stopping while we attached, after its pass that
        // closes every connection.
        if shutdown.is_cancelled() {
            mailbox.kick(Kick::Shutdown);
        }
        tracing::debug!(client = %client, peer = %peer, clean = c.clean_session, "connected");
        codec::encode_connack(&mut out, attached.session_present, 0);
        let will = c.last_will.map(|w| Message {
            topic: Arc::from(w.topic),
            payload: Bytes::copy_from_slice(&w.message),
            qos: w.qos,
            retain: w.retain,
            expires_at: 0,
        });
        let extras =
            (will.is_some() || principal.is_some()).then(|| Box::new(Extras { will, principal }));
        let mut s = Session {
            clean: c.clean_session,
            sent_watermark: attached.sent_watermark,
            data: attached.data,
            broker,
            client,
            extras,
            mailbox,
            io,
            rbuf,
            wbuf: out,
            inflight: Vec::new(),
            next_seq: 0,
            backlog: true,
            pending: None,
            mail: false,
            publisher: false,
            retry_later: false,
            sent_gate: None,
        };
        // QoS 2 messages released before the last connection dropped: finish them first.
        if let Some(d) = &s.data {
            for &pkid in &d.awaiting_pubcomp {
                codec::encode_pubrel(&mut s.wbuf, pkid);
            }
        }
        Some(s)
    }

    async fn serve(&mut self) -> End {
        // Packets that arrived together with CONNECT.
        let first = stage(self.handle_input());
        if let Err(end) = first.await {
            return end;
        }
        loop {
            let can_take = self.wbuf.len() < self.broker.config().server.max_write_buffer;
            if self.mail && can_take {
                let take = stage(self.take_mail());
                take.await;
            }
            if can_take && self.has_retained() {
                self.write_retained();
            }
            if self.backlog && can_take && self.window_free() > 0 && !self.retry_later {
                let fill = stage(self.fill_window());
                if let Err(e) = fill.await {
                    // The store is down: keep the connection (and its keepalive) and read
                    // the outbox again when the broker's periodic pass wakes us.
                    tracing::debug!(client = %self.client, error = %e, "outbox read failed, retrying later");
                    self.retry_later = true;
                    self.mailbox.want_retry();
                }
            }
            let woke = match poll_fn(|cx| self.poll_io(cx)).await {
                Ok(w) => w,
                Err(end) => return end,
            };
            if woke.written {
                if let Err(e) = poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx)).await {
                    return End::Abnormal(format!("flush: {e}"));
                }
                self.wbuf = BytesMut::new();
            }
            if woke.input {
                self.mailbox.touch(crate::message::now_ms());
                let input = stage(self.handle_input());
                if let Err(end) = input.await {
                    return end;
                }
                if self.rbuf.is_empty() {
                    self.rbuf = BytesMut::new();
                }
            }
        }
    }

    /// Polls every source of work once: finished stores, the mailbox, the sent watermark,
    /// the socket's write side (until it would block or the buffer is out) and read side.
    /// Finished stores are acknowledged here, all at once, so that one write carries every
    /// PUBACK; kicks and a closed socket end the loop.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<Woke, End>> {
        let mut woke = Woke::default();
        while let Some(p) = self.pending.as_mut().filter(|p| !p.stores.is_empty()) {
            match p.stores.poll_next_unpin(cx) {
                Poll::Ready(Some((qos, pkid, size, r))) => {
                    p.bytes -= size;
                    if let Err(end) = self.published(qos, pkid, r) {
                        return Poll::Ready(Err(end));
                    }
                }
                _ => break,
            }
        }
        if self.mailbox.poll_wait(cx).is_ready() {
            if let Some(kick) = self.mailbox.kicked() {
                return Poll::Ready(Err(End::kicked(kick)));
            }
            self.mail = true;
            self.retry_later = false;
            woke.mail = true;
        }
        if let Some(g) = self.sent_gate.as_mut() {
            if std::future::Future::poll(Pin::new(g), cx).is_ready() {
                self.sent_gate = None;
            }
        }
        let mut wrote = false;
        while !self.wbuf.is_empty() && self.sent_gate.is_none() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(End::Abnormal("write: socket closed".into())))
                }
                Poll::Ready(Ok(n)) => {
                    self.wbuf.advance(n);
                    wrote = true;
                    woke.written = self.wbuf.is_empty();
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(End::Abnormal(format!("write: {e}"))))
                }
                Poll::Pending => break,
            }
        }
        if self.read_socket() {
            match poll_read_some(&mut self.io, cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(End::Abnormal("connection closed by peer".into())))
                }
                Poll::Ready(Ok(_)) => woke.input = true,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(End::Abnormal(format!("read: {e}"))))
                }
                Poll::Pending => {}
            }
        }
        // Deliveries wait in the mailbox while the write buffer is full: take them as soon as
        // it has room, not only once it is empty. (Only after a write: no spinning.)
        let room = wrote
            && (self.mail || self.has_retained())
            && self.wbuf.len() < self.broker.config().server.max_write_buffer;
        if woke.input || woke.written || woke.mail || room {
            Poll::Ready(Ok(woke))
        } else {
            Poll::Pending
        }
    }

    /// Queues retained QoS 0 messages for `write_retained`, up to `MAX_RETAINED_WAITING`.
    fn queue_retained(&mut self, msgs: Vec<Arc<Message>>) {
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

    fn has_retained(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| !p.retained.is_empty())
    }

    /// Writes waiting retained QoS 0 messages while the write buffer has room.
    fn write_retained(&mut self) {
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

    /// Whether to read the socket now. Not while this client's publishes wait for the store
    /// beyond their bounds, nor while its answers fill the write buffer (a client that
    /// sends and never reads would grow it without end), nor, for a client that publishes,
    /// while the memory guard holds publishers back: TCP then slows the sender down.
    fn read_socket(&self) -> bool {
        let (n, bytes) = self
            .pending
            .as_ref()
            .map_or((0, 0), |p| (p.stores.len(), p.bytes));
        n < MAX_PENDING_PUBLISHES
            && bytes < MAX_PENDING_BYTES
            && self.wbuf.len() < self.broker.config().server.max_write_buffer
            && !(self.publisher && self.broker.guard().throttled())
    }

    /// Takes what the mailbox holds, as much as the write buffer has room for: QoS 0
    /// messages are written, stored ones sent if they are next in line. What does not fit
    /// stays in the mailbox (`mail` stays set) until the socket takes more.
    async fn take_mail(&mut self) {
        let mut deliveries = Vec::new();
        let room = self.write_room();
        self.mail = self
            .mailbox
            .drain(&mut deliveries, room, self.wbuf.is_empty());
        for d in deliveries {
            self.take_delivery(d).await;
        }
        if self.mailbox.take_lost_hint() {
            self.backlog = true;
        }
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

    /// Decodes and handles every complete packet in `rbuf`.
    async fn handle_input(&mut self) -> Result<(), End> {
        let max_packet = self.broker.config().server.max_packet_size;
        loop {
            match codec::decode(&mut self.rbuf, max_packet) {
                Ok(Some(p)) => self.handle_packet(p).await?,
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

    async fn handle_packet(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.handle_publish(p).await?,
            Packet::PubAck(pkid) => {
                self.acked(pkid, Qos::AtLeastOnce).await?;
            }
            Packet::PubRec(pkid) => {
                if self.acked(pkid, Qos::ExactlyOnce).await? || self.awaiting_pubcomp(pkid) {
                    if !self.awaiting_pubcomp(pkid) {
                        self.data_mut().awaiting_pubcomp.push(pkid);
                    }
                    codec::encode_pubrel(&mut self.wbuf, pkid);
                }
            }
            Packet::PubComp(pkid) => {
                if let Some(d) = self.data.as_mut() {
                    d.awaiting_pubcomp.retain(|&p| p != pkid);
                }
            }
            Packet::PubRel(pkid) => {
                if let Some(d) = self.data.as_mut() {
                    d.incoming_qos2.remove(&pkid);
                }
                codec::encode_pubcomp(&mut self.wbuf, pkid);
            }
            Packet::Subscribe(s) => {
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
                    if let (Ok(f), Some(granted), true) = (filter, Qos::try_from(*code).ok(), last)
                    {
                        let qos0 = self
                            .broker
                            .send_retained(&self.client, f, granted)
                            .await
                            .map_err(|e| End::Abnormal(format!("store: {e}")))?;
                        self.queue_retained(qos0);
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
        };
        let size = msg.size();
        self.publisher = true;
        let stored = self.broker.publish(msg);
        if self.broker.store().is_remote() {
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
    fn published(&mut self, qos: Qos, pkid: u16, r: Result<(), StoreError>) -> Result<(), End> {
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
            return Err(End::Abnormal(format!("store: {e}")));
        }
        match qos {
            Qos::AtMostOnce => {}
            Qos::AtLeastOnce => codec::encode_puback(&mut self.wbuf, pkid),
            Qos::ExactlyOnce => {
                self.data_mut().incoming_qos2.insert(pkid);
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
        self.broker.store().ack(&self.client, seq).await;
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

    fn awaiting_pubcomp(&self, pkid: u16) -> bool {
        self.data
            .as_ref()
            .is_some_and(|d| d.awaiting_pubcomp.contains(&pkid))
    }

    fn window_free(&self) -> usize {
        let used = self.inflight.len() + self.data.as_ref().map_or(0, |d| d.awaiting_pubcomp.len());
        self.broker
            .config()
            .session
            .max_inflight
            .saturating_sub(used)
    }

    async fn take_delivery(&mut self, d: Delivery) {
        match d {
            Delivery::Direct(msg) => {
                if !self.may_read(&msg.topic) {
                    return;
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
            }
            Delivery::Stored { seq, qos, msg } => {
                if self.backlog || seq < self.next_seq {
                    return;
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
            && self.wbuf.len() < self.broker.config().server.max_write_buffer
        {
            let want = self.window_free();
            let entries = self
                .broker
                .store()
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
            self.broker.store().ack(&self.client, e.seq).await;
            return true;
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
        self.inflight.push(InFlight {
            seq: e.seq,
            pkid,
            qos: e.qos,
        });
        self.next_seq = e.seq + 1;
        self.mailbox.saw(e.seq);
        if !dup {
            // Entries sent in order: the newest watermark covers the ones before it.
            if let Some(gate) = self.broker.store().mark_sent(&self.client, e.seq).await {
                self.sent_gate = Some(gate);
            }
        }
        true
    }

    async fn finish(mut self, mut end: End) {
        // Publishes received before the end are still routed (a QoS 0 publish followed by
        // DISCONNECT must arrive), and acknowledged if the socket still takes it.
        if self.pending.is_some() {
            let drain = async {
                while let Some((qos, pkid, _, r)) = poll_fn(|cx| match self.pending.as_mut() {
                    Some(p) => p.stores.poll_next_unpin(cx),
                    None => Poll::Ready(None),
                })
                .await
                {
                    if let Err(e) = self.published(qos, pkid, r) {
                        end = e;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
        if let (Some(p), Some(d)) = (self.pending.take(), self.data.as_mut()) {
            for pkid in p.qos2 {
                d.incoming_qos2.remove(&pkid);
            }
        }
        // Best effort: whatever is already encoded (a final PUBACK) goes out, after its
        // watermark.
        if let Some(gate) = self.sent_gate.take() {
            let _ = tokio::time::timeout(Duration::from_millis(200), gate).await;
        }
        if !self.wbuf.is_empty() {
            let _ = tokio::time::timeout(Duration::from_millis(200), self.io.write_all(&self.wbuf))
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), self.io.shutdown()).await;
        match &end {
            End::Abnormal(reason) => {
                tracing::debug!(client = %self.client, reason = %reason, "connection lost");
                if let Some(will) = self.extras.as_mut().and_then(|x| x.will.take()) {
                    metrics::will_published();
                    if let Err(e) = self.broker.publish(will).await {
                        if lograte::allow(Reason::NotStored) {
                            tracing::warn!(client = %self.client, error = %e, "will not stored");
                        }
                    }
                }
            }
            End::Clean | End::Shutdown => {
                tracing::debug!(client = %self.client, "disconnected");
            }
        }
        let data = self.data.take();
        self.broker
            .detach(&self.client, self.mailbox.conn_id(), self.clean, data)
            .await;
        self.mailbox.mark_done();
    }
}

/// Boxes a stage of a connection (see `Connection::run`): on the heap only while it runs,
/// behind a thin pointer (a `dyn` one would cost the waiting future 8 bytes more).
fn stage<F: std::future::Future>(f: F) -> Pin<Box<F>> {
    Box::pin(f)
}

/// Client ids of the node-to-node link's connections.
const RESERVED_CLIENT_IDS: &str = "$herald/";

/// Topics of the node-to-node link (and of Herald's own ids), refused on client listeners
/// whatever the ACL says.
fn reserved_topic(topic: &str) -> bool {
    topic.starts_with('$')
        && ["$cluster", "$herald"].iter().any(|p| {
            topic
                .strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}
