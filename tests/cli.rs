//! The `herald` binary: flags, config errors, signals.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_herald");

#[test]
fn help_explains_config_and_listen() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--config"), "{help}");
    assert!(help.contains("--listen"), "{help}");
}

fn run_with_config(text: &str) -> (std::process::Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken-herald.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .output()
        .unwrap();
    (out, path.display().to_string())
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
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/herald.toml"])
        .output()
        .unwrap();
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
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if line.contains("herald started") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("herald started log line");
    let addr = line
        .split("\"listen\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listen address in {line}"));
    (running, addr)
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
    // The binary installs its SIGTERM handler only after it logs "herald started" (see
    // sigterm_right_after_startup_exits_zero); give it that moment so this test is about
    // shutdown itself.
    tokio::time::sleep(Duration::from_millis(300)).await;

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
