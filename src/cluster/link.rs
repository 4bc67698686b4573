//! The node-to-node link: MQTT 3.1.1 itself, so framing, keepalive and acknowledgements come
//! from the protocol Herald already speaks (ARCHITECTURE.md 3.3).
//!
//! A node dials each peer it must reach as an MQTT client (client id `$herald/<node>/<inc>`,
//! clean session) and forwards PUBLISH packets on internal topics:
//! clean session, `cluster.secret` as the password) and sends `frame::Frame`s as PUBLISH
//! packets on internal topics: pushes and kicks at QoS 0, ordinary-topic publishes at the
//! message's QoS (at most 1), acknowledged by the peer once stored. The other direction
//! (`serve`) applies what peers send to the local node through `Local`.
//!
//! Questions (`Frame::Broadcast`, `Frame::Status`) are answered on the same connection: the
//! asked node writes a `$cluster/answer` PUBLISH back to the asking node, which the dialling
//! side reads among its PUBACKs. An answer needs no link in the other direction, and a
//! question whose link drops fails at once (its waiting sender is dropped with the link).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use super::frame::Frame;
use super::Local;
use crate::codec::{self, Packet, ServerPacket};
use crate::config::Secret;
use crate::lograte::{self, Reason};
use crate::message::Qos;
use crate::metrics::{self, AuthFailure, Forward};
use crate::redis::StoreError;
use crate::transport::TlsServer;

/// How long a forwarded QoS 1 publish may wait for the peer's PUBACK.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Frames waiting for a peer's link; beyond this they fail at once (counted).
const QUEUE: usize = 8192;
/// Bytes of messages queued for one peer (a frame of any size is taken by an empty queue);
/// beyond it forwards fail at once, as on a full queue. A slow or stuck peer holds at most
/// this much of this node's memory.
const QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// Forwarded publishes waiting for their PUBACK on one link.
const MAX_UNACKED: usize = 8192;
/// Broadcasts one link may have running on the asked node; beyond it that link is not read
/// until one finishes (a broadcast is a pass over every local connection).
const MAX_ASKED: usize = 16;
/// Largest packet the dialling side accepts from its peer (answers are 16-byte frames).
const MAX_FROM_PEER: usize = 1024;
const PING_EVERY: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

struct Out {
    frame: Frame,
    ack: Option<oneshot::Sender<()>>,
    /// Where the peer's `Answer` to this frame's question goes.
    answer: Option<oneshot::Sender<u64>>,
    /// Gives the frame's bytes back to the queue's budget when the frame is gone.
    _held: Held,
}

/// Bytes of one queued frame, counted in its peer's `queued` until dropped.
struct Held(Arc<AtomicUsize>, usize);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// The sending side of a link to one peer. Dropping it stops the link task.
pub struct Peer {
    pub addr: SocketAddr,
    tx: mpsc::Sender<Out>,
    /// Bytes of the frames queued or being written (`QUEUE_BYTES`).
    queued: Arc<AtomicUsize>,
    /// The link is connected (`herald_cluster_links_up`).
    up: Arc<AtomicBool>,
}

impl Peer {
    pub fn start(addr: SocketAddr, client_id: String, security: Arc<LinkSecurity>) -> Peer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let up = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(addr, client_id, security, rx, up.clone()));
        Peer {
            addr,
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            up,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Nothing queued or being written.
    pub fn is_idle(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }

    /// Queues `frame`. `Err` if the queue is full; with `ack`, the receiver completes when
    /// the peer acknowledged (and fails if the link drops first).
    pub fn send(&self, frame: Frame, ack: bool) -> Result<Option<oneshot::Receiver<()>>, ()> {
        let (ack_tx, ack_rx) = if ack {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        self.queue(frame, ack_tx, None).map(|_| ack_rx)
    }

    /// Queues a question (`Frame::question`); the receiver completes with the peer's answer,
    /// and fails if the link drops first. `Err` if the queue is full.
    pub fn ask(&self, frame: Frame) -> Result<oneshot::Receiver<u64>, ()> {
        let (tx, rx) = oneshot::channel();
        self.queue(frame, None, Some(tx)).map(|_| rx)
    }

    fn queue(
        &self,
        frame: Frame,
        ack: Option<oneshot::Sender<()>>,
        answer: Option<oneshot::Sender<u64>>,
    ) -> Result<(), ()> {
        let size = frame.size();
        let before = self.queued.fetch_add(size, Ordering::AcqRel);
        let held = Held(self.queued.clone(), size);
        if before > 0 && before + size > QUEUE_BYTES {
            metrics::limit_hit("cluster_link_bytes");
            return Err(());
        }
        self.tx
            .try_send(Out {
                frame,
                ack,
                answer,
                _held: held,
            })
            .map_err(|_| ())
    }
}

/// Keeps a link to `addr` up while the `Peer` exists, reconnecting with backoff.
async fn run(
    addr: SocketAddr,
    client_id: String,
    security: Arc<LinkSecurity>,
    mut rx: mpsc::Receiver<Out>,
    connected: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(100);
    // Logged on each change, and the first failure too: None = not tried yet.
    let mut up = None;
    loop {
        let dialled = dial(addr, &client_id, &security).await;
        connected.store(dialled.is_ok(), Ordering::Relaxed);
        let linked = match dialled {
            Ok(LinkStream::Plain(s)) => Ok(serve_out(s, &mut rx, &mut up, addr).await),
            Ok(LinkStream::Tls(s)) => Ok(serve_out(*s, &mut rx, &mut up, addr).await),
            Err(e) => Err(e),
        };
        connected.store(false, Ordering::Relaxed);
        match linked {
            Ok(true) => backoff = Duration::from_millis(100),
            Ok(false) => return,
            Err(e) => {
                if up != Some(false) {
                    tracing::warn!(peer = %addr, error = %e, "node link down");
                    up = Some(false);
                }
            }
        }
        // Whatever waits would wait for a link that may not come back soon: push hints
        // are recovered from the outbox, forwarded publishes are counted as failed.
        while let Ok(out) = rx.try_recv() {
            drop(out);
            metrics::forward_failed();
        }
        if rx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// What a node presents to its peers and demands of them.
pub struct LinkSecurity {
    /// `cluster.secret`: sent as the CONNECT password, and required of every peer.
    pub secret: Secret,
    /// `cluster.tls`: dial peers over TLS (verified against `cluster.tls_ca`) and accept
    /// only TLS on the node-to-node listener.
    pub tls: Option<LinkTls>,
}

pub struct LinkTls {
    pub client: Arc<rustls::ClientConfig>,
    pub server: Arc<TlsServer>,
}

enum LinkStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn dial(
    addr: SocketAddr,
    client_id: &str,
    security: &LinkSecurity,
) -> std::io::Result<LinkStream> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut stream = match &security.tls {
            None => LinkStream::Plain(stream),
            Some(tls) => {
                // Peers are dialled by their advertised IP: their certificates name it.
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
                LinkStream::Tls(Box::new(connector.connect(name, stream).await?))
            }
        };
        let mut b = BytesMut::new();
        // The user name is only there because MQTT 3.1.1 allows no password without one.
        let login = Some(("herald", security.secret.expose().as_bytes()));
        codec::encode_connect(&mut b, client_id, (PING_EVERY.as_secs() * 3) as u16, login);
        match &mut stream {
            LinkStream::Plain(s) => handshake(s, &mut b).await?,
            LinkStream::Tls(s) => handshake(&mut **s, &mut b).await?,
        }
        Ok(stream)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("connect timed out")))
}

/// Sends the CONNECT in `b` and waits for CONNACK 0.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    b: &mut BytesMut,
) -> std::io::Result<()> {
    stream.write_all(b).await?;
    b.clear();
    loop {
        if stream.read_buf(b).await? == 0 {
            return Err(std::io::Error::other("closed before CONNACK"));
        }
        match codec::decode_from_server(b) {
            Ok(Some(ServerPacket::ConnAck(0))) => return Ok(()),
            Ok(Some(ServerPacket::ConnAck(5))) => {
                return Err(std::io::Error::other(
                    "refused with CONNACK 5: the peer has another cluster.secret",
                ))
            }
            Ok(None) => {}
            Ok(Some(p)) => return Err(std::io::Error::other(format!("refused: {p:?}"))),
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
}

/// Sends queued frames until the link fails (true: reconnect) or the `Peer` is dropped
/// (false).
async fn serve_out<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    rx: &mut mpsc::Receiver<Out>,
    up: &mut Option<bool>,
    addr: SocketAddr,
) -> bool {
    if *up != Some(true) {
        tracing::info!(peer = %addr, "node link up");
        *up = Some(true);
    }
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut unacked: HashMap<u16, oneshot::Sender<()>> = HashMap::new();
    // Questions waiting for their answer, by id. Dropped with the link: the askers then
    // fail at once rather than at their timeout.
    let mut questions: HashMap<u64, oneshot::Sender<u64>> = HashMap::new();
    let mut next_pkid: u16 = 0;
    let (mut rbuf, mut wbuf, mut body) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
    let mut batch = Vec::with_capacity(256);
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 256), if unacked.len() < MAX_UNACKED => {
                if n == 0 {
                    return false;
                }
                for out in batch.drain(..) {
                    let pkid = match out.ack {
                        Some(ack) => {
                            next_pkid = next_free(next_pkid, &unacked);
                            unacked.insert(next_pkid, ack);
                            next_pkid
                        }
                        None => 0,
                    };
                    if let (Some(id), Some(answer)) = (out.frame.question(), out.answer) {
                        if questions.len() >= 1024 {
                            // Askers that gave up (timed out) leave their sender behind.
                            questions.retain(|_, a| !a.is_closed());
                        }
                        questions.insert(id, answer);
                    }
                    out.frame.encode(&mut wbuf, &mut body, pkid);
                }
                match tokio::time::timeout(ACK_TIMEOUT, wr.write_all(&wbuf)).await {
                    // A batch of large messages must not stay allocated for the link's life.
                    Ok(Ok(())) if wbuf.capacity() > 1 << 20 => wbuf = BytesMut::new(),
                    Ok(Ok(())) => wbuf.clear(),
                    _ => return true,
                }
            }
            r = rd.read_buf(&mut rbuf) => {
                if !matches!(r, Ok(n) if n > 0) {
                    return true;
                }
                heard = Instant::now();
                loop {
                    if rbuf.first().is_some_and(|b| b >> 4 == 3) {
                        match take_answer(&mut rbuf) {
                            Ok(Some((id, value))) => {
                                if let Some(a) = questions.remove(&id) {
                                    let _ = a.send(value);
                                }
                                continue;
                            }
                            Ok(None) => break,
                            Err(()) => return true,
                        }
                    }
                    match codec::decode_from_server(&mut rbuf) {
                        Ok(Some(ServerPacket::PubAck(id))) => {
                            if let Some(ack) = unacked.remove(&id) {
                                let _ = ack.send(());
                            }
                        }
                        Ok(Some(ServerPacket::PingResp)) => {}
                        Ok(Some(ServerPacket::ConnAck(_))) | Err(_) => return true,
                        Ok(None) => break,
                    }
                }
            }
            _ = ping.tick() => {
                // A peer that stopped answering (blackholed, frozen) is as good as gone.
                if heard.elapsed() > PING_EVERY * 3 {
                    return true;
                }
                codec::encode_pingreq(&mut wbuf);
                match tokio::time::timeout(ACK_TIMEOUT, wr.write_all(&wbuf)).await {
                    Ok(Ok(())) => wbuf.clear(),
                    _ => return true,
                }
            }
        }
    }
}

/// An `Answer` PUBLISH from the peer: `Ok(None)` until it is all in `rbuf`; `Err` for
/// anything else (the link is dropped, as for any packet a peer should not send).
fn take_answer(rbuf: &mut BytesMut) -> Result<Option<(u64, u64)>, ()> {
    match codec::decode(rbuf, MAX_FROM_PEER) {
        Ok(Some(Packet::Publish(p))) => match Frame::decode(&p.topic, p.payload) {
            Some(Frame::Answer { id, value }) => Ok(Some((id, value))),
            _ => Err(()),
        },
        Ok(None) => Ok(None),
        _ => Err(()),
    }
}

fn next_free(mut id: u16, used: &HashMap<u16, oneshot::Sender<()>>) -> u16 {
    loop {
        id = id.wrapping_add(1).max(1);
        if !used.contains_key(&id) {
            return id;
        }
    }
}

/// What the receiving side of the links applies frames to.
pub(super) struct Inbound {
    pub(super) local: Arc<dyn Local>,
    /// This node's incarnation: frames for another are dropped.
    pub(super) inc: u64,
    /// Room for a client's largest packet plus the frame's own fields.
    pub(super) max_packet: usize,
}

/// Accepts peers' links and applies what they send.
pub(super) async fn serve(
    listener: TcpListener,
    inbound: Arc<Inbound>,
    security: Arc<LinkSecurity>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if lograte::allow(Reason::AcceptFailed) {
                        tracing::warn!(error = %e, "node link accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let (inbound, stop, security) = (inbound.clone(), stop.clone(), security.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let served = async {
                match &security.tls {
                    None => serve_in(stream, &inbound, &security.secret).await,
                    Some(tls) => {
                        let (s, _) =
                            tokio::time::timeout(CONNECT_TIMEOUT * 5, tls.server.accept(stream))
                                .await
                                .map_err(|_| "TLS handshake timed out".to_string())?
                                .map_err(|e| format!("TLS handshake: {e}"))?;
                        serve_in(s, &inbound, &security.secret).await
                    }
                }
            };
            tokio::select! {
                r = served => {
                    if let Err(e) = r {
                        if lograte::allow(Reason::NodeLink) {
                            tracing::info!(peer = %peer, error = %e, "node link closed");
                        }
                    }
                }
                _ = stop.cancelled() => {}
            }
        });
    }
}

type Storing =
    std::pin::Pin<Box<dyn std::future::Future<Output = (u16, Result<(), StoreError>)> + Send>>;

/// A broadcast running for a peer: its question id and count, `None` if its task failed.
type Asked = futures::future::BoxFuture<'static, Option<(u64, u64)>>;

async fn serve_in<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    inbound: &Inbound,
    secret: &Secret,
) -> Result<(), String> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let max = inbound.max_packet;
    let mut rbuf = BytesMut::new();
    let connect = tokio::time::timeout(CONNECT_TIMEOUT * 5, async {
        loop {
            match codec::decode(&mut rbuf, max) {
                Ok(Some(Packet::Connect(c))) => return Ok(c),
                Ok(Some(_)) => return Err("first packet is not CONNECT".to_string()),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match rd.read_buf(&mut rbuf).await {
                Ok(0) | Err(_) => return Err("closed before CONNECT".to_string()),
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| "no CONNECT in time".to_string())??;
    let mut wbuf = BytesMut::new();
    let presented = connect.login.as_ref().map_or(&[][..], |l| &l.password[..]);
    let good: bool = subtle::ConstantTimeEq::ct_eq(presented, secret.expose().as_bytes()).into();
    if !good {
        metrics::auth_failure(AuthFailure::ClusterSecret);
        codec::encode_connack(&mut wbuf, false, 5);
        let _ = wr.write_all(&wbuf).await;
        if lograte::allow(Reason::NodeLink) {
            tracing::warn!(client = %connect.client_id, "node link refused: wrong or missing cluster.secret");
        }
        return Ok(());
    }
    tracing::debug!(peer = %connect.client_id, "node link accepted");
    codec::encode_connack(&mut wbuf, false, 0);
    let mut storing: FuturesOrdered<Storing> = FuturesOrdered::new();
    let mut asked: FuturesUnordered<Asked> = FuturesUnordered::new();
    let mut body = BytesMut::new();
    loop {
        if !wbuf.is_empty() {
            wr.write_all(&wbuf).await.map_err(|e| e.to_string())?;
            wbuf.clear();
        }
        tokio::select! {
            Some((pkid, r)) = storing.next(), if !storing.is_empty() => {
                if pkid != 0 {
                    // Not stored here: drop the link; the sender counts the forward as failed.
                    r.map_err(|e| format!("forwarded publish not stored: {e}"))?;
                    codec::encode_puback(&mut wbuf, pkid);
                }
            }
            Some(done) = asked.next(), if !asked.is_empty() => {
                if let Some((id, value)) = done {
                    Frame::Answer { id, value }.encode(&mut wbuf, &mut body, 0);
                }
            }
            r = rd.read_buf(&mut rbuf), if storing.len() < MAX_UNACKED && asked.len() < MAX_ASKED => {
                match r {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
                while let Some(p) = codec::decode(&mut rbuf, max).map_err(|e| e.to_string())? {
                    match p {
                        Packet::Publish(p) => {
                            let frame = Frame::decode(&p.topic, p.payload)
                                .ok_or_else(|| format!("bad frame on {}", p.topic))?;
                            // Packet id 0 marks QoS 0: applied in order, never acknowledged.
                            let pkid = if p.qos == Qos::AtMostOnce { 0 } else { p.pkid };
                            let frame = match answer(inbound, frame, &mut wbuf, &mut body) {
                                Answering::Not(frame) => frame,
                                Answering::Now => continue,
                                Answering::Later(a) => {
                                    asked.push(a);
                                    continue;
                                }
                                Answering::Refused(why) => return Err(why.into()),
                            };
                            match apply(inbound, frame) {
                                Some(store) => {
                                    storing.push_back(Box::pin(async move { (pkid, store.await) }))
                                }
                                None if pkid != 0 => codec::encode_puback(&mut wbuf, pkid),
                                None => {}
                            }
                        }
                        Packet::PingReq => codec::encode_pingresp(&mut wbuf),
                        Packet::Disconnect => return Ok(()),
                        other => return Err(format!("unexpected {other:?}")),
                    }
                }
            }
        }
    }
}

enum Answering {
    /// Not a question.
    Not(Frame),
    /// Answered into the write buffer.
    Now,
    /// Runs on its own task; answered when done.
    Later(Asked),
    /// Not a frame a dialling peer sends.
    Refused(&'static str),
}

/// Questions: a status is answered at once; a broadcast runs on a task of its own, so that
/// the link keeps carrying pushes while it fans out.
fn answer(inbound: &Inbound, frame: Frame, wbuf: &mut BytesMut, body: &mut BytesMut) -> Answering {
    match frame {
        Frame::Status { id, client } => {
            let value = inbound.local.connected_since(&client).unwrap_or(0);
            Frame::Answer { id, value }.encode(wbuf, body, 0);
            Answering::Now
        }
        Frame::Broadcast { id, qos, payload } => {
            let job = tokio::spawn(inbound.local.clone().broadcast(payload, qos));
            Answering::Later(Box::pin(async move { job.await.ok().map(|n| (id, n)) }))
        }
        Frame::Answer { .. } => Answering::Refused("an answer from the dialling side"),
        other => Answering::Not(other),
    }
}

/// Applies one frame; a forwarded publish returns the future of its local stores.
fn apply(
    inbound: &Inbound,
    frame: Frame,
) -> Option<futures::future::BoxFuture<'static, Result<(), StoreError>>> {
    match frame {
        Frame::Push {
            target_inc,
            client,
            seq,
            qos,
            msg,
        } => {
            metrics::forward_received(Forward::Push);
            if target_inc != inbound.inc {
                metrics::stale_route();
                return None;
            }
            inbound.local.take_forward(&client, seq, qos, msg);
            None
        }
        Frame::Publish { msg, .. } => {
            metrics::forward_received(Forward::Publish);
            // Whatever incarnation it was meant for, its subscribers here are the ones the
            // local subscription table knows now.
            Some(inbound.local.clone().publish_from_peer(msg))
        }
        Frame::Kick {
            target_inc,
            client,
            epoch,
        } => {
            metrics::forward_received(Forward::Kick);
            if target_inc == inbound.inc {
                inbound.local.kick_if_older(&client, epoch);
            }
            None
        }
        // Taken by `answer` before.
        Frame::Broadcast { .. } | Frame::Status { .. } | Frame::Answer { .. } => None,
    }
}
