//! Client transports: how bytes reach a session.
//!
//! - **TCP** (`server.listen`): the socket itself.
//! - **TLS** (`server.tls_listen`): `TlsServer::accept` on the TCP socket (rustls, ring,
//!   TLS 1.2 and 1.3, optional client certificates whose CN or DNS SAN is the device's
//!   identity).
//! - **WebSocket** (`server.ws_listen`): `ws_accept` on the TCP socket (HTTP upgrade on
//!   `/mqtt`, subprotocol `mqtt`/`mqttv3.1`), giving a `WsStream` that carries MQTT bytes in
//!   binary frames.
//! - **WebSocket over TLS** (`server.wss_listen`): `TlsServer::accept`, then `ws_accept` on
//!   the `TlsStream` (same certificate as `tls_listen`).
//!
//! Each listener is its own accept task (in `server`); every handshake runs inside the
//! listener's connect timeout, so a client that stalls in TLS or in the HTTP upgrade is cut
//! off there. Whatever the transport, the result is a byte stream (`AsyncRead +
//! AsyncWrite + Unpin + Send`) and the same session code (`session::Connection<S>`, generic
//! over the stream) runs behind all of them.
//!
//! Idle memory per connection, on top of the session's own (see `tls` and `ws` for the
//! details): TCP adds nothing; a `WsStream` adds 88 bytes of state and no buffer; a
//! `TlsStream` adds about 3.5 KB, the rustls state machine and keys, and no buffer either
//! (OpenSSL as Mosquitto uses it: about 12.7 KB).
//!
//! The client side of TLS (`client_config`) is for Herald's own outgoing connections: the
//! node-to-node link and Redis over TLS.

pub mod tls;
mod tls_stream;
pub mod ws;

pub use tls::{client_config, TlsServer, TlsStream};
pub use ws::{accept as ws_accept, WsStream};

/// The identity a client certificate gives: its subject CN, or if it has no CN its first
/// DNS subject alternative name. `None` for something that does not parse as X.509 or has
/// neither.
pub fn cert_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
        _ => None,
    })
}

#[cfg(test)]
pub(crate) mod test_pki;

#[cfg(test)]
mod tests {
    use super::test_pki;

    #[test]
    fn identity_is_the_cn_else_the_first_dns_san() {
        let dir = tempfile::tempdir().unwrap();
        let ca = test_pki::ca(dir.path(), "ca");
        let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
        let both = test_pki::leaf(
            dir.path(),
            "a",
            &ca,
            Some("dev42"),
            &["x.example"],
            true,
            alg,
        );
        assert_eq!(super::cert_identity(&both.der).as_deref(), Some("dev42"));
        let san = test_pki::leaf(
            dir.path(),
            "b",
            &ca,
            None,
            &["127.0.0.1", "y.example", "z.example"],
            true,
            alg,
        );
        assert_eq!(super::cert_identity(&san.der).as_deref(), Some("y.example"));
        let neither = test_pki::leaf(dir.path(), "c", &ca, None, &["127.0.0.1"], true, alg);
        assert_eq!(super::cert_identity(&neither.der), None);
        assert_eq!(super::cert_identity(b"not a certificate"), None);
        // The CA's own certificate: CN, no SAN.
        assert_eq!(super::cert_identity(ca.issuer.der()).as_deref(), Some("ca"));
    }
}
