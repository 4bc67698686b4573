//! Throw-away certificates for the transport tests, made with rcgen in a temporary directory
//! (no key is ever committed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
    /// `ca.pem` in the directory.
    pub pem: PathBuf,
}

pub fn ca(dir: &Path, name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issuer = CertifiedIssuer::self_signed(params, key).unwrap();
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&pem, issuer.pem()).unwrap();
    Ca { issuer, pem }
}

/// A leaf certificate and its key, written as `<name>.pem` (leaf, then the CA) and
/// `<name>.key` (PKCS#8). `cn`: the subject CN (`None`: an empty subject).
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

pub fn leaf(
    dir: &Path,
    name: &str,
    ca: &Ca,
    cn: Option<&str>,
    sans: &[&str],
    client: bool,
    alg: &'static SignatureAlgorithm,
) -> Leaf {
    let key = KeyPair::generate_for(alg).unwrap();
    leaf_with_key(dir, name, ca, cn, sans, client, key)
}

pub fn leaf_with_key(
    dir: &Path,
    name: &str,
    ca: &Ca,
    cn: Option<&str>,
    sans: &[&str],
    client: bool,
    key: KeyPair,
) -> Leaf {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let paths = Leaf {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        der: cert.der().to_vec(),
    };
    std::fs::write(&paths.cert, format!("{}{}", cert.pem(), ca.issuer.pem())).unwrap();
    std::fs::write(&paths.key, key.serialize_pem()).unwrap();
    paths
}

/// A server certificate for localhost / 127.0.0.1.
pub fn server_leaf(dir: &Path, name: &str, ca: &Ca, alg: &'static SignatureAlgorithm) -> Leaf {
    leaf(
        dir,
        name,
        ca,
        Some("localhost"),
        &["localhost", "127.0.0.1"],
        false,
        alg,
    )
}

/// A test client's config: trusts `ca`, only `versions`, optionally presents a certificate.
pub fn client(
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    cert: Option<&Leaf>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match cert {
        None => builder.with_no_client_auth(),
        Some(l) => builder
            .with_client_auth_cert(
                rustls_pki_types::CertificateDer::pem_file_iter(&l.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                rustls_pki_types::PrivateKeyDer::from_pem_file(&l.key).unwrap(),
            )
            .unwrap(),
    })
}

use rustls_pki_types::pem::PemObject;

/// A loopback listener and a connected client socket.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (server.unwrap().0, client.unwrap())
}

/// Whether the `openssl` command is there (for the keys rcgen cannot make with ring).
pub fn have_openssl() -> bool {
    std::process::Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
