//! The server side of a TLS connection as a byte stream, over rustls's unbuffered API, so that
//! an idle connection holds no buffer at all.
//!
//! Why not tokio-rustls: its `TlsStream` wraps a buffered `ServerConnection`, whose record
//! deframer keeps a 4 KiB `Vec` for the connection's whole life (rustls 0.23
//! `DeframerVecBuffer::prepare_read`: every `read_tls` first sizes it to `used + 4096`, and it
//! shrinks back only to 4096, never to 0), zeroed, so resident. That was two thirds of what
//! an idle TLS connection cost (see `tls`'s module doc for the figures). Here the caller
//! owns the buffers, and:
//! - socket reads go into one scratch buffer per thread; rustls decrypts the records in it,
//!   and only an incomplete record (or handshake message) left at the end is copied into
//!   `incoming`, which is freed as soon as it is used up;
//! - decrypted bytes go straight into the reader's buffer; what does not fit waits in
//!   `plaintext`, freed once read;
//! - writes are encrypted into `outgoing` and written at once; whatever the socket does not
//!   take waits there, freed once sent.
//!
//! What stays is the rustls connection itself: its state machine, the traffic keys and, with
//! client certificates, the client's chain (rustls keeps it for `peer_certificates`).
//!
//! Behaviour matches tokio-rustls where it matters to the session: `poll_write` takes at
//! most 16 KiB at a time (one record), `poll_flush` sends everything encrypted so far,
//! `poll_shutdown` sends close_notify; a peer's close_notify reads as EOF, and so does a TCP
//! close at a record boundary (MQTT has its own framing, so a truncation attack cannot cut
//! a packet short unnoticed); a TCP close inside a record is `UnexpectedEof`. A TLS error
//! (bad record, failed client certificate) sends its alert when the socket takes it, and
//! every later call fails.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::UnbufferedServerConnection;
use tokio_rustls::rustls::unbuffered::{
    AppDataRecord, ConnectionState, EncodeError, EncryptError, UnbufferedStatus,
};

/// Bytes asked of the socket per read: one TLS record of the largest size (TLS 1.2 allows
/// 2^14 + 2048 bytes of ciphertext plus the 5-byte header).
const READ_CHUNK: usize = 16 * 1024 + 2048 + 5;

/// Plaintext encrypted per `poll_write`: one full record.
const MAX_WRITE: usize = 16 * 1024;

thread_local! {
    /// Where socket reads land and rustls decrypts in place: `incoming`, then new bytes.
    static WORK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A server-side TLS stream: `AsyncRead + AsyncWrite + Unpin + Send` over any such stream.
/// Made by `TlsServer::accept`, which completes the handshake.
pub struct TlsStream<S> {
    io: S,
    conn: UnbufferedServerConnection,
    /// Received bytes rustls has not consumed yet: the start of a record, or records of a
    /// handshake message still being joined. Presented again, in front of new bytes.
    incoming: Vec<u8>,
    /// Encrypted bytes the socket has not taken yet.
    outgoing: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_at`.
    plaintext: Vec<u8>,
    plain_at: usize,
    /// close_notify or the socket's EOF arrived: reads return EOF.
    read_closed: bool,
    /// close_notify is queued or sent: no more writes.
    close_sent: bool,
    /// A TLS error happened (and was returned); every later call fails.
    broken: bool,
}

/// What one read from the socket came to.
enum Filled {
    /// New bytes went through rustls (maybe producing nothing for the reader yet).
    Progress,
    /// The socket is at EOF.
    Eof,
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("tls: {e}"))
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// The server handshake on `io`, to completion (client certificate verified, session
    /// tickets sent).
    pub(crate) async fn accept(io: S, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = TlsStream {
            io,
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            plaintext: Vec::new(),
            plain_at: 0,
            read_closed: false,
            close_sent: false,
            broken: false,
        };
        poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // Our flight first: the client waits for it.
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.read_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls: connection closed during the handshake",
                )));
            }
            match ready!(self.poll_fill(cx, None)) {
                Ok(Filled::Progress) => {}
                Ok(Filled::Eof) => self.read_closed = true,
                Err(e) => {
                    // The alert, if the socket takes it now.
                    let _ = self.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl<S> TlsStream<S> {
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The TLS state: protocol version, cipher suite, the client's certificates.
    pub fn tls(&self) -> &rustls::CommonState {
        &self.conn
    }

    /// Runs rustls over `buf` (received bytes: `incoming`, then what was just read) until it
    /// needs more input. Decrypted data goes to `out` (while nothing is waiting before it),
    /// the rest to `plaintext`; records to send go to `outgoing`. Returns how many bytes of
    /// `buf` are consumed.
    fn process(&mut self, buf: &mut [u8], mut out: Option<&mut ReadBuf<'_>>) -> io::Result<usize> {
        let mut used = 0;
        // Every round consumes input or moves the state on; the bound is a safety net.
        for _ in 0..buf.len() + 1024 {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut buf[used..]);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    self.fail(Some(&mut buf[used + discard..]));
                    return Err(tls_error(e));
                }
            };
            let mut done = false;
            match state {
                ConnectionState::ReadTraffic(mut t) => {
                    while let Some(record) = t.next_record() {
                        let AppDataRecord {
                            discard: d,
                            mut payload,
                        } = record.map_err(tls_error)?;
                        discard += d;
                        if let Some(out) = out.as_deref_mut() {
                            if self.plain_at == self.plaintext.len() {
                                let n = out.remaining().min(payload.len());
                                out.put_slice(&payload[..n]);
                                payload = &payload[n..];
                            }
                        }
                        self.plaintext.extend_from_slice(payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    let at = self.outgoing.len();
                    let n = match e.encode(&mut []) {
                        Err(EncodeError::InsufficientSize(s)) => {
                            self.outgoing.resize(at + s.required_size, 0);
                            e.encode(&mut self.outgoing[at..]).map_err(tls_error)?
                        }
                        Ok(n) => n,
                        Err(e) => return Err(tls_error(e)),
                    };
                    self.outgoing.truncate(at + n);
                }
                // Sent by the caller after this returns (before it waits for input).
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => {
                    done = true;
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.read_closed = true;
                    done = true;
                }
                // Early data is off (`max_early_data_size` 0).
                _ => return Err(tls_error("unexpected connection state")),
            }
            used += discard;
            if done {
                return Ok(used);
            }
        }
        Err(tls_error("no progress"))
    }

    /// After an error: no more reads or writes. After a TLS error, `rest` is the input rustls
    /// has not consumed (it must see the same bytes again), and the alert it queued goes to
    /// `outgoing` for a last-gasp write.
    fn fail(&mut self, rest: Option<&mut [u8]>) {
        self.broken = true;
        self.incoming = Vec::new();
        self.plaintext = Vec::new();
        self.plain_at = 0;
        let Some(rest) = rest else { return };
        // Only while rustls has records queued: then `process_tls_records` hands them out
        // before it looks at the input again (looking again could meet the same error).
        for _ in 0..8 {
            let common: &rustls::CommonState = &self.conn;
            if !common.wants_write() {
                break;
            }
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut *rest);
            let Ok(ConnectionState::EncodeTlsData(mut e)) = state else {
                break;
            };
            let at = self.outgoing.len();
            if let Err(EncodeError::InsufficientSize(s)) = e.encode(&mut []) {
                self.outgoing.resize(at + s.required_size, 0);
                match e.encode(&mut self.outgoing[at..]) {
                    Ok(n) => self.outgoing.truncate(at + n),
                    Err(_) => self.outgoing.truncate(at),
                }
            }
        }
    }

    /// Takes what waits in `plaintext`.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.plaintext.len() - self.plain_at);
        buf.put_slice(&self.plaintext[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        if self.plain_at == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plain_at = 0;
        }
    }

    fn broken_error() -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, "tls: connection failed earlier")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Reads once from the socket (after `incoming`) into the thread's scratch buffer and
    /// runs rustls over it.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        out: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<Filled>> {
        WORK.with(|work| {
            let mut work = work.borrow_mut();
            let have = self.incoming.len();
            let end = have + READ_CHUNK;
            if work.len() < end {
                work.resize(end, 0);
            }
            work[..have].copy_from_slice(&self.incoming);
            let mut rb = ReadBuf::new(&mut work[have..end]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(Filled::Eof));
            }
            let total = have + n;
            let used = match self.process(&mut work[..total], out) {
                Ok(used) => used,
                Err(e) => {
                    if !self.broken {
                        self.fail(None);
                    }
                    return Poll::Ready(Err(e));
                }
            };
            self.incoming = work[used..total].to_vec();
            Poll::Ready(Ok(Filled::Progress))
        })
    }

    /// Writes `outgoing` until it is empty (then frees it) or the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) if n == self.outgoing.len() => self.outgoing = Vec::new(),
                Ok(n) => {
                    self.outgoing.drain(..n);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Puts the rustls connection in the state where it encrypts application data, handling
    /// whatever comes first, and runs `f` with it, encrypting into `outgoing`.
    fn encrypt_with(
        &mut self,
        mut f: impl FnMut(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
        estimate: usize,
    ) -> io::Result<()> {
        for _ in 0..64 {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming[..]);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    let mut rest = std::mem::take(&mut self.incoming);
                    rest.drain(..discard);
                    self.fail(Some(&mut rest));
                    return Err(tls_error(e));
                }
            };
            let mut wrote = false;
            match state {
                ConnectionState::WriteTraffic(mut w) => {
                    let at = self.outgoing.len();
                    self.outgoing.resize(at + estimate, 0);
                    let n = match f(&mut w, &mut self.outgoing[at..]) {
                        Err(EncryptError::InsufficientSize(s)) => {
                            self.outgoing.resize(at + s.required_size, 0);
                            f(&mut w, &mut self.outgoing[at..])
                        }
                        r => r,
                    };
                    match n {
                        Ok(n) => self.outgoing.truncate(at + n),
                        Err(e) => {
                            self.outgoing.truncate(at);
                            return Err(tls_error(e));
                        }
                    }
                    wrote = true;
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    let at = self.outgoing.len();
                    if let Err(EncodeError::InsufficientSize(s)) = e.encode(&mut []) {
                        self.outgoing.resize(at + s.required_size, 0);
                        let n = e.encode(&mut self.outgoing[at..]).map_err(tls_error)?;
                        self.outgoing.truncate(at + n);
                    }
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::ReadTraffic(mut t) => {
                    // Not expected (reads drain every record), but keep the data if so.
                    while let Some(record) = t.next_record() {
                        let record = record.map_err(tls_error)?;
                        self.plaintext.extend_from_slice(record.payload);
                    }
                }
                ConnectionState::PeerClosed => self.read_closed = true,
                ConnectionState::Closed => {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "tls: closed"));
                }
                _ => return Err(tls_error("not ready to send")),
            }
            if discard > 0 {
                self.incoming.drain(..discard);
            }
            if wrote {
                return Ok(());
            }
        }
        Err(tls_error("no progress"))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plain_at < this.plaintext.len() {
            this.take_plaintext(buf);
            return Poll::Ready(Ok(()));
        }
        if this.broken {
            return Poll::Ready(Err(Self::broken_error()));
        }
        if this.read_closed || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // Something owed (a key update, an alert): its errors show on the next write.
        let _ = this.poll_send(cx);
        loop {
            let before = buf.filled().len();
            let filled = match this.poll_fill(cx, Some(&mut *buf)) {
                Poll::Ready(Ok(f)) => f,
                Poll::Ready(Err(e)) => {
                    let _ = this.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            };
            if let Filled::Eof = filled {
                this.read_closed = true;
                if !this.incoming.is_empty() {
                    this.incoming = Vec::new();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls: connection closed inside a record",
                    )));
                }
                return Poll::Ready(Ok(()));
            }
            let _ = this.poll_send(cx);
            if buf.filled().len() > before || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            // Only handshake messages (a key update, tickets) or part of a record: read on.
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.broken {
            return Poll::Ready(Err(Self::broken_error()));
        }
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls: closed",
            )));
        }
        ready!(this.poll_send(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &buf[..buf.len().min(MAX_WRITE)];
        // One record's overhead is at most 5 + 16 + 1 (TLS 1.3) or 5 + 8 + 16 (TLS 1.2); a
        // queued key update adds a record.
        this.encrypt_with(|w, out| w.encrypt(data, out), data.len() + 128)?;
        // The bytes are taken; the socket gets them now or on the next write or flush.
        let _ = this.poll_send(cx)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && !this.broken {
            this.close_sent = true;
            this.encrypt_with(|w, out| w.queue_close_notify(out), 64)?;
        }
        ready!(this.poll_send(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
}
