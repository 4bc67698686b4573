//! Fixed-bucket histograms, hand-written: the exporter's histograms keep every sample until
//! the next scrape or upkeep (bounded in time, not in bytes: 300k deliveries a second
//! between two scrapes 15 s apart hold 36 MB), while these are a few atomic counters each,
//! whatever the rate. Samples are in microseconds; a bucket's count is the samples in it
//! alone, made cumulative when rendered.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds in microseconds, ascending; one more bucket (+Inf) follows them.
pub struct Histogram {
    bounds: &'static [u64],
    buckets: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn record_us(&self, us: u64) {
        let i = self.bounds.partition_point(|b| *b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of one label set (`labels` is
    /// `key="value",...` or empty), the count being the sum of the buckets, read once.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(us) => seconds(*us),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = seconds(self.sum_us.load(Ordering::Relaxed));
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// Microseconds as seconds, without float noise ("0.0005", not "0.0005000000000000001").
fn seconds(us: u64) -> String {
    let (s, frac) = (us / 1_000_000, us % 1_000_000);
    if frac == 0 {
        return s.to_string();
    }
    let f = format!("{frac:06}");
    format!("{s}.{}", f.trim_end_matches('0'))
}

/// Delivery latency: from half a millisecond to an hour (offline devices).
pub const DELIVERY_US: &[u64] = &[
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    3_600_000_000,
];

/// Store operations and the CONNECT handshake: 100 µs to 5 s.
pub const OPERATION_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::new(&[1_000, 10_000]);
        h.record_us(1_000);
        h.record_us(5_000);
        h.record_us(20_000);
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "a=\"b\"");
        assert_eq!(
            out,
            "x_seconds_bucket{a=\"b\",le=\"0.001\"} 1\n\
             x_seconds_bucket{a=\"b\",le=\"0.01\"} 2\n\
             x_seconds_bucket{a=\"b\",le=\"+Inf\"} 3\n\
             x_seconds_sum{a=\"b\"} 0.026\n\
             x_seconds_count{a=\"b\"} 3\n"
        );
        let mut bare = String::new();
        Histogram::new(&[500]).render(&mut bare, "y", "");
        assert!(bare.contains("y_bucket{le=\"0.0005\"} 0\n"), "{bare}");
        assert!(bare.ends_with("y_sum 0\ny_count 0\n"), "{bare}");
    }
}
