//! The checks serde cannot express: ranges, and keys that depend on other keys or sections.
//! They stay together, in one fixed order, because only the first failure is reported: a
//! file with several mistakes always names the same one first.

use std::time::Duration;

use super::{Config, ConfigError, StoreKind, TlsIdentity};

impl Config {
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
        if c.drain_duration > Duration::from_secs(3600) {
            return bad("cluster.drain_duration", "must be at most 1h".into());
        }
        if c.node_ttl < Duration::from_secs(1) {
            return bad("cluster.node_ttl", "must be at least 1s".into());
        }
        self.validate_security(origin)?;
        self.validate_http(origin)?;
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
}

impl Config {
    /// The backend HTTP API: no public listener without tokens, bounds at least 1.
    fn validate_http(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Invalid {
                file: origin.to_string(),
                key: key.to_string(),
                reason,
            })
        };
        let h = &self.http;
        let Some(listen) = h.listen else {
            return Ok(());
        };
        let tokens = match h.all_tokens() {
            Ok(t) => t,
            Err(why) => return bad("http.tokens_file", why),
        };
        if tokens.is_empty() && !listen.ip().is_loopback() {
            return bad(
                "http.listen",
                format!("{listen} is not a loopback address and http.tokens is empty: anyone could push to every device; set http.tokens or listen on 127.0.0.1 / [::1]"),
            );
        }
        if h.tokens.iter().any(|t| t.expose().len() < 16) {
            return bad(
                "http.tokens",
                "every token must be at least 16 characters".into(),
            );
        }
        if !self.push.enabled {
            return bad(
                "http.listen",
                "the HTTP API pushes to push topics: it needs push.enabled = true".into(),
            );
        }
        if h.max_batch == 0 || h.max_batch > 100_000 {
            return bad(
                "http.max_batch",
                format!("{} is out of range 1..=100000", h.max_batch),
            );
        }
        if h.max_batch_bytes < 1024 {
            return bad("http.max_batch_bytes", "must be at least 1024".into());
        }
        if h.receipt_ttl.as_secs() < 1 {
            return bad("http.receipt_ttl", "must be at least 1s".into());
        }
        if h.receipt_queue == 0 || h.receipt_queue_bytes < 64 << 10 {
            return bad(
                "http.receipt_queue",
                "receipt_queue must be at least 1 and receipt_queue_bytes at least 64 KiB".into(),
            );
        }
        if let Some(url) = &h.receipt_webhook {
            // The reason never quotes the URL: it may hold a password.
            match reqwest::Url::parse(url.expose()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                Ok(_) => {
                    return bad(
                        "http.receipt_webhook",
                        "must be an http:// or https:// URL with a host".into(),
                    )
                }
                Err(e) => return bad("http.receipt_webhook", format!("not a URL: {e}")),
            }
        }
        Ok(())
    }
}
