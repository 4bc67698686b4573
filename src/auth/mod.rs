//! Who may connect, as whom, and what they may do.
//!
//! Herald has two kinds of clients, and authentication follows that split:
//! - **Devices** are many and each listens on its own push topic. They prove an identity
//!   that *is* their client id: a client certificate (`tls.identity = "cert"`, CN or first
//!   DNS SAN) or a JWT in the password field (`sub`). A device that could pick another client
//!   id could read another device's pushes, so the identity must equal the client id.
//! - **Backends** (users) are few and push to devices. They log in with a password-file
//!   user name and password, and may use client ids that start with their user name (or
//!   those their ACL `clientid` lines list), so one backend can run many connections.
//!
//! Without an ACL file, that split is also the authorization: a device may subscribe to its
//! own push topic only (the exact topic, no wildcards) and publish nowhere; a user may
//! publish anywhere (push topics included) and subscribe to any filter (the broker separately
//! refuses another client's push topic). An anonymous client, where allowed, may do anything
//! a user may. With an ACL file (see [`acl`]) its rules decide, and a device may still always
//! subscribe to its own push topic.
//!
//! With no authentication source, no certificate identity and no ACL, and anonymous clients
//! allowed (the default laptop stance), [`Auth::is_open`] is true and the session skips every
//! check, so auth-off costs nothing.
//!
//! Topics under `$cluster/` and `$herald/` (and those two names themselves) are Herald's
//! own: no client may publish or subscribe to them, whatever the ACL says and even when
//! open. The session checks this too; this is the second line.
//!
//! Password hashing and RSA/ECDSA signature checks are CPU work of milliseconds (argon2 also
//! takes ~19 MiB each): they run on tokio's blocking pool behind a semaphore of
//! max(1, cores - 1) permits, so that a storm of logins queues there instead of stalling the
//! async workers, occupying every core or spawning a thread per login. HS256 is microseconds
//! and runs inline. Before any of that, [`limiter`] refuses addresses with too many recent
//! failures.
//!
//! Nothing here logs or returns a password, a token, a hash or a key: failures are logged
//! with the peer, client id, user name and reason only.

pub mod acl;
pub mod limiter;
pub mod password;
pub mod token;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::Semaphore;

use crate::config::{Config, TlsIdentity};
use crate::metrics::{self, AuthFailure, Denied};
use crate::topic::PushTemplate;

use acl::{Acl, Who};
use limiter::Limiter;
use password::PasswordFile;
use token::{TokenError, Verifier};

/// Who a connection proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Nothing proved: allowed only when anonymous clients are (the open, laptop stance when
    /// no auth source is configured).
    Anonymous,
    /// A device: its identity (token `sub` or client-certificate CN/SAN) IS its client id.
    Device,
    /// A password-file user: a backend.
    User(Arc<str>),
}

/// What a CONNECT offers to prove who it is.
pub struct Credentials<'a> {
    /// May be "" (the broker then assigns one for clean sessions).
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// Verified client-certificate identity (CN or first DNS SAN) when tls.identity = "cert"
    /// and the client presented one.
    pub cert_identity: Option<&'a str>,
    pub peer: IpAddr,
}

impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "***"))
            .field("cert_identity", &self.cert_identity)
            .field("peer", &self.peer)
            .finish()
    }
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// CONNACK 4: bad user name or password (wrong password, unknown user, bad token
    /// signature, malformed token, alg none).
    BadCredentials,
    /// CONNACK 5: not authorized (anonymous refused, expired token, token sub or certificate
    /// identity != client id, client id not allowed for this user, too many failures from
    /// this address, will not allowed).
    NotAuthorized,
}

impl Refusal {
    /// The CONNACK return code.
    pub fn connack_code(self) -> u8 {
        match self {
            Refusal::BadCredentials => 4,
            Refusal::NotAuthorized => 5,
        }
    }
}

/// The parts SIGHUP re-reads, swapped together so a check never sees a new password file
/// with an old ACL.
#[derive(Default)]
struct Files {
    passwords: Option<PasswordFile>,
    acl: Option<Acl>,
}

impl Files {
    fn read(passwords: Option<&Path>, acl: Option<&Path>) -> Result<Files, String> {
        let passwords = passwords
            .map(PasswordFile::load)
            .transpose()
            .map_err(|e| format!("auth.password_file: {e}"))?;
        let acl = acl
            .map(Acl::load)
            .transpose()
            .map_err(|e| format!("auth.acl_file: {e}"))?;
        Ok(Files { passwords, acl })
    }
}

/// The blocking pool for argon2 and public-key signatures, bounded by a semaphore.
struct Workers {
    permits: usize,
    semaphore: Arc<Semaphore>,
    /// Jobs running now and the most ever seen at once (checked by a test).
    #[cfg(test)]
    running: Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>,
}

impl Workers {
    fn new(permits: usize) -> Workers {
        let permits = permits.max(1);
        Workers {
            permits,
            semaphore: Arc::new(Semaphore::new(permits)),
            #[cfg(test)]
            running: Default::default(),
        }
    }

    /// One permit per core but one, and at least one.
    fn default_permits() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .saturating_sub(1)
            .max(1)
    }

    /// Runs `job` on the blocking pool once a permit is free. The permit goes with the job,
    /// so a login abandoned while its hash runs still holds its place until the hash ends.
    /// None if the job panicked.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let permit = self.semaphore.clone().acquire_owned().await.ok()?;
        #[cfg(test)]
        let running = self.running.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            #[cfg(test)]
            {
                use std::sync::atomic::Ordering;
                let now = running.0.fetch_add(1, Ordering::SeqCst) + 1;
                running.1.fetch_max(now, Ordering::SeqCst);
            }
            let out = job();
            #[cfg(test)]
            running.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            out
        })
        .await
        .ok()
    }
}

/// The authentication and authorization gate, shared by every connection (in an `Arc`).
pub struct Auth {
    password_path: Option<PathBuf>,
    acl_path: Option<PathBuf>,
    files: RwLock<Arc<Files>>,
    token: Option<Arc<Verifier>>,
    cert_identity: bool,
    allow_anonymous: bool,
    open: bool,
    push: PushTemplate,
    limiter: Limiter,
    workers: Workers,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files = self.files.read();
        f.debug_struct("Auth")
            .field("open", &self.open)
            .field("allow_anonymous", &self.allow_anonymous)
            .field("cert_identity", &self.cert_identity)
            .field("password_file", &self.password_path)
            .field("users", &files.passwords.as_ref().map(|p| p.len()))
            .field("acl_file", &self.acl_path)
            .field("token", &self.token.as_ref().map(|t| t.algorithm()))
            .field("workers", &self.workers.permits)
            .finish_non_exhaustive()
    }
}

type Failure = (Refusal, AuthFailure);

impl Auth {
    /// Reads the password file, ACL file and JWT key named in `config.auth` (and notes
    /// tls.identity, push.topic_template, allow_anonymous). Errors are one line naming the
    /// config key, the file, the line number where there is one, and the reason, e.g.
    /// "auth.password_file: /etc/herald/passwd:3: not user:hash". Never include secret
    /// values.
    pub fn load(config: &Config) -> Result<Auth, String> {
        Auth::load_with_workers(config, Workers::default_permits())
    }

    fn load_with_workers(config: &Config, permits: usize) -> Result<Auth, String> {
        let a = &config.auth;
        let files = Files::read(a.password_file.as_deref(), a.acl_file.as_deref())?;
        let token = match (&a.jwt_hs256_secret, &a.jwt_public_key) {
            (Some(_), Some(_)) => {
                return Err("auth.jwt_public_key: set only one of auth.jwt_hs256_secret and auth.jwt_public_key".into())
            }
            (Some(secret), None) => Some(Verifier::hs256(secret.expose().as_bytes())),
            (None, Some(path)) => Some(
                Verifier::from_public_key_file(path)
                    .map_err(|e| format!("auth.jwt_public_key: {e}"))?,
            ),
            (None, None) => None,
        };
        let cert_identity = config.tls.identity == TlsIdentity::Cert;
        let allow_anonymous = config.allow_anonymous();
        let open = !a.has_source() && !cert_identity && a.acl_file.is_none() && allow_anonymous;
        Ok(Auth {
            password_path: a.password_file.clone(),
            acl_path: a.acl_file.clone(),
            files: RwLock::new(Arc::new(files)),
            token: token.map(Arc::new),
            cert_identity,
            allow_anonymous,
            open,
            push: PushTemplate::new(&config.push.topic_template),
            limiter: Limiter::new(a.max_failures, a.failure_window),
            workers: Workers::new(permits),
        })
    }

    /// SIGHUP: re-read the password file and the ACL file. On any error keep the old ones and
    /// return the error (the caller logs it). The JWT key is not re-read.
    pub fn reload(&self) -> Result<(), String> {
        if self.password_path.is_none() && self.acl_path.is_none() {
            return Ok(());
        }
        let files = Files::read(self.password_path.as_deref(), self.acl_path.as_deref())?;
        let users = files.passwords.as_ref().map_or(0, |p| p.len());
        *self.files.write() = Arc::new(files);
        tracing::info!(
            users,
            acl = self.acl_path.is_some(),
            "password file and ACL reloaded"
        );
        Ok(())
    }

    /// True when no authentication source, no cert identity and no ACL is configured and
    /// anonymous is allowed: every check below passes (but `$cluster/` and `$herald/` topics
    /// stay refused); the session uses this to skip all checks so auth-off costs nothing.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Proves who the client is and that it may use `client_id`. Every failure is counted
    /// (`herald_auth_failures_total`), logged at info without the password or token, and
    /// counted against the peer's address by the limiter.
    pub async fn authenticate(&self, c: Credentials<'_>) -> Result<Principal, Refusal> {
        if self.open {
            return Ok(Principal::Anonymous);
        }
        if self.limiter.is_blocked(c.peer) {
            self.log_failure(&c, AuthFailure::Blocked);
            return Err(Refusal::NotAuthorized);
        }
        match self.check(&c).await {
            Ok(p) => Ok(p),
            Err((refusal, reason)) => {
                self.limiter.record_failure(c.peer);
                self.log_failure(&c, reason);
                Err(refusal)
            }
        }
    }

    fn log_failure(&self, c: &Credentials<'_>, reason: AuthFailure) {
        metrics::auth_failure(reason);
        if reason == AuthFailure::Blocked {
            // A flood from one address would be one line per attempt; the counter has it.
            tracing::debug!(peer = %c.peer, client_id = %c.client_id, "login refused: too many failures from this address");
            return;
        }
        if crate::lograte::allow(crate::lograte::Reason::LoginRefused) {
            tracing::info!(
                peer = %c.peer,
                client_id = %c.client_id,
                username = %c.username.unwrap_or(""),
                reason = reason.label(),
                "login refused"
            );
        }
    }

    async fn check(&self, c: &Credentials<'_>) -> Result<Principal, Failure> {
        // 1. A verified client certificate is the identity; credentials are ignored then.
        if let Some(identity) = c.cert_identity.filter(|_| self.cert_identity) {
            return if identity.as_bytes() == c.client_id.as_bytes() {
                Ok(Principal::Device)
            } else {
                Err((Refusal::NotAuthorized, AuthFailure::ClientId))
            };
        }
        let files = self.files.read().clone();
        // 2. A password-file user.
        if let (Some(user), Some(passwords)) = (c.username, &files.passwords) {
            if let Some(hash) = passwords.hash_of(user) {
                let Some(password) = c.password else {
                    return Err((Refusal::BadCredentials, AuthFailure::BadPassword));
                };
                if !self.verify_password(hash, password).await {
                    return Err((Refusal::BadCredentials, AuthFailure::BadPassword));
                }
                if !self.user_may_use(&files, user, c.client_id) {
                    return Err((Refusal::NotAuthorized, AuthFailure::ClientId));
                }
                return Ok(Principal::User(Arc::from(user)));
            }
        }
        // 3. A device token in the password field.
        if let (Some(verifier), Some(token)) = (&self.token, c.password) {
            let verdict = if verifier.is_cheap() {
                verifier.verify(token)
            } else {
                let verifier = verifier.clone();
                let token = token.to_vec();
                self.workers
                    .run(move || verifier.verify(&token))
                    .await
                    .unwrap_or(Err(TokenError::Bad))
            };
            return match verdict {
                Ok(sub) if sub.as_bytes() == c.client_id.as_bytes() => Ok(Principal::Device),
                Ok(_) => Err((Refusal::NotAuthorized, AuthFailure::ClientId)),
                Err(TokenError::Expired) => {
                    Err((Refusal::NotAuthorized, AuthFailure::ExpiredToken))
                }
                Err(TokenError::Bad) => Err((Refusal::BadCredentials, AuthFailure::BadToken)),
            };
        }
        // 4. Credentials nothing can check.
        if c.username.is_some() || c.password.is_some() {
            if let Some(passwords) = &files.passwords {
                // Take as long as a wrong password would, so that timing does not tell
                // which user names exist.
                if let (Some(decoy), Some(password)) = (passwords.decoy(), c.password) {
                    self.verify_password(decoy, password).await;
                }
                return Err((Refusal::BadCredentials, AuthFailure::UnknownUser));
            }
            return Err((Refusal::NotAuthorized, AuthFailure::UnknownUser));
        }
        // 5. No credentials.
        if self.allow_anonymous {
            Ok(Principal::Anonymous)
        } else {
            Err((Refusal::NotAuthorized, AuthFailure::Anonymous))
        }
    }

    async fn verify_password(
        &self,
        hash: &argon2::password_hash::PasswordHashString,
        password: &[u8],
    ) -> bool {
        let hash = hash.clone();
        let secret = password.to_vec();
        self.workers
            .run(move || password::verify(&hash, &secret))
            .await
            .unwrap_or(false)
    }

    /// The client ids a user may connect with: its ACL `clientid` lines, else its user name
    /// alone or followed by a separator (`-`, `/`, `_`, `.`, `:`) and anything. A bare prefix
    /// is not enough: user `dev` must not connect as device `dev42`. An empty client id is
    /// always allowed (the broker generates one).
    fn user_may_use(&self, files: &Files, user: &str, client_id: &str) -> bool {
        if client_id.is_empty() {
            return true;
        }
        match files
            .acl
            .as_ref()
            .and_then(|acl| acl.clientid_allowed(user, client_id))
        {
            Some(allowed) => allowed,
            None => client_id
                .strip_prefix(user)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '/', '_', '.', ':'])),
        }
    }

    /// May this principal, connected as `client_id`, publish to `topic` (a topic name, no
    /// wildcards)? A refusal is counted (`herald_acl_denied_total{action="publish"}`).
    pub fn may_publish(&self, p: &Principal, client_id: &str, topic: &str) -> bool {
        let allowed = self.publish_allowed(p, client_id, topic);
        if !allowed {
            metrics::acl_denied(Denied::Publish);
        }
        allowed
    }

    /// May it still read `topic` (a topic name) now, at delivery? Checked when a message is
    /// written, as Mosquitto does, so that an ACL reloaded with a new `deny` also stops
    /// subscriptions made before it. Not counted here: the caller counts the dropped message.
    /// A client's own push topic is always readable: every client is subscribed to it.
    pub fn may_read(&self, p: &Principal, client_id: &str, topic: &str) -> bool {
        self.is_own_push_topic(client_id, topic) || self.subscribe_allowed(p, client_id, topic)
    }

    /// May it subscribe to `filter` (may contain + and #)? A refusal is counted
    /// (`herald_acl_denied_total{action="subscribe"}`).
    pub fn may_subscribe(&self, p: &Principal, client_id: &str, filter: &str) -> bool {
        let allowed = self.subscribe_allowed(p, client_id, filter);
        if !allowed {
            metrics::acl_denied(Denied::Subscribe);
        }
        allowed
    }

    fn publish_allowed(&self, p: &Principal, client_id: &str, topic: &str) -> bool {
        if is_internal(topic) {
            return false;
        }
        if self.open {
            return true;
        }
        let files = self.files.read();
        match (&files.acl, p) {
            (None, Principal::Anonymous | Principal::User(_)) => true,
            (None, Principal::Device) => false,
            (Some(acl), p) => acl.may_publish(who(p, client_id), topic),
        }
    }

    fn subscribe_allowed(&self, p: &Principal, client_id: &str, filter: &str) -> bool {
        if is_internal(filter) {
            return false;
        }
        if self.open {
            return true;
        }
        if *p == Principal::Device && self.is_own_push_topic(client_id, filter) {
            return true;
        }
        let files = self.files.read();
        match (&files.acl, p) {
            (None, Principal::Anonymous | Principal::User(_)) => true,
            (None, Principal::Device) => false,
            (Some(acl), p) => acl.may_subscribe(who(p, client_id), filter),
        }
    }

    fn is_own_push_topic(&self, client_id: &str, filter: &str) -> bool {
        !client_id.is_empty() && self.push.owner_of_filter(filter) == Some(client_id)
    }
}

/// Whose ACL rules apply: a device's block is the one named by its identity, its client id.
fn who<'a>(p: &'a Principal, client_id: &'a str) -> Who<'a> {
    match p {
        Principal::Anonymous => Who::Anonymous,
        Principal::Device => Who::Named {
            name: client_id,
            client_id,
        },
        Principal::User(name) => Who::Named { name, client_id },
    }
}

/// Herald's own topic spaces (cluster links, internal state): never for clients.
fn is_internal(topic: &str) -> bool {
    ["$cluster", "$herald"].iter().any(|space| {
        topic
            .strip_prefix(space)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use password::tests::cheap_hash;
    use std::net::Ipv4Addr;
    use std::time::Duration;
    use token::tests::{es256_keys, es256_token, hs256_token, now, SECRET};

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
    async fn internal_topics_are_always_refused() {
        let open = Setup::new().auth();
        let closed = Setup::new().passwords(&[("backend", "pw")]).auth();
        let acl = Setup::new()
            .passwords(&[("backend", "pw")])
            .acl("topic readwrite #\ntopic $cluster/#\ntopic $herald/#\nuser backend\ntopic readwrite #\ntopic $cluster/#\ntopic $herald/#\ntopic $herald\n")
            .auth();
        for a in [&open, &closed, &acl] {
            for p in [Principal::Anonymous, Principal::Device, user("backend")] {
                for t in ["$cluster", "$cluster/x", "$herald", "$herald/route/1"] {
                    assert!(!a.may_publish(&p, "backend", t), "{p:?} {t}");
                    assert!(!a.may_subscribe(&p, "backend", t), "{p:?} {t}");
                }
                assert!(!a.may_subscribe(&p, "backend", "$herald/#"));
                assert!(!a.may_subscribe(&p, "backend", "$cluster/+"));
            }
        }
        // Only those spaces.
        assert!(open.may_publish(&Principal::Anonymous, "x", "$heraldic"));
        assert!(open.may_subscribe(&Principal::Anonymous, "x", "$SYS/#"));
    }

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

    #[tokio::test]
    async fn default_device_backend_split() {
        let a = Setup::new().passwords(&[("backend", "pw")]).hs256().auth();
        let d = Principal::Device;
        assert!(a.may_subscribe(&d, "dev1", "push/dev1"));
        assert!(!a.may_subscribe(&d, "dev1", "push/dev2"));
        assert!(!a.may_subscribe(&d, "dev1", "push/+"));
        assert!(!a.may_subscribe(&d, "dev1", "push/#"));
        assert!(!a.may_subscribe(&d, "dev1", "#"));
        assert!(!a.may_subscribe(&d, "", "push/"));
        assert!(!a.may_publish(&d, "dev1", "push/dev1"));
        assert!(!a.may_publish(&d, "dev1", "telemetry/dev1"));
        let b = user("backend");
        assert!(a.may_publish(&b, "backend-1", "push/dev1"));
        assert!(a.may_publish(&b, "backend-1", "jobs/x"));
        assert!(a.may_subscribe(&b, "backend-1", "#"));
        assert!(a.may_subscribe(&b, "backend-1", "push/dev1"));
    }

    #[tokio::test]
    async fn device_with_acl_keeps_its_push_topic() {
        let mut s = Setup::new()
            .hs256()
            .acl("topic read public/#\nuser dev1\ntopic write telemetry/dev1\ntopic deny push/#\npattern read config/%c\n");
        s.config.push.topic_template = "dev/{client_id}/inbox".into();
        s.config.auth.allow_anonymous = Some(true);
        let a = s.auth();
        let d = Principal::Device;
        assert!(a.may_subscribe(&d, "dev1", "dev/dev1/inbox"));
        assert!(!a.may_subscribe(&d, "dev1", "dev/dev2/inbox"));
        assert!(a.may_publish(&d, "dev1", "telemetry/dev1"));
        assert!(!a.may_publish(&d, "dev2", "telemetry/dev1"));
        assert!(a.may_subscribe(&d, "dev2", "config/dev2"));
        assert!(!a.may_subscribe(&d, "dev2", "config/dev1"));
        assert!(!a.may_subscribe(&d, "dev1", "public/x"));
        let anon = Principal::Anonymous;
        assert!(a.may_subscribe(&anon, "x", "public/x"));
        assert!(!a.may_publish(&anon, "x", "public/x"));
        assert!(!a.may_subscribe(&anon, "x", "config/x"));
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
}
