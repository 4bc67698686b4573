//! Retained messages of ordinary topics (push topics are never retained), kept in a trie by
//! topic level, so that a SUBSCRIBE visits only the branches its filter can match instead
//! of every retained message: `a/+/c` walks the children of `a` once, and `a/#` the subtree
//! under `a`. The lock is a `RwLock`: SUBSCRIBEs read it together, a retained PUBLISH takes
//! it for writing for one insert. `wildcard_lookup_cost` (an ignored test) measures a
//! lookup against the scan this replaced.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::message::Message;

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    msg: Option<Arc<Message>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.msg.is_none() && self.children.is_empty()
    }

    /// Removes the message at `levels`, pruning branches left empty.
    fn remove(&mut self, levels: &[&str]) {
        match levels {
            [] => self.msg = None,
            [first, rest @ ..] => {
                if let Some(child) = self.children.get_mut(*first) {
                    child.remove(rest);
                    if child.is_empty() {
                        self.children.remove(*first);
                    }
                }
            }
        }
    }

    /// Every message at or below this node.
    fn all(&self, out: &mut Vec<Arc<Message>>) {
        out.extend(self.msg.iter().cloned());
        for child in self.children.values() {
            child.all(out);
        }
    }

    /// Messages whose topic matches `filter` (as levels) from this node down. `root`: this
    /// is the first level, where wildcards do not match topics starting with `$`.
    fn matching(&self, filter: &[&str], root: bool, out: &mut Vec<Arc<Message>>) {
        let visible = |name: &str| !(root && name.starts_with('$'));
        match filter {
            [] => out.extend(self.msg.iter().cloned()),
            ["#"] => {
                // `a/#` also matches `a` itself.
                if !root {
                    out.extend(self.msg.iter().cloned());
                }
                for (name, child) in &self.children {
                    if visible(name) {
                        child.all(out);
                    }
                }
            }
            ["+", rest @ ..] => {
                for (name, child) in &self.children {
                    if visible(name) {
                        child.matching(rest, false, out);
                    }
                }
            }
            [level, rest @ ..] => {
                if let Some(child) = self.children.get(*level) {
                    child.matching(rest, false, out);
                }
            }
        }
    }
}

#[derive(Default)]
pub struct Retained {
    root: RwLock<Node>,
}

impl Retained {
    /// Stores, replaces or (empty payload) clears the retained message of its topic.
    pub fn retain(&self, msg: &Arc<Message>) {
        let levels: Vec<&str> = msg.topic.split('/').collect();
        let mut root = self.root.write();
        if msg.payload.is_empty() {
            root.remove(&levels);
            return;
        }
        let mut node = &mut *root;
        for level in levels {
            node = node.children.entry(Box::from(level)).or_default();
        }
        node.msg = Some(msg.clone());
    }

    /// Retained messages whose topic matches `filter` (unexpired).
    pub fn matching(&self, filter: &str, now_ms: u64) -> Vec<Arc<Message>> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        self.root.read().matching(&levels, true, &mut out);
        out.retain(|m| !m.is_expired(now_ms));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Qos;
    use bytes::Bytes;

    fn put(r: &Retained, topic: &str, payload: &'static [u8]) {
        r.retain(&Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: Qos::AtMostOnce,
            retain: true,
            expires_at: 0,
            born_us: 0,
            forwarded: false,
            receipt: false,
        }));
    }

    fn topics(r: &Retained, filter: &str) -> Vec<String> {
        let mut v: Vec<String> = r
            .matching(filter, 1)
            .iter()
            .map(|m| m.topic.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn filters_match_like_subscriptions() {
        let r = Retained::default();
        for t in ["a", "a/b", "a/b/c", "a/x/c", "$SYS/up", "/lead", "b"] {
            put(&r, t, b"1");
        }
        assert_eq!(topics(&r, "a/b"), ["a/b"]);
        assert_eq!(topics(&r, "a/#"), ["a", "a/b", "a/b/c", "a/x/c"]);
        assert_eq!(topics(&r, "a/+/c"), ["a/b/c", "a/x/c"]);
        assert_eq!(topics(&r, "+"), ["a", "b"]);
        assert_eq!(
            topics(&r, "#"),
            ["/lead", "a", "a/b", "a/b/c", "a/x/c", "b"]
        );
        assert_eq!(topics(&r, "$SYS/#"), ["$SYS/up"]);
        assert_eq!(topics(&r, "+/lead"), ["/lead"]);
        put(&r, "a/b", b"");
        assert_eq!(topics(&r, "a/#"), ["a", "a/b/c", "a/x/c"]);
        put(&r, "a/b/c", b"");
        put(&r, "a/x/c", b"");
        put(&r, "a", b"");
        assert!(!r.root.read().children.contains_key("a"), "branch pruned");
    }

    #[test]
    fn expired_messages_are_left_out() {
        let r = Retained::default();
        r.retain(&Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            qos: Qos::AtLeastOnce,
            retain: true,
            expires_at: 10,
            born_us: 0,
            forwarded: false,
            receipt: false,
        }));
        assert_eq!(r.matching("t", 5).len(), 1);
        assert!(r.matching("#", 10).is_empty());
    }

    /// `cargo test --release --lib retained -- --ignored --nocapture`: a wildcard SUBSCRIBE
    /// over many retained messages, against a scan of all of them (the code before the trie).
    #[test]
    #[ignore]
    fn wildcard_lookup_cost() {
        let r = Retained::default();
        for i in 0..100_000 {
            put(&r, &format!("sensors/{}/{}", i % 1000, i), b"v");
        }
        put(&r, "alerts/1", b"v");
        // What the lookup cost before the trie: a scan of every retained message.
        let all: Vec<Arc<Message>> = r.matching("#", 1);
        let n = 100;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let hits = all
                .iter()
                .filter(|m| crate::topic::matches(&m.topic, "alerts/+"))
                .count();
            assert_eq!(hits, 1);
        }
        eprintln!("scan (before): {:?} per SUBSCRIBE", t.elapsed() / n);
        let n = 1000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(r.matching("alerts/+", 1).len(), 1);
        }
        eprintln!(
            "alerts/+ over 100,000 retained: {:?} per SUBSCRIBE",
            t.elapsed() / n
        );
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(r.matching("sensors/7/+", 1).len(), 100);
        }
        eprintln!(
            "sensors/7/+ (100 of 100,000): {:?} per SUBSCRIBE",
            t.elapsed() / n
        );
    }
}
