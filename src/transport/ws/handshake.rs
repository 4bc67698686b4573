//! The server side of the HTTP upgrade: path, subprotocol, and the hand-over to `WsStream`
//! (the rules are in the parent module's doc).

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http;
use tungstenite::protocol::WebSocketConfig;

use super::WsStream;

/// The only path that upgrades.
pub const PATH: &str = "/mqtt";

/// Subprotocols we answer, in order of preference.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Server handshake: HTTP upgrade on `/mqtt`, subprotocol negotiation (see `ws`'s module
/// doc), then a `WsStream` whose messages may carry at most `max_packet + 16` bytes. Errors
/// are `io::Error`s (the refused upgrade: "websocket upgrade refused: ...").
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: S,
    max_packet: usize,
) -> io::Result<WsStream<S>> {
    // tungstenite only runs the upgrade here; its `WebSocket` is taken apart right after,
    // so it gets no buffers worth the name (the 128 KiB read buffer would be allocated, and
    // zeroed on the first read, for nothing).
    let config = WebSocketConfig::default()
        .read_buffer_size(0)
        .write_buffer_size(0)
        .max_write_buffer_size(1)
        .max_frame_size(Some(max_packet.saturating_add(16)))
        .max_message_size(Some(max_packet.saturating_add(16)));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, negotiate, Some(config))
        .await
        .map_err(|e| match e {
            tungstenite::Error::Io(e) => e,
            tungstenite::Error::Http(resp) => io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "websocket upgrade refused: {}",
                    resp.body()
                        .as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_else(|| resp.status().to_string().into())
                ),
            ),
            e => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("websocket upgrade: {e}"),
            ),
        })?;
    // The server handshake refuses bytes behind the request (tungstenite's
    // `JunkAfterRequest`: a client must wait for the 101), so the raw stream holds nothing
    // tungstenite has read.
    let mut inner = ws.into_inner();
    // The 101 may still sit in a TLS layer's buffer; the client waits for it.
    inner.flush().await?;
    Ok(WsStream::new(inner, max_packet))
}

/// tungstenite's request callback: path and subprotocol. (Its signature is tungstenite's.)
#[allow(clippy::result_large_err)]
fn negotiate(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != PATH {
        let mut refused = ErrorResponse::new(Some(format!(
            "path {} not found (MQTT is on {PATH})",
            req.uri().path()
        )));
        *refused.status_mut() = http::StatusCode::NOT_FOUND;
        return Err(refused);
    }
    let offered: Vec<&str> = req
        .headers()
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // Echo the client's own spelling: a browser checks the answer against its offer.
    let chosen = SUBPROTOCOLS.iter().find_map(|want| {
        offered
            .iter()
            .find(|o| o.eq_ignore_ascii_case(want))
            .copied()
    });
    if let Some(p) = chosen.and_then(|p| http::HeaderValue::from_str(p).ok()) {
        resp.headers_mut()
            .insert(http::header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    Ok(resp)
}
