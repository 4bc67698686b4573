//! MQTT 3.1.1 wire format: the one boundary between bytes and Herald's own packet types.
//!
//! From `mqttbytes` Herald takes the framing check (`mqttbytes::check`: is a whole packet
//! in the buffer, within the size limit) and the PUBLISH parser, which are correct and
//! fast; the result is turned into Herald's `Publish` at once. The rest is hand-written:
//! `mqttbytes` is lenient where a broker must be strict (reserved flag bits, wildcard
//! topics in PUBLISH, empty SUBSCRIBE, U+0000 in strings), it does not know the MQTT 3.1
//! "MQIsdp" protocol name, and it reads a CONNECT password as a UTF-8 string where 3.1.1
//! makes it binary data. So CONNECT, SUBSCRIBE, UNSUBSCRIBE and the acks are parsed here,
//! and the rest of Herald sees only well-formed packets in Herald's types (`Qos` from
//! `message`). Outgoing packets are encoded here directly into the connection's write
//! buffer; PUBLISH in particular is written from shared message parts without building an
//! intermediate struct.
//!
//! Every UTF-8 string field (CONNECT's protocol name, client id, will topic and user name,
//! PUBLISH's topic, SUBSCRIBE's and UNSUBSCRIBE's filters) that is not valid UTF-8 or holds
//! U+0000 makes the packet malformed, which closes the connection (MQTT 3.1.1, 1.5.3). The
//! password and the will payload are binary data and are not checked. A filter that is valid
//! UTF-8 but not a valid filter (`a#`, `a/#/b`) is not malformed: SUBSCRIBE refuses it with
//! 0x80 and the connection stays.
//!
//! Files:
//! - `mod.rs` (here): the packets a client sends, as Herald's types, and `DecodeError`;
//! - `decode.rs`: bytes from a client to a `Packet`, with the strict checks, and the peek at
//!   a CONNECT still arriving (`connect_prefix`);
//! - `encode.rs`: the packets the broker sends, written into the connection's buffer;
//! - `client.rs`: the client's side, as far as the node-to-node link (an MQTT client of its
//!   peer) needs it;
//! - `tests.rs`: unit tests.

mod client;
mod decode;
mod encode;
#[cfg(test)]
mod tests;

use bytes::Bytes;

pub use crate::message::Qos;
pub use client::{decode_from_server, encode_connect, encode_pingreq, ServerPacket};
pub use decode::{connect_prefix, decode, MAX_CONNECT_SIZE};
pub use encode::{
    encode_connack, encode_pingresp, encode_puback, encode_pubcomp, encode_publish, encode_pubrec,
    encode_pubrel, encode_suback, encode_unsuback, publish_len,
};

/// CONNECT, as Herald reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub keep_alive: u16,
    pub client_id: String,
    pub clean_session: bool,
    pub last_will: Option<Will>,
    pub login: Option<Login>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub message: Bytes,
    pub qos: Qos,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub username: String,
    /// Binary data in MQTT 3.1.1 (a token, a hash, any bytes): never turned into text.
    pub password: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: Qos,
    pub retain: bool,
    pub topic: String,
    /// 0 at QoS 0.
    pub pkid: u16,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub topics: Vec<String>,
}

/// A packet a client may send to the broker.
#[derive(Debug)]
pub enum Packet {
    Connect(Connect),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect,
}

#[derive(Debug)]
pub struct Subscribe {
    pub pkid: u16,
    /// `Err(filter)` marks a filter that is a clean UTF-8 string but not a valid filter
    /// (`a#`): it is refused with 0x80 in the SUBACK rather than closing the connection, as
    /// Mosquitto and EMQX clients expect.
    pub filters: Vec<(Result<String, String>, Qos)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// CONNECT with a protocol level we do not speak: answer CONNACK 1, then close.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
}

impl From<mqttbytes::Error> for DecodeError {
    fn from(e: mqttbytes::Error) -> Self {
        use mqttbytes::Error as E;
        DecodeError::Malformed(match e {
            E::InvalidQoS(_) => "invalid QoS",
            E::TopicNotUtf8 => "string is not valid UTF-8",
            E::PacketIdZero => "packet id 0",
            E::MalformedRemainingLength => "bad remaining length",
            E::InvalidPacketType(_) => "unknown packet type",
            E::PayloadRequired => "packet needs a body",
            E::BoundaryCrossed(_) => "string runs past the packet end",
            E::IncorrectPacketFormat => "incorrect packet format",
            E::PayloadSizeLimitExceeded(_) => "packet too large",
            _ => "malformed packet",
        })
    }
}
