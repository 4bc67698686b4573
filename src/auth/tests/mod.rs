//! Unit tests of the gate: the helpers every test uses, the gate as a whole, loading and
//! reloading; `authenticate.rs` and `authorize.rs` here test the files of those names.

mod authenticate;
mod authorize;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use super::password::tests::cheap_hash;
use super::token::tests::SECRET;
use super::{Auth, Credentials, Principal, Refusal};
use crate::config::{Config, Secret};

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

fn creds<'a>(
    client_id: &'a str,
    username: Option<&'a str>,
    password: Option<&'a [u8]>,
) -> Credentials<'a> {
    Credentials {
        client_id,
        username,
        password,
        cert_identity: None,
        peer: PEER,
    }
}

struct Setup {
    dir: tempfile::TempDir,
    config: Config,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
            config: Config::default(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn passwords(mut self, users: &[(&str, &str)]) -> Setup {
        let text: String = users
            .iter()
            .map(|(u, p)| format!("{u}:{}\n", cheap_hash(p)))
            .collect();
        std::fs::write(self.path("passwd"), text).unwrap();
        self.config.auth.password_file = Some(self.path("passwd"));
        self
    }

    fn acl(mut self, text: &str) -> Setup {
        std::fs::write(self.path("acl"), text).unwrap();
        self.config.auth.acl_file = Some(self.path("acl"));
        self
    }

    fn hs256(mut self) -> Setup {
        self.config.auth.jwt_hs256_secret =
            Some(Secret::new(String::from_utf8(SECRET.to_vec()).unwrap()));
        self
    }

    fn auth(&self) -> Auth {
        Auth::load(&self.config).unwrap()
    }
}

async fn login(a: &Auth, c: Credentials<'_>) -> Result<Principal, Refusal> {
    a.authenticate(c).await
}

fn user(name: &str) -> Principal {
    Principal::User(Arc::from(name))
}

#[test]
fn refusal_codes() {
    assert_eq!(Refusal::BadCredentials.connack_code(), 4);
    assert_eq!(Refusal::NotAuthorized.connack_code(), 5);
}

#[tokio::test]
async fn open_by_default() {
    let a = Setup::new().auth();
    assert!(a.is_open());
    assert_eq!(
        login(&a, creds("x", None, None)).await,
        Ok(Principal::Anonymous)
    );
    assert_eq!(
        login(&a, creds("x", Some("u"), Some(b"p"))).await,
        Ok(Principal::Anonymous)
    );
    assert!(a.may_publish(&Principal::Anonymous, "x", "push/other"));
    assert!(a.may_subscribe(&Principal::Anonymous, "x", "#"));
}

#[tokio::test]
async fn reload_swaps_or_keeps() {
    let s = Setup::new()
        .passwords(&[("backend", "old")])
        .acl("user backend\ntopic write a\n");
    let a = s.auth();
    let b = user("backend");
    assert!(a.may_publish(&b, "backend", "a"));
    std::fs::write(s.path("passwd"), format!("backend:{}\n", cheap_hash("new"))).unwrap();
    std::fs::write(s.path("acl"), "user backend\ntopic write b\n").unwrap();
    a.reload().unwrap();
    assert_eq!(
        login(&a, creds("backend", Some("backend"), Some(b"new"))).await,
        Ok(b.clone())
    );
    assert!(!a.may_publish(&b, "backend", "a"));
    assert!(a.may_publish(&b, "backend", "b"));
    // A broken file: the error names the key, file and line; the old files stay.
    let good = cheap_hash("newer");
    std::fs::write(s.path("passwd"), format!("backend:{good}\n# x\nbroken\n")).unwrap();
    let e = a.reload().unwrap_err();
    assert_eq!(
        e,
        format!(
            "auth.password_file: {}:3: not user:hash",
            s.path("passwd").display()
        )
    );
    assert_eq!(
        login(&a, creds("backend", Some("backend"), Some(b"new"))).await,
        Ok(b.clone())
    );
    std::fs::write(s.path("passwd"), format!("backend:{good}\n")).unwrap();
    std::fs::write(s.path("acl"), "user backend\nfrobnicate\n").unwrap();
    let e = a.reload().unwrap_err();
    assert!(
        e.starts_with(&format!("auth.acl_file: {}:2: ", s.path("acl").display())),
        "{e}"
    );
    // Both kept: the new password file is not half-applied.
    assert_eq!(
        login(&a, creds("backend", Some("backend"), Some(b"new"))).await,
        Ok(b.clone())
    );
    assert!(a.may_publish(&b, "backend", "b"));
}

#[test]
fn load_errors_name_the_key() {
    let mut s = Setup::new();
    s.config.auth.password_file = Some(s.path("missing"));
    let e = Auth::load(&s.config).unwrap_err();
    assert!(e.starts_with("auth.password_file: "), "{e}");
    let mut s = Setup::new();
    std::fs::write(s.path("jwt.pem"), "nope").unwrap();
    s.config.auth.jwt_public_key = Some(s.path("jwt.pem"));
    let e = Auth::load(&s.config).unwrap_err();
    assert!(e.starts_with("auth.jwt_public_key: "), "{e}");
}

#[tokio::test]
async fn no_secrets_in_debug() {
    let a = Setup::new().passwords(&[("backend", "pw")]).hs256().auth();
    let shown = format!("{a:?}");
    assert!(
        !shown.contains("argon2") && !shown.contains("0123456789abcdef"),
        "{shown}"
    );
    let c = creds("c", Some("u"), Some(b"hunter2"));
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("104"),
        "{shown}"
    );
}
