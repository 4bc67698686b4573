//! Which copy of a client's keys the store serves. A failover may promote a replica that
//! missed the last writes (even with `redis_wait_replicas`: a write the replica missed was
//! not acknowledged to its publisher, but a device may have read it). The stream on the
//! promoted replica then gives new entries the numbers of the lost ones, so a connection
//! that read a lost entry must stop acknowledging by number: its PUBACK would delete the
//! newer entry that has the same number.
//!
//! The lineage of a client's keys changes whenever that can have happened: on a cluster,
//! when a slot's primary becomes a node that was not a primary before (a promoted replica,
//! not a migration, which moves the keys themselves); on one server, when the server that
//! answers after an outage is another one or was restarted (its `run_id`). A session keeps
//! the lineage it attached under; one whose lineage changed ends instead of acknowledging,
//! and its device reconnects and reads its outbox as it now is (with DUP where due).

use std::sync::atomic::{AtomicU16, Ordering};

use super::keys;
use super::slots::{SlotMap, SLOTS};

/// 16 bits: a session keeps one, and an idle session's task must stay within tokio's
/// 384-byte block (tests/footprint.rs); only equality matters, so wrapping is harmless
/// unless exactly 65,536 failovers come between a connection's attach and its next ack.
pub(crate) struct Lineage {
    /// One per hash slot on a cluster; one for everything on one server.
    slots: Box<[AtomicU16]>,
}

impl Lineage {
    pub(super) fn server() -> Lineage {
        Lineage::of_len(1)
    }

    pub(super) fn cluster() -> Lineage {
        Lineage::of_len(SLOTS)
    }

    fn of_len(n: usize) -> Lineage {
        Lineage {
            slots: (0..n).map(|_| AtomicU16::new(0)).collect(),
        }
    }

    /// The lineage `client`'s keys are in now.
    pub(crate) fn of(&self, client: &str) -> u16 {
        let i = match self.slots.len() {
            1 => 0,
            _ => keys::client_slot(client).map_or(0, usize::from),
        };
        self.slots[i].load(Ordering::Acquire)
    }

    /// The server was replaced or restarted: every key may have lost writes.
    pub(super) fn replaced(&self) {
        for s in self.slots.iter() {
            s.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The slot map changed from `old` to `new`: a slot whose primary is now a node that was
    /// no primary in `old` may have lost writes. Returns how many slots that is.
    pub(super) fn follow(&self, old: &SlotMap, new: &SlotMap) -> usize {
        let mut changed = 0;
        for (slot, lineage) in self.slots.iter().enumerate() {
            let slot = slot as u16;
            let Some(primary) = new.primary(slot) else {
                continue;
            };
            if old.primary(slot) != Some(primary) && old.shard_by_primary(primary).is_none() {
                lineage.fetch_add(1, Ordering::AcqRel);
                changed += 1;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn node(port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(b"127.0.0.1".to_vec()),
            Value::Int(port),
        ])
    }

    /// A map of `(start, end, primary port, replica port)` ranges.
    fn map(ranges: &[(i64, i64, i64, i64)]) -> SlotMap {
        let reply = Value::Array(
            ranges
                .iter()
                .map(|&(s, e, p, r)| {
                    Value::Array(vec![Value::Int(s), Value::Int(e), node(p), node(r)])
                })
                .collect(),
        );
        SlotMap::from_cluster_slots(&reply, "127.0.0.1").expect("map")
    }

    fn client_in(slot: u16) -> String {
        (0..)
            .map(|i| format!("c{i}"))
            .find(|c| keys::client_slot(c) == Some(slot))
            .expect("some id hashes to the slot")
    }

    #[test]
    fn a_promoted_replica_changes_its_slots_and_a_migration_does_not() {
        let lineage = Lineage::cluster();
        let before = map(&[(0, 8191, 7000, 7001), (8192, 16383, 7002, 7003)]);
        assert_eq!(lineage.follow(&SlotMap::empty(), &before), SLOTS);
        let (low, high) = (client_in(100), client_in(9000));
        let (l0, h0) = (lineage.of(&low), lineage.of(&high));
        // 7001 takes over from 7000.
        let failover = map(&[(0, 8191, 7001, 7000), (8192, 16383, 7002, 7003)]);
        assert_eq!(lineage.follow(&before, &failover), 8192);
        assert_eq!(lineage.of(&low), l0 + 1);
        assert_eq!(lineage.of(&high), h0);
        // Slot 100 moves to the other primary, keys and all.
        let migrated = map(&[
            (0, 99, 7001, 7000),
            (100, 100, 7002, 7003),
            (101, 8191, 7001, 7000),
            (8192, 16383, 7002, 7003),
        ]);
        assert_eq!(lineage.follow(&failover, &migrated), 0);
        assert_eq!(lineage.of(&low), l0 + 1);
    }

    #[test]
    fn a_replaced_server_changes_everything() {
        let lineage = Lineage::server();
        let before = lineage.of("a");
        lineage.replaced();
        assert_eq!(lineage.of("a"), before + 1);
        assert_eq!(lineage.of("b"), before + 1);
    }
}
