//! Arbitrary bytes into both of Herald's decoders. Besides "never panics", checks that
//! every decoded packet survives encode -> decode unchanged, that a packet fed in small
//! pieces (as a socket delivers it) decodes the same as in one piece, and that the size
//! limit holds.
#![no_main]

use bytes::BytesMut;
use herald::codec::{self, DecodeError, ServerPacket};
use herald_fuzz::codec::{check_roundtrip, norm, Norm};
use libfuzzer_sys::fuzz_target;

/// The first input byte picks the size limit, so that small limits are hit often too.
const LIMITS: [usize; 4] = [0, 16, 300, 1024 * 1024];

#[derive(Debug, PartialEq)]
enum Outcome {
    /// Ran out of bytes.
    Incomplete,
    Error(DecodeError),
}

/// Decodes `input` fed `step` bytes at a time (everything at once for `usize::MAX`).
fn decode_stream(input: &[u8], max: usize, step: usize) -> (Vec<Norm>, Outcome) {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut packets = Vec::new();
    loop {
        let before = buf.len();
        match codec::decode(&mut buf, max) {
            Ok(Some(p)) => {
                assert!(buf.len() < before, "a packet was decoded from no bytes");
                packets.push(norm(&p));
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                if fed == input.len() {
                    return (packets, Outcome::Incomplete);
                }
                let n = step.min(input.len() - fed);
                buf.extend_from_slice(&input[fed..fed + n]);
                fed += n;
            }
            Err(e) => return (packets, Outcome::Error(e)),
        }
    }
}

/// Remaining length of each packet, read independently of mqttbytes, for the size check.
fn body_len(p: &Norm) -> usize {
    let mut buf = BytesMut::new();
    match herald_fuzz::codec::encode(p, &mut buf) {
        Some(()) => {
            let mut n = 0;
            for (i, b) in buf.iter().skip(1).take(4).enumerate() {
                n |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    return n;
                }
            }
            n
        }
        None => 0,
    }
}

fn server_direction(input: &[u8]) {
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.len();
        match codec::decode_from_server(&mut buf) {
            Ok(Some(p)) => {
                assert!(buf.len() < before);
                let mut out = BytesMut::new();
                match p {
                    ServerPacket::ConnAck(code) => codec::encode_connack(&mut out, false, code),
                    ServerPacket::PubAck(id) => codec::encode_puback(&mut out, id),
                    ServerPacket::PingResp => codec::encode_pingresp(&mut out),
                }
                let again = codec::decode_from_server(&mut out);
                assert_eq!(again, Ok(Some(p)), "server packet round trip");
                assert!(out.is_empty());
            }
            Ok(None) => {
                assert_eq!(buf.len(), before);
                return;
            }
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let max = LIMITS[usize::from(first & 3)];
    let (packets, outcome) = decode_stream(input, max, usize::MAX);
    for p in &packets {
        check_roundtrip(p);
        // Re-encoding is minimal, so it is never longer than what arrived.
        let len = body_len(p);
        assert!(
            len <= max || matches!(p, Norm::Connect { .. }),
            "{len}-byte packet accepted over the {max}-byte limit: {p:?}"
        );
    }
    if let Outcome::Error(DecodeError::TooLarge(n)) = outcome {
        assert!(n > max, "TooLarge({n}) under the limit {max}");
    }
    // The session reads whatever the socket has: the split must not matter.
    let step = usize::from(first >> 2) + 1;
    let (chunked, chunked_outcome) = decode_stream(input, max, step);
    assert_eq!(chunked, packets, "fed {step} bytes at a time");
    assert_eq!(chunked_outcome, outcome, "fed {step} bytes at a time");

    server_direction(input);
});
