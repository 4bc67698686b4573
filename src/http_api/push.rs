//! `POST /v1/push/{client_id}` and the batch `POST /v1/push`.
//!
//! Each message becomes the `Message` an MQTT PUBLISH to the client's push topic would be,
//! and goes through `Broker::publish`: stored in the device's outbox (QoS 1) before the
//! answer says `202`, in order with MQTT-published messages. A batch submits every
//! message before awaiting any, so the Redis writer carries them in one pipeline, then
//! awaits them in order; a bad entry gets its own error and the others still go.
//!
//! `id` names the outbox entry (`receipts::ReceiptId`: client, seq, lineage), so that
//! `GET /v1/messages/{id}` can answer for it; a QoS 0 push, never stored, gets a random
//! one. `receipt=true` marks the message for receipts (`Message::receipt`): the session
//! then notes `sent` and `acked`, the store `expired` and `dropped`. `queued` (single push only)
//! is the outbox length read right after the store: one memory lookup, or one `XLEN` round
//! trip with Redis; a device online may already have taken the message. Batch results
//! leave it out (it would be a round trip per message).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{client_id_problem, counted, error, json, Api};
use crate::message::{now_ms, now_us, Message, Qos};
use crate::metrics;
use crate::outbox::StoreError;
use crate::receipts::ReceiptId;

/// A client id or a message that cannot be pushed: the status and the JSON error.
struct Refused(StatusCode, &'static str, String);

impl Refused {
    fn bad(code: &'static str, why: impl Into<String>) -> Refused {
        Refused(StatusCode::BAD_REQUEST, code, why.into())
    }

    fn response(self) -> Response {
        error(self.0, self.1, self.2)
    }

    fn entry(self) -> Value {
        json!({ "status": self.0.as_u16(), "error": self.1, "message": self.2 })
    }
}

/// Checks a client id as Herald takes one in CONNECT (`client_id_problem`), and as a push
/// topic level (no `/`, `+`, `#`), within the topic's 65,535 bytes; returns the push topic.
fn push_topic(api: &Api, client: &str) -> Result<String, Refused> {
    if let Some(why) = client_id_problem(client) {
        return Err(Refused::bad("bad_client_id", why));
    }
    if client.contains(['/', '+', '#']) {
        return Err(Refused::bad(
            "bad_client_id",
            "a client id for a push may not contain '/', '+' or '#'",
        ));
    }
    // `http.listen` requires `push.enabled` (config validation).
    let Some(template) = api.broker.push_template() else {
        return Err(Refused::bad("push_disabled", "push.enabled is off"));
    };
    let topic = template.topic_for(client);
    if topic.len() > usize::from(u16::MAX) {
        return Err(Refused::bad(
            "bad_client_id",
            "client id too long: the push topic would exceed 65535 bytes",
        ));
    }
    Ok(topic)
}

fn parse_qos(v: Option<u64>) -> Result<Qos, Refused> {
    match v {
        None | Some(1) => Ok(Qos::AtLeastOnce),
        Some(0) => Ok(Qos::AtMostOnce),
        Some(q) => Err(Refused::bad(
            "bad_qos",
            format!("qos {q}: a push is QoS 0 or 1"),
        )),
    }
}

/// A message's `ttl` (humantime: `30s`, `5m`, `1h 30m`): more than 0, and no more than
/// `session.message_ttl` when that is set, because the outbox key itself expires
/// `message_ttl` after its newest message: a longer TTL would be a promise the store cannot
/// keep.
fn parse_ttl(api: &Api, v: &str) -> Result<Duration, Refused> {
    let ttl = humantime::parse_duration(v)
        .map_err(|e| Refused::bad("bad_ttl", format!("ttl {v:?}: {e}")))?;
    let max = api.broker.config().session.message_ttl;
    if ttl.as_millis() == 0 {
        return Err(Refused::bad("bad_ttl", format!("ttl {v:?} is under 1ms")));
    }
    if !max.is_zero() && ttl > max {
        return Err(Refused::bad(
            "bad_ttl",
            format!(
                "ttl {v:?} is over session.message_ttl ({}), after which the outbox itself expires",
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(ttl)
}

/// The message, or 413 when its PUBLISH would exceed `server.max_packet_size` (the
/// remaining length: topic, its length, the packet id, the payload). With `ttl`, a stored
/// message expires that long from now instead of after `session.message_ttl`.
fn message(api: &Api, topic: String, payload: &[u8], o: &Options) -> Result<Message, Refused> {
    let Options {
        qos, ttl, receipt, ..
    } = *o;
    let max = api.broker.config().server.max_packet_size;
    let len = 2 + topic.len() + 2 + payload.len();
    if len > max {
        return Err(Refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the PUBLISH would be {len} bytes, over server.max_packet_size ({max})"),
        ));
    }
    Ok(Message {
        topic: Arc::from(topic),
        // Own allocation: the body may share a larger buffer, and a stored message can live
        // for days.
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain: false,
        expires_at: ttl.map_or(0, |t| now_ms() + t.as_millis() as u64),
        born_us: now_us(),
        forwarded: false,
        receipt,
    })
}

/// What a push may set besides its payload.
#[derive(Debug, Clone)]
struct Options {
    qos: Qos,
    ttl: Option<Duration>,
    receipt: bool,
    collapse: Option<String>,
}

/// Bytes of a collapse key, at most: it is kept per device in the store.
const MAX_COLLAPSE_KEY: usize = 256;

impl Options {
    fn new(
        qos: Option<u64>,
        ttl: Option<Duration>,
        receipt: bool,
        collapse: Option<String>,
    ) -> Result<Options, Refused> {
        let qos = parse_qos(qos)?;
        if receipt && qos == Qos::AtMostOnce {
            return Err(Refused::bad(
                "bad_receipt",
                "receipt=true needs qos 1: a QoS 0 message is never acknowledged",
            ));
        }
        if let Some(k) = &collapse {
            if k.is_empty() || k.len() > MAX_COLLAPSE_KEY {
                let why = format!("a collapse key is 1 to {MAX_COLLAPSE_KEY} bytes");
                return Err(Refused::bad("bad_collapse", why));
            }
            if qos == Qos::AtMostOnce {
                let why = "collapse needs qos 1: a QoS 0 message is never queued";
                return Err(Refused::bad("bad_collapse", why));
            }
        }
        Ok(Options {
            qos,
            ttl,
            receipt,
            collapse,
        })
    }
}

/// The answer's `id`: the entry's receipt id once stored, else random.
fn message_id(api: &Api, client: &str, seq: Option<u64>) -> String {
    match seq {
        Some(seq) => ReceiptId {
            client: Arc::from(client),
            seq,
            lineage: api.broker.store().lineage(client),
        }
        .encode(),
        None => new_id(),
    }
}

/// `503` while the memory guard throttles publishers (`memguard`): an HTTP push is a
/// publisher too, and its body is already in memory.
fn memory_full(api: &Api) -> Option<Refused> {
    api.broker.guard().throttled().then(|| {
        metrics::limit_hit("server_max_memory");
        Refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "memory_full",
            "the node is near server.max_memory; retry later".into(),
        )
    })
}

/// What a stored push answers (`id`, `client_id`, and `replaced`: the id of the message its
/// collapse key replaced), or why it was not stored. The collapse runs after the store
/// (`Store::collapse`); if it fails, the push is stored all the same and nothing is replaced.
async fn stored(
    api: &Api,
    client: &str,
    o: &Options,
    r: Result<Option<u64>, StoreError>,
) -> Result<Value, Refused> {
    let seq = match r {
        Err(e) => return Err(store_down(&e)),
        Ok(None) if o.qos != Qos::AtMostOnce => {
            return Err(Refused(
                StatusCode::TOO_MANY_REQUESTS,
                "outbox_full",
                "the device's outbox is full and session.overflow is drop_new: not stored".into(),
            ))
        }
        Ok(seq) => seq,
    };
    let mut answer = json!({ "id": message_id(api, client, seq), "client_id": client });
    if let (Some(seq), Some(key)) = (seq, &o.collapse) {
        let client: Arc<str> = Arc::from(client);
        let store = api.broker.store();
        let lineage = store.lineage(&client);
        match store.collapse(&client, key, seq, lineage).await {
            Ok(Some(old)) => answer["replaced"] = json!(message_id(api, &client, Some(old))),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "collapse not applied"),
        }
    }
    Ok(answer)
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No randomness from the OS: unique within the process is still an id.
        b[..8].copy_from_slice(&now_us().to_be_bytes());
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn store_down(e: &StoreError) -> Refused {
    Refused(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("not stored: {e}"),
    )
}

/// The query of a single push: `qos`, `ttl`, `receipt`. An unknown parameter is refused
/// rather than ignored: a backend must not believe a feature is applied when it is not.
fn parse_query(api: &Api, q: Option<&str>) -> Result<Options, Refused> {
    let (mut qos, mut ttl, mut receipt, mut collapse) = (None, None, false, None);
    for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        match &*k {
            "qos" => match v.parse::<u64>() {
                Ok(n) => qos = Some(n),
                Err(_) => return Err(Refused::bad("bad_qos", format!("qos {v:?} is not 0 or 1"))),
            },
            "ttl" => ttl = Some(parse_ttl(api, &v)?),
            "collapse" => collapse = Some(v.into_owned()),
            "receipt" => {
                receipt = match &*v {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        let why = format!("receipt {v:?} is not true or false");
                        return Err(Refused::bad("bad_receipt", why));
                    }
                }
            }
            _ => {
                return Err(Refused::bad(
                    "bad_query",
                    format!("unknown query parameter {k:?} (qos, ttl, receipt, collapse)"),
                ))
            }
        }
    }
    Options::new(qos, ttl, receipt, collapse)
}

/// `POST /v1/push/{client_id}?qos=1`, the body is the payload.
pub async fn push_one(
    State(api): State<Arc<Api>>,
    client: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted("push", push_one_inner(&api, client, query, body).await)
}

async fn push_one_inner(
    api: &Api,
    client: Result<Path<String>, PathRejection>,
    query: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(Path(client)) = client else {
        return Refused::bad("bad_client_id", "the client id is not valid UTF-8").response();
    };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let max = api.broker.config().server.max_packet_size;
            let why = format!("the payload is over server.max_packet_size ({max})");
            return Refused(StatusCode::PAYLOAD_TOO_LARGE, "too_large", why).response();
        }
        Err(e) => return error(e.status(), "bad_body", e.body_text()),
    };
    if let Some(r) = memory_full(api) {
        return r.response();
    }
    let (o, msg) = match parse_query(api, query.as_deref())
        .and_then(|o| Ok((o, push_topic(api, &client)?)))
        .and_then(|(o, topic)| Ok((message(api, topic, &body, &o)?, o)))
    {
        Ok((m, o)) => (o, m),
        Err(r) => return r.response(),
    };
    let mut answer = match stored(api, &client, &o, api.broker.push(msg).await).await {
        Ok(a) => a,
        Err(r) => return r.response(),
    };
    if let Ok(n) = api.broker.store().len(&client).await {
        answer["queued"] = json!(n);
    }
    json(StatusCode::ACCEPTED, answer)
}

#[derive(Deserialize)]
struct Batch {
    messages: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    client_id: String,
    payload: String,
    #[serde(default)]
    payload_encoding: Encoding,
    qos: Option<u64>,
    ttl: Option<String>,
    #[serde(default)]
    receipt: bool,
    collapse: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    #[default]
    Utf8,
    Base64,
}

/// One entry of a batch, checked and turned into a message.
fn batch_message(api: &Api, v: Value) -> Result<(String, Options, Message), Refused> {
    let e: Entry =
        serde_json::from_value(v).map_err(|e| Refused::bad("bad_entry", e.to_string()))?;
    let ttl = e.ttl.as_deref().map(|t| parse_ttl(api, t)).transpose()?;
    let o = Options::new(e.qos, ttl, e.receipt, e.collapse)?;
    let topic = push_topic(api, &e.client_id)?;
    let payload = match e.payload_encoding {
        Encoding::Utf8 => e.payload.into_bytes(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(e.payload.as_bytes())
            .map_err(|err| Refused::bad("bad_payload", format!("payload is not base64: {err}")))?,
    };
    let msg = message(api, topic, &payload, &o)?;
    Ok((e.client_id, o, msg))
}

/// `POST /v1/push`: `{"messages": [{"client_id", "payload", "payload_encoding", "qos",
/// "ttl", "receipt"}]}`.
/// `200` with `{"results": [...]}`, one per message in order, each with its own `status`
/// (`202` with `id` and `client_id`, or an error object).
pub async fn push_batch(
    State(api): State<Arc<Api>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted("push_batch", push_batch_inner(&api, body).await)
}

async fn push_batch_inner(api: &Api, body: Result<Bytes, BytesRejection>) -> Response {
    let max_bytes = api.broker.config().http.max_batch_bytes;
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let why = format!("the body is over http.max_batch_bytes ({max_bytes})");
            return error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", why);
        }
        Err(e) => return error(e.status(), "bad_body", e.body_text()),
    };
    if let Some(r) = memory_full(api) {
        return r.response();
    }
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", e.to_string()),
    };
    let max = api.broker.config().http.max_batch;
    if batch.messages.len() > max {
        let why = format!(
            "{} messages, over http.max_batch ({max})",
            batch.messages.len()
        );
        return error(StatusCode::PAYLOAD_TOO_LARGE, "too_many_messages", why);
    }
    // Every store is submitted here, in order, before any is awaited.
    type Pending = (
        Options,
        String,
        BoxFuture<'static, Result<Option<u64>, StoreError>>,
    );
    let submitted: Vec<Result<Pending, Refused>> = batch
        .messages
        .into_iter()
        .map(|v| {
            let (client, o, msg) = batch_message(api, v)?;
            Ok((o, client, api.broker.push(msg)))
        })
        .collect();
    let mut results = Vec::with_capacity(submitted.len());
    for s in submitted {
        results.push(match s {
            Ok((o, client, pushed)) => match stored(api, &client, &o, pushed.await).await {
                Ok(mut answer) => {
                    answer["status"] = json!(202);
                    answer
                }
                Err(r) => r.entry(),
            },
            Err(r) => r.entry(),
        });
    }
    json(StatusCode::OK, json!({ "results": results }))
}
