//! `[tls]`: certificates for the listeners, and client certificates as identities.

use std::path::PathBuf;

use serde::Deserialize;

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
