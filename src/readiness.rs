//! Whether this node should be given new devices (`GET /readyz`): it has finished starting
//! (in a cluster: registered in Redis), its store answers (the Redis store's active probe,
//! `redis::Health`), and it is not draining.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::redis::Health;

#[derive(Default)]
pub struct Readiness {
    started: AtomicBool,
    draining: AtomicBool,
    /// The Redis store's health, once connected; none for the memory store.
    store: OnceLock<Arc<Health>>,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// Follows the Redis store's health from now on.
    pub fn watch_store(&self, health: Arc<Health>) {
        let _ = self.store.set(health);
    }

    /// The node serves: listeners bound, store reached, registered in its cluster.
    pub fn started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Leaves the readiness set for good. False if it was draining already.
    pub fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::AcqRel)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn store_up(&self) -> bool {
        self.store.get().is_none_or(|h| h.is_up())
    }

    /// `Err` with the reason while not ready.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.is_draining() {
            Err("draining")
        } else if !self.started.load(Ordering::Acquire) {
            Err("starting (not registered in the cluster yet)")
        } else if !self.store_up() {
            Err("store down")
        } else {
            Ok(())
        }
    }
}
