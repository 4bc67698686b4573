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
//!
//! ## Files
//!
//! - `mod.rs` (here): what both sides share: the provider, the versions, the words for a
//!   key that does not fit its certificate;
//! - `server.rs`: `TlsServer`, the listeners' side;
//! - `client.rs`: `client_config`, Herald's outgoing connections;
//! - `pem.rs`: reading certificates, keys and CAs from PEM files;
//! - `tests.rs`: unit tests.
//!
//! The stream itself is `tls_stream`, next to this module.

mod client;
mod pem;
mod server;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use tokio_rustls::rustls;

pub use super::tls_stream::TlsStream;
pub use client::client_config;
pub use server::TlsServer;

/// The one crypto provider of Herald's TLS.
pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(super) const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

pub(super) fn key_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key does not match the certificate".into()
        }
        e => e.to_string(),
    }
}
