//! Shared helpers for the integration tests: an in-process Herald on an ephemeral loopback
//! port, a raw MQTT 3.1.1 client, waiting and metric scraping. `process` has the helpers for
//! real processes (`redis-server`, Sentinel, the `herald` binary, and `Broker`: a broker
//! process of one test's own, for any test that checks a counter); `keys` names Herald's
//! Redis keys.
//!
//! The store under test comes from `HERALD_TEST_STORE`: `memory` (the default) or `redis`.
//! With `redis`, every `start_with` starts a private `redis-server` (free loopback port, temp
//! dir, AOF) for its broker and kills it when the returned `TestServer` goes away, so the
//! same tests check both stores (scripts/test.sh runs the behavioural ones both ways).
//!
//! The raw client encodes packets by hand (so tests can send any protocol name, level, flag
//! bits or broken length) and decodes what the broker sends with `mqttbytes`. Unlike a real
//! client library it never acknowledges anything by itself, so tests see DUP flags and packet
//! ids exactly as the broker wrote them and decide themselves when (and whether) to ack.
//!
//! "Nothing else arrives" is checked with a marker rather than a sleep: another client
//! publishes a marker the receiver is subscribed to, and everything the receiver gets before
//! the marker is what the broker had routed to it before the marker.
//!
//! Metrics: an in-process broker counts into the one recorder of its test binary, shared
//! with the binary's other tests running in parallel, so no test reads counters in-process;
//! a test that checks a counter starts a `process::Broker` and scrapes its own process.
#![allow(dead_code)]

pub mod fleet;
pub mod http;
pub mod keys;
pub mod pki;
pub mod process;
pub mod redis_cluster;

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use herald::config::StoreKind;
use herald::{Config, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

pub use mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, Publish, SubscribeReasonCode};
pub use mqttbytes::QoS;

/// How long a test waits for something that should happen at once. Only reached on failure.
pub const WAIT: Duration = Duration::from_secs(2);

/// Payload of the marker messages (see the module docs).
pub const MARKER: &[u8] = b"--marker--";

/// The store the tests run against: `HERALD_TEST_STORE=memory` (the default), `redis` or
/// `redis-cluster` (the Redis store on a Redis Cluster of three primaries and three
/// replicas, one per test: `redis_cluster`).
pub fn test_store() -> StoreKind {
    match std::env::var("HERALD_TEST_STORE").as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("") | Ok("memory") => StoreKind::Memory,
        Ok("redis") | Ok("redis-cluster") => StoreKind::Redis,
        other => {
            panic!("HERALD_TEST_STORE={other:?}: expected `memory`, `redis` or `redis-cluster`")
        }
    }
}

/// `HERALD_TEST_STORE=redis-cluster`.
pub fn on_redis_cluster() -> bool {
    std::env::var("HERALD_TEST_STORE").as_deref() == Ok("redis-cluster")
}

/// The transport the tests' clients use: `HERALD_TEST_TRANSPORT=tcp` (the default) or `tls`.
/// With `tls` every broker from `start_with` listens on TLS only (plain TCP off), with a
/// certificate from `pki`, and `Raw` and `mqtt_options` clients speak TLS to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
}

pub fn test_transport() -> Transport {
    match std::env::var("HERALD_TEST_TRANSPORT").as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("") | Ok("tcp") => Transport::Tcp,
        Ok("tls") => Transport::Tls,
        other => panic!("HERALD_TEST_TRANSPORT={other:?}: expected `tcp` or `tls`"),
    }
}

/// rumqttc options for a client of a broker from `start_with`, over the transport under test.
pub fn mqtt_options(id: &str, addr: SocketAddr) -> rumqttc::MqttOptions {
    let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    if test_transport() == Transport::Tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(pki::Pki::get().client_config(None)),
        ));
    }
    opts
}

/// For a test, or a check within one, that does not apply to the Redis store: under
/// `HERALD_TEST_STORE=redis` prints `SKIPPED under HERALD_TEST_STORE=redis: <what>: <reason>`
/// and returns true, so the caller leaves it out. Written to the process's stderr past the
/// test harness's capture, so the reason shows in `cargo test` output (scripts/test.sh counts
/// these lines). Keep such skips rare: the behavioural suite is meant to hold for both stores.
pub fn skip_under_redis(what: &str, reason: &str) -> bool {
    if test_store() != StoreKind::Redis {
        return false;
    }
    // One write, so that parallel tests' output does not cut the line.
    let line = format!("SKIPPED under HERALD_TEST_STORE=redis: {what}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    true
}

/// A Herald started by `start_with`, and under `HERALD_TEST_STORE=redis` the private
/// `redis-server` it uses, which lives as long as the broker. Derefs to `herald::Server`.
pub struct TestServer {
    // Declared first: dropped before the Redis it may still be using.
    server: Server,
    redis: Option<process::RedisServer>,
    cluster: Option<redis_cluster::RedisCluster>,
}

impl Deref for TestServer {
    type Target = Server;

    fn deref(&self) -> &Server {
        &self.server
    }
}

impl TestServer {
    /// `Server::shutdown`, then stops the broker's Redis (if any).
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        drop(self.redis);
        drop(self.cluster);
    }

    /// The broker's private Redis, under `HERALD_TEST_STORE=redis`.
    pub fn redis(&self) -> Option<&process::RedisServer> {
        self.redis.as_ref()
    }
}

/// Starts Herald with defaults on 127.0.0.1:0, with the store under test.
pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

/// Starts Herald on 127.0.0.1:0 with the store under test (`HERALD_TEST_STORE`), after
/// `tweak` has adjusted the defaults.
pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let mut config = Config::default();
    config.server.listen = Some("127.0.0.1:0".parse().unwrap());
    let mut cluster = None;
    let redis = match test_store() {
        StoreKind::Memory => None,
        StoreKind::Redis if on_redis_cluster() => {
            let c = redis_cluster::RedisCluster::start(3, 1)
                .expect("redis-server and redis-cli for HERALD_TEST_STORE=redis-cluster");
            config.store.kind = StoreKind::Redis;
            config.store.redis_url = c.url();
            cluster = Some(c);
            None
        }
        StoreKind::Redis => {
            // Blocks for the few milliseconds redis-server takes to start; nothing else runs
            // on this test's runtime yet. AOF as always, but fsync once a second instead of
            // on every write: these tests are about behaviour, not crashes (those are in
            // tests/redis_durability.rs), and a busy disk must not stall them.
            let redis = process::RedisServer::start_with(&["--appendfsync", "everysec"]);
            config.store.kind = StoreKind::Redis;
            config.store.redis_url = redis.url();
            Some(redis)
        }
    };
    if test_transport() == Transport::Tls {
        let server = pki::Pki::get().server();
        config.server.listen = None;
        config.server.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        config.tls.cert = Some(server.cert);
        config.tls.key = Some(server.key);
    }
    tweak(&mut config);
    let server = Server::start(config).await.expect("start herald");
    TestServer {
        server,
        redis,
        cluster,
    }
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `wait`. For state that
/// has no wire signal (a connection's cleanup finishing, a key in Redis, a log line).
pub async fn wait_until(wait: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {wait:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the broker has finished the cleanup (will, session save) of `client`'s
/// connection.
pub async fn wait_offline(server: &Server, client: &str) {
    let broker = server.broker().clone();
    wait_until(WAIT, &format!("{client} is offline"), async || {
        !broker.is_connected(client)
    })
    .await;
}

/// Outbox length of `client`.
pub async fn outbox_len(server: &Server, client: &str) -> usize {
    server.broker().store().len(client).await.expect("store")
}

/// Value of one series in a Prometheus text exposition (a scrape of a broker process), e.g.
/// `herald_malformed_packets_total` or `herald_messages_dropped_total{reason="expired"}`
/// (labels as the exporter writes them); 0 when the series is not listed.
pub fn metric_in(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// An argon2id hash with the cheapest parameters argon2 allows (Herald takes the cost from
/// the hash string).
pub fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::rand_core::OsRng;
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).expect("argon2 params");
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
        .expect("hash")
        .to_string()
}

/// Writes a password file of cheap hashes in `dir`.
pub fn cheap_passwd(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("passwd");
    let text: String = users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", cheap_hash(p)))
        .collect();
    std::fs::write(&path, text).expect("write passwd");
    path
}

pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
}

/// CONNECT parameters.
pub struct Opts {
    pub id: String,
    pub clean: bool,
    pub keepalive: u16,
    pub will: Option<Will>,
    pub protocol: &'static str,
    pub level: u8,
}

impl Opts {
    pub fn new(id: &str) -> Opts {
        Opts {
            id: id.to_string(),
            clean: true,
            keepalive: 30,
            will: None,
            protocol: "MQTT",
            level: 4,
        }
    }

    pub fn clean(mut self, clean: bool) -> Opts {
        self.clean = clean;
        self
    }

    pub fn keepalive(mut self, secs: u16) -> Opts {
        self.keepalive = secs;
        self
    }

    pub fn will(mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Opts {
        self.will = Some(Will {
            topic: topic.to_string(),
            payload: payload.to_vec(),
            qos,
            retain,
        });
        self
    }

    pub fn protocol(mut self, name: &'static str, level: u8) -> Opts {
        self.protocol = name;
        self.level = level;
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(None, None)
    }

    /// CONNECT with a user name and password as well (MQTT 3.1.1 lets a password go only
    /// with a user name; tests may break that rule on purpose).
    pub fn encode_with(&self, user: Option<&str>, pass: Option<&[u8]>) -> Vec<u8> {
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        let mut body = BytesMut::new();
        put_str(&mut body, self.protocol.as_bytes());
        body.put_u8(self.level);
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos as u8) << 3;
            if w.retain {
                flags |= 0x20;
            }
        }
        if user.is_some() {
            flags |= 0x80;
        }
        if pass.is_some() {
            flags |= 0x40;
        }
        body.put_u8(flags);
        body.put_u16(self.keepalive);
        put_str(&mut body, self.id.as_bytes());
        if let Some(w) = &self.will {
            put_str(&mut body, w.topic.as_bytes());
            put_str(&mut body, &w.payload);
        }
        if let Some(u) = user {
            put_str(&mut body, u.as_bytes());
        }
        if let Some(p) = pass {
            put_str(&mut body, p);
        }
        frame(0x10, &body)
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// A fixed header: first byte and remaining length (a test may announce more than it sends).
pub fn fixed_header(byte1: u8, mut len: usize) -> Vec<u8> {
    let mut out = vec![byte1];
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return out;
        }
    }
}

/// A whole packet: first byte, remaining length, body.
pub fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = fixed_header(byte1, body.len());
    out.extend_from_slice(body);
    out
}

/// `METHOD path` on a broker's metrics listener: the whole response, read until the
/// server closes the connection (every answer does); `None` if nothing answers, or the
/// answer does not end within `WAIT`.
pub async fn http_raw(addr: SocketAddr, method: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(out)
}

/// The status code of an `http_raw` response.
pub fn http_status_of(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

/// `METHOD path` on a broker's metrics listener: the status code and the body.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let out = http_raw(addr, method, path)
        .await
        .unwrap_or_else(|| panic!("no whole answer to {method} {path} from {addr}"));
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (http_status_of(&out).unwrap_or(0), body)
}

/// `GET /metrics` from a broker process's metrics listener: the response.
pub async fn scrape(addr: SocketAddr) -> String {
    http_raw(addr, "GET", "/metrics")
        .await
        .expect("connect to /metrics")
}

/// `scrape` in plain blocking I/O with short timeouts, empty if nothing answers: for a
/// `Drop` that reports on a failed test.
pub fn scrape_blocking(addr: SocketAddr) -> String {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// PUBLISH bytes with every field under the caller's control.
pub fn publish_bytes(
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
) -> Vec<u8> {
    let mut body = BytesMut::new();
    put_str(&mut body, topic);
    if qos > 0 {
        body.put_u16(pkid);
    }
    body.put_slice(payload);
    frame(0x30 | (dup as u8) << 3 | qos << 1 | retain as u8, &body[..])
}

/// SUBSCRIBE bytes; `byte1` is normally 0x82.
pub fn subscribe_bytes(byte1: u8, pkid: u16, filters: &[(&str, QoS)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_u16(pkid);
    for (f, q) in filters {
        put_str(&mut body, f.as_bytes());
        body.put_u8(*q as u8);
    }
    frame(byte1, &body)
}

/// What the next read brought.
#[derive(Debug)]
pub enum Event {
    Packet(Packet),
    Closed,
    Timeout,
}

/// A client's byte stream: TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A raw MQTT client over one TCP connection (TLS under `HERALD_TEST_TRANSPORT=tls`).
pub struct Raw {
    stream: Box<dyn Io>,
    rbuf: BytesMut,
    /// Packets read while waiting for something else (an ack), in arrival order.
    pending: VecDeque<Packet>,
    next_pkid: u16,
}

impl Raw {
    /// Opens the connection only (and its TLS session, under `HERALD_TEST_TRANSPORT=tls`).
    pub async fn open(addr: SocketAddr) -> Raw {
        Raw::from_stream(TcpStream::connect(addr).await.expect("tcp connect")).await
    }

    /// A client over this TCP connection, with TLS on top under `HERALD_TEST_TRANSPORT=tls`.
    pub async fn from_stream(tcp: TcpStream) -> Raw {
        match test_transport() {
            Transport::Tcp => Raw::over(Box::new(tcp)),
            Transport::Tls => {
                let connector =
                    tokio_rustls::TlsConnector::from(pki::Pki::get().client_config(None));
                let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(
                    tcp.peer_addr().expect("peer address").ip().into(),
                );
                match connector.connect(name, tcp).await {
                    Ok(tls) => Raw::over(Box::new(tls)),
                    // The broker closed the socket before the handshake finished (as it
                    // does past max_connections): a client that sees the end at once.
                    Err(_) => Raw::over(Box::new(tokio::io::join(
                        tokio::io::empty(),
                        tokio::io::sink(),
                    ))),
                }
            }
        }
    }

    /// A client over any stream (a TLS or WebSocket one a test made itself).
    pub fn over(stream: Box<dyn Io>) -> Raw {
        Raw {
            stream,
            rbuf: BytesMut::new(),
            pending: VecDeque::new(),
            next_pkid: 1,
        }
    }

    /// Opens, sends CONNECT and returns the CONNACK.
    pub async fn connect_with(addr: SocketAddr, opts: &Opts) -> (Raw, ConnAck) {
        let mut c = Raw::open(addr).await;
        c.send_raw(&opts.encode()).await.expect("send CONNECT");
        match c.expect(WAIT).await {
            Packet::ConnAck(a) => (c, a),
            p => panic!("expected CONNACK, got {p:?}"),
        }
    }

    /// A connected clean-session client; panics unless the broker accepts it.
    pub async fn connect(addr: SocketAddr, id: &str) -> Raw {
        Raw::connect_ok(addr, &Opts::new(id)).await.0
    }

    /// Connects and asserts CONNACK 0; returns session-present too.
    pub async fn connect_ok(addr: SocketAddr, opts: &Opts) -> (Raw, bool) {
        let (c, ack) = Raw::connect_with(addr, opts).await;
        assert_eq!(
            ack.code,
            ConnectReturnCode::Success,
            "CONNACK for {}",
            opts.id
        );
        (c, ack.session_present)
    }

    /// The byte stream itself (a test that reads at its own pace).
    pub fn stream_mut(&mut self) -> &mut Box<dyn Io> {
        &mut self.stream
    }

    /// Writes `bytes` and flushes them: over TLS, a write the socket cannot take at once
    /// leaves the rest in the TLS session's buffer, where only a flush (or another write)
    /// sends it, and a client that then waits to read would wait for ever.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.send_raw(bytes).await.expect("send to broker");
    }

    fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        id
    }

    /// The next packet (pending ones first), the end of the connection, or a timeout.
    pub async fn next(&mut self, wait: Duration) -> Event {
        if let Some(p) = self.pending.pop_front() {
            return Event::Packet(p);
        }
        self.read_packet(Instant::now() + wait).await
    }

    async fn read_packet(&mut self, deadline: Instant) -> Event {
        loop {
            match mqttbytes::v4::read(&mut self.rbuf, 1 << 24) {
                Ok(p) => return Event::Packet(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent bytes that do not decode: {e:?}"),
            }
            match timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Err(_) => return Event::Timeout,
                // A reset is a close too: the broker may drop a socket with unread input.
                Ok(Ok(0)) | Ok(Err(_)) => return Event::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    pub async fn expect(&mut self, wait: Duration) -> Packet {
        match self.next(wait).await {
            Event::Packet(p) => p,
            e => panic!("expected a packet, got {e:?}"),
        }
    }

    pub async fn expect_publish(&mut self) -> Publish {
        match self.expect(WAIT).await {
            Packet::Publish(p) => p,
            p => panic!("expected PUBLISH, got {p:?}"),
        }
    }

    /// Asserts the broker closes the connection within `wait` without sending anything.
    pub async fn expect_closed(&mut self, wait: Duration) {
        match self.next(wait).await {
            Event::Closed => {}
            e => panic!("expected the broker to close the connection, got {e:?}"),
        }
    }

    /// Reads until the broker closes the connection, dropping whatever arrives meanwhile
    /// (never acknowledged); returns when it saw the close, or `None` if the connection is
    /// still open after `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> Option<Instant> {
        let deadline = Instant::now() + wait;
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Event::Closed => return Some(Instant::now()),
                Event::Timeout => return None,
                Event::Packet(_) => {}
            }
        }
    }

    /// Asserts nothing arrives for `wait`. Only for tests about time itself (keepalive).
    pub async fn expect_silence(&mut self, wait: Duration) {
        match self.next(wait).await {
            Event::Timeout => {}
            e => panic!("expected silence, got {e:?}"),
        }
    }

    /// Reads until a packet satisfies `want`; the others are kept for later reads.
    async fn wait_for(&mut self, what: &str, want: impl Fn(&Packet) -> bool) -> Packet {
        if let Some(i) = self.pending.iter().position(&want) {
            return self.pending.remove(i).expect("index from position");
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.read_packet(deadline).await {
                Event::Packet(p) if want(&p) => return p,
                Event::Packet(p) => self.pending.push_back(p),
                e => panic!("waiting for {what}, got {e:?}"),
            }
        }
    }

    /// SUBSCRIBE and wait for the SUBACK; returns its return codes.
    pub async fn subscribe(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReasonCode> {
        let pkid = self.pkid();
        self.send(&subscribe_bytes(0x82, pkid, filters)).await;
        match self
            .wait_for(
                "SUBACK",
                |p| matches!(p, Packet::SubAck(a) if a.pkid == pkid),
            )
            .await
        {
            Packet::SubAck(a) => a.return_codes,
            _ => unreachable!(),
        }
    }

    /// SUBSCRIBE that must be granted as asked.
    pub async fn sub(&mut self, filter: &str, qos: QoS) {
        let codes = self.subscribe(&[(filter, qos)]).await;
        assert_eq!(
            codes,
            [SubscribeReasonCode::Success(qos)],
            "SUBACK for {filter}"
        );
    }

    pub async fn unsubscribe(&mut self, filters: &[&str]) {
        let pkid = self.pkid();
        let mut body = BytesMut::new();
        body.put_u16(pkid);
        for f in filters {
            put_str(&mut body, f.as_bytes());
        }
        self.send(&frame(0xA2, &body)).await;
        self.wait_for(
            "UNSUBACK",
            |p| matches!(p, Packet::UnsubAck(a) if a.pkid == pkid),
        )
        .await;
    }

    /// Sends one PUBLISH; returns the packet id used (0 for QoS 0). Does not wait.
    pub async fn send_publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
    ) -> u16 {
        let pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            self.pkid()
        };
        self.send(&publish_bytes(
            topic.as_bytes(),
            payload,
            qos as u8,
            pkid,
            retain,
            false,
        ))
        .await;
        pkid
    }

    /// Publishes and completes the QoS flow as a publisher: PUBACK for QoS 1,
    /// PUBREC/PUBREL/PUBCOMP for QoS 2.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) {
        let pkid = self.send_publish(topic, payload, qos, retain).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.wait_for(
                    "PUBACK",
                    |p| matches!(p, Packet::PubAck(a) if a.pkid == pkid),
                )
                .await;
            }
            QoS::ExactlyOnce => {
                self.wait_for(
                    "PUBREC",
                    |p| matches!(p, Packet::PubRec(a) if a.pkid == pkid),
                )
                .await;
                self.pubrel(pkid).await;
                self.wait_for(
                    "PUBCOMP",
                    |p| matches!(p, Packet::PubComp(a) if a.pkid == pkid),
                )
                .await;
            }
        }
    }

    pub async fn puback(&mut self, pkid: u16) {
        self.send(&id_packet(0x40, pkid)).await;
    }

    pub async fn pubrec(&mut self, pkid: u16) {
        self.send(&id_packet(0x50, pkid)).await;
    }

    pub async fn pubrel(&mut self, pkid: u16) {
        self.send(&id_packet(0x62, pkid)).await;
    }

    pub async fn pubcomp(&mut self, pkid: u16) {
        self.send(&id_packet(0x70, pkid)).await;
    }

    /// PINGREQ, and the PINGRESP that must answer it.
    pub async fn ping(&mut self) {
        self.send(&[0xC0, 0]).await;
        self.wait_for("PINGRESP", |p| matches!(p, Packet::PingResp))
            .await;
    }

    pub async fn disconnect(mut self) {
        self.send(&[0xE0, 0]).await;
        // The broker closes after DISCONNECT; seeing EOF makes the test wait for it.
        self.expect_closed(WAIT).await;
    }

    /// Has `publisher` send a QoS 0 marker on `topic` (which this client must be subscribed
    /// to), and returns every PUBLISH that arrives before it.
    pub async fn until_marker(&mut self, publisher: &mut Raw, topic: &str) -> Vec<Publish> {
        publisher
            .publish(topic, MARKER, QoS::AtMostOnce, false)
            .await;
        let mut got = Vec::new();
        loop {
            let p = self.expect_publish().await;
            if p.topic == topic && &p.payload[..] == MARKER {
                return got;
            }
            got.push(p);
        }
    }

    /// Asserts that nothing was routed to this client before a marker on `topic`.
    pub async fn expect_nothing_before_marker(&mut self, publisher: &mut Raw, topic: &str) {
        let got = self.until_marker(publisher, topic).await;
        assert!(got.is_empty(), "expected nothing, got {got:?}");
    }
}

fn id_packet(byte1: u8, pkid: u16) -> Vec<u8> {
    frame(byte1, &pkid.to_be_bytes())
}

/// The payload of a PUBLISH as text, for readable assertions.
pub fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}
