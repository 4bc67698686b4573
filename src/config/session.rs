//! `[session]`: what each client's session may hold.

use std::time::Duration;

use serde::Deserialize;

use super::values::byte_size;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Unacknowledged outbound QoS 1/2 messages per connection; the rest wait in order.
    pub max_inflight: usize,
    /// Outbox cap per client (messages waiting for a PUBACK, online or offline).
    pub max_queued_messages: usize,
    /// What happens to a message for a full outbox.
    pub overflow: OverflowPolicy,
    /// Live messages waiting in a connection's mailbox before QoS 0 ones are dropped.
    pub max_mailbox: usize,
    /// The same bound in bytes (topic + payload). A single message larger than this is
    /// still taken by an empty mailbox.
    #[serde(deserialize_with = "byte_size")]
    pub max_mailbox_bytes: usize,
    /// Filters one client may hold (its push topic aside); SUBSCRIBE beyond it gets 0x80.
    pub max_subscriptions: usize,
    /// Outbox cap per client in bytes (topic + payload), next to `max_queued_messages`;
    /// `overflow` says what gives way.
    #[serde(deserialize_with = "byte_size")]
    pub max_queued_bytes: usize,
    /// Stored messages expire after this long (0 = never).
    #[serde(with = "humantime_serde")]
    pub message_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    DropOldest,
    DropNew,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_inflight: 32,
            max_queued_messages: 1000,
            overflow: OverflowPolicy::DropOldest,
            max_mailbox: 1000,
            max_mailbox_bytes: 512 * 1024,
            max_subscriptions: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            message_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}
