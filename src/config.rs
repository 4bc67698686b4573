//! Configuration: built-in defaults, overridden by a TOML file, overridden by CLI flags.
//!
//! Every key has a default so `herald` runs with no file at all. Unknown keys and bad values
//! are rejected at start with the file, the key path and the reason, because a typo that is
//! silently ignored in a broker config becomes an outage months later.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: key `{key}`: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub session: SessionConfig,
    pub push: PushConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub cluster: ClusterConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// MQTT over TCP; `""` turns it off (a TLS-only deployment).
    #[serde(deserialize_with = "listen_addr")]
    pub listen: Option<SocketAddr>,
    /// MQTT over TLS (conventionally port 8883); needs `tls.cert` and `tls.key`.
    #[serde(deserialize_with = "listen_addr")]
    pub tls_listen: Option<SocketAddr>,
    /// MQTT over WebSocket (path `/mqtt`).
    #[serde(deserialize_with = "listen_addr")]
    pub ws_listen: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS (same certificate as `tls_listen`).
    #[serde(deserialize_with = "listen_addr")]
    pub wss_listen: Option<SocketAddr>,
    /// Connections beyond this are closed right after accept.
    pub max_connections: usize,
    /// A socket that has not sent CONNECT within this time is closed.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest accepted packet (remaining length), bytes.
    #[serde(deserialize_with = "byte_size")]
    pub max_packet_size: usize,
    /// Bytes a client may send before its CONNECT is complete. A CONNECT that carries a will
    /// may be larger, up to `max_packet_size`.
    #[serde(deserialize_with = "byte_size")]
    pub max_connect_size: usize,
    /// Bytes of encoded packets waiting for a slow reader, checked on every append: live
    /// messages beyond it wait in the mailbox (QoS 0) or the outbox (QoS 1/2). One packet
    /// larger than this still goes out alone.
    #[serde(deserialize_with = "byte_size")]
    pub max_write_buffer: usize,
    /// Memory guard: above 90% of this resident size the node stops reading from
    /// publishers, above 95% it also refuses new connections (CONNACK 3). 0: 90% of the
    /// cgroup's memory limit when there is one, else no guard.
    #[serde(deserialize_with = "byte_size")]
    pub max_memory: usize,
    /// How long graceful shutdown waits for connections to close.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Unacknowledged outbound QoS 1/2 messages per connection; the rest wait in order.
    pub max_inflight: usize,
    /// Outbox cap per client (messages waiting for a PUBACK, online or offline).
    pub max_queued_messages: usize,
    /// What happens to a message for a full outbox.
    pub overflow: OverflowPolicy,
    /// Live messages waiting in a connection's mailbox before QoS 0 ones are dropped.
    pub max_mailbox: usize,
    /// The same bound in bytes (topic + payload). A single message larger than this is
    /// still taken by an empty mailbox.
    #[serde(deserialize_with = "byte_size")]
    pub max_mailbox_bytes: usize,
    /// Filters one client may hold (its push topic aside); SUBSCRIBE beyond it gets 0x80.
    pub max_subscriptions: usize,
    /// Outbox cap per client in bytes (topic + payload), next to `max_queued_messages`;
    /// `overflow` says what gives way.
    #[serde(deserialize_with = "byte_size")]
    pub max_queued_bytes: usize,
    /// Stored messages expire after this long (0 = never).
    #[serde(with = "humantime_serde")]
    pub message_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    DropOldest,
    DropNew,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Subscribe every client to its own push topic on CONNECT.
    pub enabled: bool,
    /// Must contain `{client_id}` exactly once.
    pub topic_template: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Redis to use with `kind = "redis"`: `redis://[:password@]host:port/db`, or
    /// `redis+sentinel://host:port[,host:port...]/service[/db]` for a Sentinel set.
    pub redis_url: String,
    /// Acknowledge a publish only once this many Redis replicas hold it (Redis `WAIT`).
    pub redis_wait_replicas: u32,
    /// PEM CA bundle that signs the Redis server's certificate, for `rediss://` (managed
    /// Redis with a private CA); default: the system's roots.
    pub redis_ca: Option<PathBuf>,
    /// Memory store: messages held over all clients; beyond it new ones are refused (counted).
    pub max_messages: usize,
    /// Memory store: bytes (topic + payload) held over all clients; beyond it new messages
    /// are refused (counted), as with `max_messages`.
    #[serde(deserialize_with = "byte_size")]
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "herald=debug".
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Prometheus scrape endpoint; off when absent.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Node-to-node listener; setting it turns clustering on (requires the Redis store).
    pub listen: Option<SocketAddr>,
    /// Address other nodes dial for this node; default: the bound `listen` address.
    pub advertise: Option<SocketAddr>,
    /// Default: `<hostname>:<client port>`.
    pub node_id: Option<String>,
    /// How often connected clients' routes and outboxes are re-checked in Redis: the bound
    /// on the delay a lost forward can cause.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// TTL of the node's alive key (refreshed every third of it): how long a killed node's
    /// routes are still believed.
    #[serde(with = "humantime_serde")]
    pub node_ttl: Duration,
    /// Shared secret every node presents on the node-to-node link (its CONNECT password).
    /// Required when clustering is on; also read from `HERALD_CLUSTER_SECRET`.
    pub secret: Option<Secret>,
    /// TLS on the node-to-node link, with `tls.cert`/`tls.key`; peers are verified against
    /// `tls_ca`.
    pub tls: bool,
    /// CA that signs the other nodes' certificates (default: `tls.client_ca`).
    pub tls_ca: Option<PathBuf>,
}

/// TLS for the MQTT listeners (and the cluster link with `cluster.tls`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM private key (RSA, ECDSA or Ed25519; PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM CA: when set, every TLS client must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// `"cert"`: a client certificate's CN (or first DNS SAN) is the device's identity and
    /// must equal its client id.
    pub identity: TlsIdentity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TlsIdentity {
    #[default]
    None,
    Cert,
}

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

/// A secret from the config: never printed, not even by `{:?}`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A listener address; `""` means off.
fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// A size in bytes: an integer, or a string with a unit ("64KiB", "16 MiB", "1GB").
fn byte_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    let n = match Size::deserialize(d)? {
        Size::Int(n) => n,
        Size::Text(s) => parse_byte_size(&s).map_err(serde::de::Error::custom)?,
    };
    usize::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} bytes is too large")))
}

pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 65536, \"64KiB\", \"16MiB\")"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: None,
            advertise: None,
            node_id: None,
            sweep_interval: Duration::from_secs(5),
            node_ttl: Duration::from_secs(10),
            secret: None,
            tls: false,
            tls_ca: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 1883))),
            tls_listen: None,
            ws_listen: None,
            wss_listen: None,
            max_connections: 100_000,
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 1024 * 1024,
            max_connect_size: 64 * 1024,
            max_write_buffer: 256 * 1024,
            max_memory: 0,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_inflight: 32,
            max_queued_messages: 1000,
            overflow: OverflowPolicy::DropOldest,
            max_mailbox: 1000,
            max_mailbox_bytes: 512 * 1024,
            max_subscriptions: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            message_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: true,
            topic_template: "push/{client_id}".into(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            redis_url: "redis://127.0.0.1:6379/0".into(),
            redis_wait_replicas: 0,
            redis_ca: None,
            max_messages: 10_000_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            // toml's message carries line/column and the offending text; keep its first
            // meaningful line so the error names the reason without the ASCII art.
            let reason = e.inner().message().to_string();
            let line = e
                .inner()
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            ConfigError::Invalid {
                file: match line {
                    Some(l) => format!("{origin}:{l}"),
                    None => origin.to_string(),
                },
                key,
                reason,
            }
        })?;
        let mut config = config;
        config.apply_env();
        config.validate(origin)?;
        Ok(config)
    }

    /// Secrets that may come from the environment instead of a file or the command line
    /// (where `ps` would show them): `HERALD_CLUSTER_SECRET` when `cluster.secret` is unset.
    pub fn apply_env(&mut self) {
        if self.cluster.secret.is_none() {
            if let Ok(s) = std::env::var("HERALD_CLUSTER_SECRET") {
                self.cluster.secret = Some(Secret::new(s));
            }
        }
    }

    /// Checks relations serde cannot express. Also called after CLI overrides.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Invalid {
                file: origin.to_string(),
                key: key.to_string(),
                reason,
            })
        };
        let s = &self.session;
        if s.max_inflight == 0 || s.max_inflight > 1024 {
            return bad(
                "session.max_inflight",
                format!("{} is out of range 1..=1024", s.max_inflight),
            );
        }
        // Packet ids are derived from outbox sequence numbers (seq % 65535 + 1), so an
        // outbox larger than the id space could put two live messages on one id.
        if s.max_queued_messages == 0 || s.max_queued_messages > 60_000 {
            return bad(
                "session.max_queued_messages",
                format!("{} is out of range 1..=60000", s.max_queued_messages),
            );
        }
        if self.store.max_messages == 0 {
            return bad("store.max_messages", "must be at least 1".into());
        }
        if s.max_mailbox == 0 {
            return bad("session.max_mailbox", "must be at least 1".into());
        }
        if self.server.max_packet_size < 16 || self.server.max_packet_size > 268_435_455 {
            return bad(
                "server.max_packet_size",
                format!(
                    "{} is out of range 16..=268435455",
                    self.server.max_packet_size
                ),
            );
        }
        if self.server.max_write_buffer < 1024 {
            return bad("server.max_write_buffer", "must be at least 1024".into());
        }
        if self.server.max_connect_size < 128 {
            return bad("server.max_connect_size", "must be at least 128".into());
        }
        if s.max_subscriptions == 0 {
            return bad("session.max_subscriptions", "must be at least 1".into());
        }
        if s.max_mailbox_bytes < 1024 {
            return bad("session.max_mailbox_bytes", "must be at least 1024".into());
        }
        if s.max_queued_bytes < 1024 {
            return bad("session.max_queued_bytes", "must be at least 1024".into());
        }
        if self.store.max_bytes < 1024 {
            return bad("store.max_bytes", "must be at least 1024".into());
        }
        if self.server.max_memory != 0 && self.server.max_memory < 16 << 20 {
            return bad(
                "server.max_memory",
                "must be 0 (automatic) or at least 16MiB".into(),
            );
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections", "must be at least 1".into());
        }
        if self.server.connect_timeout.is_zero() {
            return bad("server.connect_timeout", "must be more than 0s".into());
        }
        let t = &self.push.topic_template;
        if t.matches("{client_id}").count() != 1 {
            return bad(
                "push.topic_template",
                format!("{t:?} must contain {{client_id}} exactly once"),
            );
        }
        if t.contains('+') || t.contains('#') {
            return bad(
                "push.topic_template",
                format!("{t:?} must not contain wildcards"),
            );
        }
        if self.store.kind == StoreKind::Redis {
            if let Err(e) = crate::redis::Redis::validate_url(&self.store.redis_url) {
                return bad("store.redis_url", e);
            }
        }
        let c = &self.cluster;
        if let Some(listen) = c.listen {
            if self.store.kind != StoreKind::Redis {
                return bad(
                    "cluster.listen",
                    "clustering needs the shared store: set store.kind = \"redis\"".into(),
                );
            }
            if listen.ip().is_unspecified() && c.advertise.is_none() {
                return bad(
                    "cluster.advertise",
                    format!("required when cluster.listen is {listen}: other nodes need an address to dial"),
                );
            }
        }
        if c.node_id
            .as_ref()
            .is_some_and(|n| n.is_empty() || n.len() > 200)
        {
            return bad("cluster.node_id", "must be 1..=200 characters".into());
        }
        if c.sweep_interval < Duration::from_millis(100) {
            return bad("cluster.sweep_interval", "must be at least 100ms".into());
        }
        if c.node_ttl < Duration::from_secs(1) {
            return bad("cluster.node_ttl", "must be at least 1s".into());
        }
        self.validate_security(origin)?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return bad("log.level", e.to_string());
        }
        Ok(())
    }
}

impl Config {
    /// Listeners, TLS, authentication and the cluster secret.
    fn validate_security(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                file: origin.to_string(),
                key: key.to_string(),
                reason: reason.to_string(),
            })
        };
        let s = &self.server;
        if s.listen.is_none()
            && s.tls_listen.is_none()
            && s.ws_listen.is_none()
            && s.wss_listen.is_none()
        {
            return bad(
                "server.listen",
                "no client listener: set at least one of listen, tls_listen, ws_listen, wss_listen",
            );
        }
        let needs_cert = s.tls_listen.is_some() || s.wss_listen.is_some() || self.cluster.tls;
        if needs_cert && self.tls.cert.is_none() {
            return bad(
                "tls.cert",
                "required by server.tls_listen, server.wss_listen or cluster.tls",
            );
        }
        if needs_cert && self.tls.key.is_none() {
            return bad(
                "tls.key",
                "required by server.tls_listen, server.wss_listen or cluster.tls",
            );
        }
        if self.tls.client_ca.is_some() && s.tls_listen.is_none() && s.wss_listen.is_none() {
            return bad(
                "tls.client_ca",
                "set, but there is no TLS listener (server.tls_listen or server.wss_listen)",
            );
        }
        if self.tls.identity == TlsIdentity::Cert && self.tls.client_ca.is_none() {
            return bad(
                "tls.identity",
                "\"cert\" needs tls.client_ca (the CA of the device certificates)",
            );
        }
        let a = &self.auth;
        if a.jwt_hs256_secret.is_some() && a.jwt_public_key.is_some() {
            return bad(
                "auth.jwt_public_key",
                "set only one of auth.jwt_hs256_secret and auth.jwt_public_key",
            );
        }
        if a.jwt_hs256_secret
            .as_ref()
            .is_some_and(|k| k.expose().len() < 32)
        {
            return bad("auth.jwt_hs256_secret", "must be at least 32 bytes (a shorter HMAC key can be guessed offline from any token)");
        }
        if a.max_failures == 0 {
            return bad("auth.max_failures", "must be at least 1");
        }
        if a.acl_file.is_some() && !a.has_source() && self.tls.identity != TlsIdentity::Cert {
            return bad("auth.acl_file", "set, but no authentication source (password_file, a JWT key or tls.identity = \"cert\") names anyone");
        }
        let c = &self.cluster;
        if c.listen.is_some() {
            match &c.secret {
                None => return bad("cluster.secret", "required when clustering is on (cluster.listen): the node-to-node listener accepts only nodes that present it; set it in the file or in HERALD_CLUSTER_SECRET"),
                Some(k) if k.expose().len() < 16 => return bad("cluster.secret", "must be at least 16 characters"),
                Some(_) => {}
            }
        }
        if c.tls && c.tls_ca.is_none() && self.tls.client_ca.is_none() {
            return bad("cluster.tls_ca", "cluster.tls needs the CA of the nodes' certificates (cluster.tls_ca, or tls.client_ca)");
        }
        Ok(())
    }

    /// Whether clients without credentials may connect (`auth.allow_anonymous`, else true
    /// only when nothing can authenticate anyone).
    pub fn allow_anonymous(&self) -> bool {
        self.auth
            .allow_anonymous
            .unwrap_or(!self.auth.has_source() && self.tls.identity != TlsIdentity::Cert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_defaults() {
        let c = Config::from_toml("", "t.toml").unwrap();
        assert_eq!(c.server.listen.map(|l| l.port()), Some(1883));
        assert_eq!(c.session.max_inflight, 32);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = Config::from_toml("[session]\nmax_inflite = 3\n", "h.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("h.toml:2"), "{e}");
        assert!(e.contains("max_inflite"), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let e = Config::from_toml("[server]\nlisten = \"nope\"\n", "h.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.listen"), "{e}");
    }

    #[test]
    fn range_checked() {
        let e = Config::from_toml("[session]\nmax_inflight = 0\n", "h.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("session.max_inflight"), "{e}");
    }

    #[test]
    fn empty_listen_turns_tcp_off() {
        let e = Config::from_toml("[server]\nlisten = \"\"\n", "h.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no client listener"), "{e}");
        let c = Config::from_toml(
            "[server]\nlisten = \"\"\nws_listen = \"127.0.0.1:8080\"\n",
            "h.toml",
        )
        .unwrap();
        assert!(c.server.listen.is_none());
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = Config::from_toml(
            "[auth]\njwt_hs256_secret = \"0123456789abcdef0123456789abcdef-sekrit\"\n",
            "h.toml",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("sekrit"));
        assert!(!c.allow_anonymous());
    }

    #[test]
    fn cluster_needs_secret() {
        let e = Config::from_toml(
            "[store]\nkind = \"redis\"\n[cluster]\nlisten = \"127.0.0.1:7000\"\n",
            "h.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cluster.secret"), "{e}");
    }

    #[test]
    fn example_config_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/herald.toml");
        Config::from_file(Path::new(path)).unwrap();
    }

    #[test]
    fn byte_sizes_take_units() {
        let c = Config::from_toml(
            "[server]\nmax_write_buffer = \"64KiB\"\nmax_packet_size = 2048\n[store]\nmax_bytes = \"1 GiB\"\n",
            "h.toml",
        )
        .unwrap();
        assert_eq!(c.server.max_write_buffer, 64 * 1024);
        assert_eq!(c.server.max_packet_size, 2048);
        assert_eq!(c.store.max_bytes, 1 << 30);
        let e = Config::from_toml("[session]\nmax_queued_bytes = \"12 parsecs\"\n", "h.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("session.max_queued_bytes") && e.contains("h.toml:2"),
            "{e}"
        );
    }
}
