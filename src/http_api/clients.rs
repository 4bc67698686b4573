//! `GET /v1/clients/{client_id}`: whether a device is connected to this node and how many
//! messages its outbox holds. In a cluster `online` is about this node only (the route
//! table is not read yet); `queued` is the shared outbox, the same from every node.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::{counted, error, json, Api};

pub async fn status(
    State(api): State<Arc<Api>>,
    client: Result<Path<String>, PathRejection>,
) -> Response {
    let r = match client {
        Err(_) => error(
            StatusCode::BAD_REQUEST,
            "bad_client_id",
            "the client id is not valid UTF-8",
        ),
        Ok(Path(client)) if client.is_empty() => {
            error(StatusCode::BAD_REQUEST, "bad_client_id", "empty client id")
        }
        Ok(Path(client)) => match api.broker.store().len(&client).await {
            Ok(queued) => json(
                StatusCode::OK,
                json!({
                    "client_id": client,
                    "online": api.broker.is_connected(&client),
                    "queued": queued,
                }),
            ),
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            ),
        },
    };
    counted("client_status", r)
}
