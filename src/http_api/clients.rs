//! `GET /v1/clients/{client_id}`: whether a device is connected to this node, how many
//! messages its outbox holds and how old the oldest is; `DELETE
//! /v1/clients/{client_id}/outbox`: empties that outbox.
//!
//! In a cluster `online` and `connected_since` are about this node only; `queued` and
//! `oldest_queued_age_ms` read the shared outbox, the same from every node. There is no
//! `node` field: the route table (`herald:route:{cid}`) names the node of the client's
//! newest claim, but a node that died keeps its route until the sweep of another node
//! notices, so naming it correctly would take a second read (the node's `alive` key) and
//! the sweep's rules; left for later rather than answered wrong.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::{client_id_problem, counted, error, json, Api};
use crate::message::now_us;
use crate::outbox::StoreError;

/// The client id from the path, or why it is not one (a `400`).
fn client_id(client: Result<Path<String>, PathRejection>) -> Result<String, &'static str> {
    let Ok(Path(client)) = client else {
        return Err("the client id is not valid UTF-8");
    };
    match client_id_problem(&client) {
        Some(why) => Err(why),
        None => Ok(client),
    }
}

fn bad_id(why: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_client_id", why)
}

fn store_down(e: &StoreError) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        e.to_string(),
    )
}

pub async fn status(
    State(api): State<Arc<Api>>,
    client: Result<Path<String>, PathRejection>,
) -> Response {
    let r = match client_id(client) {
        Err(why) => bad_id(why),
        Ok(client) => match api.broker.store().queued(&client).await {
            Ok((queued, born_us)) => {
                // 0 is an envelope written before `born_us` existed: its age is unknown.
                // A clock that went back gives 0 rather than a negative age.
                let age_ms = born_us
                    .filter(|b| *b > 0)
                    .map(|b| now_us().saturating_sub(b) / 1000);
                json(
                    StatusCode::OK,
                    json!({
                        "client_id": client,
                        "online": api.broker.is_connected(&client),
                        "connected_since": api.broker.connected_since_ms(&client),
                        "queued": queued,
                        "oldest_queued_age_ms": age_ms,
                    }),
                )
            }
            Err(e) => store_down(&e),
        },
    };
    counted("client_status", r)
}

/// `DELETE /v1/clients/{client_id}/outbox`: `200 {"client_id", "deleted": N}`. The
/// device's connection, if any, is left alone: what it already holds (its mailbox, a
/// PUBLISH in flight) may still arrive, and its acks of deleted entries are no-ops.
pub async fn delete_outbox(
    State(api): State<Arc<Api>>,
    client: Result<Path<String>, PathRejection>,
) -> Response {
    let r = match client_id(client) {
        Err(why) => bad_id(why),
        Ok(client) => match api.broker.store().delete_outbox(&client).await {
            Ok(n) => json(StatusCode::OK, json!({ "client_id": client, "deleted": n })),
            Err(e) => store_down(&e),
        },
    };
    counted("delete_outbox", r)
}
