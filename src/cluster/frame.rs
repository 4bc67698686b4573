//! What one node tells another, and its bytes: each frame is the payload of a PUBLISH on
//! an internal topic of the node-to-node link (see `link`). Big-endian:
//! - `$cluster/push`: inc u64, seq u64, client id (u16 length + bytes), envelope;
//! - `$cluster/pub`: inc u64, envelope;
//! - `$cluster/kick`: inc u64, epoch u64, client id (the rest);
//! - `$cluster/bcast`: question id u64, qos u8, payload (the rest);
//! - `$cluster/status`: question id u64, client id (the rest);
//! - `$cluster/answer`: question id u64, value u64. The only frame that goes the other way:
//!   written by the node that was asked, on the link the question came in on.
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
const TOPIC_BROADCAST: &str = "$cluster/bcast";
const TOPIC_STATUS: &str = "$cluster/status";
const TOPIC_ANSWER: &str = "$cluster/answer";

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
    /// Hand `payload` to every device connected to you, on its push topic, live only;
    /// answer with how many took it. Meant for whichever incarnation is up: "connected
    /// now" is the receiver's to say.
    Broadcast { id: u64, qos: Qos, payload: Bytes },
    /// Is `client` connected to you? Answer with since when (unix ms), 0 if it is not.
    Status { id: u64, client: ClientId },
    /// The answer to question `id`.
    Answer { id: u64, value: u64 },
}

impl Frame {
    /// What the link's byte budget counts for a frame.
    pub(super) fn size(&self) -> usize {
        match self {
            Frame::Push { client, msg, .. } => client.len() + msg.size(),
            Frame::Publish { msg, .. } => msg.size(),
            Frame::Kick { client, .. } => client.len(),
            Frame::Broadcast { payload, .. } => payload.len(),
            Frame::Status { client, .. } => client.len(),
            Frame::Answer { .. } => 16,
        }
    }

    /// The id of a frame that asks for an `Answer`.
    pub(super) fn question(&self) -> Option<u64> {
        match self {
            Frame::Broadcast { id, .. } | Frame::Status { id, .. } => Some(*id),
            _ => None,
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
            Frame::Broadcast { id, qos, payload } => {
                body.put_u64(*id);
                body.put_u8(*qos as u8);
                body.put_slice(payload);
                (TOPIC_BROADCAST, Qos::AtMostOnce)
            }
            Frame::Status { id, client } => {
                body.put_u64(*id);
                body.put_slice(client.as_bytes());
                (TOPIC_STATUS, Qos::AtMostOnce)
            }
            Frame::Answer { id, value } => {
                body.put_u64(*id);
                body.put_u64(*value);
                (TOPIC_ANSWER, Qos::AtMostOnce)
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
            TOPIC_BROADCAST => {
                if b.remaining() < 9 {
                    return None;
                }
                let id = b.get_u64();
                let qos = Qos::try_from(b.get_u8()).ok()?;
                Some(Frame::Broadcast {
                    id,
                    qos,
                    payload: b,
                })
            }
            TOPIC_STATUS => {
                if b.remaining() < 8 {
                    return None;
                }
                let id = b.get_u64();
                Some(Frame::Status {
                    id,
                    client: utf8(&b)?,
                })
            }
            TOPIC_ANSWER => {
                if b.remaining() != 16 {
                    return None;
                }
                Some(Frame::Answer {
                    id: b.get_u64(),
                    value: b.get_u64(),
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
        match roundtrip(&Frame::Broadcast {
            id: 11,
            qos: Qos::AtLeastOnce,
            payload: Bytes::from_static(b"to all"),
        }) {
            Frame::Broadcast {
                id: 11,
                qos: Qos::AtLeastOnce,
                payload,
            } => assert_eq!(&payload[..], b"to all"),
            other => panic!("{other:?}"),
        }
        match roundtrip(&Frame::Status {
            id: 12,
            client: Arc::from("d/2"),
        }) {
            Frame::Status { id: 12, client } => assert_eq!(&*client, "d/2"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            roundtrip(&Frame::Answer { id: 13, value: 99 }),
            Frame::Answer { id: 13, value: 99 }
        ));
        assert!(Frame::decode(
            TOPIC_BROADCAST,
            Bytes::from_static(b"\0\0\0\0\0\0\0\x01\x05")
        )
        .is_none());
        assert!(Frame::decode(TOPIC_PUSH, Bytes::from_static(b"short")).is_none());
        assert!(Frame::decode("$cluster/other", Bytes::new()).is_none());
    }
}
