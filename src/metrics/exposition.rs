//! The text served on `/metrics`: the exporter's counters and gauges, sorted by family and
//! series (the exporter keeps them in hash maps, so its own order changes from scrape to
//! scrape), with Herald's histograms, the process metrics and `herald_build_info` merged in
//! by name.

use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Default)]
struct Family {
    help: String,
    kind: String,
    samples: Vec<String>,
}

/// One family rendered outside the exporter: its samples are complete lines, in order.
pub struct Extra {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: &'static str,
    pub samples: String,
}

pub fn render(exporter: &str, extras: Vec<Extra>) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in exporter.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_string()).or_default().help = help.to_string();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            families.entry(name.to_string()).or_default().kind = kind.to_string();
        } else if !line.is_empty() && !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let f = families.entry(line[..end].to_string()).or_default();
            f.samples.push(line.to_string());
        }
    }
    let mut out = String::with_capacity(exporter.len() * 2);
    let mut extras: BTreeMap<&str, Extra> = extras.into_iter().map(|e| (e.name, e)).collect();
    let mut emit_extras_before = |out: &mut String, name: Option<&str>| {
        while let Some(e) = extras.first_entry() {
            if name.is_some_and(|n| *e.key() > n) {
                break;
            }
            let e = e.remove();
            let _ = writeln!(out, "# HELP {} {}", e.name, e.help);
            let _ = writeln!(out, "# TYPE {} {}", e.name, e.kind);
            out.push_str(&e.samples);
        }
    };
    for (name, mut f) in families {
        emit_extras_before(&mut out, Some(&name));
        f.samples.sort_unstable();
        if !f.help.is_empty() {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
        }
        if !f.kind.is_empty() {
            let _ = writeln!(out, "# TYPE {name} {}", f.kind);
        }
        for s in f.samples {
            out.push_str(&s);
            out.push('\n');
        }
    }
    emit_extras_before(&mut out, None);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_series_sorted_extras_merged() {
        let exporter =
            "# HELP b_total B.\n# TYPE b_total counter\nb_total{r=\"y\"} 2\nb_total{r=\"x\"} 1\n\n\
                        # TYPE a gauge\na 3\n\n";
        let extra = |name| Extra {
            name,
            help: "E.",
            kind: "gauge",
            samples: format!("{name} 1\n"),
        };
        let out = render(exporter, vec![extra("c"), extra("ab")]);
        assert_eq!(
            out,
            "# TYPE a gauge\na 3\n\
             # HELP ab E.\n# TYPE ab gauge\nab 1\n\
             # HELP b_total B.\n# TYPE b_total counter\nb_total{r=\"x\"} 1\nb_total{r=\"y\"} 2\n\
             # HELP c E.\n# TYPE c gauge\nc 1\n"
        );
    }
}
