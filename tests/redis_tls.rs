//! The Redis store over TLS (`rediss://`): a real `redis-server` with a TLS port and a
//! certificate from the test CA, trusted through `store.redis_ca`. Both of Herald's paths to
//! Redis go over it: the redis crate's (attach, scripts) and Herald's own RESP connections
//! (the enqueue and ack writers).

mod common;

use std::time::Duration;

use common::process::{self, free_port, RedisServer};
use common::*;
use herald::config::StoreKind;
use herald::{Config, Server};

fn tls_redis() -> (RedisServer, u16) {
    let pki = pki::Pki::get();
    let server = pki.server();
    let tls_port = free_port();
    let args: Vec<String> = vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        server.cert.display().to_string(),
        "--tls-key-file".into(),
        server.key.display().to_string(),
        "--tls-ca-cert-file".into(),
        pki.ca_path().display().to_string(),
        "--tls-auth-clients".into(),
        "no".into(),
        "--appendfsync".into(),
        "everysec".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (RedisServer::start_with(&args), tls_port)
}

fn config(url: String, ca: Option<std::path::PathBuf>) -> Config {
    let mut c = Config::default();
    c.server.listen = Some("127.0.0.1:0".parse().unwrap());
    c.store.kind = StoreKind::Redis;
    c.store.redis_url = url;
    c.store.redis_ca = ca;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_stored_and_delivered_over_rediss() {
    if skip_under_redis("rediss", "starts its own TLS redis-server; once is enough") {
        return;
    }
    let (redis, tls_port) = tls_redis();
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let server = Server::start(config(url, Some(pki::Pki::get().ca_path())))
        .await
        .expect("herald with rediss:// and store.redis_ca");
    let addr = server.local_addr();

    // Queued for an offline device: written by the enqueue writer over TLS.
    let (device, _) = Raw::connect_ok(addr, &Opts::new("dev-rediss").clean(false)).await;
    device.disconnect().await;
    wait_offline(&server, "dev-rediss").await;
    let mut backend = Raw::connect(addr, "backend-rediss").await;
    for i in 0..3 {
        backend
            .publish(
                "push/dev-rediss",
                format!("m{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    // The Redis behind the TLS port holds them (read through its plain port).
    let mut plain = redis.conn().await;
    let queued = process::outbox_len_in(&mut plain, "dev-rediss").await;
    assert_eq!(queued, 3, "the outbox in the TLS Redis");

    // Replayed in order, and acknowledged away (the ack writer over TLS).
    let (mut device, present) = Raw::connect_ok(addr, &Opts::new("dev-rediss").clean(false)).await;
    assert!(present);
    for i in 0..3 {
        let p = device.expect_publish().await;
        assert_eq!(text(&p), format!("m{i}"));
        device.puback(p.pkid).await;
    }
    wait_until(Duration::from_secs(5), "the acks reach Redis", async || {
        process::outbox_len_in(&mut plain, "dev-rediss").await == 0
    })
    .await;
    server.shutdown().await;
}

/// A server certificate that no trusted CA signed is refused at start: Herald does not fall
/// back to an unverified connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_an_untrusted_certificate_fails_at_start() {
    if skip_under_redis("rediss", "starts its own TLS redis-server; once is enough") {
        return;
    }
    let (_redis, tls_port) = tls_redis();
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let err = match Server::start(config(url, Some(pki::Pki::get().other_ca_path()))).await {
        Ok(_) => panic!("started against a Redis whose certificate it cannot verify"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("rediss://127.0.0.1"), "{err}");
}
