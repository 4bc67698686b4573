#!/usr/bin/env python3
"""Writes the hand-made seed corpora: one small file per MQTT packet type (and a few short
sessions) for codec_decode and session. codec_roundtrip's seeds come from a fuzz run
(see README.md): its input is `arbitrary`'s encoding of a struct, not MQTT bytes.

Run from fuzz/: python3 seeds.py. Rewrites corpus/codec_decode and corpus/session."""

import os
import struct


def field(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack(">H", len(b)) + b


def frame(byte1, body):
    out, n = bytearray([byte1]), len(body)
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + body


def connect(cid, clean=True, keep_alive=30, will=None, user=None, password=None, name="MQTT", level=4):
    flags = 0x02 if clean else 0
    payload = field(cid)
    if will:
        topic, msg, qos, retain = will
        flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
        payload += field(topic) + field(msg)
    if user is not None:
        flags |= 0x80
        payload += field(user)
    if password is not None:
        flags |= 0x40
        payload += field(password)
    return frame(0x10, field(name) + bytes([level, flags]) + struct.pack(">H", keep_alive) + payload)


def publish(topic, payload, qos=0, pkid=1, retain=False, dup=False):
    body = field(topic) + (struct.pack(">H", pkid) if qos else b"") + payload
    return frame(0x30 | dup << 3 | qos << 1 | retain, body)


def subscribe(pkid, filters):
    return frame(0x82, struct.pack(">H", pkid) + b"".join(field(f) + bytes([q]) for f, q in filters))


def unsubscribe(pkid, filters):
    return frame(0xA2, struct.pack(">H", pkid) + b"".join(field(f) for f in filters))


def ack(byte1, pkid):
    return bytes([byte1, 2]) + struct.pack(">H", pkid)


PINGREQ = bytes([0xC0, 0])
DISCONNECT = bytes([0xE0, 0])

PACKETS = {
    "connect": connect("c0"),
    "connect_persistent": connect("c0", clean=False, keep_alive=0),
    "connect_will_login": connect("c0", will=("a/b", b"bye", 1, True), user="u", password=b"p\xff"),
    "connect_mqisdp": connect("c0", name="MQIsdp", level=3),
    "connect_v5": connect("c0", level=5),
    "publish_qos0": publish("a/b", b"hello"),
    "publish_qos1": publish("push/c1", b"push", qos=1, pkid=7),
    "publish_qos2": publish("a/b/c", b"exactly", qos=2, pkid=9, retain=True),
    "publish_dup": publish("a", b"x", qos=1, pkid=3, dup=True),
    "puback": ack(0x40, 1),
    "pubrec": ack(0x50, 1),
    "pubrel": ack(0x62, 9),
    "pubcomp": ack(0x70, 1),
    "subscribe": subscribe(1, [("a/#", 1), ("+/b", 2), ("a#", 0)]),
    "unsubscribe": unsubscribe(2, ["a/#", "push/c0"]),
    "pingreq": PINGREQ,
    "disconnect": DISCONNECT,
}

# Short sessions: what a client does after CONNECT.
SESSIONS = {
    "qos2_flow": publish("a/b", b"q2", qos=2, pkid=5) + ack(0x62, 5) + PINGREQ,
    "sub_retain_pub": subscribe(1, [("a/#", 2)]) + publish("a/b", b"r", qos=1, pkid=2, retain=True)
    + publish("a/b", b"", retain=True) + unsubscribe(3, ["a/#"]) + DISCONNECT,
    "push_to_self": subscribe(1, [("push/c0", 1)]) + publish("push/c0", b"me", qos=1, pkid=4) + ack(0x40, 1),
    "resend_qos2": publish("a", b"1", qos=2, pkid=6) + publish("a", b"1", qos=2, pkid=6, dup=True) + ack(0x62, 6),
    "second_connect": connect("c0"),
    "sys_and_wildcards": subscribe(1, [("$SYS/#", 0), ("#", 1), ("+", 2)]) + publish("$SYS/x", b"s"),
}


def write(directory, name, data):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def main():
    for d in ("corpus/codec_decode", "corpus/session"):
        if os.path.isdir(d):
            for f in os.listdir(d):
                os.remove(os.path.join(d, f))
    # codec_decode: the first byte picks the size limit (3: 1 MiB) and the chunk size the
    # incremental check feeds (first >> 2, plus 1).
    for name, p in PACKETS.items():
        write("corpus/codec_decode", name, bytes([0x03]) + p)
    write("corpus/codec_decode", "stream_small_limit", bytes([0x01 | 4 << 2]) + b"".join(PACKETS.values()))
    write("corpus/codec_decode", "server_packets", bytes([0x03]) + bytes([0x20, 2, 0, 0, 0x40, 2, 0, 1, 0xD0, 0]))
    # session, raw mode: a CONNECT is put in front of a stream that does not start with one.
    for name, p in PACKETS.items():
        write("corpus/session", "raw_" + name, b"RAW:" + p)
    for name, s in SESSIONS.items():
        write("corpus/session", "raw_" + name, b"RAW:" + connect("c0", clean=False) + s)


if __name__ == "__main__":
    main()
