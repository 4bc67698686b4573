//! Certificates for the tests, made with rcgen in a temp dir when a test process first needs
//! them (no key is ever committed): a CA, a server certificate for 127.0.0.1 and localhost,
//! and client certificates signed by that CA for any common name, plus a second CA that
//! Herald does not trust.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::PrivateKeyDer};

pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    other_ca: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its key on disk.
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("ca")
}

impl Pki {
    /// The process-wide test PKI.
    pub fn get() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir for test certificates");
            let pki = Pki {
                dir,
                ca: ca("Herald test CA"),
                other_ca: ca("Some other CA"),
            };
            std::fs::write(pki.ca_path(), pki.ca.pem()).expect("write ca.pem");
            std::fs::write(pki.dir.path().join("other-ca.pem"), pki.other_ca.pem())
                .expect("write other-ca.pem");
            pki.issue("server", &["127.0.0.1", "localhost"], None, false);
            pki
        })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn other_ca_path(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// The server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Files {
        self.files("server")
    }

    fn files(&self, name: &str) -> Files {
        Files {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        }
    }

    /// Writes `<name>.pem`/`<name>.key`: a certificate with these SANs (and `cn` as its
    /// subject CN, if given), signed by the test CA, or by the other CA with `untrusted`.
    pub fn issue(&self, name: &str, sans: &[&str], cn: Option<&str>, untrusted: bool) -> Files {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("params");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().expect("key");
        let issuer = if untrusted { &self.other_ca } else { &self.ca };
        let cert = params.signed_by(&key, issuer).expect("sign");
        let files = self.files(name);
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    /// A client certificate with this CN, signed by the test CA (or the other one).
    pub fn client(&self, cn: &str, untrusted: bool) -> Files {
        let name = format!("client-{cn}-{}", if untrusted { "other" } else { "ca" });
        self.issue(&name, &[], Some(cn), untrusted)
    }

    /// A rustls client config trusting the test CA, presenting `client` if given.
    pub fn client_config(&self, client: Option<&Files>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca.der().to_vec()))
            .expect("trust test CA");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some(f) => builder
                .with_client_auth_cert(read_certs(&f.cert), read_key(&f.key))
                .expect("client certificate"),
        };
        Arc::new(config)
    }
}

fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .expect("read certificate")
        .collect::<Result<_, _>>()
        .expect("parse certificate")
}

fn read_key(path: &Path) -> PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_file(path).expect("read key")
}

impl Pki {
    /// `client_config` limited to these protocol versions (a TLS 1.2-only or 1.3-only
    /// client).
    pub fn client_config_versions(
        &self,
        client: Option<&Files>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca.der().to_vec()))
            .expect("trust test CA");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some(f) => builder
                .with_client_auth_cert(read_certs(&f.cert), read_key(&f.key))
                .expect("client certificate"),
        };
        Arc::new(config)
    }
}

/// The DER of the first certificate in a PEM file (to compare with what a server presents).
pub fn cert_der(path: &Path) -> Vec<u8> {
    read_certs(path)
        .into_iter()
        .next()
        .expect("a certificate in the file")
        .to_vec()
}
