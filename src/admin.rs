//! The operations listener (`metrics.listen`, axum): `GET /metrics` (Prometheus), `GET
//! /healthz` (the process serves HTTP), `GET /readyz` (200, or 503 with the reason:
//! `readiness`), `POST /admin/drain` (cluster nodes; from loopback addresses only, as
//! there are no API tokens yet) and 404 for anything else. Every answer closes its
//! connection: a probe or a scrape is one request. axum's accept loop backs off on accept
//! errors (out of descriptors) instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::readiness::Readiness;

pub struct Admin {
    pub readiness: Arc<Readiness>,
    /// Cancelled by `POST /admin/drain`; the process's main task runs the drain.
    pub drain: CancellationToken,
    /// Only cluster nodes drain: a single node has nowhere to send its devices.
    pub can_drain: bool,
}

fn answer(status: StatusCode, body: impl Into<String>) -> Response {
    let close = [(header::CONNECTION, "close")];
    (status, close, body.into()).into_response()
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { answer(StatusCode::OK, "ok\n") }))
        .route("/readyz", get(ready))
        .route("/admin/drain", post(drain))
        .fallback(|| async { answer(StatusCode::NOT_FOUND, "not found\n") })
        .with_state(admin);
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics listener stopped");
    }
}

async fn scrape() -> Response {
    let text = metrics::render();
    let headers = [
        (header::CONNECTION, "close"),
        (header::CONTENT_TYPE, "text/plain; version=0.0.4"),
    ];
    (headers, text).into_response()
}

async fn ready(State(admin): State<Arc<Admin>>) -> Response {
    match admin.readiness.check() {
        Ok(()) => answer(StatusCode::OK, "ready\n"),
        Err(why) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn drain(
    State(admin): State<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !peer.ip().is_loopback() {
        tracing::warn!(peer = %peer, "drain refused: not from a loopback address");
        return answer(
            StatusCode::FORBIDDEN,
            "drain is accepted from loopback addresses only\n",
        );
    }
    if !admin.can_drain {
        return answer(
            StatusCode::CONFLICT,
            "not a cluster node: there is no other node for its devices (stop it with SIGTERM)\n",
        );
    }
    tracing::info!(peer = %peer, "drain requested over HTTP");
    admin.drain.cancel();
    answer(StatusCode::ACCEPTED, "draining\n")
}
