//! Failed logins per address, so that guessing passwords costs the guesser and not the broker.
//!
//! Every password check is an argon2 hash (about 19 MiB and tens of milliseconds of one core):
//! an address that keeps failing would otherwise buy that work for the price of a CONNECT
//! packet. After `auth.max_failures` failures within `auth.failure_window` of its first
//! failure, an address is refused before any hashing until that window has passed (a fixed
//! window, not a sliding one: simple, and an attacker gains nothing from its edges but one
//! more burst per window).
//!
//! A success does not reset the count: keeping it simple costs an honest client nothing
//! unless it fails `max_failures` times within one window, which is then worth a pause.
//!
//! IPv6 addresses are counted per /64 (one host, one subnet: a client that owns a /64 could
//! otherwise take a fresh address per attempt); IPv4-mapped IPv6 addresses count as the IPv4
//! address.
//!
//! Bounded memory: hostile clients can come from many addresses, so the table holds at most
//! [`MAX_ADDRESSES`] (65,536) entries, about 6.5 MiB at worst. When it is full, expired
//! windows are forgotten first; if that frees nothing, the oldest eighth of the windows is
//! dropped (so the scan is paid once per 8,192 new addresses, not on every failure). An
//! attacker who fails from more than 65,536 addresses can thus make the broker forget some
//! blocked address early; that address still pays full argon2 per attempt, as without the
//! limiter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Addresses remembered at most.
pub const MAX_ADDRESSES: usize = 65_536;

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

pub struct Limiter {
    max_failures: u32,
    window: Duration,
    cap: usize,
    table: Mutex<HashMap<IpAddr, Window>>,
}

impl Limiter {
    pub fn new(max_failures: u32, window: Duration) -> Limiter {
        Limiter::with_capacity(max_failures, window, MAX_ADDRESSES)
    }

    /// A limiter remembering at most `cap` addresses (tests use a small one).
    pub fn with_capacity(max_failures: u32, window: Duration, cap: usize) -> Limiter {
        Limiter {
            max_failures: max_failures.max(1),
            window,
            cap: cap.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Has `ip` used up its failures for the current window?
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.is_blocked_at(ip, Instant::now())
    }

    /// Counts one failed login from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        self.record_failure_at(ip, Instant::now())
    }

    /// Addresses currently remembered.
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_blocked_at(&self, ip: IpAddr, now: Instant) -> bool {
        let key = key(ip);
        let table = self.table.lock();
        match table.get(&key) {
            Some(w) => self.live(w, now) && w.failures >= self.max_failures,
            None => false,
        }
    }

    fn record_failure_at(&self, ip: IpAddr, now: Instant) {
        let key = key(ip);
        let mut table = self.table.lock();
        if let Some(w) = table.get_mut(&key) {
            if now.saturating_duration_since(w.start) < self.window {
                w.failures = w.failures.saturating_add(1);
            } else {
                *w = Window {
                    start: now,
                    failures: 1,
                };
            }
            return;
        }
        if table.len() >= self.cap {
            self.make_room(&mut table, now);
        }
        table.insert(
            key,
            Window {
                start: now,
                failures: 1,
            },
        );
    }

    fn live(&self, w: &Window, now: Instant) -> bool {
        now.saturating_duration_since(w.start) < self.window
    }

    /// Forgets expired windows; if none were, the oldest eighth.
    fn make_room(&self, table: &mut HashMap<IpAddr, Window>, now: Instant) {
        table.retain(|_, w| self.live(w, now));
        if table.len() < self.cap {
            return;
        }
        let drop = (self.cap / 8).max(1);
        let mut starts: Vec<Instant> = table.values().map(|w| w.start).collect();
        // The drop-th oldest start: everything at or before it goes (ties may take a few more).
        let (_, cut, _) = starts.select_nth_unstable(drop - 1);
        let cut = *cut;
        table.retain(|_, w| w.start > cut);
    }
}

/// The unit an address is counted in: IPv4 as is, IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn blocks_after_max_failures_and_forgets_after_the_window() {
        let l = Limiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let ip = v4(0x0a00_0001);
        for i in 0..3 {
            assert!(!l.is_blocked_at(ip, t0), "blocked after {i} failures");
            l.record_failure_at(ip, t0 + Duration::from_secs(i));
        }
        assert!(l.is_blocked_at(ip, t0 + Duration::from_secs(3)));
        assert!(l.is_blocked_at(ip, t0 + Duration::from_secs(59)));
        // Another address is not affected.
        assert!(!l.is_blocked_at(v4(0x0a00_0002), t0));
        // The window counts from the first failure.
        assert!(!l.is_blocked_at(ip, t0 + Duration::from_secs(60)));
        // A failure after the window starts a new one.
        l.record_failure_at(ip, t0 + Duration::from_secs(61));
        assert!(!l.is_blocked_at(ip, t0 + Duration::from_secs(62)));
    }

    #[test]
    fn real_clock() {
        let l = Limiter::new(1, Duration::from_millis(50));
        let ip = v4(1);
        l.record_failure(ip);
        assert!(l.is_blocked(ip));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!l.is_blocked(ip));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let l = Limiter::new(2, Duration::from_secs(60));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.record_failure(a);
        l.record_failure(b);
        assert!(l.is_blocked(a));
        assert!(!l.is_blocked(other));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        l.record_failure(mapped);
        l.record_failure(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        assert!(l.is_blocked(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))));
        assert!(!l.is_blocked(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn stays_bounded() {
        let cap = 64;
        let l = Limiter::with_capacity(1, Duration::from_secs(60), cap);
        let t0 = Instant::now();
        for n in 0..10_000u32 {
            l.record_failure_at(v4(n), t0 + Duration::from_millis(n as u64));
            assert!(l.len() <= cap);
        }
        // The newest addresses are the ones remembered.
        assert!(l.is_blocked_at(v4(9_999), t0 + Duration::from_secs(10)));
        assert!(!l.is_blocked_at(v4(0), t0 + Duration::from_secs(10)));
        // Expired windows are the first to go.
        let later = t0 + Duration::from_secs(3600);
        l.record_failure_at(v4(1_000_000), later);
        assert_eq!(l.len(), 1);
    }
}
