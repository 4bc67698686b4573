//! `compare`: one row per metric, one column per broker, the ratio to the second column and
//! the targets of issues 3 and 4.

use std::fmt::Write as _;
use std::path::Path;

use super::specs::{specs_for, target_met, ORDER};
use super::table::{fmt_value, text_table};
use super::{load, ScenarioResult};

/// Targets of issue 4 for a Herald with a durable store (`compare --durable NAME`), as a
/// ratio of that column to the second (Mosquitto, persistence on): QoS 1 push to online
/// devices at no less than Mosquitto's msgs/s.
const DURABLE_TARGETS: &[(&str, &str, &str, f64)] = &[("push", "msgs_per_sec", ">=", 1.0)];

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
