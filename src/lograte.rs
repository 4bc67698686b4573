//! Rate-limited logging for the lines a remote peer can cause at will.
//!
//! A client that sends garbage in a loop, a login brute force or a store outage under
//! thousands of publishers would otherwise write one line per event (34,747 lines in a
//! 9-minute fuzz run): the log fills the disk and buries everything else. Each `Reason` writes
//! its first `BURST` lines per `WINDOW`; the rest are only counted
//! (`herald_log_lines_suppressed_total{reason}`) and reported in one summary line,
//! "N more <reason> lines suppressed in the last 10s", once the window has passed: from the
//! server's periodic task (`flush`), before the next line of that reason, or at shutdown
//! (`flush_all`). The metrics of the events themselves still count every one.
//!
//! Windows are fixed, starting at a reason's first line after a quiet spell. Only the
//! warning path comes here, never a packet that is handled normally, so one uncontended
//! mutex per reason is cheap enough and keeps the count and the window consistent.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::Level;

/// Lines of one reason written per window.
pub const BURST: u32 = 5;

/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// A kind of line that is limited on its own: a flood of one never silences another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A malformed packet, in the handshake ("bad first packet") or later.
    Malformed = 0,
    /// CONNECT with a protocol level Herald does not speak.
    UnsupportedProtocol = 1,
    /// A SUBSCRIBE filter refused with 0x80 because it is not a valid filter.
    InvalidFilter = 2,
    /// A publish or a will the store did not take.
    NotStored = 3,
    /// CONNECT refused with CONNACK 3 because the store is down.
    StoreUnavailable = 4,
    /// `accept` failed on a client or cluster listener (out of descriptors, usually).
    AcceptFailed = 5,
    /// A new connection closed at `server.max_connections`.
    MaxConnections = 6,
    /// A refused login (credentials, client id, will, reserved names).
    LoginRefused = 7,
    /// A connection to the cluster port refused or ended with an error.
    NodeLink = 8,
    /// A byte budget, the descriptor reserve or the memory guard refused a connection.
    Limit = 9,
    /// A connection replaced by a newer one of its client (here or on another node): a
    /// client reconnecting in a loop causes one each time.
    Takeover = 10,
    /// The receipt webhook failed (it is retried with backoff).
    Webhook = 11,
}

/// Every reason, in discriminant order.
pub const REASONS: [Reason; 12] = [
    Reason::Malformed,
    Reason::UnsupportedProtocol,
    Reason::InvalidFilter,
    Reason::NotStored,
    Reason::StoreUnavailable,
    Reason::AcceptFailed,
    Reason::MaxConnections,
    Reason::LoginRefused,
    Reason::NodeLink,
    Reason::Limit,
    Reason::Takeover,
    Reason::Webhook,
];

impl Reason {
    /// The `reason` label of `herald_log_lines_suppressed_total`, also a field of the
    /// summary line.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnsupportedProtocol => "unsupported_protocol",
            Reason::InvalidFilter => "invalid_filter",
            Reason::NotStored => "not_stored",
            Reason::StoreUnavailable => "store_unavailable",
            Reason::AcceptFailed => "accept_failed",
            Reason::MaxConnections => "max_connections",
            Reason::LoginRefused => "login_refused",
            Reason::NodeLink => "node_link",
            Reason::Limit => "limit",
            Reason::Takeover => "takeover",
            Reason::Webhook => "webhook",
        }
    }

    /// How the summary line names the lines it stands for.
    fn what(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed-packet",
            Reason::UnsupportedProtocol => "unsupported-protocol",
            Reason::InvalidFilter => "invalid-filter",
            Reason::NotStored => "not-stored",
            Reason::StoreUnavailable => "store-unavailable",
            Reason::AcceptFailed => "accept-failed",
            Reason::MaxConnections => "max-connections",
            Reason::LoginRefused => "login-refused",
            Reason::Limit => "limit",
            Reason::NodeLink => "node-link",
            Reason::Takeover => "takeover",
            Reason::Webhook => "receipt-webhook",
        }
    }

    /// The summary goes out at the level of the lines it replaces, so a log level that
    /// hides those hides it too.
    fn level(self) -> Level {
        match self {
            Reason::UnsupportedProtocol
            | Reason::InvalidFilter
            | Reason::LoginRefused
            | Reason::Takeover => Level::INFO,
            _ => Level::WARN,
        }
    }
}

/// Lines suppressed in a window that has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub suppressed: u64,
    /// Whole seconds the window covered (`WINDOW`, or less when forced to end early).
    pub secs: u64,
}

/// One reason's current window.
#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Window {
    const EMPTY: Window = Window {
        start: None,
        logged: 0,
        suppressed: 0,
    };

    /// Ends the window if it has passed, or whatever its age with `force`; the summary if
    /// it suppressed anything.
    fn end(&mut self, now: Instant, force: bool) -> Option<Summary> {
        let age = now.saturating_duration_since(self.start?);
        if age < WINDOW && !force {
            return None;
        }
        let suppressed = self.suppressed;
        *self = Window::EMPTY;
        let secs = age.min(WINDOW).as_secs_f64().ceil().max(1.0) as u64;
        (suppressed > 0).then_some(Summary { suppressed, secs })
    }
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Write the line (else it is suppressed).
    pub log: bool,
    /// Write this summary of the previous window first.
    pub summary: Option<Summary>,
}

/// The windows of every reason. The process has one (`allow`, `flush`); tests make their
/// own and drive them with their own clock.
pub struct Limiter {
    windows: [Mutex<Window>; REASONS.len()],
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new()
    }
}

impl Limiter {
    pub const fn new() -> Limiter {
        Limiter {
            windows: [const { Mutex::new(Window::EMPTY) }; REASONS.len()],
        }
    }

    fn window(&self, reason: Reason) -> std::sync::MutexGuard<'_, Window> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.windows[reason as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// One line of `reason` at `now`.
    pub fn check(&self, reason: Reason, now: Instant) -> Verdict {
        let mut w = self.window(reason);
        let summary = w.end(now, false);
        w.start.get_or_insert(now);
        let log = w.logged < BURST;
        if log {
            w.logged += 1;
        } else {
            w.suppressed += 1;
        }
        Verdict { log, summary }
    }

    /// Ends the windows that have passed (every window with `force`), with the summary of
    /// each that suppressed lines.
    pub fn end_windows(&self, now: Instant, force: bool) -> Vec<(Reason, Summary)> {
        REASONS
            .iter()
            .filter_map(|&r| self.window(r).end(now, force).map(|s| (r, s)))
            .collect()
    }
}

static LIMITER: Limiter = Limiter::new();

/// Whether to write a line of `reason` now. A suppressed line is counted; a summary of the
/// reason's previous window, if one is owed, is written first.
pub fn allow(reason: Reason) -> bool {
    let v = LIMITER.check(reason, Instant::now());
    if let Some(s) = v.summary {
        write_summary(reason, s);
    }
    if !v.log {
        crate::metrics::log_suppressed(reason);
    }
    v.log
}

/// Writes the summaries of windows that have passed; the server calls it every second so a
/// flood's summary does not wait for the next line of its kind.
pub fn flush() {
    for (r, s) in LIMITER.end_windows(Instant::now(), false) {
        write_summary(r, s);
    }
}

/// Writes every summary still owed, however young its window: at shutdown.
pub fn flush_all() {
    for (r, s) in LIMITER.end_windows(Instant::now(), true) {
        write_summary(r, s);
    }
}

fn write_summary(reason: Reason, s: Summary) {
    let (n, what, secs, label) = (s.suppressed, reason.what(), s.secs, reason.label());
    if reason.level() == Level::WARN {
        tracing::warn!(
            reason = label,
            suppressed = n,
            "{n} more {what} lines suppressed in the last {secs}s"
        );
    } else {
        tracing::info!(
            reason = label,
            suppressed = n,
            "{n} more {what} lines suppressed in the last {secs}s"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    const LOG: Verdict = Verdict {
        log: true,
        summary: None,
    };
    const QUIET: Verdict = Verdict {
        log: false,
        summary: None,
    };

    #[test]
    fn burst_then_suppressed_then_summary_before_the_next_line() {
        let l = Limiter::new();
        let t0 = Instant::now();
        for i in 0..BURST as u64 {
            assert_eq!(l.check(Reason::Malformed, at(t0, i)), LOG);
        }
        for i in 0..195 {
            assert_eq!(l.check(Reason::Malformed, at(t0, 100 + i)), QUIET);
        }
        // Window still open: nothing to report yet.
        assert!(l.end_windows(at(t0, 9_999), false).is_empty());
        let v = l.check(Reason::Malformed, at(t0, 10_000));
        assert_eq!(
            v,
            Verdict {
                log: true,
                summary: Some(Summary {
                    suppressed: 195,
                    secs: 10
                })
            }
        );
        // The new window started with that line: BURST - 1 more are written.
        for i in 1..BURST as u64 {
            assert_eq!(l.check(Reason::Malformed, at(t0, 10_000 + i)), LOG);
        }
        assert_eq!(l.check(Reason::Malformed, at(t0, 10_010)), QUIET);
    }

    #[test]
    fn reasons_are_limited_separately() {
        let l = Limiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST + 3 {
            l.check(Reason::LoginRefused, t0);
        }
        assert_eq!(l.check(Reason::LoginRefused, t0), QUIET);
        assert_eq!(l.check(Reason::NotStored, t0), LOG);
        assert_eq!(
            l.end_windows(at(t0, 10_000), false),
            [(
                Reason::LoginRefused,
                Summary {
                    suppressed: 4,
                    secs: 10
                }
            )]
        );
        // Reported once: the window is gone.
        assert!(l.end_windows(at(t0, 30_000), false).is_empty());
        assert_eq!(l.check(Reason::LoginRefused, at(t0, 30_000)), LOG);
    }

    #[test]
    fn a_window_without_suppressed_lines_ends_silently() {
        let l = Limiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.check(Reason::AcceptFailed, t0), LOG);
        }
        assert_eq!(l.check(Reason::AcceptFailed, at(t0, 10_000)), LOG);
        assert!(l.end_windows(at(t0, 60_000), true).is_empty());
    }

    #[test]
    fn forced_end_reports_a_young_window_with_its_age() {
        let l = Limiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST + 7 {
            l.check(Reason::Malformed, t0);
        }
        assert!(l.end_windows(at(t0, 2_500), false).is_empty());
        assert_eq!(
            l.end_windows(at(t0, 2_500), true),
            [(
                Reason::Malformed,
                Summary {
                    suppressed: 7,
                    secs: 3
                }
            )]
        );
        assert_eq!(l.check(Reason::Malformed, at(t0, 2_600)), LOG);
    }

    #[test]
    fn labels_follow_the_discriminants() {
        for (i, r) in REASONS.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
