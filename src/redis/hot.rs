//! The hot path's own connections: one per outbox writer task, speaking RESP through
//! `resp` (pipelines encoded in place, replies read in place).

use super::endpoint::Endpoint;
use super::{resp, Health, StoreError, CALL_TIMEOUT};
use crate::metrics;
use std::sync::Arc;

/// A hot-path connection of one writer task: made on first use, dropped after any failure,
/// and made again after an outage (the server may have restarted or changed).
pub(crate) struct Hot {
    endpoint: Arc<Endpoint>,
    conn: Option<resp::Conn>,
    epoch: u64,
}

impl Hot {
    pub(super) fn new(endpoint: &Arc<Endpoint>) -> Hot {
        Hot {
            endpoint: endpoint.clone(),
            conn: None,
            epoch: 0,
        }
    }

    /// One pipeline of `replies` commands, under the call timeout. Any failure drops the
    /// connection and marks the store down.
    pub(crate) async fn round_trip(
        &mut self,
        out: &[u8],
        replies: usize,
        health: &Health,
    ) -> Result<&[u8], StoreError> {
        let Hot {
            endpoint,
            conn,
            epoch,
        } = self;
        let attempt = async {
            let now = endpoint.epoch();
            let c = match conn {
                Some(c) if *epoch == now => c,
                _ => {
                    *conn = None;
                    let fresh =
                        resp::Conn::connect(&endpoint.info(), endpoint.tls.as_ref()).await?;
                    *epoch = now;
                    conn.insert(fresh)
                }
            };
            c.round_trip(out, replies).await
        };
        let why = match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("redis call timed out".to_string()),
        };
        match why {
            None => match conn {
                Some(c) => Ok(c.replies()),
                None => Err(StoreError::Unavailable("redis connection lost".into())),
            },
            Some(why) => {
                *conn = None;
                health.mark_down(&why);
                metrics::store_error();
                Err(StoreError::Unavailable(why))
            }
        }
    }

    /// Redis answered out of step with what was asked: nothing on this connection can be
    /// trusted any more.
    pub(crate) fn out_of_step(&mut self, health: &Health, e: resp::Error) -> StoreError {
        self.conn = None;
        let why = e.to_string();
        health.mark_down(&why);
        metrics::store_error();
        StoreError::Unavailable(why)
    }
}
