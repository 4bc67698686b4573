//! Topic names, topic filters and the push-topic template.

/// A topic filter is valid if `#` only stands alone as the last level and `+` only stands
/// alone as a level (MQTT 3.1.1 section 4.7.1).
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

pub fn has_wildcards(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// Does `topic` match `filter`? A leading wildcard never matches a `$` topic (4.7.2).
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// `push/{client_id}` split around its placeholder.
#[derive(Debug, Clone)]
pub struct PushTemplate {
    prefix: String,
    suffix: String,
}

impl PushTemplate {
    /// `template` is validated by the config to hold `{client_id}` exactly once.
    pub fn new(template: &str) -> PushTemplate {
        let (prefix, suffix) = template.split_once("{client_id}").unwrap_or((template, ""));
        PushTemplate {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        }
    }

    /// The push topic of `client`.
    pub fn topic_for(&self, client: &str) -> String {
        [self.prefix.as_str(), client, self.suffix.as_str()].concat()
    }

    /// The client a push topic belongs to, or None if `topic` is not a push topic.
    pub fn client_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic.strip_prefix(self.prefix.as_str())?;
        let id = rest.strip_suffix(self.suffix.as_str())?;
        (!id.is_empty()).then_some(id)
    }

    /// Could `filter` match some client's push topic? Wildcard subscribers are never given
    /// push messages, so this only matters for refusing exact subscriptions.
    pub fn owner_of_filter<'a>(&self, filter: &'a str) -> Option<&'a str> {
        if has_wildcards(filter) {
            return None;
        }
        self.client_of(filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for ok in [
            "a", "a/b", "#", "a/#", "+", "+/+", "a/+/c", "/", "a//b", "$SYS/#",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "#/a", "a/##"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("a/b/c", "a/+/c"));
        assert!(matches("a/b/c", "#"));
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"));
        assert!(!matches("a/b", "a/b/+"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(matches("/x", "+/x"));
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        assert!(matches("$SYS/x", "$SYS/#"));
    }

    #[test]
    fn push_template() {
        let t = PushTemplate::new("push/{client_id}");
        assert_eq!(t.client_of("push/d1"), Some("d1"));
        assert_eq!(t.client_of("push/"), None);
        assert_eq!(t.client_of("other/d1"), None);
        let t = PushTemplate::new("dev/{client_id}/inbox");
        assert_eq!(t.client_of("dev/x/inbox"), Some("x"));
        assert_eq!(t.client_of("dev/x/outbox"), None);
        assert_eq!(t.owner_of_filter("dev/+/inbox"), None);
        assert_eq!(t.topic_for("x"), "dev/x/inbox");
        assert_eq!(t.client_of(&t.topic_for("y")), Some("y"));
    }
}
