//! `[store]`: where outboxes live.

use std::path::PathBuf;

use serde::Deserialize;

use super::values::byte_size;

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
