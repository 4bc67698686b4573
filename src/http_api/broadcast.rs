//! `POST /v1/broadcast?qos=0`: the body, as the payload of a PUBLISH on each device's own
//! push topic, to every device connected right now to any node of the cluster.
//!
//! Live only (`crate::broadcast`): never stored, so a device that is offline, or reconnects
//! a moment later, never gets it. This node fans out to its own devices while the other live
//! nodes do the same for theirs (`Cluster::broadcast`, over the node links), all at once.
//! `200` with `{"delivered": N, "qos": q, "nodes": {"node-a": n, ...}, "failed": {"node-c":
//! "why"}}`: a node that did not answer in time is in `failed` and not counted, and the
//! answer still comes.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::{counted, error, json, Api};
use crate::message::Qos;

pub async fn broadcast(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted("broadcast", broadcast_inner(&api, query, body).await)
}

/// The query: `qos` only; anything else is refused rather than ignored.
fn parse_query(q: Option<&str>) -> Result<Qos, (&'static str, String)> {
    let mut qos = Qos::AtMostOnce;
    for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        match (&*k, &*v) {
            ("qos", "0") => qos = Qos::AtMostOnce,
            ("qos", "1") => qos = Qos::AtLeastOnce,
            ("qos", _) => {
                return Err(("bad_qos", format!("qos {v:?}: a broadcast is QoS 0 or 1")));
            }
            _ => {
                return Err(("bad_query", format!("unknown query parameter {k:?} (qos)")));
            }
        }
    }
    Ok(qos)
}

async fn broadcast_inner(
    api: &Api,
    query: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let max = api.broker.config().server.max_packet_size;
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let why = format!("the payload is over server.max_packet_size ({max})");
            return error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", why);
        }
        Err(e) => return error(e.status(), "bad_body", e.body_text()),
    };
    let qos = match parse_query(query.as_deref()) {
        Ok(q) => q,
        Err((code, why)) => return error(StatusCode::BAD_REQUEST, code, why),
    };
    // `http.listen` requires `push.enabled` (config validation).
    let Some(template) = api.broker.push_template() else {
        return error(
            StatusCode::BAD_REQUEST,
            "push_disabled",
            "push.enabled is off",
        );
    };
    // As for a push: topic, its length, packet id, payload; the topic's fixed part only, as
    // each device's id is its own.
    let len = 2 + template.topic_for("").len() + 2 + body.len();
    if len > max {
        let why = format!("the PUBLISH would be {len} bytes, over server.max_packet_size ({max})");
        return error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", why);
    }
    // Own allocation: every device's mailbox holds it, maybe for a while (a slow reader),
    // and the body may share a larger buffer.
    let payload = Bytes::copy_from_slice(&body);
    let local = crate::broadcast::fan_out(&api.broker, payload.clone(), qos, false);
    let peers = async {
        match api.broker.cluster() {
            Some(c) => c.broadcast(payload, qos).await,
            None => Vec::new(),
        }
    };
    let (here, peers) = futures::join!(local, peers);
    let mut nodes = Map::new();
    let mut failed = Map::new();
    let mut delivered = here.handed;
    nodes.insert(api.broker.node_id().to_string(), json!(here.handed));
    for p in peers {
        match p.handed {
            Ok(n) => {
                delivered += n;
                nodes.insert(p.node.to_string(), json!(n));
            }
            Err(why) => {
                failed.insert(p.node.to_string(), Value::String(why));
            }
        }
    }
    json(
        StatusCode::OK,
        json!({
            "delivered": delivered,
            "qos": qos as u8,
            "nodes": nodes,
            "failed": failed,
        }),
    )
}
