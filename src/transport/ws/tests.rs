use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::Response;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{self, http, Message};
use tokio_tungstenite::WebSocketStream;

use super::super::test_pki;
use super::frame::frame_header;
use super::stream::MAX_OUT_FRAME;
use super::*;

/// CONNECT, client id "dev42", keepalive 60, clean session.
const CONNECT: &[u8] = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05dev42";
const PINGREQ: &[u8] = b"\xc0\x00";
/// SUBSCRIBE push/dev42 QoS 1, packet id 1.
const SUBSCRIBE: &[u8] = b"\x82\x10\x00\x01\x00\x0bpush/dev42\x01";

type Client = WebSocketStream<TcpStream>;

/// A server-side `accept` and a tungstenite client offering `protocols` on `path`.
async fn upgrade(
    path: &str,
    protocols: Option<&str>,
    max_packet: usize,
) -> (
    io::Result<WsStream<TcpStream>>,
    Result<(Client, Response), tungstenite::Error>,
) {
    let (s, c) = test_pki::tcp_pair().await;
    let mut req = format!("ws://127.0.0.1{path}")
        .into_client_request()
        .unwrap();
    if let Some(p) = protocols {
        req.headers_mut()
            .insert(http::header::SEC_WEBSOCKET_PROTOCOL, p.parse().unwrap());
    }
    let (s, c) = tokio::join!(
        accept(s, max_packet),
        tokio_tungstenite::client_async(req, c)
    );
    (s, c.map(|(c, r)| (c, r.map(|_| ()))))
}

async fn connected(protocols: Option<&str>) -> (WsStream<TcpStream>, Client, Response) {
    let (s, c) = upgrade("/mqtt", protocols, 1024).await;
    let (c, r) = c.unwrap();
    (s.unwrap(), c, r)
}

fn protocol(r: &Response) -> Option<&str> {
    r.headers()
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn mqtt_packets_across_and_within_frames() {
    let (mut s, mut c, r) = connected(Some("mqtt")).await;
    assert_eq!(protocol(&r), Some("mqtt"));
    // CONNECT split across two frames, then two packets in one frame.
    c.send(Message::binary(&CONNECT[..5])).await.unwrap();
    c.send(Message::binary(&CONNECT[5..])).await.unwrap();
    c.send(Message::binary([SUBSCRIBE, PINGREQ].concat()))
        .await
        .unwrap();
    let want = [CONNECT, SUBSCRIBE, PINGREQ].concat();
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, want);

    // Each write is one binary message.
    s.write_all(b"\x20\x02\x00\x00").await.unwrap();
    s.write_all(b"\x90\x03\x00\x01\x01").await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(
        c.next().await.unwrap().unwrap(),
        Message::binary(&b"\x20\x02\x00\x00"[..])
    );
    assert_eq!(
        c.next().await.unwrap().unwrap(),
        Message::binary(&b"\x90\x03\x00\x01\x01"[..])
    );

    // A write longer than one frame takes: sent as frames of 16 KiB, the rest is the
    // caller's next write.
    let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
    s.write_all(&big).await.unwrap();
    s.flush().await.unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        match c.next().await.unwrap().unwrap() {
            Message::Binary(b) => {
                assert!(b.len() <= MAX_OUT_FRAME);
                got.extend_from_slice(&b);
            }
            m => panic!("{m:?}"),
        }
    }
    assert_eq!(got, big);
}

#[tokio::test]
async fn subprotocols() {
    let (_, _, r) = connected(Some("mqttv3.1")).await;
    assert_eq!(protocol(&r), Some("mqttv3.1"));
    let (_, _, r) = connected(Some("chat, mqttv3.1, mqtt")).await;
    assert_eq!(protocol(&r), Some("mqtt"));
    // None offered, or none we know: accepted without the header.
    let (_, _, r) = connected(None).await;
    assert_eq!(protocol(&r), None);
    let (s, c) = upgrade("/mqtt", Some("chat"), 1024).await;
    assert!(s.is_ok());
    // tungstenite's client insists on an answer to its offer; a browser would too.
    assert!(c.is_err());
}

#[tokio::test]
async fn other_paths_are_refused() {
    let (s, c) = upgrade("/", Some("mqtt"), 1024).await;
    let e = s.err().expect("upgraded on /");
    assert!(e.to_string().contains("path / not found"), "{e}");
    match c {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 404),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let (s, _) = upgrade("/mqtt/x", Some("mqtt"), 1024).await;
    assert!(s.is_err());
}

#[tokio::test]
async fn ping_is_answered_close_is_eof() {
    let (mut s, mut c, _) = connected(Some("mqtt")).await;
    let server = tokio::spawn(async move {
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.map(|_| all)
    });
    c.send(Message::Ping(b"hi"[..].into())).await.unwrap();
    assert_eq!(
        c.next().await.unwrap().unwrap(),
        Message::Pong(b"hi"[..].into())
    );
    c.send(Message::binary(PINGREQ)).await.unwrap();
    c.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    assert_eq!(server.await.unwrap().unwrap(), PINGREQ);
    // The close is echoed with the same code.
    match c.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
        m => panic!("{m:?}"),
    }
}

async fn refused(max_packet: usize, msg: Message, code: CloseCode, why: &str) {
    let (s, c) = upgrade("/mqtt", Some("mqtt"), max_packet).await;
    let (mut s, mut c) = (s.unwrap(), c.unwrap().0);
    c.send(msg).await.unwrap();
    let mut buf = [0u8; 256];
    let e = s.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains(why), "{e}");
    match c.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(f.code, code),
        m => panic!("{m:?}"),
    }
    // Reads after the error: EOF, writes: refused.
    assert_eq!(s.read(&mut buf).await.unwrap(), 0);
    assert!(s.write_all(b"x").await.is_err());
}

#[tokio::test]
async fn text_frames_and_oversized_messages_are_refused() {
    refused(
        1024,
        Message::text("CONNECT"),
        CloseCode::Unsupported,
        "text frame",
    )
    .await;
    refused(
        100,
        Message::binary(vec![0u8; 117]),
        CloseCode::Size,
        "over the limit of 116",
    )
    .await;
    // At the limit, and the limit counts a whole fragmented message.
    let (s, c) = upgrade("/mqtt", Some("mqtt"), 100).await;
    let (mut s, mut c) = (s.unwrap(), c.unwrap().0);
    c.send(Message::binary(vec![7u8; 116])).await.unwrap();
    let mut got = [0u8; 116];
    s.read_exact(&mut got).await.unwrap();
    let (server, mut client) = tokio::io::duplex(4096);
    let mut s = WsStream::new(server, 100);
    client
        .write_all(&client_frame(0x02, &[1u8; 100]))
        .await
        .unwrap();
    client
        .write_all(&client_frame(0x80, &[2u8; 17]))
        .await
        .unwrap();
    let mut got = vec![0u8; 100];
    s.read_exact(&mut got).await.unwrap();
    let e = s.read(&mut got).await.unwrap_err();
    assert!(e.to_string().contains("117 bytes"), "{e}");
}

#[tokio::test]
async fn shutdown_sends_a_close_frame() {
    let (mut s, mut c, _) = connected(Some("mqtt")).await;
    s.write_all(b"\xd0\x00").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(
        c.next().await.unwrap().unwrap(),
        Message::binary(&b"\xd0\x00"[..])
    );
    match c.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        m => panic!("{m:?}"),
    }
}

/// A masked client frame, by hand.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let (mut h, n) = frame_header(first, payload.len());
    h[1] |= 0x80;
    let mut f = h[..n].to_vec();
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Parses the server's (unmasked) frames: (first byte, payload) each.
fn server_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !b.is_empty() {
        assert_eq!(b[1] & 0x80, 0, "server frames are not masked");
        let (len, at) = match b[1] {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        frames.push((b[0], b[at..at + len].to_vec()));
        b = &b[at + len..];
    }
    frames
}

/// Fed one byte at a time, with a fragmented message, a ping between its fragments,
/// 16-bit and 64-bit lengths and an empty frame: the data comes out whole and in order.
#[tokio::test]
async fn frames_fed_byte_by_byte() {
    let (server, mut client): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
    let mut s = WsStream::new(server, 200_000);
    let mid: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let big: Vec<u8> = (0..70_000u32).map(|i| (i * 13) as u8).collect();
    let mut wire = client_frame(0x02, b"ab"); // binary, not final
    wire.extend(client_frame(0x89, b"p1")); // ping inside the message
    wire.extend(client_frame(0x00, &mid)); // continuation, not final
    wire.extend(client_frame(0x80, b"")); // final, empty
    wire.extend(client_frame(0x82, &big));
    wire.extend(client_frame(0x88, &1000u16.to_be_bytes()));
    let want = [&b"ab"[..], &mid, &big].concat();
    let feed = tokio::spawn(async move {
        for b in wire {
            client.write_all(&[b]).await.unwrap();
        }
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, want);
    s.shutdown().await.unwrap();
    drop(s);
    let back = server_frames(&feed.await.unwrap());
    assert_eq!(
        back,
        vec![
            (0x8a, b"p1".to_vec()),
            (0x88, 1000u16.to_be_bytes().to_vec())
        ]
    );
}

/// A stream without vectored writes (the other write path).
struct NoVectored(DuplexStream);

impl AsyncRead for NoVectored {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for NoVectored {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A socket that takes a few bytes at a time: every frame still goes out whole, in
/// order, and a pong never lands inside a data frame; with and without vectored writes.
#[tokio::test]
async fn short_writes_keep_frames_whole() {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut s: WsStream<S>, client: DuplexStream) {
        let mut client = client;
        let reader = tokio::spawn(async move {
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let a: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        s.write_all(&a).await.unwrap();
        s.pong = Some(b"pp".to_vec());
        s.write_all(b"xyz").await.unwrap();
        s.shutdown().await.unwrap();
        drop(s);
        let frames = server_frames(&reader.await.unwrap());
        assert_eq!(
            frames,
            vec![
                (0x82, a),
                (0x8a, b"pp".to_vec()),
                (0x82, b"xyz".to_vec()),
                (0x88, 1000u16.to_be_bytes().to_vec())
            ]
        );
    }
    let (server, client) = tokio::io::duplex(7);
    assert!(server.is_write_vectored());
    run(WsStream::new(server, 1024), client).await;
    let (server, client) = tokio::io::duplex(7);
    let s = WsStream::new(NoVectored(server), 1024);
    assert!(!s.get_ref().is_write_vectored());
    run(s, client).await;
}

#[tokio::test]
async fn protocol_errors() {
    for (wire, why) in [
        (
            client_frame(0x80, b"x"),
            "continuation frame outside a message",
        ),
        (
            [client_frame(0x02, b"x"), client_frame(0x82, b"y")].concat(),
            "new message inside",
        ),
        (client_frame(0x09, b"x"), "fragmented or long control frame"),
        (
            client_frame(0x89, &[0u8; 126]),
            "fragmented or long control frame",
        ),
        (client_frame(0xc2, b"x"), "reserved bits"),
        (client_frame(0x83, b"x"), "reserved opcode"),
        (b"\x82\x01x".to_vec(), "unmasked frame"),
    ] {
        let (server, mut client) = tokio::io::duplex(4096);
        let mut s = WsStream::new(server, 1024);
        client.write_all(&wire).await.unwrap();
        let mut buf = [0u8; 64];
        let e = loop {
            match s.read(&mut buf).await {
                Ok(n) => assert!(n > 0, "EOF instead of {why}"),
                Err(e) => break e,
            }
        };
        assert!(e.to_string().contains(why), "{e} is not {why}");
        drop(s);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        let frames = server_frames(&back);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, 0x88);
        assert_eq!(&frames[0].1[..2], &1002u16.to_be_bytes());
    }
}

/// The connection ends inside a frame: an error, not a clean EOF.
#[tokio::test]
async fn eof_inside_a_frame() {
    let (server, mut client) = tokio::io::duplex(4096);
    let mut s = WsStream::new(server, 1024);
    let f = client_frame(0x82, b"hello");
    client.write_all(&f[..f.len() - 2]).await.unwrap();
    drop(client);
    let mut got = Vec::new();
    let e = s.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(got, b"hel");
}

/// WebSocket over TLS: the TLS handshake, then the upgrade on the TLS stream.
#[tokio::test]
async fn over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_pki::ca(dir.path(), "ca");
    let l = test_pki::server_leaf(dir.path(), "server", &ca, &rcgen::PKCS_ECDSA_P256_SHA256);
    let tls = super::super::TlsServer::load(&l.cert, &l.key, None).unwrap();
    let (s, c) = test_pki::tcp_pair().await;
    let connector =
        tokio_rustls::TlsConnector::from(super::super::client_config(&ca.pem, None).unwrap());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut req = "wss://localhost/mqtt".into_client_request().unwrap();
    req.headers_mut().insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        "mqtt".parse().unwrap(),
    );
    let (s, c) = tokio::join!(
        async {
            let (t, _) = tls.accept(s).await?;
            accept(t, 1024).await
        },
        async {
            let t = connector.connect(name, c).await.unwrap();
            tokio_tungstenite::client_async(req, t).await
        }
    );
    let (mut s, (mut c, _)) = (s.unwrap(), c.unwrap());
    c.send(Message::binary(CONNECT)).await.unwrap();
    let mut got = vec![0u8; CONNECT.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, CONNECT);
    s.write_all(b"\x20\x02\x00\x00").await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(
        c.next().await.unwrap().unwrap(),
        Message::binary(&b"\x20\x02\x00\x00"[..])
    );
}

#[test]
fn idle_size() {
    // The state on top of the inner stream (see `ws`'s module doc).
    let overhead = std::mem::size_of::<WsStream<()>>();
    assert!(overhead <= 88, "{overhead}");
    let _ = Role::Server;
}
