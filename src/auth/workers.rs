//! The blocking pool that argon2 hashes and public-key signatures run on, so that a storm
//! of logins queues here instead of stalling the async workers (see the parent module).

use std::sync::Arc;

use tokio::sync::Semaphore;

/// The blocking pool for argon2 and public-key signatures, bounded by a semaphore.
pub(super) struct Workers {
    pub(super) permits: usize,
    semaphore: Arc<Semaphore>,
    /// Jobs running now and the most ever seen at once (checked by a test).
    #[cfg(test)]
    pub(super) running: Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>,
}

impl Workers {
    pub(super) fn new(permits: usize) -> Workers {
        let permits = permits.max(1);
        Workers {
            permits,
            semaphore: Arc::new(Semaphore::new(permits)),
            #[cfg(test)]
            running: Default::default(),
        }
    }

    /// One permit per core but one, and at least one.
    pub(super) fn default_permits() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .saturating_sub(1)
            .max(1)
    }

    /// Runs `job` on the blocking pool once a permit is free. The permit goes with the job,
    /// so a login abandoned while its hash runs still holds its place until the hash ends.
    /// None if the job panicked.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let permit = self.semaphore.clone().acquire_owned().await.ok()?;
        #[cfg(test)]
        let running = self.running.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            #[cfg(test)]
            {
                use std::sync::atomic::Ordering;
                let now = running.0.fetch_add(1, Ordering::SeqCst) + 1;
                running.1.fetch_max(now, Ordering::SeqCst);
            }
            let out = job();
            #[cfg(test)]
            running.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            out
        })
        .await
        .ok()
    }
}
