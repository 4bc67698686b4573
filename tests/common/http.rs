//! The backend HTTP API from a test: a broker with `http.listen` and one token, and
//! requests with a real HTTP client (reqwest) over loopback.

use std::net::SocketAddr;

use herald::config::Secret;
use serde_json::Value;

use super::{start_with, TestServer, WAIT};

/// The bearer token `start_api` configures.
pub const TOKEN: &str = "test-token-0123456789";

/// A broker with the API on a loopback port and `TOKEN`, after `tweak`.
pub async fn start_api(tweak: impl FnOnce(&mut herald::Config)) -> (TestServer, SocketAddr) {
    let server = start_with(|c| {
        c.http.listen = Some("127.0.0.1:0".parse().unwrap());
        c.http.tokens = vec![Secret::new(TOKEN)];
        tweak(c);
    })
    .await;
    let addr = server.http_addr().expect("HTTP API listening");
    (server, addr)
}

/// One request: the status and the JSON body (`Null` if the body is not JSON). Bounded by
/// five times `WAIT`: a broadcast waits up to 5 s for the other nodes' counts.
pub async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .timeout(WAIT * 5)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("HTTP request");
    let status = r.status().as_u16();
    let body = r.bytes().await.expect("HTTP body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// `GET /v1/clients/{id}` with `TOKEN`.
pub async fn client_status(api: SocketAddr, id: &str) -> (u16, Value) {
    let url = format!("http://{api}/v1/clients/{id}");
    call(reqwest::Method::GET, url, Some(TOKEN), Vec::new()).await
}
