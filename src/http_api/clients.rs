//! `GET /v1/clients/{client_id}`: whether a device is connected, to which node and since
//! when, how many messages its outbox holds and how old the oldest is; `DELETE
//! /v1/clients/{client_id}/outbox`: empties that outbox.
//!
//! `online`, `node` and `connected_since` are cluster-wide. A device connected here is
//! answered from the client table; otherwise, in a cluster, from its route
//! (`herald:route:{cid}`, the table the two-hop forward uses), believed only when its node
//! is alive with the route's incarnation, and then confirmed by that node over the link
//! (`Cluster::locate`), because a persistent session keeps its route while offline. When
//! that node does not answer in time, `online` follows the route, `connected_since` is
//! null and `node_error` says why. `queued` and `oldest_queued_age_ms` read the shared
//! outbox, the same from every node.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::{client_id_problem, counted, error, json, Api};
use crate::broker::Broker;
use crate::cluster::Located;
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

/// Where a device is connected: `(online, node, connected_since, node_error)`.
type Presence = (bool, Option<String>, Option<u64>, Option<String>);

async fn presence(broker: &Broker, client: &str) -> Result<Presence, StoreError> {
    if let Some(since) = broker.connected_since_ms(client) {
        return Ok((true, Some(broker.node_id().to_string()), Some(since), None));
    }
    let Some(cluster) = broker.cluster() else {
        return Ok((false, None, None, None));
    };
    Ok(match cluster.locate(client).await? {
        Located::Nowhere => (false, None, None, None),
        Located::At { node, since } => (true, Some(node), Some(since), None),
        Located::Unanswered { node, why } => (true, Some(node), None, Some(why)),
    })
}

pub async fn status(
    State(api): State<Arc<Api>>,
    client: Result<Path<String>, PathRejection>,
) -> Response {
    let r = match client_id(client) {
        Err(why) => bad_id(why),
        Ok(client) => match futures::try_join!(
            api.broker.store().queued(&client),
            presence(&api.broker, &client)
        ) {
            Ok(((queued, born_us), (online, node, since, node_error))) => {
                // 0 is an envelope written before `born_us` existed: its age is unknown.
                // A clock that went back gives 0 rather than a negative age.
                let age_ms = born_us
                    .filter(|b| *b > 0)
                    .map(|b| now_us().saturating_sub(b) / 1000);
                let mut body = json!({
                    "client_id": client,
                    "online": online,
                    "node": node,
                    "connected_since": since,
                    "queued": queued,
                    "oldest_queued_age_ms": age_ms,
                });
                if let Some(why) = node_error {
                    body["node_error"] = json!(why);
                }
                json(StatusCode::OK, body)
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
