//! A minimal RESP2 client for the outbox's hot path (enqueue, ack, sent watermark).
//! Hand-written because a measurement said so (below).
//!
//! redis-rs builds every command as a `Cmd` of owned arguments, packs it again into a pipeline
//! and parses replies into `Value` trees: most of the Herald CPU a pushed message cost. Here a
//! pipeline is encoded straight into one reused buffer (keys and envelopes included, no
//! intermediate allocation) and replies are read in place from the read buffer. One `Conn`
//! serves one writer task and carries one pipeline at a time, so replies are matched to
//! requests by position alone. Connection setup (AUTH, SELECT) is done here too; addresses,
//! Sentinel lookups and the cold commands stay with redis-rs.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What can go wrong on a `Conn`. Either way the connection is in an unknown state and is
/// dropped by its owner.
#[derive(Debug)]
pub(crate) enum Error {
    Io(io::Error),
    /// Redis sent something this client cannot read, or answered setup with an error.
    Protocol(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Protocol(why) => write!(f, "redis protocol: {why}"),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

fn protocol(why: impl Into<String>) -> Error {
    Error::Protocol(why.into())
}

/// Writes the decimal digits of `v` ending just before `buf[end]`; returns where they start.
fn digits(buf: &mut [u8], end: usize, mut v: u64) -> usize {
    let mut i = end;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return i;
        }
    }
}

/// `<kind><n>\r\n`, written with one copy (this runs a dozen times per message).
fn header(b: &mut BytesMut, kind: u8, n: u64) {
    let mut buf = [0u8; 24];
    buf[21] = b'\r';
    buf[22] = b'\n';
    let start = digits(&mut buf, 21, n) - 1;
    buf[start] = kind;
    b.extend_from_slice(&buf[start..23]);
}

/// `*<n>\r\n`: a command of `n` arguments follows.
pub(crate) fn array(b: &mut BytesMut, n: usize) {
    header(b, b'*', n as u64);
}

/// The header of a bulk string of `len` bytes; the caller writes exactly `len` bytes, then
/// `end`.
pub(crate) fn bulk_header(b: &mut BytesMut, len: usize) {
    header(b, b'$', len as u64);
}

pub(crate) fn end(b: &mut BytesMut) {
    b.extend_from_slice(b"\r\n");
}

pub(crate) fn bulk(b: &mut BytesMut, s: &[u8]) {
    bulk_header(b, s.len());
    b.extend_from_slice(s);
    end(b);
}

/// `v` in decimal as a bulk string, written with one copy.
pub(crate) fn bulk_u64(b: &mut BytesMut, v: u64) {
    let mut buf = [0u8; 32];
    buf[30] = b'\r';
    buf[31] = b'\n';
    let start = digits(&mut buf, 30, v);
    let len = 30 - start;
    // "$<len>\r\n" in front; len has at most 2 digits.
    let mut i = start - 2;
    buf[i] = b'\r';
    buf[i + 1] = b'\n';
    i = digits(&mut buf, i, len as u64) - 1;
    buf[i] = b'$';
    b.extend_from_slice(&buf[i..]);
}

/// `prefix` and `v` in decimal as one bulk string (a stream entry id, `0-<seq>`).
pub(crate) fn bulk_prefixed_u64(b: &mut BytesMut, prefix: &[u8], v: u64) {
    let mut buf = [0u8; 20];
    let start = digits(&mut buf, 20, v);
    header(b, b'$', (prefix.len() + 20 - start) as u64);
    b.extend_from_slice(prefix);
    b.extend_from_slice(&buf[start..]);
    b.extend_from_slice(b"\r\n");
}

/// One element of a reply. An array arrives as its header followed by its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply<'a> {
    Status(&'a [u8]),
    Error(&'a [u8]),
    Int(i64),
    Bulk(Option<&'a [u8]>),
    Array(Option<usize>),
}

/// Reads replies from a buffer holding complete replies (see `complete`).
pub(crate) struct Replies<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// The line at `buf[pos..]` without its CRLF, and where the next one starts; `None` if the
/// buffer ends first.
fn line(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, Error> {
    let Some(rest) = buf.get(pos..) else {
        return Ok(None);
    };
    // Lines here (headers, integers, status and error text) never hold a CR of their own.
    let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
        return Ok(None);
    };
    match rest.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((&rest[..cr], pos + cr + 2))),
        Some(_) => Err(protocol("CR without LF")),
    }
}

fn int(digits: &[u8]) -> Result<i64, Error> {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(protocol("bad integer"));
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(protocol("bad integer"));
        }
        v = v * 10 + (d - b'0') as i64;
    }
    Ok(if neg { -v } else { v })
}

/// Parses one element at `pos`: the element and where the next starts, or `None` if the
/// buffer ends first.
fn element(buf: &[u8], pos: usize) -> Result<Option<(Reply<'_>, usize)>, Error> {
    let Some((l, next)) = line(buf, pos)? else {
        return Ok(None);
    };
    let Some((&kind, body)) = l.split_first() else {
        return Err(protocol("empty line"));
    };
    Ok(Some(match kind {
        b'+' => (Reply::Status(body), next),
        b'-' => (Reply::Error(body), next),
        b':' => (Reply::Int(int(body)?), next),
        b'$' => {
            let n = int(body)?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let n = n as usize;
            if buf.len() < next + n + 2 {
                return Ok(None);
            }
            if &buf[next + n..next + n + 2] != b"\r\n" {
                return Err(protocol("bulk string without CRLF"));
            }
            (Reply::Bulk(Some(&buf[next..next + n])), next + n + 2)
        }
        b'*' => {
            let n = int(body)?;
            (Reply::Array((n >= 0).then_some(n as usize)), next)
        }
        other => return Err(protocol(format!("unknown reply type {:?}", other as char))),
    }))
}

/// Where the complete reply starting at `pos` ends, or `None` if it is not all there yet.
pub(crate) fn complete(buf: &[u8], mut pos: usize) -> Result<Option<usize>, Error> {
    // Elements still to skip: an array adds its length.
    let mut todo: usize = 1;
    while todo > 0 {
        let Some((r, next)) = element(buf, pos)? else {
            return Ok(None);
        };
        todo -= 1;
        if let Reply::Array(Some(n)) = r {
            todo = todo
                .checked_add(n)
                .ok_or_else(|| protocol("array too long"))?;
        }
        pos = next;
    }
    Ok(Some(pos))
}

impl<'a> Replies<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Replies<'a> {
        Replies { buf, pos: 0 }
    }

    /// The next element. Past the end of the buffer (which `complete` rules out for the
    /// replies counted) it is a protocol error.
    pub(crate) fn next(&mut self) -> Result<Reply<'a>, Error> {
        match element(self.buf, self.pos)? {
            Some((r, next)) => {
                self.pos = next;
                Ok(r)
            }
            None => Err(protocol("reply ended early")),
        }
    }

    /// Skips the rest of a reply whose first element was `first` (an array's elements).
    pub(crate) fn skip(&mut self, first: Reply<'a>) -> Result<(), Error> {
        if let Reply::Array(Some(n)) = first {
            for _ in 0..n {
                let r = self.next()?;
                self.skip(r)?;
            }
        }
        Ok(())
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    /// `rediss://`: boxed, it is much larger than the others.
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

/// One connection to Redis, used by one task, one pipeline at a time.
pub(crate) struct Conn {
    stream: Stream,
    rbuf: BytesMut,
}

impl Conn {
    /// Connects and authenticates as `info` says (the same settings redis-rs uses for the
    /// cold commands); `tls` is the client config for `rediss://` addresses.
    pub(crate) async fn connect(
        info: &redis::ConnectionInfo,
        tls: Option<&std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
    ) -> Result<Conn, Error> {
        let stream = match info.addr() {
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                let Some(tls) = tls else {
                    return Err(protocol(
                        "rediss:// without a TLS configuration".to_string(),
                    ));
                };
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| protocol(format!("bad Redis host name: {e}")))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                Stream::Tls(Box::new(connector.connect(name, s).await?))
            }
            redis::ConnectionAddr::Tcp(host, port) => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                // Pipelines are written whole: no reason to wait for more.
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            #[cfg(unix)]
            redis::ConnectionAddr::Unix(path) => {
                Stream::Unix(tokio::net::UnixStream::connect(path).await?)
            }
            other => return Err(protocol(format!("unsupported address {other:?}"))),
        };
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
        };
        let settings = info.redis_settings();
        let mut out = BytesMut::new();
        let mut replies = 0;
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => {
                    array(&mut out, 3);
                    bulk(&mut out, b"AUTH");
                    bulk(&mut out, user.as_bytes());
                }
                None => {
                    array(&mut out, 2);
                    bulk(&mut out, b"AUTH");
                }
            }
            bulk(&mut out, password.as_bytes());
            replies += 1;
        }
        if settings.db() != 0 {
            array(&mut out, 2);
            bulk(&mut out, b"SELECT");
            bulk(&mut out, settings.db().to_string().as_bytes());
            replies += 1;
        }
        if replies > 0 {
            conn.round_trip(&out, replies).await?;
            let mut r = Replies::new(conn.replies());
            for _ in 0..replies {
                match r.next()? {
                    Reply::Status(_) => {}
                    Reply::Error(e) => {
                        return Err(protocol(String::from_utf8_lossy(e).into_owned()))
                    }
                    other => return Err(protocol(format!("unexpected setup reply {other:?}"))),
                }
            }
        }
        Ok(conn)
    }

    /// Writes `out` (a pipeline of `replies` commands) and reads until all their replies are
    /// in; `replies` then returns exactly those.
    pub(crate) async fn round_trip(&mut self, out: &[u8], replies: usize) -> Result<(), Error> {
        // The last round trip ended with exactly its replies in the buffer, all read since.
        self.rbuf.clear();
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(out).await?,
            Stream::Tls(s) => s.write_all(out).await?,
            #[cfg(unix)]
            Stream::Unix(s) => s.write_all(out).await?,
        }
        let mut seen = 0;
        let mut pos = 0;
        while seen < replies {
            match complete(&self.rbuf, pos)? {
                Some(next) => {
                    pos = next;
                    seen += 1;
                    continue;
                }
                None => {
                    if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                        self.rbuf.reserve(16 * 1024);
                    }
                    let n = match &mut self.stream {
                        Stream::Tcp(s) => s.read_buf(&mut self.rbuf).await?,
                        Stream::Tls(s) => s.read_buf(&mut self.rbuf).await?,
                        #[cfg(unix)]
                        Stream::Unix(s) => s.read_buf(&mut self.rbuf).await?,
                    };
                    if n == 0 {
                        return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
        if pos != self.rbuf.len() {
            // Nothing was asked for beyond these replies: the stream is out of step.
            return Err(protocol("more replies than requests"));
        }
        Ok(())
    }

    /// The replies of the last round trip, for `Replies`.
    pub(crate) fn replies(&self) -> &[u8] {
        &self.rbuf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands() {
        let mut b = BytesMut::new();
        array(&mut b, 3);
        bulk(&mut b, b"SET");
        bulk(&mut b, b"k");
        bulk_u64(&mut b, 1234567890123);
        assert_eq!(
            &b[..],
            &b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$13\r\n1234567890123\r\n"[..]
        );
        for v in [0, 7, 10, 99, 12345, u64::MAX] {
            let mut b = BytesMut::new();
            bulk_u64(&mut b, v);
            let s = v.to_string();
            assert_eq!(&b[..], format!("${}\r\n{s}\r\n", s.len()).as_bytes());
        }
        let mut b = BytesMut::new();
        array(&mut b, 0);
        bulk_header(&mut b, 1234);
        assert_eq!(&b[..], b"*0\r\n$1234\r\n");
    }

    #[test]
    fn parses_replies() {
        let buf =
            b"+OK\r\n-ERR no\r\n:-12\r\n$3\r\na\r\n\r\n$-1\r\n*2\r\n:1\r\n*1\r\n$0\r\n\r\n*-1\r\n";
        let mut pos = 0;
        let mut ends = Vec::new();
        while let Some(next) = complete(buf, pos).unwrap() {
            ends.push(next);
            pos = next;
            if pos == buf.len() {
                break;
            }
        }
        assert_eq!(ends.len(), 7);
        let mut r = Replies::new(buf);
        assert_eq!(r.next().unwrap(), Reply::Status(b"OK"));
        assert_eq!(r.next().unwrap(), Reply::Error(b"ERR no"));
        assert_eq!(r.next().unwrap(), Reply::Int(-12));
        assert_eq!(r.next().unwrap(), Reply::Bulk(Some(b"a\r\n")));
        assert_eq!(r.next().unwrap(), Reply::Bulk(None));
        let a = r.next().unwrap();
        assert_eq!(a, Reply::Array(Some(2)));
        r.skip(a).unwrap();
        assert_eq!(r.next().unwrap(), Reply::Array(None));
        assert!(r.next().is_err());
    }

    #[test]
    fn incomplete_and_bad_replies() {
        for partial in [
            &b""[..],
            b"+OK",
            b"+OK\r",
            b"$3\r\nab",
            b"$3\r\nabc\r",
            b"*2\r\n:1\r\n",
        ] {
            assert_eq!(complete(partial, 0).unwrap(), None, "{partial:?}");
        }
        for bad in [
            &b"?x\r\n"[..],
            b":1x\r\n",
            b"$3\r\nabcde\r\n",
            b"\r\n",
            b"+a\rb\r\n",
        ] {
            assert!(complete(bad, 0).is_err(), "{bad:?}");
        }
    }
}
