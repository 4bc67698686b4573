//! What a principal may publish, read and subscribe to: the ACL's rules when there is an
//! ACL, else the device/backend split (see the parent module), and never Herald's own topic
//! spaces.

use crate::metrics::{self, Denied};

use super::acl::Who;
use super::{Auth, Principal};

impl Auth {
    /// May this principal, connected as `client_id`, publish to `topic` (a topic name, no
    /// wildcards)? A refusal is counted (`herald_acl_denied_total{action="publish"}`).
    pub fn may_publish(&self, p: &Principal, client_id: &str, topic: &str) -> bool {
        let allowed = self.publish_allowed(p, client_id, topic);
        if !allowed {
            metrics::acl_denied(Denied::Publish);
        }
        allowed
    }

    /// May it still read `topic` (a topic name) now, at delivery? Checked when a message is
    /// written, as Mosquitto does, so that an ACL reloaded with a new `deny` also stops
    /// subscriptions made before it. Not counted here: the caller counts the dropped message.
    /// A client's own push topic is always readable: every client is subscribed to it.
    pub fn may_read(&self, p: &Principal, client_id: &str, topic: &str) -> bool {
        self.is_own_push_topic(client_id, topic) || self.subscribe_allowed(p, client_id, topic)
    }

    /// May it subscribe to `filter` (may contain + and #)? A refusal is counted
    /// (`herald_acl_denied_total{action="subscribe"}`).
    pub fn may_subscribe(&self, p: &Principal, client_id: &str, filter: &str) -> bool {
        let allowed = self.subscribe_allowed(p, client_id, filter);
        if !allowed {
            metrics::acl_denied(Denied::Subscribe);
        }
        allowed
    }

    fn publish_allowed(&self, p: &Principal, client_id: &str, topic: &str) -> bool {
        if is_internal(topic) {
            return false;
        }
        if self.open {
            return true;
        }
        let files = self.files.read();
        match (&files.acl, p) {
            (None, Principal::Anonymous | Principal::User(_)) => true,
            (None, Principal::Device) => false,
            (Some(acl), p) => acl.may_publish(who(p, client_id), topic),
        }
    }

    fn subscribe_allowed(&self, p: &Principal, client_id: &str, filter: &str) -> bool {
        if is_internal(filter) {
            return false;
        }
        if self.open {
            return true;
        }
        if *p == Principal::Device && self.is_own_push_topic(client_id, filter) {
            return true;
        }
        let files = self.files.read();
        match (&files.acl, p) {
            (None, Principal::Anonymous | Principal::User(_)) => true,
            (None, Principal::Device) => false,
            (Some(acl), p) => acl.may_subscribe(who(p, client_id), filter),
        }
    }

    fn is_own_push_topic(&self, client_id: &str, filter: &str) -> bool {
        !client_id.is_empty() && self.push.owner_of_filter(filter) == Some(client_id)
    }
}

/// Whose ACL rules apply: a device's block is the one named by its identity, its client id.
fn who<'a>(p: &'a Principal, client_id: &'a str) -> Who<'a> {
    match p {
        Principal::Anonymous => Who::Anonymous,
        Principal::Device => Who::Named {
            name: client_id,
            client_id,
        },
        Principal::User(name) => Who::Named { name, client_id },
    }
}

/// Herald's own topic spaces (cluster links, internal state): never for clients.
fn is_internal(topic: &str) -> bool {
    ["$cluster", "$herald"].iter().any(|space| {
        topic
            .strip_prefix(space)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}
