//! `POST /v1/broadcast` and the cluster-wide fields of `GET /v1/clients/{id}`, with a real
//! HTTP client (reqwest) and real MQTT clients.
//!
//! One node (an in-process broker on the store under test): every connected device gets
//! the broadcast on its own push topic and the answer counts them; a device that was
//! offline does not get it when it comes back (live only, never stored); bad queries are
//! 400, a missing token 401. Two nodes (real `herald` processes sharing a private Redis):
//! each node's devices get it and the answer counts them per node; the status of a device
//! connected to the other node names that node, and says offline once it left.
//!
//! Waiting is on events (a PUBLISH, a metric, a gauge), never fixed sleeps.

mod common;

use std::net::SocketAddr;

use common::http::*;
use common::process::{free_port, Broker, Launch, RedisServer};
use common::*;
use herald::config::Secret;
use serde_json::Value;

/// A broker with the API on a loopback port, `TOKEN`, and node id `solo`.
async fn start_solo() -> (TestServer, SocketAddr) {
    start_api(|c| c.cluster.node_id = Some("solo".into())).await
}

async fn broadcast(api: SocketAddr, query: &str, payload: &[u8]) -> (u16, Value) {
    let url = format!("http://{api}/v1/broadcast{query}");
    call(reqwest::Method::POST, url, Some(TOKEN), payload.to_vec()).await
}

async fn push(api: SocketAddr, id: &str, payload: &[u8]) {
    let url = format!("http://{api}/v1/push/{id}");
    let (status, body) = call(reqwest::Method::POST, url, Some(TOKEN), payload.to_vec()).await;
    assert_eq!(status, 202, "{body}");
}

/// The next PUBLISH must be `payload` on `id`'s push topic (acked if QoS 1).
async fn expect_on_push_topic(device: &mut Raw, id: &str, payload: &[u8]) {
    let p = device.expect_publish().await;
    assert_eq!(p.topic, format!("push/{id}"), "{id}");
    assert_eq!(&p.payload[..], payload, "{id}");
    if p.qos == QoS::AtLeastOnce {
        device.puback(p.pkid).await;
    }
}

#[tokio::test]
async fn a_broadcast_reaches_every_connected_device_and_counts_them() {
    let (server, api) = start_solo().await;
    let ids = ["b1", "b2", "b3", "b4", "b5"];
    let mut devices = Vec::new();
    for id in ids {
        devices.push(Raw::connect(server.local_addr(), id).await);
    }
    let (status, body) = broadcast(api, "", b"to everyone").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["delivered"], 5, "{body}");
    assert_eq!(body["qos"], 0, "{body}");
    assert_eq!(body["nodes"]["solo"], 5, "{body}");
    assert_eq!(body["failed"], serde_json::json!({}), "{body}");
    for (device, id) in devices.iter_mut().zip(ids) {
        let p = device.expect_publish().await;
        assert_eq!(p.topic, format!("push/{id}"));
        assert_eq!(&p.payload[..], b"to everyone");
        assert_eq!(p.qos, QoS::AtMostOnce);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_device_offline_during_a_broadcast_never_gets_it() {
    let (server, api) = start_solo().await;
    let opts = Opts::new("away").clean(false);
    let (away, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    away.disconnect().await;
    wait_offline(&server, "away").await;
    let mut here = Raw::connect(server.local_addr(), "here").await;

    // QoS 1, the one that could have been stored.
    let (status, body) = broadcast(api, "?qos=1", b"now only").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["delivered"], 1, "{body}");
    assert_eq!(body["qos"], 1, "{body}");
    expect_on_push_topic(&mut here, "here", b"now only").await;
    // Nothing stored: the persistent session's outbox stays empty.
    assert_eq!(outbox_len(&server, "away").await, 0);

    // Back, it gets what is pushed after, and nothing before it.
    let (mut away, present) = Raw::connect_ok(server.local_addr(), &opts).await;
    assert!(present);
    push(api, "away", b"after").await;
    expect_on_push_topic(&mut away, "away", b"after").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_qos1_broadcast_has_its_own_packet_id_and_its_puback_deletes_no_outbox_entry() {
    let (server, api) = start_solo().await;
    let opts = Opts::new("q1").clean(false);
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    push(api, "q1", b"stored").await;
    let stored = device.expect_publish().await;
    assert_eq!(&stored.payload[..], b"stored");
    assert_eq!(outbox_len(&server, "q1").await, 1);

    // Sent while the stored one is in flight (not acknowledged).
    let (status, body) = broadcast(api, "?qos=1", b"live").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["delivered"], 1, "{body}");
    let live = device.expect_publish().await;
    assert_eq!(&live.payload[..], b"live");
    assert_eq!(live.topic, "push/q1");
    assert_eq!(live.qos, QoS::AtLeastOnce);
    assert_ne!(live.pkid, stored.pkid, "the broadcast took an id in flight");
    device.puback(live.pkid).await;
    // The session handles packets in order: after the PINGRESP, the PUBACK was handled.
    device.ping().await;
    assert_eq!(
        outbox_len(&server, "q1").await,
        1,
        "a broadcast's PUBACK deleted an entry"
    );

    device.puback(stored.pkid).await;
    wait_until(WAIT, "q1's outbox is empty", async || {
        outbox_len(&server, "q1").await == 0
    })
    .await;
    // Nothing left to resend: the next connection gets only what is pushed after.
    device.disconnect().await;
    wait_offline(&server, "q1").await;
    let (mut device, _) = Raw::connect_ok(server.local_addr(), &opts).await;
    push(api, "q1", b"next").await;
    expect_on_push_topic(&mut device, "q1", b"next").await;
    server.shutdown().await;
}

#[tokio::test]
async fn bad_queries_are_400_and_a_missing_token_401() {
    let (server, api) = start_solo().await;
    let mut device = Raw::connect(server.local_addr(), "watcher").await;
    for (query, code) in [
        ("?qos=2", "bad_qos"),
        ("?qos=x", "bad_qos"),
        ("?qos=", "bad_qos"),
        ("?ttl=30s", "bad_query"),
        ("?receipt=true", "bad_query"),
    ] {
        let (status, body) = broadcast(api, query, b"nope").await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], code, "{query}: {body}");
    }
    let url = format!("http://{api}/v1/broadcast");
    let (status, body) = call(reqwest::Method::POST, url.clone(), None, b"x".to_vec()).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = call(reqwest::Method::POST, url, Some("wrong"), b"x".to_vec()).await;
    assert_eq!(status, 401);
    // None of those reached the device: the first PUBLISH it gets is this one.
    let (status, body) = broadcast(api, "", b"the only one").await;
    assert_eq!(status, 200, "{body}");
    expect_on_push_topic(&mut device, "watcher", b"the only one").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_payload_over_max_packet_size_is_413() {
    let server = start_with(|c| {
        c.http.listen = Some("127.0.0.1:0".parse().unwrap());
        c.http.tokens = vec![Secret::new(TOKEN)];
        c.server.max_packet_size = 1024;
    })
    .await;
    let api = server.http_addr().expect("HTTP API listening");
    let (status, body) = broadcast(api, "", &[b'x'; 1020]).await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = broadcast(api, "", &[b'x'; 4096]).await;
    assert_eq!(status, 413, "{body}");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Two nodes

/// Two `herald` processes, `a` and `b`, on one private Redis, each with the API.
struct Pair {
    a: Broker,
    b: Broker,
    a_api: SocketAddr,
    b_api: SocketAddr,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

async fn node(redis: &RedisServer, dir: &tempfile::TempDir, id: &str) -> (Broker, SocketAddr) {
    let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let how = Launch {
        name: Some(id.into()),
        args: vec![
            "--cluster-listen".into(),
            "127.0.0.1:0".into(),
            "--node-id".into(),
            id.into(),
            "--http-listen".into(),
            api.to_string(),
        ],
        redis_url: Some(redis.url()),
        dir: Some(dir.path().to_path_buf()),
        ..Launch::default()
    };
    let toml = format!("[http]\ntokens = [\"{TOKEN}\"]\n");
    (Broker::launch(&toml, how).await, api)
}

impl Pair {
    /// Both nodes, each knowing the other is alive.
    async fn start() -> Pair {
        let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, a_api) = node(&redis, &dir, "a").await;
        let (b, b_api) = node(&redis, &dir, "b").await;
        a.wait_metric("herald_cluster_peers", 1.0).await;
        b.wait_metric("herald_cluster_peers", 1.0).await;
        Pair {
            a,
            b,
            a_api,
            b_api,
            _redis: redis,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn a_broadcast_reaches_both_nodes_and_counts_per_node() {
    let p = Pair::start().await;
    let mut on_a = Vec::new();
    for id in ["a1", "a2"] {
        on_a.push((id, Raw::connect(p.a.addr(), id).await));
    }
    let mut on_b = Vec::new();
    for id in ["b1", "b2", "b3"] {
        on_b.push((id, Raw::connect(p.b.addr(), id).await));
    }
    let (status, body) = broadcast(p.a_api, "", b"cluster-wide").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["nodes"]["a"], 2, "{body}");
    assert_eq!(body["nodes"]["b"], 3, "{body}");
    assert_eq!(body["delivered"], 5, "{body}");
    assert_eq!(body["failed"], serde_json::json!({}), "{body}");
    for (id, device) in on_a.iter_mut().chain(on_b.iter_mut()) {
        expect_on_push_topic(device, id, b"cluster-wide").await;
    }
    p.a.assert_metric("herald_broadcasts_total", 1.0).await;
    p.b.assert_metric("herald_broadcasts_total", 1.0).await;
    p.b.assert_metric("herald_broadcast_devices_total{result=\"handed\"}", 3.0)
        .await;

    // Asked on b, the same, the other way round.
    let (status, body) = broadcast(p.b_api, "", b"from b").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["nodes"]["a"], 2, "{body}");
    assert_eq!(body["nodes"]["b"], 3, "{body}");
    for (id, device) in on_a.iter_mut().chain(on_b.iter_mut()) {
        expect_on_push_topic(device, id, b"from b").await;
    }
}

#[tokio::test]
async fn status_names_the_other_node_and_follows_the_device_offline() {
    let p = Pair::start().await;
    let opts = Opts::new("roamer").clean(false);
    let (device, _) = Raw::connect_ok(p.b.addr(), &opts).await;

    let (status, body) = client_status(p.a_api, "roamer").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["online"], true, "{body}");
    assert_eq!(body["node"], "b", "{body}");
    assert!(body["connected_since"].as_u64().is_some(), "{body}");
    assert!(body.get("node_error").is_none(), "{body}");
    // On its own node, the same answer.
    let (_, here) = client_status(p.b_api, "roamer").await;
    assert_eq!(here["online"], true, "{here}");
    assert_eq!(here["node"], "b", "{here}");
    assert_eq!(here["connected_since"], body["connected_since"], "{here}");

    // Offline: its persistent session keeps its route, but b says it is gone.
    device.disconnect().await;
    p.b.wait_connections(0).await;
    let (status, body) = client_status(p.a_api, "roamer").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["online"], false, "{body}");
    assert_eq!(body["node"], Value::Null, "{body}");
    assert_eq!(body["connected_since"], Value::Null, "{body}");

    // Never connected anywhere.
    let (_, body) = client_status(p.a_api, "nobody").await;
    assert_eq!(body["online"], false, "{body}");
    assert_eq!(body["node"], Value::Null, "{body}");
}
