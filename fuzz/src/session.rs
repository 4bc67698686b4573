//! The `session` target's harness: a fresh broker with the memory store per input, and up to
//! `SLOTS` client connections over `tokio::io::duplex`, driven by a list of operations.
//!
//! Everything runs on a current-thread runtime with a paused clock: when every task is
//! blocked the clock jumps to the next timer, so the connect timeout (10 s) or a takeover
//! wait (3 s) cost no real time, and a run that would hang on the wall clock ends quickly.
//! One broker per input keeps the runs independent, so every crash reproduces from its input
//! alone; building one is cheap next to the run itself.
//!
//! Besides "never panics", it checks what a client can see: the broker only writes
//! well-formed server-to-client packets, CONNACK first, nothing after a refusal; and that
//! every connection task ends once its socket is closed, leaving no client registered.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::BytesMut;
use herald::auth::Auth;
use herald::broker::Broker;
use herald::outbox::Store;
use herald::config::{OverflowPolicy, Secret};
use herald::session::Connection;
use herald::Config;
use mqttbytes::v4;
use tokio::io::{AsyncRead, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::codec::{encode, Norm};

pub const SLOTS: usize = 4;
const IDS: [&str; 4] = ["c0", "c1", "c2", "c3"];
/// Operations per input: enough for connect, subscribe, publish, ack on a few clients.
const MAX_OPS: usize = 64;
/// Virtual time a connection has to end after its socket closed.
const END_WITHIN: Duration = Duration::from_secs(60);

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub setup: Setup,
    pub ops: Vec<Op>,
}

/// Limits, small so that the paths for full buffers, windows and queues are reached.
#[derive(Arbitrary, Debug)]
pub struct Setup {
    pub max_inflight: u8,
    pub max_queued: u8,
    pub max_mailbox: u8,
    pub max_messages: u8,
    pub drop_new: bool,
    pub push: bool,
    /// Anonymous clients under an ACL (`ACL` below) instead of authentication off.
    pub acl: bool,
    /// Bytes the duplex pipe holds before the broker's writes block.
    pub pipe: u16,
    /// Added to the 1024-byte minimum of `server.max_write_buffer`.
    pub write_buffer: u16,
}

#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Opens a connection in `slot` (dropping the one there) and sends CONNECT.
    Connect {
        slot: u8,
        id: Id,
        clean: bool,
        keep_alive: u8,
        will: Option<(Topic, u8, bool, Vec<u8>)>,
        login: Option<Login>,
    },
    /// A well-formed packet; opens a connection first if the slot is empty.
    Send {
        slot: u8,
        packet: Pkt,
    },
    /// Any bytes: the rest of the decoder's input space, and packets split across reads.
    Raw {
        slot: u8,
        bytes: Vec<u8>,
    },
    /// Acknowledges a PUBLISH or PUBREL the slot received, as a client would.
    Ack {
        slot: u8,
        nth: u8,
        kind: u8,
    },
    /// Stops or resumes reading the slot: the broker's writes back up.
    ToggleRead {
        slot: u8,
    },
    Close {
        slot: u8,
    },
    Sleep {
        ms: u16,
    },
    /// The server's periodic keepalive pass.
    Keepalives,
    /// Server shutdown: no new connections after it.
    Shutdown,
}

#[derive(Arbitrary, Debug)]
pub enum Id {
    Known(u8),
    /// Assigned by the broker (clean) or refused (persistent).
    Empty,
    /// `$herald/...` is refused.
    Reserved,
    Any(String),
}

#[derive(Arbitrary, Debug)]
pub enum Login {
    /// A valid device token for `IDS[n]` (authenticates only with `Setup::acl`).
    Token(u8),
    Plain(String, String),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Topic {
    /// `push/<one of IDS>`: reaches another slot's outbox.
    Push(u8),
    Plain(u8),
    Sys,
    Cluster,
    Any(String),
}

#[derive(Arbitrary, Debug)]
pub enum Filter {
    Exact(Topic),
    Pattern(u8),
}

#[derive(Arbitrary, Debug)]
pub enum Pkt {
    Publish {
        topic: Topic,
        qos: u8,
        pkid: u8,
        retain: bool,
        dup: bool,
        payload: Vec<u8>,
    },
    PubAck(u8),
    PubRec(u8),
    PubRel(u8),
    PubComp(u8),
    Subscribe {
        pkid: u8,
        filters: Vec<(Filter, u8)>,
    },
    Unsubscribe {
        pkid: u8,
        filters: Vec<Filter>,
    },
    PingReq,
    Disconnect,
}

impl Topic {
    fn name(&self) -> String {
        match self {
            Topic::Push(n) => format!("push/{}", IDS[usize::from(*n) % IDS.len()]),
            Topic::Plain(n) => {
                ["a", "a/b", "a/b/c", "b", "a/c0/x", "a/c1"][usize::from(*n) % 6].into()
            }
            Topic::Sys => "$SYS/x".into(),
            Topic::Cluster => "$cluster/x".into(),
            Topic::Any(s) => s.clone(),
        }
    }
}

impl Filter {
    fn text(&self) -> String {
        const PATTERNS: [&str; 10] = [
            "#", "+", "a/#", "a/+", "+/b", "push/+", "push/#", "$SYS/#", "a#", "",
        ];
        match self {
            Filter::Exact(t) => t.name(),
            Filter::Pattern(n) => PATTERNS[usize::from(*n) % PATTERNS.len()].into(),
        }
    }
}

/// Packet ids from a small range, so that they collide (QoS 2 resends, acks for the wrong
/// message) as often as they differ.
fn pkid(n: u8) -> u16 {
    u16::from(n % 16) + 1
}

impl Pkt {
    fn norm(&self) -> Norm {
        match self {
            Pkt::Publish {
                topic,
                qos,
                pkid: id,
                retain,
                dup,
                payload,
            } => {
                let qos = qos % 3;
                Norm::Publish {
                    dup: *dup && qos > 0,
                    qos,
                    retain: *retain,
                    topic: topic.name(),
                    pkid: if qos == 0 { 0 } else { pkid(*id) },
                    payload: payload.clone(),
                }
            }
            Pkt::PubAck(id) => Norm::PubAck(pkid(*id)),
            Pkt::PubRec(id) => Norm::PubRec(pkid(*id)),
            Pkt::PubRel(id) => Norm::PubRel(pkid(*id)),
            Pkt::PubComp(id) => Norm::PubComp(pkid(*id)),
            Pkt::Subscribe { pkid: id, filters } => Norm::Subscribe {
                pkid: pkid(*id),
                filters: filters.iter().map(|(f, q)| (Ok(f.text()), q % 3)).collect(),
            },
            Pkt::Unsubscribe { pkid: id, filters } => Norm::Unsubscribe {
                pkid: pkid(*id),
                topics: filters.iter().map(Filter::text).collect(),
            },
            Pkt::PingReq => Norm::PingReq,
            Pkt::Disconnect => Norm::Disconnect,
        }
    }
}

impl Setup {
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.session.max_inflight = usize::from(self.max_inflight % 8) + 1;
        c.session.max_queued_messages = usize::from(self.max_queued % 16) + 1;
        c.session.max_mailbox = usize::from(self.max_mailbox % 8) + 1;
        c.store.max_messages = usize::from(self.max_messages % 64) + 1;
        c.session.overflow = if self.drop_new {
            OverflowPolicy::DropNew
        } else {
            OverflowPolicy::DropOldest
        };
        c.push.enabled = self.push;
        c.server.max_write_buffer = 1024 + usize::from(self.write_buffer % 4096);
        if self.acl {
            c.auth.acl_file = Some(acl_file().into());
            c.auth.allow_anonymous = Some(true);
            c.auth.jwt_hs256_secret = Some(Secret::new(TOKEN_SECRET));
        }
        c.validate("fuzz").expect("the fuzz config is valid");
        c
    }
}

/// The client side of one connection.
struct Client {
    stream: DuplexStream,
    task: JoinHandle<()>,
    reading: bool,
    inbox: BytesMut,
    /// CONNACK's return code, once it arrived.
    connack: Option<u8>,
    /// Packet ids of the PUBLISH (QoS > 0) and PUBREL packets received, for `Op::Ack`.
    received: Vec<(u16, v4::Packet)>,
}

impl Client {
    /// Reads what the broker wrote, without waiting, and checks it.
    fn drain(&mut self) -> bool {
        let mut got = false;
        let mut chunk = [0u8; 4096];
        while self.reading {
            let mut rb = ReadBuf::new(&mut chunk);
            let mut cx = Context::from_waker(Waker::noop());
            match Pin::new(&mut self.stream).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    self.inbox.extend_from_slice(rb.filled());
                    got = true;
                }
                _ => break,
            }
        }
        loop {
            match v4::read(&mut self.inbox, usize::MAX) {
                Ok(p) => self.check(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => panic!("the broker wrote a malformed packet: {e:?}"),
            }
        }
        got
    }

    fn check(&mut self, p: v4::Packet) {
        use v4::Packet as P;
        match (&p, self.connack) {
            (P::ConnAck(c), None) => {
                self.connack = Some(c.code as u8);
                return;
            }
            (P::ConnAck(_), Some(_)) => panic!("a second CONNACK"),
            (_, None) => panic!("{p:?} before CONNACK"),
            (_, Some(code)) if code != 0 => panic!("{p:?} after CONNACK {code}"),
            _ => {}
        }
        match &p {
            P::Publish(publish) if publish.qos as u8 > 0 => {
                // MQTT 3.1.1 2.3.1: a packet id is not reused while its flow is unfinished.
                // `received` holds the flows this client has not finished (it may forget
                // some, never keep a finished one), and the broker resends only on a new
                // connection, so no PUBLISH may come with one of their ids.
                assert!(
                    !self.received.iter().any(|(id, _)| *id == publish.pkid),
                    "packet id {} reused while its flow is unfinished: {publish:?}",
                    publish.pkid
                );
                self.received.push((publish.pkid, p.clone()));
            }
            P::PubRel(r) => self.received.push((r.pkid, p.clone())),
            P::Publish(_)
            | P::PubAck(_)
            | P::PubRec(_)
            | P::PubComp(_)
            | P::SubAck(_)
            | P::UnsubAck(_)
            | P::PingResp => {}
            _ => panic!("client-to-server packet {p:?} from the broker"),
        }
        // A client holding many unacknowledged messages is not more interesting.
        if self.received.len() > 64 {
            self.received.remove(0);
        }
    }
}

/// Rules for anonymous clients and for devices (`pattern`) that allow, refuse and deny parts
/// of the topics the operations use.
const ACL: &str = "topic read a/#\ntopic write a/b\ntopic deny a/b/c\ntopic readwrite push/#\n\
                   topic read $SYS/#\nuser u\ntopic readwrite #\npattern readwrite a/%c/#\n\
                   pattern write push/#\n";

/// Not a secret: the fuzz broker only ever talks to the harness.
const TOKEN_SECRET: &str = "herald-fuzz-hs256-key-of-32-bytes+";

/// An HS256 device token for `client_id` that expires in 2100.
fn token(client_id: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    use hmac::Mac;
    let claims = format!("{{\"sub\":{client_id:?},\"exp\":4102444800}}");
    let signed = format!(
        "{}.{}",
        B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        B64.encode(claims)
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(TOKEN_SECRET.as_bytes())
        .expect("any key length");
    mac.update(signed.as_bytes());
    format!("{signed}.{}", B64.encode(mac.finalize().into_bytes()))
}

fn acl_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        // One file for every run (not one per process left behind in /tmp), written through
        // a rename so that a process starting meanwhile never reads half of it.
        let path = std::env::temp_dir().join("herald-fuzz.acl");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(ACL) {
            let part = path.with_extension(format!("acl.{}", std::process::id()));
            std::fs::write(&part, ACL).expect("write the ACL file");
            std::fs::rename(&part, &path).expect("rename the ACL file");
        }
        path
    })
}

fn auth(config: &Config) -> Arc<Auth> {
    // Open authentication keeps no state between inputs, so one serves them all; with an
    // ACL the failed-login limiter has state, and each input gets its own.
    static OPEN: OnceLock<Arc<Auth>> = OnceLock::new();
    if config.auth.acl_file.is_some() {
        return Arc::new(Auth::load(config).expect("auth with the ACL"));
    }
    OPEN.get_or_init(|| Arc::new(Auth::load(&Config::default()).expect("auth")))
        .clone()
}

struct Harness {
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    stopped: bool,
    pipe: usize,
    slots: [Option<Client>; SLOTS],
    /// Tasks of connections whose client side was dropped or replaced.
    closed: Vec<JoinHandle<()>>,
    /// Client ids that connected, to check that none is left registered.
    ids: Vec<String>,
}

impl Harness {
    fn open(&mut self, slot: usize) -> Option<&mut Client> {
        if self.stopped {
            return None;
        }
        self.close(slot);
        let (client, server) = tokio::io::duplex(self.pipe);
        let peer = SocketAddr::from(([127, 0, 0, 1], 40000 + slot as u16));
        let conn = Connection::new(self.broker.clone(), server, peer, self.shutdown.clone());
        let task = tokio::spawn(conn.run(()));
        self.slots[slot] = Some(Client {
            stream: client,
            task,
            reading: true,
            inbox: BytesMut::new(),
            connack: None,
            received: Vec::new(),
        });
        self.slots[slot].as_mut()
    }

    fn close(&mut self, slot: usize) {
        if let Some(c) = self.slots[slot].take() {
            self.closed.push(c.task);
        }
    }

    fn client(&mut self, slot: usize) -> Option<&mut Client> {
        if self.slots[slot].is_none() {
            return self.open(slot);
        }
        self.slots[slot].as_mut()
    }

    async fn send(&mut self, slot: usize, bytes: &[u8]) {
        if let Some(c) = self.client(slot) {
            // Only the bytes the pipe takes now: a broker that stopped reading must not
            // block the harness (a real client would be stuck the same way).
            let _ = tokio::time::timeout(Duration::from_millis(1), c.stream.write_all(bytes)).await;
        }
    }

    /// Lets every task run until all wait, reading what the broker wrote meanwhile.
    async fn settle(&mut self) {
        for _ in 0..64 {
            // With the clock paused, this sleep ends only once nothing else can run.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let mut got = false;
            for c in self.slots.iter_mut().flatten() {
                got |= c.drain();
            }
            if !got {
                return;
            }
        }
    }

    async fn apply(&mut self, op: &Op) {
        match op {
            Op::Connect {
                slot,
                id,
                clean,
                keep_alive,
                will,
                login,
            } => {
                let client_id = match id {
                    Id::Known(n) => IDS[usize::from(*n) % IDS.len()].to_string(),
                    Id::Empty => String::new(),
                    Id::Reserved => "$herald/x".into(),
                    Id::Any(s) => s.clone(),
                };
                self.ids.push(client_id.clone());
                let connect = Norm::Connect {
                    keep_alive: u16::from(*keep_alive),
                    client_id,
                    clean: *clean,
                    will: will
                        .as_ref()
                        .map(|(t, q, r, m)| (t.name(), m.clone(), q % 3, *r)),
                    login: login.as_ref().map(|l| match l {
                        Login::Token(n) => (
                            String::new(),
                            token(IDS[usize::from(*n) % IDS.len()]).into_bytes(),
                        ),
                        Login::Plain(u, p) => (u.clone(), p.clone().into_bytes()),
                    }),
                };
                let mut buf = BytesMut::new();
                if encode(&connect, &mut buf).is_some() && self.open(slot_of(*slot)).is_some() {
                    self.send(slot_of(*slot), &buf).await;
                }
            }
            Op::Send { slot, packet } => {
                let mut buf = BytesMut::new();
                if encode(&packet.norm(), &mut buf).is_some() {
                    self.send(slot_of(*slot), &buf).await;
                }
            }
            Op::Raw { slot, bytes } => self.send(slot_of(*slot), bytes).await,
            Op::Ack { slot, nth, kind } => {
                let Some(c) = self.slots[slot_of(*slot)].as_mut() else {
                    return;
                };
                if c.received.is_empty() {
                    return;
                }
                let (id, p) = c.received.remove(usize::from(*nth) % c.received.len());
                let ack = match (&p, kind % 2) {
                    (v4::Packet::Publish(p), 0) if p.qos as u8 == 2 => Norm::PubRec(id),
                    (v4::Packet::Publish(_), _) => Norm::PubAck(id),
                    _ => Norm::PubComp(id),
                };
                let mut buf = BytesMut::new();
                encode(&ack, &mut buf);
                self.send(slot_of(*slot), &buf).await;
            }
            Op::ToggleRead { slot } => {
                if let Some(c) = self.slots[slot_of(*slot)].as_mut() {
                    c.reading = !c.reading;
                }
            }
            Op::Close { slot } => self.close(slot_of(*slot)),
            Op::Sleep { ms } => tokio::time::sleep(Duration::from_millis(u64::from(*ms))).await,
            Op::Keepalives => self.broker.check_keepalives(),
            Op::Shutdown => {
                self.stopped = true;
                self.shutdown.cancel();
                self.broker.close_all();
            }
        }
        self.settle().await;
    }

    /// Closes every socket; each connection must then end and unregister its client.
    async fn finish(mut self) {
        for slot in 0..SLOTS {
            self.close(slot);
        }
        let tasks = std::mem::take(&mut self.closed);
        let all = async {
            for t in tasks {
                t.await.expect("connection task panicked");
            }
        };
        if tokio::time::timeout(END_WITHIN, all).await.is_err() {
            panic!("a connection task still runs {END_WITHIN:?} after its socket closed");
        }
        for id in &self.ids {
            assert!(
                !self.broker.is_connected(id),
                "client {id:?} still registered after its connection ended"
            );
        }
    }
}

fn slot_of(n: u8) -> usize {
    usize::from(n) % SLOTS
}

/// Raw mode: `bytes` on one connection, with a CONNECT in front unless they start with one,
/// next to a persistent subscriber to `#` that acknowledges what it gets. This is the mode
/// the hand-written seeds use: they are plain MQTT byte streams.
pub fn run_raw(bytes: &[u8]) {
    let setup = Setup {
        max_inflight: 3,
        max_queued: 7,
        max_mailbox: 3,
        max_messages: 63,
        drop_new: false,
        push: true,
        acl: false,
        pipe: 4096,
        write_buffer: 0,
    };
    let mut ops = vec![
        Op::Connect {
            slot: 1,
            id: Id::Known(1),
            clean: false,
            keep_alive: 0,
            will: None,
            login: None,
        },
        Op::Send {
            slot: 1,
            packet: Pkt::Subscribe {
                pkid: 0,
                filters: vec![(Filter::Pattern(0), 2)],
            },
        },
    ];
    if bytes.first() != Some(&0x10) {
        ops.push(Op::Connect {
            slot: 0,
            id: Id::Known(0),
            clean: true,
            keep_alive: 0,
            will: None,
            login: None,
        });
    }
    ops.push(Op::Raw {
        slot: 0,
        bytes: bytes.to_vec(),
    });
    for kind in 0..2 {
        for _ in 0..4 {
            ops.push(Op::Ack {
                slot: 1,
                nth: 0,
                kind,
            });
        }
    }
    run(&Input { setup, ops });
}

/// Runs one input against a fresh broker.
pub fn run(input: &Input) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let config = input.setup.config();
        let auth = auth(&config);
        let broker = Broker::open(config.clone(), Store::open(&config, None), None, auth)
            .await
            .expect("memory store opens");
        let mut h = Harness {
            broker: Arc::new(broker),
            shutdown: CancellationToken::new(),
            stopped: false,
            pipe: 64 + usize::from(input.setup.pipe % 8192),
            slots: Default::default(),
            closed: Vec::new(),
            ids: Vec::new(),
        };
        for op in input.ops.iter().take(MAX_OPS) {
            h.apply(op).await;
        }
        h.finish().await;
    });
}
