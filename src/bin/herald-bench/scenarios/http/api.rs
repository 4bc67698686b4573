//! The backend HTTP API as the `http` scenario calls it: keep-alive HTTP/1.1 connections
//! (hyper's client), one request at a time on each, and the probe for receipts.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::client::now_ns;

pub(super) type Conn = SendRequest<Full<Bytes>>;

/// The client id of the receipt probe: not a device, so its message disturbs no count.
const PROBE_ID: &str = "bench-receipt-probe";

/// Where the API is and how to authenticate to it.
pub(super) struct Api {
    addr: SocketAddr,
    host: HeaderValue,
    auth: Option<HeaderValue>,
}

impl Api {
    pub(super) fn new(addr: SocketAddr, token: Option<&str>) -> Result<Api, String> {
        let auth = token
            .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
            .transpose()
            .map_err(|_| "--http-token: not a valid header value".to_string())?;
        let host = HeaderValue::from_str(&addr.to_string())
            .map_err(|_| format!("{addr}: not a valid Host header"))?;
        Ok(Api { addr, host, auth })
    }

    pub(super) async fn connect(&self) -> Result<Conn, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("HTTP connect {}: {e}", self.addr))?;
        // Requests are small and answered one at a time: Nagle would hold the next one back.
        let _ = tcp.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// One request: the status, the body, and the time the answer's head arrived.
    pub(super) async fn call(
        &self,
        conn: &mut Conn,
        method: Method,
        path: &str,
        json: bool,
        body: Bytes,
    ) -> Result<(u16, Bytes, u64), String> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone());
        if let Some(a) = &self.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        if json {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("request {path}: {e}"))?;
        conn.ready()
            .await
            .map_err(|e| format!("HTTP connection: {e}"))?;
        let resp = conn
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP {path}: {e}"))?;
        let at = now_ns();
        let status = resp.status().as_u16();
        // Read to the end, or the connection cannot carry the next request.
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("HTTP {path}: reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body, at))
    }
}

/// Asks whether Herald takes `receipt=true`: one push to a client id that is not a device,
/// whose outbox is emptied again after. The answer's status and body.
pub(super) async fn probe_receipts(api: &Api) -> Result<(u16, Bytes), String> {
    let mut conn = api.connect().await?;
    let path = format!("/v1/push/{PROBE_ID}?qos=1&receipt=true");
    let body = Bytes::from_static(b"probe");
    let (status, body, _) = api
        .call(&mut conn, Method::POST, &path, false, body)
        .await?;
    if status == 202 {
        let path = format!("/v1/clients/{PROBE_ID}/outbox");
        let _ = api
            .call(&mut conn, Method::DELETE, &path, false, Bytes::new())
            .await;
    }
    Ok((status, body))
}
