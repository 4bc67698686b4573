//! The client side of TLS (`--tls`): rustls with the ring provider and no session
//! resumption, so every connection costs the broker a full handshake.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// The client side of TLS: a rustls config without session resumption, and the name the
/// server's certificate must carry.
#[derive(Clone)]
pub struct Tls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// What the TLS handshakes of this process negotiated (every one is checked to be a full
/// handshake: resumption is off).
#[derive(Default)]
pub struct TlsStats {
    pub full: AtomicU64,
    pub resumed: AtomicU64,
    /// "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519" of the first handshake.
    pub first: OnceLock<String>,
}

pub fn tls_stats() -> &'static TlsStats {
    static S: OnceLock<TlsStats> = OnceLock::new();
    S.get_or_init(TlsStats::default)
}

/// TLS 1.2 and/or 1.3, ring provider, resumption disabled (no session cache, no tickets
/// sent back), trusting the CA in `cafile` (PEM), or nothing checked with `no_verify` (the
/// server's side of the handshake is the same either way; only this tool saves the
/// certificate chain and signature checks).
pub fn tls_config(
    cafile: Option<&std::path::Path>,
    no_verify: bool,
    versions: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match versions {
        "1.3" => &[&rustls::version::TLS13],
        "1.2" => &[&rustls::version::TLS12],
        "any" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        v => return Err(format!("--tls-version {v}: expected 1.3, 1.2 or any")),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("tls: {e}"))?;
    let mut config = if no_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let path = cafile.ok_or("--tls needs --cafile PEM (or --tls-no-verify)")?;
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no certificate", path.display()));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts any certificate (`--tls-no-verify`): the signature in CertificateVerify is not
/// checked either, which saves this tool an ECDSA verification per handshake.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
