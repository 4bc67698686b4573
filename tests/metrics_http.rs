//! The metrics listener over HTTP: `/metrics` answers the Prometheus exposition, any other
//! path 404, and every answer closes its connection (a scrape is one request).

mod common;

use std::net::SocketAddr;

/// The whole answer to `GET path`, read until the server closes the connection.
async fn get(addr: SocketAddr, path: &str) -> String {
    common::http_raw(addr, "GET", path)
        .await
        .expect("the server closes the connection after its answer")
}

#[tokio::test]
async fn metrics_path_answers_and_other_paths_are_not_found() {
    let s = common::start_with(|c| c.metrics.listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = s.metrics_addr().expect("metrics listener");

    let ok = get(addr, "/metrics").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.to_ascii_lowercase().contains("connection: close"),
        "{ok}"
    );
    assert!(ok.contains("herald_"), "no Herald series in:\n{ok}");

    for path in ["/", "/metricsx", "/admin/anything"] {
        let nf = get(addr, path).await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{path}: {nf}");
        assert!(!nf.contains("herald_"), "{path} served the metrics");
    }
}
