//! TLS with rustls (ring provider, TLS 1.2 and 1.3): the server side of the MQTT listeners
//! (`TlsServer`, reloadable, optional client certificates) and the client side of the
//! node-to-node link and Redis over TLS (`client_config`).
//!
//! The provider is always passed explicitly (`builder_with_provider`), never taken from a
//! process-wide default, so nothing depends on which crate installed one first.
//!
//! Rotation: `TlsServer::reload` (on SIGHUP) builds a new `ServerConfig` from the same paths
//! and swaps it in; connections already open keep the config they were accepted with. A file
//! that fails to load, or a key that does not match the certificate, leaves the old config
//! serving and returns the reason. The new config has a new session cache, so sessions from
//! before the reload are not resumed (a reload that changes `tls.client_ca` must not let an
//! old session skip the new check). Resumption itself is rustls's default: a 256-entry
//! stateful session cache (TLS 1.2 session ids, TLS 1.3 tickets that name a cache entry).
//!
//! ## Memory per idle connection
//!
//! `accept` returns our own `TlsStream` (see `tls_stream`), not tokio-rustls's: rustls's
//! buffered `ServerConnection`, which tokio-rustls wraps, keeps a 4 KiB record buffer for the
//! connection's whole life (`DeframerVecBuffer::prepare_read` sizes it to `used + 4096`
//! before every socket read and shrinks it back only to 4096, never to 0; it is zero-filled,
//! so resident). Its other buffers do empty: `received_plaintext` and `sendable_tls`
//! (`ChunkVecBuffer`: a `VecDeque` of one `Vec` per record) free each record once consumed
//! and keep only the deque's capacity; `set_buffer_limit` caps `sendable_tls` (64 KiB by
//! default), it releases nothing. Over the unbuffered API the 4 KiB goes, and an idle
//! `TlsStream` holds no buffer at all.
//!
//! Measured (2,000 idle connections to a `TlsServer` in one process, Python/OpenSSL clients
//! in another, each after a CONNECT-sized exchange; jemalloc; heap counted by a counting
//! allocator, RSS from `/proc/self/status`), on top of the same connection over plain TCP:
//! - inline: `TlsStream<TcpStream>` is 1,216 bytes against `TcpStream`'s 40 (the rustls
//!   state machine), held wherever the session holds its stream;
//! - heap: 2,364 B with TLS 1.3, 2,264 B with TLS 1.2, in 8 blocks: three of 640 B (the
//!   two record-layer keys, ring's AEAD key being sized for AES-GCM with its GHASH table
//!   whatever the suite, and the traffic-state box with the key schedule), a 224-byte HKDF
//!   expander, the two `VecDeque`s above (112 B each) and two small ones;
//! - with client certificates, +960 B: the client's chain, which rustls keeps for
//!   `peer_certificates` (and there is no call to drop it).
//!
//! So about 3.5 KB per idle TLS connection on top of its ~1 KB as plain MQTT. Through
//! tokio-rustls it was 6,460 B of heap (the 4 KiB buffer included) plus the same inline
//! state, about 7.6 KB. OpenSSL 3.0 set up as Mosquitto sets it up (`SSL_MODE_RELEASE_BUFFERS`,
//! no compression), same clients and exchange: 12.7 KB of RSS per idle TLS 1.3 connection,
//! 12.0 KB with TLS 1.2.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

pub use super::tls_stream::TlsStream;

/// The one crypto provider of Herald's TLS.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

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
            .and_then(|leaf| super::cert_identity(leaf));
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

fn key_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key does not match the certificate".into()
        }
        e => e.to_string(),
    }
}

/// Reads a whole file first, so that "cannot read" and "no certificate in it" are told apart.
fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// Every `CERTIFICATE` section of a PEM file, in order (leaf first for a chain).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// The first private key of a PEM file: `PRIVATE KEY` (PKCS#8), `RSA PRIVATE KEY` (PKCS#1)
/// or `EC PRIVATE KEY` (SEC1); other sections (certificates, EC parameters) are skipped.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_file(path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(k) => Ok(k),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            Err(format!("{}: no private key found", path.display()))
        }
        Err(e) => Err(format!("{}: bad PEM: {e}", path.display())),
    }
}

fn read_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

#[cfg(test)]
mod tests {
    use std::io;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::TlsConnector;

    use super::super::test_pki::{self, ca, client, leaf, server_leaf, Leaf};
    use super::*;

    const BOTH: &[&rustls::SupportedProtocolVersion] = VERSIONS;
    const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    const P256: &rcgen::SignatureAlgorithm = &rcgen::PKCS_ECDSA_P256_SHA256;

    type ServerSide = io::Result<(TlsStream<TcpStream>, Option<String>)>;
    type ClientSide = io::Result<tokio_rustls::client::TlsStream<TcpStream>>;

    /// Both ends of a handshake over a loopback socket.
    async fn handshake(
        server: &TlsServer,
        config: Arc<rustls::ClientConfig>,
    ) -> (ServerSide, ClientSide) {
        let (s, c) = test_pki::tcp_pair().await;
        let name = ServerName::try_from("localhost").unwrap();
        tokio::join!(
            server.accept(s),
            TlsConnector::from(config).connect(name, c)
        )
    }

    /// A handshake that must work: bytes go both ways; returns the client side (for the
    /// served certificate and version) and the identity.
    async fn good(
        server: &TlsServer,
        config: Arc<rustls::ClientConfig>,
    ) -> (tokio_rustls::client::TlsStream<TcpStream>, Option<String>) {
        let (s, c) = handshake(server, config).await;
        let (mut s, id) = s.expect("server side of the handshake");
        let mut c = c.expect("client side of the handshake");
        c.write_all(b"\x10\x0c ping").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0u8; 7];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x10\x0c ping");
        s.write_all(b"pong").await.unwrap();
        s.flush().await.unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        (c, id)
    }

    /// The client learns why with an alert: at once (TLS 1.2), or on its first read (TLS 1.3,
    /// where its side of the handshake ends before the server checks its certificate).
    async fn client_saw_alert(c: ClientSide) -> String {
        let e = match c {
            Err(e) => e,
            Ok(mut c) => {
                let mut buf = [0u8; 8];
                c.read(&mut buf).await.expect_err("the client read on")
            }
        };
        let e = e.to_string();
        assert!(e.contains("alert"), "{e}");
        e
    }

    fn served_cert(c: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
        c.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    fn version(c: &tokio_rustls::client::TlsStream<TcpStream>) -> rustls::ProtocolVersion {
        c.get_ref().1.protocol_version().unwrap()
    }

    #[tokio::test]
    async fn tls12_and_tls13_with_an_ecdsa_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "ca");
        let l = server_leaf(dir.path(), "server", &ca, P256);
        let server = TlsServer::load(&l.cert, &l.key, None).unwrap();
        assert!(!server.requires_client_cert());
        let (c, id) = good(&server, client(&ca.pem, TLS13, None)).await;
        assert_eq!(version(&c), rustls::ProtocolVersion::TLSv1_3);
        assert_eq!(id, None);
        let (c, _) = good(&server, client(&ca.pem, TLS12, None)).await;
        assert_eq!(version(&c), rustls::ProtocolVersion::TLSv1_2);
        assert_eq!(served_cert(&c), l.der);
    }

    #[tokio::test]
    async fn ed25519_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "ca");
        let l = server_leaf(dir.path(), "server", &ca, &rcgen::PKCS_ED25519);
        let server = TlsServer::load(&l.cert, &l.key, None).unwrap();
        for versions in [TLS13, TLS12] {
            let (c, _) = good(&server, client(&ca.pem, versions, None)).await;
            assert_eq!(served_cert(&c), l.der);
        }
    }

    /// rcgen cannot make RSA keys with ring, so openssl makes the key (skipped without
    /// openssl); the PKCS#8 and the PKCS#1 file of the same key both load.
    #[tokio::test]
    async fn rsa_key_pkcs8_and_pkcs1() {
        if !test_pki::have_openssl() {
            eprintln!("skipped: no openssl command to make an RSA key");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "ca");
        let p8 = dir.path().join("rsa.p8");
        let p1 = dir.path().join("rsa.p1");
        let (p8s, p1s) = (p8.to_str().unwrap(), p1.to_str().unwrap());
        test_pki::openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            p8s,
        ]);
        test_pki::openssl(&["rsa", "-in", p8s, "-traditional", "-out", p1s]);
        assert!(std::fs::read_to_string(&p1)
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY"));
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&p8).unwrap()).unwrap();
        let l = test_pki::leaf_with_key(
            dir.path(),
            "server",
            &ca,
            Some("localhost"),
            &["localhost"],
            false,
            key,
        );
        for key_file in [&l.key, &p1] {
            let server = TlsServer::load(&l.cert, key_file, None).unwrap();
            for versions in [TLS13, TLS12] {
                let (c, _) = good(&server, client(&ca.pem, versions, None)).await;
                assert_eq!(served_cert(&c), l.der);
            }
        }
    }

    /// An EC key as `openssl ecparam -genkey` writes it: an `EC PARAMETERS` section, then
    /// the key in SEC1 (`EC PRIVATE KEY`).
    #[tokio::test]
    async fn sec1_ec_key() {
        if !test_pki::have_openssl() {
            eprintln!("skipped: no openssl command to make a SEC1 key");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "ca");
        let sec1 = dir.path().join("ec.sec1");
        let p8 = dir.path().join("ec.p8");
        let (sec1s, p8s) = (sec1.to_str().unwrap(), p8.to_str().unwrap());
        test_pki::openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-out", sec1s]);
        test_pki::openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", sec1s, "-out", p8s]);
        let text = std::fs::read_to_string(&sec1).unwrap();
        assert!(text.contains("BEGIN EC PARAMETERS") && text.contains("BEGIN EC PRIVATE KEY"));
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&p8).unwrap()).unwrap();
        let l = test_pki::leaf_with_key(
            dir.path(),
            "server",
            &ca,
            Some("localhost"),
            &["localhost"],
            false,
            key,
        );
        let server = TlsServer::load(&l.cert, &sec1, None).unwrap();
        let (c, _) = good(&server, client(&ca.pem, BOTH, None)).await;
        assert_eq!(served_cert(&c), l.der);
    }

    /// A CA for clients, a server that requires its certificates, and clients.
    struct Mtls {
        _dir: tempfile::TempDir,
        server_ca: test_pki::Ca,
        server: TlsServer,
        dev42: Leaf,
        san_only: Leaf,
        stranger: Leaf,
    }

    fn mtls() -> Mtls {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = ca(dir.path(), "server-ca");
        let client_ca = ca(dir.path(), "client-ca");
        let other_ca = ca(dir.path(), "other-ca");
        let l = server_leaf(dir.path(), "server", &server_ca, P256);
        let dev42 = leaf(
            dir.path(),
            "dev42",
            &client_ca,
            Some("dev42"),
            &["dev42.example"],
            true,
            P256,
        );
        let san_only = leaf(
            dir.path(),
            "dev43",
            &client_ca,
            None,
            &["dev43.example", "other.example"],
            true,
            P256,
        );
        let stranger = leaf(
            dir.path(),
            "stranger",
            &other_ca,
            Some("dev42"),
            &[],
            true,
            P256,
        );
        let server = TlsServer::load(&l.cert, &l.key, Some(&client_ca.pem)).unwrap();
        Mtls {
            _dir: dir,
            server_ca,
            server,
            dev42,
            san_only,
            stranger,
        }
    }

    #[tokio::test]
    async fn client_certificate_cn_is_the_identity() {
        let m = mtls();
        assert!(m.server.requires_client_cert());
        for versions in [TLS13, TLS12] {
            let (_, id) = good(
                &m.server,
                client(&m.server_ca.pem, versions, Some(&m.dev42)),
            )
            .await;
            assert_eq!(id.as_deref(), Some("dev42"));
        }
    }

    #[tokio::test]
    async fn without_a_cn_the_first_dns_san_is_the_identity() {
        let m = mtls();
        let (_, id) = good(&m.server, client(&m.server_ca.pem, BOTH, Some(&m.san_only))).await;
        assert_eq!(id.as_deref(), Some("dev43.example"));
    }

    #[tokio::test]
    async fn no_client_certificate_fails_the_handshake() {
        let m = mtls();
        for versions in [TLS13, TLS12] {
            let (s, c) = handshake(&m.server, client(&m.server_ca.pem, versions, None)).await;
            let e = s.err().expect("a client without a certificate was let in");
            assert!(e.to_string().contains("certificate"), "{e}");
            client_saw_alert(c).await;
        }
    }

    #[tokio::test]
    async fn client_certificate_from_another_ca_fails_the_handshake() {
        let m = mtls();
        for versions in [TLS13, TLS12] {
            let (s, c) = handshake(
                &m.server,
                client(&m.server_ca.pem, versions, Some(&m.stranger)),
            )
            .await;
            let e = s.err().expect("a certificate from another CA was accepted");
            assert!(e.to_string().contains("certificate"), "{e}");
            let alert = client_saw_alert(c).await;
            assert!(
                alert.contains("UnknownCA") || alert.contains("BadCertificate"),
                "{alert}"
            );
        }
    }

    #[tokio::test]
    async fn reload_serves_the_new_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "ca");
        let old = server_leaf(dir.path(), "server", &ca, P256);
        let server = TlsServer::load(&old.cert, &old.key, None).unwrap();
        let (c, _) = good(&server, client(&ca.pem, BOTH, None)).await;
        assert_eq!(served_cert(&c), old.der);
        // Rotation writes new files at the same paths.
        let new = server_leaf(dir.path(), "server", &ca, &rcgen::PKCS_ED25519);
        assert_ne!(new.der, old.der);
        server.reload().unwrap();
        let (c2, _) = good(&server, client(&ca.pem, BOTH, None)).await;
        assert_eq!(served_cert(&c2), new.der);
        // The connection made before the reload still works.
        let mut c = c;
        c.write_all(b"x").await.unwrap();
        c.flush().await.unwrap();
    }

    #[tokio::test]
    async fn reload_with_a_broken_file_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "ca");
        let old = server_leaf(dir.path(), "server", &ca, P256);
        let server = TlsServer::load(&old.cert, &old.key, None).unwrap();
        let good_key = std::fs::read(&old.key).unwrap();

        // A key file with no key in it.
        std::fs::write(&old.key, "not a key\n").unwrap();
        let e = server.reload().unwrap_err();
        assert_eq!(
            e,
            format!("tls.key: {}: no private key found", old.key.display())
        );
        let (c, _) = good(&server, client(&ca.pem, BOTH, None)).await;
        assert_eq!(served_cert(&c), old.der);

        // A key that is not the certificate's (half-done rotation).
        let other = server_leaf(dir.path(), "other", &ca, P256);
        std::fs::copy(&other.key, &old.key).unwrap();
        let e = server.reload().unwrap_err();
        assert!(
            e.starts_with("tls.cert/tls.key: ") && e.contains("does not match"),
            "{e}"
        );

        // A certificate file that is gone.
        std::fs::write(&old.key, &good_key).unwrap();
        std::fs::remove_file(&old.cert).unwrap();
        let e = server.reload().unwrap_err();
        assert!(
            e.starts_with(&format!("tls.cert: {}: cannot read", old.cert.display())),
            "{e}"
        );
        let (c, _) = good(&server, client(&ca.pem, BOTH, None)).await;
        assert_eq!(served_cert(&c), old.der);
    }

    #[test]
    fn load_errors_name_the_key_the_file_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "ca");
        let l = server_leaf(dir.path(), "server", &ca, P256);
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = |c: &Path, k: &Path, ca: Option<&Path>| TlsServer::load(c, k, ca).err().unwrap();

        let e = err(&missing, &l.key, None);
        assert!(
            e.starts_with(&format!("tls.cert: {}: cannot read: ", missing.display())),
            "{e}"
        );
        assert_eq!(
            err(&empty, &l.key, None),
            format!("tls.cert: {}: no certificate found", empty.display())
        );
        // A key file holding only certificates.
        assert_eq!(
            err(&l.cert, &l.cert, None),
            format!("tls.key: {}: no private key found", l.cert.display())
        );
        assert_eq!(
            err(&l.cert, &l.key, Some(&empty)),
            format!("tls.client_ca: {}: no certificate found", empty.display())
        );
        let e = err(&l.cert, &l.key, Some(&missing));
        assert!(e.starts_with("tls.client_ca: "), "{e}");
        // Broken base64 inside a PEM section.
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = err(&bad, &l.key, None);
        assert!(
            e.starts_with(&format!("tls.cert: {}: bad PEM: ", bad.display())),
            "{e}"
        );
    }

    #[tokio::test]
    async fn client_config_trusts_exactly_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca1 = ca(dir.path(), "ca1");
        let ca2 = ca(dir.path(), "ca2");
        let l1 = server_leaf(dir.path(), "s1", &ca1, P256);
        let l2 = server_leaf(dir.path(), "s2", &ca2, P256);
        let s1 = TlsServer::load(&l1.cert, &l1.key, None).unwrap();
        let s2 = TlsServer::load(&l2.cert, &l2.key, None).unwrap();
        let config = client_config(&ca1.pem, None).unwrap();
        good(&s1, config.clone()).await;
        let (_, c) = handshake(&s2, config).await;
        let e = c.expect_err("a server from another CA was trusted");
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");

        let e = client_config(&dir.path().join("nope.pem"), None).unwrap_err();
        assert!(e.contains("nope.pem: cannot read"), "{e}");
    }

    #[tokio::test]
    async fn client_config_presents_its_certificate() {
        let m = mtls();
        let config = client_config(&m.server_ca.pem, Some((&m.dev42.cert, &m.dev42.key))).unwrap();
        let (_, id) = good(&m.server, config).await;
        assert_eq!(id.as_deref(), Some("dev42"));
        let e =
            client_config(&m.server_ca.pem, Some((&m.dev42.cert, &m.stranger.key))).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
    }

    /// `certs/gen-dev-certs.sh` makes certificates rustls takes: the server's for
    /// localhost and 127.0.0.1, the client's with its CN as the identity.
    #[tokio::test]
    async fn dev_certs_script() {
        if !test_pki::have_openssl() {
            eprintln!("skipped: no openssl command");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/gen-dev-certs.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(dir.path())
            .arg("dev7")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let f = |name: &str| dir.path().join(name);
        let server =
            TlsServer::load(&f("server.pem"), &f("server.key"), Some(&f("ca.pem"))).unwrap();
        let client = Leaf {
            cert: f("client.pem"),
            key: f("client.key"),
            der: Vec::new(),
        };
        for versions in [TLS13, TLS12] {
            let (_, id) = good(
                &server,
                test_pki::client(&f("ca.pem"), versions, Some(&client)),
            )
            .await;
            assert_eq!(id.as_deref(), Some("dev7"));
        }
        let config =
            client_config(&f("ca.pem"), Some((&f("client.pem"), &f("client.key")))).unwrap();
        let (s, c) = test_pki::tcp_pair().await;
        let ip = ServerName::try_from("127.0.0.1").unwrap();
        let (s, c) = tokio::join!(server.accept(s), TlsConnector::from(config).connect(ip, c));
        assert_eq!(s.unwrap().1.as_deref(), Some("dev7"));
        c.unwrap();
        // A second run refuses to overwrite.
        let again = std::process::Command::new("bash")
            .arg(&script)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    }
}
