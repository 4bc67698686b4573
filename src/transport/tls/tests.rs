use std::io;
use std::path::Path;

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
    let e = client_config(&m.server_ca.pem, Some((&m.dev42.cert, &m.stranger.key))).unwrap_err();
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
    let server = TlsServer::load(&f("server.pem"), &f("server.key"), Some(&f("ca.pem"))).unwrap();
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
    let config = client_config(&f("ca.pem"), Some((&f("client.pem"), &f("client.key")))).unwrap();
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
