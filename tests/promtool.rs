//! Herald as Prometheus and Grafana see it (issue 13), checked with promtool, Prometheus' own
//! checker (Debian package `prometheus`; `make test` installs it through scripts/deps.sh):
//!
//! - config/alerts.yml passes `promtool check rules`, and its unit tests
//!   (config/alerts_test.yml) pass `promtool test rules`;
//! - a live node's `/metrics`, after some traffic, passes `promtool check metrics` without a
//!   single lint line, lists its families in the same order on every scrape, and has every
//!   family of the metrics contract below with HELP text, the contract's type and labels;
//! - the alert rules and config/grafana-dashboard.json use no metric outside the contract.
//!
//! `CONTRACT` is the list the broker, the alert rules, the dashboard and the README's
//! "Operating Herald" table agree on: renaming a metric means changing it here and there.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::process::Broker;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every metric family Herald exports: name, type, the labels each of its series carries.
const CONTRACT: &[(&str, &str, &[&str])] = &[
    ("herald_connections_active", "gauge", &[]),
    ("herald_connections_total", "counter", &[]),
    ("herald_connections_rejected_total", "counter", &["reason"]),
    ("herald_memory_guard_level", "gauge", &[]),
    ("herald_stalls_total", "counter", &[]),
    ("herald_malformed_packets_total", "counter", &[]),
    ("herald_messages_received_total", "counter", &["qos"]),
    ("herald_messages_sent_total", "counter", &["qos"]),
    ("herald_messages_acked_total", "counter", &[]),
    ("herald_messages_stored_total", "counter", &[]),
    ("herald_messages_dropped_total", "counter", &["reason"]),
    ("herald_store_errors_total", "counter", &[]),
    ("herald_session_takeovers_total", "counter", &[]),
    ("herald_limit_hits_total", "counter", &["limit"]),
    ("herald_wills_published_total", "counter", &[]),
    ("herald_cluster_forwards_total", "counter", &["kind"]),
    (
        "herald_cluster_forwards_received_total",
        "counter",
        &["kind"],
    ),
    ("herald_cluster_forward_failures_total", "counter", &[]),
    ("herald_cluster_stale_routes_total", "counter", &[]),
    ("herald_cluster_sweep_wakeups_total", "counter", &[]),
    ("herald_cluster_remote_kicks_total", "counter", &[]),
    ("herald_auth_failures_total", "counter", &["reason"]),
    ("herald_acl_denied_total", "counter", &["action"]),
    ("herald_log_lines_suppressed_total", "counter", &["reason"]),
    (
        "herald_delivery_latency_seconds",
        "histogram",
        &["path", "replay"],
    ),
    ("herald_store_op_duration_seconds", "histogram", &["op"]),
    ("herald_connect_duration_seconds", "histogram", &[]),
    ("herald_sessions", "gauge", &["state"]),
    ("herald_outbox_messages", "gauge", &[]),
    ("herald_outbox_oldest_age_seconds", "gauge", &[]),
    ("herald_store_up", "gauge", &[]),
    ("herald_store_ping_seconds", "gauge", &[]),
    ("herald_ready", "gauge", &[]),
    ("herald_draining", "gauge", &[]),
    ("herald_cluster_peers", "gauge", &[]),
    ("herald_cluster_links_up", "gauge", &[]),
    ("herald_mailbox_bytes", "gauge", &[]),
    ("herald_connack_total", "counter", &["code"]),
    ("herald_bytes_received_total", "counter", &[]),
    ("herald_bytes_sent_total", "counter", &[]),
    ("herald_messages_redelivered_total", "counter", &[]),
    ("herald_build_info", "gauge", &["version", "commit"]),
    ("process_cpu_seconds_total", "counter", &[]),
    ("process_resident_memory_bytes", "gauge", &[]),
    ("process_virtual_memory_bytes", "gauge", &[]),
    ("process_open_fds", "gauge", &[]),
    ("process_max_fds", "gauge", &[]),
    ("process_start_time_seconds", "gauge", &[]),
];

/// The contract's bucket bounds (`le`, without `+Inf`).
const DELIVERY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 3600.0,
];
const FAST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Families the dashboard may leave out (it shows everything else).
const NOT_ON_DASHBOARD: &[&str] = &[
    "herald_log_lines_suppressed_total",
    "process_virtual_memory_bytes",
];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `promtool` with `args`, `stdin` fed to it; fails the test, naming the Debian package,
/// when promtool is not installed.
fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool not found ({e}): it comes with the Debian package `prometheus`: \
                 apt-get install --no-install-recommends prometheus (or `make test`, which \
                 installs it through scripts/deps.sh)"
            )
        });
    // Written from a thread of its own, so that promtool is never stuck writing its output
    // while this side is still writing the input.
    let writer = stdin.map(|text| {
        let mut pipe = child.stdin.take().expect("promtool stdin");
        let text = text.to_string();
        std::thread::spawn(move || pipe.write_all(text.as_bytes()))
    });
    let out = child.wait_with_output().expect("promtool output");
    if let Some(w) = writer {
        w.join().expect("writer thread").expect("write to promtool");
    }
    out
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every `herald_*` / `process_*` name in `text`, histogram series suffixes taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &text[i..];
        if starts_word && (rest.starts_with("herald_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            let mut name = &rest[..len];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    if contract_type(base) == Some("histogram") {
                        name = base;
                    }
                }
            }
            names.insert(name.to_string());
            i += len;
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    names
}

fn contract_type(name: &str) -> Option<&'static str> {
    CONTRACT.iter().find(|(n, _, _)| *n == name).map(|c| c.1)
}

fn outside_contract(names: &BTreeSet<String>) -> Vec<&str> {
    names
        .iter()
        .map(String::as_str)
        .filter(|n| contract_type(n).is_none())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Alert rules

#[test]
fn alert_rules_pass_promtool_check_rules() {
    let out = promtool(&["check", "rules", "config/alerts.yml"], None);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        show(&out)
    );
    let all = String::from_utf8_lossy(&out.stdout);
    assert!(all.contains("SUCCESS"), "{}", show(&out));
}

#[test]
fn alert_rules_unit_tests_pass() {
    let out = promtool(&["test", "rules", "config/alerts_test.yml"], None);
    assert!(out.status.success(), "promtool test rules:\n{}", show(&out));
}

/// Each rule has a severity and both annotations, and no rule (or its unit test) names a
/// metric Herald does not export.
#[test]
fn alert_rules_use_contract_metrics_and_say_what_to_do() {
    let text = std::fs::read_to_string(repo_file("config/alerts.yml")).expect("alerts.yml");
    let rules: Vec<&str> = text.split("- alert: ").skip(1).collect();
    assert!(rules.len() >= 10, "{} rules", rules.len());
    for rule in &rules {
        let name = rule.lines().next().unwrap_or_default().trim();
        assert!(
            name.starts_with("Herald"),
            "alert {name}: names start with Herald"
        );
        for key in ["expr:", "severity: ", "summary:", "description:"] {
            assert!(rule.contains(key), "alert {name} has no {key}");
        }
        let severity = rule
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity: "))
            .unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "alert {name}: severity {severity:?}"
        );
    }
    for want in [
        "HeraldStoreDown",
        "HeraldDeliveryLatencyHigh",
        "HeraldOutboxBacklogGrowing",
        "HeraldClusterPeersMissing",
        "HeraldNotReady",
    ] {
        assert!(rules.iter().any(|r| r.starts_with(want)), "no alert {want}");
    }
    for file in ["config/alerts.yml", "config/alerts_test.yml"] {
        let text = std::fs::read_to_string(repo_file(file)).expect(file);
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} names no metric");
        let unknown = outside_contract(&names);
        assert!(unknown.is_empty(), "{file} uses {unknown:?}, not exported");
    }
}

// ---------------------------------------------------------------------------------------
// Dashboard

/// Every string under an `expr` key, and the query variables' queries (not the data source
/// variable's, whose `query` is the plugin's name).
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) if map.get("type").is_some_and(|t| t == "datasource") => {}
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_is_importable_and_uses_contract_metrics() {
    let text = std::fs::read_to_string(repo_file("config/grafana-dashboard.json"))
        .expect("config/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");

    // Importable anywhere: no fixed data source, no instance id.
    assert!(dash["id"].is_null(), "id must be null for an import");
    assert!(dash["uid"].is_string() && dash["title"].is_string());
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("instance")["type"], "query");

    // Rows as the README describes them, each with panels; every panel reads the
    // $datasource variable; ids unique; no two panels overlap.
    let panels = dash["panels"].as_array().expect("panels");
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        rows,
        [
            "Overview",
            "Delivery",
            "Store",
            "Cluster",
            "Connections",
            "Process"
        ]
    );
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "panel {id} is wider than the grid");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), id) {
                    panic!("panels {other} and {id} overlap at ({cx}, {cy})");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {id} ({}) has a fixed data source",
            p["title"]
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
    }

    let mut queries = Vec::new();
    dashboard_queries(&dash, &mut queries);
    let mut used = BTreeSet::new();
    for q in &queries {
        let names = metric_names(q);
        assert!(!names.is_empty(), "a query names no Herald metric: {q}");
        used.extend(names);
    }
    let unknown = outside_contract(&used);
    assert!(
        unknown.is_empty(),
        "the dashboard uses {unknown:?}, not exported"
    );
    let missing: Vec<&str> = CONTRACT
        .iter()
        .map(|c| c.0)
        .filter(|n| !used.contains(*n) && !NOT_ON_DASHBOARD.contains(n))
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

/// Every query of the dashboard is PromQL Prometheus accepts: with Grafana's variables
/// filled in, each becomes a recording rule that `promtool check rules` parses.
#[test]
fn dashboard_queries_parse() {
    let text = std::fs::read_to_string(repo_file("config/grafana-dashboard.json"))
        .expect("config/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dash, &mut queries);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        // label_values(...) is Grafana's, not PromQL: its argument is a selector.
        let q = match q.strip_prefix("label_values(") {
            Some(rest) => {
                rest.rsplit_once(',')
                    .expect("label_values(selector, label)")
                    .0
            }
            None => q,
        };
        let q = q
            .replace("$__rate_interval", "1m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        assert!(!q.contains('$'), "a variable left in: {q}");
        let quoted = serde_json::to_string(&q).expect("quote the query");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &rules).expect("write the rules");
    let out = promtool(&["check", "rules", file.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "the dashboard's queries as rules:\n{}\n{rules}",
        show(&out)
    );
}

// ---------------------------------------------------------------------------------------
// A live node's /metrics

/// The body of `GET /metrics` (de-chunked if need be); fails unless it is a 200.
async fn metrics_body(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("send the request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT * 5, s.read_to_end(&mut raw))
        .await
        .expect("the metrics listener closes the connection after its answer")
        .expect("read /metrics");
    let raw = String::from_utf8(raw).expect("the exposition is UTF-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// The sum of every sample of `name` (all label sets).
fn sum_of(exposition: &str, name: &str) -> f64 {
    sum_where(exposition, name, &[])
}

/// The sum of the samples of `name` whose labels include `labels` (in any order).
fn sum_where(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| {
            labels.iter().all(|(k, v)| {
                l.contains(&format!("{{{k}=\"{v}\"")) || l.contains(&format!(",{k}=\"{v}\""))
            })
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// A broker of the test's own after some traffic: one client connects with a persistent
/// session, subscribes, publishes QoS 1 to that topic and to its own push topic, gets both
/// and acknowledges them, so that every histogram has samples. Returns the exposition once
/// both deliveries are counted (or after 5 s: the contract check then says what is missing).
async fn broker_with_traffic() -> (Broker, String) {
    let b = Broker::start("").await;
    let (mut c, _) = Raw::connect_ok(b.addr(), &Opts::new("ops-dev").clean(false)).await;
    c.sub("ops/t", QoS::AtLeastOnce).await;
    c.publish("ops/t", b"one", QoS::AtLeastOnce, false).await;
    c.publish("push/ops-dev", b"two", QoS::AtLeastOnce, false)
        .await;
    for _ in 0..2 {
        let p = c.expect_publish().await;
        assert_eq!(p.qos, QoS::AtLeastOnce, "{p:?}");
        c.puback(p.pkid).await;
    }
    // The broker has read both PUBACKs once it answers a PINGREQ sent after them.
    c.ping().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics_body(b.metrics_addr()).await;
        let done = sum_of(&text, "herald_delivery_latency_seconds_count") >= 2.0;
        if done || tokio::time::Instant::now() >= deadline {
            c.disconnect().await;
            return (b, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn live_metrics_pass_promtool_check_metrics() {
    let (b, text) = broker_with_traffic().await;
    let out = promtool(&["check", "metrics"], Some(&text));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics on {}'s /metrics:\n{}\n--- the exposition\n{text}",
        b.metrics_addr(),
        show(&out)
    );
}

/// One sample line: its family (histogram suffixes off), and its label names.
fn sample(line: &str) -> (String, BTreeSet<String>) {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    let mut name = &line[..end];
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if contract_type(base) == Some("histogram") {
                name = base;
            }
        }
    }
    let mut labels = BTreeSet::new();
    if line[end..].starts_with('{') {
        let inner = &line[end + 1..line.rfind('}').expect("closing brace")];
        // Label values are quoted and may hold commas: walk key="value" pairs.
        let mut rest = inner;
        while let Some(eq) = rest.find("=\"") {
            labels.insert(rest[..eq].trim_start_matches(',').trim().to_string());
            let mut i = eq + 2;
            let b = rest.as_bytes();
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            rest = &rest[(i + 1).min(rest.len())..];
        }
    }
    (name.to_string(), labels)
}

fn le_bounds(text: &str, family: &str) -> BTreeSet<String> {
    let prefix = format!("{family}_bucket{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let at = l.find("le=\"")? + 4;
            let len = l[at..].find('"')?;
            Some(l[at..at + len].to_string())
        })
        .collect()
}

fn expected_bounds(bounds: &[f64]) -> BTreeSet<String> {
    bounds
        .iter()
        .map(|b| format!("{b}"))
        .chain(["+Inf".to_string()])
        .collect()
}

fn normalized(bounds: BTreeSet<String>) -> BTreeSet<String> {
    bounds
        .into_iter()
        .map(|b| match b.parse::<f64>() {
            Ok(v) if v.is_finite() => format!("{v}"),
            _ => b,
        })
        .collect()
}

#[tokio::test]
async fn live_metrics_have_every_contract_family_in_a_stable_order() {
    let (b, first) = broker_with_traffic().await;
    let second = metrics_body(b.metrics_addr()).await;
    let types = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("# TYPE "))
            .map(str::to_string)
            .collect()
    };
    let mut problems = Vec::new();
    let order = types(&first);
    let again = types(&second);
    if order != again {
        problems.push(format!(
            "the families' order changed between two scrapes:\n    {}\n  then\n    {}",
            order.join("\n    "),
            again.join("\n    ")
        ));
    }
    let mut seen = BTreeSet::new();
    for t in &order {
        if !seen.insert(t.clone()) {
            problems.push(format!("`{t}` twice in one scrape"));
        }
    }

    let mut labels_of: BTreeMap<String, Vec<BTreeSet<String>>> = BTreeMap::new();
    for line in first
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, labels) = sample(line);
        labels_of.entry(name).or_default().push(labels);
    }
    for (name, kind, labels) in CONTRACT {
        if !first
            .lines()
            .any(|l| l.starts_with(&format!("# HELP {name} ")))
        {
            problems.push(format!("{name}: no HELP line"));
        }
        let type_line = format!("# TYPE {name} {kind}");
        if !order.contains(&type_line) {
            let got = order
                .iter()
                .find(|l| l.starts_with(&format!("# TYPE {name} ")));
            problems.push(format!("{name}: want `{type_line}`, got {got:?}"));
        }
        match labels_of.get(*name) {
            None => problems.push(format!("{name}: no sample")),
            Some(sets) => {
                for set in sets {
                    let missing: Vec<&&str> =
                        labels.iter().filter(|l| !set.contains(**l)).collect();
                    if !missing.is_empty() {
                        problems.push(format!("{name}: a series without {missing:?}: {set:?}"));
                        break;
                    }
                }
            }
        }
    }
    for (family, bounds) in [
        ("herald_delivery_latency_seconds", DELIVERY_BUCKETS),
        ("herald_store_op_duration_seconds", FAST_BUCKETS),
        ("herald_connect_duration_seconds", FAST_BUCKETS),
    ] {
        let got = normalized(le_bounds(&first, family));
        let want = expected_bounds(bounds);
        if got != want {
            problems.push(format!("{family}: buckets {got:?}, want {want:?}"));
        }
    }
    // The traffic above: two live local deliveries, and a connect that was answered.
    for (name, labels, at_least) in [
        (
            "herald_delivery_latency_seconds_count",
            &[("path", "local"), ("replay", "false")][..],
            2.0,
        ),
        ("herald_connect_duration_seconds_count", &[][..], 1.0),
        ("herald_connack_total", &[("code", "0")][..], 1.0),
        ("herald_build_info", &[][..], 1.0),
        ("herald_store_up", &[][..], 1.0),
    ] {
        let v = sum_where(&first, name, labels);
        if v < at_least {
            problems.push(format!("{name}{labels:?} = {v}, want at least {at_least}"));
        }
    }
    assert!(
        problems.is_empty(),
        "/metrics of {} against the contract:\n  {}\n--- the exposition\n{first}",
        b.metrics_addr(),
        problems.join("\n  ")
    );
}
