//! Who receives a message on an ordinary topic: the subscription table.
//!
//! Push topics never come here: a message on `push/X` goes to client X directly (see
//! `broker`), which is both the fast path and the isolation rule. Exact and wildcard filters
//! live in one trie, one level per node, so matching a topic costs its depth, not the number
//! of subscriptions.
//!
//! Two locks: the trie, which a publish reads (matching is a walk of a few levels), and the
//! index of who holds what, which only SUBSCRIBE, UNSUBSCRIBE and the cluster read. A
//! writer holds the trie's write lock for the insert or remove alone; the bookkeeping
//! (allocating the filter's copies, counting filters) happens under the index's lock, which
//! publishes never take. Measured with a thread subscribing and unsubscribing as fast as it
//! can beside a thread matching (`matching_under_subscribe_churn`; figures in
//! BENCHMARKS.md, "Locks"). Neither lock is held across an await or a store call, and push
//! topics (the hot path) never take them.

use std::collections::HashMap;

use parking_lot::{Mutex, RwLock};

pub use crate::message::ClientId;
use crate::message::Qos;

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Subscribers whose filter ends at this node.
    here: HashMap<ClientId, Qos>,
    /// Subscribers of `<this node>/#`, which also matches this node itself.
    multi: HashMap<ClientId, Qos>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.multi.is_empty()
    }

    fn insert(&mut self, levels: &[&str], client: ClientId, qos: Qos) {
        match levels {
            ["#"] => {
                self.multi.insert(client, qos);
            }
            [] => {
                self.here.insert(client, qos);
            }
            [first, rest @ ..] => self
                .children
                .entry(Box::from(*first))
                .or_default()
                .insert(rest, client, qos),
        }
    }

    fn remove(&mut self, levels: &[&str], client: &str) {
        match levels {
            ["#"] => {
                self.multi.remove(client);
            }
            [] => {
                self.here.remove(client);
            }
            [first, rest @ ..] => {
                if let Some(child) = self.children.get_mut(*first) {
                    child.remove(rest, client);
                    if child.is_empty() {
                        self.children.remove(*first);
                    }
                }
            }
        }
    }

    fn collect(&self, levels: &[&str], root: bool, out: &mut HashMap<ClientId, Qos>) {
        let dollar = root && levels.first().is_some_and(|l| l.starts_with('$'));
        let add = |subs: &HashMap<ClientId, Qos>, out: &mut HashMap<ClientId, Qos>| {
            for (c, q) in subs {
                let e = out.entry(c.clone()).or_insert(*q);
                *e = (*e).max(*q);
            }
        };
        if !dollar {
            add(&self.multi, out);
        }
        match levels {
            [] => add(&self.here, out),
            [first, rest @ ..] => {
                if let Some(child) = self.children.get(*first) {
                    child.collect(rest, false, out);
                }
                if !dollar {
                    if let Some(child) = self.children.get("+") {
                        child.collect(rest, false, out);
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct Index {
    by_client: HashMap<ClientId, HashMap<String, Qos>>,
    /// Distinct filters and how many clients hold each: what a cluster node announces.
    filters: HashMap<Box<str>, usize>,
}

impl Index {
    fn add_filter(&mut self, filter: &str) -> bool {
        let n = self.filters.entry(Box::from(filter)).or_insert(0);
        *n += 1;
        *n == 1
    }

    fn drop_filter(&mut self, filter: &str) -> bool {
        match self.filters.get_mut(filter) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.filters.remove(filter);
                true
            }
            None => false,
        }
    }
}

#[derive(Default)]
pub struct Subscriptions {
    /// What a publish reads.
    trie: RwLock<Node>,
    /// Who holds what, for SUBSCRIBE bookkeeping and the cluster; never read by a publish.
    /// Taken before `trie` by every writer, so that the two agree.
    index: Mutex<Index>,
}

impl Subscriptions {
    /// True if no one here held `filter` before.
    pub fn subscribe(&self, client: &ClientId, filter: &str, qos: Qos) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut index = self.index.lock();
        self.trie.write().insert(&levels, client.clone(), qos);
        let new = index
            .by_client
            .entry(client.clone())
            .or_default()
            .insert(filter.to_string(), qos)
            .is_none();
        new && index.add_filter(filter)
    }

    /// Whether `client` holds `filter` already, and how many filters it holds.
    pub fn holds(&self, client: &str, filter: &str) -> (bool, usize) {
        self.index
            .lock()
            .by_client
            .get(client)
            .map_or((false, 0), |f| (f.contains_key(filter), f.len()))
    }

    /// True if no one here holds `filter` any more.
    pub fn unsubscribe(&self, client: &str, filter: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut index = self.index.lock();
        self.trie.write().remove(&levels, client);
        let Some(filters) = index.by_client.get_mut(client) else {
            return false;
        };
        let had = filters.remove(filter).is_some();
        if filters.is_empty() {
            index.by_client.remove(client);
        }
        had && index.drop_filter(filter)
    }

    /// True if some filter is no longer held by anyone here.
    pub fn unsubscribe_all(&self, client: &str) -> bool {
        let mut index = self.index.lock();
        let Some(filters) = index.by_client.remove(client) else {
            return false;
        };
        let mut gone = false;
        for filter in filters.keys() {
            let levels: Vec<&str> = filter.split('/').collect();
            self.trie.write().remove(&levels, client);
            gone |= index.drop_filter(filter);
        }
        gone
    }

    /// Every filter somebody here subscribes to.
    pub fn filters(&self) -> Vec<String> {
        self.index
            .lock()
            .filters
            .keys()
            .map(|f| f.to_string())
            .collect()
    }

    /// Every client with a matching subscription, once, at its highest matching QoS.
    pub fn matches(&self, topic: &str, out: &mut HashMap<ClientId, Qos>) {
        let levels: Vec<&str> = topic.split('/').collect();
        self.trie.read().collect(&levels, true, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matched(r: &Subscriptions, topic: &str) -> Vec<(String, u8)> {
        let mut out = HashMap::new();
        r.matches(topic, &mut out);
        let mut v: Vec<(String, u8)> = out
            .into_iter()
            .map(|(c, q)| (c.to_string(), q as u8))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_and_overlap() {
        let r = Subscriptions::default();
        let a: ClientId = "a".into();
        let b: ClientId = "b".into();
        r.subscribe(&a, "x/+/z", Qos::AtMostOnce);
        r.subscribe(&a, "x/#", Qos::ExactlyOnce);
        r.subscribe(&b, "x/y/z", Qos::AtLeastOnce);
        assert_eq!(matched(&r, "x/y/z"), [("a".into(), 2), ("b".into(), 1)]);
        assert_eq!(matched(&r, "x"), [("a".into(), 2)]);
        r.unsubscribe("a", "x/#");
        assert_eq!(matched(&r, "x/y/z"), [("a".into(), 0), ("b".into(), 1)]);
        r.unsubscribe_all("a");
        assert_eq!(matched(&r, "x/y/z"), [("b".into(), 1)]);
        assert!(!r.holds("a", "x/+/z").0);
    }

    #[test]
    fn distinct_filters_are_counted() {
        let r = Subscriptions::default();
        let (a, b): (ClientId, ClientId) = ("a".into(), "b".into());
        assert!(r.subscribe(&a, "x/#", Qos::AtMostOnce));
        assert!(
            !r.subscribe(&a, "x/#", Qos::AtLeastOnce),
            "a QoS change adds nothing"
        );
        assert!(!r.subscribe(&b, "x/#", Qos::AtMostOnce));
        assert!(r.subscribe(&b, "y", Qos::AtMostOnce));
        assert!(!r.unsubscribe("a", "x/#"), "b still holds it");
        assert!(
            !r.unsubscribe("a", "x/#"),
            "a second unsubscribe changes nothing"
        );
        assert_eq!(r.filters().len(), 2);
        assert!(r.unsubscribe_all("b"));
        assert!(r.filters().is_empty());
    }

    #[test]
    fn dollar_topics() {
        let r = Subscriptions::default();
        r.subscribe(&"a".into(), "#", Qos::AtMostOnce);
        r.subscribe(&"b".into(), "+/x", Qos::AtMostOnce);
        r.subscribe(&"c".into(), "$SYS/#", Qos::AtMostOnce);
        assert_eq!(matched(&r, "$SYS/x"), [("c".into(), 0)]);
        assert_eq!(matched(&r, "q/x").len(), 2);
    }

    /// `cargo test --release --lib matching_under -- --ignored --nocapture`: how the one
    /// lock behaves when SUBSCRIBE/UNSUBSCRIBE run beside publishes: matches per second on
    /// one thread, alone and while another thread subscribes and unsubscribes wildcard
    /// filters as fast as it can (on another core).
    #[test]
    #[ignore]
    fn matching_under_subscribe_churn() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::time::{Duration, Instant};
        let t = std::sync::Arc::new(Subscriptions::default());
        for i in 0..10_000 {
            t.subscribe(
                &format!("c{i}").into(),
                &format!("t/{i}/+"),
                Qos::AtMostOnce,
            );
        }
        let topics: Vec<String> = (0..10_000).map(|i| format!("t/{i}/x")).collect();
        for churn in [false, true] {
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let ops = std::sync::Arc::new(AtomicU64::new(0));
            let churner = churn.then(|| {
                let (t, stop, ops) = (t.clone(), stop.clone(), ops.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let c: ClientId = format!("z{}", n % 1000).into();
                        let f = format!("churn/{}/+/x", n % 100);
                        t.subscribe(&c, &f, Qos::AtLeastOnce);
                        t.unsubscribe(&c, &f);
                        n += 1;
                    }
                    ops.store(n, Ordering::Relaxed);
                })
            });
            let start = Instant::now();
            let mut matched = 0u64;
            let mut out = HashMap::new();
            while start.elapsed() < Duration::from_secs(2) {
                for topic in topics.iter().take(1000) {
                    out.clear();
                    t.matches(topic, &mut out);
                    matched += 1;
                }
            }
            let secs = start.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            if let Some(h) = churner {
                let _ = h.join();
            }
            eprintln!(
                "churn {churn}: {:.0} matches/s, {:.0} subscribe+unsubscribe/s",
                matched as f64 / secs,
                ops.load(Ordering::Relaxed) as f64 / secs
            );
        }
    }
}
