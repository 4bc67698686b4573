use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::super::test_pki;
use super::super::TlsServer;
use super::*;

const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A socket that reads and writes a few bytes at a time (1 to `max`, pseudo-random) and
/// now and then says Pending (waking itself), to reach every partial-record path.
struct Trickle {
    io: TcpStream,
    max: usize,
    seed: u64,
}

impl Trickle {
    fn next(&mut self) -> usize {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed % self.max as u64) as usize + 1
    }

    /// Every seventh call or so: Pending, with a wake so the task polls again.
    fn stall(&mut self, cx: &mut Context<'_>) -> bool {
        if self.next().is_multiple_of(7) {
            cx.waker().wake_by_ref();
            return true;
        }
        false
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.stall(cx) {
            return Poll::Pending;
        }
        let n = self.next().min(buf.remaining());
        let mut small = ReadBuf::new(buf.initialize_unfilled_to(n));
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut small))?;
        let got = small.filled().len();
        buf.advance(got);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.stall(cx) {
            return Poll::Pending;
        }
        let n = self.next().min(buf.len());
        Pin::new(&mut self.io).poll_write(cx, &buf[..n])
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    ca: test_pki::Ca,
    server: TlsServer,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_pki::ca(dir.path(), "ca");
    let l = test_pki::server_leaf(dir.path(), "server", &ca, &rcgen::PKCS_ECDSA_P256_SHA256);
    let server = TlsServer::load(&l.cert, &l.key, None).unwrap();
    Setup {
        _dir: dir,
        ca,
        server,
    }
}

type Client = tokio_rustls::client::TlsStream<TcpStream>;

async fn pair<S: AsyncRead + AsyncWrite + Unpin>(
    s: &Setup,
    versions: &[&'static rustls::SupportedProtocolVersion],
    wrap: impl FnOnce(TcpStream) -> S,
) -> (TlsStream<S>, Client) {
    let (sock, c) = test_pki::tcp_pair().await;
    let config = test_pki::client(&s.ca.pem, versions, None);
    let name = ServerName::try_from("localhost").unwrap();
    let (server, client) = tokio::join!(
        s.server.accept(wrap(sock)),
        TlsConnector::from(config).connect(name, c)
    );
    (server.unwrap().0, client.unwrap())
}

fn idle<S>(s: &TlsStream<S>) {
    assert_eq!(s.incoming.capacity(), 0, "incoming kept");
    assert_eq!(s.outgoing.capacity(), 0, "outgoing kept");
    assert_eq!(s.plaintext.capacity(), 0, "plaintext kept");
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ salt)
        .collect()
}

/// 300 KB each way at once, in writes of odd sizes, through a socket that moves a few
/// bytes at a time: every byte arrives, in order; afterwards nothing is buffered.
#[tokio::test]
async fn bulk_both_ways_through_a_trickle() {
    let s = setup();
    for (versions, max) in [(TLS13, 7), (TLS12, 300), (TLS13, 5000)] {
        let (mut server, client) = pair(&s, versions, |io| Trickle {
            io,
            max,
            seed: 0x9e3779b97f4a7c15,
        })
        .await;
        let (mut cr, mut cw) = tokio::io::split(client);
        let up = pattern(300_000, 1);
        let down = pattern(300_000, 2);
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            let writer = async {
                for chunk in up2.chunks(4999) {
                    cw.write_all(chunk).await.unwrap();
                }
                cw.flush().await.unwrap();
                cw
            };
            let reader = async {
                let mut got = vec![0u8; down2.len()];
                cr.read_exact(&mut got).await.unwrap();
                assert!(got == down2, "server to client bytes differ");
                cr
            };
            tokio::join!(writer, reader)
        });
        let mut got = vec![0u8; up.len()];
        server.read_exact(&mut got).await.unwrap();
        assert!(got == up, "client to server bytes differ");
        for chunk in down.chunks(7777) {
            server.write_all(chunk).await.unwrap();
        }
        server.flush().await.unwrap();
        let (_cw, _cr) = client_side.await.unwrap();
        idle(&server);
    }
}

/// A record bigger than the reader's buffer: the rest waits, and is freed once read.
#[tokio::test]
async fn small_reads_of_a_big_record() {
    let s = setup();
    let (mut server, mut client) = pair(&s, TLS13, |io| io).await;
    let data = pattern(16_000, 3);
    client.write_all(&data).await.unwrap();
    client.flush().await.unwrap();
    let mut got = Vec::new();
    let mut small = [0u8; 10];
    while got.len() < data.len() {
        let n = server.read(&mut small).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&small[..n]);
    }
    assert_eq!(got, data);
    idle(&server);
}

#[tokio::test]
async fn close_notify_both_ways() {
    let s = setup();
    for versions in [TLS13, TLS12] {
        // The client closes: the server reads the data, then EOF.
        let (mut server, mut client) = pair(&s, versions, |io| io).await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
        // The server closes: the client gets the data and a clean EOF.
        let (mut server, mut client) = pair(&s, versions, |io| io).await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        assert!(server.write_all(b"more").await.is_err());
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
    }
}

/// TCP closed without close_notify: EOF at a record boundary, an error inside a record.
#[tokio::test]
async fn tcp_close_without_close_notify() {
    let s = setup();
    // The client reads once first, taking the session tickets: a socket closed with
    // unread bytes sends a reset instead of a FIN.
    async fn exchange(server: &mut TlsStream<TcpStream>, client: &mut Client) {
        server.write_all(b"hi").await.unwrap();
        server.flush().await.unwrap();
        let mut two = [0u8; 2];
        client.read_exact(&mut two).await.unwrap();
    }
    let (mut server, mut client) = pair(&s, TLS13, |io| io).await;
    exchange(&mut server, &mut client).await;
    drop(client);
    let mut buf = [0u8; 16];
    assert_eq!(server.read(&mut buf).await.unwrap(), 0);

    let (mut server, mut client) = pair(&s, TLS13, |io| io).await;
    exchange(&mut server, &mut client).await;
    client.write_all(b"a whole record").await.unwrap();
    client.flush().await.unwrap();
    let n = server.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"a whole record");
    // Half a record, then the socket closes.
    let (tcp, _) = client.into_inner();
    let mut tcp = tcp;
    tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x40, 1, 2, 3])
        .await
        .unwrap();
    drop(tcp);
    let e = server.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
}

/// Garbage where a record should be: an error, the client hears an alert, and the
/// stream stays failed.
#[tokio::test]
async fn bad_record_fails_the_stream() {
    let s = setup();
    let (mut server, mut client) = pair(&s, TLS13, |io| io).await;
    let tcp = client.get_mut().0;
    tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x20])
        .await
        .unwrap();
    tcp.write_all(&[0xab; 0x20]).await.unwrap();
    let mut buf = [0u8; 16];
    let e = server.read(&mut buf).await.unwrap_err();
    assert!(e.to_string().starts_with("tls: "), "{e}");
    // The alert reached the client (an encrypted record it can decrypt).
    let e = client.read(&mut buf).await.unwrap_err();
    assert!(e.to_string().contains("alert"), "{e}");
    assert!(server.read(&mut buf).await.is_err());
    assert!(server.write_all(b"x").await.is_err());
}

/// The client refreshes its keys (TLS 1.3 KeyUpdate asking for ours too): data keeps
/// flowing both ways.
#[tokio::test]
async fn key_update() {
    let s = setup();
    let (mut server, mut client) = pair(&s, TLS13, |io| io).await;
    for round in 0..3u8 {
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(&[round; 100]).await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 100];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [round; 100]);
        server.write_all(&[round + 10; 50]).await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 50];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [round + 10; 50]);
    }
    idle(&server);
}

/// Data the client sends right behind its Finished (an MQTT CONNECT) is kept through
/// the handshake and read first.
#[tokio::test]
async fn data_behind_the_handshake() {
    let s = setup();
    let (sock, c) = test_pki::tcp_pair().await;
    let config = test_pki::client(&s.ca.pem, TLS13, None);
    let name = ServerName::try_from("localhost").unwrap();
    let client = async {
        let mut c = TlsConnector::from(config).connect(name, c).await.unwrap();
        c.write_all(b"\x10\x0cCONNECT....").await.unwrap();
        c.flush().await.unwrap();
        c
    };
    let (server, _c) = tokio::join!(s.server.accept(sock), client);
    let (mut server, _) = server.unwrap();
    let mut got = [0u8; 13];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"\x10\x0cCONNECT....");
}

/// The accept futures and the streams can go to `tokio::spawn`.
#[allow(dead_code)]
fn spawnable(tls: &'static TlsServer, tcp: TcpStream, t: TlsStream<TcpStream>) {
    fn send<T: Send + 'static>(_: T) {}
    fn stream<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(_: &T) {}
    stream(&t);
    send(tls.accept(tcp));
    send(super::super::ws_accept(t, 1024));
}

#[test]
fn inline_size() {
    // tokio-rustls's server TlsStream<TcpStream> is 1224 bytes.
    let n = std::mem::size_of::<TlsStream<TcpStream>>();
    assert!(n <= 1216, "{n}");
}
