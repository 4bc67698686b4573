//! The memory guard: keeps the process's resident memory under `server.max_memory` by
//! slowing clients down, so that the kernel's OOM killer never has to choose.
//!
//! Every byte budget of a connection or a store is bounded on its own; what they cannot
//! bound is their sum over many connections. The guard watches the sum: the server's
//! periodic task samples RSS (`/proc/self/statm`, every 20 ms while a limit is set) and moves between
//! three levels, with hysteresis so that it does not flap:
//! - `Normal`;
//! - `Throttle` (RSS at 90% of the limit, back below 85%): connections that have published
//!   stop reading their sockets, so TCP pushes back on the senders; devices that only
//!   receive keep reading (their PUBACKs free memory) and keepalive is not judged;
//! - `Refuse` (95%, back below 90%): also new connections get CONNACK 3 (counted as
//!   `herald_connections_rejected_total{reason="memory"}`).
//!
//! Each change of level is logged once. With `server.max_memory = 0` the limit is 90% of the
//! cgroup's memory limit (`memory.max`, cgroup v2, or v1's `memory.limit_in_bytes`) when
//! there is one; without either there is no guard.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Normal = 0,
    Throttle = 1,
    Refuse = 2,
}

pub struct MemGuard {
    /// Bytes; 0 = no guard.
    limit: usize,
    level: AtomicU8,
}

impl MemGuard {
    /// The guard for `server.max_memory` (0: derived from the cgroup, if any).
    pub fn new(max_memory: usize) -> MemGuard {
        let limit = if max_memory > 0 {
            max_memory
        } else {
            cgroup_limit().map_or(0, |l| l / 10 * 9)
        };
        MemGuard {
            limit,
            level: AtomicU8::new(Level::Normal as u8),
        }
    }

    /// The limit in bytes (0: no guard).
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn level(&self) -> Level {
        match self.level.load(Ordering::Relaxed) {
            0 => Level::Normal,
            1 => Level::Throttle,
            _ => Level::Refuse,
        }
    }

    /// Connections that publish should not be read.
    pub fn throttled(&self) -> bool {
        self.level.load(Ordering::Relaxed) >= Level::Throttle as u8
    }

    /// New connections should be refused.
    pub fn refusing(&self) -> bool {
        self.level.load(Ordering::Relaxed) >= Level::Refuse as u8
    }

    /// Samples RSS and moves the level. Returns the level before and after.
    pub fn sample(&self) -> (Level, Level) {
        let before = self.level();
        if self.limit == 0 {
            return (before, before);
        }
        let Some(rss) = rss_bytes() else {
            return (before, before);
        };
        let after = next_level(before, rss, self.limit);
        if after != before {
            self.level.store(after as u8, Ordering::Relaxed);
            metrics::memory_guard_level(after as u8);
            let (rss_mib, limit_mib) = (rss >> 20, self.limit >> 20);
            match after {
                Level::Normal => {
                    tracing::warn!(
                        rss_mib,
                        limit_mib,
                        "memory guard off: reading every client again"
                    )
                }
                Level::Throttle => {
                    metrics::limit_hit("server_max_memory");
                    tracing::warn!(
                        rss_mib,
                        limit_mib,
                        "memory guard: near server.max_memory, not reading from publishers"
                    )
                }
                Level::Refuse => {
                    metrics::limit_hit("server_max_memory");
                    tracing::warn!(
                        rss_mib,
                        limit_mib,
                        "memory guard: at server.max_memory, refusing new connections"
                    )
                }
            }
        }
        (before, after)
    }
}

/// The level for `rss` coming from `from`: up at 90% and 95%, down below 85% and 90%.
fn next_level(from: Level, rss: usize, limit: usize) -> Level {
    let pct = (rss as u128 * 100 / limit.max(1) as u128) as usize;
    let up = match pct {
        95.. => Level::Refuse,
        90.. => Level::Throttle,
        _ => Level::Normal,
    };
    let down = match pct {
        90.. => Level::Refuse,
        85.. => Level::Throttle,
        _ => Level::Normal,
    };
    if up > from {
        up
    } else if down < from {
        down
    } else {
        from
    }
}

/// Resident set size of this process.
pub fn rss_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// The memory limit of this process's cgroup, if it has one.
fn cgroup_limit() -> Option<usize> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let v2 = read("/sys/fs/cgroup/memory.max");
    let v1 = read("/sys/fs/cgroup/memory/memory.limit_in_bytes");
    let n: u64 = v2.or(v1)?.trim().parse().ok()?;
    // v1 reports "no limit" as a number near i64::MAX.
    (n < 1 << 60).then(|| usize::try_from(n).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_have_hysteresis() {
        let l = 1000;
        assert_eq!(next_level(Level::Normal, 899, l), Level::Normal);
        assert_eq!(next_level(Level::Normal, 900, l), Level::Throttle);
        assert_eq!(next_level(Level::Normal, 960, l), Level::Refuse);
        assert_eq!(next_level(Level::Throttle, 860, l), Level::Throttle);
        assert_eq!(next_level(Level::Throttle, 849, l), Level::Normal);
        assert_eq!(next_level(Level::Refuse, 920, l), Level::Refuse);
        assert_eq!(next_level(Level::Refuse, 880, l), Level::Throttle);
        assert_eq!(next_level(Level::Refuse, 100, l), Level::Normal);
    }

    #[test]
    fn rss_is_read() {
        assert!(rss_bytes().is_some_and(|r| r > 1 << 20));
    }
}
