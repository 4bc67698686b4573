//! `[push]`: the push topic every client is subscribed to.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Subscribe every client to its own push topic on CONNECT.
    pub enabled: bool,
    /// Must contain `{client_id}` exactly once.
    pub topic_template: String,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: true,
            topic_template: "push/{client_id}".into(),
        }
    }
}
