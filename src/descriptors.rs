//! File descriptors: how many connections this process can hold, and what happens at the
//! limit.
//!
//! At start the soft `RLIMIT_NOFILE` is raised to the hard limit (the usual soft default of
//! 1024 would cap a node at about a thousand phones) and the connection capacity is logged.
//! A reserve of descriptors is kept out of the client listeners' reach, for what must keep
//! working when clients take everything: the metrics listener, Redis, the cluster links,
//! files re-read on SIGHUP. Client connections beyond `limit - reserve` are closed at once
//! (counted as `herald_connections_rejected_total{reason="descriptors"}`), so a new client
//! gets a closed socket rather than a hang until its own timeout. Should `accept` still run
//! out (descriptors held elsewhere), the listener closes one spare descriptor, accepts and
//! closes the waiting connection, and takes the spare back: the classic way to make EMFILE
//! visible to the client instead of leaving it in the backlog.

use std::fs::File;
use std::io;

use parking_lot::Mutex;

/// Descriptors kept from client connections: at most this many, and at most a quarter of
/// the limit (a test run under `ulimit -n 256` still gets connections).
const RESERVE: u64 = 128;

/// The process's descriptor limits after `raise`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub soft: u64,
    pub hard: u64,
}

impl Limits {
    /// Descriptors kept back from client connections.
    pub fn reserve(&self) -> u64 {
        RESERVE.min(self.soft / 4)
    }

    /// How many client connections the descriptors allow.
    pub fn capacity(&self) -> usize {
        usize::try_from(self.soft - self.reserve()).unwrap_or(usize::MAX)
    }
}

/// Raises the soft descriptor limit to the hard one; returns the limits in effect.
pub fn raise() -> io::Result<Limits> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from the struct we pass, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    Ok(Limits {
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// Whether an `accept` error means the process (or the system) is out of descriptors.
pub fn exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One descriptor held back for `accept` at EMFILE (see the module doc).
pub struct Spare(Mutex<Option<File>>);

impl Spare {
    pub fn new() -> Spare {
        Spare(Mutex::new(File::open("/dev/null").ok()))
    }

    /// Closes the spare descriptor, so that one `accept` can succeed.
    pub fn free(&self) {
        drop(self.0.lock().take());
    }

    /// Takes the spare descriptor back (if one is free again).
    pub fn restore(&self) {
        let mut spare = self.0.lock();
        if spare.is_none() {
            *spare = File::open("/dev/null").ok();
        }
    }
}

impl Default for Spare {
    fn default() -> Self {
        Spare::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_keeps_a_reserve() {
        let l = Limits {
            soft: 20_000,
            hard: 20_000,
        };
        assert_eq!(l.capacity(), 20_000 - 128);
        let small = Limits {
            soft: 256,
            hard: 256,
        };
        assert_eq!(small.capacity(), 192);
    }

    #[test]
    fn raise_reaches_the_hard_limit() {
        let l = raise().unwrap();
        assert_eq!(l.soft, l.hard);
    }
}
