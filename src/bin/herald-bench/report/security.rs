//! `security-report` (issue 10): TLS handshakes, memory per TLS connection, push over TLS,
//! the login storm and the cost of authentication, from the directories of
//! `scripts/bench.sh --only tls`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::specs::target_met;
use super::table::{fmt_value, text_table};
use super::{load, ScenarioResult};

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
