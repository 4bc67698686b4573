//! A fleet of cluster nodes that are stopped and started again while clients keep using
//! them (tests/rolling_restart.rs): one private `redis-server` and several `herald`
//! processes, each with the same node id, ports and arguments across its restarts.
//!
//! Unlike `process::Broker` (which only kills), a `Node` is stopped with SIGTERM and its exit
//! status and exit time are seen, and its readiness after a start is `GET /readyz` answering
//! 200 where the metrics listener has it, else a CONNECT answered with CONNACK 0. Clients
//! connect over plain TCP with `mqtt_connect`, which returns errors instead of panicking (a
//! node that is going away refuses, resets or never answers), whatever
//! `HERALD_TEST_TRANSPORT` says: the nodes listen on TCP only.
//!
//! When a test fails, each node's log ends are printed as the fleet goes away.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{timeout, Instant};

use super::process::{RedisServer, CLUSTER_SECRET};
use super::{ConnAck, ConnectReturnCode, Event, Opts, Packet, Raw};

/// A free loopback port below the kernel's ephemeral range, for a listener that must be
/// bound again after a restart. `process::free_port` hands out ephemeral ports: while a node
/// is down, one of the many client connections of a test may take its port as its own local
/// port, and the restart could not bind it. Ports below the range are only ever taken by an
/// explicit bind. Never the same port twice in one test binary.
pub fn stable_port() -> u16 {
    static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Above the well-known and registered ports most services use; scripts/bench-lib.sh
    // takes 20000-32000, so start lower.
    let (from, to) = (10_000u16, low.min(20_000));
    assert!(
        to > from + 1000,
        "ephemeral ports start at {low}: no room below"
    );
    let mut rng = Rng::seeded();
    let mut taken = TAKEN.lock().unwrap();
    let taken = taken.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = from + rng.below(u64::from(to - from)) as u16;
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port in {from}..{to}");
}

/// xorshift64*: reconnect jitter, random devices. Not for anything secret.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never 0 (xorshift stays at 0); spread small seeds.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Seeded from the clock and a counter.
    pub fn seeded() -> Rng {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng::new(t ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A duration in `lo..=hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros(self.below(span + 1))
    }
}

/// Opens a plain TCP connection to `addr`, sends `opts`' CONNECT and returns the client and
/// its CONNACK (whatever its code), or why not within `within`: refused, reset, closed or
/// silent.
pub async fn mqtt_connect(
    addr: SocketAddr,
    opts: &Opts,
    within: Duration,
) -> Result<(Raw, ConnAck), String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut c = Raw::over(Box::new(tcp));
        c.send_raw(&opts.encode())
            .await
            .map_err(|e| format!("send CONNECT: {e}"))?;
        match c.next(within).await {
            Event::Packet(Packet::ConnAck(a)) => Ok((c, a)),
            e => Err(format!("expected CONNACK, got {e:?}")),
        }
    };
    match timeout(within, attempt).await {
        Ok(r) => r.map_err(|e| format!("{} to {addr}: {e}", opts.id)),
        Err(_) => Err(format!(
            "{} to {addr}: no CONNACK within {within:?}",
            opts.id
        )),
    }
}

/// The status code of `GET path` on `addr`, or `None` if nothing answers within a second.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let get = super::http_raw(addr, "GET", path);
    let out = timeout(Duration::from_secs(1), get).await.ok().flatten()?;
    super::http_status_of(&out)
}

/// How a started node showed it was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// `GET /readyz` answered 200.
    Readyz,
    /// The metrics listener has no `/readyz` (404): a CONNECT was answered with CONNACK 0.
    Connack,
}

/// How a node that was sent SIGTERM ended.
#[derive(Debug)]
pub struct Exit {
    /// `None`: still running when the wait ended (it has been killed since).
    pub status: Option<ExitStatus>,
    /// From SIGTERM to the exit seen (or to the end of the wait).
    pub took: Duration,
    /// `GET /readyz` answered 503 at least once meanwhile.
    pub saw_503: bool,
}

/// One `herald` cluster node: the same node id, ports and arguments at every start; its log
/// (stderr) appended to one file across restarts.
pub struct Node {
    pub id: String,
    /// MQTT over TCP.
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub cluster: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Node {
    /// Pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Starts the process and waits (up to `within`) until it is ready; returns how.
    pub async fn start(&mut self, within: Duration) -> Ready {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the node's log");
        self.starts += 1;
        let child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(&self.args)
            .env("HERALD_CLUSTER_SECRET", CLUSTER_SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("start herald");
        self.child = Some(child);
        self.wait_ready(within).await
    }

    /// Polls `GET /readyz` until 200; where it is not served (404), a CONNECT answered with
    /// CONNACK 0 instead (the client listener opens before the node has joined its cluster,
    /// so a listening port is not enough). Panics with the log if the process exits or
    /// `within` passes.
    async fn wait_ready(&mut self, within: Duration) -> Ready {
        let deadline = Instant::now() + within;
        let probe = Opts::new(&format!("rr-ready-{}-{}", self.id, self.starts));
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "node {} exited while starting: {status}\n{}",
                    self.id,
                    self.log_tail(50)
                );
            }
            match http_status(self.metrics, "/readyz").await {
                Some(200) => return Ready::Readyz,
                Some(404) => {
                    if let Ok((mut c, ack)) =
                        mqtt_connect(self.addr, &probe, Duration::from_secs(1)).await
                    {
                        if ack.code == ConnectReturnCode::Success {
                            let _ = c.send_raw(&[0xE0, 0]).await;
                            return Ready::Connack;
                        }
                    }
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "node {} not ready {within:?} after its start\n{}",
                self.id,
                self.log_tail(50)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM to this node's process (a graceful stop; a drain where there is one).
    pub fn sigterm(&self) {
        let pid = self.pid().expect("node running") as libc::pid_t;
        // SAFETY: kill(2) on the pid of a child this node started and has not reaped.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill -TERM {pid}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `within` for the process to exit after `sigterm`, watching `/readyz`
    /// meanwhile. Kills it if it is still running then.
    pub async fn wait_exit(&mut self, within: Duration) -> Exit {
        let started = Instant::now();
        let mut saw_503 = false;
        let mut child = self.child.take().expect("node running");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Exit {
                    status: Some(status),
                    took: started.elapsed(),
                    saw_503,
                };
            }
            if started.elapsed() >= within {
                let _ = child.kill().await;
                return Exit {
                    status: None,
                    took: started.elapsed(),
                    saw_503,
                };
            }
            // Bounded by the process's exit: the wait is an event, the poll only watches.
            tokio::select! {
                _ = child.wait() => {}
                s = http_status(self.metrics, "/readyz") => {
                    saw_503 |= s == Some(503);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// The last `n` lines of the node's log (all its starts).
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "===== node {} ({}), last {} of {} log lines:\n{}\n===== end of node {}",
            self.id,
            self.addr,
            lines.len() - from,
            lines.len(),
            lines[from..].join("\n"),
            self.id
        )
    }

    /// Log lines at WARN or ERROR so far, but for the one every start without
    /// authentication logs.
    pub fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .filter(|l| !l.contains("no authentication configured"))
            .map(String::from)
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(200));
        }
    }
}

/// Cluster nodes over one private Redis, in a temp dir of their own (configs, logs).
pub struct Fleet {
    // Declared first: the nodes go before the Redis they use.
    pub nodes: Vec<Node>,
    pub redis: RedisServer,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// A private redis-server (AOF, fsync every second) and one node per id, each with
    /// `config` as its config file, clustered (`--cluster-listen`) on the Redis store, all
    /// started and ready.
    pub async fn start(ids: &[&str], config: &str) -> Fleet {
        let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for id in ids {
            let config_path = dir.path().join(format!("{id}.toml"));
            std::fs::write(&config_path, config).expect("write the node's config");
            let addr = SocketAddr::from(([127, 0, 0, 1], stable_port()));
            let metrics = SocketAddr::from(([127, 0, 0, 1], stable_port()));
            let cluster = SocketAddr::from(([127, 0, 0, 1], stable_port()));
            let args = vec![
                "--config".into(),
                config_path.display().to_string(),
                "--node-id".into(),
                id.to_string(),
                "--listen".into(),
                addr.to_string(),
                "--metrics-listen".into(),
                metrics.to_string(),
                "--cluster-listen".into(),
                cluster.to_string(),
                "--store".into(),
                "redis".into(),
                "--redis-url".into(),
                redis.url(),
                "--log-level".into(),
                std::env::var("HERALD_CLUSTER_LOG").unwrap_or_else(|_| "info".into()),
            ];
            nodes.push(Node {
                id: id.to_string(),
                addr,
                metrics,
                cluster,
                args,
                log: dir.path().join(format!("{id}.log")),
                child: None,
                starts: 0,
            });
        }
        let mut fleet = Fleet {
            nodes,
            redis,
            _dir: dir,
        };
        for n in &mut fleet.nodes {
            n.start(Duration::from_secs(20)).await;
        }
        fleet
    }

    /// The nodes' MQTT addresses, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }
}
