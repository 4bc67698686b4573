//! What one node tells another, and its bytes: each frame is the payload of a PUBLISH on
//! an internal topic of the node-to-node link (see `link`). Big-endian:
//! - `$cluster/push`: inc u64, seq u64, client id (u16 length + bytes), envelope;
//! - `$cluster/pub`: inc u64, envelope;
//! - `$cluster/kick`: inc u64, epoch u64, client id (the rest).
//!
//! The envelope is the message's one binary form (`Message::put_envelope`), the same one
//! the Redis outbox stores. `inc` is the incarnation the frame is meant for, so a restarted
//! peer ignores what was addressed to its previous life.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec;
use crate::message::{ClientId, Message, Qos};

const TOPIC_PUSH: &str = "$cluster/push";
const TOPIC_PUB: &str = "$cluster/pub";
const TOPIC_KICK: &str = "$cluster/kick";

#[derive(Debug, Clone)]
pub enum Frame {
    /// A message already in `client`'s outbox as `seq`, delivered at `qos`: a hint, so
    /// losing it only delays the message (the sweep or a reconnect recovers it).
    Push {
        target_inc: u64,
        client: ClientId,
        seq: u64,
        qos: Qos,
        msg: Arc<Message>,
    },
    /// An ordinary-topic publish for the peer's own subscribers; at QoS 1 or 2 the peer's
    /// PUBACK means it stored the message for them.
    Publish { target_inc: u64, msg: Message },
    /// Close your connection of `client` unless it is newer than `epoch`.
    Kick {
        target_inc: u64,
        client: ClientId,
        epoch: u64,
    },
}

impl Frame {
    /// What the link's byte budget counts for a frame.
    pub(super) fn size(&self) -> usize {
        match self {
            Frame::Push { client, msg, .. } => client.len() + msg.size(),
            Frame::Publish { msg, .. } => msg.size(),
            Frame::Kick { client, .. } => client.len(),
        }
    }

    /// Appends the frame as a PUBLISH to `out`; `body` is scratch space.
    pub(super) fn encode(&self, out: &mut BytesMut, body: &mut BytesMut, pkid: u16) {
        body.clear();
        let (topic, qos) = match self {
            Frame::Push {
                target_inc,
                client,
                seq,
                qos,
                msg,
            } => {
                body.put_u64(*target_inc);
                body.put_u64(*seq);
                body.put_u16(client.len() as u16);
                body.put_slice(client.as_bytes());
                msg.put_envelope(body, *qos);
                (TOPIC_PUSH, Qos::AtMostOnce)
            }
            Frame::Publish { target_inc, msg } => {
                body.put_u64(*target_inc);
                msg.put_envelope(body, msg.qos);
                (TOPIC_PUB, msg.qos.min(Qos::AtLeastOnce))
            }
            Frame::Kick {
                target_inc,
                client,
                epoch,
            } => {
                body.put_u64(*target_inc);
                body.put_u64(*epoch);
                body.put_slice(client.as_bytes());
                (TOPIC_KICK, Qos::AtMostOnce)
            }
        };
        codec::encode_publish(out, topic, body, qos, pkid, false, false);
    }

    pub(super) fn decode(topic: &str, mut b: Bytes) -> Option<Frame> {
        fn utf8(b: &[u8]) -> Option<ClientId> {
            std::str::from_utf8(b).ok().map(Arc::from)
        }
        match topic {
            TOPIC_PUSH => {
                if b.remaining() < 8 + 8 + 2 {
                    return None;
                }
                let target_inc = b.get_u64();
                let seq = b.get_u64();
                let n = usize::from(b.get_u16());
                if b.remaining() < n {
                    return None;
                }
                let client = utf8(&b.split_to(n))?;
                let mut msg = Message::from_envelope(b)?;
                msg.forwarded = true;
                Some(Frame::Push {
                    target_inc,
                    client,
                    seq,
                    qos: msg.qos,
                    msg: Arc::new(msg),
                })
            }
            TOPIC_PUB => {
                if b.remaining() < 8 {
                    return None;
                }
                let target_inc = b.get_u64();
                let mut msg = Message::from_envelope(b)?;
                msg.forwarded = true;
                Some(Frame::Publish { target_inc, msg })
            }
            TOPIC_KICK => {
                if b.remaining() < 16 {
                    return None;
                }
                let target_inc = b.get_u64();
                let epoch = b.get_u64();
                Some(Frame::Kick {
                    target_inc,
                    epoch,
                    client: utf8(&b)?,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Packet;

    fn roundtrip(f: &Frame) -> Frame {
        let (mut out, mut body) = (BytesMut::new(), BytesMut::new());
        f.encode(&mut out, &mut body, 9);
        match codec::decode(&mut out, 1 << 20) {
            Ok(Some(Packet::Publish(p))) => Frame::decode(&p.topic, p.payload).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frames_roundtrip() {
        let msg = Message {
            topic: Arc::from("push/d1"),
            payload: Bytes::from_static(b"hello"),
            qos: Qos::AtLeastOnce,
            retain: true,
            expires_at: 42,
            born_us: 0,
            forwarded: false,
            receipt: true,
        };
        let push = Frame::Push {
            target_inc: 7,
            client: Arc::from("d1"),
            seq: 123,
            qos: Qos::AtLeastOnce,
            msg: Arc::new(msg.clone()),
        };
        match roundtrip(&push) {
            Frame::Push {
                target_inc: 7,
                client,
                seq: 123,
                qos: Qos::AtLeastOnce,
                msg: m,
            } => {
                assert_eq!(&*client, "d1");
                assert_eq!(
                    *m,
                    Message {
                        forwarded: true,
                        ..msg.clone()
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        match roundtrip(&Frame::Publish {
            target_inc: 1,
            msg: msg.clone(),
        }) {
            Frame::Publish { msg: m, .. } => assert_eq!(
                m,
                Message {
                    forwarded: true,
                    ..msg
                }
            ),
            other => panic!("{other:?}"),
        }
        match roundtrip(&Frame::Kick {
            target_inc: 3,
            client: Arc::from("x/y"),
            epoch: 5,
        }) {
            Frame::Kick {
                target_inc: 3,
                client,
                epoch: 5,
            } => assert_eq!(&*client, "x/y"),
            other => panic!("{other:?}"),
        }
        assert!(Frame::decode(TOPIC_PUSH, Bytes::from_static(b"short")).is_none());
        assert!(Frame::decode("$cluster/other", Bytes::new()).is_none());
    }
}
