//! The QoS 1 publisher of push, push-rate, drain and login-storm: stamped messages
//! round-robin to the devices' push topics, bounded by a window of PUBACKs and by the
//! delivery lag.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{self, now_ns, Hello, Ignore, Target};
use crate::report::ScenarioResult;
use crate::Opts;

use super::devices::{device_id, Deliveries};
use super::{open_retry, Fleet};

/// Set in the sequence number of warm-up messages (`--warmup`), which devices count apart.
pub(super) const WARMUP: u64 = 1 << 63;

pub(super) struct PubPlan {
    /// Messages go to push/<prefix><seq % devices>.
    pub(super) devices: usize,
    /// Added to the sequence number in the payload (`WARMUP` for warm-up messages; a
    /// multiple of `devices` otherwise, since the topic follows the count of messages sent).
    pub(super) seq_base: u64,
    /// Stop after this many messages...
    pub(super) count: Option<u64>,
    /// ...or after this long.
    pub(super) duration: Option<Duration>,
    /// Offered rate (msgs/s); None: as fast as the window allows.
    pub(super) rate: Option<f64>,
    /// Unacknowledged (no PUBACK yet) messages at most.
    pub(super) window: u64,
    /// Published but not yet delivered to a device, at most (None: no bound).
    pub(super) max_lag: Option<u64>,
    pub(super) payload: usize,
    /// ...or when this is cancelled.
    pub(super) stop: Option<CancellationToken>,
}

#[derive(Default)]
pub(super) struct PubStats {
    pub(super) sent: u64,
    pub(super) acked: u64,
    pub(super) start_ns: u64,
    pub(super) send_end_ns: u64,
    pub(super) acked_ns: u64,
    /// Largest number of messages the sender was behind the offered rate.
    pub(super) max_behind: u64,
    pub(super) error: Option<String>,
}

/// Publishes QoS 1 stamped messages round-robin to the devices' push topics, waits for
/// every PUBACK.
pub(super) async fn publish_qos1(
    o: &Opts,
    target: &Target,
    plan: PubPlan,
    d: &Arc<Deliveries>,
) -> PubStats {
    let mut st = PubStats::default();
    let id = format!("bench-pub-{}", std::process::id());
    let hello = Hello {
        client_id: &id,
        clean: true,
        keep_alive: 0,
        subscribe: None,
        login: o.login(),
    };
    let fleet = Fleet::default();
    let Some(c) = open_retry(o, target, usize::MAX / 2, &hello, &mut Ignore, 4096, &fleet).await
    else {
        st.error = Some(format!("publisher: {:?}", fleet.errors.lock().unwrap()));
        return st;
    };
    let (mut rd, mut wr) = c.into_stream().into_split();
    let acked = Arc::new(AtomicU64::new(0));
    let ack_notify = Arc::new(Notify::new());
    // With a `Track` (http), the PUBACK time of each message: a PUBACK names its packet id
    // only, so the writer notes which sequence number each id was last given to (the window
    // is below 65,535, so an id is acknowledged before it is given again).
    let seq_of_pkid: Option<Arc<Vec<AtomicU64>>> = d
        .track
        .is_some()
        .then(|| Arc::new((0..=u16::MAX).map(|_| AtomicU64::new(0)).collect()));
    let reader = {
        let (acked, ack_notify) = (acked.clone(), ack_notify.clone());
        let (d, seq_of_pkid) = (d.clone(), seq_of_pkid.clone());
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                buf.reserve(16 * 1024);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => return "publisher: closed by the broker".to_string(),
                    Ok(_) => {}
                    Err(e) => return format!("publisher read: {e}"),
                }
                let now = now_ns();
                let mut n = 0;
                let mut off = 0;
                loop {
                    match client::parse(&buf[off..]) {
                        Ok(Some((p, len))) => {
                            off += len;
                            if let client::Packet::PubAck(pkid) = p {
                                n += 1;
                                if let (Some(t), Some(seqs)) = (&d.track, &seq_of_pkid) {
                                    t.acked(seqs[usize::from(pkid)].load(Relaxed), now);
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return format!("publisher: {e}"),
                    }
                }
                buf.advance(off);
                if n > 0 {
                    acked.fetch_add(n, Relaxed);
                    ack_notify.notify_one();
                }
            }
        })
    };

    let topics: Vec<Vec<u8>> = (0..plan.devices)
        .map(|i| format!("push/{}", device_id(o, i)).into_bytes())
        .collect();
    let window = plan.window.clamp(1, 60_000);
    let batch_max: u64 = 512;
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let start = Instant::now();
    st.start_ns = now_ns();
    let mut sent: u64 = 0;
    loop {
        let elapsed = start.elapsed();
        if plan.count.is_some_and(|c| sent >= c)
            || plan.duration.is_some_and(|d| elapsed >= d)
            || plan.stop.as_ref().is_some_and(|s| s.is_cancelled())
        {
            break;
        }
        let in_flight = sent - acked.load(Relaxed);
        let mut room = window.saturating_sub(in_flight);
        if let Some(lag) = plan.max_lag {
            let behind = sent.saturating_sub(d.delivered.load(Relaxed));
            room = room.min(lag.saturating_sub(behind));
        }
        if let Some(c) = plan.count {
            room = room.min(c - sent);
        }
        if let Some(rate) = plan.rate {
            // Messages whose scheduled time has come.
            let due = (elapsed.as_secs_f64() * rate) as u64 + 1;
            let behind = due.saturating_sub(sent);
            st.max_behind = st.max_behind.max(behind.saturating_sub(1));
            if behind == 0 {
                let next = start + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(next).await;
                continue;
            }
            room = room.min(behind);
        }
        // Without a rate, write only once a good batch fits: a broker that acknowledges one
        // message per segment would otherwise cost a write per message here.
        let min_batch = if plan.rate.is_some() || sent == acked.load(Relaxed) {
            1
        } else {
            (window / 16).clamp(1, 64)
        };
        if room < min_batch {
            // Wait for a PUBACK or a delivery, whichever bounds us.
            tokio::select! {
                _ = ack_notify.notified() => {}
                _ = d.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if reader.is_finished() {
                break;
            }
            continue;
        }
        let batch = room.min(batch_max);
        let ts = now_ns();
        for _ in 0..batch {
            let topic = &topics[(sent % plan.devices as u64) as usize];
            let pkid = (sent % 65535) as u16 + 1;
            let seq = plan.seq_base + sent;
            if let Some(seqs) = &seq_of_pkid {
                seqs[usize::from(pkid)].store(seq, Relaxed);
            }
            client::encode_publish(&mut wbuf, topic, 1, pkid, ts, seq, plan.payload);
            sent += 1;
        }
        if let Err(e) = wr.write_all(&wbuf).await {
            st.error = Some(format!("publisher write: {e}"));
            break;
        }
        wbuf.clear();
    }
    st.sent = sent;
    st.send_end_ns = now_ns();
    // Every PUBACK.
    let deadline = Instant::now() + Duration::from_secs_f64(o.timeout);
    loop {
        let notified = ack_notify.notified();
        if acked.load(Relaxed) >= sent || reader.is_finished() {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    st.acked = acked.load(Relaxed);
    st.acked_ns = now_ns();
    if st.acked < sent && st.error.is_none() {
        st.error = Some(match reader.is_finished() {
            true => match reader.await {
                Ok(e) => e,
                Err(_) => "publisher reader stopped".into(),
            },
            false => format!("publisher: {} of {sent} PUBACKs", st.acked),
        });
    } else {
        reader.abort();
    }
    let _ = wr.write_all(&[0xE0, 0]).await;
    let _ = wr.shutdown().await;
    st
}

pub(super) fn report_pub(r: &mut ScenarioResult, st: &PubStats) {
    r.metric("published", st.sent as f64);
    r.metric("publisher_acked", st.acked as f64);
    let secs = (st.acked_ns - st.start_ns) as f64 / 1e9;
    if secs > 0.0 {
        // Acknowledged by the broker (stored), per second.
        r.metric("publish_rate", st.acked as f64 / secs);
    }
    if let Some(e) = &st.error {
        r.error(e.clone());
    }
}
