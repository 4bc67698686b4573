//! The `herald` binary: flags, config errors, signals, the log rate limit.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::process::run_briefly;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_herald");

#[test]
fn help_explains_config_and_listen() {
    let out = run_briefly(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--config"), "{help}");
    assert!(help.contains("--listen"), "{help}");
}

fn run_with_config(text: &str) -> (std::process::Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken-herald.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    let out = run_briefly(&["--config", path.as_str(), "--listen", "127.0.0.1:0"]);
    (out, path)
}

#[test]
fn unknown_config_key_fails_with_file_key_and_reason() {
    let (out, path) = run_with_config("[server]\nlisten = \"127.0.0.1:0\"\nmax_conections = 5\n");
    assert!(!out.status.success(), "must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&path), "names the file: {err}");
    assert!(err.contains("max_conections"), "names the key: {err}");
    assert!(err.contains("unknown field"), "gives the reason: {err}");
}

#[test]
fn bad_config_value_fails_with_file_key_and_reason() {
    let (out, path) = run_with_config("[session]\nmax_inflight = 0\n");
    assert!(!out.status.success(), "must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&path), "names the file: {err}");
    assert!(err.contains("session.max_inflight"), "names the key: {err}");
    assert!(err.contains("out of range"), "gives the reason: {err}");

    let (out, _) = run_with_config("[server]\nconnect_timeout = \"soon\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.connect_timeout"),
        "names the key: {err}"
    );
}

#[test]
fn missing_config_file_fails() {
    let out = run_briefly(&["--config", "/nonexistent/herald.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/herald.toml"));
}

/// Kills the broker if a test panics before it exits by itself.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on an ephemeral port and reads the port from its startup log line.
fn spawn_broker() -> (Running, SocketAddr) {
    let b = spawn_broker_with(&[]);
    (b.running, b.addr)
}

/// A broker started by `spawn_broker_with`.
struct Spawned {
    running: Running,
    addr: SocketAddr,
    /// The "herald started" line (JSON).
    started: String,
    /// Every log line so far; complete once `reader` has finished (the process exited).
    log: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
}

/// `spawn_broker` with `extra` flags, keeping the whole log (JSON lines).
fn spawn_broker_with(extra: &[&str]) -> Spawned {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let kept = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if line.contains("herald started") {
                let _ = tx.send(line.clone());
            }
            kept.lock().unwrap().push(line);
        }
    });
    let started = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("herald started log line");
    let addr = started_field(&started, "listen")
        .unwrap_or_else(|| panic!("no listen address in {started}"));
    Spawned {
        running,
        addr,
        started,
        log,
        reader,
    }
}

/// An address field of the "herald started" line.
fn started_field(line: &str, name: &str) -> Option<SocketAddr> {
    line.split(&format!("\"{name}\":\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|a| a.parse().ok())
}

fn sigterm(broker: &Running) {
    let killed = Command::new("kill")
        .args(["-TERM", &broker.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

/// Polls for the exit; panics if the broker is still running after `limit`.
async fn wait_exit(broker: &mut Running, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = broker.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            started.elapsed() < limit,
            "still running {limit:?} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_exits_zero_within_three_seconds() {
    let (mut broker, addr) = spawn_broker();
    let mut client = Raw::connect(addr, "sig").await;
    client.ping().await;
    // No pause needed: the binary watches for SIGTERM before its listeners open (see
    // sigterm_right_after_startup_exits_zero).
    sigterm(&broker);
    let status = wait_exit(&mut broker, Duration::from_secs(3)).await;
    assert!(status.success(), "exit status {status}");
    // Connections are closed, not left hanging.
    client.expect_closed(WAIT).await;
}

#[tokio::test]
async fn sigterm_right_after_startup_exits_zero() {
    for _ in 0..5 {
        let (mut broker, _) = spawn_broker();
        sigterm(&broker);
        let status = wait_exit(&mut broker, Duration::from_secs(3)).await;
        assert!(status.success(), "exit status {status}");
    }
}

#[tokio::test]
async fn malformed_floods_are_rate_limited_in_the_log_and_counted_in_full() {
    const N: usize = 200;
    let mut b = spawn_broker_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = started_field(&b.started, "metrics").expect("metrics address");
    let started = Instant::now();
    for i in 0..N {
        let mut c = Raw::open(b.addr).await;
        // Both places a malformed packet is caught: as the first packet, and in a session.
        if i % 2 == 1 {
            c.send_raw(&Opts::new(&format!("bad{i}")).encode())
                .await
                .unwrap();
        }
        let _ = c.send_raw(&[0xF0, 0x00]).await;
        loop {
            match c.next(WAIT).await {
                Event::Closed => break,
                Event::Packet(Packet::ConnAck(_)) if i % 2 == 1 => {}
                e => panic!("connection {i}: expected the close, got {e:?}"),
            }
        }
    }
    let took = started.elapsed();

    // This process's own broker: the counts are exact.
    let exposition = scrape(metrics).await;
    assert_eq!(
        metric_in(&exposition, "herald_malformed_packets_total"),
        N as f64,
        "{exposition}"
    );
    let suppressed_metric = metric_in(
        &exposition,
        "herald_log_lines_suppressed_total{reason=\"malformed\"}",
    );

    // The summary still owed is written at shutdown.
    sigterm(&b.running);
    let status = wait_exit(&mut b.running, Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}");
    b.reader.join().unwrap();
    let log = b.log.lock().unwrap();

    let lines: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("bad first packet") || l.contains("closing connection"))
        .collect();
    let summaries: Vec<u64> = log
        .iter()
        .filter(|l| l.contains("malformed-packet lines suppressed"))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON log line");
            v["fields"]["suppressed"]
                .as_u64()
                .expect("suppressed field")
        })
        .collect();
    let all = log.join("\n");
    // 5 lines per 10 s window: one window, or two on a machine slow enough to take more than
    // 10 s for the 200 connections.
    assert!(
        lines.len() <= 10,
        "{} malformed lines in {took:?}:\n{all}",
        lines.len()
    );
    assert!(!summaries.is_empty(), "no summary line:\n{all}");
    if took < Duration::from_secs(9) {
        assert_eq!(lines.len(), 5, "{all}");
        assert_eq!(summaries.len(), 1, "{all}");
    }
    let suppressed: u64 = summaries.iter().sum();
    assert_eq!(lines.len() as u64 + suppressed, N as u64, "{all}");
    assert_eq!(suppressed_metric, suppressed as f64, "{exposition}");
    // The structured fields stay on the lines that are written.
    assert!(lines.iter().all(|l| l.contains("\"error\":")), "{all}");
}
