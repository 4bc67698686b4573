//! The backend HTTP API (`http.listen`, axum): a backend pushes to devices without holding an
//! MQTT connection, and asks whether a device is online and how much waits for it.
//!
//! Why it is safe to add: a push over HTTP is built into the same `Message` an MQTT PUBLISH
//! to `push/{client_id}` becomes, and goes through the same `Broker::publish` (same outbox,
//! same order, store before ack). `202 Accepted` is written only after that future is `Ok`,
//! which is exactly what a PUBACK means; a store error is a `503` (no PUBACK).
//!
//! - `mod.rs` (here): the router, the listener and its shutdown, JSON errors, counting;
//! - `auth.rs`: bearer tokens, compared in constant time;
//! - `push.rs`: `POST /v1/push/{client_id}` and the batch `POST /v1/push`;
//! - `broadcast.rs`: `POST /v1/broadcast`, live only, to every node's connected devices;
//! - `clients.rs`: `GET /v1/clients/{client_id}` and `DELETE /v1/clients/{client_id}/outbox`;
//! - `messages.rs`: `GET /v1/messages/{id}`, a message's receipt (`receipts`);
//! - `listener.rs`: at most 1,024 connections, each closed after 30 s without traffic.
//!
//! Every body is read under a byte limit (`DefaultBodyLimit`) after the token check (a
//! `route_layer` runs before the handler's extractors), so an unauthenticated client cannot
//! make the node buffer anything. Not built yet (issue 15): receipts, per-message TTL,
//! collapse keys, the receipt webhook.

mod auth;
mod broadcast;
mod clients;
mod listener;
mod messages;
mod push;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::metrics;

pub use auth::Tokens;

/// What every handler shares.
pub struct Api {
    broker: Arc<Broker>,
    tokens: Tokens,
}

/// Serves the API on `listener` until `stop` is cancelled (drain or shutdown); requests in
/// flight then finish.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>, stop: CancellationToken) {
    let config = broker.config();
    // A push body is the payload: never more than a PUBLISH could carry.
    let one_limit = config.server.max_packet_size;
    let batch_limit = config.http.max_batch_bytes;
    // Checked at start (`Config::validate`); the file can only have gone since. Serving
    // without its tokens could mean serving without any: the API stays off instead.
    let tokens = match config.http.all_tokens() {
        Ok(t) => Tokens::new(&t),
        Err(why) => {
            tracing::error!(reason = %why, "http.tokens_file unreadable: the HTTP API is off");
            return;
        }
    };
    let api = Arc::new(Api { tokens, broker });
    let app = axum::Router::new()
        .route(
            "/v1/push/{client_id}",
            post(push::push_one).layer(DefaultBodyLimit::max(one_limit)),
        )
        .route(
            "/v1/push",
            post(push::push_batch).layer(DefaultBodyLimit::max(batch_limit)),
        )
        .route(
            "/v1/broadcast",
            post(broadcast::broadcast).layer(DefaultBodyLimit::max(one_limit)),
        )
        .route(
            "/v1/clients/{client_id}",
            get(clients::status).layer(DefaultBodyLimit::max(0)),
        )
        .route(
            "/v1/messages/{id}",
            get(messages::receipt).layer(DefaultBodyLimit::max(0)),
        )
        .route(
            "/v1/clients/{client_id}/outbox",
            delete(clients::delete_outbox).layer(DefaultBodyLimit::max(0)),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            auth::require_token,
        ))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(api);
    let served = axum::serve(listener::Bounded::new(listener), app)
        .with_graceful_shutdown(stop.cancelled_owned());
    if let Err(e) = served.await {
        tracing::error!(error = %e, "HTTP API listener stopped");
    }
}

/// A JSON answer.
fn json(status: StatusCode, body: serde_json::Value) -> Response {
    let headers = [(header::CONTENT_TYPE, "application/json")];
    (status, headers, body.to_string()).into_response()
}

/// A JSON error: `{"error": code, "message": why}`.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    json(
        status,
        serde_json::json!({ "error": code, "message": message.into() }),
    )
}

/// Counts an answer (`herald_http_responses_total{endpoint, status}`) and returns it.
fn counted(endpoint: &'static str, r: Response) -> Response {
    metrics::http_response(endpoint, r.status().as_u16());
    r
}

/// Why `client` cannot be a client id, if it cannot: the rules of a CONNECT's client id
/// (non-empty, no U+0000, at most 65,535 bytes as an MQTT string). Every endpoint that
/// names a device checks this; a push checks more (`push.rs`: the id must also make a push
/// topic).
fn client_id_problem(client: &str) -> Option<&'static str> {
    if client.is_empty() {
        Some("empty client id")
    } else if client.contains('\0') {
        Some("a client id may not contain U+0000")
    } else if client.len() > usize::from(u16::MAX) {
        Some("client id too long: over 65535 bytes")
    } else {
        None
    }
}
