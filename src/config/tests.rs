use std::path::Path;

use super::*;

#[test]
fn empty_file_is_defaults() {
    let c = Config::from_toml("", "t.toml").unwrap();
    assert_eq!(c.server.listen.map(|l| l.port()), Some(1883));
    assert_eq!(c.session.max_inflight, 32);
}

#[test]
fn unknown_key_names_file_and_key() {
    let e = Config::from_toml("[session]\nmax_inflite = 3\n", "h.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("h.toml:2"), "{e}");
    assert!(e.contains("max_inflite"), "{e}");
}

#[test]
fn bad_value_names_key() {
    let e = Config::from_toml("[server]\nlisten = \"nope\"\n", "h.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("server.listen"), "{e}");
}

#[test]
fn range_checked() {
    let e = Config::from_toml("[session]\nmax_inflight = 0\n", "h.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("session.max_inflight"), "{e}");
}

#[test]
fn empty_listen_turns_tcp_off() {
    let e = Config::from_toml("[server]\nlisten = \"\"\n", "h.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no client listener"), "{e}");
    let c = Config::from_toml(
        "[server]\nlisten = \"\"\nws_listen = \"127.0.0.1:8080\"\n",
        "h.toml",
    )
    .unwrap();
    assert!(c.server.listen.is_none());
}

#[test]
fn secrets_are_not_printed() {
    let c = Config::from_toml(
        "[auth]\njwt_hs256_secret = \"0123456789abcdef0123456789abcdef-sekrit\"\n",
        "h.toml",
    )
    .unwrap();
    assert!(!format!("{c:?}").contains("sekrit"));
    assert!(!c.allow_anonymous());
}

#[test]
fn cluster_needs_secret() {
    let e = Config::from_toml(
        "[store]\nkind = \"redis\"\n[cluster]\nlisten = \"127.0.0.1:7000\"\n",
        "h.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cluster.secret"), "{e}");
}

#[test]
fn example_config_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/herald.toml");
    Config::from_file(Path::new(path)).unwrap();
}

#[test]
fn byte_sizes_take_units() {
    let c = Config::from_toml(
        "[server]\nmax_write_buffer = \"64KiB\"\nmax_packet_size = 2048\n[store]\nmax_bytes = \"1 GiB\"\n",
        "h.toml",
    )
    .unwrap();
    assert_eq!(c.server.max_write_buffer, 64 * 1024);
    assert_eq!(c.server.max_packet_size, 2048);
    assert_eq!(c.store.max_bytes, 1 << 30);
    let e = Config::from_toml("[session]\nmax_queued_bytes = \"12 parsecs\"\n", "h.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("session.max_queued_bytes") && e.contains("h.toml:2"),
        "{e}"
    );
}

#[test]
fn http_api_is_off_by_default_and_public_needs_tokens() {
    let c = Config::from_toml("", "h.toml").unwrap();
    assert!(c.http.listen.is_none());
    assert_eq!(c.http.max_batch, 1000);
    Config::from_toml("[http]\nlisten = \"127.0.0.1:8080\"\n", "h.toml").unwrap();
    Config::from_toml("[http]\nlisten = \"[::1]:8080\"\n", "h.toml").unwrap();
    let e = Config::from_toml("[http]\nlisten = \"0.0.0.0:8080\"\n", "h.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("h.toml") && e.contains("http.listen") && e.contains("loopback"),
        "{e}"
    );
    let c = Config::from_toml(
        "[http]\nlisten = \"0.0.0.0:8080\"\ntokens = [\"0123456789abcdef-sekrit\"]\n",
        "h.toml",
    )
    .unwrap();
    assert!(!format!("{c:?}").contains("sekrit"));
    let e = Config::from_toml(
        "[http]\nlisten = \"127.0.0.1:8080\"\ntokens = [\"short\"]\n",
        "h.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("http.tokens"), "{e}");
}
