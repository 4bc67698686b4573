//! CONNECT to CONNACK: the first packet read within its size limits, the client id and the
//! will checked, the client authenticated, the session attached. Everything here answers
//! a refusal itself (CONNACK with a code, or a plain close) before a session exists.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{poll_read_some, reserved_topic, Connection, Extras, Pending, Session};
use crate::auth::{Credentials, Principal};
use crate::broker::Broker;
use crate::codec::{self, Connect, DecodeError, Packet};
use crate::lograte::{self, Reason};
use crate::mailbox::{Kick, Mailbox};
use crate::message::{ClientId, Message};
use crate::metrics::{self, AuthFailure};

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection<S> {
    /// Handshake, then the session's start: the CONNACK is queued.
    pub(super) async fn open(mut self) -> Option<Session<S>> {
        let mut rbuf = BytesMut::new();
        let connect = self.handshake(&mut rbuf).await?;
        let started = metrics::clock();
        if self.broker.guard().refusing() {
            metrics::rejected_memory();
            let why = "memory guard at server.max_memory";
            return self.refuse(3, &connect.client_id, Some(why), started).await;
        }
        let principal = self.admit(&connect, started).await?;
        let admitted = Admitted {
            connect,
            principal,
            started,
        };
        Session::start(
            admitted,
            self.broker,
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
                metrics::connect_answered(1, None);
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
    async fn admit(&mut self, c: &Connect, started: Option<Instant>) -> Option<Option<Principal>> {
        let id = &c.client_id;
        if id.starts_with(RESERVED_CLIENT_IDS) {
            metrics::auth_failure(AuthFailure::Reserved);
            let why = "client ids under $herald/ are the cluster's";
            return self.refuse(2, id, Some(why), started).await;
        }
        if let Some(w) = &c.last_will {
            if reserved_topic(&w.topic) {
                metrics::auth_failure(AuthFailure::Will);
                let why = "will to a reserved $ topic";
                return self.refuse(5, id, Some(why), started).await;
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
            // Logged by `auth` with its reason.
            Err(r) => return self.refuse(r.connack_code(), id, None, started).await,
        };
        if let Some(w) = &c.last_will {
            if !auth.may_publish(&principal, &c.client_id, &w.topic) {
                metrics::auth_failure(AuthFailure::Will);
                let why = "will to a topic the client may not publish to";
                return self.refuse(5, id, Some(why), started).await;
            }
        }
        Some(Some(principal))
    }

    /// Answers CONNACK `code` and ends the connection; `why`, if any, is logged at info
    /// (at a limited rate: any peer can cause it).
    async fn refuse<T>(
        &mut self,
        code: u8,
        client: &str,
        why: Option<&'static str>,
        started: Option<Instant>,
    ) -> Option<T> {
        if let Some(reason) = why {
            refused(self.peer, client, code, reason);
        }
        let mut out = BytesMut::new();
        codec::encode_connack(&mut out, false, code);
        metrics::connect_answered(code, started);
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
                Ok(n) => metrics::bytes_received(n),
            }
        }
    }
}

/// Client ids of the node-to-node link's connections.
const RESERVED_CLIENT_IDS: &str = "$herald/";

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

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Session<S> {
    /// Answers CONNECT. `None` if the connection is refused or the socket fails.
    async fn start(
        admitted: Admitted,
        broker: Arc<Broker>,
        peer: SocketAddr,
        mut io: S,
        rbuf: BytesMut,
        shutdown: CancellationToken,
    ) -> Option<Self> {
        let Admitted {
            connect: c,
            principal,
            started,
        } = admitted;
        let mut out = BytesMut::new();
        let mut client_id = c.client_id;
        if client_id.is_empty() {
            if !c.clean_session {
                refused(peer, "", 2, "empty client id without clean session");
                codec::encode_connack(&mut out, false, 2);
                metrics::connect_answered(2, started);
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
                    tracing::warn!(peer = %peer, client = %client, code = 3, reason = "store unavailable", error = %e, "refused CONNECT");
                }
                codec::encode_connack(&mut out, false, 3);
                metrics::connect_answered(3, started);
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
        if broker.config().log.connections {
            tracing::info!(client = %client, peer = %peer, clean = c.clean_session, "connected");
        } else {
            tracing::debug!(client = %client, peer = %peer, clean = c.clean_session, "connected");
        }
        codec::encode_connack(&mut out, attached.session_present, 0);
        metrics::connect_answered(0, started);
        let will = c.last_will.map(|w| Message {
            topic: Arc::from(w.topic),
            payload: Bytes::copy_from_slice(&w.message),
            qos: w.qos,
            retain: w.retain,
            expires_at: 0,
            born_us: 0,
            forwarded: false,
            receipt: false,
        });
        let extras =
            (will.is_some() || principal.is_some()).then(|| Box::new(Extras { will, principal }));
        let mut s = Session {
            clean: c.clean_session,
            sent_watermark: attached.sent_watermark,
            lineage: attached.lineage,
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
            pending: (attached.replay_to > attached.sent_watermark).then(|| {
                Box::new(Pending {
                    replay_to: attached.replay_to,
                    ..Default::default()
                })
            }),
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
}

/// A CONNECT that passed authentication, and when it arrived (metrics on).
struct Admitted {
    connect: Connect,
    principal: Option<Principal>,
    started: Option<Instant>,
}

/// The info line of a refused CONNECT, at a limited rate.
fn refused(peer: SocketAddr, client: &str, code: u8, reason: &'static str) {
    if lograte::allow(Reason::LoginRefused) {
        tracing::info!(peer = %peer, client, code, reason, "refused CONNECT");
    }
}
