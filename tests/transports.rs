//! The client transports end to end (README, "Security"): MQTT over TLS (rumqttc, and the raw
//! client over tokio-rustls, TLS 1.2 and 1.3), mutual TLS and certificate identities, a
//! TLS-only node, MQTT over WebSocket and WebSocket over TLS (tokio-tungstenite as the
//! client), the connect timeout against stalled handshakes, and SIGHUP reloading the
//! certificate, the password file and the ACL under live connections (the real binary).
//!
//! Certificates come from `common::pki` (made per test process, never committed). Each test
//! sets the listeners it needs itself, whatever `HERALD_TEST_TRANSPORT` says.

mod common;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::{cert_der, Files, Pki};
use common::process::{free_port, Herald};
use common::{text, Event, Io, Opts, Packet, QoS, Raw, SubscribeReasonCode, WAIT};
use futures::{SinkExt, StreamExt};
use herald::config::TlsIdentity;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, pki_types::ServerName, ClientConfig};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Logins checked against real argon2 hashes (the SIGHUP test) wait this long: a debug build
/// takes about a second per hash.
const LOGIN_WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Helpers

fn loopback() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

/// A broker whose only listener is TLS (with the test server certificate), after `tweak`.
async fn start_tls(tweak: impl FnOnce(&mut herald::Config)) -> common::TestServer {
    let files = Pki::get().server();
    common::start_with(|c| {
        c.server.listen = None;
        c.server.tls_listen = loopback();
        c.server.ws_listen = None;
        c.server.wss_listen = None;
        c.tls.cert = Some(files.cert);
        c.tls.key = Some(files.key);
        tweak(c);
    })
    .await
}

/// A TLS connection to `addr`, verifying the server as 127.0.0.1.
async fn tls_stream(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

/// The leaf certificate the server presented.
fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .to_vec()
}

/// MQTT CONNECT over `stream`; the client and the CONNACK code.
async fn mqtt(stream: Box<dyn Io>, id: &str, login: Option<(&str, &[u8])>) -> (Raw, u8) {
    let mut c = Raw::over(stream);
    c.send_raw(&Opts::new(id).encode_with(login.map(|l| l.0), login.map(|l| l.1)))
        .await
        .expect("send CONNECT");
    match c.next(LOGIN_WAIT).await {
        Event::Packet(Packet::ConnAck(a)) => (c, a.code as u8),
        e => panic!("{id}: expected CONNACK, got {e:?}"),
    }
}

/// `mqtt` that must be accepted.
async fn mqtt_ok(stream: Box<dyn Io>, id: &str) -> Raw {
    let (c, code) = mqtt(stream, id, None).await;
    assert_eq!(code, 0, "CONNACK for {id}");
    c
}

/// Publishes QoS 1 to the client's own push topic and receives it back.
async fn push_to_self(c: &mut Raw, id: &str, payload: &[u8]) {
    let topic = format!("push/{id}");
    c.publish(&topic, payload, QoS::AtLeastOnce, false).await;
    let p = c.expect_publish().await;
    assert_eq!(p.topic, topic);
    assert_eq!(&p.payload[..], payload);
    assert_eq!(p.qos, QoS::AtLeastOnce);
    c.puback(p.pkid).await;
}

/// The TLS handshake is refused: it fails, or (TLS 1.3, where the client finishes first)
/// the server's alert ends the connection before any CONNACK.
async fn assert_tls_refused(addr: SocketAddr, config: Arc<ClientConfig>, what: &str) {
    let s = match tls_stream(addr, config).await {
        Err(_) => return,
        Ok(s) => s,
    };
    let mut c = Raw::over(Box::new(s));
    let _ = c.send_raw(&Opts::new("refused").encode()).await;
    match c.next(WAIT).await {
        Event::Closed => {}
        e => panic!("{what}: expected the connection to end, got {e:?}"),
    }
}

/// MQTT bytes over a tungstenite client: each write is one binary message, reads take the
/// binary messages' payloads in order.
struct WsIo<S> {
    ws: WebSocketStream<S>,
    buf: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A message the socket did not take at once goes out now.
        let _ = this.ws.poll_flush_unpin(cx);
        loop {
            if !this.buf.is_empty() {
                let n = this.buf.len().min(out.remaining());
                out.put_slice(&this.buf.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(this.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(b))) => this.buf = b,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(t))) => {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "text message from the broker: {t}"
                    ))))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.ws.poll_ready_unpin(cx)).map_err(io::Error::other)?;
        this.ws
            .start_send_unpin(Message::binary(buf.to_vec()))
            .map_err(io::Error::other)?;
        let _ = this.ws.poll_flush_unpin(cx);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.ws.poll_flush_unpin(cx).map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.ws.poll_close_unpin(cx).map_err(io::Error::other)
    }
}

/// The WebSocket upgrade on `url` over `stream`, offering subprotocol `mqtt`, which the
/// broker must choose.
async fn ws_upgrade<S>(stream: S, url: &str) -> WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (ws, resp) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("websocket upgrade");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap()),
        Some("mqtt")
    );
    WsIo {
        ws,
        buf: Bytes::new(),
    }
}

/// MQTT over an upgraded WebSocket: CONNECT split over three frames, SUBSCRIBE and PINGREQ
/// in one frame, a PUBLISH to the client's own push topic split over two, delivered back.
async fn mqtt_over_ws<S>(ws: WsIo<S>, id: &str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut c = Raw::over(Box::new(ws));
    let connect = Opts::new(id).encode();
    c.send_raw(&connect[..3]).await.unwrap();
    c.send_raw(&connect[3..9]).await.unwrap();
    c.send_raw(&connect[9..]).await.unwrap();
    match c.expect(WAIT).await {
        Packet::ConnAck(a) => assert_eq!(a.code as u8, 0, "CONNACK over WebSocket"),
        p => panic!("expected CONNACK, got {p:?}"),
    }
    let both = [
        common::subscribe_bytes(0x82, 1, &[("ws/t", QoS::AtLeastOnce)]),
        vec![0xC0, 0],
    ]
    .concat();
    c.send_raw(&both).await.unwrap();
    match c.expect(WAIT).await {
        Packet::SubAck(a) => assert_eq!(
            a.return_codes,
            [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        ),
        p => panic!("expected SUBACK, got {p:?}"),
    }
    assert!(matches!(c.expect(WAIT).await, Packet::PingResp));
    let topic = format!("push/{id}");
    let publish = common::publish_bytes(topic.as_bytes(), b"over websocket", 1, 7, false, false);
    c.send_raw(&publish[..4]).await.unwrap();
    c.send_raw(&publish[4..]).await.unwrap();
    let (mut acked, mut got) = (false, None);
    while !acked || got.is_none() {
        match c.expect(WAIT).await {
            Packet::PubAck(a) if a.pkid == 7 => acked = true,
            Packet::Publish(p) => got = Some(p),
            p => panic!("unexpected {p:?}"),
        }
    }
    let p = got.unwrap();
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        (topic.as_str(), "over websocket")
    );
    c.puback(p.pkid).await;
    // An ordinary topic too.
    c.publish("ws/t", b"plain", QoS::AtLeastOnce, false).await;
    assert_eq!(text(&c.expect_publish().await), "plain");
    c.disconnect().await;
}

// ---------------------------------------------------------------------------------------
// TLS

#[tokio::test]
async fn rumqttc_over_tls_publishes_and_receives_qos1() {
    use rumqttc::{Event as E, Incoming, QoS as Q};
    let server = start_tls(|_| {}).await;
    let addr = server.listeners().tls.expect("TLS listener");
    let mut opts = rumqttc::MqttOptions::new("rumqttc-tls", "127.0.0.1", addr.port());
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Pki::get().client_config(None)),
    ));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    let run = async {
        let mut subscribed = false;
        let mut puback = false;
        let mut received = None;
        loop {
            match events.poll().await.expect("rumqttc event loop") {
                E::Incoming(Incoming::ConnAck(a)) => {
                    assert_eq!(a.code, rumqttc::ConnectReturnCode::Success);
                    client.subscribe("tls/t", Q::AtLeastOnce).await.unwrap();
                }
                E::Incoming(Incoming::SubAck(a)) => {
                    assert_eq!(
                        a.return_codes,
                        [rumqttc::SubscribeReasonCode::Success(Q::AtLeastOnce)]
                    );
                    subscribed = true;
                    client
                        .publish("tls/t", Q::AtLeastOnce, false, "hello over tls")
                        .await
                        .unwrap();
                }
                E::Incoming(Incoming::PubAck(_)) => puback = true,
                E::Incoming(Incoming::Publish(p)) => {
                    assert_eq!(p.qos, Q::AtLeastOnce);
                    received = Some((p.topic.clone(), p.payload.clone()));
                }
                _ => {}
            }
            if let (true, true, Some(r)) = (subscribed, puback, &received) {
                return r.clone();
            }
        }
    };
    let (topic, payload) = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("rumqttc over TLS: no QoS 1 round trip in 10 s");
    assert_eq!(topic, "tls/t");
    assert_eq!(&payload[..], b"hello over tls");
}

/// The raw client over tokio-rustls, with a TLS 1.2-only and a TLS 1.3-only client.
#[tokio::test]
async fn tls_1_2_and_1_3_clients() {
    let server = start_tls(|_| {}).await;
    let addr = server.listeners().tls.expect("TLS listener");
    let served = cert_der(&Pki::get().server().cert);
    for (id, version) in [
        ("tls12", &rustls::version::TLS12),
        ("tls13", &rustls::version::TLS13),
    ] {
        let config = Pki::get().client_config_versions(None, &[version]);
        let s = tls_stream(addr, config).await.expect("TLS handshake");
        assert_eq!(s.get_ref().1.protocol_version(), Some(version.version));
        assert_eq!(peer_cert(&s), served);
        let mut c = mqtt_ok(Box::new(s), id).await;
        push_to_self(&mut c, id, id.as_bytes()).await;
        c.ping().await;
        c.disconnect().await;
    }
}

#[tokio::test]
async fn mutual_tls_requires_a_certificate_from_the_client_ca() {
    let pki = Pki::get();
    let server = start_tls(|c| c.tls.client_ca = Some(pki.ca_path())).await;
    let addr = server.listeners().tls.expect("TLS listener");

    let good = pki.client("mtls-good", false);
    let s = tls_stream(addr, pki.client_config(Some(&good)))
        .await
        .expect("handshake with a good client certificate");
    // Without tls.identity = "cert" the certificate is not an identity: any client id.
    let mut c = mqtt_ok(Box::new(s), "any-client-id").await;
    push_to_self(&mut c, "any-client-id", b"mtls").await;

    assert_tls_refused(addr, pki.client_config(None), "no client certificate").await;
    let other = pki.client("mtls-other", true);
    assert_tls_refused(
        addr,
        pki.client_config(Some(&other)),
        "a certificate from another CA",
    )
    .await;
    // Both versions refuse.
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        assert_tls_refused(addr, pki.client_config_versions(None, &[v]), "no cert").await;
    }
    // The good client is still served.
    c.ping().await;
}

#[tokio::test]
async fn certificate_identity_must_be_the_client_id() {
    let pki = Pki::get();
    let server = start_tls(|c| {
        c.tls.client_ca = Some(pki.ca_path());
        c.tls.identity = TlsIdentity::Cert;
        c.server.wss_listen = loopback();
    })
    .await;
    let addr = server.listeners().tls.expect("TLS listener");
    let cert = pki.client("dev-cn", false);
    let config = pki.client_config(Some(&cert));

    let s = tls_stream(addr, config.clone()).await.unwrap();
    let (mut c, code) = mqtt(Box::new(s), "dev-other", None).await;
    assert_eq!(code, 5, "certificate CN dev-cn, client id dev-other");
    c.expect_closed(WAIT).await;
    // Credentials do not replace the certificate's identity.
    let s = tls_stream(addr, config.clone()).await.unwrap();
    let (mut c, code) = mqtt(Box::new(s), "dev-other", Some(("dev-other", b"pw"))).await;
    assert_eq!(code, 5);
    c.expect_closed(WAIT).await;

    let s = tls_stream(addr, config.clone()).await.unwrap();
    let (mut c, code) = mqtt(Box::new(s), "dev-cn", None).await;
    assert_eq!(code, 0, "certificate CN dev-cn, client id dev-cn");
    // A device: subscribed to its own push topic, may not subscribe elsewhere.
    assert_eq!(
        c.subscribe(&[("push/dev-cn", QoS::AtLeastOnce), ("#", QoS::AtLeastOnce)])
            .await,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure
        ]
    );
    c.ping().await;

    // The same over WebSocket over TLS.
    let wss = server.listeners().wss.expect("wss listener");
    assert_tls_refused(wss, pki.client_config(None), "wss without a certificate").await;
    for (id, want) in [("dev-other", 5), ("dev-cn", 0)] {
        let s = tls_stream(wss, config.clone()).await.unwrap();
        let ws = ws_upgrade(s, &format!("wss://{wss}/mqtt")).await;
        let (mut c, code) = mqtt(Box::new(ws), id, None).await;
        assert_eq!(
            code, want,
            "over wss: certificate CN dev-cn, client id {id}"
        );
        if want == 0 {
            c.ping().await;
        } else {
            c.expect_closed(WAIT).await;
        }
    }
}

/// `server.listen = None` with a TLS listener: plain MQTT gets nowhere on the TLS port.
#[tokio::test]
async fn tls_only_node() {
    let server = start_tls(|c| c.server.connect_timeout = Duration::from_secs(1)).await;
    let l = server.listeners();
    assert!(l.tcp.is_none(), "a plain TCP listener is on: {l:?}");
    let addr = l.tls.expect("TLS listener");
    assert_eq!(server.local_addr(), addr);

    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(&Opts::new("plain").encode()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the TLS port kept a plain client open");
    assert!(
        !got.starts_with(&[0x20, 0x02]),
        "a CONNACK on the TLS port: {got:?}"
    );
    // Whatever came back is TLS (an alert record), if anything.
    assert!(got.is_empty() || got[0] == 0x15, "{got:?}");

    let s = tls_stream(addr, Pki::get().client_config(None))
        .await
        .unwrap();
    let mut c = mqtt_ok(Box::new(s), "tls-only").await;
    push_to_self(&mut c, "tls-only", b"tls only").await;
}

// ---------------------------------------------------------------------------------------
// WebSocket

#[tokio::test]
async fn mqtt_over_websocket() {
    let server = common::start_with(|c| {
        c.server.listen = None;
        c.server.tls_listen = None;
        c.server.ws_listen = loopback();
    })
    .await;
    let addr = server.listeners().ws.expect("ws listener");
    // Only /mqtt upgrades.
    let tcp = TcpStream::connect(addr).await.unwrap();
    match tokio_tungstenite::client_async(format!("ws://{addr}/other"), tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 404),
        r => panic!("upgrade on /other: {:?}", r.map(|(_, r)| r)),
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let ws = ws_upgrade(tcp, &format!("ws://{addr}/mqtt")).await;
    mqtt_over_ws(ws, "ws-client").await;
}

#[tokio::test]
async fn mqtt_over_websocket_over_tls() {
    let files = Pki::get().server();
    let server = common::start_with(|c| {
        c.server.listen = None;
        c.server.tls_listen = None;
        c.server.wss_listen = loopback();
        c.tls.cert = Some(files.cert);
        c.tls.key = Some(files.key);
    })
    .await;
    let addr = server.listeners().wss.expect("wss listener");
    let tls = tls_stream(addr, Pki::get().client_config(None))
        .await
        .expect("TLS handshake on the wss port");
    let ws = ws_upgrade(tls, &format!("wss://{addr}/mqtt")).await;
    mqtt_over_ws(ws, "wss-client").await;
}

// ---------------------------------------------------------------------------------------
// The connect timeout against stalled handshakes

/// Sends `bytes` on a connection the test will leave stalled.
async fn stall<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap();
    s.flush().await.unwrap();
}

/// Waits for the broker to close `s`; returns how long that took since `start`.
async fn closed_after<S: AsyncRead + Unpin>(mut s: S, start: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await {
            Err(_) => panic!("still open after 15 s"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            // An alert or an HTTP error may come first; the close is what counts.
            Ok(Ok(_)) => {}
        }
    }
}

/// A TCP connection to `addr`, and when it was made.
async fn tcp(addr: SocketAddr) -> (TcpStream, Instant) {
    let s = TcpStream::connect(addr).await.unwrap();
    (s, Instant::now())
}

/// A TLS connection to `addr`, and when its TCP connection was made.
async fn tls_timed(addr: SocketAddr) -> (TlsStream<TcpStream>, Instant) {
    let start = Instant::now();
    let s = tls_stream(addr, Pki::get().client_config(None))
        .await
        .expect("TLS handshake");
    (s, start)
}

#[tokio::test]
async fn connect_timeout_cuts_off_stalled_handshakes() {
    let files = Pki::get().server();
    let server = common::start_with(|c| {
        c.server.listen = None;
        c.server.tls_listen = loopback();
        c.server.ws_listen = loopback();
        c.server.wss_listen = loopback();
        c.tls.cert = Some(files.cert);
        c.tls.key = Some(files.key);
        c.server.connect_timeout = Duration::from_secs(1);
    })
    .await;
    let l = server.listeners();
    let (tls, ws, wss) = (l.tls.unwrap(), l.ws.unwrap(), l.wss.unwrap());
    // A TLS record announcing a 512-byte ClientHello, cut after its first bytes.
    let mut half_hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    half_hello.extend_from_slice(&[0x42; 20]);
    let half_upgrade =
        b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";

    let (silent, t_silent) = tcp(tls).await;
    let (mut half, t_half) = tcp(tls).await;
    stall(&mut half, &half_hello).await;
    let (mut slowloris, t_slowloris) = tcp(ws).await;
    stall(&mut slowloris, half_upgrade).await;
    let (mut slowloris_tls, t_slowloris_tls) = tls_timed(wss).await;
    stall(&mut slowloris_tls, half_upgrade).await;
    let (no_connect, t_no_connect) = tls_timed(tls).await;

    // While those stall, another client is served at once, handshake included.
    let start = Instant::now();
    let s = tls_stream(tls, Pki::get().client_config(None))
        .await
        .unwrap();
    let mut c = mqtt_ok(Box::new(s), "healthy").await;
    c.ping().await;
    let healthy = start.elapsed();

    let (silent, half, slowloris, slowloris_tls, no_connect) = tokio::join!(
        closed_after(silent, t_silent),
        closed_after(half, t_half),
        closed_after(slowloris, t_slowloris),
        closed_after(slowloris_tls, t_slowloris_tls),
        closed_after(no_connect, t_no_connect),
    );
    for (what, took) in [
        ("a TLS client that never says hello", silent),
        ("half a ClientHello", half),
        ("half an HTTP upgrade", slowloris),
        ("half an HTTP upgrade over TLS", slowloris_tls),
        ("a TLS client that never sends CONNECT", no_connect),
    ] {
        assert!(
            took >= Duration::from_millis(900) && took <= Duration::from_secs(5),
            "{what}: closed after {took:?}, connect_timeout is 1 s"
        );
    }
    assert!(
        healthy < Duration::from_millis(900),
        "healthy client took {healthy:?}"
    );
    c.ping().await;
}

// ---------------------------------------------------------------------------------------
// SIGHUP

/// How many SIGHUPs the node has finished handling (the auth files come last).
fn reloads(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("password file and ACL reloaded")
                || l.contains("authentication files not reloaded")
        })
        .count()
}

/// Sends SIGHUP to `node` and waits until it has handled it.
async fn hup(node: &Herald, log: &Path) {
    let before = reloads(log);
    let pid = node.pid().expect("herald running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    common::wait_until(
        Duration::from_secs(10),
        "the node handled SIGHUP",
        async || reloads(log) > before,
    )
    .await;
}

fn copy_files(from: &Files, to: &Files) {
    std::fs::copy(&from.key, &to.key).unwrap();
    std::fs::copy(&from.cert, &to.cert).unwrap();
}

#[tokio::test]
async fn sighup_reloads_certificate_passwords_and_acl_under_live_connections() {
    let pki = Pki::get();
    let dir = tempfile::tempdir().unwrap();
    let a = pki.issue("hup-a", &["127.0.0.1", "a.hup.test"], None, false);
    let b = pki.issue("hup-b", &["127.0.0.1", "b.hup.test"], None, false);
    let (a_der, b_der) = (cert_der(&a.cert), cert_der(&b.cert));
    assert_ne!(a_der, b_der);
    let live = Files {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    copy_files(&a, &live);
    let passwd = dir.path().join("passwd");
    herald::auth::password::update_file(&passwd, "backend", Some("backend-pw")).unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "user backend\ntopic readwrite news/#\n").unwrap();

    let plain = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let tls = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.path().join("herald.log");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let args = vec![
        "--listen".into(),
        plain.to_string(),
        "--tls-listen".into(),
        tls.to_string(),
        "--tls-cert".into(),
        path(&live.cert),
        "--tls-key".into(),
        path(&live.key),
        "--password-file".into(),
        path(&passwd),
        "--acl-file".into(),
        path(&acl),
        "--store".into(),
        "memory".into(),
        "--log-level".into(),
        "info".into(),
    ];
    let node = Herald::start_args(plain, args, &log);
    let config = pki.client_config(None);
    let backend = Some(("backend", &b"backend-pw"[..]));

    // A connection made with certificate A, kept open throughout.
    let s = tls_stream(tls, config.clone())
        .await
        .expect("TLS handshake");
    assert_eq!(peer_cert(&s), a_der);
    let (mut old, code) = mqtt(Box::new(s), "backend-old", backend).await;
    assert_eq!(code, 0);
    assert_eq!(
        old.subscribe(&[("news/secret", QoS::AtLeastOnce)]).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    // Certificate B.
    copy_files(&b, &live);
    hup(&node, &log).await;
    common::wait_until(
        Duration::from_secs(10),
        "the node serves certificate B after SIGHUP",
        async || {
            let s = tls_stream(tls, config.clone())
                .await
                .expect("TLS handshake");
            peer_cert(&s) == b_der
        },
    )
    .await;
    old.ping().await;

    // A broken certificate file: B stays.
    std::fs::write(&live.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    hup(&node, &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("TLS certificate not reloaded"), "{text}");
    let s = tls_stream(tls, config.clone())
        .await
        .expect("TLS handshake");
    assert_eq!(
        peer_cert(&s),
        b_der,
        "the broken file replaced certificate B"
    );
    let (mut c, code) = mqtt(Box::new(s), "backend-after", backend).await;
    assert_eq!(code, 0);
    c.ping().await;
    old.ping().await;

    // Certificate A with key B (they do not match): B stays.
    let refusals = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("TLS certificate not reloaded")
            .count()
    };
    let before = refusals(&log);
    std::fs::copy(&a.cert, &live.cert).unwrap();
    hup(&node, &log).await;
    assert_eq!(refusals(&log), before + 1, "a mismatched key was taken");
    let s = tls_stream(tls, config.clone())
        .await
        .expect("TLS handshake");
    assert_eq!(
        peer_cert(&s),
        b_der,
        "certificate A without its key replaced B"
    );

    // A new user in the password file.
    let ops = Some(("ops", &b"ops-pw"[..]));
    let s = tls_stream(tls, config.clone()).await.unwrap();
    assert_eq!(
        mqtt(Box::new(s), "ops", ops).await.1,
        4,
        "ops before the reload"
    );
    herald::auth::password::update_file(&passwd, "ops", Some("ops-pw")).unwrap();
    hup(&node, &log).await;
    let s = tls_stream(tls, config.clone()).await.unwrap();
    let (mut ops_c, code) = mqtt(Box::new(s), "ops", ops).await;
    assert_eq!(code, 0, "ops after the reload");
    ops_c.ping().await;

    // A topic denied in the ACL: new subscriptions are refused, on the old connection too.
    std::fs::write(
        &acl,
        "user backend\ntopic readwrite news/#\ntopic deny news/secret\n",
    )
    .unwrap();
    hup(&node, &log).await;
    let want = [
        SubscribeReasonCode::Failure,
        SubscribeReasonCode::Success(QoS::AtLeastOnce),
    ];
    let filters = [
        ("news/secret", QoS::AtLeastOnce),
        ("news/other", QoS::AtLeastOnce),
    ];
    assert_eq!(old.subscribe(&filters).await, want);
    let s = tls_stream(tls, config.clone()).await.unwrap();
    let (mut new, code) = mqtt(Box::new(s), "backend-new", backend).await;
    assert_eq!(code, 0);
    assert_eq!(new.subscribe(&filters).await, want);
    old.ping().await;
}
