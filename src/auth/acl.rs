//! The ACL file: which topics each user or device may publish and subscribe to, and which
//! client ids a user may connect with, in the syntax operators already know from Mosquitto's
//! `acl_file`, so that an existing file mostly carries over.
//!
//! ```text
//! # Anonymous clients: topic lines before the first `user` line.
//! topic read public/#
//!
//! # A backend; `clientid` is Herald's own line: the client ids this user may use.
//! user backend
//! clientid backend-*
//! topic write push/#
//! topic readwrite jobs/#
//! topic deny jobs/secret/#
//!
//! # A device's block: its identity (= its client id) is the name.
//! user dev42
//! topic write telemetry/dev42
//!
//! # Every non-anonymous client, wherever the line is: %c = client id, %u = user name
//! # (for a device, its identity, which is its client id).
//! pattern write devices/%c/state
//! pattern read users/%u/#
//! ```
//!
//! A `#` starts a comment only at the start of a line (elsewhere it is a wildcard).
//!
//! Lines: `# comment` and blank lines; `user NAME` starts a block; `topic [read|write|readwrite|deny]
//! TOPIC` (no access word = readwrite) belongs to the current block, or to anonymous clients
//! before the first block; `pattern [access] TOPIC` applies to every non-anonymous client;
//! `clientid FILTER` (only in a block, `%u` allowed) lists the client ids that user may use.
//! The rest of the line after the access word is the topic, spaces included. Anything else,
//! including Mosquitto directives Herald does not implement and `%c`/`%u` in a `topic` line
//! (Mosquitto would take them literally), fails the load with the line number: a rule that is
//! silently ignored is an access nobody intended.
//!
//! Decisions:
//! - Publish is allowed iff some write/readwrite rule matches the topic and no `deny` rule
//!   does.
//! - Subscribe is allowed iff some read/readwrite rule *covers* the filter (every topic the
//!   filter can match is matched by the rule: `#` covers the rest, `#` included; `+` covers a
//!   literal or a `+` but not a `#`; a literal covers only itself) and no `deny` rule
//!   *overlaps* it (some topic matches both). So `a/#` does not grant `#`, and a deny on
//!   `a/secret` refuses `a/#` as a whole rather than quietly delivering less than asked.
//! - A leading wildcard never reaches a `$` topic, in rules as in subscriptions (MQTT 4.7.2).
//! - `%c`/`%u` are replaced by the client id/user name as literal text; a value containing
//!   `+` or `#` would turn into a wildcard, so then an allowing pattern does not apply and a
//!   denying one applies to every topic (as Mosquitto, which refuses such clients' patterns).
//! - `clientid` filters match the client id like an MQTT topic filter over `/` levels (`+`
//!   one level, `#` the rest), plus a `*` at the very end of the last level matching any rest
//!   of the client id, `/` included: `backend-*` allows `backend-7` and `backend-7/a`, and
//!   `+/worker-*` allows `eu/worker-1`. A user with no `clientid` line gets the default (the
//!   client id must start with the user name; see `Auth`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use crate::topic::{matches, valid_filter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

#[derive(Debug)]
struct Rule {
    access: Access,
    filter: String,
    /// Contains `%c` or `%u` (pattern lines only).
    placeholders: bool,
}

#[derive(Debug, Default)]
struct Block {
    rules: Vec<Rule>,
    clientids: Vec<String>,
}

/// A parsed ACL file.
#[derive(Debug, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Block>,
    patterns: Vec<Rule>,
}

/// Whose rules apply.
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    /// The rules before the first `user` line.
    Anonymous,
    /// The `user NAME` block and every `pattern`, with `%u` = `name` and `%c` = `client_id`.
    Named { name: &'a str, client_id: &'a str },
}

/// A rule resolved for one client.
enum Resolved<'r> {
    Filter(Cow<'r, str>),
    /// A placeholder value would have become a wildcard.
    Poisoned,
}

impl Acl {
    /// Reads and checks an ACL file. Errors are `FILE:LINE: reason`.
    pub fn load(path: &Path) -> Result<Acl, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Acl::parse(&text, &path.display().to_string())
    }

    /// Parses ACL text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Acl, String> {
        let mut acl = Acl::default();
        let mut current: Option<String> = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: String| format!("{origin}:{n}: {reason}");
            let (word, rest) = split_word(line);
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` without a name".into()));
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    current = Some(rest.to_string());
                }
                "topic" => {
                    let (access, filter) = parse_access(rest).map_err(err)?;
                    if filter.contains("%c") || filter.contains("%u") {
                        return Err(err(format!(
                            "{filter:?}: %c and %u work only in `pattern` lines"
                        )));
                    }
                    if !valid_filter(filter) {
                        return Err(err(format!("{filter:?} is not a valid topic filter")));
                    }
                    let rule = Rule {
                        access,
                        filter: filter.to_string(),
                        placeholders: false,
                    };
                    match &current {
                        Some(user) => acl.users.entry(user.clone()).or_default().rules.push(rule),
                        None => acl.anonymous.push(rule),
                    }
                }
                "pattern" => {
                    let (access, filter) = parse_access(rest).map_err(err)?;
                    let placeholders = filter.contains("%c") || filter.contains("%u");
                    if !valid_filter(&filter.replace("%c", "c").replace("%u", "u")) {
                        return Err(err(format!("{filter:?} is not a valid topic filter")));
                    }
                    acl.patterns.push(Rule {
                        access,
                        filter: filter.to_string(),
                        placeholders,
                    });
                }
                "clientid" => {
                    let Some(user) = &current else {
                        return Err(err(
                            "`clientid` outside a `user` block (it lists that user's client ids)"
                                .into(),
                        ));
                    };
                    if rest.is_empty() {
                        return Err(err("`clientid` without a filter".into()));
                    }
                    if let Err(e) = check_clientid_filter(&rest.replace("%u", "u")) {
                        return Err(err(format!("clientid {rest:?}: {e}")));
                    }
                    acl.users
                        .entry(user.clone())
                        .or_default()
                        .clientids
                        .push(rest.to_string());
                }
                other => {
                    return Err(err(format!(
                        "unknown directive {other:?} (expected user, topic, pattern or clientid)"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// May `who` publish to `topic` (a topic name)?
    pub fn may_publish(&self, who: Who<'_>, topic: &str) -> bool {
        let mut allowed = false;
        for (rule, resolved) in self.rules_for(who) {
            let hit = match &resolved {
                Resolved::Filter(f) => matches(topic, f),
                Resolved::Poisoned => rule.access == Access::Deny,
            };
            if hit {
                if rule.access == Access::Deny {
                    return false;
                }
                allowed |= rule.access.writes();
            }
        }
        allowed
    }

    /// May `who` subscribe to `filter` (wildcards allowed)?
    pub fn may_subscribe(&self, who: Who<'_>, filter: &str) -> bool {
        let mut allowed = false;
        for (rule, resolved) in self.rules_for(who) {
            match (&resolved, rule.access) {
                (Resolved::Poisoned, Access::Deny) => return false,
                (Resolved::Poisoned, _) => {}
                (Resolved::Filter(f), Access::Deny) => {
                    if overlaps(f, filter) {
                        return false;
                    }
                }
                (Resolved::Filter(f), access) => {
                    allowed |= access.reads() && covers(f, filter);
                }
            }
        }
        allowed
    }

    /// Is `client_id` one of `user`'s `clientid` filters? None when the file gives that user
    /// no `clientid` line (the caller applies the default).
    pub fn clientid_allowed(&self, user: &str, client_id: &str) -> Option<bool> {
        let block = self.users.get(user)?;
        if block.clientids.is_empty() {
            return None;
        }
        let value_is_literal = !user.contains(['+', '#', '*']);
        Some(block.clientids.iter().any(|f| {
            if f.contains("%u") {
                value_is_literal && clientid_matches(&f.replace("%u", user), client_id)
            } else {
                clientid_matches(f, client_id)
            }
        }))
    }

    /// Does the file have a block for `name`?
    pub fn has_user(&self, name: &str) -> bool {
        self.users.contains_key(name)
    }

    fn rules_for<'s>(&'s self, who: Who<'s>) -> impl Iterator<Item = (&'s Rule, Resolved<'s>)> {
        let (own, patterns): (&[Rule], &[Rule]) = match who {
            Who::Anonymous => (&self.anonymous, &[]),
            Who::Named { name, .. } => (
                self.users.get(name).map_or(&[][..], |b| &b.rules[..]),
                &self.patterns,
            ),
        };
        own.iter()
            .map(|r| (r, Resolved::Filter(Cow::Borrowed(r.filter.as_str()))))
            .chain(patterns.iter().map(move |r| (r, resolve(r, who))))
    }
}

fn resolve<'r>(rule: &'r Rule, who: Who<'_>) -> Resolved<'r> {
    if !rule.placeholders {
        return Resolved::Filter(Cow::Borrowed(&rule.filter));
    }
    let Who::Named { name, client_id } = who else {
        return Resolved::Poisoned;
    };
    let uses_c = rule.filter.contains("%c");
    let uses_u = rule.filter.contains("%u");
    if (uses_c && client_id.contains(['+', '#'])) || (uses_u && name.contains(['+', '#'])) {
        return Resolved::Poisoned;
    }
    Resolved::Filter(Cow::Owned(
        rule.filter.replace("%c", client_id).replace("%u", name),
    ))
}

/// The first whitespace-separated word and the trimmed rest.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once([' ', '\t']) {
        Some((w, rest)) => (w, rest.trim()),
        None => (s, ""),
    }
}

fn parse_access(rest: &str) -> Result<(Access, &str), String> {
    let (word, after) = split_word(rest);
    let access = match word {
        "read" => Access::Read,
        "write" => Access::Write,
        "readwrite" => Access::ReadWrite,
        "deny" => Access::Deny,
        "" => return Err("missing topic".into()),
        _ => return Ok((Access::ReadWrite, rest)),
    };
    if after.is_empty() {
        return Err(format!("missing topic after {word:?}"));
    }
    Ok((access, after))
}

fn check_clientid_filter(f: &str) -> Result<(), &'static str> {
    let levels: Vec<&str> = f.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        if level.contains('#') && (*level != "#" || !last) {
            return Err("`#` must be a whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level");
        }
        if let Some(pos) = level.find('*') {
            if !last || pos + 1 != level.len() {
                return Err("`*` only at the very end");
            }
        }
    }
    Ok(())
}

/// Client id against a `clientid` filter (see the module doc).
pub fn clientid_matches(filter: &str, id: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    let mut rest = Some(id);
    for (i, fl) in levels.iter().enumerate() {
        if *fl == "#" {
            return true;
        }
        let Some(r) = rest else {
            return false;
        };
        if i + 1 == levels.len() {
            if let Some(prefix) = fl.strip_suffix('*') {
                return r.starts_with(prefix);
            }
        }
        let (level, tail) = match r.split_once('/') {
            Some((l, t)) => (l, Some(t)),
            None => (r, None),
        };
        if *fl != "+" && *fl != level {
            return false;
        }
        rest = tail;
    }
    rest.is_none()
}

fn wild_first(f: &str) -> bool {
    f.starts_with(['+', '#'])
}

/// Is every topic `filter` can match also matched by `rule`?
pub fn covers(rule: &str, filter: &str) -> bool {
    if wild_first(rule) && filter.starts_with('$') {
        return false;
    }
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(fl)) => {
                if fl == "#" {
                    return false;
                }
            }
            (Some(rl), Some(fl)) => {
                if rl != fl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Is there a topic both filters match?
pub fn overlaps(a: &str, b: &str) -> bool {
    if (wild_first(a) && b.starts_with('$')) || (wild_first(b) && a.starts_with('$')) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) => {
                if p != q {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named<'a>(name: &'a str, client_id: &'a str) -> Who<'a> {
        Who::Named { name, client_id }
    }

    const FILE: &str = "\
# anonymous
topic read public/#
topic weather/+/now

user backend
clientid backend-*
clientid %u/+
topic write push/#
topic jobs/#
topic deny jobs/secret/#

user dev42
topic write telemetry/dev42

  user   spaced name  
topic read spaced/#

pattern write devices/%c/state
pattern read users/%u/#
pattern deny devices/%c/state/locked
";

    #[test]
    fn user_blocks_and_anonymous_section() {
        let acl = Acl::parse(FILE, "acl").unwrap();
        let b = named("backend", "backend-1");
        assert!(acl.may_publish(b, "push/dev1"));
        assert!(!acl.may_subscribe(b, "push/dev1"));
        assert!(acl.may_publish(b, "jobs/a"));
        assert!(acl.may_subscribe(b, "jobs/a"));
        assert!(acl.may_subscribe(b, "jobs/a/+"));
        // `jobs/+/x` could reach the denied `jobs/secret/x`.
        assert!(!acl.may_subscribe(b, "jobs/+/x"));
        assert!(!acl.may_publish(b, "jobs/secret/x"));
        assert!(!acl.may_publish(b, "jobs/secret"));
        assert!(!acl.may_publish(b, "public/x"));
        assert!(!acl.may_publish(b, "other"));

        let a = Who::Anonymous;
        assert!(acl.may_subscribe(a, "public/#"));
        assert!(acl.may_subscribe(a, "public/a/+"));
        assert!(!acl.may_publish(a, "public/a"));
        assert!(acl.may_publish(a, "weather/x/now"));
        assert!(acl.may_subscribe(a, "weather/+/now"));
        assert!(!acl.may_subscribe(a, "weather/#"));
        // Patterns are for named clients only.
        assert!(!acl.may_publish(a, "devices/x/state"));
        // Named clients do not get the anonymous rules.
        assert!(!acl.may_subscribe(b, "public/#"));

        let d = named("dev42", "dev42");
        assert!(acl.may_publish(d, "telemetry/dev42"));
        assert!(!acl.may_publish(d, "telemetry/dev43"));
        let s = named("spaced name", "c");
        assert!(acl.may_subscribe(s, "spaced/x"));
        // Someone without a block gets the patterns only.
        let n = named("nobody", "n1");
        assert!(acl.may_publish(n, "devices/n1/state"));
        assert!(!acl.may_publish(n, "jobs/a"));
    }

    #[test]
    fn patterns_substitute_client_id_and_user() {
        let acl = Acl::parse(FILE, "acl").unwrap();
        let d = named("dev42", "dev42");
        assert!(acl.may_publish(d, "devices/dev42/state"));
        assert!(!acl.may_publish(d, "devices/dev43/state"));
        assert!(!acl.may_publish(d, "devices/dev42/state/locked"));
        assert!(acl.may_subscribe(d, "users/dev42/#"));
        assert!(!acl.may_subscribe(d, "users/#"));
        let b = named("backend", "backend-1");
        assert!(acl.may_publish(b, "devices/backend-1/state"));
        assert!(acl.may_subscribe(b, "users/backend/inbox"));
        assert!(!acl.may_subscribe(b, "users/backend-1/inbox"));
        // A client id that would become a wildcard: allow patterns do not apply, deny
        // patterns apply to everything.
        let w = named("w", "x/#");
        assert!(!acl.may_publish(w, "devices/x/y/state"));
        assert!(!acl.may_subscribe(w, "users/w/a"));
        let w = named("u+", "plain");
        assert!(!acl.may_subscribe(w, "users/u+/a"));
    }

    #[test]
    fn deny_and_cover_semantics_for_subscribe() {
        let acl = Acl::parse(
            "user u\ntopic read a/#\ntopic read b/+/c\ntopic deny a/secret\ntopic read $SYS/x\ntopic read #\ntopic deny z/#\n",
            "acl",
        )
        .unwrap();
        let u = named("u", "u");
        assert!(acl.may_subscribe(u, "a"));
        assert!(acl.may_subscribe(u, "a/b/c"));
        assert!(acl.may_subscribe(u, "b/x/c"));
        assert!(acl.may_subscribe(u, "b/+/c"));
        // Denied parts refuse the whole filter that could reach them.
        assert!(!acl.may_subscribe(u, "a/#"));
        assert!(!acl.may_subscribe(u, "a/+"));
        assert!(!acl.may_subscribe(u, "a/secret"));
        assert!(acl.may_subscribe(u, "a/secret/more"));
        assert!(!acl.may_subscribe(u, "#"));
        assert!(!acl.may_subscribe(u, "z"));
        // `#` does not reach `$` topics; `$SYS/x` is granted by its own rule only.
        assert!(acl.may_subscribe(u, "$SYS/x"));
        assert!(!acl.may_subscribe(u, "$SYS/y"));
        assert!(!acl.may_subscribe(u, "$SYS/#"));

        assert!(covers("#", "a/#"));
        assert!(covers("a/#", "a/#"));
        assert!(covers("a/#", "a"));
        assert!(!covers("a/#", "#"));
        assert!(!covers("a/+", "a/#"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+", "a"));
        assert!(!covers("a", "a/b"));
        assert!(!covers("#", "$SYS/x"));
        assert!(!covers("+/x", "$SYS/x"));

        assert!(overlaps("a/b", "a/+"));
        assert!(overlaps("a/#", "a"));
        assert!(overlaps("+/b", "a/+"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("a/b", "a/b/c"));
        assert!(!overlaps("#", "$SYS/a"));
        assert!(overlaps("$SYS/#", "$SYS/a"));
    }

    #[test]
    fn clientid_rules_with_star_and_plus() {
        let acl = Acl::parse(FILE, "acl").unwrap();
        let ok = |id| acl.clientid_allowed("backend", id);
        assert_eq!(ok("backend-1"), Some(true));
        assert_eq!(ok("backend-"), Some(true));
        assert_eq!(ok("backend-7/a"), Some(true));
        assert_eq!(ok("backend/w1"), Some(true));
        assert_eq!(ok("backend/w1/x"), Some(false));
        assert_eq!(ok("backend"), Some(false));
        assert_eq!(ok("other"), Some(false));
        assert_eq!(acl.clientid_allowed("dev42", "anything"), None);
        assert_eq!(acl.clientid_allowed("nobody", "anything"), None);

        assert!(clientid_matches("+/worker-*", "eu/worker-1"));
        assert!(!clientid_matches("+/worker-*", "worker-1"));
        assert!(clientid_matches("a/#", "a"));
        assert!(clientid_matches("a/#", "a/b/c"));
        assert!(clientid_matches("*", "x/y"));
        assert!(clientid_matches("exact", "exact"));
        assert!(!clientid_matches("exact", "exact2"));
        assert!(!clientid_matches("a/+", "a"));
        // %u with a value that would become a wildcard never matches.
        let acl = Acl::parse("user a*\nclientid %u-1\n", "acl").unwrap();
        assert_eq!(acl.clientid_allowed("a*", "a*-1"), Some(false));
        assert_eq!(acl.clientid_allowed("a*", "ab-1"), Some(false));
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("user u\ntopic\n", "acl:2: missing topic"),
            (
                "user u\ntopic read\n",
                "acl:2: missing topic after \"read\"",
            ),
            (
                "\n\ntopic a/#/b\n",
                "acl:3: \"a/#/b\" is not a valid topic filter",
            ),
            (
                "topic devices/%c\n",
                "acl:1: \"devices/%c\": %c and %u work only in `pattern` lines",
            ),
            (
                "pattern write a+/%c\n",
                "acl:1: \"a+/%c\" is not a valid topic filter",
            ),
            ("clientid x\n", "acl:1: `clientid` outside a `user` block"),
            (
                "user u\nclientid a*b\n",
                "acl:2: clientid \"a*b\": `*` only at the very end",
            ),
            (
                "user u\nclientid a*/b\n",
                "acl:2: clientid \"a*/b\": `*` only at the very end",
            ),
            (
                "user u\nclientid a#\n",
                "acl:2: clientid \"a#\": `#` must be a whole last level",
            ),
            ("user u\nclientid\n", "acl:2: `clientid` without a filter"),
            ("user\n", "acl:1: `user` without a name"),
            (
                "user u\nauth_plugin x\n",
                "acl:2: unknown directive \"auth_plugin\"",
            ),
            ("user u\nTopic a\n", "acl:2: unknown directive \"Topic\""),
        ];
        for (text, want) in cases {
            let e = Acl::parse(text, "acl").unwrap_err();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn topics_with_spaces_and_default_access() {
        let acl = Acl::parse("user u\ntopic a b/c\ntopic write x y\n", "acl").unwrap();
        let u = named("u", "u");
        assert!(acl.may_publish(u, "a b/c"));
        assert!(acl.may_subscribe(u, "a b/c"));
        assert!(acl.may_publish(u, "x y"));
        assert!(!acl.may_subscribe(u, "x y"));
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acl");
        std::fs::write(&p, FILE).unwrap();
        assert!(Acl::load(&p).unwrap().has_user("dev42"));
        std::fs::write(&p, "user u\nbogus\n").unwrap();
        let e = Acl::load(&p).unwrap_err();
        assert!(e.starts_with(&format!("{}:2: ", p.display())), "{e}");
    }
}
