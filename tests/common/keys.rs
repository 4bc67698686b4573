//! Herald's Redis key names, the one place the tests spell them: `herald:<kind>:{<client>}`
//! (the braces make every key of one client hash to the same Redis Cluster slot).
//!
//! Built here by hand because the crate does not export its key builder yet; once it has
//! `herald::redis::keys`, these functions become re-exports of it and no call site changes.

fn key(kind: &str, client: &str) -> String {
    format!("herald:{kind}:{{{client}}}")
}

/// The client's outbox: a sorted set of stored messages by sequence number.
pub fn outbox(client: &str) -> String {
    key("outbox", client)
}

/// The client's route: a hash whose field `node` names the node it is connected to.
pub fn route(client: &str) -> String {
    key("route", client)
}

/// The client's sent watermark: the highest sequence number written to its connection.
pub fn sent(client: &str) -> String {
    key("sent", client)
}
