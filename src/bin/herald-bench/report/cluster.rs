//! `cluster-report` (issue 5): local (publisher and devices on one node) against forwarded
//! (publisher on node A, devices on node B), medians over the runs against the targets.

use std::fmt::Write as _;
use std::path::Path;

use super::specs::ORDER;
use super::table::{md_table, print_table, thousands};
use super::{load, ScenarioResult};

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
