//! Rendering: values with their units, the per-run table, text and Markdown tables.

use std::fmt::Write as _;

use super::specs::specs_for;
use super::ScenarioResult;

pub(super) fn fmt_value(v: f64, unit: &str) -> String {
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

pub(super) fn thousands(v: f64) -> String {
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

pub(super) fn md_table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
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
pub(super) fn text_table<S: AsRef<str>>(
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
pub(super) fn print_table(head: &[&str], rows: &[Vec<String>]) {
    let (top, lines) = text_table(head, rows, 3);
    println!("{top}");
    for l in lines {
        println!("{l}");
    }
}
