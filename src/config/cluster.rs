//! `[cluster]`: many nodes over one Redis.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::values::Secret;

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
    /// How long a draining node (SIGTERM, `POST /admin/drain`) takes to close its device
    /// connections, in batches spread over this time, so that they reconnect to the other
    /// nodes without a storm.
    #[serde(with = "humantime_serde")]
    pub drain_duration: Duration,
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
            drain_duration: Duration::from_secs(30),
        }
    }
}
