//! The standard `process_*` metrics (CPU, memory, descriptors, start time), read from
//! `/proc/self` at each scrape: the Prometheus client libraries' names, so that existing
//! dashboards and alerts work unchanged. Linux only; elsewhere the family is empty.

use std::fmt::Write;

use super::exposition::Extra;

pub fn families() -> Vec<Extra> {
    let mut v = Vec::new();
    let gauge = |name, help, value: f64| Extra {
        name,
        help,
        kind: "gauge",
        samples: format!("{name} {value}\n"),
    };
    // SAFETY: sysconf has no preconditions.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if let Some(stat) = stat() {
        if tick > 0 {
            let cpu = (stat.utime + stat.stime) as f64 / tick as f64;
            let mut s = String::new();
            let _ = writeln!(s, "process_cpu_seconds_total {cpu}");
            v.push(Extra {
                name: "process_cpu_seconds_total",
                help: "User and system CPU time spent, in seconds.",
                kind: "counter",
                samples: s,
            });
            if let Some(boot) = boot_time() {
                let start = boot as f64 + stat.starttime as f64 / tick as f64;
                v.push(gauge(
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch, in seconds.",
                    start,
                ));
            }
        }
        v.push(gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stat.vsize as f64,
        ));
        if page > 0 {
            v.push(gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                (stat.rss * page as u64) as f64,
            ));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // One entry is the directory handle of this very read.
        let open = dir.count().saturating_sub(1);
        v.push(gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            open as f64,
        ));
    }
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes to the struct we pass, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        v.push(gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            r.rlim_cur as f64,
        ));
    }
    v
}

struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
    rss: u64,
}

/// `/proc/self/stat`; the command name (field 2) may hold spaces and parentheses, so the
/// fields are counted from after its last `)`.
fn stat() -> Option<Stat> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    // Fields from 3 (state) on: utime is field 14, stime 15, starttime 22, vsize 23, rss 24.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
        vsize: field(23)?,
        rss: field(24)?,
    })
}

fn boot_time() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let f = super::families();
        let names: Vec<_> = f.iter().map(|e| e.name).collect();
        for n in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
    }
}
