//! Security end to end (README, "Security"): password-file users, device tokens (HS256 and
//! ES256), the ACL file, the default device/backend split without one, takeover protection,
//! Herald's reserved names, the failed-login limiter, secrets kept out of logs, and the
//! cluster port's secret.
//!
//! Each test starts its own broker (in-process with `common::start_with`, or the real
//! `herald` binary where the test is about the process: its log, its exit, its cluster port)
//! and talks to it with the raw client over loopback (TLS under `HERALD_TEST_TRANSPORT=tls`,
//! as the harness does). What is asserted is what a client sees: CONNACK and SUBACK codes,
//! messages delivered or not (proved with a marker published after them), outbox lengths.
//!
//! Password files written by `password::update_file` and `herald passwd` carry real argon2id
//! hashes, about a second each to verify in a debug build: logins wait `LOGIN_WAIT` for
//! their CONNACK. Tests whose subject is not the password file itself write hashes with
//! argon2's cheapest parameters (`cheap_passwd`), which Herald verifies the same way.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{free_port, Herald, RedisServer, CLUSTER_SECRET};
use common::SubscribeReasonCode as Sub;
use common::{cheap_passwd, outbox_len, text, wait_offline, Event, Opts, Packet, QoS, Raw};
use herald::config::Secret;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// How long a login waits for its CONNACK: argon2 verification is slow in debug builds, and
/// one server verifies one password at a time on a 2-core machine.
const LOGIN_WAIT: Duration = Duration::from_secs(30);

/// The HS256 key of the device tokens (at least 32 bytes, as config validation requires).
const HS256_KEY: &str = "herald-security-tests-hs256-key-0123456789";

const GRANTED1: Sub = Sub::Success(QoS::AtLeastOnce);
const GRANTED0: Sub = Sub::Success(QoS::AtMostOnce);
const REFUSED: Sub = Sub::Failure;

// ---------------------------------------------------------------------------------------
// Helpers

/// A login attempt: user name, password, the CONNACK code it must get.
type Attempt<'a> = (Option<&'a str>, Option<&'a [u8]>, u8);

/// Connects to the broker at `addr` (over the transport under test) with these credentials;
/// returns the client and the CONNACK return code.
async fn login(addr: SocketAddr, o: &Opts, user: Option<&str>, pass: Option<&[u8]>) -> (Raw, u8) {
    let c = Raw::open(addr).await;
    login_over(c, o, user, pass).await
}

/// `login` over a client whose stream is already open (the cluster port, plain TCP).
async fn login_over(mut c: Raw, o: &Opts, user: Option<&str>, pass: Option<&[u8]>) -> (Raw, u8) {
    c.send_raw(&o.encode_with(user, pass))
        .await
        .expect("send CONNECT");
    match c.next(LOGIN_WAIT).await {
        Event::Packet(Packet::ConnAck(a)) => (c, a.code as u8),
        e => panic!("{}: expected CONNACK, got {e:?}", o.id),
    }
}

/// The CONNACK code for a clean-session client `id` with these credentials. A refused
/// client's connection must be closed by the broker after its CONNACK.
async fn code(addr: SocketAddr, id: &str, user: Option<&str>, pass: Option<&[u8]>) -> u8 {
    let (mut c, code) = login(addr, &Opts::new(id), user, pass).await;
    if code != 0 {
        c.expect_closed(common::WAIT).await;
    }
    code
}

/// A connected client; panics unless CONNACK is 0.
async fn login_ok(addr: SocketAddr, o: &Opts, user: Option<&str>, pass: Option<&[u8]>) -> Raw {
    let (c, code) = login(addr, o, user, pass).await;
    assert_eq!(code, 0, "CONNACK for {}", o.id);
    c
}

/// A device's connection: its client id and a token for it as the password.
async fn device(addr: SocketAddr, id: &str) -> Raw {
    let t = hs256_token(id, now() + 600);
    login_ok(addr, &Opts::new(id), Some("device"), Some(t.as_bytes())).await
}

/// A backend's connection with the password `pw` of user `backend`.
async fn backend(addr: SocketAddr, id: &str) -> Raw {
    login_ok(addr, &Opts::new(id), Some("backend"), Some(b"pw")).await
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs256_token_with(key: &[u8], sub: &str, exp: u64) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({ "sub": sub, "exp": exp }),
        &EncodingKey::from_secret(key),
    )
    .expect("encode token")
}

fn hs256_token(sub: &str, exp: u64) -> String {
    hs256_token_with(HS256_KEY.as_bytes(), sub, exp)
}

/// base64url without padding, by hand: the `alg: none` token must not come from the library
/// under test.
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The payloads of `ps`, as text.
fn payloads(ps: &[common::Publish]) -> Vec<String> {
    ps.iter().map(text).collect()
}

// ---------------------------------------------------------------------------------------
// Password file

#[tokio::test]
async fn password_file_users() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    herald::auth::password::update_file(&passwd, "backend", Some("s3cret")).unwrap();
    let server = common::start_with(|c| c.auth.password_file = Some(passwd.clone())).await;
    let addr = server.local_addr();
    let ok = code(addr, "backend-1", Some("backend"), Some(b"s3cret")).await;
    assert_eq!(ok, 0, "right password");
    let wrong = code(addr, "backend-2", Some("backend"), Some(b"s3cret!")).await;
    assert_eq!(wrong, 4, "wrong password");
    let unknown = code(addr, "nobody", Some("nobody"), Some(b"s3cret")).await;
    assert_eq!(unknown, 4, "unknown user");
    // A backend's client ids start with its user name (then a separator, or nothing).
    let other = code(addr, "other-1", Some("backend"), Some(b"s3cret")).await;
    assert_eq!(other, 5, "client id of another name");
    let glued = code(addr, "backendx", Some("backend"), Some(b"s3cret")).await;
    assert_eq!(glued, 5, "user name as a bare prefix");
    // A user name without a password.
    let bare = code(addr, "backend-3", Some("backend"), None).await;
    assert_eq!(bare, 4, "no password");
}

/// `herald passwd FILE USER` with the password on stdin makes an entry Herald accepts;
/// `herald passwd -D FILE USER` removes it (effective at the next reload, as on SIGHUP).
#[tokio::test]
async fn herald_passwd_command_adds_and_removes_users() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(Herald::binary())
            .arg("passwd")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run herald passwd");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "herald passwd {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let file = passwd.to_str().unwrap();
    run(&[file, "ops"], "pw-from-stdin\n");
    run(&[file, "backend"], "another-pw\n");
    let text = std::fs::read_to_string(&passwd).unwrap();
    assert!(text.contains("ops:$argon2id$"), "{text}");
    assert!(!text.contains("pw-from-stdin"), "{text}");

    let server = common::start_with(|c| c.auth.password_file = Some(passwd.clone())).await;
    let addr = server.local_addr();
    assert_eq!(
        code(addr, "ops", Some("ops"), Some(b"pw-from-stdin")).await,
        0
    );
    assert_eq!(
        code(addr, "ops-2", Some("ops"), Some(b"pw-from-stdi")).await,
        4
    );

    run(&["-D", file, "ops"], "");
    let text = std::fs::read_to_string(&passwd).unwrap();
    assert!(!text.contains("ops:"), "{text}");
    assert!(text.contains("backend:$argon2id$"), "{text}");
    server.reload();
    assert_eq!(
        code(addr, "ops", Some("ops"), Some(b"pw-from-stdin")).await,
        4
    );
    assert_eq!(
        code(addr, "backend", Some("backend"), Some(b"another-pw")).await,
        0
    );
}

#[tokio::test]
async fn anonymous_refused_once_a_password_file_is_set_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw")]);
    let server = common::start_with(|c| c.auth.password_file = Some(passwd.clone())).await;
    assert_eq!(code(server.local_addr(), "anon", None, None).await, 5);

    let open = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.allow_anonymous = Some(true);
    })
    .await;
    let addr = open.local_addr();
    let mut anon = login_ok(addr, &Opts::new("anon"), None, None).await;
    anon.ping().await;
    // Credentials, when given, are still checked.
    assert_eq!(
        code(addr, "backend-1", Some("backend"), Some(b"nope")).await,
        4
    );
    assert_eq!(
        code(addr, "backend-1", Some("backend"), Some(b"pw")).await,
        0
    );
}

// ---------------------------------------------------------------------------------------
// Device tokens

#[tokio::test]
async fn jwt_hs256_tokens() {
    let server = common::start_with(|c| {
        c.auth.jwt_hs256_secret = Some(Secret::new(HS256_KEY));
        c.auth.max_failures = 1000;
    })
    .await;
    let addr = server.local_addr();
    let dev = |sub: &str, exp: u64| hs256_token(sub, exp);

    let valid = dev("dev1", now() + 600);
    assert_eq!(
        code(addr, "dev1", Some("device"), Some(valid.as_bytes())).await,
        0
    );
    // The user name is free.
    assert_eq!(
        code(addr, "dev1", Some("x"), Some(valid.as_bytes())).await,
        0
    );

    let expired = dev("dev2", now() - 3600);
    assert_eq!(
        code(addr, "dev2", Some("device"), Some(expired.as_bytes())).await,
        5
    );

    // A valid token of another device.
    let theirs = dev("dev3", now() + 600);
    assert_eq!(
        code(addr, "dev4", Some("device"), Some(theirs.as_bytes())).await,
        5
    );

    let forged = hs256_token_with(b"not-the-key-not-the-key-not-the-key!", "dev5", now() + 600);
    assert_eq!(
        code(addr, "dev5", Some("device"), Some(forged.as_bytes())).await,
        4
    );

    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(format!(r#"{{"sub":"dev6","exp":{}}}"#, now() + 600).as_bytes())
    );
    assert_eq!(
        code(addr, "dev6", Some("device"), Some(none.as_bytes())).await,
        4
    );

    for garbage in [
        &b"garbage"[..],
        b"a.b.c",
        b"\xff\xfe\x00.\x01.",
        b"eyJ.eyJ.sig",
    ] {
        assert_eq!(
            code(addr, "dev7", Some("device"), Some(garbage)).await,
            4,
            "{garbage:?}"
        );
    }

    // The algorithm is pinned: HS384 with the right key is refused.
    let hs384 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS384),
        &serde_json::json!({ "sub": "dev8", "exp": now() + 600 }),
        &EncodingKey::from_secret(HS256_KEY.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        code(addr, "dev8", Some("device"), Some(hs384.as_bytes())).await,
        4
    );
    // exp and sub are required.
    let claims = |c: serde_json::Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(HS256_KEY.as_bytes()),
        )
        .unwrap()
    };
    let no_exp = claims(serde_json::json!({ "sub": "dev9" }));
    assert_eq!(
        code(addr, "dev9", Some("device"), Some(no_exp.as_bytes())).await,
        4
    );
    let no_sub = claims(serde_json::json!({ "exp": now() + 600 }));
    assert_eq!(
        code(addr, "dev9", Some("device"), Some(no_sub.as_bytes())).await,
        4
    );
    // Not valid yet.
    let early =
        claims(serde_json::json!({ "sub": "dev9", "exp": now() + 7200, "nbf": now() + 3600 }));
    assert_ne!(
        code(addr, "dev9", Some("device"), Some(early.as_bytes())).await,
        0
    );
}

#[tokio::test]
async fn jwt_es256_with_a_public_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().expect("P-256 key");
    let public = write(dir.path(), "jwt-public.pem", &key.public_key_pem());
    let server = common::start_with(|c| c.auth.jwt_public_key = Some(public.clone())).await;
    let addr = server.local_addr();
    let sign = |k: &rcgen::KeyPair, sub: &str, exp: u64| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &serde_json::json!({ "sub": sub, "exp": exp }),
            &EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).expect("EC key"),
        )
        .expect("encode token")
    };
    let t = sign(&key, "dev-es", now() + 600);
    let mut c = login_ok(
        addr,
        &Opts::new("dev-es"),
        Some("device"),
        Some(t.as_bytes()),
    )
    .await;
    c.ping().await;
    let t = sign(&key, "dev-es2", now() - 3600);
    assert_eq!(
        code(addr, "dev-es2", Some("device"), Some(t.as_bytes())).await,
        5
    );
    let stranger = rcgen::KeyPair::generate().expect("P-256 key");
    let t = sign(&stranger, "dev-es3", now() + 600);
    assert_eq!(
        code(addr, "dev-es3", Some("device"), Some(t.as_bytes())).await,
        4
    );
    // Key confusion: an HS256 token whose HMAC key is the public key file itself.
    let pem = std::fs::read(&public).unwrap();
    let t = hs256_token_with(&pem, "dev-es5", now() + 600);
    assert_eq!(
        code(addr, "dev-es5", Some("device"), Some(t.as_bytes())).await,
        4
    );
    // An HS256 token where ES256 is expected.
    let t = hs256_token("dev-es4", now() + 600);
    assert_eq!(
        code(addr, "dev-es4", Some("device"), Some(t.as_bytes())).await,
        4
    );
}

/// RS256 with an RSA public key file; rcgen cannot make RSA keys with ring, so openssl does
/// (it is installed for the interop suite; without it the test says so and passes).
#[tokio::test]
async fn jwt_rs256_with_a_public_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("rsa.pem");
    let public = dir.path().join("rsa.pub.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .output()
        .is_ok_and(|o| o.status.success())
        && std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .output()
            .is_ok_and(|o| o.status.success());
    if !made {
        eprintln!("SKIPPED jwt_rs256_with_a_public_key_file: openssl is not installed");
        return;
    }
    let server = common::start_with(|c| c.auth.jwt_public_key = Some(public.clone())).await;
    let addr = server.local_addr();
    let key = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).expect("RSA key");
    let sign = |sub: &str, exp: u64| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &serde_json::json!({ "sub": sub, "exp": exp }),
            &key,
        )
        .expect("encode token")
    };
    let t = sign("dev-rs", now() + 600);
    let mut c = login_ok(
        addr,
        &Opts::new("dev-rs"),
        Some("device"),
        Some(t.as_bytes()),
    )
    .await;
    c.ping().await;
    let t = sign("dev-rs-other", now() + 600);
    assert_eq!(
        code(addr, "dev-rs2", Some("device"), Some(t.as_bytes())).await,
        5
    );
    let t = sign("dev-rs3", now() - 3600);
    assert_eq!(
        code(addr, "dev-rs3", Some("device"), Some(t.as_bytes())).await,
        5
    );
    let t = hs256_token("dev-rs4", now() + 600);
    assert_eq!(
        code(addr, "dev-rs4", Some("device"), Some(t.as_bytes())).await,
        4
    );
}

// ---------------------------------------------------------------------------------------
// The ACL file

#[tokio::test]
async fn acl_subscribe_allows_and_denies_filters_of_one_packet() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw")]);
    let acl = write(
        dir.path(),
        "acl",
        "user backend\ntopic readwrite jobs/#\ntopic deny jobs/secret\ntopic read news/+\n",
    );
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.acl_file = Some(acl.clone());
    })
    .await;
    let mut b = backend(server.local_addr(), "backend-1").await;
    let codes = b
        .subscribe(&[
            ("jobs/a", QoS::AtLeastOnce),
            ("other/x", QoS::AtLeastOnce),
            ("jobs/#", QoS::AtLeastOnce), // overlaps the deny
            ("jobs/secret", QoS::AtMostOnce),
            ("news/today", QoS::AtMostOnce),
            ("news/#", QoS::AtMostOnce), // news/+ does not cover it
            ("#", QoS::AtMostOnce),
        ])
        .await;
    assert_eq!(
        codes,
        [GRANTED1, REFUSED, REFUSED, REFUSED, GRANTED0, REFUSED, REFUSED]
    );
    // The granted ones work: a message on jobs/a arrives.
    b.publish("jobs/a", b"hello", QoS::AtLeastOnce, false).await;
    let p = b.expect_publish().await;
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("jobs/a", "hello"));
}

/// A refused QoS 1 or 2 PUBLISH still completes its handshake, but the message is neither
/// delivered nor stored (retained included).
#[tokio::test]
async fn acl_denied_publish_is_acknowledged_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw"), ("pub", "pw")]);
    let acl = write(
        dir.path(),
        "acl",
        "user backend\ntopic readwrite jobs/#\n\nuser pub\ntopic write jobs/open\n",
    );
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.acl_file = Some(acl.clone());
    })
    .await;
    let addr = server.local_addr();
    let mut sub = backend(addr, "backend-sub").await;
    sub.sub("jobs/#", QoS::AtLeastOnce).await;
    let mut p = login_ok(addr, &Opts::new("pub"), Some("pub"), Some(b"pw")).await;
    // Raw::publish waits for the PUBACK (QoS 1) and PUBREC/PUBCOMP (QoS 2).
    p.publish("jobs/closed", b"denied-1", QoS::AtLeastOnce, false)
        .await;
    p.publish("jobs/closed", b"denied-2", QoS::ExactlyOnce, false)
        .await;
    p.publish("jobs/closed", b"denied-retained", QoS::AtLeastOnce, true)
        .await;
    p.publish("jobs/open", b"allowed", QoS::AtLeastOnce, false)
        .await;
    let got = sub.until_marker(&mut p, "jobs/open").await;
    assert_eq!(payloads(&got), ["allowed"]);
    // Nothing retained on the denied topic: a new subscriber gets only the marker.
    let mut late = backend(addr, "backend-late").await;
    late.sub("jobs/#", QoS::AtLeastOnce).await;
    late.expect_nothing_before_marker(&mut p, "jobs/open").await;
    // The publisher is still connected.
    p.ping().await;
}

#[tokio::test]
async fn acl_checks_the_will_at_connect() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw")]);
    let acl = write(
        dir.path(),
        "acl",
        "user backend\ntopic write wills/ok\ntopic read wills/#\n",
    );
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.acl_file = Some(acl.clone());
    })
    .await;
    let addr = server.local_addr();
    let denied = Opts::new("backend-w1").will("wills/denied", b"x", QoS::AtLeastOnce, false);
    let (mut c, code) = login(addr, &denied, Some("backend"), Some(b"pw")).await;
    assert_eq!(code, 5, "will to a denied topic");
    c.expect_closed(common::WAIT).await;

    let mut watcher = backend(addr, "backend-watch").await;
    watcher.sub("wills/#", QoS::AtLeastOnce).await;
    let allowed = Opts::new("backend-w2").will("wills/ok", b"gone", QoS::AtLeastOnce, false);
    let c = login_ok(addr, &allowed, Some("backend"), Some(b"pw")).await;
    // Dropped without DISCONNECT: the will is published.
    drop(c);
    let p = watcher.expect_publish().await;
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("wills/ok", "gone"));
}

/// Rules before the first `user` line are for anonymous clients (with allow_anonymous).
#[tokio::test]
async fn acl_rules_for_anonymous_clients() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw")]);
    let acl = write(
        dir.path(),
        "acl",
        "topic read public/#\n\nuser backend\ntopic readwrite public/#\ntopic readwrite private/#\n",
    );
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.acl_file = Some(acl.clone());
        c.auth.allow_anonymous = Some(true);
    })
    .await;
    let addr = server.local_addr();
    let mut anon = login_ok(addr, &Opts::new("anon-1"), None, None).await;
    let mut b = backend(addr, "backend-1").await;
    b.sub("private/#", QoS::AtLeastOnce).await;
    assert_eq!(
        anon.subscribe(&[
            ("public/news", QoS::AtLeastOnce),
            ("private/x", QoS::AtLeastOnce),
            ("#", QoS::AtMostOnce),
        ])
        .await,
        [GRANTED1, REFUSED, REFUSED]
    );
    // Read-only: its publishes are dropped, even where it may read.
    anon.publish("private/x", b"anon private", QoS::AtLeastOnce, false)
        .await;
    anon.publish("public/news", b"anon public", QoS::AtLeastOnce, false)
        .await;
    let mut b2 = backend(addr, "backend-2").await;
    let got = b.until_marker(&mut b2, "private/x").await;
    assert!(got.is_empty(), "backend got {:?}", payloads(&got));
    b2.publish("public/news", b"from backend", QoS::AtLeastOnce, false)
        .await;
    let got = anon.until_marker(&mut b2, "public/news").await;
    assert_eq!(payloads(&got), ["from backend"]);
}

/// `pattern` lines with %c apply to every authenticated client, devices included.
#[tokio::test]
async fn acl_pattern_with_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw")]);
    let acl = write(
        dir.path(),
        "acl",
        "user backend\ntopic read status/#\n\npattern readwrite status/%c\n",
    );
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.acl_file = Some(acl.clone());
        c.auth.jwt_hs256_secret = Some(Secret::new(HS256_KEY));
    })
    .await;
    let addr = server.local_addr();
    let mut b = backend(addr, "backend-1").await;
    b.sub("status/#", QoS::AtLeastOnce).await;
    let mut d = device(addr, "dev-p1").await;
    let codes = d
        .subscribe(&[
            ("status/dev-p1", QoS::AtLeastOnce),
            ("status/dev-p2", QoS::AtLeastOnce),
            ("status/+", QoS::AtLeastOnce),
        ])
        .await;
    assert_eq!(codes, [GRANTED1, REFUSED, REFUSED]);
    d.publish("status/dev-p2", b"not mine", QoS::AtLeastOnce, false)
        .await;
    d.publish("status/dev-p1", b"mine", QoS::AtLeastOnce, false)
        .await;
    let got = b.until_marker(&mut d, "status/dev-p1").await;
    assert_eq!(payloads(&got), ["mine"]);
    // %c of the backend is its own client id.
    assert_eq!(
        b.subscribe(&[("status/backend-1", QoS::AtMostOnce)]).await,
        [GRANTED0]
    );
}

#[tokio::test]
async fn acl_clientid_lines() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw"), ("ops", "pw")]);
    let acl = write(
        dir.path(),
        "acl",
        "user backend\nclientid workers/+\nclientid job-*\nclientid %u-main\ntopic readwrite jobs/#\n\nuser ops\ntopic read ops/#\n",
    );
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.acl_file = Some(acl.clone());
    })
    .await;
    let addr = server.local_addr();
    let b = |id: &'static str| async move { code(addr, id, Some("backend"), Some(b"pw")).await };
    assert_eq!(b("workers/1").await, 0);
    assert_eq!(b("job-7").await, 0);
    assert_eq!(b("job-7/x").await, 0);
    assert_eq!(b("backend-main").await, 0);
    // The clientid lines replace the default (client ids starting with the user name).
    assert_eq!(b("backend-1").await, 5);
    assert_eq!(b("workers/1/2").await, 5);
    assert_eq!(b("jobs-1").await, 5);
    // A user without clientid lines keeps the default.
    let o = |id: &'static str| async move { code(addr, id, Some("ops"), Some(b"pw")).await };
    assert_eq!(o("ops-1").await, 0);
    assert_eq!(o("workers/2").await, 5);
}

// ---------------------------------------------------------------------------------------
// Devices and backends without an ACL

#[tokio::test]
async fn without_acl_devices_publish_nowhere_and_backends_push() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw")]);
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.jwt_hs256_secret = Some(Secret::new(HS256_KEY));
    })
    .await;
    let addr = server.local_addr();
    let mut victim = device(addr, "victim").await;
    let mut attacker = device(addr, "attacker").await;
    let mut b = backend(addr, "backend-1").await;
    let mut b2 = backend(addr, "backend-2").await;
    b.sub("news/#", QoS::AtLeastOnce).await;

    // Subscriptions: only its own push topic.
    let codes = attacker
        .subscribe(&[
            ("#", QoS::AtLeastOnce),
            ("push/victim", QoS::AtLeastOnce),
            ("push/+", QoS::AtLeastOnce),
            ("news/x", QoS::AtMostOnce),
            ("push/attacker", QoS::AtLeastOnce),
        ])
        .await;
    assert_eq!(codes, [REFUSED, REFUSED, REFUSED, REFUSED, GRANTED1]);

    // Publishing to another device's push topic: acknowledged, never stored or delivered.
    attacker
        .publish("push/victim", b"stolen", QoS::AtLeastOnce, false)
        .await;
    attacker
        .publish("push/victim", b"stolen-2", QoS::ExactlyOnce, false)
        .await;
    assert_eq!(outbox_len(&server, "victim").await, 0);
    // Nor to its own push topic, nor an ordinary topic.
    attacker
        .publish("push/attacker", b"self", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(outbox_len(&server, "attacker").await, 0);
    attacker
        .publish("news/x", b"fake news", QoS::AtLeastOnce, false)
        .await;
    let got = b.until_marker(&mut b2, "news/x").await;
    assert!(got.is_empty(), "backend got {:?}", payloads(&got));

    // A backend cannot listen in on a device's push topic: named, it is refused; through a
    // wildcard, push messages never arrive.
    let codes = b
        .subscribe(&[
            ("push/victim", QoS::AtLeastOnce),
            ("push/#", QoS::AtLeastOnce),
        ])
        .await;
    assert_eq!(codes[0], REFUSED);

    // A backend pushes to the victim, which receives that and nothing else.
    b.publish("push/victim", b"legit", QoS::AtLeastOnce, false)
        .await;
    let got = victim.until_marker(&mut b2, "push/victim").await;
    assert_eq!(payloads(&got), ["legit"]);
    assert_eq!(got[0].topic, "push/victim");
    let got = b.until_marker(&mut b2, "news/x").await;
    assert!(got.is_empty(), "a backend got pushes: {:?}", payloads(&got));

    // A device's will goes nowhere it may publish: CONNACK 5.
    let t = hs256_token("dev-will", now() + 600);
    let will = Opts::new("dev-will").will("status/dev-will", b"gone", QoS::AtLeastOnce, false);
    let (mut c, code) = login(addr, &will, Some("device"), Some(t.as_bytes())).await;
    assert_eq!(code, 5, "a device with a will");
    c.expect_closed(common::WAIT).await;

    // And the usual case: push/dev42 reaches dev42.
    let mut dev42 = device(addr, "dev42").await;
    b.publish("push/dev42", b"for dev42", QoS::AtLeastOnce, false)
        .await;
    let p = dev42.expect_publish().await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str(), p.qos),
        ("push/dev42", "for dev42", QoS::AtLeastOnce)
    );
    dev42.puback(p.pkid).await;
    attacker.ping().await;
}

/// A client that proves another identity cannot take over a device's session: it is
/// refused before the session attaches, the device's connection stays up and its queued
/// pushes stay queued, online and offline.
#[tokio::test]
async fn takeover_refused_before_the_session_attaches() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw")]);
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.jwt_hs256_secret = Some(Secret::new(HS256_KEY));
        // Twelve refusals from 127.0.0.1 below: keep the limiter out of the way.
        c.auth.max_failures = 1000;
    })
    .await;
    let addr = server.local_addr();
    let t42 = hs256_token("dev42", now() + 600);
    let t43 = hs256_token("dev43", now() + 600);
    let persistent = Opts::new("dev42").clean(false);
    let mut dev42 = login_ok(addr, &persistent, Some("device"), Some(t42.as_bytes())).await;
    let mut b = backend(addr, "backend-1").await;
    b.publish("push/dev42", b"p1", QoS::AtLeastOnce, false)
        .await;
    // Received and not acknowledged: it stays in the outbox.
    assert_eq!(text(&dev42.expect_publish().await), "p1");
    assert_eq!(outbox_len(&server, "dev42").await, 1);

    let attempts = |clean: bool| {
        let t43 = t43.clone();
        async move {
            let o = Opts::new("dev42").clean(clean);
            let tries: [Attempt; 4] = [
                (Some("device"), Some(t43.as_bytes()), 5), // another device's token
                (None, None, 5),                           // anonymous
                (Some("backend"), Some(b"pw"), 5),         // a backend, not its id
                (Some("dev42"), Some(b"guess"), 4),        // a guessed password
            ];
            for (user, pass, want) in tries {
                let (mut c, got) = login(addr, &o, user, pass).await;
                assert_eq!(got, want, "{user:?} as dev42");
                c.expect_closed(common::WAIT).await;
            }
        }
    };
    attempts(false).await;
    attempts(true).await;
    // Still connected, still served, the push still queued.
    dev42.ping().await;
    assert_eq!(outbox_len(&server, "dev42").await, 1);
    b.publish("push/dev42", b"p2", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(text(&dev42.expect_publish().await), "p2");

    // Offline: the attempts change nothing either.
    dev42.disconnect().await;
    wait_offline(&server, "dev42").await;
    b.publish("push/dev42", b"p3", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(outbox_len(&server, "dev42").await, 3);
    attempts(false).await;
    assert_eq!(outbox_len(&server, "dev42").await, 3);
    let (mut dev42, code) = login(addr, &persistent, Some("device"), Some(t42.as_bytes())).await;
    assert_eq!(code, 0);
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = dev42.expect_publish().await;
        dev42.puback(p.pkid).await;
        got.push(text(&p));
    }
    assert_eq!(got, ["p1", "p2", "p3"]);
}

// ---------------------------------------------------------------------------------------
// Herald's own names

/// `$herald/...` client ids get CONNACK 2 and `$cluster/...` topics are refused on a client
/// listener, with authentication off (the open stance) and on, whatever the ACL says.
#[tokio::test]
async fn reserved_client_ids_and_topics_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw")]);
    let acl = write(
        dir.path(),
        "acl",
        "user backend\ntopic readwrite $cluster/#\ntopic readwrite $herald/#\ntopic readwrite ok/#\n",
    );
    let open = common::start().await;
    let closed = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.acl_file = Some(acl.clone());
    })
    .await;
    for (server, user, pass) in [
        (&open, None, None),
        (&closed, Some("backend"), Some(&b"pw"[..])),
    ] {
        let addr = server.local_addr();
        for id in ["$herald/node-1", "$herald/"] {
            assert_eq!(code(addr, id, user, pass).await, 2, "client id {id}");
        }
        let will = Opts::new("backend-w").will("$cluster/x", b"w", QoS::AtMostOnce, false);
        let (mut c, code) = login(addr, &will, user, pass).await;
        assert_eq!(code, 5, "will to $cluster/x");
        c.expect_closed(common::WAIT).await;

        let mut c = login_ok(addr, &Opts::new("backend-1"), user, pass).await;
        let codes = c
            .subscribe(&[
                ("$cluster/#", QoS::AtLeastOnce),
                ("$cluster", QoS::AtLeastOnce),
                ("$herald/x", QoS::AtLeastOnce),
                ("$cluster/fwd/+", QoS::AtMostOnce),
                ("ok/x", QoS::AtLeastOnce),
            ])
            .await;
        assert_eq!(codes, [REFUSED, REFUSED, REFUSED, REFUSED, GRANTED1]);
        // A publish to $cluster/... is acknowledged and dropped; the client stays connected
        // and its own subscription sees only what comes after.
        c.publish("$cluster/fwd/x", b"inject", QoS::AtLeastOnce, true)
            .await;
        c.publish("$herald/x", b"inject", QoS::AtLeastOnce, false)
            .await;
        c.publish("ok/x", b"fine", QoS::AtLeastOnce, false).await;
        let p = c.expect_publish().await;
        assert_eq!((p.topic.as_str(), text(&p).as_str()), ("ok/x", "fine"));
        c.ping().await;
    }
}

// ---------------------------------------------------------------------------------------
// The limiter

#[tokio::test]
async fn limiter_refuses_the_right_password_after_max_failures() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "pw")]);
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.max_failures = 3;
        c.auth.failure_window = Duration::from_secs(600);
    })
    .await;
    let addr = server.local_addr();
    // The right password works before.
    assert_eq!(
        code(addr, "backend-0", Some("backend"), Some(b"pw")).await,
        0
    );
    for i in 0..3 {
        let id = format!("backend-{}", i + 1);
        assert_eq!(
            code(addr, &id, Some("backend"), Some(b"wrong")).await,
            4,
            "attempt {i}"
        );
    }
    assert_eq!(
        code(addr, "backend-9", Some("backend"), Some(b"pw")).await,
        5
    );
}

// ---------------------------------------------------------------------------------------
// Secrets stay out of logs

/// Polls `path` until `cond` holds on its text, for up to 10 s.
async fn wait_log(path: &Path, what: &str, cond: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if cond(&log) {
            return;
        }
        assert!(Instant::now() < deadline, "log never showed {what}:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn passwords_and_tokens_are_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = cheap_passwd(dir.path(), &[("backend", "correct-horse-pw")]);
    let config = write(
        dir.path(),
        "herald.toml",
        &format!(
            "[auth]\npassword_file = {:?}\njwt_hs256_secret = {HS256_KEY:?}\n",
            passwd.display().to_string()
        ),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let tls = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cert = common::pki::Pki::get().server();
    let log = dir.path().join("herald.log");
    let args: Vec<String> = [
        "--config",
        config.to_str().unwrap(),
        "--listen",
        &addr.to_string(),
        "--tls-listen",
        &tls.to_string(),
        "--tls-cert",
        cert.cert.to_str().unwrap(),
        "--tls-key",
        cert.key.to_str().unwrap(),
        "--store",
        "memory",
        "--log-level",
        "trace",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let herald = Herald::start_args(addr, args, &log);
    let tcp = |a: SocketAddr| async move {
        Raw::over(Box::new(tokio::net::TcpStream::connect(a).await.unwrap()))
    };

    let wrong = b"hunter2-secret-pw";
    let (_, c) = login_over(
        tcp(addr).await,
        &Opts::new("backend-1"),
        Some("backend"),
        Some(wrong),
    )
    .await;
    assert_eq!(c, 4);
    // And over TLS (rustls logs at trace too).
    let s = tokio::net::TcpStream::connect(tls).await.unwrap();
    let s = tokio_rustls::TlsConnector::from(common::pki::Pki::get().client_config(None))
        .connect(
            tokio_rustls::rustls::pki_types::ServerName::IpAddress(tls.ip().into()),
            s,
        )
        .await
        .expect("TLS handshake");
    let (_, c) = login_over(
        Raw::over(Box::new(s)),
        &Opts::new("backend-tls"),
        Some("backend"),
        Some(wrong),
    )
    .await;
    assert_eq!(c, 4);
    let (ok, c) = login_over(
        tcp(addr).await,
        &Opts::new("backend-2"),
        Some("backend"),
        Some(b"correct-horse-pw"),
    )
    .await;
    assert_eq!(c, 0);
    ok.disconnect().await;
    let token = hs256_token("dev-log", now() + 600);
    let (mut d, c) = login_over(
        tcp(addr).await,
        &Opts::new("dev-log"),
        Some("device"),
        Some(token.as_bytes()),
    )
    .await;
    assert_eq!(c, 0);
    d.ping().await;
    d.disconnect().await;
    let theirs = hs256_token("dev-other", now() + 600);
    let (_, c) = login_over(
        tcp(addr).await,
        &Opts::new("dev-log2"),
        Some("device"),
        Some(theirs.as_bytes()),
    )
    .await;
    assert_eq!(c, 5);
    let expired = hs256_token("dev-log3", now() - 3600);
    let (_, c) = login_over(
        tcp(addr).await,
        &Opts::new("dev-log3"),
        Some("device"),
        Some(expired.as_bytes()),
    )
    .await;
    assert_eq!(c, 5);
    // Each refusal is logged before its CONNACK is sent; the last one is the marker.
    wait_log(&log, "the refusal of dev-log3", |l| l.contains("dev-log3")).await;
    drop(herald);

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("backend-1"),
        "the log has the refusals:\n{text}"
    );
    let signature = |t: &str| t.rsplit('.').next().unwrap().to_string();
    for (what, secret) in [
        ("wrong password", "hunter2-secret-pw".to_string()),
        ("right password", "correct-horse-pw".to_string()),
        ("token", token.clone()),
        ("token signature", signature(&token)),
        ("refused token", theirs.clone()),
        ("refused token signature", signature(&theirs)),
        ("expired token signature", signature(&expired)),
        ("jwt key", HS256_KEY.to_string()),
    ] {
        assert!(!text.contains(&secret), "the log shows the {what}:\n{text}");
    }
    // Not as bytes either (a Debug of the raw password).
    let as_bytes = format!("{:?}", &wrong[..]);
    let as_bytes = &as_bytes[1..as_bytes.len() - 1];
    assert!(!text.contains(as_bytes), "password bytes in the log");
    assert!(
        !text.contains(&as_bytes.replace(' ', "")),
        "password bytes in the log"
    );
}

#[tokio::test]
async fn redis_url_password_is_not_printed() {
    let dead = free_port();
    let url = format!("redis://:pw-in-url-xyz@127.0.0.1:{dead}/0");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    let mut child = Command::new(Herald::binary())
        .args(["--listen", &listen, "--store", "redis", "--redis-url", &url])
        .args(["--log-level", "trace"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start herald");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("herald with an unreachable Redis did not exit");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !status.success(),
        "herald started without its Redis:\n{all}"
    );
    assert!(
        !all.contains("pw-in-url-xyz"),
        "the Redis password is printed:\n{all}"
    );
    assert!(all.contains("***"), "no redacted URL in the output:\n{all}");
}

// ---------------------------------------------------------------------------------------
// The cluster port

#[tokio::test]
async fn cluster_port_accepts_only_the_secret() {
    let redis = RedisServer::start();
    let cluster = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _node = Herald::start(&redis.url(), &["--cluster-listen", &cluster.to_string()]);
    let open = || async {
        Raw::over(Box::new(
            tokio::net::TcpStream::connect(cluster)
                .await
                .expect("cluster port"),
        ))
    };
    let o = Opts::new("$herald/intruder");
    let (mut c, code) = login_over(open().await, &o, None, None).await;
    assert_eq!(code, 5, "no secret");
    c.expect_closed(common::WAIT).await;
    let (mut c, code) = login_over(
        open().await,
        &o,
        Some("node"),
        Some(b"not-the-cluster-secret"),
    )
    .await;
    assert_eq!(code, 5, "wrong secret");
    c.expect_closed(common::WAIT).await;
    let prefix = &CLUSTER_SECRET.as_bytes()[..CLUSTER_SECRET.len() - 1];
    let (mut c, code) = login_over(open().await, &o, Some("node"), Some(prefix)).await;
    assert_eq!(code, 5, "a prefix of the secret");
    c.expect_closed(common::WAIT).await;
    let (c, code) = login_over(
        open().await,
        &Opts::new("$herald/friend"),
        Some("anything"),
        Some(CLUSTER_SECRET.as_bytes()),
    )
    .await;
    assert_eq!(code, 0, "the secret");
    c.disconnect().await;
}

#[tokio::test]
async fn cluster_node_without_a_secret_refuses_to_start() {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    let cluster = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    let out = Command::new(Herald::binary())
        .args(["--listen", &listen, "--store", "redis"])
        .args(["--redis-url", "redis://127.0.0.1:1/0"])
        .args(["--cluster-listen", &cluster])
        .env_remove("HERALD_CLUSTER_SECRET")
        .stdin(Stdio::null())
        .output()
        .expect("run herald");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cluster.secret"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Revoking read access (ACL reload): read access is checked at delivery, as in Mosquitto

/// A server where user `backend` may read news/#, user `pub` may write it, with the ACL file
/// path to rewrite.
async fn revocation_setup(dir: &Path) -> (common::TestServer, PathBuf) {
    let passwd = cheap_passwd(dir, &[("backend", "pw"), ("pub", "pw")]);
    let acl = write(
        dir,
        "acl",
        "user backend\ntopic readwrite news/#\n\nuser pub\ntopic write news/#\n",
    );
    let server = common::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.acl_file = Some(acl.clone());
    })
    .await;
    (server, acl)
}

const REVOKED: &str =
    "user backend\ntopic readwrite news/#\ntopic deny news/secret\n\nuser pub\ntopic write news/#\n";

/// A persistent session's subscriptions are restored at reconnect; a read the ACL has since
/// revoked (deny + SIGHUP) must not deliver, queued messages included.
#[tokio::test]
async fn revoked_read_is_not_delivered_to_a_reconnecting_persistent_session() {
    let dir = tempfile::tempdir().unwrap();
    let (server, acl) = revocation_setup(dir.path()).await;
    let addr = server.local_addr();
    let persistent = Opts::new("backend-s").clean(false);
    let mut s = login_ok(addr, &persistent, Some("backend"), Some(b"pw")).await;
    s.sub("news/secret", QoS::AtLeastOnce).await;
    s.sub("news/open", QoS::AtLeastOnce).await;
    s.disconnect().await;
    wait_offline(&server, "backend-s").await;

    std::fs::write(&acl, REVOKED).unwrap();
    server.reload();
    let mut p = login_ok(addr, &Opts::new("pub"), Some("pub"), Some(b"pw")).await;
    p.publish(
        "news/secret",
        b"queued after revoke",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    let mut s = login_ok(addr, &persistent, Some("backend"), Some(b"pw")).await;
    // A new subscription to it is refused...
    assert_eq!(
        s.subscribe(&[("news/secret", QoS::AtLeastOnce)]).await,
        [REFUSED]
    );
    p.publish("news/secret", b"live after revoke", QoS::AtLeastOnce, false)
        .await;
    // ...so the restored one must not deliver either.
    let got = s.until_marker(&mut p, "news/open").await;
    assert!(
        got.is_empty(),
        "revoked topic delivered: {:?}",
        payloads(&got)
    );
}

/// The same for a connection that stays up across the reload: read access is checked at
/// delivery, not only at SUBSCRIBE.
#[tokio::test]
async fn revoked_read_is_not_delivered_to_a_live_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let (server, acl) = revocation_setup(dir.path()).await;
    let addr = server.local_addr();
    let mut s = backend(addr, "backend-s").await;
    s.sub("news/secret", QoS::AtLeastOnce).await;
    s.sub("news/open", QoS::AtLeastOnce).await;
    let mut p = login_ok(addr, &Opts::new("pub"), Some("pub"), Some(b"pw")).await;
    std::fs::write(&acl, REVOKED).unwrap();
    server.reload();
    p.publish("news/secret", b"after revoke", QoS::AtLeastOnce, false)
        .await;
    let got = s.until_marker(&mut p, "news/open").await;
    assert!(
        got.is_empty(),
        "revoked topic delivered: {:?}",
        payloads(&got)
    );
}
