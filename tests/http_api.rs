//! The backend HTTP API (`http.listen`), with a real HTTP client (reqwest) against a real
//! broker over loopback: a push by HTTP lands in the same outbox, in the same order, as an
//! MQTT publish to the push topic, and is answered only once stored; the batch; the 401,
//! 400, 413 and 503 answers; and the refusal to start a public API without tokens.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::http::*;
use common::process::{run_briefly, RedisServer};
use common::*;
use herald::config::StoreKind;
use serde_json::{json, Value};

async fn push(addr: SocketAddr, path_and_query: &str, body: &[u8]) -> (u16, Value) {
    let url = format!("http://{addr}/v1/push/{path_and_query}");
    call(reqwest::Method::POST, url, Some(TOKEN), body.to_vec()).await
}

async fn batch(addr: SocketAddr, body: &Value) -> (u16, Value) {
    let url = format!("http://{addr}/v1/push");
    call(reqwest::Method::POST, url, Some(TOKEN), body.to_string()).await
}

/// Connects `id` with a persistent session and leaves, so that its pushes wait offline.
async fn register_offline(server: &TestServer, id: &str) {
    let (c, _) = Raw::connect_ok(server.local_addr(), &Opts::new(id).clean(false)).await;
    c.disconnect().await;
    wait_offline(server, id).await;
}

/// Receives `expected` in order on `push/<id>`, acking each.
async fn receive(device: &mut Raw, id: &str, expected: &[&str]) {
    for want in expected {
        let p = device.expect_publish().await;
        assert_eq!(p.topic, format!("push/{id}"));
        assert_eq!(text(&p), *want);
        device.puback(p.pkid).await;
    }
}

#[tokio::test]
async fn http_push_to_an_offline_device_arrives_in_order_with_mqtt_publishes() {
    let (server, api) = start_api(|_| {}).await;
    register_offline(&server, "dev1").await;

    let (status, body) = push(api, "dev1", b"one").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["client_id"], "dev1");
    assert!(
        body["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    assert_eq!(body["queued"], 1, "{body}");
    // 202 means stored, as a PUBACK does.
    assert_eq!(outbox_len(&server, "dev1").await, 1);

    let mut backend = Raw::connect(server.local_addr(), "backend").await;
    backend
        .publish("push/dev1", b"two", QoS::AtLeastOnce, false)
        .await;
    let (status, body) = push(api, "dev1?qos=1", b"three").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["queued"], 3, "{body}");

    let (status, body) = client_status(api, "dev1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["online"], false);
    assert_eq!(body["queued"], 3);

    let opts = Opts::new("dev1").clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    receive(&mut device, "dev1", &["one", "two", "three"]).await;
    // Live: an HTTP push reaches the connected device too.
    let (status, _) = push(api, "dev1", b"four").await;
    assert_eq!(status, 202);
    receive(&mut device, "dev1", &["four"]).await;
    wait_until(WAIT, "dev1's outbox is empty", async || {
        outbox_len(&server, "dev1").await == 0
    })
    .await;
    let (_, body) = client_status(api, "dev1").await;
    assert_eq!(body["online"], true, "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn batch_with_bad_entries_in_the_middle_delivers_the_others_in_order() {
    let (server, api) = start_api(|_| {}).await;
    register_offline(&server, "dev2").await;
    let messages = json!({ "messages": [
        { "client_id": "dev2", "payload": "first" },
        { "client_id": "a/b", "payload": "bad id" },
        { "client_id": "dev2", "payload": "bad qos", "qos": 2 },
        { "client_id": "dev2", "payload": "!!", "payload_encoding": "base64" },
        { "client_id": "dev2", "payload": "empty key", "collapse": "" },
        { "client_id": "dev2", "payload": "c2Vjb25k", "payload_encoding": "base64", "qos": 1 },
        { "client_id": "dev2", "payload": "third", "qos": 0 },
    ]});
    let (status, body) = batch(api, &messages).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    let statuses: Vec<_> = results.iter().map(|r| r["status"].as_u64()).collect();
    let want = [202, 400, 400, 400, 400, 202, 202].map(Some);
    assert_eq!(statuses, want, "{body}");
    assert_eq!(results[1]["error"], "bad_client_id", "{body}");
    assert_eq!(results[2]["error"], "bad_qos", "{body}");
    assert_eq!(results[3]["error"], "bad_payload", "{body}");
    assert_eq!(results[4]["error"], "bad_collapse", "{body}");
    assert_eq!(results[5]["client_id"], "dev2");
    assert_ne!(results[0]["id"], results[5]["id"]);
    // QoS 0 to an offline device is not stored (as over MQTT): two wait.
    assert_eq!(outbox_len(&server, "dev2").await, 2);
    let opts = Opts::new("dev2").clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    receive(&mut device, "dev2", &["first", "second"]).await;
    server.shutdown().await;
}

#[tokio::test]
async fn batch_over_max_batch_or_not_json_is_refused_whole() {
    let (server, api) = start_api(|c| c.http.max_batch = 2).await;
    let m = json!({ "client_id": "dev3", "payload": "x" });
    let (status, body) = batch(api, &json!({ "messages": [m, m, m] })).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "too_many_messages");
    let url = format!("http://{api}/v1/push");
    let (status, body) = call(reqwest::Method::POST, url, Some(TOKEN), "{").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(outbox_len(&server, "dev3").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn requests_without_a_valid_token_are_401() {
    let (server, api) = start_api(|_| {}).await;
    let url = format!("http://{api}/v1/push/dev4");
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        let (status, body) = call(reqwest::Method::POST, url.clone(), token, "x").await;
        assert_eq!(status, 401, "token {token:?}: {body}");
        assert_eq!(body["error"], "unauthorized");
    }
    let batch_url = format!("http://{api}/v1/push");
    let (status, _) = call(reqwest::Method::POST, batch_url, None, "{}").await;
    assert_eq!(status, 401);
    let status_url = format!("http://{api}/v1/clients/dev4");
    let (status, _) = call(reqwest::Method::GET, status_url, None, Vec::new()).await;
    assert_eq!(status, 401);
    assert_eq!(outbox_len(&server, "dev4").await, 0);
    let (status, _) = call(reqwest::Method::POST, url, Some(TOKEN), "x").await;
    assert_eq!(status, 202);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_qos_bad_client_id_and_unsupported_parameters_are_400() {
    let (server, api) = start_api(|_| {}).await;
    for (path, code) in [
        ("dev5?qos=2", "bad_qos"),
        ("dev5?qos=x", "bad_qos"),
        ("dev5?color=red", "bad_query"),
        ("dev5?collapse=", "bad_collapse"),
        ("dev5?qos=0&collapse=k", "bad_collapse"),
        ("dev5?receipt=maybe", "bad_receipt"),
        ("dev5?qos=0&receipt=true", "bad_receipt"),
        ("dev5?ttl=soon", "bad_ttl"),
        ("dev5?ttl=0s", "bad_ttl"),
        // Over session.message_ttl (7 days): the outbox itself would expire first.
        ("dev5?ttl=8days", "bad_ttl"),
        ("a%2Fb", "bad_client_id"),
        ("a+b", "bad_client_id"),
        ("a%23b", "bad_client_id"),
        ("a%00b", "bad_client_id"),
        ("%FF%FE", "bad_client_id"),
    ] {
        let (status, body) = push(api, path, b"x").await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"], code, "{path}: {body}");
    }
    assert_eq!(outbox_len(&server, "dev5").await, 0);
    server.shutdown().await;
}

/// `ttl` makes one message expire sooner than `session.message_ttl`: a device that comes
/// back after it gets the messages without one (or with a longer one), and never the
/// expired ones. A test about time itself: it waits the TTL out.
#[tokio::test]
async fn a_message_ttl_expires_that_message_only() {
    let (server, api) = start_api(|_| {}).await;
    register_offline(&server, "dev7").await;
    let (status, body) = push(api, "dev7?ttl=300ms", b"short").await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = push(api, "dev7?ttl=1h&qos=1", b"long").await;
    assert_eq!(status, 202, "{body}");
    let messages = json!({ "messages": [
        { "client_id": "dev7", "payload": "short too", "ttl": "300ms" },
        { "client_id": "dev7", "payload": "default" },
    ]});
    let (status, body) = batch(api, &messages).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(outbox_len(&server, "dev7").await, 4);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let opts = Opts::new("dev7").clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    receive(&mut device, "dev7", &["long", "default"]).await;
    wait_until(WAIT, "dev7's outbox is empty", async || {
        outbox_len(&server, "dev7").await == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_payload_over_max_packet_size_is_413() {
    let (server, api) = start_api(|c| c.server.max_packet_size = 1024).await;
    // Over the body limit, and over the PUBLISH's size with the topic counted.
    for len in [4096, 1020] {
        let (status, body) = push(api, "dev6", &vec![b'x'; len]).await;
        assert_eq!(status, 413, "{len} bytes: {body}");
        assert_eq!(body["error"], "too_large");
    }
    let (status, _) = push(api, "dev6", &[b'x'; 1000]).await;
    assert_eq!(status, 202);
    assert_eq!(outbox_len(&server, "dev6").await, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_push_while_redis_is_down_is_503() {
    // A redis-server of the test's own, stopped below, whatever the store under test.
    let mut redis = RedisServer::start();
    let url = redis.url();
    let (server, api) = start_api(move |c| {
        c.store.kind = StoreKind::Redis;
        c.store.redis_url = url;
    })
    .await;
    let (status, body) = push(api, "dev7", b"stored").await;
    assert_eq!(status, 202, "{body}");
    redis.kill();
    wait_until(Duration::from_secs(10), "a push answers 503", async || {
        let (status, body) = push(api, "dev7", b"not stored").await;
        assert!(status == 503 || status == 202, "{status}: {body}");
        if status == 503 {
            assert_eq!(body["error"], "store_unavailable", "{body}");
        }
        status == 503
    })
    .await;
    let (status, body) = client_status(api, "dev7").await;
    assert_eq!(status, 503, "{body}");
    let m = json!({ "client_id": "dev7", "payload": "x" });
    let (status, body) = batch(api, &json!({ "messages": [m] })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], 503, "{body}");
    server.shutdown().await;
}

#[test]
fn a_public_listener_without_tokens_refuses_to_start() {
    let out = run_briefly(&["--listen", "127.0.0.1:0", "--http-listen", "0.0.0.0:0"]);
    assert!(!out.status.success(), "must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.listen"), "names the key: {err}");
    assert!(err.contains("loopback"), "gives the reason: {err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, "[http]\nlisten = \"0.0.0.0:0\"\n").unwrap();
    let path = path.display().to_string();
    let out = run_briefly(&["--config", path.as_str(), "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success(), "must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&path) && err.contains("http.listen"), "{err}");
    assert!(!err.contains(TOKEN));
}

async fn delete_outbox(addr: SocketAddr, id: &str, token: Option<&str>) -> (u16, Value) {
    let url = format!("http://{addr}/v1/clients/{id}/outbox");
    call(reqwest::Method::DELETE, url, token, Vec::new()).await
}

#[tokio::test]
async fn delete_empties_an_offline_devices_outbox() {
    let (server, api) = start_api(|_| {}).await;
    register_offline(&server, "dev8").await;
    for p in ["one", "two", "three"] {
        let (status, body) = push(api, "dev8", p.as_bytes()).await;
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(outbox_len(&server, "dev8").await, 3);

    let (status, body) = delete_outbox(api, "dev8", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "client_id": "dev8", "deleted": 3 }));
    assert_eq!(outbox_len(&server, "dev8").await, 0);
    // Deleting an empty (or unknown) outbox is not an error.
    let (status, body) = delete_outbox(api, "dev8", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 0, "{body}");
    let (status, body) = delete_outbox(api, "a%00b", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "bad_client_id", "{body}");

    // The session survives: the device reconnects to nothing but what comes after.
    let opts = Opts::new("dev8").clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    let (status, body) = push(api, "dev8", b"marker").await;
    assert_eq!(status, 202, "{body}");
    receive(&mut device, "dev8", &["marker"]).await;
    server.shutdown().await;
}

#[tokio::test]
async fn delete_without_a_valid_token_is_401() {
    let (server, api) = start_api(|_| {}).await;
    register_offline(&server, "dev9").await;
    let (status, _) = push(api, "dev9", b"kept").await;
    assert_eq!(status, 202);
    for token in [None, Some("wrong-token-0123456789")] {
        let (status, body) = delete_outbox(api, "dev9", token).await;
        assert_eq!(status, 401, "token {token:?}: {body}");
        assert_eq!(body["error"], "unauthorized");
    }
    assert_eq!(outbox_len(&server, "dev9").await, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn client_status_gives_the_oldest_age_and_the_connection_start() {
    let (server, api) = start_api(|_| {}).await;
    register_offline(&server, "dev10").await;
    let (status, body) = client_status(api, "dev10").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queued"], 0, "{body}");
    assert!(body["oldest_queued_age_ms"].is_null(), "{body}");
    assert!(body["connected_since"].is_null(), "{body}");

    let before = herald::message::now_ms();
    let (status, _) = push(api, "dev10", b"one").await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, _) = push(api, "dev10", b"two").await;
    assert_eq!(status, 202);
    let (status, body) = client_status(api, "dev10").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queued"], 2, "{body}");
    let age = body["oldest_queued_age_ms"].as_u64().expect("an age");
    // The oldest is "one", at least the 20 ms slept ago, and no older than the test.
    let elapsed = herald::message::now_ms() - before;
    assert!(
        (20..=elapsed).contains(&age),
        "age {age}, elapsed {elapsed}"
    );
    assert!(body["connected_since"].is_null(), "{body}");

    let (status, _) = delete_outbox(api, "dev10", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let (_, body) = client_status(api, "dev10").await;
    assert_eq!(body["queued"], 0, "{body}");
    assert!(body["oldest_queued_age_ms"].is_null(), "{body}");

    let connecting = herald::message::now_ms();
    let opts = Opts::new("dev10").clean(false);
    let (_device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    let (_, body) = client_status(api, "dev10").await;
    assert_eq!(body["online"], true, "{body}");
    let since = body["connected_since"].as_u64().expect("connected_since");
    // The connection's start, in unix ms (its id may run a few µs ahead of the clock).
    assert!(
        (connecting..=herald::message::now_ms() + 1).contains(&since),
        "{since} not in [{connecting}, now]"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn deleted_messages_are_counted_as_dropped() {
    // A broker process of its own: the metrics recorder is per process.
    let port = common::process::free_port();
    let toml = format!("[http]\nlisten = \"127.0.0.1:{port}\"\ntokens = [\"{TOKEN}\"]\n");
    let node = common::process::Broker::start(&toml).await;
    let api = SocketAddr::from(([127, 0, 0, 1], port));
    let (c, _) = Raw::connect_ok(node.addr(), &Opts::new("dev11").clean(false)).await;
    c.disconnect().await;
    for p in ["one", "two"] {
        let (status, body) = push(api, "dev11", p.as_bytes()).await;
        assert_eq!(status, 202, "{body}");
    }
    let (status, body) = delete_outbox(api, "dev11", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 2, "{body}");
    let series = "herald_messages_dropped_total{reason=\"deleted\"}";
    assert_eq!(node.wait_metric(series, 2.0).await, 2.0);
}

/// `collapse`: a newer push with the same key replaces the queued one the device was never
/// sent (one "3 unread", not three), and never one already written to it: a message the
/// device received but did not acknowledge stays, and the new one queues behind it.
#[tokio::test]
async fn collapse_replaces_a_queued_message_and_not_a_sent_one() {
    let (server, api) = start_api(|_| {}).await;
    register_offline(&server, "devc").await;
    let (status, first) = push(api, "devc?collapse=badge", b"1 unread").await;
    assert_eq!(status, 202, "{first}");
    assert!(first.get("replaced").is_none(), "{first}");
    let (_, other) = push(api, "devc?collapse=chat", b"chat").await;
    let (_, second) = push(api, "devc?collapse=badge", b"2 unread").await;
    assert_eq!(second["replaced"], first["id"], "{second}");
    let (_, third) = push(api, "devc?collapse=badge", b"3 unread").await;
    assert_eq!(third["replaced"], second["id"], "{third}");
    assert!(other.get("replaced").is_none(), "{other}");
    assert_eq!(outbox_len(&server, "devc").await, 2);

    // Sent, not acknowledged: it must survive the next push with its key.
    let opts = Opts::new("devc").clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    for want in ["chat", "3 unread"] {
        let p = device.expect_publish().await;
        assert_eq!(text(&p), want);
    }
    device.disconnect().await;
    wait_offline(&server, "devc").await;
    let (_, fourth) = push(api, "devc?collapse=badge", b"4 unread").await;
    assert!(
        fourth.get("replaced").is_none(),
        "a sent message was replaced: {fourth}"
    );

    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    for want in ["chat", "3 unread", "4 unread"] {
        let p = device.expect_publish().await;
        assert_eq!(text(&p), want);
        device.puback(p.pkid).await;
    }
    wait_until(WAIT, "devc's outbox is empty", async || {
        outbox_len(&server, "devc").await == 0
    })
    .await;
    server.shutdown().await;
}

/// `http.tokens_file`: tokens one per line next to `http.tokens`; a file that is missing or
/// holds a short token stops Herald at start, naming the key and the line, never the token.
#[tokio::test]
async fn tokens_from_a_file_authorize_and_a_bad_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# backends\n\nfile-token-0123456789\n").unwrap();
    let path = file.clone();
    let (server, api) = start_api(move |c| c.http.tokens_file = Some(path)).await;
    let url = format!("http://{api}/v1/clients/devtf");
    let (status, _) = call(
        reqwest::Method::GET,
        url.clone(),
        Some("file-token-0123456789"),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(reqwest::Method::GET, url.clone(), Some(TOKEN), Vec::new()).await;
    assert_eq!(status, 200, "the tokens of http.tokens still count");
    let (status, _) = call(
        reqwest::Method::GET,
        url,
        Some("not-a-token-0123456789"),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 401);
    server.shutdown().await;

    std::fs::write(&file, "short\n").unwrap();
    let config = dir.path().join("herald.toml");
    let toml = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\ntokens_file = {:?}\n",
        file.display().to_string()
    );
    std::fs::write(&config, toml).unwrap();
    let config = config.display().to_string();
    let out = run_briefly(&["--config", config.as_str(), "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success(), "must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http.tokens_file") && err.contains(":1:"),
        "{err}"
    );
    assert!(!err.contains("short"), "never the token: {err}");
    std::fs::remove_file(&file).unwrap();
    let out = run_briefly(&["--config", config.as_str(), "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success(), "a missing file must refuse to start");
    assert!(String::from_utf8_lossy(&out.stderr).contains("http.tokens_file"));
}
