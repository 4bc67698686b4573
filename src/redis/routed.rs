//! The hot path on a Redis Cluster: one pipeline of single-slot commands (`Part`s) split by
//! the node that serves each slot, sent to every node at once over connections of its own,
//! redirects followed, and the replies put back in the pipeline's order, so that the writer
//! reads them exactly as it reads one server's.
//!
//! Order: a client's commands are in one slot, so on one node, in the pipeline's order. A
//! redirected command is sent again before the round trip ends, and Redis answers MOVED,
//! ASK or TRYAGAIN before it runs a command, so nothing runs twice or out of turn.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::endpoint::Endpoint;
use super::resp::{self, Replies, Reply};
use super::slots::{parse_redirect, Addr, Redirect};
use super::Health;

/// One command of a hot pipeline: where it ends in the buffer, and the slot of its keys.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Part {
    pub(crate) slot: u16,
    pub(crate) end: usize,
}

/// How often one command may be redirected within one round trip (a slot that moves on
/// while it is being followed, a migration's ASK then MOVED).
const REDIRECTS: usize = 5;

/// Pause before sending commands that got TRYAGAIN (a multi-key command on a slot whose
/// keys are half migrated) again.
const TRYAGAIN_PAUSE: Duration = Duration::from_millis(20);

/// The cluster side of one writer task's hot connection.
#[derive(Default)]
pub(super) struct Routed {
    nodes: HashMap<Addr, resp::Conn>,
    /// The endpoint's connection generation the connections belong to.
    epoch: u64,
    /// The replies, in the pipeline's order.
    merged: Vec<u8>,
}

/// Where each part goes next: its node, and whether an ASK sent it there.
#[derive(Clone)]
struct Target {
    node: Addr,
    asking: bool,
}

impl Routed {
    /// Sends `out` (one command per part) and returns the replies in `out`'s order; with
    /// `wait`, each node's pipeline ends in WAIT and one integer reply follows the parts:
    /// the fewest replicas any node confirmed.
    pub(super) async fn round_trip(
        &mut self,
        endpoint: &Arc<Endpoint>,
        out: &[u8],
        parts: &[Part],
        wait: u32,
        health: &Health,
    ) -> Result<&[u8], String> {
        if self.epoch != endpoint.epoch() {
            self.nodes.clear();
            self.epoch = endpoint.epoch();
        }
        let mut map = endpoint.slots().ok_or("not a redis cluster")?;
        let mut targets = Vec::with_capacity(parts.len());
        for p in parts {
            if map.primary(p.slot).is_none() {
                map = endpoint.refresh_slots().await.map_err(|e| e.to_string())?;
            }
            let node = map
                .primary(p.slot)
                .ok_or_else(|| format!("slot {} is not served", p.slot))?;
            targets.push(Target {
                node: node.clone(),
                asking: false,
            });
        }
        let mut replies: Vec<Option<Vec<u8>>> = vec![None; parts.len()];
        let mut todo: Vec<usize> = (0..parts.len()).collect();
        let mut fewest = u64::MAX;
        for round in 0..=REDIRECTS {
            let mut by_node: BTreeMap<Addr, Vec<usize>> = BTreeMap::new();
            for &i in &todo {
                by_node.entry(targets[i].node.clone()).or_default().push(i);
            }
            let sent = by_node.into_iter().map(|(node, idx)| {
                let mut buf = BytesMut::new();
                let mut n = 0;
                for &i in &idx {
                    if targets[i].asking {
                        resp::array(&mut buf, 1);
                        resp::bulk(&mut buf, b"ASKING");
                        n += 1;
                    }
                    let start = if i == 0 { 0 } else { parts[i - 1].end };
                    buf.extend_from_slice(&out[start..parts[i].end]);
                    n += 1;
                }
                if wait > 0 {
                    resp::array(&mut buf, 3);
                    resp::bulk(&mut buf, b"WAIT");
                    resp::bulk_u64(&mut buf, wait as u64);
                    resp::bulk_u64(&mut buf, super::CALL_TIMEOUT.as_millis() as u64 / 2);
                    n += 1;
                }
                let conn = self.nodes.remove(&node);
                let info = endpoint.node_info(&node);
                async move {
                    let mut conn = match conn {
                        Some(c) => c,
                        None => resp::Conn::connect(&info, endpoint.tls.as_ref())
                            .await
                            .map_err(|e| format!("{node}: {e}"))?,
                    };
                    conn.round_trip(&buf, n)
                        .await
                        .map_err(|e| format!("{node}: {e}"))?;
                    Ok::<_, String>((node, idx, conn))
                }
            });
            let answered = futures::future::join_all(sent).await;
            let mut next = Vec::new();
            let (mut moved, mut again) = (false, false);
            let mut failed = None;
            for a in answered {
                let (node, idx, conn) = match a {
                    Ok(done) => done,
                    Err(e) => {
                        failed.get_or_insert(e);
                        continue;
                    }
                };
                let parsed = read_node(conn.replies(), &node, &idx, &targets, wait > 0);
                match parsed {
                    Ok(got) => {
                        for (i, reply) in got.replies {
                            match reply {
                                Answer::Done(bytes) => replies[i] = Some(bytes),
                                Answer::Moved(to) => {
                                    moved = true;
                                    targets[i] = Target {
                                        node: to,
                                        asking: false,
                                    };
                                    next.push(i);
                                }
                                Answer::Ask(to) => {
                                    targets[i] = Target {
                                        node: to,
                                        asking: true,
                                    };
                                    next.push(i);
                                }
                                Answer::TryAgain => {
                                    again = true;
                                    targets[i].asking = false;
                                    next.push(i);
                                }
                            }
                        }
                        if let Some(w) = got.waited {
                            fewest = fewest.min(w);
                        }
                        self.nodes.insert(node, conn);
                    }
                    Err(e) => {
                        failed.get_or_insert(format!("{node}: {e}"));
                    }
                }
            }
            if let Some(e) = failed {
                // A node that failed or answered out of step: its connection is dropped (not
                // put back), and the store is down until `health_loop` finds the cluster
                // whole again.
                health.mark_down(&e);
                return Err(e);
            }
            if next.is_empty() {
                break;
            }
            next.sort_unstable();
            todo = next;
            if round == REDIRECTS {
                break;
            }
            if moved {
                let _ = endpoint.refresh_slots().await;
            }
            if again {
                tokio::time::sleep(TRYAGAIN_PAUSE).await;
            }
        }
        self.merged.clear();
        for r in replies {
            match r {
                Some(bytes) => self.merged.extend_from_slice(&bytes),
                None => self
                    .merged
                    .extend_from_slice(b"-TRYAGAIN the slot kept moving\r\n"),
            }
        }
        if wait > 0 {
            let w = if fewest == u64::MAX { 0 } else { fewest };
            self.merged
                .extend_from_slice(format!(":{w}\r\n").as_bytes());
        }
        Ok(&self.merged)
    }
}

enum Answer {
    Done(Vec<u8>),
    Moved(Addr),
    Ask(Addr),
    TryAgain,
}

struct NodeReplies {
    replies: Vec<(usize, Answer)>,
    waited: Option<u64>,
}

/// Splits one node's replies by part (`idx`, in the order sent), skipping ASKING's.
fn read_node(
    buf: &[u8],
    node: &Addr,
    idx: &[usize],
    targets: &[Target],
    waited: bool,
) -> Result<NodeReplies, resp::Error> {
    let mut pos = 0;
    let mut out = Vec::with_capacity(idx.len());
    let next_reply = |pos: &mut usize| -> Result<(usize, usize), resp::Error> {
        let start = *pos;
        let end = resp::complete(buf, start)?
            .ok_or_else(|| resp::Error::Protocol("reply ended early".into()))?;
        *pos = end;
        Ok((start, end))
    };
    for &i in idx {
        if targets[i].asking {
            next_reply(&mut pos)?;
        }
        let (start, end) = next_reply(&mut pos)?;
        let reply = &buf[start..end];
        let answer = match reply.strip_prefix(b"-") {
            Some(e) if e.starts_with(b"TRYAGAIN") => Answer::TryAgain,
            Some(e) => match parse_redirect(e) {
                Some(Redirect::Moved { to, .. }) => Answer::Moved(answering(to, node)),
                Some(Redirect::Ask { to, .. }) => Answer::Ask(answering(to, node)),
                None => Answer::Done(reply.to_vec()),
            },
            None => Answer::Done(reply.to_vec()),
        };
        out.push((i, answer));
    }
    let waited = if waited {
        let mut r = Replies::new(&buf[pos..]);
        match r.next()? {
            Reply::Int(n) => Some(n.max(0) as u64),
            _ => Some(0),
        }
    } else {
        None
    };
    Ok(NodeReplies {
        replies: out,
        waited,
    })
}

/// A redirect's target; an empty host is the node that answered.
fn answering(to: Addr, node: &Addr) -> Addr {
    if to.host.is_empty() {
        Addr::new(node.host.clone(), to.port)
    } else {
        to
    }
}
