//! `[server]`: the client listeners and the limits of every connection.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::values::{byte_size, listen_addr};

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
