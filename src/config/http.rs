//! `[http]`: the backend HTTP API (`crate::http`), off unless `listen` is set.
//!
//! Tokens are secrets (`Secret`: never printed). Without any, the API may listen only on a
//! loopback address (`validate.rs`): an open push API on a public address would let anyone
//! write to every device.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::values::{byte_size, listen_addr};
use super::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// The API's listener (`POST /v1/push/{client_id}`, `POST /v1/push`,
    /// `GET /v1/clients/{client_id}`); `""` or absent: off.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: Option<SocketAddr>,
    /// Bearer tokens, any of which authorizes a request. None (here and in `tokens_file`):
    /// loopback only, no auth.
    pub tokens: Vec<Secret>,
    /// More tokens, one per line (blank lines and `#` comments skipped), so that they can
    /// live in a file of their own (mode 600, a secret store's mount) rather than the config.
    pub tokens_file: Option<PathBuf>,
    /// Messages in one `POST /v1/push`.
    pub max_batch: usize,
    /// Bytes of one `POST /v1/push` body.
    #[serde(deserialize_with = "byte_size")]
    pub max_batch_bytes: usize,
    /// How long a receipt (`receipt=true`) is kept after its last change.
    #[serde(with = "humantime_serde")]
    pub receipt_ttl: Duration,
    /// `http://` or `https://` URL Herald POSTs receipts to (`acked`, `expired`, `dropped`);
    /// a secret, since it may carry credentials. None: receipts are only read by
    /// `GET /v1/messages/{id}`.
    pub receipt_webhook: Option<Secret>,
    /// Receipts waiting for the webhook, at most (count, and bytes in memory); beyond it the
    /// oldest are dropped and counted.
    pub receipt_queue: usize,
    #[serde(deserialize_with = "byte_size")]
    pub receipt_queue_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            tokens: Vec::new(),
            tokens_file: None,
            max_batch: 1000,
            max_batch_bytes: 16 << 20,
            receipt_ttl: Duration::from_secs(24 * 3600),
            receipt_webhook: None,
            receipt_queue: 100_000,
            receipt_queue_bytes: 64 << 20,
        }
    }
}

impl HttpConfig {
    /// `tokens` and those of `tokens_file`, or why the file cannot be used (its reason never
    /// quotes a token).
    pub fn all_tokens(&self) -> Result<Vec<Secret>, String> {
        let mut all = self.tokens.clone();
        if let Some(path) = &self.tokens_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            for (i, line) in text.lines().enumerate() {
                let t = line.trim();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                if t.len() < 16 {
                    return Err(format!(
                        "{}:{}: a token must be at least 16 characters",
                        path.display(),
                        i + 1
                    ));
                }
                all.push(Secret::new(t));
            }
        }
        Ok(all)
    }
}
