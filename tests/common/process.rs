//! Real processes for the tests: a private `redis-server` (free loopback port, temp dir, AOF
//! with fsync on every write), Redis Sentinel and the `herald` binary, each killed on drop.
//! Used by tests/redis_durability.rs, tests/cluster.rs, and by `start_with` under
//! `HERALD_TEST_STORE=redis`.

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
}

impl Drop for Herald {
    fn drop(&mut self) {
        self.kill();
    }
}
