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
//!
//! - `stream`: `Target` (where to connect, from which source address) and `Stream`, TCP or
//!   TLS behind one type.
//! - `tls`: the rustls client configuration and the handshake statistics.
//! - `codec`: packets from the broker parsed in place, packets to it encoded.
//! - here: `Client`, one connection's handshake, reads and acknowledgements.

mod codec;
mod stream;
mod tls;

use std::io;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use codec::{
    encode_connect, encode_puback, encode_publish, encode_retained, encode_subscribe,
    encode_unsubscribe, parse, put_stamped, stamp, Packet,
};
pub use stream::{Stream, Target};
pub use tls::{tls_config, tls_stats, Tls};

static START: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process's shared clock start. Payload timestamps use it, so sender
/// and receiver must be in the same process (they are: one tool drives both sides).
pub fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
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
    pub unsubacks: usize,
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
        let c = Client::handshake(stream, hello, h, read_size).await?;
        match c.connack {
            Some((_, 0)) => Ok(c),
            Some((_, code)) => Err(format!("CONNACK return code {code}")),
            None => Err("no CONNACK".into()),
        }
    }

    /// CONNECT (+ SUBSCRIBE) on a connected `stream`, wait for CONNACK (+ SUBACK when it
    /// accepts). A refusal (CONNACK return code other than 0) is `Ok`, with the code in
    /// `connack`: the caller decides what it means (`open` makes it an error).
    pub async fn handshake<H: OnPublish>(
        stream: Stream,
        hello: &Hello<'_>,
        h: &mut H,
        read_size: usize,
    ) -> Result<Client, String> {
        let mut c = Client {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::with_capacity(64),
            read_size,
            connack: None,
            subacks: 0,
            refused_subs: 0,
            unsubacks: 0,
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
                    return Ok(c);
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
                        Packet::PubAck(_) => self.pubacks += 1,
                        Packet::PubRel(id) => {
                            self.wbuf.put_slice(&[0x70, 2]);
                            self.wbuf.put_u16(id);
                        }
                        Packet::PubRec | Packet::PubComp => {}
                        Packet::UnsubAck => self.unsubacks += 1,
                        Packet::PingResp => {}
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

    /// SUBSCRIBE to one filter; its SUBACK shows in `subacks` (and `refused_subs`).
    pub async fn subscribe(&mut self, pkid: u16, filter: &str, qos: u8) -> io::Result<()> {
        encode_subscribe(&mut self.wbuf, pkid, filter, qos);
        self.flush().await
    }

    /// UNSUBSCRIBE from one filter; its UNSUBACK shows in `unsubacks`.
    pub async fn unsubscribe(&mut self, pkid: u16, filter: &str) -> io::Result<()> {
        encode_unsubscribe(&mut self.wbuf, pkid, filter);
        self.flush().await
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
