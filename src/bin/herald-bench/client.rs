//! A minimal MQTT 3.1.1 client: just what the scenarios need, written for low overhead.
//!
//! Packets are parsed in place from the read buffer (no allocation per packet), every PUBACK a
//! read produces goes out in one write, and a publisher encodes a whole batch of PUBLISH
//! packets into one buffer before writing it. The broker-side codec in `herald::codec`
//! refuses server-to-client packets, so the client has its own (small) one here.
//!
//! Over plain TCP or TLS (`Target::tls`: rustls with the ring provider, session resumption
//! off, so every connection is a full handshake), with or without a user name and password
//! in CONNECT (`Hello::login`).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

static START: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process's shared clock start. Payload timestamps use it, so sender
/// and receiver must be in the same process (they are: one tool drives both sides).
pub fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Where to connect, and which loopback source addresses to spread connections over.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// First source address (e.g. 127.0.0.2) as an integer; connection `i` uses
    /// `first + i % sources`. `sources == 0`: let the kernel choose.
    pub first_source: u32,
    pub sources: u32,
    /// TLS on top of TCP (None: plain MQTT).
    pub tls: Option<Tls>,
}

/// The client side of TLS: a rustls config without session resumption, and the name the
/// server's certificate must carry.
#[derive(Clone)]
pub struct Tls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// What the TLS handshakes of this process negotiated (every one is checked to be a full
/// handshake: resumption is off).
#[derive(Default)]
pub struct TlsStats {
    pub full: AtomicU64,
    pub resumed: AtomicU64,
    /// "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519" of the first handshake.
    pub first: OnceLock<String>,
}

pub fn tls_stats() -> &'static TlsStats {
    static S: OnceLock<TlsStats> = OnceLock::new();
    S.get_or_init(TlsStats::default)
}

/// TLS 1.2 and/or 1.3, ring provider, resumption disabled (no session cache, no tickets
/// sent back), trusting the CA in `cafile` (PEM), or nothing checked with `no_verify` (the
/// server's side of the handshake is the same either way; only this tool saves the
/// certificate chain and signature checks).
pub fn tls_config(
    cafile: Option<&std::path::Path>,
    no_verify: bool,
    versions: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match versions {
        "1.3" => &[&rustls::version::TLS13],
        "1.2" => &[&rustls::version::TLS12],
        "any" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        v => return Err(format!("--tls-version {v}: expected 1.3, 1.2 or any")),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("tls: {e}"))?;
    let mut config = if no_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let path = cafile.ok_or("--tls needs --cafile PEM (or --tls-no-verify)")?;
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no certificate", path.display()));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts any certificate (`--tls-no-verify`): the signature in CertificateVerify is not
/// checked either, which saves this tool an ECDSA verification per handshake.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection to the broker: plain TCP or TLS over TCP.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The read half of a `Stream` (TCP: tokio's owned half, no lock; TLS: `tokio::io::split`).
pub enum ReadHalf {
    Tcp(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write half of a `Stream`.
pub enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl Stream {
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

macro_rules! dispatch_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! dispatch_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

dispatch_read!(Stream);
dispatch_read!(ReadHalf);
dispatch_write!(Stream);
dispatch_write!(WriteHalf);

impl Target {
    pub fn source(&self, i: usize) -> Option<Ipv4Addr> {
        (self.sources > 0).then(|| Ipv4Addr::from(self.first_source + (i as u32 % self.sources)))
    }

    /// A TCP connection bound to connection `i`'s source address.
    pub async fn tcp(&self, i: usize) -> io::Result<TcpStream> {
        let sock = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let (Some(src), SocketAddr::V4(_)) = (self.source(i), self.addr) {
            // SO_REUSEADDR lets bind() pick ports still in TIME_WAIT from an earlier run.
            sock.set_reuseaddr(true)?;
            sock.bind(SocketAddr::new(src.into(), 0))?;
        }
        let stream = sock.connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// TCP from connection `i`'s source address, then the TLS handshake if TLS is on.
    pub async fn connect(&self, i: usize) -> Result<Stream, String> {
        let tcp = self
            .tcp(i)
            .await
            .map_err(|e| format!("connect from {:?}: {e}", self.source(i)))?;
        let Some(tls) = &self.tls else {
            return Ok(Stream::Tcp(tcp));
        };
        let s = tls
            .connector
            .connect(tls.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let st = tls_stats();
        let conn = s.get_ref().1;
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            st.resumed.fetch_add(1, Relaxed);
        } else {
            st.full.fetch_add(1, Relaxed);
        }
        if st.first.get().is_none() {
            let _ = st.first.set(
                format!(
                    "{:?} {:?} {:?}",
                    conn.protocol_version(),
                    conn.negotiated_cipher_suite().map(|c| c.suite()),
                    conn.negotiated_key_exchange_group().map(|g| g.name()),
                )
                .replace("Some(", "")
                .replace(')', ""),
            );
        }
        Ok(Stream::Tls(Box::new(s)))
    }
}

/// A packet from the broker, borrowing from the read buffer.
#[derive(Debug)]
pub enum Packet<'a> {
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish {
        qos: u8,
        dup: bool,
        pkid: u16,
        topic: &'a [u8],
        payload: &'a [u8],
    },
    PubAck,
    PubRec,
    PubRel(u16),
    PubComp,
    SubAck {
        codes: &'a [u8],
    },
    UnsubAck,
    PingResp,
}

/// Parses one packet off the front of `buf`: the packet and its length, or `None` if
/// incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        if i > 4 {
            return Err("bad remaining length");
        }
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let total = i + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[i..total];
    let b0 = buf[0];
    let id = |body: &[u8]| {
        if body.len() < 2 {
            Err("short packet")
        } else {
            Ok(u16::from_be_bytes([body[0], body[1]]))
        }
    };
    let p = match b0 >> 4 {
        2 => {
            if body.len() != 2 {
                return Err("bad CONNACK");
            }
            Packet::ConnAck {
                session_present: body[0] & 1 != 0,
                code: body[1],
            }
        }
        3 => {
            let qos = (b0 >> 1) & 3;
            let tl = id(body)? as usize;
            let mut off = 2 + tl;
            if body.len() < off {
                return Err("PUBLISH topic runs past the packet");
            }
            let topic = &body[2..off];
            let pkid = if qos > 0 {
                let p = id(&body[off..])?;
                off += 2;
                p
            } else {
                0
            };
            Packet::Publish {
                qos,
                dup: b0 & 8 != 0,
                pkid,
                topic,
                payload: &body[off..],
            }
        }
        4 => {
            id(body)?;
            Packet::PubAck
        }
        5 => {
            id(body)?;
            Packet::PubRec
        }
        6 => Packet::PubRel(id(body)?),
        7 => {
            id(body)?;
            Packet::PubComp
        }
        9 => {
            id(body)?;
            Packet::SubAck { codes: &body[2..] }
        }
        11 => Packet::UnsubAck,
        13 => Packet::PingResp,
        _ => return Err("unexpected packet type from the broker"),
    };
    Ok(Some((p, total)))
}

fn put_len(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

/// CONNECT, with a user name and password when `login` is given.
pub fn encode_connect(
    buf: &mut BytesMut,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    login: Option<(&str, &[u8])>,
) {
    let extra = login.map_or(0, |(u, p)| 2 + u.len() + 2 + p.len());
    buf.put_u8(0x10);
    put_len(buf, 10 + 2 + client_id.len() + extra);
    buf.put_u16(4);
    buf.put_slice(b"MQTT");
    buf.put_u8(4);
    let mut flags = if clean { 0x02 } else { 0 };
    if login.is_some() {
        flags |= 0xC0;
    }
    buf.put_u8(flags);
    buf.put_u16(keep_alive);
    buf.put_u16(client_id.len() as u16);
    buf.put_slice(client_id.as_bytes());
    if let Some((user, password)) = login {
        buf.put_u16(user.len() as u16);
        buf.put_slice(user.as_bytes());
        buf.put_u16(password.len() as u16);
        buf.put_slice(password);
    }
}

pub fn encode_subscribe(buf: &mut BytesMut, pkid: u16, filter: &str, qos: u8) {
    buf.put_u8(0x82);
    put_len(buf, 2 + 2 + filter.len() + 1);
    buf.put_u16(pkid);
    buf.put_u16(filter.len() as u16);
    buf.put_slice(filter.as_bytes());
    buf.put_u8(qos);
}

/// Length of the stamp at the front of every benchmark payload.
pub const STAMP_LEN: usize = 16;

/// A PUBLISH whose payload starts with the send time and a sequence number (little-endian
/// u64 each), zero-padded to `payload_len`.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish(
    buf: &mut BytesMut,
    topic: &[u8],
    qos: u8,
    pkid: u16,
    ts_ns: u64,
    seq: u64,
    payload_len: usize,
) {
    let payload_len = payload_len.max(STAMP_LEN);
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload_len;
    buf.reserve(len + 5);
    buf.put_u8(0x30 | qos << 1);
    put_len(buf, len);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    if qos > 0 {
        buf.put_u16(pkid);
    }
    buf.put_u64_le(ts_ns);
    buf.put_u64_le(seq);
    buf.put_bytes(0, payload_len - STAMP_LEN);
}

/// (send time, sequence number) of a benchmark payload.
pub fn stamp(payload: &[u8]) -> Option<(u64, u64)> {
    if payload.len() < STAMP_LEN {
        return None;
    }
    let ts = u64::from_le_bytes(payload[0..8].try_into().ok()?);
    let seq = u64::from_le_bytes(payload[8..16].try_into().ok()?);
    Some((ts, seq))
}

pub fn encode_puback(buf: &mut BytesMut, pkid: u16) {
    buf.put_slice(&[0x40, 2]);
    buf.put_u16(pkid);
}

/// What a connection does with the messages it receives.
pub trait OnPublish {
    /// One PUBLISH; `now` is the time the read that brought it returned.
    fn publish(&mut self, qos: u8, dup: bool, topic: &[u8], payload: &[u8], now: u64);
    /// Called after each read's packets have been handled.
    fn batch_end(&mut self, _now: u64) {}
}

/// Ignores messages.
pub struct Ignore;

impl OnPublish for Ignore {
    fn publish(&mut self, _: u8, _: bool, _: &[u8], _: &[u8], _: u64) {}
}

pub struct Client {
    pub stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    read_size: usize,
    pub connack: Option<(bool, u8)>,
    pub subacks: usize,
    pub refused_subs: usize,
    pub pubacks: u64,
}

/// How to open a connection.
pub struct Hello<'a> {
    pub client_id: &'a str,
    pub clean: bool,
    pub keep_alive: u16,
    /// Subscribe (pipelined right behind CONNECT) to this filter at this QoS.
    pub subscribe: Option<(&'a str, u8)>,
    /// User name and password in CONNECT.
    pub login: Option<(&'a str, &'a [u8])>,
}

impl Client {
    /// TCP connect from source address `i` (+ the TLS handshake), CONNECT (+ SUBSCRIBE), wait
    /// for CONNACK (+ SUBACK).
    /// Messages arriving meanwhile go to `h` (and are acknowledged).
    pub async fn open<H: OnPublish>(
        target: &Target,
        i: usize,
        hello: &Hello<'_>,
        h: &mut H,
        read_size: usize,
    ) -> Result<Client, String> {
        let stream = target.connect(i).await?;
        let mut c = Client {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::with_capacity(64),
            read_size,
            connack: None,
            subacks: 0,
            refused_subs: 0,
            pubacks: 0,
        };
        encode_connect(
            &mut c.wbuf,
            hello.client_id,
            hello.clean,
            hello.keep_alive,
            hello.login,
        );
        if let Some((filter, qos)) = hello.subscribe {
            encode_subscribe(&mut c.wbuf, 1, filter, qos);
        }
        c.flush().await.map_err(|e| format!("write CONNECT: {e}"))?;
        let want_subacks = hello.subscribe.is_some() as usize;
        loop {
            if let Some((_, code)) = c.connack {
                if code != 0 {
                    return Err(format!("CONNACK return code {code}"));
                }
                if c.refused_subs > 0 {
                    return Err("SUBSCRIBE refused (0x80)".into());
                }
                if c.subacks >= want_subacks {
                    break;
                }
            }
            match c.read_some(h).await {
                Ok(true) => {}
                Ok(false) => return Err("closed by the broker during the handshake".into()),
                Err(e) => return Err(format!("handshake: {e}")),
            }
        }
        if c.rbuf.is_empty() {
            c.rbuf = BytesMut::new();
        }
        Ok(c)
    }

    pub fn session_present(&self) -> bool {
        matches!(self.connack, Some((true, _)))
    }

    /// One read: handles every complete packet, acknowledges QoS 1 messages (one write for
    /// all of them). `Ok(false)`: the broker closed the connection.
    pub async fn read_some<H: OnPublish>(&mut self, h: &mut H) -> io::Result<bool> {
        self.rbuf.reserve(self.read_size);
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Ok(false);
        }
        let now = now_ns();
        let mut off = 0;
        loop {
            match parse(&self.rbuf[off..]) {
                Ok(Some((p, n))) => {
                    off += n;
                    match p {
                        Packet::Publish {
                            qos,
                            dup,
                            pkid,
                            topic,
                            payload,
                        } => {
                            h.publish(qos, dup, topic, payload, now);
                            match qos {
                                0 => {}
                                1 => encode_puback(&mut self.wbuf, pkid),
                                _ => {
                                    // PUBREC; the scenarios never use QoS 2.
                                    self.wbuf.put_slice(&[0x50, 2]);
                                    self.wbuf.put_u16(pkid);
                                }
                            }
                        }
                        Packet::ConnAck {
                            session_present,
                            code,
                        } => self.connack = Some((session_present, code)),
                        Packet::SubAck { codes } => {
                            self.subacks += 1;
                            self.refused_subs += codes.iter().filter(|&&c| c >= 0x80).count();
                        }
                        Packet::PubAck => self.pubacks += 1,
                        Packet::PubRel(id) => {
                            self.wbuf.put_slice(&[0x70, 2]);
                            self.wbuf.put_u16(id);
                        }
                        Packet::PubRec | Packet::PubComp => {}
                        Packet::UnsubAck | Packet::PingResp => {}
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
        self.rbuf.advance(off);
        h.batch_end(now);
        self.flush().await?;
        Ok(true)
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    pub async fn ping(&mut self) -> io::Result<()> {
        self.stream.write_all(&[0xC0, 0]).await
    }

    /// DISCONNECT, then wait (briefly) for the broker to close: once it has, the broker has
    /// taken the DISCONNECT and everything before it.
    pub async fn disconnect(mut self, wait: Duration) {
        let _ = self.flush().await;
        if self.stream.write_all(&[0xE0, 0]).await.is_err() {
            return;
        }
        let _ = self.stream.shutdown().await;
        let _ = tokio::time::timeout(wait, async {
            let mut scratch = [0u8; 1024];
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    pub fn into_stream(self) -> Stream {
        self.stream
    }
}
