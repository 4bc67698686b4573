//! Broker (and store) memory and CPU from /proc: VmRSS from /proc/PID/status, utime + stime
//! (all threads) from /proc/PID/stat in clock ticks (`getconf CLK_TCK`, usually 100).

use std::sync::OnceLock;
use std::time::Instant;

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|&t| t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Resident set size of `pid` ("self" for this process), bytes.
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system, all threads) of `pid`, seconds.
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: count fields after it.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of the full line, utime 14 and stime 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// The kernel's TCP counters (`TcpExt` of /proc/net/netstat: ListenOverflows, ListenDrops,
/// TCPSynRetrans, ...), machine-wide: a difference over a phase is this tool's and its
/// broker's when nothing else is busy on loopback.
pub fn tcp_ext() -> Option<std::collections::BTreeMap<String, u64>> {
    let s = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = s.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace().skip(1);
    let values = lines.next()?.split_whitespace().skip(1);
    Some(
        names
            .zip(values)
            .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

/// Soft limit on open files of this process.
pub fn fd_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The broker (if its PID is known; several for the nodes of a cluster, summed), its store
/// (a separate process such as redis-server, if its PID is known) and this tool, observed
/// between two points in time.
#[derive(Clone)]
pub struct Probe {
    pids: Vec<String>,
    store: Option<String>,
}

/// A reading of the processes' CPU time.
pub struct Mark {
    at: Instant,
    /// Per broker process, in the order given.
    brokers: Vec<Option<f64>>,
    store: Option<f64>,
    own: Option<f64>,
}

/// CPU used between two marks: seconds, and percent of one core.
pub struct CpuUse {
    /// Summed over the broker processes (None if any could not be read).
    pub broker_secs: Option<f64>,
    pub broker_pct: Option<f64>,
    /// Per broker process, when there are several.
    pub per_broker_secs: Vec<Option<f64>>,
    pub per_broker_pct: Vec<Option<f64>>,
    pub store_secs: Option<f64>,
    pub store_pct: Option<f64>,
    pub own_secs: Option<f64>,
    pub own_pct: Option<f64>,
}

impl Probe {
    pub fn new(pids: &[u32], store: Option<u32>) -> Probe {
        Probe {
            pids: pids.iter().map(|p| p.to_string()).collect(),
            store: store.map(|p| p.to_string()),
        }
    }

    /// Records an error for each measured process that is gone.
    pub fn check_alive(&self, r: &mut crate::report::ScenarioResult) {
        for (i, p) in self.pids.iter().enumerate() {
            if !alive(p) {
                if self.pids.len() > 1 {
                    r.error(format!("broker process {} (pid {p}) is gone", i + 1));
                } else {
                    r.error("the broker process is gone");
                }
            }
        }
        if !self.store_alive() {
            r.error("the store process is gone");
        }
    }

    pub fn store_alive(&self) -> bool {
        self.store.as_deref().is_none_or(alive)
    }

    /// Summed over the broker processes.
    pub fn rss(&self) -> Option<u64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|p| rss_bytes(p)).sum()
    }

    pub fn store_rss(&self) -> Option<u64> {
        self.store.as_deref().and_then(rss_bytes)
    }

    pub fn mark(&self) -> Mark {
        Mark {
            at: Instant::now(),
            brokers: self.pids.iter().map(|p| cpu_secs(p)).collect(),
            store: self.store.as_deref().and_then(cpu_secs),
            own: cpu_secs("self"),
        }
    }

    pub fn since(&self, m: &Mark) -> CpuUse {
        let now = self.mark();
        let secs = now.at.duration_since(m.at).as_secs_f64().max(1e-9);
        let used = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        let pct = |u: Option<f64>| u.map(|u| u / secs * 100.0);
        let per: Vec<Option<f64>> = m
            .brokers
            .iter()
            .zip(&now.brokers)
            .map(|(&a, &b)| used(a, b))
            .collect();
        let broker = if per.is_empty() {
            None
        } else {
            per.iter().copied().sum()
        };
        let store = used(m.store, now.store);
        let several = per.len() > 1;
        CpuUse {
            broker_secs: broker,
            broker_pct: pct(broker),
            per_broker_pct: if several {
                per.iter().map(|&u| pct(u)).collect()
            } else {
                Vec::new()
            },
            per_broker_secs: if several { per } else { Vec::new() },
            store_secs: store,
            store_pct: pct(store),
            own_secs: used(m.own, now.own),
            own_pct: pct(used(m.own, now.own)),
        }
    }
}

fn alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl CpuUse {
    /// Broker and store CPU (and their CPU per message, µs, over `msgs` messages) as metrics
    /// `<prefix>broker_cpu_pct`, `<prefix>store_cpu_pct`, `<prefix>broker_cpu_us_per_msg`, ...
    /// With several broker processes the broker figures are their sum, and each one's are
    /// also there as `<prefix>broker<N>_cpu_pct`, `<prefix>broker<N>_cpu_us_per_msg` (N from
    /// 1, in the order of --broker-pid).
    pub fn report(&self, r: &mut crate::report::ScenarioResult, prefix: &str, msgs: u64) {
        r.opt_metric(&format!("{prefix}broker_cpu_pct"), self.broker_pct);
        r.opt_metric(&format!("{prefix}store_cpu_pct"), self.store_pct);
        for (i, &p) in self.per_broker_pct.iter().enumerate() {
            r.opt_metric(&format!("{prefix}broker{}_cpu_pct", i + 1), p);
        }
        if msgs > 0 {
            let per = |s: Option<f64>| s.map(|s| s * 1e6 / msgs as f64);
            r.opt_metric(
                &format!("{prefix}broker_cpu_us_per_msg"),
                per(self.broker_secs),
            );
            r.opt_metric(
                &format!("{prefix}store_cpu_us_per_msg"),
                per(self.store_secs),
            );
            for (i, &s) in self.per_broker_secs.iter().enumerate() {
                r.opt_metric(&format!("{prefix}broker{}_cpu_us_per_msg", i + 1), per(s));
            }
        }
    }
}
