//! The client's side of the protocol, as far as the node-to-node link (an MQTT client of
//! its peer) needs it: CONNECT and PINGREQ out, CONNACK, PUBACK and PINGRESP in.

use bytes::{BufMut, BytesMut};

use super::encode::put_remaining_len;
use super::DecodeError;

/// Packets a client receives, as far as the node-to-node link (which is an MQTT client of
/// its peer) needs them.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerPacket {
    ConnAck(u8),
    PubAck(u16),
    PingResp,
}

/// Takes one CONNACK, PUBACK or PINGRESP off `buf`; anything else is an error.
pub fn decode_from_server(buf: &mut BytesMut) -> Result<Option<ServerPacket>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let want = match byte1 {
        0x20 | 0x40 => 4,
        0xD0 => 2,
        _ => return Err(DecodeError::Malformed("unexpected packet from peer")),
    };
    if buf.len() < want {
        return Ok(None);
    }
    if usize::from(buf[1]) != want - 2 {
        return Err(DecodeError::Malformed("bad remaining length"));
    }
    let p = buf.split_to(want);
    Ok(Some(match byte1 {
        0x20 => ServerPacket::ConnAck(p[3]),
        0x40 => ServerPacket::PubAck(u16::from_be_bytes([p[2], p[3]])),
        _ => ServerPacket::PingResp,
    }))
}

/// CONNECT with a clean session, no will; `login` = (user name, password).
pub fn encode_connect(
    buf: &mut BytesMut,
    client_id: &str,
    keep_alive: u16,
    login: Option<(&str, &[u8])>,
) {
    let login_len = login.map_or(0, |(u, p)| 2 + u.len() + 2 + p.len());
    buf.put_u8(0x10);
    put_remaining_len(buf, 10 + 2 + client_id.len() + login_len);
    buf.put_u16(4);
    buf.put_slice(b"MQTT");
    let flags = if login.is_some() {
        0x02 | 0x80 | 0x40
    } else {
        0x02
    };
    buf.put_slice(&[4, flags]);
    buf.put_u16(keep_alive);
    buf.put_u16(client_id.len() as u16);
    buf.put_slice(client_id.as_bytes());
    if let Some((user, password)) = login {
        buf.put_u16(user.len() as u16);
        buf.put_slice(user.as_bytes());
        buf.put_u16(password.len() as u16);
        buf.put_slice(password);
    }
}

pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0]);
}
