//! Configuration: built-in defaults, overridden by a TOML file, overridden by CLI flags.
//!
//! Every key has a default so `herald` runs with no file at all. Unknown keys and bad values
//! are rejected at start with the file, the key path and the reason, because a typo that is
//! silently ignored in a broker config becomes an outage months later.
//!
//! One file per TOML section (`[server]` is `server.rs`, and so on: `session`, `push`,
//! `store`, `log`, `metrics`, `cluster`, `tls`, `auth`, `http`), each with its keys, their defaults
//! and the types of their values. Besides those:
//! - `mod.rs` (here): the whole `Config`, reading it from TOML, `ConfigError`;
//! - `values.rs`: value formats: listener addresses, byte sizes, secrets;
//! - `validate.rs`: the checks serde cannot express;
//! - `tests.rs`: unit tests.

mod auth;
mod cluster;
mod http;
mod log;
mod metrics;
mod push;
mod server;
mod session;
mod store;
#[cfg(test)]
mod tests;
mod tls;
mod validate;
mod values;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use auth::AuthConfig;
pub use cluster::ClusterConfig;
pub use http::HttpConfig;
pub use log::{LogConfig, LogFormat};
pub use metrics::MetricsConfig;
pub use push::PushConfig;
pub use server::ServerConfig;
pub use session::{OverflowPolicy, SessionConfig};
pub use store::{StoreConfig, StoreKind};
pub use tls::{TlsConfig, TlsIdentity};
pub use values::{parse_byte_size, Secret};

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
    pub http: HttpConfig,
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
}
