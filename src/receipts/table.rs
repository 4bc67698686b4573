//! The memory store's receipt records: lost on restart, like its outboxes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::State;
use crate::metrics;

/// (client, seq) -> (state, unix ms).
type Records = HashMap<(Arc<str>, u64), (State, u64)>;

pub struct Table {
    records: Mutex<Records>,
    ttl_ms: u64,
    /// Records at most (a client id is shared with its outbox, so a record costs a fixed
    /// ~64 bytes: the count bounds the bytes).
    max: usize,
}

impl Table {
    pub fn new(ttl: Duration, max: usize) -> Table {
        Table {
            records: Mutex::default(),
            ttl_ms: ttl.as_millis() as u64,
            max: max.max(1),
        }
    }

    /// Records `state`. True when it is the message's first final state (a webhook event).
    /// A full table records no new message (counted), but still updates known ones.
    pub fn note(&self, client: &Arc<str>, seq: u64, state: State, at_ms: u64) -> bool {
        let mut records = self.records.lock();
        let key = (client.clone(), seq);
        let full = records.len() >= self.max;
        match records.get_mut(&key) {
            // The first `sent` stays too, as on the Redis store (`SET NX`).
            Some((s, _)) if s.is_final() || state == State::Sent => false,
            Some(r) => {
                *r = (state, at_ms);
                state.is_final()
            }
            None if full => {
                metrics::limit_hit("receipt_records");
                false
            }
            None => {
                records.insert(key, (state, at_ms));
                state.is_final()
            }
        }
    }

    pub fn get(&self, client: &str, seq: u64) -> Option<(State, u64)> {
        self.records.lock().get(&(Arc::from(client), seq)).copied()
    }

    /// Forgets records unchanged for `http.receipt_ttl`.
    pub fn sweep(&self, now_ms: u64) {
        let ttl = self.ttl_ms;
        self.records
            .lock()
            .retain(|_, (_, at)| at.saturating_add(ttl) > now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_final_state_wins_and_records_expire() {
        let t = Table::new(Duration::from_secs(10), 2);
        let c: Arc<str> = Arc::from("d");
        assert!(!t.note(&c, 1, State::Sent, 1));
        assert!(t.note(&c, 1, State::Acked, 2));
        assert!(!t.note(&c, 1, State::Acked, 3), "reported once");
        assert!(!t.note(&c, 1, State::Sent, 4), "a final state stays");
        assert_eq!(t.get("d", 1), Some((State::Acked, 2)));
        assert!(t.note(&c, 2, State::Expired, 5));
        assert!(!t.note(&c, 3, State::Dropped, 5), "full");
        t.sweep(10_003);
        assert_eq!(t.get("d", 1), None);
        assert_eq!(t.get("d", 2), Some((State::Expired, 5)));
    }
}
