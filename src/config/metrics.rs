//! `[metrics]`: the Prometheus endpoint.

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Prometheus scrape endpoint; off when absent.
    pub listen: Option<SocketAddr>,
}
