//! Results: the per-run table, the JSON file, `compare` (side-by-side table with the
//! Herald/Mosquitto ratio and the targets of issue 3, and of issue 4 for a durable-store
//! column) and `cluster-report` (local against forwarded, the targets of issue 5).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One scenario (variant) of one run against one broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// idle, push, push-rate, qos0, drain.
    pub scenario: String,
    /// The scenario with its size: idle-10000, qos0-4, ... Columns are matched on it.
    pub variant: String,
    /// Everything was delivered and no connection failed.
    pub ok: bool,
    pub errors: Vec<String>,
    /// Remarks that do not fail the run (e.g. the offered rate was not reached).
    #[serde(default)]
    pub notes: Vec<String>,
    pub params: BTreeMap<String, serde_json::Value>,
    pub metrics: BTreeMap<String, f64>,
}

impl ScenarioResult {
    pub fn new(scenario: &str, variant: impl Into<String>) -> Self {
        ScenarioResult {
            scenario: scenario.into(),
            variant: variant.into(),
            ok: true,
            errors: Vec::new(),
            notes: Vec::new(),
            params: BTreeMap::new(),
            metrics: BTreeMap::new(),
        }
    }

    pub fn param(&mut self, k: &str, v: impl Into<serde_json::Value>) {
        self.params.insert(k.into(), v.into());
    }

    pub fn metric(&mut self, k: &str, v: f64) {
        if v.is_finite() {
            self.metrics.insert(k.into(), v);
        }
    }

    pub fn opt_metric(&mut self, k: &str, v: Option<f64>) {
        if let Some(v) = v {
            self.metric(k, v);
        }
    }

    pub fn error(&mut self, e: impl Into<String>) {
        self.ok = false;
        self.errors.push(e.into());
    }
}

/// The JSON file of one `herald-bench` run.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunFile {
    pub tool: String,
    pub label: String,
    pub broker: String,
    /// Where the publisher connected, when not to `broker` (another node of a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_broker: Option<String>,
    /// The first --broker-pid.
    pub broker_pid: Option<u32>,
    /// Every --broker-pid (the nodes of a cluster), in the order given.
    #[serde(default)]
    pub broker_pids: Vec<u32>,
    #[serde(default)]
    pub store_pid: Option<u32>,
    pub unix_time: u64,
    pub results: Vec<ScenarioResult>,
}

/// How a metric is shown, and its target as a Herald/Mosquitto ratio (issue 3).
struct Spec {
    scenario: &'static str,
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    /// (">=" or "<=", ratio)
    target: Option<(&'static str, f64)>,
}

const fn spec(
    scenario: &'static str,
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    target: Option<(&'static str, f64)>,
) -> Spec {
    Spec {
        scenario,
        key,
        label,
        unit,
        target,
    }
}

/// Metrics in display order. Those not listed are still in the JSON.
const SPECS: &[Spec] = &[
    spec(
        "idle",
        "connect_rate",
        "connect rate",
        "conn/s",
        Some((">=", 1.5)),
    ),
    spec(
        "idle",
        "rss_per_conn",
        "broker RSS per connection",
        "B",
        Some(("<=", 1.0)),
    ),
    spec("idle", "idle_cpu_pct", "broker CPU while idle", "%", None),
    spec("idle", "connected", "connected", "", None),
    spec("idle", "rss_before", "broker RSS before", "MB", None),
    spec(
        "idle",
        "rss_after_idle",
        "broker RSS after idle",
        "MB",
        None,
    ),
    spec(
        "idle",
        "connect_cpu_pct",
        "broker CPU while connecting",
        "%",
        None,
    ),
    spec(
        "idle",
        "connect_bench_cpu_pct",
        "load generator CPU while connecting",
        "%",
        None,
    ),
    spec(
        "idle",
        "connect_cpu_us",
        "broker CPU per connection",
        "us",
        None,
    ),
    spec(
        "push",
        "msgs_per_sec",
        "delivered",
        "msg/s",
        Some((">=", 2.0)),
    ),
    spec("push", "p50_us", "latency p50", "ms", None),
    spec("push", "p99_us", "latency p99", "ms", None),
    spec("push", "max_us", "latency max", "ms", None),
    spec("push", "broker_cpu_pct", "broker CPU", "%", None),
    spec("push", "store_cpu_pct", "store (Redis) CPU", "%", None),
    spec(
        "push",
        "broker_cpu_us_per_msg",
        "broker CPU per message",
        "us",
        None,
    ),
    spec(
        "push",
        "store_cpu_us_per_msg",
        "store (Redis) CPU per message",
        "us",
        None,
    ),
    spec(
        "push",
        "broker1_cpu_us_per_msg",
        "broker 1 (node A) CPU per message",
        "us",
        None,
    ),
    spec(
        "push",
        "broker2_cpu_us_per_msg",
        "broker 2 (node B) CPU per message",
        "us",
        None,
    ),
    spec(
        "push",
        "redis_cmds_per_msg",
        "store (Redis) commands per message",
        "/msg",
        None,
    ),
    spec("push", "bench_cpu_pct", "load generator CPU", "%", None),
    spec(
        "push-rate",
        "achieved_rate",
        "offered rate achieved",
        "msg/s",
        None,
    ),
    spec("push-rate", "p50_us", "latency p50", "ms", None),
    spec(
        "push-rate",
        "p99_us",
        "latency p99",
        "ms",
        Some(("<=", 1.0)),
    ),
    spec("push-rate", "max_us", "latency max", "ms", None),
    spec("push-rate", "broker_cpu_pct", "broker CPU", "%", None),
    spec("push-rate", "store_cpu_pct", "store (Redis) CPU", "%", None),
    spec(
        "push-rate",
        "broker_cpu_us_per_msg",
        "broker CPU per message",
        "us",
        None,
    ),
    spec(
        "push-rate",
        "store_cpu_us_per_msg",
        "store (Redis) CPU per message",
        "us",
        None,
    ),
    spec(
        "push-rate",
        "broker1_cpu_us_per_msg",
        "broker 1 (node A) CPU per message",
        "us",
        None,
    ),
    spec(
        "push-rate",
        "broker2_cpu_us_per_msg",
        "broker 2 (node B) CPU per message",
        "us",
        None,
    ),
    spec(
        "push-rate",
        "redis_cmds_per_msg",
        "store (Redis) commands per message",
        "/msg",
        None,
    ),
    spec(
        "push-rate",
        "bench_cpu_pct",
        "load generator CPU",
        "%",
        None,
    ),
    spec(
        "qos0",
        "msgs_per_sec",
        "delivered",
        "msg/s",
        Some((">=", 2.0)),
    ),
    spec("qos0", "p50_us", "latency p50", "ms", None),
    spec("qos0", "p99_us", "latency p99", "ms", None),
    spec("qos0", "dropped", "dropped", "", None),
    spec("qos0", "broker_cpu_pct", "broker CPU", "%", None),
    spec("qos0", "store_cpu_pct", "store (Redis) CPU", "%", None),
    spec("qos0", "bench_cpu_pct", "load generator CPU", "%", None),
    spec(
        "drain",
        "drain_secs",
        "time until all arrive",
        "s",
        Some(("<=", 0.5)),
    ),
    spec("drain", "msgs_per_sec", "drain rate", "msg/s", None),
    spec(
        "drain",
        "reconnect_secs",
        "time until all reconnected",
        "s",
        None,
    ),
    spec("drain", "broker_cpu_pct", "broker CPU", "%", None),
    spec("drain", "store_cpu_pct", "store (Redis) CPU", "%", None),
    spec(
        "drain",
        "broker_cpu_us_per_msg",
        "broker CPU per message",
        "us",
        None,
    ),
    spec(
        "drain",
        "store_cpu_us_per_msg",
        "store (Redis) CPU per message",
        "us",
        None,
    ),
    spec("drain", "bench_cpu_pct", "load generator CPU", "%", None),
    spec(
        "drain",
        "publish_rate",
        "offline publish rate (PUBACKed)",
        "msg/s",
        None,
    ),
    spec(
        "drain",
        "publish_broker_cpu_us_per_msg",
        "broker CPU per stored message",
        "us",
        None,
    ),
    spec(
        "drain",
        "publish_store_cpu_us_per_msg",
        "store (Redis) CPU per stored message",
        "us",
        None,
    ),
];

/// Metrics of the scenarios of issue 10 (TLS and authentication), in display order.
const SECURITY_SPECS: &[Spec] = &[
    spec(
        "handshake-tls",
        "connect_rate",
        "handshakes (connections)",
        "conn/s",
        Some((">=", 1.0)),
    ),
    spec(
        "handshake-tls",
        "broker_cpu_us_per_conn",
        "broker CPU per connection",
        "us",
        Some(("<=", 1.0)),
    ),
    spec(
        "handshake-tls",
        "conns_per_broker_cpu_sec",
        "connections per broker CPU second",
        "conn/s",
        Some((">=", 1.0)),
    ),
    spec("handshake-tls", "broker_cpu_pct", "broker CPU", "%", None),
    spec(
        "handshake-tls",
        "bench_cpu_pct",
        "load generator CPU",
        "%",
        None,
    ),
    spec(
        "handshake-tls",
        "bench_cpu_us_per_conn",
        "load generator CPU per connection",
        "us",
        None,
    ),
    spec("handshake-tls", "p50_us", "handshake time p50", "ms", None),
    spec("handshake-tls", "p99_us", "handshake time p99", "ms", None),
    spec("handshake-tls", "connected", "connected", "", None),
    spec(
        "handshake",
        "connect_rate",
        "handshakes (connections)",
        "conn/s",
        None,
    ),
    spec(
        "handshake",
        "broker_cpu_us_per_conn",
        "broker CPU per connection",
        "us",
        None,
    ),
    spec(
        "handshake",
        "conns_per_broker_cpu_sec",
        "connections per broker CPU second",
        "conn/s",
        None,
    ),
    spec("handshake", "broker_cpu_pct", "broker CPU", "%", None),
    spec(
        "handshake",
        "bench_cpu_pct",
        "load generator CPU",
        "%",
        None,
    ),
    spec(
        "handshake",
        "bench_cpu_us_per_conn",
        "load generator CPU per connection",
        "us",
        None,
    ),
    spec("handshake", "p50_us", "handshake time p50", "ms", None),
    spec("handshake", "p99_us", "handshake time p99", "ms", None),
    spec("handshake", "connected", "connected", "", None),
    spec(
        "idle-tls",
        "rss_per_conn",
        "broker RSS per connection",
        "B",
        Some(("<=", 1.0)),
    ),
    spec("idle-tls", "connect_rate", "connect rate", "conn/s", None),
    spec(
        "idle-tls",
        "idle_cpu_pct",
        "broker CPU while idle",
        "%",
        None,
    ),
    spec("idle-tls", "connected", "connected", "", None),
    spec("idle-tls", "rss_before", "broker RSS before", "MB", None),
    spec(
        "idle-tls",
        "rss_after_idle",
        "broker RSS after idle",
        "MB",
        None,
    ),
    spec(
        "idle-tls",
        "connect_cpu_pct",
        "broker CPU while connecting",
        "%",
        None,
    ),
    spec(
        "idle-tls",
        "connect_bench_cpu_pct",
        "load generator CPU while connecting",
        "%",
        None,
    ),
    spec(
        "idle-tls",
        "connect_cpu_us",
        "broker CPU per connection",
        "us",
        None,
    ),
    spec(
        "login-storm",
        "before_p99_us",
        "push latency p99 before the storm",
        "ms",
        None,
    ),
    spec(
        "login-storm",
        "storm_p99_us",
        "push latency p99 during the storm",
        "ms",
        None,
    ),
    spec(
        "login-storm",
        "after_p99_us",
        "push latency p99 after the storm",
        "ms",
        None,
    ),
    spec(
        "login-storm",
        "before_p50_us",
        "push latency p50 before the storm",
        "ms",
        None,
    ),
    spec(
        "login-storm",
        "storm_p50_us",
        "push latency p50 during the storm",
        "ms",
        None,
    ),
    spec(
        "login-storm",
        "storm_max_us",
        "push latency max during the storm",
        "ms",
        None,
    ),
    spec("login-storm", "logins_ok", "logins", "", None),
    spec("login-storm", "logins_failed", "logins failed", "", None),
    spec(
        "login-storm",
        "logins_per_sec",
        "login rate",
        "logins/s",
        None,
    ),
    spec("login-storm", "storm_secs", "storm took", "s", None),
    spec("login-storm", "login_p50_us", "login time p50", "ms", None),
    spec("login-storm", "login_p99_us", "login time p99", "ms", None),
    spec(
        "login-storm",
        "storm_broker_cpu_us_per_login",
        "broker CPU per login (pushes included)",
        "ms",
        None,
    ),
    spec(
        "login-storm",
        "baseline_broker_cpu_pct",
        "broker CPU before the storm",
        "%",
        None,
    ),
    spec(
        "login-storm",
        "storm_broker_cpu_pct",
        "broker CPU during the storm",
        "%",
        None,
    ),
    spec(
        "login-storm",
        "storm_bench_cpu_pct",
        "load generator CPU during the storm",
        "%",
        None,
    ),
    spec(
        "login-storm",
        "achieved_rate",
        "push rate achieved",
        "msg/s",
        None,
    ),
];

/// The specs of a scenario: its own, else (push-rate-tls, qos0-tls, drain-tls) those of the
/// scenario without `-tls`, targets included.
fn specs_for(scenario: &str) -> Vec<&'static Spec> {
    let own: Vec<&Spec> = SPECS
        .iter()
        .chain(SECURITY_SPECS)
        .filter(|s| s.scenario == scenario)
        .collect();
    if !own.is_empty() {
        return own;
    }
    match scenario.strip_suffix("-tls") {
        Some(base) => SPECS.iter().filter(|s| s.scenario == base).collect(),
        None => Vec::new(),
    }
}

fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "ms" => format!("{:.2} ms", v / 1000.0),
        "us" => format!("{v:.1} µs"),
        "MB" => format!("{:.1} MB", v / 1e6),
        "B" => format!("{v:.0} B"),
        "%" => format!("{v:.1} %"),
        "s" => format!("{v:.3} s"),
        "" => format!("{v:.0}"),
        "/msg" => format!("{v:.2}"),
        _ => format!("{} {unit}", thousands(v)),
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn display_params(r: &ScenarioResult) -> String {
    r.params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The human table of one run.
pub fn print_run(label: &str, results: &[ScenarioResult]) {
    for r in results {
        println!();
        println!(
            "== {} against {label}: {}",
            r.variant,
            if r.ok { "ok" } else { "FAILED" }
        );
        println!("   {}", display_params(r));
        let mut shown = std::collections::HashSet::new();
        for s in specs_for(&r.scenario) {
            if let Some(&v) = r.metrics.get(s.key) {
                println!("   {:<38} {:>14}", s.label, fmt_value(v, s.unit));
                shown.insert(s.key);
            }
        }
        let rest: Vec<String> = r
            .metrics
            .iter()
            .filter(|(k, _)| !shown.contains(k.as_str()))
            .map(|(k, v)| format!("{k}={}", trim_num(*v)))
            .collect();
        if !rest.is_empty() {
            println!("   ({})", rest.join(" "));
        }
        for e in &r.errors {
            println!("   error: {e}");
        }
        for n in &r.notes {
            println!("   note: {n}");
        }
    }
}

fn trim_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Loads one column: a JSON file, or every *.json in a directory.
fn load(path: &Path) -> Result<Vec<ScenarioResult>, String> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for f in files.drain(..) {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let run: RunFile =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        out.extend(run.results);
    }
    Ok(out)
}

/// Targets of issue 4 for a Herald with a durable store (`compare --durable NAME`), as a
/// ratio of that column to the second (Mosquitto, persistence on): QoS 1 push to online
/// devices at no less than Mosquitto's msgs/s.
const DURABLE_TARGETS: &[(&str, &str, &str, f64)] = &[("push", "msgs_per_sec", ">=", 1.0)];

fn target_met(op: &str, t: f64, r: f64) -> bool {
    (op == ">=" && r >= t) || (op == "<=" && r <= t)
}

const ORDER: &[&str] = &[
    "idle",
    "push",
    "push-rate",
    "qos0",
    "drain",
    "handshake",
    "handshake-tls",
    "idle-tls",
    "push-tls",
    "push-rate-tls",
    "qos0-tls",
    "drain-tls",
    "login-storm",
];

/// `compare NAME=PATH...`: one row per metric, one column per broker; the ratio is the first
/// column over the second (Herald/Mosquitto), and each further column gets its own ratio to
/// the second. The ratio of a column named in `durable` also shows its issue 4 target.
pub fn compare(
    columns: &[String],
    durable: &[String],
    markdown: Option<&Path>,
) -> Result<bool, String> {
    let mut cols: Vec<(String, Vec<ScenarioResult>)> = Vec::new();
    for c in columns {
        let (name, path) = c
            .split_once('=')
            .ok_or_else(|| format!("`{c}`: expected NAME=PATH"))?;
        cols.push((name.to_string(), load(Path::new(path))?));
    }
    if cols.len() < 2 {
        return Err("compare needs at least two columns".into());
    }
    for d in durable {
        if !cols[2..].iter().any(|(name, _)| name == d) {
            return Err(format!(
                "--durable {d}: not a column after the second (the ratio is to the second)"
            ));
        }
    }
    let mut variants: Vec<(String, String)> = Vec::new();
    for (_, rs) in &cols {
        for r in rs {
            if !variants.iter().any(|(v, _)| v == &r.variant) {
                variants.push((r.variant.clone(), r.scenario.clone()));
            }
        }
    }
    variants.sort_by_key(|(v, s)| {
        let n: u64 = v
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (ORDER.iter().position(|o| o == s).unwrap_or(99), n)
    });
    let find = |col: usize, variant: &str| cols[col].1.iter().find(|r| r.variant == variant);

    let mut header = vec!["scenario".to_string(), "metric".to_string()];
    header.push(cols[0].0.clone());
    header.push(cols[1].0.clone());
    header.push(format!("{}/{}", cols[0].0, cols[1].0));
    header.push("target".into());
    header.push("met".into());
    for (name, _) in &cols[2..] {
        header.push(name.clone());
        header.push(format!("{name}/{}", cols[1].0));
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut all_ok = true;
    let mut notes: Vec<String> = Vec::new();
    for (variant, scenario) in &variants {
        for (ci, (name, _)) in cols.iter().enumerate() {
            match find(ci, variant) {
                Some(r) if !r.ok => {
                    all_ok = false;
                    notes.push(format!(
                        "{variant} on {name} FAILED: {}",
                        r.errors.join("; ")
                    ));
                }
                Some(r) => {
                    notes.extend(r.notes.iter().map(|n| format!("{variant} on {name}: {n}")))
                }
                // A column that ran none of this scenario's kind (bench.sh runs Herald
                // (redis) only for push, push-rate and drain) is not worth a note.
                None if cols[ci].1.iter().any(|r| &r.scenario == scenario) => {
                    notes.push(format!("{variant}: no result for {name}"))
                }
                None => {}
            }
        }
        for s in specs_for(scenario) {
            let val = |ci: usize| find(ci, variant).and_then(|r| r.metrics.get(s.key).copied());
            if (0..cols.len()).all(|ci| val(ci).is_none()) {
                continue;
            }
            let show = |v: Option<f64>| v.map(|v| fmt_value(v, s.unit)).unwrap_or("-".into());
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                _ => None,
            };
            let r01 = ratio(val(0), val(1));
            let mut row = vec![
                variant.clone(),
                s.label.to_string(),
                show(val(0)),
                show(val(1)),
            ];
            row.push(r01.map(|r| format!("{r:.2}")).unwrap_or("-".into()));
            match s.target {
                Some((op, t)) => {
                    row.push(format!("{op} {t:.1}"));
                    row.push(match r01 {
                        Some(r) if target_met(op, t, r) => "yes".into(),
                        Some(_) => "NO".into(),
                        None => "-".into(),
                    });
                }
                None => {
                    row.push(String::new());
                    row.push(String::new());
                }
            }
            for ci in 2..cols.len() {
                row.push(show(val(ci)));
                let rc = ratio(val(ci), val(1));
                let mut cell = rc.map(|r| format!("{r:.2}")).unwrap_or("-".into());
                let target = DURABLE_TARGETS
                    .iter()
                    .find(|(sc, k, _, _)| *sc == s.scenario && *k == s.key)
                    .filter(|_| durable.contains(&cols[ci].0));
                if let Some(&(_, _, op, t)) = target {
                    let met = match rc {
                        Some(r) if target_met(op, t, r) => "yes",
                        Some(_) => "NO",
                        None => "-",
                    };
                    cell = format!("{cell} (target {op} {t:.1}: {met})");
                    notes.push(format!(
                        "{variant} {} on {}: {}/{} = {}, target {op} {t:.1} (issue 4): {}",
                        s.label,
                        cols[ci].0,
                        cols[ci].0,
                        cols[1].0,
                        rc.map(|r| format!("{r:.2}")).unwrap_or("-".into()),
                        if met == "yes" { "met" } else { "NOT met" }
                    ));
                }
                row.push(cell);
            }
            rows.push(row);
        }
    }

    // Text table, a blank line between scenarios.
    let (top, lines) = text_table(&header, &rows, 2);
    println!("{top}");
    let mut last = "";
    for (r, l) in rows.iter().zip(&lines) {
        if r[0] != last && !last.is_empty() {
            println!();
        }
        last = &r[0];
        println!("{l}");
    }
    for n in &notes {
        println!("note: {n}");
    }

    if let Some(md) = markdown {
        // One table per scenario (variant), without the scenario column.
        let mut out = String::new();
        let head = &header[1..];
        let mut variant = String::new();
        for r in &rows {
            if r[0] != variant {
                variant = r[0].clone();
                let _ = writeln!(out, "\n### {variant}\n");
                let _ = writeln!(out, "| {} |", head.join(" | "));
                let _ = writeln!(
                    out,
                    "|{}",
                    (0..head.len())
                        .map(|i| if i == 0 { " --- |" } else { " ---: |" })
                        .collect::<String>()
                );
            }
            let _ = writeln!(out, "| {} |", r[1..].join(" | "));
        }
        if !notes.is_empty() {
            out.push('\n');
            for n in &notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        std::fs::write(md, out).map_err(|e| format!("{}: {e}", md.display()))?;
    }
    Ok(all_ok)
}

// ---------------------------------------------------------------------------------------
// cluster-report (issue 5)

/// Issue 5: the second hop adds at most this much to p50 (push-rate cases, µs)...
const HOP_P50_TARGET_US: f64 = 1000.0;
/// ...and a forwarded message costs at most this many times the broker CPU of a local one
/// (summed over the nodes).
const FORWARD_CPU_TARGET: f64 = 1.5;

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn variant_order(variant: &str, scenario: &str) -> (usize, u64) {
    let n: u64 = variant
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (ORDER.iter().position(|o| *o == scenario).unwrap_or(99), n)
}

fn md_table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        (0..head.len())
            .map(|i| if i < 3 { " --- |" } else { " ---: |" })
            .collect::<String>()
    );
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
}

/// A text table with the first `left` columns left-aligned and the rest right-aligned: the
/// header with its rule under it, and one line per row.
fn text_table<S: AsRef<str>>(
    head: &[S],
    rows: &[Vec<String>],
    left: usize,
) -> (String, Vec<String>) {
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].as_ref().chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        cells
            .enumerate()
            .map(|(i, c)| {
                if i < left {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let rule = "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1));
    let top = format!("{}\n{rule}", line(&mut head.iter().map(AsRef::as_ref)));
    let lines = rows
        .iter()
        .map(|r| line(&mut r.iter().map(String::as_str)))
        .collect();
    (top, lines)
}

/// `text_table` with the first three columns left-aligned, printed.
fn print_table(head: &[&str], rows: &[Vec<String>]) {
    let (top, lines) = text_table(head, rows, 3);
    println!("{top}");
    for l in lines {
        println!("{l}");
    }
}

/// `cluster-report --local DIR --forwarded DIR [--plain DIR]`: every run of every case, then
/// per case the medians over the runs against the targets of issue 5. False if a run failed.
pub fn cluster_report(
    local: &Path,
    forwarded: &Path,
    plain: Option<&Path>,
    markdown: Option<&Path>,
) -> Result<bool, String> {
    let mut setups: Vec<(&str, Vec<ScenarioResult>)> = Vec::new();
    if let Some(p) = plain {
        setups.push(("1 node, no cluster flags", load(p)?));
    }
    setups.push(("1 node (local)", load(local)?));
    setups.push(("2 nodes (forwarded)", load(forwarded)?));
    let (li, fi) = (setups.len() - 2, setups.len() - 1);

    let mut variants: Vec<(String, String)> = Vec::new();
    for (_, rs) in &setups {
        for r in rs {
            if !variants.iter().any(|(v, _)| v == &r.variant) {
                variants.push((r.variant.clone(), r.scenario.clone()));
            }
        }
    }
    variants.sort_by_key(|(v, s)| variant_order(v, s));

    let get = |r: &ScenarioResult, k: &str| r.metrics.get(k).copied();
    let ms = |v: Option<f64>| {
        v.map(|v| format!("{:.2}", v / 1000.0))
            .unwrap_or("-".into())
    };
    let us = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or("-".into());
    let rate = |v: Option<f64>| v.map(thousands).unwrap_or("-".into());
    let cmds = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or("-".into());
    let total = |r: &ScenarioResult| {
        Some(get(r, "broker_cpu_us_per_msg")? + get(r, "store_cpu_us_per_msg").unwrap_or(0.0))
    };

    // Every run.
    let runs_head = [
        "case",
        "setup",
        "run",
        "msgs/s",
        "p50 ms",
        "p99 ms",
        "broker CPU µs/msg (sum)",
        "node A / node B µs/msg",
        "Redis CPU µs/msg",
        "broker + Redis µs/msg",
        "Redis cmds/msg",
        "ok",
    ];
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let mut all_ok = true;
    for (variant, _) in &variants {
        for (name, rs) in &setups {
            for (k, r) in rs.iter().filter(|r| &r.variant == variant).enumerate() {
                let split = match (
                    get(r, "broker1_cpu_us_per_msg"),
                    get(r, "broker2_cpu_us_per_msg"),
                ) {
                    (Some(a), Some(b)) => format!("{a:.1} / {b:.1}"),
                    _ => "-".into(),
                };
                runs.push(vec![
                    variant.clone(),
                    name.to_string(),
                    (k + 1).to_string(),
                    rate(get(r, "msgs_per_sec")),
                    ms(get(r, "p50_us")),
                    ms(get(r, "p99_us")),
                    us(get(r, "broker_cpu_us_per_msg")),
                    split,
                    us(get(r, "store_cpu_us_per_msg")),
                    us(total(r)),
                    get(r, "redis_cmds_per_msg")
                        .map(|v| format!("{v:.2}"))
                        .unwrap_or("-".into()),
                    if r.ok { "yes".into() } else { "NO".into() },
                ]);
                if !r.ok {
                    all_ok = false;
                    notes.push(format!(
                        "{variant} on {name}, run {}: FAILED: {}",
                        k + 1,
                        r.errors.join("; ")
                    ));
                }
                for n in &r.notes {
                    notes.push(format!("{variant} on {name}, run {}: {n}", k + 1));
                }
            }
        }
    }

    // Medians against the targets.
    let tgt_head = [
        "case",
        "runs (local/fwd)",
        "msgs/s local -> fwd",
        "p50 local -> fwd (ms)",
        "p50 added by the hop",
        "<= 1 ms",
        "broker CPU µs/msg local -> fwd",
        "fwd/local",
        "<= 1.5",
        "Redis µs/msg local -> fwd",
        "broker + Redis fwd/local",
        "Redis cmds/msg local -> fwd",
    ];
    let mut tgts = Vec::new();
    for (variant, scenario) in &variants {
        let med = |si: usize, f: &dyn Fn(&ScenarioResult) -> Option<f64>| {
            median(
                setups[si]
                    .1
                    .iter()
                    .filter(|r| &r.variant == variant && r.ok)
                    .filter_map(f)
                    .collect(),
            )
        };
        let count = |si: usize| {
            setups[si]
                .1
                .iter()
                .filter(|r| &r.variant == variant && r.ok)
                .count()
        };
        let m = |si: usize, k: &'static str| med(si, &|r| get(r, k));
        let pair = |a: String, b: String| format!("{a} -> {b}");
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if a > 0.0 => Some(b / a),
            _ => None,
        };
        let (p50l, p50f) = (m(li, "p50_us"), m(fi, "p50_us"));
        let delta = match (p50l, p50f) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        // Under saturation (push) latency is queueing in the window: the hop target is for
        // the fixed-rate cases.
        let hop_met = match (scenario.as_str(), delta) {
            ("push-rate", Some(d)) if d <= HOP_P50_TARGET_US => "yes",
            ("push-rate", Some(_)) => "NO",
            ("push-rate", None) => "-",
            _ => "n/a (saturated)",
        };
        let (cl, cf) = (
            m(li, "broker_cpu_us_per_msg"),
            m(fi, "broker_cpu_us_per_msg"),
        );
        let cpu_ratio = ratio(cl, cf);
        let cpu_met = match cpu_ratio {
            Some(r) if r <= FORWARD_CPU_TARGET => "yes",
            Some(_) => "NO",
            None => "-",
        };
        tgts.push(vec![
            variant.clone(),
            format!("{}/{}", count(li), count(fi)),
            pair(rate(m(li, "msgs_per_sec")), rate(m(fi, "msgs_per_sec"))),
            pair(ms(p50l), ms(p50f)),
            delta
                .map(|d| format!("{:+.2} ms", d / 1000.0))
                .unwrap_or("-".into()),
            hop_met.into(),
            pair(us(cl), us(cf)),
            cpu_ratio.map(|r| format!("{r:.2}")).unwrap_or("-".into()),
            cpu_met.into(),
            pair(
                us(m(li, "store_cpu_us_per_msg")),
                us(m(fi, "store_cpu_us_per_msg")),
            ),
            ratio(med(li, &total), med(fi, &total))
                .map(|r| format!("{r:.2}"))
                .unwrap_or("-".into()),
            pair(
                cmds(m(li, "redis_cmds_per_msg")),
                cmds(m(fi, "redis_cmds_per_msg")),
            ),
        ]);
    }

    print_table(&runs_head, &runs);
    println!();
    print_table(&tgt_head, &tgts);
    for n in &notes {
        println!("note: {n}");
    }
    if let Some(md) = markdown {
        let mut out = String::new();
        let _ = writeln!(out, "#### Every run\n");
        md_table(&mut out, &runs_head, &runs);
        let _ = writeln!(
            out,
            "\n#### Against the targets (median of the runs of each case)\n"
        );
        md_table(&mut out, &tgt_head, &tgts);
        if !notes.is_empty() {
            out.push('\n');
            for n in &notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        std::fs::write(md, out).map_err(|e| format!("{}: {e}", md.display()))?;
    }
    Ok(all_ok)
}

// ---------------------------------------------------------------------------------------
// security-report (issue 10)

/// Issue 10: push latency p99 during a login storm stays under this (µs).
const STORM_P99_TARGET_US: f64 = 50_000.0;
/// Issue 10: authentication "costs nothing measurable": push msgs/s with a password file at
/// least this share of the figure without (the run-to-run spread of push is a few %).
const AUTH_PUSH_TARGET: f64 = 0.95;
/// A load generator this busy (% of its core) may have set the pace.
const GENERATOR_BUSY_PCT: f64 = 90.0;

/// What set the pace of a saturating run: the broker (its core busy), the load generator
/// (its core busy, the broker's not), or neither (the rate was bound by latency: handshakes
/// or messages in flight, or other load on the machine).
fn bound_note(what: &str, who: &str, r: &Option<ScenarioResult>) -> Option<String> {
    let r = r.as_ref()?;
    let broker = r.metrics.get("broker_cpu_pct").copied()?;
    let gen = r.metrics.get("bench_cpu_pct").copied()?;
    Some(if broker >= GENERATOR_BUSY_PCT {
        format!(
            "{what} on {who}: the broker set the pace (broker {broker:.0} % of its core, load \
             generator {gen:.0} %)"
        )
    } else if gen >= GENERATOR_BUSY_PCT {
        format!(
            "{what} on {who}: the load generator may have set the pace ({gen:.0} % of its core, \
             broker {broker:.0} %): compare the broker CPU per unit of work"
        )
    } else {
        format!(
            "{what} on {who}: neither core was saturated (broker {broker:.0} %, load generator \
             {gen:.0} %): the rate was bound by latency (work in flight) or by other load on \
             the machine"
        )
    })
}

/// The first result of `scenario` in the directory `dir` (None if the directory or the
/// result is missing).
fn first_of(dir: &Path, scenario: &str) -> Option<ScenarioResult> {
    if !dir.is_dir() {
        return None;
    }
    load(dir).ok()?.into_iter().find(|r| r.scenario == scenario)
}

/// `security-report DIR`: the five figures of issue 10 from the result directories of
/// `scripts/bench.sh --only tls` (herald-tls/, mosquitto-tls/ and, if there,
/// mosquitto-tls-nodelay/: handshake-tls, idle-tls, push-tls; herald-storm/: login-storm;
/// herald-noauth/ and herald-auth/: push without and with a password file). False if a run
/// failed or a result is missing.
pub fn security_report(dir: &Path, markdown: Option<&Path>) -> Result<bool, String> {
    if !dir.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    let ht = dir.join("herald-tls");
    let head = [
        "item",
        "figure",
        "Herald",
        "Mosquitto / reference",
        "ratio",
        "target",
        "met",
        "load generator CPU (Herald / ref.)",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut all_ok = true;
    let get =
        |r: &Option<ScenarioResult>, k: &str| r.as_ref().and_then(|r| r.metrics.get(k).copied());
    let show = |v: Option<f64>, unit: &str| v.map(|v| fmt_value(v, unit)).unwrap_or("-".into());
    let pct = |v: Option<f64>| v.map(|v| format!("{v:.0} %")).unwrap_or("-".into());
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    };
    let verdict = |op: &str, t: f64, v: Option<f64>| match v {
        Some(v) if target_met(op, t, v) => "yes".to_string(),
        Some(_) => "NO".to_string(),
        None => "-".to_string(),
    };
    let mut check = |what: &str, r: &Option<ScenarioResult>, notes: &mut Vec<String>| match r {
        None => {
            all_ok = false;
            notes.push(format!("{what}: no result"));
        }
        Some(r) if !r.ok => {
            all_ok = false;
            notes.push(format!("{what} FAILED: {}", r.errors.join("; ")));
        }
        Some(r) => notes.extend(r.notes.iter().map(|n| format!("{what}: {n}"))),
    };

    // Items 1-3 against each Mosquitto TLS column there is: its defaults (Nagle on), and
    // with set_tcp_nodelay true.
    let refs: Vec<(&str, PathBuf)> = [
        ("Mosquitto", "mosquitto-tls"),
        ("Mosquitto set_tcp_nodelay", "mosquitto-tls-nodelay"),
    ]
    .into_iter()
    .map(|(n, d)| (n, dir.join(d)))
    .filter(|(n, d)| *n == "Mosquitto" || d.is_dir())
    .collect();
    let many = refs.len() > 1;
    let vs = |name: &str| {
        if many {
            format!(" (vs {name})")
        } else {
            String::new()
        }
    };

    // 1. Handshakes.
    let h = first_of(&ht, "handshake-tls");
    check("handshake-tls on Herald", &h, &mut notes);
    if let Some(n) = bound_note("handshake-tls", "Herald", &h) {
        notes.push(n);
    }
    let tls = h
        .as_ref()
        .and_then(|r| r.params.get("tls"))
        .and_then(|v| v.as_str())
        .unwrap_or("?")
        .to_string();
    for (name, mdir) in &refs {
        let m = first_of(mdir, "handshake-tls");
        check(&format!("handshake-tls on {name}"), &m, &mut notes);
        if let Some(n) = bound_note("handshake-tls", name, &m) {
            notes.push(n);
        }
        let gen = format!(
            "{} / {}",
            pct(get(&h, "bench_cpu_pct")),
            pct(get(&m, "bench_cpu_pct"))
        );
        for (key, label, unit, op) in [
            ("connect_rate", "1. TLS handshakes/s", "conn/s", ">="),
            (
                "broker_cpu_us_per_conn",
                "1. broker CPU per handshake",
                "us",
                "<=",
            ),
            (
                "conns_per_broker_cpu_sec",
                "1. handshakes per broker CPU second",
                "conn/s",
                ">=",
            ),
        ] {
            let rt = ratio(get(&h, key), get(&m, key));
            rows.push(vec![
                format!("{label}{}", vs(name)),
                format!("new TCP + TLS ({tls}, no resumption) + CONNECT/CONNACK + DISCONNECT"),
                show(get(&h, key), unit),
                show(get(&m, key), unit),
                rt.map(|r| format!("{r:.2}")).unwrap_or("-".into()),
                format!("{op} 1.0"),
                verdict(op, 1.0, rt),
                gen.clone(),
            ]);
        }
    }

    // 2. Memory per idle TLS connection.
    let h = first_of(&ht, "idle-tls");
    check("idle-tls on Herald", &h, &mut notes);
    let n = get(&h, "connected").unwrap_or(0.0);
    for (name, mdir) in &refs {
        let m = first_of(mdir, "idle-tls");
        check(&format!("idle-tls on {name}"), &m, &mut notes);
        let rt = ratio(get(&h, "rss_per_conn"), get(&m, "rss_per_conn"));
        rows.push(vec![
            format!("2. RSS per idle TLS connection{}", vs(name)),
            format!("(RSS after 30 s idle - before) / {n:.0} connections"),
            show(get(&h, "rss_per_conn"), "B"),
            show(get(&m, "rss_per_conn"), "B"),
            rt.map(|r| format!("{r:.2}")).unwrap_or("-".into()),
            "<= 1.0".into(),
            verdict("<=", 1.0, rt),
            format!(
                "{} / {}",
                pct(get(&h, "connect_bench_cpu_pct")),
                pct(get(&m, "connect_bench_cpu_pct"))
            ),
        ]);
    }

    // 3. QoS 1 push over TLS.
    let h = first_of(&ht, "push-tls");
    check("push-tls on Herald", &h, &mut notes);
    if let Some(n) = bound_note("push-tls", "Herald", &h) {
        notes.push(n);
    }
    for (name, mdir) in &refs {
        let m = first_of(mdir, "push-tls");
        check(&format!("push-tls on {name}"), &m, &mut notes);
        if let Some(n) = bound_note("push-tls", name, &m) {
            notes.push(n);
        }
        let rt = ratio(get(&h, "msgs_per_sec"), get(&m, "msgs_per_sec"));
        rows.push(vec![
            format!("3. QoS 1 push over TLS{}", vs(name)),
            format!(
                "delivered msgs/s, {} devices (broker CPU {} / {} per msg)",
                h.as_ref()
                    .and_then(|r| r.params.get("devices"))
                    .map(|v| v.to_string())
                    .unwrap_or("?".into()),
                show(get(&h, "broker_cpu_us_per_msg"), "us"),
                show(get(&m, "broker_cpu_us_per_msg"), "us"),
            ),
            show(get(&h, "msgs_per_sec"), "msg/s"),
            show(get(&m, "msgs_per_sec"), "msg/s"),
            rt.map(|r| format!("{r:.2}")).unwrap_or("-".into()),
            ">= 2.0".into(),
            verdict(">=", 2.0, rt),
            format!(
                "{} / {}",
                pct(get(&h, "bench_cpu_pct")),
                pct(get(&m, "bench_cpu_pct"))
            ),
        ]);
    }

    // 4. Login storm (Herald only: absolute target).
    let s = first_of(&dir.join("herald-storm"), "login-storm");
    check("login-storm on Herald", &s, &mut notes);
    let storm_p99 = get(&s, "storm_p99_us");
    let p = |k: &str| {
        s.as_ref()
            .and_then(|r| r.params.get(k))
            .map(|v| v.to_string())
            .unwrap_or("?".into())
    };
    rows.push(vec![
        "4. login storm: push p99 during".into(),
        format!(
            "{} devices at {} msgs/s, {} password logins ({} in flight); before the storm: {}",
            p("devices"),
            p("rate"),
            p("logins"),
            p("login_concurrency"),
            show(get(&s, "before_p99_us"), "ms"),
        ),
        show(storm_p99, "ms"),
        "-".into(),
        "-".into(),
        "< 50 ms".into(),
        match storm_p99 {
            Some(v) if v < STORM_P99_TARGET_US => "yes".into(),
            Some(_) => "NO".into(),
            None => "-".into(),
        },
        pct(get(&s, "storm_bench_cpu_pct")),
    ]);
    rows.push(vec![
        "4. login storm: logins/s".into(),
        format!(
            "{} logins in {} (login time p50 {}, p99 {}; broker CPU {} during the storm)",
            show(get(&s, "logins_ok"), ""),
            show(get(&s, "storm_secs"), "s"),
            show(get(&s, "login_p50_us"), "ms"),
            show(get(&s, "login_p99_us"), "ms"),
            pct(get(&s, "storm_broker_cpu_pct")),
        ),
        get(&s, "logins_per_sec")
            .map(|v| format!("{v:.1} logins/s"))
            .unwrap_or("-".into()),
        "-".into(),
        "-".into(),
        "".into(),
        "".into(),
        pct(get(&s, "storm_bench_cpu_pct")),
    ]);

    // 5. Authentication off costs nothing: push with a password file against without.
    let (a, o) = (
        first_of(&dir.join("herald-auth"), "push"),
        first_of(&dir.join("herald-noauth"), "push"),
    );
    check("push with a password file", &a, &mut notes);
    check("push without authentication", &o, &mut notes);
    let rt = ratio(get(&a, "msgs_per_sec"), get(&o, "msgs_per_sec"));
    rows.push(vec![
        "5. push, password file vs none".into(),
        format!(
            "delivered msgs/s, every client logged in vs anonymous (broker CPU {} vs {} per msg)",
            show(get(&a, "broker_cpu_us_per_msg"), "us"),
            show(get(&o, "broker_cpu_us_per_msg"), "us"),
        ),
        show(get(&a, "msgs_per_sec"), "msg/s"),
        show(get(&o, "msgs_per_sec"), "msg/s"),
        rt.map(|r| format!("{r:.2}")).unwrap_or("-".into()),
        format!(">= {AUTH_PUSH_TARGET:.2}"),
        verdict(">=", AUTH_PUSH_TARGET, rt),
        format!(
            "{} / {}",
            pct(get(&a, "bench_cpu_pct")),
            pct(get(&o, "bench_cpu_pct"))
        ),
    ]);

    let (top, lines) = text_table(&head, &rows, 2);
    println!("{top}");
    for l in lines {
        println!("{l}");
    }
    for n in &notes {
        println!("note: {n}");
    }
    if let Some(md) = markdown {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            (0..head.len())
                .map(|i| if i < 2 { " --- |" } else { " ---: |" })
                .collect::<String>()
        );
        for r in &rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        if !notes.is_empty() {
            out.push('\n');
            for n in &notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        std::fs::write(md, out).map_err(|e| format!("{}: {e}", md.display()))?;
    }
    Ok(all_ok)
}
