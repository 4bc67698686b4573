//! Delivery receipts of the HTTP API (`receipt=true`, `GET /v1/messages/{id}`, the receipt
//! webhook), end to end: a real broker, real HTTP requests (reqwest), real MQTT devices (the
//! raw client, so that each test decides when a PUBACK goes), and a real webhook, a small
//! axum server on a loopback port of the test's own that records what Herald POSTs and
//! can be told to answer 500, or not listen at all.
//!
//! The in-process tests use the store under test (`HERALD_TEST_STORE`); the kill -9 and the
//! cluster tests (a receipt across nodes, a dead node's receipts posted by another) run
//! Herald processes on a Redis of their own, whatever the store under test. The last one
//! waits out the adoption round (10 s, twice): about 20 s.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::http::{self, call, TOKEN};
use common::process::{free_port, Broker, Launch, RedisServer};
use common::*;
use herald::config::Secret;
use herald::receipts::{ReceiptId, State};
use serde_json::{json, Value};

/// How long a test waits for the webhook: a POST after a failure waits out a backoff
/// (0.1 s doubling). Only reached on failure.
const HOOK_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The API

/// A broker with the API on a loopback port and `TOKEN`, and `webhook` as its receipt
/// webhook, after `tweak`.
async fn start_api(
    webhook: Option<&Webhook>,
    tweak: impl FnOnce(&mut herald::Config),
) -> (TestServer, SocketAddr) {
    let url = webhook.map(Webhook::url);
    http::start_api(|c| {
        c.http.receipt_webhook = url.map(Secret::new);
        tweak(c);
    })
    .await
}

async fn push(api: SocketAddr, path_and_query: &str, body: &[u8]) -> (u16, Value) {
    let url = format!("http://{api}/v1/push/{path_and_query}");
    call(reqwest::Method::POST, url, Some(TOKEN), body.to_vec()).await
}

/// A push that must be stored: its id.
async fn push_ok(api: SocketAddr, path_and_query: &str, body: &[u8]) -> String {
    let (status, reply) = push(api, path_and_query, body).await;
    assert_eq!(status, 202, "{path_and_query}: {reply}");
    reply["id"].as_str().expect("an id").to_string()
}

async fn batch(api: SocketAddr, body: &Value) -> (u16, Value) {
    let url = format!("http://{api}/v1/push");
    call(reqwest::Method::POST, url, Some(TOKEN), body.to_string()).await
}

/// `GET /v1/messages/{id}`.
async fn receipt(api: SocketAddr, id: &str) -> (u16, Value) {
    let url = format!("http://{api}/v1/messages/{id}");
    call(reqwest::Method::GET, url, Some(TOKEN), Vec::new()).await
}

/// The receipt's state, or `None` for a 404; checks the answer's shape on the way.
async fn state_of(api: SocketAddr, id: &str) -> Option<String> {
    let (status, body) = receipt(api, id).await;
    if status == 404 {
        assert_eq!(body["error"], "unknown_message", "{body}");
        return None;
    }
    assert_eq!(status, 200, "GET /v1/messages/{id}: {body}");
    assert_receipt_shape(&body);
    assert_eq!(body["id"], id, "{body}");
    Some(body["state"].as_str().expect("state").to_string())
}

/// Waits until the receipt of `id` says `state`; returns the answer.
async fn wait_state(api: SocketAddr, id: &str, state: &str) -> Value {
    wait_until(WAIT, &format!("{id} is {state}"), async || {
        state_of(api, id).await.as_deref() == Some(state)
    })
    .await;
    receipt(api, id).await.1
}

/// `{"id", "client_id", "state", "at"}` and nothing else, `at` in RFC 3339 with
/// milliseconds, within the last hour.
fn assert_receipt_shape(r: &Value) {
    let o = r
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {r}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["at", "client_id", "id", "state"], "{r}");
    for k in keys {
        assert!(o[k].is_string(), "{k} is not a string: {r}");
    }
    at_ms(r);
}

/// The receipt's `at`, in unix ms; checks its form (`2026-01-02T03:04:05.678Z`).
fn at_ms(r: &Value) -> u64 {
    let at = r["at"].as_str().unwrap_or_else(|| panic!("no at: {r}"));
    assert!(
        at.len() == 24 && at.ends_with('Z') && at.as_bytes()[19] == b'.',
        "`at` is not RFC 3339 with ms: {at}"
    );
    let t = humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("{at}: {e}"));
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    let now = herald::message::now_ms();
    assert!(
        ms <= now + 1000 && ms + 3_600_000 > now,
        "`at` {at} is not about now"
    );
    ms
}

/// Connects `id` with a persistent session and leaves, so that its pushes wait offline.
async fn register_offline(server: &TestServer, id: &str) {
    let (c, _) = Raw::connect_ok(server.local_addr(), &Opts::new(id).clean(false)).await;
    c.disconnect().await;
    wait_offline(server, id).await;
}

/// The next PUBLISH, which must be `want` on `push/<id>`; not acknowledged.
async fn expect_push(device: &mut Raw, id: &str, want: &str) -> Publish {
    let p = device.expect_publish().await;
    assert_eq!(p.topic, format!("push/{id}"));
    assert_eq!(text(&p), want);
    p
}

// ---------------------------------------------------------------------------------------
// The webhook

/// A receipt webhook on a loopback port: records the receipts of the POSTs it answers 2xx,
/// counts those it refuses.
struct Webhook {
    addr: SocketAddr,
    state: HookState,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Default)]
struct HookState {
    answer: Arc<AtomicU16>,
    log: Arc<Mutex<HookLog>>,
}

#[derive(Default)]
struct HookLog {
    /// Every receipt of every accepted POST, in arrival order.
    receipts: Vec<Value>,
    accepted_posts: usize,
    refused_posts: usize,
    /// POSTs that were not what Herald promises (shape, size, content type): why.
    bad: Vec<String>,
}

impl Webhook {
    /// Listening on a free loopback port, answering `status`.
    async fn start(status: u16) -> Webhook {
        Webhook::start_on(0, status).await
    }

    /// Listening on `port` (0: any free one), answering `status`.
    async fn start_on(port: u16, status: u16) -> Webhook {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the webhook");
        let addr = listener.local_addr().expect("webhook address");
        let state = HookState::default();
        state.answer.store(status, Ordering::SeqCst);
        let app = axum::Router::new()
            .route("/receipts", axum::routing::post(hook))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Webhook { addr, state, task }
    }

    fn url(&self) -> String {
        url_on(self.addr.port())
    }

    /// From now on, answer `status`.
    fn answer(&self, status: u16) {
        self.state.answer.store(status, Ordering::SeqCst);
    }

    fn log<T>(&self, f: impl FnOnce(&HookLog) -> T) -> T {
        f(&self.state.log.lock().unwrap())
    }

    /// The receipts posted (and accepted) for `id`.
    fn receipts_of(&self, id: &str) -> Vec<Value> {
        self.log(|l| {
            l.receipts
                .iter()
                .filter(|r| r["id"] == id)
                .cloned()
                .collect()
        })
    }

    /// Waits until a receipt for `id` in `state` was posted; returns it.
    async fn wait_receipt(&self, id: &str, state: &str) -> Value {
        wait_until(
            HOOK_WAIT,
            &format!("the webhook gets {state} for {id}"),
            async || self.receipts_of(id).iter().any(|r| r["state"] == state),
        )
        .await;
        self.receipts_of(id)
            .into_iter()
            .find(|r| r["state"] == state)
            .expect("found above")
    }

    /// Nothing posted that Herald does not promise: every POST well formed, only final
    /// states.
    fn assert_well_formed(&self) {
        self.log(|l| {
            assert!(l.bad.is_empty(), "bad POSTs to the webhook: {:?}", l.bad);
            for r in &l.receipts {
                assert_receipt_shape(r);
                let state = r["state"].as_str().unwrap_or_default();
                assert!(
                    ["acked", "expired", "dropped"].contains(&state),
                    "only final states are posted: {r}"
                );
            }
        });
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn url_on(port: u16) -> String {
    format!("http://127.0.0.1:{port}/receipts")
}

async fn hook(
    axum::extract::State(s): axum::extract::State<HookState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let status = s.answer.load(Ordering::SeqCst);
    let mut log = s.log.lock().unwrap();
    if !(200..300).contains(&status) {
        log.refused_posts += 1;
        return axum::http::StatusCode::from_u16(status).expect("a status");
    }
    log.accepted_posts += 1;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if content_type != Some("application/json") {
        log.bad.push(format!("content type {content_type:?}"));
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            log.bad.push(format!("not JSON ({e}): {body:?}"));
            return axum::http::StatusCode::OK;
        }
    };
    let receipts = v
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("receipts"))
        .and_then(Value::as_array);
    match receipts {
        Some(rs) if !rs.is_empty() && rs.len() <= 256 => log.receipts.extend(rs.iter().cloned()),
        _ => log
            .bad
            .push(format!("not {{\"receipts\": [1..=256]}}: {v}")),
    }
    axum::http::StatusCode::OK
}

// ---------------------------------------------------------------------------------------
// In-process brokers, the store under test

/// A tracked message is `queued` while it waits, `sent` once written to the device and
/// not acknowledged, `acked` once the device's PUBACK for it arrived; `at` moves with it.
#[tokio::test]
async fn receipt_goes_queued_then_sent_then_acked() {
    let (server, api) = start_api(None, |_| {}).await;
    let dev = "rcpt-states";
    register_offline(&server, dev).await;

    let before = herald::message::now_ms();
    let id = push_ok(api, &format!("{dev}?qos=1&receipt=true"), b"tracked").await;
    let (status, body) = receipt(api, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_receipt_shape(&body);
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["client_id"], dev);
    assert_eq!(body["state"], "queued", "{body}");
    let queued_at = at_ms(&body);
    assert!(
        queued_at >= before,
        "queued at {queued_at}, pushed after {before}"
    );

    // The raw device never acks by itself.
    let opts = Opts::new(dev).clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    let p = expect_push(&mut device, dev, "tracked").await;
    let body = wait_state(api, &id, "sent").await;
    let sent_at = at_ms(&body);
    assert!(
        sent_at >= queued_at,
        "sent {sent_at} before queued {queued_at}"
    );

    device.puback(p.pkid).await;
    let body = wait_state(api, &id, "acked").await;
    assert_eq!(body["client_id"], dev);
    let acked_at = at_ms(&body);
    assert!(
        acked_at >= sent_at,
        "acked {acked_at} before sent {sent_at}"
    );
    server.shutdown().await;
}

/// A message written, not acknowledged, and written again with DUP on the next connection,
/// then acknowledged, then acknowledged once more (given to the store directly): one
/// `acked` at the webhook, no `sent` ever, and the record keeps the first. The duplicate
/// that must not come would come before a second tracked message, pushed and acked after
/// it: that one reaching the webhook bounds the wait.
#[tokio::test]
async fn a_redelivered_message_is_reported_once() {
    let webhook = Webhook::start(200).await;
    let (server, api) = start_api(Some(&webhook), |_| {}).await;
    let dev = "rcpt-once";
    register_offline(&server, dev).await;
    let id = push_ok(api, &format!("{dev}?receipt=true"), b"first").await;

    let opts = Opts::new(dev).clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    let p = expect_push(&mut device, dev, "first").await;
    assert!(!p.dup);
    wait_state(api, &id, "sent").await;
    device.disconnect().await;
    wait_offline(&server, dev).await;
    assert_eq!(state_of(api, &id).await.as_deref(), Some("sent"));

    let (mut device, present) = Raw::connect_ok(server.local_addr(), &opts).await;
    assert!(present);
    let p = expect_push(&mut device, dev, "first").await;
    assert!(p.dup, "redelivered with DUP");
    device.puback(p.pkid).await;
    let acked = webhook.wait_receipt(&id, "acked").await;
    assert_eq!(acked["client_id"], dev);

    // A second ack of the same entry, as when an ack applied by a connection that was
    // being taken over lands after the next connection has resent the entry (a race a
    // test cannot time): given to the store as the session gives it.
    let entry = ReceiptId::decode(&id).expect("a receipt id");
    let store = server.broker().store();
    store
        .note(&entry.client, entry.seq, entry.lineage, State::Acked)
        .await;

    let second = push_ok(api, &format!("{dev}?receipt=true"), b"second").await;
    let p = expect_push(&mut device, dev, "second").await;
    device.puback(p.pkid).await;
    webhook.wait_receipt(&second, "acked").await;

    assert_eq!(
        webhook.receipts_of(&id),
        std::slice::from_ref(&acked),
        "posted once"
    );
    assert_eq!(webhook.receipts_of(&second).len(), 1);
    // The record is the first final state, unchanged.
    let (_, body) = receipt(api, &id).await;
    assert_eq!(body["state"], "acked");
    assert_eq!(body["at"], acked["at"]);
    webhook.assert_well_formed();
    server.shutdown().await;
}

/// The webhook answers 500 for a while: Herald retries, and once it answers 200 every
/// receipt arrives, once, in `{"receipts": [...]}` POSTs; tracked messages from a batch
/// too (`"receipt": true`), untracked ones never.
#[tokio::test]
async fn receipts_reach_a_webhook_that_was_down() {
    let webhook = Webhook::start(500).await;
    let (server, api) = start_api(Some(&webhook), |_| {}).await;
    let dev = "rcpt-down";
    let opts = Opts::new(dev).clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;

    let mut tracked = vec![push_ok(api, &format!("{dev}?receipt=true"), b"m0").await];
    let untracked = push_ok(api, dev, b"m1").await;
    let messages = json!({ "messages": [
        { "client_id": dev, "payload": "m2", "receipt": true },
        { "client_id": dev, "payload": "m3", "receipt": true, "qos": 1 },
        { "client_id": dev, "payload": "m4" },
        { "client_id": dev, "payload": "m5", "receipt": true, "ttl": "1h" },
    ]});
    let (status, body) = batch(api, &messages).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    assert!(results.iter().all(|r| r["status"] == 202), "{body}");
    for i in [0, 1, 3] {
        tracked.push(results[i]["id"].as_str().expect("id").to_string());
    }
    let untracked = [untracked, results[2]["id"].as_str().unwrap().to_string()];
    for want in ["m0", "m1", "m2", "m3", "m4", "m5"] {
        let p = expect_push(&mut device, dev, want).await;
        device.puback(p.pkid).await;
    }
    for id in &tracked {
        wait_state(api, id, "acked").await;
    }

    // Refused, retried.
    wait_until(HOOK_WAIT, "Herald retries the webhook", async || {
        webhook.log(|l| l.refused_posts) >= 3
    })
    .await;
    assert_eq!(webhook.log(|l| l.receipts.len()), 0);
    webhook.answer(200);
    for id in &tracked {
        let r = webhook.wait_receipt(id, "acked").await;
        assert_eq!(r["client_id"], dev);
    }
    for id in &tracked {
        assert_eq!(webhook.receipts_of(id).len(), 1, "{id} posted once");
    }
    for id in &untracked {
        assert!(webhook.receipts_of(id).is_empty(), "untracked {id} posted");
    }
    webhook.assert_well_formed();
    server.shutdown().await;
}

/// A tracked message whose `ttl` ran out while its device was away is reported `expired`
/// when the device comes back (and its outbox is read): by `GET` and to the webhook. It
/// is never delivered; the message after it is, and is reported `acked`.
#[tokio::test]
async fn an_expired_message_is_reported_when_its_outbox_is_read() {
    let webhook = Webhook::start(200).await;
    let (server, api) = start_api(Some(&webhook), |_| {}).await;
    let dev = "rcpt-expired";
    register_offline(&server, dev).await;
    let short = push_ok(api, &format!("{dev}?receipt=true&ttl=300ms"), b"short").await;
    let expiry = tokio::time::Instant::now() + Duration::from_millis(300);
    let long = push_ok(api, &format!("{dev}?receipt=true"), b"long").await;

    // A test about time itself: waits the TTL out.
    tokio::time::sleep_until(expiry + Duration::from_millis(50)).await;
    let opts = Opts::new(dev).clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    let p = expect_push(&mut device, dev, "long").await;
    device.puback(p.pkid).await;

    let body = wait_state(api, &short, "expired").await;
    assert_eq!(body["client_id"], dev);
    wait_state(api, &long, "acked").await;
    let r = webhook.wait_receipt(&short, "expired").await;
    assert_eq!(r["at"], body["at"]);
    webhook.wait_receipt(&long, "acked").await;
    assert_eq!(webhook.receipts_of(&short).len(), 1);
    webhook.assert_well_formed();
    server.shutdown().await;
}

/// With the memory store, an expired tracked message of a device that never comes back is
/// reported by the store's sweep, without any connection. The server runs the sweep every
/// 30 s; the test runs it itself once the TTL is out.
#[tokio::test]
async fn the_memory_sweep_reports_expired_messages_nobody_reads() {
    if skip_under_redis(
        "the_memory_sweep_reports_expired_messages_nobody_reads",
        "the Redis store finds expired entries in its background pass (every 30 s), not in a sweep",
    ) {
        return;
    }
    let webhook = Webhook::start(200).await;
    let (server, api) = start_api(Some(&webhook), |_| {}).await;
    let dev = "rcpt-swept";
    register_offline(&server, dev).await;
    let short = push_ok(api, &format!("{dev}?receipt=true&ttl=300ms"), b"short").await;
    let expiry = tokio::time::Instant::now() + Duration::from_millis(300);
    let kept = push_ok(api, &format!("{dev}?receipt=true"), b"kept").await;

    tokio::time::sleep_until(expiry + Duration::from_millis(50)).await;
    server.broker().store().sweep().await;
    let r = webhook.wait_receipt(&short, "expired").await;
    assert_eq!(r["client_id"], dev);
    assert_eq!(state_of(api, &short).await.as_deref(), Some("expired"));
    assert_eq!(state_of(api, &kept).await.as_deref(), Some("queued"));
    assert_eq!(outbox_len(&server, dev).await, 1);
    assert!(webhook.receipts_of(&kept).is_empty());
    webhook.assert_well_formed();
    server.shutdown().await;
}

/// With the memory store, tracked messages that leave their outbox undelivered are
/// reported `dropped`: pushed out by newer ones (`session.overflow = drop_oldest`), deleted
/// by `DELETE /v1/clients/{id}/outbox`, or discarded by a clean session; once each, and
/// the untracked ones beside them never.
#[tokio::test]
async fn the_memory_store_reports_dropped_messages() {
    if skip_under_redis(
        "the_memory_store_reports_dropped_messages",
        "the Redis store does not report overflow or clean-session drops (GET is 404); DELETE is tested on both stores",
    ) {
        return;
    }
    let webhook = Webhook::start(200).await;
    let (server, api) = start_api(Some(&webhook), |c| {
        c.session.max_queued_messages = 2;
        c.session.overflow = herald::config::OverflowPolicy::DropOldest;
    })
    .await;

    // Overflow: the third push drops the first.
    let dev = "rcpt-overflow";
    register_offline(&server, dev).await;
    let oldest = push_ok(api, &format!("{dev}?receipt=true"), b"one").await;
    let two = push_ok(api, &format!("{dev}?receipt=true"), b"two").await;
    let three = push_ok(api, &format!("{dev}?receipt=true"), b"three").await;
    webhook.wait_receipt(&oldest, "dropped").await;
    assert_eq!(state_of(api, &oldest).await.as_deref(), Some("dropped"));
    assert_eq!(state_of(api, &two).await.as_deref(), Some("queued"));
    assert_eq!(state_of(api, &three).await.as_deref(), Some("queued"));

    // DELETE: both left.
    let url = format!("http://{api}/v1/clients/{dev}/outbox");
    let (status, body) = call(reqwest::Method::DELETE, url, Some(TOKEN), Vec::new()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 2, "{body}");
    webhook.wait_receipt(&two, "dropped").await;
    webhook.wait_receipt(&three, "dropped").await;

    // A clean session discards what waited for the persistent one.
    let dev = "rcpt-clean";
    register_offline(&server, dev).await;
    let tracked = push_ok(api, &format!("{dev}?receipt=true"), b"tracked").await;
    let untracked = push_ok(api, dev, b"untracked").await;
    let (device, present) = Raw::connect_ok(server.local_addr(), &Opts::new(dev)).await;
    assert!(!present);
    webhook.wait_receipt(&tracked, "dropped").await;
    assert_eq!(state_of(api, &tracked).await.as_deref(), Some("dropped"));
    device.disconnect().await;

    for id in [&oldest, &two, &three, &tracked] {
        assert_eq!(webhook.receipts_of(id).len(), 1, "{id} posted once");
    }
    assert!(webhook.receipts_of(&untracked).is_empty());
    webhook.assert_well_formed();
    server.shutdown().await;
}

/// `404 unknown_message` for ids Herald never gave out (garbage, another layout, a
/// well-formed id of nothing) and for an untracked message once delivered; `401` without
/// the token; `400 bad_receipt` for a receipt on QoS 0 or a receipt that is not a boolean,
/// single or in a batch, and nothing of those is stored.
#[tokio::test]
async fn unknown_ids_are_404_and_bad_receipt_requests_are_400() {
    let (server, api) = start_api(None, |_| {}).await;
    let dev = "rcpt-bad";
    register_offline(&server, dev).await;

    let nobody = ReceiptId {
        client: Arc::from("rcpt-nobody"),
        seq: 12_345,
        lineage: 0,
    }
    .encode();
    // The layout of a valid id (version, lineage, seq, client), with version 2.
    let mut bytes = vec![2u8, 0, 0];
    bytes.extend_from_slice(&1u64.to_be_bytes());
    bytes.extend_from_slice(dev.as_bytes());
    let other_layout = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    for id in [
        "garbage",
        "AAAAAAAAAAAAAAAAAAAAAAAA",
        "%00",
        "not%20base64!",
        &nobody,
        &other_layout,
    ] {
        let (status, body) = receipt(api, id).await;
        assert_eq!(status, 404, "{id}: {body}");
        assert_eq!(body["error"], "unknown_message", "{id}: {body}");
    }
    let url = format!("http://{api}/v1/messages/{nobody}");
    let (status, body) = call(reqwest::Method::GET, url, None, Vec::new()).await;
    assert_eq!(status, 401, "{body}");

    for q in [
        "receipt=true&qos=0",
        "qos=0&receipt=1",
        "receipt=maybe",
        "receipt=",
        "receipt=TRUE",
    ] {
        let (status, body) = push(api, &format!("{dev}?{q}"), b"x").await;
        assert_eq!(status, 400, "{q}: {body}");
        assert_eq!(body["error"], "bad_receipt", "{q}: {body}");
    }
    let messages = json!({ "messages": [
        { "client_id": dev, "payload": "x", "receipt": true, "qos": 0 },
        { "client_id": dev, "payload": "x", "receipt": "yes" },
    ]});
    let (status, body) = batch(api, &messages).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], 400, "{body}");
    assert_eq!(body["results"][0]["error"], "bad_receipt", "{body}");
    assert_eq!(body["results"][1]["status"], 400, "{body}");
    assert_eq!(outbox_len(&server, dev).await, 0);

    // An untracked message has an id too, but no receipt once it has left its outbox.
    let untracked = push_ok(api, dev, b"untracked").await;
    let opts = Opts::new(dev).clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    let p = expect_push(&mut device, dev, "untracked").await;
    device.puback(p.pkid).await;
    wait_until(WAIT, "the untracked message is acknowledged", async || {
        outbox_len(&server, dev).await == 0
    })
    .await;
    assert_eq!(state_of(api, &untracked).await, None);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Herald processes on a Redis of the test's own

/// A `[http]` section: the API on `port` with `TOKEN`, the webhook on `hook_port`.
fn http_toml(port: u16, hook_port: u16) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\ntokens = [\"{TOKEN}\"]\nreceipt_webhook = \"{}\"\n",
        url_on(hook_port)
    )
}

/// Redis store, webhook down: the device acks, the record says `acked` and the receipt is
/// in the node's hook stream; Herald is killed (kill -9) before any POST got through. Once
/// the webhook is up and Herald restarted under the same node id, the receipt is posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_acked_before_a_kill_9_is_posted_after_the_restart() {
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let (port, hook_port) = (free_port(), free_port());
    let how = Launch {
        name: Some("rcpt-kill".into()),
        args: vec!["--node-id".into(), "rcpt-kill".into()],
        redis_url: Some(redis.url()),
        ..Launch::default()
    };
    let mut node = Broker::launch(&http_toml(port, hook_port), how).await;
    let api = SocketAddr::from(([127, 0, 0, 1], port));
    let dev = "rcpt-kill-dev";
    let opts = Opts::new(dev).clean(false);
    let (c, _) = Raw::connect_ok(node.addr(), &opts).await;
    c.disconnect().await;
    let id = push_ok(api, &format!("{dev}?receipt=true"), b"tracked").await;

    let (mut device, _) = Raw::connect_ok(node.addr(), &opts).await;
    let p = expect_push(&mut device, dev, "tracked").await;
    device.puback(p.pkid).await;
    wait_state(api, &id, "acked").await;
    // In the hook stream (the round trip after the record), and tried at least once.
    let mut conn = redis.conn().await;
    let stream = keys::hooks("rcpt-kill");
    wait_until(WAIT, "the receipt is in the hook stream", async || {
        let n: u64 = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut conn)
            .await
            .expect("XLEN");
        n == 1
    })
    .await;
    node.wait_metric("herald_receipt_webhook_posts_total{result=\"failed\"}", 1.0)
        .await;
    assert_eq!(
        node.metric("herald_receipt_webhook_receipts_total").await,
        0.0
    );

    node.kill();
    drop(device);
    let webhook = Webhook::start_on(hook_port, 200).await;
    node.restart().await;

    let r = webhook.wait_receipt(&id, "acked").await;
    assert_eq!(r["client_id"], dev);
    node.assert_metric("herald_receipt_webhook_receipts_total", 1.0)
        .await;
    wait_until(
        WAIT,
        "the posted receipt leaves the hook stream",
        async || {
            let n: u64 = redis::cmd("XLEN")
                .arg(&stream)
                .query_async(&mut conn)
                .await
                .expect("XLEN");
            n == 0
        },
    )
    .await;
    assert_eq!(webhook.receipts_of(&id).len(), 1);
    assert_eq!(state_of(api, &id).await.as_deref(), Some("acked"));
    webhook.assert_well_formed();
}

/// Two nodes on one Redis, both with the webhook: a push with a receipt through node A's
/// API to a device on node B, acked there, is `acked` when asked on either node, and is
/// posted once (by one node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_across_a_cluster_is_read_anywhere_and_posted_once() {
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let webhook = Webhook::start(200).await;
    let hook_port = webhook.addr.port();
    let mut nodes = Vec::new();
    for name in ["rcpt-a", "rcpt-b"] {
        let port = free_port();
        let how = Launch {
            name: Some(name.into()),
            args: vec![
                "--cluster-listen".into(),
                "127.0.0.1:0".into(),
                "--node-id".into(),
                name.into(),
            ],
            redis_url: Some(redis.url()),
            ..Launch::default()
        };
        let node = Broker::launch(&http_toml(port, hook_port), how).await;
        nodes.push((node, SocketAddr::from(([127, 0, 0, 1], port))));
    }
    let (a, api_a) = (&nodes[0].0, nodes[0].1);
    let (b, api_b) = (&nodes[1].0, nodes[1].1);

    let dev = "rcpt-cluster-dev";
    let opts = Opts::new(dev).clean(false);
    let (mut device, _) = Raw::connect_ok(b.addr(), &opts).await;
    let id = push_ok(api_a, &format!("{dev}?receipt=true"), b"via-a").await;
    let p = expect_push(&mut device, dev, "via-a").await;
    device.puback(p.pkid).await;
    let on_a = wait_state(api_a, &id, "acked").await;
    let (status, on_b) = receipt(api_b, &id).await;
    assert_eq!(status, 200, "{on_b}");
    assert_eq!(on_a, on_b);
    let r = webhook.wait_receipt(&id, "acked").await;
    assert_eq!(r["at"], on_a["at"]);

    // A second one, through B's API this time, bounds the wait for a duplicate of the first.
    let second = push_ok(api_b, &format!("{dev}?receipt=true"), b"via-b").await;
    let p = expect_push(&mut device, dev, "via-b").await;
    device.puback(p.pkid).await;
    webhook.wait_receipt(&second, "acked").await;
    assert_eq!(webhook.receipts_of(&id).len(), 1, "posted once");
    assert_eq!(webhook.receipts_of(&second).len(), 1, "posted once");
    let posted = a.metric("herald_receipt_webhook_receipts_total").await
        + b.metric("herald_receipt_webhook_receipts_total").await;
    assert_eq!(posted, 2.0, "the nodes posted two receipts in all");
    webhook.assert_well_formed();
}

/// Two nodes on one Redis, the webhook down: a device on node B acks a tracked message, B
/// is killed (kill -9) with the receipt in its hook stream and never comes back. Once the
/// webhook is up, node A posts what B left (within about 10 s of B's alive key expiring),
/// and takes B's stream and listing away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_receipts_are_posted_by_another_node() {
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let mut conn = redis.conn().await;
    let hook_port = free_port();
    let mut nodes = Vec::new();
    for name in ["rcpt-adopt-a", "rcpt-adopt-b"] {
        let port = free_port();
        let how = Launch {
            name: Some(name.into()),
            args: vec![
                "--cluster-listen".into(),
                "127.0.0.1:0".into(),
                "--node-id".into(),
                name.into(),
            ],
            redis_url: Some(redis.url()),
            ..Launch::default()
        };
        let toml = format!(
            "{}[cluster]\nnode_ttl = \"1s\"\n",
            http_toml(port, hook_port)
        );
        let node = Broker::launch(&toml, how).await;
        nodes.push((node, SocketAddr::from(([127, 0, 0, 1], port))));
    }
    // A node lists itself for adoption on its poster's first round (10 s).
    wait_until(
        Duration::from_secs(20),
        "node b is listed as having a hook stream",
        async || {
            let listed: Vec<String> = redis::cmd("SMEMBERS")
                .arg(keys::hook_nodes())
                .query_async(&mut conn)
                .await
                .expect("SMEMBERS");
            listed.iter().any(|n| n == "rcpt-adopt-b")
        },
    )
    .await;
    let api_a = nodes[0].1;
    let dev = "rcpt-adopt-dev";
    let opts = Opts::new(dev).clean(false);
    let (mut device, _) = Raw::connect_ok(nodes[1].0.addr(), &opts).await;
    let id = push_ok(api_a, &format!("{dev}?receipt=true"), b"tracked").await;
    let p = expect_push(&mut device, dev, "tracked").await;
    device.puback(p.pkid).await;
    wait_state(api_a, &id, "acked").await;
    let stream = keys::hooks("rcpt-adopt-b");
    wait_until(WAIT, "the receipt is in b's hook stream", async || {
        let n: u64 = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut conn)
            .await
            .expect("XLEN");
        n == 1
    })
    .await;

    nodes[1].0.kill();
    drop(device);
    let webhook = Webhook::start_on(hook_port, 200).await;
    wait_until(
        Duration::from_secs(30),
        "node a posts b's receipt",
        async || !webhook.receipts_of(&id).is_empty(),
    )
    .await;
    let r = webhook.wait_receipt(&id, "acked").await;
    assert_eq!(r["client_id"], dev);
    nodes[0]
        .0
        .assert_metric("herald_receipt_webhook_receipts_total", 1.0)
        .await;
    wait_until(WAIT, "b's stream is gone and b unlisted", async || {
        let (len, listed): (u64, bool) = redis::pipe()
            .cmd("XLEN")
            .arg(&stream)
            .cmd("SISMEMBER")
            .arg(keys::hook_nodes())
            .arg("rcpt-adopt-b")
            .query_async(&mut conn)
            .await
            .expect("XLEN, SISMEMBER");
        len == 0 && !listed
    })
    .await;
    assert_eq!(webhook.receipts_of(&id).len(), 1);
    webhook.assert_well_formed();
}

/// `DELETE /v1/clients/{id}/outbox` reports the tracked messages it removes as `dropped`, on
/// every store (the Redis store reads and trims the outbox in one script), and only those.
#[tokio::test]
async fn deleted_tracked_messages_are_reported_dropped() {
    let webhook = Webhook::start(200).await;
    let (server, api) = start_api(Some(&webhook), |_| {}).await;
    let dev = "rcpt-deleted";
    register_offline(&server, dev).await;
    let first = push_ok(api, &format!("{dev}?receipt=true"), b"one").await;
    let untracked = push_ok(api, dev, b"two").await;
    let last = push_ok(api, &format!("{dev}?receipt=true"), b"three").await;
    let url = format!("http://{api}/v1/clients/{dev}/outbox");
    let (status, body) = call(reqwest::Method::DELETE, url, Some(TOKEN), Vec::new()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 3, "{body}");
    webhook.wait_receipt(&first, "dropped").await;
    webhook.wait_receipt(&last, "dropped").await;
    assert_eq!(state_of(api, &first).await.as_deref(), Some("dropped"));
    assert_eq!(state_of(api, &last).await.as_deref(), Some("dropped"));
    assert_eq!(
        state_of(api, &untracked).await,
        None,
        "untracked: no receipt"
    );
    assert!(webhook.receipts_of(&untracked).is_empty());
    server.shutdown().await;
}
