//! From the key layout before streams (a ZSET outbox and a counter per client) to this one
//! (`keys`): run by every node at start until the store says it is done (`keys::LAYOUT`).
//! Nodes of the older layout must all be stopped first: they would keep writing it.
//!
//! Each client's outbox moves in one script (`scripts::MIGRATE`), same sequence numbers, so
//! a sent watermark keeps its meaning; the old counters of clients with nothing queued are
//! deleted (a stream numbers its own entries). Several nodes starting at once may each do
//! part of the work: moving a client twice is a no-op. On Redis Cluster the keys are found
//! on every primary (`Redis::scan`), and each client's script touches its own slot.

use crate::redis::keys::{self, Client};
use crate::redis::{Redis, StoreError};

/// The layout this version writes.
const LAYOUT: &str = "2";

pub(super) async fn run(redis: &Redis) -> Result<(), StoreError> {
    let done: Option<String> = redis.query(redis::cmd("GET").arg(keys::LAYOUT)).await?;
    if done.as_deref() == Some(LAYOUT) {
        return Ok(());
    }
    let (mut moved, mut clients) = (0u64, 0u64);
    let outbox = keys::client_prefix(Client::LegacyOutbox);
    let seq = keys::client_prefix(Client::LegacySeq);
    for prefix in [&outbox, &seq] {
        let mut walk = redis.scan(&format!("{prefix}*"), 1000);
        while let Some(found) = redis.scan_next(&mut walk).await? {
            for key in found {
                let Some(cid) = key
                    .strip_prefix(prefix.as_str())
                    .and_then(|r| r.strip_suffix('}'))
                else {
                    continue;
                };
                let keys = [
                    keys::client(Client::LegacyOutbox, cid),
                    keys::client(Client::LegacySeq, cid),
                    keys::client(Client::Outbox, cid),
                    keys::client(Client::Qbytes, cid),
                ];
                let n: u64 = redis.evalsha(&redis.scripts().migrate, &keys, &[]).await?;
                moved += n;
                clients += 1;
            }
        }
    }
    if clients > 0 {
        tracing::warn!(
            clients,
            messages = moved,
            "store: moved queued messages to the stream layout"
        );
    }
    redis
        .query::<()>(redis::cmd("SET").arg(keys::LAYOUT).arg(LAYOUT))
        .await
}
