//! `http-report` (issue 15): the HTTP API against MQTT push, one column per `http` run
//! (the memory and the Redis store of one `scripts/bench.sh` run), with the targets.

use std::fmt::Write as _;
use std::path::Path;

use super::table::{fmt_value, md_table, text_table, thousands};
use super::{load, ScenarioResult};

/// Issue 15: HTTP push at least this share of MQTT QoS 1 push (%).
const HTTP_TARGET_PCT: f64 = 50.0;
/// Issue 15: the batch endpoint at least MQTT's figure (%).
const BATCH_TARGET_PCT: f64 = 100.0;
/// Issue 15: receipts on cost at most this share of the HTTP push figure (%), Redis store.
const RECEIPT_DROP_TARGET_PCT: f64 = 25.0;
/// A load generator this busy (% of its core) may have set a phase's pace.
const BUSY_PCT: f64 = 80.0;

const PHASES: &[&str] = &["mqtt", "http", "batch", "receipt", "mqtt_rate", "http_rate"];
/// The fixed-rate phases, HTTP first (the figure of the target), then MQTT.
const RATE_PHASES: &[&str] = &["http_rate", "mqtt_rate"];

/// A row of the table: a figure per column, and the target it is held to, if any.
struct Row {
    label: String,
    value: fn(&ScenarioResult) -> String,
    target: String,
    met: fn(&ScenarioResult) -> Option<bool>,
}

impl Row {
    /// A figure shown for information, without a target.
    fn info(label: String, value: fn(&ScenarioResult) -> String) -> Row {
        Row {
            label,
            value,
            target: String::new(),
            met: |_| None,
        }
    }
}

fn metric(r: &ScenarioResult, key: &str) -> Option<f64> {
    r.metrics.get(key).copied()
}

fn cell(r: &ScenarioResult, key: &str, unit: &str) -> String {
    metric(r, key).map_or("-".into(), |v| fmt_value(v, unit))
}

/// `a / b / c` of one metric over several phases, e.g. CPU per message.
fn per_phase(r: &ScenarioResult, phases: &[&str], key: &str, unit: &str) -> String {
    phases
        .iter()
        .map(|ph| cell(r, &format!("{ph}_{key}"), unit))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

fn is_redis(r: &ScenarioResult) -> bool {
    r.params.get("store").and_then(|v| v.as_str()) == Some("redis")
}

/// `http-report NAME=PATH...`. False if a run failed or has no `http` result.
pub fn http_report(columns: &[String], markdown: Option<&Path>) -> Result<bool, String> {
    let mut cols: Vec<(String, ScenarioResult)> = Vec::new();
    for c in columns {
        let (name, path) = c
            .split_once('=')
            .ok_or_else(|| format!("`{c}`: expected NAME=PATH"))?;
        let r = load(Path::new(path))?
            .into_iter()
            .find(|r| r.scenario == "http")
            .ok_or_else(|| format!("{path}: no `http` result"))?;
        cols.push((name.to_string(), r));
    }
    if cols.is_empty() {
        return Err("http-report needs at least one column".into());
    }
    render(&cols, markdown)
}

/// The table of one `http` run, as `herald-bench http` prints it.
pub fn print_http(label: &str, results: &[ScenarioResult]) {
    let cols: Vec<_> = results
        .iter()
        .filter(|r| r.scenario == "http")
        .map(|r| (label.to_string(), r.clone()))
        .collect();
    if !cols.is_empty() {
        // Without a Markdown file nothing is written, so there is no error to report.
        let _ = render(&cols, None);
    }
}

fn render(cols: &[(String, ScenarioResult)], markdown: Option<&Path>) -> Result<bool, String> {
    let first = &cols[0].1;
    let param = |k: &str| {
        first
            .params
            .get(k)
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    let (devices, lanes, batch, batch_lanes) = (
        param("devices"),
        param("http_concurrency"),
        param("batch_size"),
        param("batch_concurrency"),
    );
    let rate = first
        .params
        .get("rate")
        .and_then(|v| v.as_f64())
        .map_or("?".into(), thousands);

    let rows: Vec<Row> = vec![
        Row::info(format!("(a) MQTT QoS 1 push to {devices} devices"), |r| {
            cell(r, "mqtt_msgs_per_sec", "msg/s")
        }),
        Row {
            label: format!("(b) HTTP push, {lanes} in flight (keep-alive)"),
            value: |r| cell(r, "http_msgs_per_sec", "msg/s"),
            target: format!(">= {HTTP_TARGET_PCT:.0} % of (a)"),
            met: |r| metric(r, "http_vs_mqtt_pct").map(|p| p >= HTTP_TARGET_PCT),
        },
        Row::info("    (b) / (a)".into(), |r| cell(r, "http_vs_mqtt_pct", "%")),
        Row {
            label: format!("(c) HTTP batch of {batch}, {batch_lanes} in flight"),
            value: |r| cell(r, "batch_msgs_per_sec", "msg/s"),
            target: ">= (a)".into(),
            met: |r| metric(r, "batch_vs_mqtt_pct").map(|p| p >= BATCH_TARGET_PCT),
        },
        Row::info("    (c) / (a)".into(), |r| {
            cell(r, "batch_vs_mqtt_pct", "%")
        }),
        Row::info("(d) HTTP push with receipt=true".into(), |r| {
            match r.params.get("receipts").and_then(|v| v.as_str()) {
                Some(s) if s != "supported" => s.to_string(),
                _ => cell(r, "receipt_msgs_per_sec", "msg/s"),
            }
        }),
        Row {
            label: "    throughput drop against (b)".into(),
            value: |r| cell(r, "receipt_drop_pct", "%"),
            target: format!("<= {RECEIPT_DROP_TARGET_PCT:.0} % (Redis store)"),
            met: |r| {
                let drop = metric(r, "receipt_drop_pct")?;
                is_redis(r).then_some(drop <= RECEIPT_DROP_TARGET_PCT)
            },
        },
        Row {
            label: format!("(e) p99 HTTP 202 -> device PUBLISH, {rate} msgs/s"),
            value: |r| cell(r, "http_rate_ack_p99_us", "ms"),
            target: "next to MQTT's".into(),
            met: |_| None,
        },
        Row::info("    p99 MQTT PUBACK -> device PUBLISH".into(), |r| {
            cell(r, "mqtt_rate_ack_p99_us", "ms")
        }),
        Row::info("    p99 sent -> device, HTTP / MQTT".into(), |r| {
            per_phase(r, RATE_PHASES, "p99_us", "ms")
        }),
        Row::info("    device first (before 202 / PUBACK)".into(), |r| {
            per_phase(r, RATE_PHASES, "device_first_pct", "%")
        }),
        Row::info("    rate achieved, HTTP / MQTT".into(), |r| {
            per_phase(r, RATE_PHASES, "achieved_rate", "msg/s")
        }),
        Row::info("broker CPU, (a) / (b) / (c) / (d)".into(), |r| {
            per_phase(r, &PHASES[..4], "broker_cpu_pct", "%")
        }),
        Row::info(
            "broker CPU per message, (a) / (b) / (c) / (d)".into(),
            |r| per_phase(r, &PHASES[..4], "broker_cpu_us_per_msg", "us"),
        ),
        Row::info(
            "load generator CPU per message, (a) / (b) / (c) / (d)".into(),
            |r| per_phase(r, &PHASES[..4], "bench_cpu_us_per_msg", "us"),
        ),
        Row::info("store CPU per message, (a) / (b) / (c) / (d)".into(), |r| {
            per_phase(r, &PHASES[..4], "store_cpu_us_per_msg", "us")
        }),
        Row::info(
            "Redis commands per message, (a) / (b) / (c) / (d)".into(),
            |r| per_phase(r, &PHASES[..4], "redis_cmds_per_msg", "/msg"),
        ),
        Row {
            label: "load generator CPU, (a) / (b) / (c) / (d)".into(),
            value: |r| per_phase(r, &PHASES[..4], "bench_cpu_pct", "%"),
            target: format!("< {BUSY_PCT:.0} % of its core, every phase"),
            met: |r| {
                let busiest = PHASES
                    .iter()
                    .filter_map(|ph| metric(r, &format!("{ph}_bench_cpu_pct")))
                    .reduce(f64::max)?;
                Some(busiest < BUSY_PCT)
            },
        },
    ];
    let names: Vec<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
    let mut head: Vec<String> = vec!["figure".into()];
    head.extend(names.iter().map(|n| n.to_string()));
    head.push("target".into());
    head.push(format!("met ({})", names.join(", ")));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|row_of| {
            let mut row = vec![row_of.label.clone()];
            row.extend(cols.iter().map(|(_, r)| (row_of.value)(r)));
            row.push(row_of.target.clone());
            let mets: Vec<_> = cols.iter().map(|(_, r)| (row_of.met)(r)).collect();
            row.push(if mets.iter().all(Option::is_none) {
                String::new()
            } else {
                mets.iter().map(|&m| met(m)).collect::<Vec<_>>().join(", ")
            });
            row
        })
        .collect();

    let mut notes = Vec::new();
    let mut all_ok = true;
    for (name, r) in cols {
        if !r.ok {
            all_ok = false;
            notes.push(format!("{name}: FAILED: {}", r.errors.join("; ")));
        }
        for n in &r.notes {
            notes.push(format!("{name}: {n}"));
        }
        // Both sides pinned to a core each: a generator that spends more per message than
        // the broker could not outrun it, whatever either core's load.
        for ph in &PHASES[1..4] {
            let cost = |who: &str| metric(r, &format!("{ph}_{who}_cpu_us_per_msg"));
            if let (Some(gen), Some(broker)) = (cost("bench"), cost("broker")) {
                if gen >= broker {
                    notes.push(format!(
                        "{name}: {ph}: the load generator spent {gen:.1} µs per message, the \
                         broker {broker:.1} µs: on a core each, the generator may set the pace"
                    ));
                }
            }
        }
    }
    println!();
    println!("== http (issue 15): the HTTP API against MQTT QoS 1 push, one Herald per column");
    let (top, lines) = text_table(&head, &table, 1);
    println!("{top}");
    for l in lines {
        println!("{l}");
    }
    for n in &notes {
        println!("note: {n}");
    }
    if let Some(path) = markdown {
        let mut md = String::new();
        let head: Vec<&str> = head.iter().map(String::as_str).collect();
        md_table(&mut md, &head, &table);
        for n in &notes {
            let _ = writeln!(md, "\n- {n}");
        }
        std::fs::write(path, md).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(all_ok)
}
