//! Structured packets of every type from arbitrary fields. Client-to-server packets are
//! encoded (by Herald where it has an encoder, else by hand, and also by mqttbytes), decoded
//! by Herald and checked against what MQTT 3.1.1 says the outcome must be: the same fields,
//! or an error for the cases the codec promises to refuse (empty or wildcard topic names,
//! U+0000, packet id 0, QoS 3, empty SUBSCRIBE, password without user name...).
//! Server-to-client packets are encoded by Herald and decoded by mqttbytes, as a client
//! library would, and by Herald's own `decode_from_server` where it applies.
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use herald::codec::{self, ServerPacket};
use herald_fuzz::codec::{decode_one, encode, frame, put_field, qos, Norm};
use libfuzzer_sys::fuzz_target;
use mqttbytes::v4;

#[derive(Arbitrary, Debug)]
enum Input {
    Connect {
        mqisdp: bool,
        level: Option<u8>,
        keep_alive: u16,
        client_id: String,
        clean: bool,
        will: Option<(String, Vec<u8>, u8, bool)>,
        user: Option<String>,
        pass: Option<Vec<u8>>,
    },
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        pkid: u16,
        retain: bool,
        dup: bool,
    },
    /// PUBACK, PUBREC, PUBREL, PUBCOMP by `kind % 4`.
    Ack {
        kind: u8,
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        topics: Vec<String>,
    },
    PingReq,
    Disconnect,
    ConnAck {
        session_present: bool,
        code: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
    },
    PingResp,
    /// A PUBLISH as the broker sends it to a subscriber.
    Deliver {
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        pkid: u16,
        retain: bool,
        dup: bool,
    },
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(['+', '#', '\0'])
}

/// MQTT 3.1.1 4.7.1, written independently of `herald::topic::valid_filter`.
fn valid_filter(f: &str) -> bool {
    let levels: Vec<&str> = f.split('/').collect();
    !f.is_empty()
        && levels.iter().enumerate().all(|(i, l)| {
            (!l.contains('#') || (*l == "#" && i == levels.len() - 1))
                && (!l.contains('+') || *l == "+")
        })
}

/// Herald's decode of `bytes` must be exactly `want` (`None`: must be an error).
fn expect(bytes: &[u8], want: Option<Norm>, what: &str) {
    let got = decode_one(bytes);
    match (&got, &want) {
        (Ok(Some(g)), Some(w)) => assert_eq!(g, w, "{what}: {bytes:02x?}"),
        (Err(_), None) => {}
        _ => panic!("{what}: {bytes:02x?} decoded to {got:?}, want {want:?}"),
    }
}

fn client_packet(input: Input) {
    match input {
        Input::Connect {
            mqisdp,
            level,
            keep_alive,
            client_id,
            clean,
            will,
            user,
            pass,
        } => {
            let (name, native): (&[u8], u8) = if mqisdp { (b"MQIsdp", 3) } else { (b"MQTT", 4) };
            let level = level.unwrap_or(native);
            let mut body = BytesMut::new();
            let fields = (|| {
                put_field(&mut body, name)?;
                body.extend_from_slice(&[level, 0]);
                body.extend_from_slice(&keep_alive.to_be_bytes());
                put_field(&mut body, client_id.as_bytes())?;
                let mut flags = (clean as u8) << 1;
                if let Some((topic, message, q, retain)) = &will {
                    flags |= 0x04 | (q % 4) << 3 | (*retain as u8) << 5;
                    put_field(&mut body, topic.as_bytes())?;
                    put_field(&mut body, message)?;
                }
                if let Some(u) = &user {
                    flags |= 0x80;
                    put_field(&mut body, u.as_bytes())?;
                }
                if let Some(p) = &pass {
                    flags |= 0x40;
                    put_field(&mut body, p)?;
                }
                body[name.len() + 3] = flags;
                Some(())
            })();
            let mut buf = BytesMut::new();
            if fields.and_then(|()| frame(&mut buf, 0x10, &body)).is_none() {
                return;
            }
            let got = decode_one(&buf);
            if level != native {
                assert_eq!(
                    got.unwrap_err(),
                    codec::DecodeError::UnsupportedProtocol(level),
                    "CONNECT level {level}"
                );
                return;
            }
            let valid = !client_id.contains('\0')
                && will
                    .as_ref()
                    .is_none_or(|(t, _, q, _)| valid_name(t) && q % 4 != 3)
                && user.as_ref().is_none_or(|u| !u.contains('\0'))
                && (pass.is_none() || user.is_some());
            let want = valid.then(|| Norm::Connect {
                keep_alive,
                client_id: client_id.clone(),
                clean,
                will: will.map(|(t, m, q, r)| (t, m, q % 4, r)),
                // The password is binary data: it comes back byte for byte.
                login: user.map(|u| (u, pass.unwrap_or_default())),
            });
            expect(&buf, want.clone(), "CONNECT");
            if let Some(w) = want {
                let mut again = BytesMut::new();
                if encode(&w, &mut again).is_some() {
                    expect(&again, Some(w), "CONNECT re-encoded");
                }
            }
        }
        Input::Publish {
            topic,
            payload,
            qos: q,
            pkid,
            retain,
            dup,
        } => {
            let q = q % 3;
            let mut buf = BytesMut::new();
            if topic.len() > usize::from(u16::MAX) {
                return;
            }
            codec::encode_publish(&mut buf, &topic, &payload, qos(q), pkid, retain, dup);
            let valid = valid_name(&topic) && (q == 0 || pkid != 0) && !(q == 0 && dup);
            let want = valid.then(|| Norm::Publish {
                dup,
                qos: q,
                retain,
                topic: topic.clone(),
                pkid: if q == 0 { 0 } else { pkid },
                payload: payload.clone(),
            });
            expect(&buf, want.clone(), "PUBLISH");
            // The same packet from a client library's encoder.
            let mq = match q {
                0 => mqttbytes::QoS::AtMostOnce,
                1 => mqttbytes::QoS::AtLeastOnce,
                _ => mqttbytes::QoS::ExactlyOnce,
            };
            let mut p = v4::Publish::new(topic, mq, payload);
            (p.pkid, p.retain, p.dup) = (pkid, retain, dup);
            let mut other = BytesMut::new();
            if p.write(&mut other).is_ok() {
                expect(&other, want, "PUBLISH from mqttbytes");
            }
        }
        Input::Ack { kind, pkid } => {
            let want = match kind % 4 {
                0 => Norm::PubAck(pkid),
                1 => Norm::PubRec(pkid),
                2 => Norm::PubRel(pkid),
                _ => Norm::PubComp(pkid),
            };
            let mut buf = BytesMut::new();
            encode(&want, &mut buf).expect("ack");
            expect(&buf, (pkid != 0).then_some(want), "ack");
        }
        Input::Subscribe { pkid, filters } => {
            let mut body = BytesMut::new();
            body.extend_from_slice(&pkid.to_be_bytes());
            for (f, options) in &filters {
                if put_field(&mut body, f.as_bytes()).is_none() {
                    return;
                }
                body.extend_from_slice(&[*options]);
            }
            let mut buf = BytesMut::new();
            if frame(&mut buf, 0x82, &body).is_none() {
                return;
            }
            let valid = pkid != 0
                && !filters.is_empty()
                && filters.iter().all(|(f, o)| !f.contains('\0') && *o < 3);
            let want = valid.then(|| Norm::Subscribe {
                pkid,
                filters: filters
                    .iter()
                    .map(|(f, o)| {
                        let f = if valid_filter(f) {
                            Ok(f.clone())
                        } else {
                            Err(f.clone())
                        };
                        (f, *o)
                    })
                    .collect(),
            });
            expect(&buf, want, "SUBSCRIBE");
        }
        Input::Unsubscribe { pkid, topics } => {
            let mut u = v4::Unsubscribe::new("");
            (u.pkid, u.topics) = (pkid, topics.clone());
            let mut buf = BytesMut::new();
            if topics.iter().any(|t| t.len() > usize::from(u16::MAX)) || u.write(&mut buf).is_err()
            {
                return;
            }
            let valid = pkid != 0 && !topics.is_empty() && topics.iter().all(|t| !t.contains('\0'));
            let want = valid.then_some(Norm::Unsubscribe { pkid, topics });
            expect(&buf, want, "UNSUBSCRIBE");
        }
        Input::PingReq | Input::Disconnect => {
            let want = if matches!(input, Input::PingReq) {
                Norm::PingReq
            } else {
                Norm::Disconnect
            };
            let mut buf = BytesMut::new();
            encode(&want, &mut buf).expect("empty packet");
            expect(&buf, Some(want), "empty packet");
        }
        other => server_packet(other),
    }
}

/// mqttbytes' reading of one server-to-client packet that fills `buf` exactly.
fn read_as_client(buf: &BytesMut) -> v4::Packet {
    let mut b = buf.clone();
    let p = v4::read(&mut b, usize::MAX)
        .unwrap_or_else(|e| panic!("a client cannot read {buf:02x?}: {e:?}"));
    assert!(b.is_empty(), "{} bytes left over in {buf:02x?}", b.len());
    p
}

fn server_packet(input: Input) {
    let mut buf = BytesMut::new();
    match input {
        Input::ConnAck {
            session_present,
            code,
        } => {
            // Herald sends only the codes 3.1.1 defines.
            let code = code % 6;
            codec::encode_connack(&mut buf, session_present, code);
            match read_as_client(&buf) {
                v4::Packet::ConnAck(c) => {
                    assert_eq!(c.session_present, session_present);
                    assert_eq!(c.code as u8, code);
                }
                p => panic!("{p:?}"),
            }
            assert_eq!(
                codec::decode_from_server(&mut buf),
                Ok(Some(ServerPacket::ConnAck(code)))
            );
        }
        Input::SubAck { pkid, codes } => {
            // One code per filter, and a SUBSCRIBE without filters is refused as malformed.
            if codes.is_empty() {
                return;
            }
            // Granted QoS or 0x80: the only codes the session writes.
            let codes: Vec<u8> = codes
                .iter()
                .map(|c| if c % 4 == 3 { 0x80 } else { c % 4 })
                .collect();
            codec::encode_suback(&mut buf, pkid, &codes);
            match read_as_client(&buf) {
                v4::Packet::SubAck(s) => {
                    assert_eq!(s.pkid, pkid);
                    let got: Vec<u8> = s
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            v4::SubscribeReasonCode::Success(q) => *q as u8,
                            v4::SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect();
                    assert_eq!(got, codes);
                }
                p => panic!("{p:?}"),
            }
        }
        Input::UnsubAck { pkid } => {
            codec::encode_unsuback(&mut buf, pkid);
            match read_as_client(&buf) {
                v4::Packet::UnsubAck(u) => assert_eq!(u.pkid, pkid),
                p => panic!("{p:?}"),
            }
        }
        Input::PingResp => {
            codec::encode_pingresp(&mut buf);
            assert!(matches!(read_as_client(&buf), v4::Packet::PingResp));
            assert_eq!(
                codec::decode_from_server(&mut buf),
                Ok(Some(ServerPacket::PingResp))
            );
        }
        Input::Deliver {
            topic,
            payload,
            qos: q,
            pkid,
            retain,
            dup,
        } => {
            // What the session sends: a topic that arrived in a valid PUBLISH, a packet id
            // `seq % 65535 + 1` for QoS 1 and 2.
            let q = q % 3;
            if !valid_name(&topic) || topic.len() > usize::from(u16::MAX) {
                return;
            }
            let pkid = if q == 0 { 0 } else { pkid.max(1) };
            let dup = dup && q > 0;
            codec::encode_publish(&mut buf, &topic, &payload, qos(q), pkid, retain, dup);
            match read_as_client(&buf) {
                v4::Packet::Publish(p) => {
                    assert_eq!(
                        (p.topic.as_str(), &p.payload[..], p.qos as u8),
                        (topic.as_str(), &payload[..], q)
                    );
                    assert_eq!((p.pkid, p.retain, p.dup), (pkid, retain, dup));
                }
                p => panic!("{p:?}"),
            }
        }
        _ => unreachable!("client packets are handled by client_packet"),
    }
}

fuzz_target!(|input: Input| client_packet(input));
