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
//!
//! The code is split by direction, so that each packet's handling is found by its name (as
//! in Mosquitto's `handle_*.c`); every file adds to the same `impl Session`:
//! - `mod.rs` (here): `Connection`, the `Session` state, the serving loop (`Session::serve`,
//!   `Session::poll_io`), the end (`Session::finish`) and what both directions use;
//! - `handshake.rs`: CONNECT to CONNACK: reading CONNECT within its size limits (the
//!   process-wide budget for large ones, `LargeConnect`), authentication and the will's
//!   checks, attaching the session (`Session::start`);
//! - `inbound.rs`: packets from the client, one `handle_*` method per packet type
//!   (`handle_publish`, `handle_pubrec`, `handle_subscribe`, ...), and the inbound QoS 2
//!   state (`incoming_qos2`);
//! - `outbound.rs`: what goes to the client: mailbox deliveries (`take_mail`), outbox reads
//!   (`fill_window`), the write buffer's byte budget (`fits`), retained QoS 0 messages
//!   waiting for room, resends with DUP (`send_entry`).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::broker::{Broker, SessionData};
use crate::lograte::{self, Reason};
use crate::mailbox::{Kick, Mailbox};
use crate::message::{ClientId, Message, Qos};
use crate::metrics;
use crate::outbox::StoreError;

mod handshake;
mod inbound;
mod outbound;

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
    /// The store failed over to a copy of the client's keys without entries this
    /// connection read (`Attach::lineage`).
    fn store_lost_writes() -> End {
        End::Abnormal("store failed over and lost entries this connection read".into())
    }

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
}

/// Publishes from this client still being stored (Redis), in arrival order: their PUBACKs go
/// out in the same order, and the socket is not read while this many are outstanding, or
/// while they hold `MAX_PENDING_BYTES` (one publish of any size is always taken).
const MAX_PENDING_PUBLISHES: usize = 1024;
const MAX_PENDING_BYTES: usize = 1024 * 1024;

/// A publish being stored: its QoS, packet id and size when done.
type PendingPublish =
    Pin<Box<dyn std::future::Future<Output = (Qos, u16, usize, Result<(), StoreError>)> + Send>>;

/// `InFlight::seq` of a live-only QoS 1 message (a broadcast): no outbox entry to delete on
/// its PUBACK. Outbox numbers start from a clock in microseconds and never come near it.
const NOT_STORED: u64 = u64::MAX;

struct InFlight {
    seq: u64,
    pkid: u16,
    qos: Qos,
    /// For the delivery latency: the message's `born_us`, and its labels.
    born_us: u64,
    path: metrics::Path,
    replay: bool,
    /// Pushed with `receipt=true`: its PUBACK is noted (`receipts`).
    receipt: bool,
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
    /// The copy of the client's keys the outbox is read from (`Attach::lineage`).
    lineage: u16,
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
    /// delivered twice), to be taken out again if they are never stored.
    qos2: Vec<u16>,
    /// A publish of this connection was not stored: the ones after it are no longer
    /// acknowledged (`Session::published`).
    not_stored: bool,
    /// QoS 0 retained messages matched by SUBSCRIBEs, written as the write buffer has room:
    /// shared with the retained store, so a SUBSCRIBE that matches many (or one, many
    /// times) holds pointers here and at most the write budget of copies.
    retained: std::collections::VecDeque<Arc<Message>>,
    /// Live outbox entries up to this seq may have been sent by an earlier connection
    /// (`Attach::replay_to`); set only when it says more than the sent watermark.
    replay_to: u64,
}

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
                if let Err(end) = take.await {
                    return end;
                }
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
                    self.broker.retry_later(&self.mailbox);
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
                    metrics::bytes_sent(n);
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
                Poll::Ready(Ok(n)) => {
                    metrics::bytes_received(n);
                    woke.input = true;
                }
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

    fn awaiting_pubcomp(&self, pkid: u16) -> bool {
        self.data
            .as_ref()
            .is_some_and(|d| d.awaiting_pubcomp.contains(&pkid))
    }

    async fn finish(mut self, mut end: End) {
        // Publishes received before the end are still delivered (a QoS 0 publish followed by
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
            End::Clean | End::Shutdown if self.broker.config().log.connections => {
                tracing::info!(client = %self.client, "disconnected");
            }
            End::Clean | End::Shutdown => {
                tracing::debug!(client = %self.client, "disconnected");
            }
        }
        let current = self.broker.outbox().is_current(&self.client, self.lineage);
        if !self.clean && self.next_seq > 0 && current {
            // Before `mark_done`: a takeover waits for it, and its attach reads this.
            let written = (self.next_seq - 1).max(self.sent_watermark);
            self.broker
                .outbox()
                .finish(&self.client, written, self.mailbox.conn_id())
                .await;
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
