//! The hot path's own connections: one per outbox writer task, speaking RESP through
//! `resp` (pipelines encoded in place, replies read in place); on a Redis Cluster, one per
//! node (`routed`).

use bytes::BytesMut;

use super::endpoint::Endpoint;
use super::routed::{Part, Routed};
use super::{resp, Health, StoreError, CALL_TIMEOUT};
use crate::metrics;
use std::sync::Arc;

/// A hot-path connection of one writer task: made on first use, dropped after any failure,
/// and made again after an outage (the server may have restarted or changed).
pub(crate) struct Hot {
    endpoint: Arc<Endpoint>,
    conn: Option<resp::Conn>,
    epoch: u64,
    /// Redis Cluster only.
    routed: Option<Box<Routed>>,
}

impl Hot {
    pub(super) fn new(endpoint: &Arc<Endpoint>) -> Hot {
        Hot {
            endpoint: endpoint.clone(),
            conn: None,
            epoch: 0,
            routed: endpoint.is_cluster().then(Box::default),
        }
    }

    /// See `Redis::lineage`.
    pub(crate) fn lineage(&self, client: &str) -> u16 {
        self.endpoint.lineage.of(client)
    }

    /// Whether commands must be split by slot (`round_trip_parts`).
    pub(crate) fn is_cluster(&self) -> bool {
        self.routed.is_some()
    }

    /// `out` holds one command per part, each on keys of one slot (`parts[i].end` is where
    /// command `i` ends); with `wait`, the writes are confirmed by that many replicas
    /// (Redis `WAIT`), and one integer reply follows: how many did. On one server this is
    /// `round_trip`; on a cluster, one pipeline per node (`routed`). Replies come back in
    /// `out`'s order either way.
    pub(crate) async fn round_trip_parts(
        &mut self,
        out: &mut BytesMut,
        parts: &[Part],
        wait: u32,
        health: &Health,
    ) -> Result<&[u8], StoreError> {
        if self.routed.is_none() {
            let mut replies = parts.len();
            if wait > 0 {
                resp::array(out, 3);
                resp::bulk(out, b"WAIT");
                resp::bulk_u64(out, wait as u64);
                resp::bulk_u64(out, CALL_TIMEOUT.as_millis() as u64 / 2);
                replies += 1;
            }
            return self.round_trip(out, replies, health).await;
        }
        let Some(routed) = self.routed.as_mut() else {
            unreachable!("checked above")
        };
        let attempt = routed.round_trip(&self.endpoint, out, parts, wait, health);
        match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
            Ok(Ok(buf)) => Ok(buf),
            Ok(Err(why)) => {
                metrics::store_error();
                Err(StoreError::Unavailable(why))
            }
            Err(_) => {
                // The connections that were out are gone with the future.
                let why = "redis call timed out";
                health.mark_down(why);
                metrics::store_error();
                Err(StoreError::Unavailable(why.into()))
            }
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
            ..
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
        if let Some(r) = self.routed.as_mut() {
            **r = Routed::default();
        }
        let why = e.to_string();
        health.mark_down(&why);
        metrics::store_error();
        StoreError::Unavailable(why)
    }
}
