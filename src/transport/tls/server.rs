//! The server side of TLS, for the MQTT listeners: loading, reloading (see the parent
//! module on rotation) and the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use super::pem::{read_certs, read_key, read_roots};
use super::{key_error, provider, TlsStream, VERSIONS};

/// The server side of TLS: certificate chain + key (PEM; RSA, ECDSA or Ed25519 key in PKCS#8,
/// PKCS#1 or SEC1), TLS 1.2 and 1.3, optional client-certificate verification against a CA
/// (mutual TLS). Reloadable: SIGHUP calls `reload()`; a bad new file keeps the old config
/// and returns why.
pub struct TlsServer {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    config: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsServer {
    /// `cert`, `key`: `tls.cert`/`tls.key`; `client_ca`: `tls.client_ca` (Some = every client
    /// must present a certificate that CA signed; a client without one, or with one from
    /// another CA, fails the handshake). Errors name the config key, the file and the reason,
    /// e.g. "tls.key: /x/key.pem: no private key found".
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsServer, String> {
        let config = server_config(cert, key, client_ca)?;
        Ok(TlsServer {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
            config: RwLock::new(config),
        })
    }

    /// Re-reads the same paths. On error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.cert, &self.key, self.client_ca.as_deref())?;
        *self.config.write() = config;
        Ok(())
    }

    /// Whether clients must present a certificate (`tls.client_ca` is set).
    pub fn requires_client_cert(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The current rustls config (what `accept` uses), for a listener that drives the
    /// handshake itself.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.read().clone()
    }

    /// The handshake, over TCP or any other byte stream (WebSocket over TLS runs the TLS
    /// handshake on the TCP stream, then the WebSocket upgrade on the `TlsStream`). The
    /// caller wraps it in its connect timeout. Returns the stream and, when the client
    /// presented a (verified) certificate, its identity: the subject CN, or if there is no CN
    /// the first DNS SAN (`None` if the certificate has neither).
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
    ) -> std::io::Result<(TlsStream<S>, Option<String>)> {
        let config = self.config();
        let stream = TlsStream::accept(io, config).await?;
        let identity = stream
            .tls()
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| crate::transport::cert_identity(leaf));
        Ok((stream, identity))
    }
}

fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = read_certs(cert).map_err(|e| format!("tls.cert: {e}"))?;
    let key_der = read_key(key).map_err(|e| format!("tls.key: {e}"))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = read_roots(ca).map_err(|e| format!("tls.client_ca: {e}"))?;
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| format!("tls.client_ca: {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key_der).map_err(|e| {
        format!(
            "tls.cert/tls.key: {} and {}: {}",
            cert.display(),
            key.display(),
            key_error(&e)
        )
    })?;
    Ok(Arc::new(config))
}
