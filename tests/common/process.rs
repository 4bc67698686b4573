//! Real processes for the tests: a private `redis-server` (free loopback port, temp dir, AOF
//! with fsync on every write), Redis Sentinel and the `herald` binary, each killed on drop;
//! `Broker`, a `herald` process of one test's own with a metrics listener (the place for any
//! test that checks a counter); and reads of Herald's state in a Redis (key names from
//! `keys`). Used by the tests that run processes, and by `start_with` under
//! `HERALD_TEST_STORE=redis`.

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald::config::StoreKind;

use super::{
    keys, metric_in, pki, scrape, scrape_blocking, test_store, test_transport, ConnectReturnCode,
    Opts, Raw, Transport, WAIT,
};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until something accepts TCP connections on `addr`.
fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str) {
    if let Err(e) = try_wait_listening(addr, child, what) {
        panic!("{e}");
    }
}

/// `wait_listening` that returns what went wrong instead of panicking.
fn try_wait_listening(addr: SocketAddr, child: &mut Child, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited before listening on {addr}: {status}"
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("{what} not listening on {addr}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits until the redis-server `child` answers on `port`. Accepting TCP is not enough:
/// redis-server listens before it has created its AOF files (with fsync, slow on a busy disk),
/// and another process may have taken the port, in which case `child` exits: `Err`.
fn wait_redis_ready(port: u16, child: &mut Child) -> Result<(), std::process::ExitStatus> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(status);
        }
        // Answered by `child` itself, not by whoever else listens on the port.
        if redis_pid(addr) == Some(child.id()) {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "redis-server (pid {}) does not answer on {addr}",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `process_id` from `INFO server` of the Redis on `addr`, if it answers.
fn redis_pid(addr: SocketAddr) -> Option<u32> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"INFO server\r\n").ok()?;
    let mut r = BufReader::new(s);
    let mut header = String::new();
    r.read_line(&mut header).ok()?;
    // "$<length>\r\n", then the text; anything else ("-LOADING ...") means not ready.
    let len: usize = header.strip_prefix('$')?.trim_end().parse().ok()?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        let mut r = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        // Another process may take the free port before redis-server binds it: try another.
        for _ in 0..3 {
            match r.spawn() {
                Ok(()) => return r,
                Err(_) => r.port = free_port(),
            }
        }
        r.restart();
        r
    }

    /// A replica of the server on `master_port`.
    pub fn start_replica_of(master_port: u16) -> RedisServer {
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port.to_string()])
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Pid of the running redis-server (to stop and continue it: a hung Redis).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("redis-server running")
    }

    /// A connection to this Redis (to read what Herald stored).
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test's redis-server")
    }

    /// Starts (again) on the same port and directory, so the AOF is replayed.
    pub fn restart(&mut self) {
        if let Err(status) = self.spawn() {
            panic!(
                "redis-server exited before listening on {}: {status}",
                self.port
            );
        }
    }

    fn spawn(&mut self) -> Result<(), std::process::ExitStatus> {
        assert!(self.child.is_none(), "redis-server already running");
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found on PATH: apt-get install redis-server (or make test)");
        wait_redis_ready(self.port, &mut child)?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: what Redis keeps is what the AOF had.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One Redis Sentinel watching the master on `master_port` as service `name`, quorum 1,
/// with short timeouts so that a failover takes about a second.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    pub fn start(master_port: u16, name: &str) -> Sentinel {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {name} 300\n\
                 sentinel failover-timeout {name} 2000\n",
                dir.path().display()
            ),
        )
        .expect("write sentinel.conf");
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found on PATH: apt-get install redis-server (or make test)");
        wait_listening(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &mut child,
            "redis sentinel",
        );
        Sentinel {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Herald {
    child: Option<Child>,
    /// The herald binary, or a shell that execs it.
    program: PathBuf,
    pub addr: SocketAddr,
    args: Vec<String>,
    /// Where stderr (the log) goes, appended to across restarts; inherited when `None`.
    log: Option<PathBuf>,
}

/// The `cluster.secret` of every node the tests start.
pub const CLUSTER_SECRET: &str = "test-cluster-secret-0123456789";

impl Herald {
    /// The herald binary with `--store redis`, on a free port.
    pub fn start(redis_url: &str, extra: &[&str]) -> Herald {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut args: Vec<String> = vec![
            "--listen".into(),
            addr.to_string(),
            "--store".into(),
            "redis".into(),
            "--redis-url".into(),
            redis_url.into(),
            "--log-level".into(),
            "warn".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut h = Herald {
            child: None,
            program: Self::binary(),
            addr,
            args,
            log: None,
        };
        h.restart();
        h
    }

    /// The herald binary with exactly `args` (which must make it listen on `addr`; nothing
    /// is added), its stderr appended to `log`. `restart` reuses the same arguments.
    pub fn start_args(addr: SocketAddr, args: Vec<String>, log: &Path) -> Herald {
        Herald::start_program(Self::binary(), addr, args, log)
    }

    /// `start_args` through another program that ends up exec'ing herald (a shell that
    /// sets a limit first): the pid is herald's once it has exec'ed.
    pub fn start_program(
        program: PathBuf,
        addr: SocketAddr,
        args: Vec<String>,
        log: &Path,
    ) -> Herald {
        let mut h = Herald {
            child: None,
            program,
            addr,
            args,
            log: Some(log.to_path_buf()),
        };
        h.restart();
        h
    }

    /// The log file given to `start_args`, if any.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn binary() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_herald"))
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "herald already running");
        let stderr = match &self.log {
            Some(path) => Stdio::from(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open herald log file"),
            ),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(&self.program)
            .args(&self.args)
            // Clustering needs a secret; nodes of one test share this one.
            .env("HERALD_CLUSTER_SECRET", CLUSTER_SECRET)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start herald");
        if let Err(e) = try_wait_listening(self.addr, &mut child, "herald") {
            let _ = child.kill();
            let _ = child.wait();
            let log = match &self.log {
                Some(p) => std::fs::read_to_string(p).unwrap_or_default(),
                None => String::new(),
            };
            panic!("{e}\nherald {:?}\n{log}", self.args);
        }
        self.child = Some(child);
    }

    /// kill -9: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `within` for the process to exit by itself; its status, or `None` (it is
    /// then still running).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// Herald's state in Redis

/// How many messages `client`'s outbox holds in Redis.
pub async fn outbox_len_in(conn: &mut redis::aio::MultiplexedConnection, client: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(keys::outbox(client))
        .query_async(conn)
        .await
        .expect("XLEN outbox")
}

/// The node `client`'s route names in Redis, if it has one.
pub async fn route_node(
    conn: &mut redis::aio::MultiplexedConnection,
    client: &str,
) -> Option<String> {
    redis::cmd("HGET")
        .arg(keys::route(client))
        .arg("node")
        .query_async(conn)
        .await
        .expect("HGET route")
}

/// `client`'s sent watermark in Redis, once written.
pub async fn sent_watermark(
    conn: &mut redis::aio::MultiplexedConnection,
    client: &str,
) -> Option<u64> {
    redis::cmd("GET")
        .arg(keys::sent(client))
        .query_async(conn)
        .await
        .expect("GET sent")
}

// ---------------------------------------------------------------------------------------
// The binary run briefly

/// Runs the herald binary with `args` to its exit (a command that must not start a broker:
/// a bad config, `--help`); kills it and fails if it is still running after 10 s.
pub fn run_briefly<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    let mut child = Command::new(Herald::binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run herald");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait for herald").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("herald output");
            panic!(
                "herald {:?} still running after 10 s: {}",
                args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("herald output")
}

// ---------------------------------------------------------------------------------------
// A broker of the test's own

/// How long `Broker::wait_metric` waits. Only reached on failure; long because the tests
/// that attack a broker (tests/budgets.rs) wait for counters of work that takes a while.
const METRIC_WAIT: Duration = Duration::from_secs(20);

/// How to start a `Broker`. `Launch::default()`: a temp dir of its own, the store and
/// transport under test.
#[derive(Default)]
pub struct Launch {
    /// Names the log and config files and the failure report ("herald" by default).
    pub name: Option<String>,
    /// More flags for the binary.
    pub args: Vec<String>,
    /// This Redis (one the test shares between brokers: a cluster) instead of the store
    /// under test.
    pub redis_url: Option<String>,
    /// The log filter (`info` by default).
    pub log_level: Option<String>,
    /// Runs the binary under `sh -c "ulimit -n N && exec herald ..."`.
    pub nofile: Option<u32>,
    /// Where the config and log files go (a temp dir of the broker's own by default).
    pub dir: Option<PathBuf>,
}

/// A `herald` process of one test's own, with a metrics listener.
///
/// Every in-process broker of a test binary (`start_with`) counts into the one metrics
/// recorder of that process, while the binary's other tests run in parallel: a counter
/// there that went up proves nothing about a given test. A test that checks a counter runs
/// its broker as a process of its own instead, where every count is its own and exact.
///
/// Like `start_with` it uses the store and transport under test (`HERALD_TEST_STORE`, with
/// a private `redis-server`; `HERALD_TEST_TRANSPORT`, TLS only with the `pki` server
/// certificate), unless `Launch` says otherwise. It is ready when it has answered a CONNECT
/// (`ready-probe-<name>-<pid>`, clean session, counted in `herald_connections_total`) and no
/// connection is open any more. (Under TLS the bare socket `Herald` opens to see it listen
/// also counts, as one `herald_connections_rejected_total{reason="handshake"}`.) When a test fails, the end of its log and its non-zero
/// series are printed as it goes away.
pub struct Broker {
    herald: Herald,
    metrics: SocketAddr,
    name: String,
    log: PathBuf,
    // Declared after `herald`: gone only once the process is.
    redis: Option<RedisServer>,
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// A broker with `toml` as its config file (may be empty), the store and transport under
    /// test.
    pub async fn start(toml: &str) -> Broker {
        Broker::launch(toml, Launch::default()).await
    }

    pub async fn launch(toml: &str, how: Launch) -> Broker {
        let own_dir = match &how.dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().expect("temp dir")),
        };
        let dir = match (&how.dir, &own_dir) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => d.path().to_path_buf(),
            (None, None) => unreachable!(),
        };
        let name = how.name.unwrap_or_else(|| "herald".into());
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).expect("write the broker's config");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        // Two free ports asked for one after the other can be the same one.
        let metrics = loop {
            let p = free_port();
            if p != addr.port() {
                break SocketAddr::from(([127, 0, 0, 1], p));
            }
        };
        let mut args: Vec<String> = vec![
            "--config".into(),
            config.display().to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
            "--log-level".into(),
            how.log_level.unwrap_or_else(|| "info".into()),
        ];
        match test_transport() {
            Transport::Tcp => args.extend(["--listen".into(), addr.to_string()]),
            Transport::Tls => {
                let server = pki::Pki::get().server();
                args.extend([
                    "--listen".into(),
                    String::new(),
                    "--tls-listen".into(),
                    addr.to_string(),
                    "--tls-cert".into(),
                    server.cert.display().to_string(),
                    "--tls-key".into(),
                    server.key.display().to_string(),
                ]);
            }
        }
        let mut redis = None;
        let redis_url = match how.redis_url {
            Some(url) => Some(url),
            None if test_store() == StoreKind::Redis => {
                // fsync once a second, as for `start_with`'s Redis.
                let r = RedisServer::start_with(&["--appendfsync", "everysec"]);
                let url = r.url();
                redis = Some(r);
                Some(url)
            }
            None => None,
        };
        if let Some(url) = redis_url {
            args.extend(["--store".into(), "redis".into(), "--redis-url".into(), url]);
        }
        args.extend(how.args);
        let log = dir.join(format!("{name}.log"));
        let herald = match how.nofile {
            None => Herald::start_args(addr, args, &log),
            Some(n) => {
                let mut shell = format!("ulimit -n {n} && exec '{}'", Herald::binary().display());
                for a in &args {
                    shell.push_str(&format!(" '{a}'"));
                }
                Herald::start_program(
                    PathBuf::from("/bin/sh"),
                    addr,
                    vec!["-c".into(), shell],
                    &log,
                )
            }
        };
        let broker = Broker {
            herald,
            metrics,
            name,
            log,
            redis,
            _dir: own_dir,
        };
        broker.wait_ready().await;
        broker
    }

    /// Listening is not enough (the client listener opens before the broker has opened its
    /// store and joined its cluster): a CONNECT answered means it is serving.
    async fn wait_ready(&self) {
        let probe = format!("ready-probe-{}-{}", self.name, self.pid());
        let (c, ack) = Raw::connect_with(self.addr(), &Opts::new(&probe)).await;
        if ack.code == ConnectReturnCode::Success {
            c.disconnect().await;
        }
        // The probes (this one and `Herald`'s, which only opened a socket) have ended.
        self.wait_connections(0).await;
    }

    /// The MQTT address (TCP, or TLS under `HERALD_TEST_TRANSPORT=tls`).
    pub fn addr(&self) -> SocketAddr {
        self.herald.addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    pub fn pid(&self) -> u32 {
        self.herald.pid().expect("herald running")
    }

    pub fn is_running(&self) -> bool {
        self.herald.pid().is_some()
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The broker's private Redis, under `HERALD_TEST_STORE=redis`.
    pub fn redis(&self) -> Option<&RedisServer> {
        self.redis.as_ref()
    }

    /// kill -9: no shutdown path runs.
    pub fn kill(&mut self) {
        self.herald.kill();
    }

    /// Waits up to `within` for the process to exit by itself (after a SIGTERM or a
    /// drain); its status, or `None` if it is still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::task::block_in_place(|| self.herald.wait_exit(within))
    }

    /// Starts again with the same arguments (same ports, same node id), and waits until it
    /// serves. Its counters start again from 0.
    pub async fn restart(&mut self) {
        self.herald.restart();
        self.wait_ready().await;
    }

    /// The value of one series now, e.g. `herald_malformed_packets_total` or
    /// `herald_messages_dropped_total{reason="expired"}` (0 if it is not listed).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_in(&scrape(self.metrics).await, series)
    }

    /// Waits until `series` is at least `at_least` (counters are updated around the
    /// events a test sees, not always before them); returns its value then.
    pub async fn wait_metric(&self, series: &str, at_least: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + METRIC_WAIT;
        loop {
            let v = self.metric(series).await;
            if v >= at_least {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} = {v} on {}, waited {METRIC_WAIT:?} for {at_least}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts that `series` comes to exactly `value` (waiting for it as `wait_metric`
    /// does): this broker counted what the test did, once each.
    pub async fn assert_metric(&self, series: &str, value: f64) {
        let v = self.wait_metric(series, value).await;
        assert_eq!(v, value, "{series} on {}", self.name);
    }

    /// Waits until exactly `n` client connections are open: those that ended have finished
    /// their cleanup (will published, session saved; the process-level `wait_offline`).
    pub async fn wait_connections(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT * 5;
        loop {
            let open = self.metric("herald_connections_active").await;
            if open == n as f64 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{open} connections open on {}, waited for {n}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(200);
        eprintln!(
            "===== {} ({}), last {} of {} log lines:\n{}\n===== end of {}",
            self.name,
            self.addr(),
            lines.len() - from,
            lines.len(),
            lines[from..].join("\n"),
            self.name
        );
        if self.is_running() {
            let exposition = scrape_blocking(self.metrics);
            let nonzero: Vec<&str> = exposition
                .lines()
                .filter(|l| l.starts_with("herald_"))
                .filter(|l| {
                    l.rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v != 0.0)
                })
                .collect();
            eprintln!(
                "===== {} non-zero metrics:\n{}",
                self.name,
                nonzero.join("\n")
            );
        }
    }
}
