use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::auth::token::tests::{es256_keys, es256_token, hs256_token, now};
use crate::auth::workers::Workers;
use crate::config::TlsIdentity;

#[tokio::test]
async fn password_right_wrong_unknown() {
    let a = Setup::new()
        .passwords(&[("backend", "s3cret"), ("ops", "o")])
        .auth();
    assert!(!a.is_open());
    assert_eq!(
        login(&a, creds("backend-7", Some("backend"), Some(b"s3cret"))).await,
        Ok(user("backend"))
    );
    assert_eq!(
        login(&a, creds("backend", Some("backend"), Some(b"wrong"))).await,
        Err(Refusal::BadCredentials)
    );
    assert_eq!(
        login(&a, creds("backend", Some("backend"), None)).await,
        Err(Refusal::BadCredentials)
    );
    assert_eq!(
        login(&a, creds("nobody", Some("nobody"), Some(b"s3cret"))).await,
        Err(Refusal::BadCredentials)
    );
    // No credentials: anonymous is off once a source exists.
    assert_eq!(
        login(&a, creds("x", None, None)).await,
        Err(Refusal::NotAuthorized)
    );
}

#[tokio::test]
async fn default_client_ids_of_a_user() {
    let a = Setup::new().passwords(&[("backend", "pw")]).auth();
    for ok in ["backend", "backend-7", "backend/worker", ""] {
        assert_eq!(
            login(&a, creds(ok, Some("backend"), Some(b"pw"))).await,
            Ok(user("backend")),
            "{ok:?}"
        );
    }
    for bad in ["dev42", "backen", "xbackend", "backend42", "backendx"] {
        assert_eq!(
            login(&a, creds(bad, Some("backend"), Some(b"pw"))).await,
            Err(Refusal::NotAuthorized),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn acl_client_id_rules() {
    let a = Setup::new()
        .passwords(&[("backend", "pw"), ("ops", "pw")])
        .acl("user backend\nclientid worker-*\nclientid +/%u\nuser ops\ntopic read #\n")
        .auth();
    for ok in ["worker-1", "eu/backend", ""] {
        assert_eq!(
            login(&a, creds(ok, Some("backend"), Some(b"pw"))).await,
            Ok(user("backend")),
            "{ok:?}"
        );
    }
    for bad in ["backend", "backend-1", "eu/backend/x", "worker"] {
        assert_eq!(
            login(&a, creds(bad, Some("backend"), Some(b"pw"))).await,
            Err(Refusal::NotAuthorized),
            "{bad:?}"
        );
    }
    // ops has a block but no clientid line: the default applies.
    assert_eq!(
        login(&a, creds("ops-1", Some("ops"), Some(b"pw"))).await,
        Ok(user("ops"))
    );
    assert_eq!(
        login(&a, creds("backend", Some("ops"), Some(b"pw"))).await,
        Err(Refusal::NotAuthorized)
    );
}

#[tokio::test]
async fn hs256_tokens() {
    let a = Setup::new().hs256().auth();
    let t = hs256_token("dev1", now() + 600);
    // Any user name (or none) with a token.
    assert_eq!(
        login(&a, creds("dev1", None, Some(t.as_bytes()))).await,
        Ok(Principal::Device)
    );
    assert_eq!(
        login(&a, creds("dev1", Some("whatever"), Some(t.as_bytes()))).await,
        Ok(Principal::Device)
    );
    assert_eq!(
        login(&a, creds("dev2", None, Some(t.as_bytes()))).await,
        Err(Refusal::NotAuthorized)
    );
    assert_eq!(
        login(&a, creds("", None, Some(t.as_bytes()))).await,
        Err(Refusal::NotAuthorized)
    );
    let t = hs256_token("dev1", now() - 30);
    assert_eq!(
        login(&a, creds("dev1", None, Some(t.as_bytes()))).await,
        Err(Refusal::NotAuthorized)
    );
    let mut t = hs256_token("dev1", now() + 600).into_bytes();
    let last = t.len() - 2;
    t[last] = if t[last] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        login(&a, creds("dev1", None, Some(&t))).await,
        Err(Refusal::BadCredentials)
    );
    assert_eq!(
        login(&a, creds("dev1", None, Some(b"not a token"))).await,
        Err(Refusal::BadCredentials)
    );
    // alg none: header {"alg":"none"} and payload {"sub":"dev1","exp":9999999999}.
    let none = b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJkZXYxIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
    assert_eq!(
        login(&a, creds("dev1", None, Some(none))).await,
        Err(Refusal::BadCredentials)
    );
    // A user name alone: nothing can check it.
    assert_eq!(
        login(&a, creds("dev1", Some("dev1"), None)).await,
        Err(Refusal::NotAuthorized)
    );
}

#[tokio::test]
async fn es256_tokens_run_on_the_workers() {
    let mut s = Setup::new();
    let (private, public) = es256_keys();
    std::fs::write(s.path("jwt.pem"), public).unwrap();
    s.config.auth.jwt_public_key = Some(s.path("jwt.pem"));
    let a = s.auth();
    let t = es256_token(&private, "dev1", now() + 600);
    assert_eq!(
        login(&a, creds("dev1", None, Some(t.as_bytes()))).await,
        Ok(Principal::Device)
    );
    assert!(
        a.workers
            .running
            .1
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    let t = es256_token(&private, "dev1", now() - 30);
    assert_eq!(
        login(&a, creds("dev1", None, Some(t.as_bytes()))).await,
        Err(Refusal::NotAuthorized)
    );
    let t = hs256_token("dev1", now() + 600);
    assert_eq!(
        login(&a, creds("dev1", None, Some(t.as_bytes()))).await,
        Err(Refusal::BadCredentials)
    );
}

#[tokio::test]
async fn users_first_then_tokens() {
    let a = Setup::new().passwords(&[("backend", "pw")]).hs256().auth();
    assert_eq!(
        login(&a, creds("backend", Some("backend"), Some(b"pw"))).await,
        Ok(user("backend"))
    );
    // A known user with a token as password is a wrong password, not a device.
    let t = hs256_token("backend", now() + 600);
    assert_eq!(
        login(&a, creds("backend", Some("backend"), Some(t.as_bytes()))).await,
        Err(Refusal::BadCredentials)
    );
    // An unknown user name with a token is a device.
    let t = hs256_token("dev1", now() + 600);
    assert_eq!(
        login(&a, creds("dev1", Some("dev1"), Some(t.as_bytes()))).await,
        Ok(Principal::Device)
    );
    assert_eq!(
        login(&a, creds("dev1", Some("dev1"), Some(b"guess"))).await,
        Err(Refusal::BadCredentials)
    );
}

#[tokio::test]
async fn certificate_identity() {
    let mut s = Setup::new();
    s.config.tls.identity = TlsIdentity::Cert;
    let a = s.auth();
    assert!(!a.is_open());
    let mut c = creds("dev1", Some("ignored"), Some(b"ignored"));
    c.cert_identity = Some("dev1");
    assert_eq!(login(&a, c).await, Ok(Principal::Device));
    let mut c = creds("dev2", None, None);
    c.cert_identity = Some("dev1");
    assert_eq!(login(&a, c).await, Err(Refusal::NotAuthorized));
    let mut c = creds("Dev1", None, None);
    c.cert_identity = Some("dev1");
    assert_eq!(login(&a, c).await, Err(Refusal::NotAuthorized));
    // No certificate (e.g. the plain TCP listener): anonymous is off by default.
    assert_eq!(
        login(&a, creds("dev1", None, None)).await,
        Err(Refusal::NotAuthorized)
    );
    assert_eq!(
        login(&a, creds("dev1", Some("u"), Some(b"p"))).await,
        Err(Refusal::NotAuthorized)
    );
    // A certificate identity is ignored unless tls.identity = "cert".
    let b = Setup::new().passwords(&[("u", "p")]).auth();
    let mut c = creds("dev1", None, None);
    c.cert_identity = Some("dev1");
    assert_eq!(login(&b, c).await, Err(Refusal::NotAuthorized));
}

#[tokio::test]
async fn anonymous_when_allowed() {
    let mut s = Setup::new().passwords(&[("backend", "pw")]);
    s.config.auth.allow_anonymous = Some(true);
    let a = s.auth();
    assert!(!a.is_open());
    assert_eq!(
        login(&a, creds("x", None, None)).await,
        Ok(Principal::Anonymous)
    );
    assert_eq!(
        login(&a, creds("x", Some("nobody"), Some(b"pw"))).await,
        Err(Refusal::BadCredentials)
    );
    // No ACL: an anonymous client may do what a user may.
    assert!(a.may_publish(&Principal::Anonymous, "x", "push/dev1"));
    assert!(a.may_subscribe(&Principal::Anonymous, "x", "a/#"));
    let mut s = Setup::new().passwords(&[("backend", "pw")]);
    s.config.auth.allow_anonymous = Some(false);
    assert_eq!(
        login(&s.auth(), creds("x", None, None)).await,
        Err(Refusal::NotAuthorized)
    );
}

#[tokio::test]
async fn limiter_blocks_before_any_work() {
    let mut s = Setup::new().passwords(&[("backend", "pw")]);
    s.config.auth.max_failures = 3;
    s.config.auth.failure_window = Duration::from_secs(60);
    let a = s.auth();
    for _ in 0..3 {
        assert_eq!(
            login(&a, creds("backend", Some("backend"), Some(b"bad"))).await,
            Err(Refusal::BadCredentials)
        );
    }
    let ran = a
        .workers
        .running
        .1
        .load(std::sync::atomic::Ordering::SeqCst);
    // Now even the right password is refused, without hashing.
    assert_eq!(
        login(&a, creds("backend", Some("backend"), Some(b"pw"))).await,
        Err(Refusal::NotAuthorized)
    );
    assert_eq!(
        ran,
        a.workers
            .running
            .1
            .load(std::sync::atomic::Ordering::SeqCst)
    );
    // Another address is not affected.
    let mut c = creds("backend", Some("backend"), Some(b"pw"));
    c.peer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    assert_eq!(login(&a, c).await, Ok(user("backend")));
}

/// 200 logins at once never run more argon2 hashes at a time than the semaphore allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn argon2_runs_behind_the_semaphore() {
    let s = Setup::new().passwords(&[("backend", "pw")]);
    let permits = 2;
    let a = Arc::new(Auth::load_with_workers(&s.config, permits).unwrap());
    let logins: Vec<_> = (0..200)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move {
                let pw: &[u8] = if i % 2 == 0 { b"pw" } else { b"wrong" };
                let mut c = creds("backend", Some("backend"), Some(pw));
                // Distinct addresses so that the limiter stays out of the way.
                c.peer = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
                (i, a.authenticate(c).await)
            })
        })
        .collect();
    for l in logins {
        let (i, r) = l.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(r, Ok(user("backend")));
        } else {
            assert_eq!(r, Err(Refusal::BadCredentials));
        }
    }
    let peak = a
        .workers
        .running
        .1
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=permits).contains(&peak), "peak {peak}");
    assert_eq!(
        a.workers
            .running
            .0
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(Workers::default_permits() >= 1);
}
