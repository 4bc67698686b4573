//! The client side of TLS, for Herald's own outgoing connections.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;

use super::pem::{read_certs, read_key, read_roots};
use super::{key_error, provider, VERSIONS};

/// Client side, for the node-to-node link (`cluster.tls`) and Redis over TLS (`rediss://`):
/// trusts exactly the CA(s) in `ca` (PEM), TLS 1.2/1.3, ring provider. With `client_cert`
/// (chain, key): also presents this chain and key, for a peer that requires client
/// certificates. Errors name the file and the reason; the caller adds its config key.
pub fn client_config(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = read_roots(ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| {
                format!(
                    "{} and {}: {}",
                    cert.display(),
                    key.display(),
                    key_error(&e)
                )
            })?,
    };
    Ok(Arc::new(config))
}
