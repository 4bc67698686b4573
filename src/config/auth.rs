//! `[auth]`: the password file, device tokens, the ACL, anonymous clients, the failure
//! limiter; and `Config::allow_anonymous`, whose default depends on `[tls]` too.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::values::Secret;
use super::{Config, TlsIdentity};

/// Who may connect and what they may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Default: true only when no authentication source is configured.
    pub allow_anonymous: Option<bool>,
    /// Users in Mosquitto's `user:hash` format, argon2id hashes (`herald passwd`).
    pub password_file: Option<PathBuf>,
    /// Mosquitto-style acl_file, plus `clientid` lines.
    pub acl_file: Option<PathBuf>,
    /// HS256 key of device tokens (JWT sent as the MQTT password).
    pub jwt_hs256_secret: Option<Secret>,
    /// PEM public key of device tokens signed with RS256 or ES256.
    pub jwt_public_key: Option<PathBuf>,
    /// Failed logins from one address within `failure_window` after which further
    /// attempts from it are closed before any password work.
    pub max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: None,
            password_file: None,
            acl_file: None,
            jwt_hs256_secret: None,
            jwt_public_key: None,
            max_failures: 10,
            failure_window: Duration::from_secs(60),
        }
    }
}

impl AuthConfig {
    /// Any source that can prove who a client is, besides client certificates.
    pub fn has_source(&self) -> bool {
        self.password_file.is_some()
            || self.jwt_hs256_secret.is_some()
            || self.jwt_public_key.is_some()
    }
}

impl Config {
    /// Whether clients without credentials may connect (`auth.allow_anonymous`, else true
    /// only when nothing can authenticate anyone).
    pub fn allow_anonymous(&self) -> bool {
        self.auth
            .allow_anonymous
            .unwrap_or(!self.auth.has_source() && self.tls.identity != TlsIdentity::Cert)
    }
}
