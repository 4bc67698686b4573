//! The sweep: the cluster's repair of lost hints. Every `cluster.sweep_interval` it closes
//! local connections whose client connected to another node since (a lost kick), and wakes
//! those whose outbox holds entries they were not told about (a lost forward).

use super::{Cluster, Local};
use crate::mailbox::Kick;
use crate::metrics;

/// Clients read from Redis per pipeline.
const CHUNK: usize = 500;

impl Cluster {
    pub(super) async fn sweep(&self, local: &dyn Local) {
        let conns = local.connections();
        for chunk in conns.chunks(CHUNK) {
            let ids: Vec<_> = chunk.iter().map(|c| c.client.clone()).collect();
            let names: Vec<&str> = ids.iter().map(|c| &**c).collect();
            // The route table and the outboxes have different owners: two pipelines, sent
            // together, so the sweep waits one round trip per chunk, as with one pipeline.
            let (Ok(routes), Ok(newest)) = futures::join!(self.routes(&ids), local.newest(&names))
            else {
                return;
            };
            for ((c, route), newest) in chunk.iter().zip(routes).zip(newest) {
                let moved = route.is_some_and(|rt| {
                    (*rt.node != *self.id || rt.inc != self.inc) && rt.epoch > c.epoch
                });
                if moved {
                    metrics::remote_kick();
                    c.mailbox.kick(Kick::Takeover);
                } else if newest > c.mailbox.seen() {
                    metrics::sweep_wakeup();
                    c.mailbox.reread();
                }
            }
        }
    }
}
