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
//!
//! Files:
//! - `mod.rs` (here): what a CONNECT offers (`Credentials`), what it comes to (`Principal`,
//!   `Refusal`), and the gate itself (`Auth`);
//! - `load.rs`: reading the password file, the ACL file and the JWT key, at start and on
//!   SIGHUP;
//! - `authenticate.rs`: who a CONNECT proves to be (`Auth::authenticate`);
//! - `authorize.rs`: what a principal may publish, read and subscribe to;
//! - `workers.rs`: the bounded blocking pool for argon2 and public-key signatures;
//! - `password.rs`, `acl.rs`, `token.rs`: the password file, the ACL file, device tokens;
//! - `limiter.rs`: recent failures per address;
//! - `tests/`: unit tests of the gate (`acl`, `password`, `token` and `limiter` keep theirs
//!   inline).

pub mod acl;
mod authenticate;
mod authorize;
pub mod limiter;
mod load;
pub mod password;
#[cfg(test)]
mod tests;
pub mod token;
mod workers;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::topic::PushTemplate;

use limiter::Limiter;
use load::Files;
use token::Verifier;
use workers::Workers;

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

impl Auth {
    /// True when no authentication source, no cert identity and no ACL is configured and
    /// anonymous is allowed: every check passes (but `$cluster/` and `$herald/` topics
    /// stay refused); the session uses this to skip all checks so auth-off costs nothing.
    pub fn is_open(&self) -> bool {
        self.open
    }
}
