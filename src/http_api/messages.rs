//! `GET /v1/messages/{id}`: the receipt of a message pushed with `receipt=true`
//! (`receipts`): `{"id", "client_id", "state", "at"}`, `404` for an id that is unknown, whose
//! record expired (`http.receipt_ttl`), or whose message left its outbox unreported.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::{counted, error, json, Api};
use crate::receipts::{Event, ReceiptId};

pub async fn receipt(
    State(api): State<Arc<Api>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    counted("message", receipt_inner(&api, id).await)
}

async fn receipt_inner(api: &Api, id: Result<Path<String>, PathRejection>) -> Response {
    let Some(id) = id.ok().and_then(|Path(id)| ReceiptId::decode(&id)) else {
        return unknown();
    };
    match api.broker.store().receipt(&id).await {
        Ok(Some((state, at_ms))) => json(StatusCode::OK, Event { id, state, at_ms }.json()),
        Ok(None) => unknown(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("cannot read the receipt: {e}"),
        ),
    }
}

fn unknown() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "unknown_message",
        "no receipt: the id is unknown, its record expired (http.receipt_ttl), or its message left the outbox without one (a clean session or an overflow on the Redis store)",
    )
}
