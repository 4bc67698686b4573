//! Herald's Redis key names for the tests: the crate's own schema (`herald::redis::keys`),
//! so that no test spells a key.

use herald::redis::keys::{self, Client};

/// The client's outbox: a stream of stored messages, entry ids `0-<sequence number>`.
pub fn outbox(client: &str) -> String {
    keys::client(Client::Outbox, client)
}

/// The client's route: a hash whose field `node` names the node it is connected to.
pub fn route(client: &str) -> String {
    keys::client(Client::Route, client)
}

/// The client's sent watermark: the highest sequence number written to its connection.
pub fn sent(client: &str) -> String {
    keys::client(Client::Sent, client)
}

/// A node's receipt hook stream: the final states its webhook poster has yet to POST.
pub fn hooks(node: &str) -> String {
    herald::redis::keys::hooks(node)
}

/// The set of nodes that have a hook stream (another node posts a dead one's).
pub fn hook_nodes() -> &'static str {
    herald::redis::keys::HOOK_NODES
}
