#!/usr/bin/env python3
"""Herald's network attack suite: hostile MQTT clients against a real Herald process.

Usage: scripts/attack.py [--herald PATH] [--store memory|redis|both] [--case NAME]...
                         [--quick] [--json FILE] [--rss-abort MIB] [--seed N] [--list]

The binary comes from --herald, else HERALD, else target/release/herald (this script builds
nothing). For each store (memory, and redis with a private redis-server on a free loopback port
in a temp dir, never 6379), every case runs against a fresh Herald on free loopback ports
(`--listen`, `--metrics-listen`), one case after another. This script kills only what it
started (Herald, redis-server, its own child processes), by PID.

Each case asserts three things:
  (a) Herald's RSS (VmRSS of /proc/PID/status, sampled every 100 ms from before the attack
      until after the checks) stays under baseline + N MiB, where baseline is the RSS with the
      honest clients connected, just before the attack. The peak is reported, and so is the
      RSS 3 s after the attack ended (not checked: whether Herald gives memory back).
  (b) honest clients are not hurt: 20 devices (`honest-0` .. `honest-19`, clean session 0,
      keepalive 30, paho-mqtt) receive QoS 1 pushes on their push topic `push/<id>` from a
      publisher at 50 msg/s in total, from 1 s before the attack to its end. Every push must
      arrive (5 s of grace after the attack), with publish->receive latency p99 < 50 ms.
  (c) Herald is still alive afterwards and answers a fresh CONNECT with CONNACK 0.
The honest clients run in their own process and the attack in another (at nice +5), so that
neither Python's GIL nor the attack's CPU use shows up as Herald latency.

The cases (bounds assume Herald's defaults: server.max_packet_size 1 MiB,
server.max_write_buffer 256 KiB, session.max_mailbox_bytes 512 KiB, session.max_queued_bytes
16 MiB, store.max_bytes 256 MiB, server.max_connect_size 64 KiB):

  retained-dup      One retained QoS 0 message of ~1 MiB on `big/r` (set by a normal client),
                    then 2 hostile connections with a tiny SO_RCVBUF each send one SUBSCRIBE
                    that lists `big/r` 1,000 times (~8 KB) and never read. Proves a SUBSCRIBE
                    cannot make Herald queue retained copies without bound for a reader that
                    does not read. Bound: baseline + 64 MiB (per connection at most the write
                    buffer + the mailbox budget + one packet, ~2 MiB; the rest is slack).
  retained-overlap  The same with distinct overlapping filters (`big/r`, `big/+`, `+/r`, `#`,
                    `big/#`, `+/#`, `+/+`, `big/r/#`, ...) cycled to 1,000 entries: de-duplicating
                    identical filters is not enough. Bound: baseline + 64 MiB.
  slow-readers      3 subscribers to `slow/t` that stop reading, while a publisher sends
                    512 KB QoS 0 messages to `slow/t` as fast as Herald takes them (20 s).
                    Proves the per-connection byte budgets (write buffer + mailbox) hold for big
                    messages, not only the message-count limit. Bound: baseline + 64 MiB.
  trickle-reader    One subscriber reading at 64 KB/s while 512 KB QoS 0 messages flow (15 s):
                    a reader that is slow but not stopped. Bound: baseline + 64 MiB.
  stored-bytes      1,500 QoS 1 pushes of 512 KB to client ids that never connect (one each),
                    16 in flight; counts the PUBACKs. Memory store: the stored bytes are
                    bounded by store.max_bytes. Bound: baseline + 256 + 64 MiB. Redis store:
                    Herald keeps none of it itself. Bound: baseline + 64 MiB (Redis's
                    used_memory is reported).
  unfinished-connect 300 sockets each send the fixed header of a CONNECT announcing ~1 MiB, then
                    half of them all but the last byte at once and half of them the same slowly
                    (64 KiB every 0.5 s), and hold until Herald closes them or connect_timeout
                    (10 s) + 5 s. 100 more send a ~1 MiB first packet that is not a CONNECT
                    (PUBLISH, SUBSCRIBE, reserved type 15), all but its last byte. Proves that
                    what a client sends before its CONNECT is accepted cannot make Herald buffer
                    more than server.max_connect_size per socket. Bound: baseline + 64 MiB.
  unfinished-will-connect  The same 300 CONNECTs with the will flag set (a CONNECT with a will
                    may be larger than max_connect_size, up to max_packet_size). Proves that what
                    such CONNECTs hold between them is bounded over the whole process. Bound:
                    baseline + 96 MiB (64 MiB for all large CONNECTs at once, as the fix on main
                    has it, plus slack for read-buffer growth).
  malformed         3,000 short connections, 50 at a time, each sending a mutated packet (bit
                    flips, truncations, bad remaining lengths, U+0000 and invalid UTF-8 in
                    strings, reserved flags and types, bad protocol names and levels, garbage),
                    most after a valid CONNECT. Counts how many Herald closed. Proves one bad
                    peer affects only its own connection. Bound: baseline + 64 MiB.
  conn-flood        5,000 connections opened within ~0.6 s (100 per 10 ms, so that Herald's
                    listen backlog does not overflow) that never send CONNECT (well under this
                    machine's 20,000 open files), held until Herald closes them
                    (connect_timeout) or 16 s. Bound: baseline + 64 MiB.

--quick shortens the attacks: retained 4 s instead of 8, slow-readers 8 s instead of 20,
trickle-reader 6 s instead of 15, stored-bytes 1,000 pushes instead of 1,500, malformed
1,000 connections instead of 3,000, conn-flood 2,000 instead of 5,000 (the bounds stay).

Output: one line per case (case, store, peak RSS, bound, honest p99, pushes lost, PASS/FAIL,
then the Herald metrics that moved during the case: herald_limit_hits_total,
herald_messages_dropped_total, herald_connections_rejected_total, ...), a second indented
line with the case's own figures, and `N passed, N failed` last. Exit status 1 if any case
failed. --json FILE writes every figure, metric delta and RSS sample. A case is stopped early
when Herald's RSS passes --rss-abort (default 3072 MiB), to protect the machine; it then fails
(this cannot stop growth that a single packet causes, as in the retained cases before the fix).

Needs Python 3.8+, paho-mqtt 2.x (pip install -r interop/requirements.txt) and, for the
Redis store, redis-server on PATH.
"""

import argparse
import collections
import json
import math
import multiprocessing
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

MiB = 1 << 20
KiB = 1 << 10
HOST = "127.0.0.1"

HONEST_DEVICES = 20
HONEST_RATE = 50.0  # pushes per second, over all devices
HONEST_P99_MS = 50.0
HONEST_WARMUP = 1.0  # seconds of honest traffic before the attack starts
HONEST_GRACE = 5.0  # seconds for the last pushes to arrive after the attack
AFTER_SECONDS = 3.0  # rss_after_mib: Herald's RSS this long after the attack ended
CONNECT_TIMEOUT = 10.0  # Herald's default server.connect_timeout (no flag sets it)
BIG_PAYLOAD = 512 * 1000  # "512 KB" messages

# Metric families recorded per case (deltas over the case); the first ones go on the line.
METRIC_FAMILIES = [
    "herald_limit_hits_total",
    "herald_messages_dropped_total",
    "herald_connections_rejected_total",
    "herald_malformed_packets_total",
    "herald_store_errors_total",
    "herald_connections_total",
    "herald_messages_received_total",
    "herald_messages_sent_total",
    "herald_messages_stored_total",
    "herald_log_lines_suppressed_total",
]
LINE_METRICS = METRIC_FAMILIES[:6]


# ---------------------------------------------------------------------------------------------
# MQTT 3.1.1 encoding, by hand, so that hostile clients can send anything.


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(byte1, body):
    return bytes([byte1]) + varint(len(body)) + body


def mstr(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id, clean=True, keepalive=60, will=None, user=None, password=None,
                   proto=b"MQTT", level=4, extra_flags=0):
    """will: (topic, payload, qos, retain)."""
    flags = (0x02 if clean else 0) | extra_flags
    tail = mstr(client_id)
    if will:
        topic, payload, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        tail += mstr(topic) + mstr(payload)
    if user is not None:
        flags |= 0x80
        tail += mstr(user)
    if password is not None:
        flags |= 0x40
        tail += mstr(password)
    return frame(0x10, mstr(proto) + bytes([level, flags]) + struct.pack("!H", keepalive) + tail)


def publish_header(topic, payload_len, qos=0, pkid=0, retain=False, dup=False):
    """The bytes of a PUBLISH before its payload, so big payloads are never copied."""
    var = mstr(topic) + (struct.pack("!H", pkid) if qos else b"")
    byte1 = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    return bytes([byte1]) + varint(len(var) + payload_len) + var


def publish_packet(topic, payload, qos=0, pkid=0, retain=False, dup=False):
    return publish_header(topic, len(payload), qos, pkid, retain, dup) + payload


def subscribe_packet(pkid, filters, byte1=0x82):
    """filters: [(filter, qos)]."""
    return frame(byte1, struct.pack("!H", pkid) + b"".join(mstr(f) + bytes([q]) for f, q in filters))


def unsubscribe_packet(pkid, filters, byte1=0xA2):
    return frame(byte1, struct.pack("!H", pkid) + b"".join(mstr(f) for f in filters))


def id_packet(byte1, pkid):
    return frame(byte1, struct.pack("!H", pkid))


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


class PacketReader:
    """Splits a byte stream from Herald into (byte1, body) packets."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data

    def packets(self):
        out = []
        while True:
            n, mult, i = 0, 1, 1
            while True:
                if i >= len(self.buf):
                    return out
                b = self.buf[i]
                n += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if len(self.buf) < i + n:
                return out
            out.append((self.buf[0], bytes(self.buf[i:i + n])))
            del self.buf[:i + n]


class Closed(Exception):
    pass


class RawClient:
    """A blocking raw MQTT client for set-up steps and the post-attack probe."""

    def __init__(self, port, rcvbuf=None, timeout=5.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.reader = PacketReader()
        self.pending = collections.deque()

    def send(self, data):
        self.sock.sendall(data)

    def read_packet(self, timeout=5.0):
        """The next packet, or None after `timeout`; raises Closed if Herald closed."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(256 * KiB)
            except socket.timeout:
                return None
            except OSError as e:
                raise Closed(str(e))
            if not data:
                raise Closed("EOF")
            self.reader.feed(data)
            self.pending.extend(self.reader.packets())
        return self.pending.popleft()

    def expect(self, byte1, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            p = self.read_packet(max(0.0, deadline - time.monotonic()))
            if p is None:
                raise TimeoutError(f"no packet 0x{byte1:02x} within {timeout}s")
            if p[0] == byte1:
                return p

    def connect(self, client_id, clean=True, keepalive=60, timeout=5.0):
        """Sends CONNECT; returns the CONNACK return code."""
        self.send(connect_packet(client_id, clean=clean, keepalive=keepalive))
        return self.expect(0x20, timeout)[1][1]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def send_until(sock, data, deadline, stop):
    """Sends `data` on a blocking socket unless `deadline` passes or `stop()` is true first.
    Returns the bytes sent; raises OSError if Herald closed the connection."""
    view = memoryview(data)
    off = 0
    while off < len(view):
        if time.monotonic() >= deadline or stop():
            return off
        sock.settimeout(0.2)
        try:
            off += sock.send(view[off:off + 4 * MiB])
        except socket.timeout:
            pass
    return off


# ---------------------------------------------------------------------------------------------
# The cases. Each runs in the attack process and returns a dict of its own figures; a key
# "error" makes the case fail (for instance when its set-up did not work).


class Ctx:
    """What a case gets: Herald's port, the run's options, and the abort flag that the
    parent raises when Herald's RSS passes --rss-abort."""

    def __init__(self, port, quick, seed, abort):
        self.port = port
        self.quick = quick
        self.seed = seed
        self._abort = abort

    def aborted(self):
        return self._abort.is_set()

    def pick(self, full, quick):
        return quick if self.quick else full


def hostile_subscriber(ctx, client_id, filters, rcvbuf=4096, wait_suback=True):
    """A connection with a tiny receive buffer that subscribes and then never reads."""
    c = RawClient(ctx.port, rcvbuf=rcvbuf)
    rc = c.connect(client_id)
    if rc != 0:
        raise RuntimeError(f"{client_id}: CONNACK {rc}")
    c.send(subscribe_packet(1, filters))
    if wait_suback:
        c.expect(0x90)
    return c


def peer_closed(sock):
    """Whether Herald has closed this connection (FIN or RST received), from the kernel's TCP
    state, without reading: unread data may still be queued in front of the FIN."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state in (7, 8) or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0  # CLOSE, CLOSE_WAIT


def hold(ctx, seconds, socks=()):
    """Waits `seconds` (or until the abort flag); returns how many of `socks` Herald has
    closed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not ctx.aborted():
        time.sleep(0.1)
    return sum(1 for s in socks if peer_closed(s))


def set_big_retained(ctx, topic=b"big/r"):
    """Sets a ~1 MiB retained QoS 0 message on `topic` with a normal client, then checks with
    another one (which reads it) that Herald keeps it."""
    payload = b"R" * (MiB - 64)
    setter = RawClient(ctx.port)
    if setter.connect("attack-retain-setter") != 0:
        raise RuntimeError("retain setter refused")
    setter.send(publish_packet(topic, payload, qos=0, retain=True))
    # Herald handles a connection's packets in order: the PINGRESP means the PUBLISH is done.
    setter.send(PINGREQ)
    setter.expect(0xD0, timeout=10.0)
    setter.send(DISCONNECT)
    setter.close()
    checker = RawClient(ctx.port)
    if checker.connect("attack-retain-checker") != 0:
        raise RuntimeError("retain checker refused")
    checker.send(subscribe_packet(1, [(topic, 0)]))
    got = checker.expect(0x31, timeout=10.0)  # PUBLISH, QoS 0, RETAIN
    checker.send(DISCONNECT)
    checker.close()
    return len(got[1])


def _retained_amplification(ctx, filters):
    size = set_big_retained(ctx)
    entries = [(filters[i % len(filters)], 0) for i in range(1000)]
    packet_len = len(subscribe_packet(1, entries))
    socks = []
    for i in range(2):
        # No SUBACK wait: the SUBACK follows a gigabyte of retained copies before the fix.
        socks.append(hostile_subscriber(ctx, f"attack-retained-{i}", entries, wait_suback=False))
    closed = hold(ctx, ctx.pick(8, 4), [c.sock for c in socks])
    for c in socks:
        c.close()
    return {"retained_bytes": size, "subscribe_entries": len(entries),
            "distinct_filters": len(set(filters)), "subscribe_packet_bytes": packet_len,
            "hostile_connections": len(socks), "closed_by_herald": closed}


def case_retained_dup(ctx):
    """2 non-reading connections, each one SUBSCRIBE with `big/r` 1,000 times."""
    return _retained_amplification(ctx, [b"big/r"])


def case_retained_overlap(ctx):
    """2 non-reading connections, each one SUBSCRIBE with 11 distinct filters that all match
    `big/r`, cycled to 1,000 entries."""
    return _retained_amplification(ctx, [b"big/r", b"big/+", b"+/r", b"+/+", b"#", b"big/#",
                                         b"+/#", b"big/r/#", b"+/r/#", b"big/+/#", b"+/+/#"])


def flood_publisher(ctx, topic, seconds, qos0_payload_len=BIG_PAYLOAD):
    """Publishes QoS 0 messages of `qos0_payload_len` bytes on `topic` as fast as Herald
    reads them, for `seconds`. Returns (messages, bytes, closed)."""
    pub = RawClient(ctx.port)
    if pub.connect("attack-flood-pub", keepalive=0) != 0:
        raise RuntimeError("flood publisher refused")
    packet = publish_packet(topic, b"P" * qos0_payload_len)
    deadline = time.monotonic() + seconds
    sent = 0
    closed = False
    nbytes = 0
    while time.monotonic() < deadline and not ctx.aborted():
        try:
            n = send_until(pub.sock, packet, deadline, ctx.aborted)
        except OSError:
            closed = True
            break
        nbytes += n
        if n < len(packet):
            break
        sent += 1
    pub.close()
    return sent, nbytes, closed


def case_slow_readers(ctx):
    """3 subscribers to `slow/t` stop reading; 512 KB QoS 0 messages flow for 20 s."""
    subs = [hostile_subscriber(ctx, f"attack-slow-{i}", [(b"slow/t", 0)]) for i in range(3)]
    sent, nbytes, pub_closed = flood_publisher(ctx, b"slow/t", ctx.pick(20, 8))
    # The subscribers stay while Herald reads what the publisher left in its socket.
    closed = hold(ctx, 1, [c.sock for c in subs])
    for c in subs:
        c.close()
    return {"subscribers": len(subs), "published": sent, "published_mib": round(nbytes / MiB, 1),
            "publisher_closed": pub_closed, "subscribers_closed_by_herald": closed}


def case_trickle_reader(ctx):
    """One subscriber reads at 64 KB/s while 512 KB QoS 0 messages flow for 15 s."""
    sub = hostile_subscriber(ctx, "attack-trickle", [(b"trickle/t", 0)], rcvbuf=16 * KiB)
    stop = threading.Event()
    got = {"bytes": 0, "closed": False}

    def trickle():
        rate, tick = 64 * 1000, 0.05
        sub.sock.settimeout(tick)
        budget = 0.0
        while not stop.is_set():
            budget = min(budget + rate * tick, rate * tick * 2)
            t_end = time.monotonic() + tick
            while budget >= 1 and not stop.is_set():
                try:
                    data = sub.sock.recv(int(budget))
                except socket.timeout:
                    break
                except OSError:
                    got["closed"] = True
                    return
                if not data:
                    got["closed"] = True
                    return
                got["bytes"] += len(data)
                budget -= len(data)
            time.sleep(max(0.0, t_end - time.monotonic()))

    t = threading.Thread(target=trickle, daemon=True)
    t0 = time.monotonic()
    t.start()
    sent, nbytes, pub_closed = flood_publisher(ctx, b"trickle/t", ctx.pick(15, 6))
    time.sleep(1)
    stop.set()
    t.join(2)
    seconds = time.monotonic() - t0
    sub.close()
    return {"published": sent, "published_mib": round(nbytes / MiB, 1),
            "publisher_closed": pub_closed, "reader_kib": got["bytes"] // KiB,
            "reader_kb_per_s": round(got["bytes"] / 1000 / seconds, 1),
            "reader_closed_by_herald": got["closed"]}


def case_stored_bytes(ctx):
    """1,500 QoS 1 pushes of 512 KB, one to each of 1,500 client ids that never connect."""
    total = ctx.pick(1500, 1000)
    window = 16
    deadline = time.monotonic() + ctx.pick(90, 45)
    payload = b"S" * BIG_PAYLOAD
    acked = 0
    reconnects = 0
    sent = 0
    t0 = time.monotonic()
    pub = None
    inflight = set()
    while (sent < total or inflight) and time.monotonic() < deadline and not ctx.aborted():
        if pub is None:
            if reconnects > 20:
                break
            pub = RawClient(ctx.port)
            if pub.connect("attack-stored-pub") != 0:
                raise RuntimeError("stored-bytes publisher refused")
            inflight.clear()
        try:
            while sent < total and len(inflight) < window:
                pkid = sent % 65535 + 1
                pub.send(publish_header(f"push/ghost-{sent:05d}".encode(), len(payload), 1, pkid))
                if send_until(pub.sock, payload, deadline, ctx.aborted) < len(payload):
                    break
                inflight.add(pkid)
                sent += 1
            p = pub.read_packet(0.05)
            while p is not None:
                if p[0] == 0x40:
                    pkid = struct.unpack("!H", p[1])[0]
                    if pkid in inflight:
                        inflight.discard(pkid)
                        acked += 1
                p = pub.pending.popleft() if pub.pending else None
        except (Closed, OSError):
            pub.close()
            pub = None
            reconnects += 1
    if pub:
        pub.close()
    return {"pushes": total, "sent": sent, "pubacked": acked, "publisher_reconnects": reconnects,
            "seconds": round(time.monotonic() - t0, 1),
            "stored_mib_if_all_kept": round(acked * BIG_PAYLOAD / MiB, 1)}


class Conn:
    """State of one socket in the non-blocking attacks."""
    __slots__ = ("sock", "data", "off", "limit", "opened", "closed_at", "kind", "connected",
                 "got_connack", "deadline")

    def __init__(self, sock, data=b"", limit=None, kind="", deadline=None):
        self.sock = sock
        self.data = data
        self.off = 0
        self.limit = len(data) if limit is None else limit
        self.opened = time.monotonic()
        self.closed_at = None
        self.kind = kind
        self.connected = False
        self.got_connack = False
        self.deadline = deadline


def open_nonblocking(port, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    err = s.connect_ex((HOST, port))
    return s, err


def percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[max(0, math.ceil(q / 100.0 * len(v)) - 1)]  # nearest rank


def run_sockets(ctx, sel, conns, until, on_idle=None):
    """The event loop of the non-blocking attacks: completes connects, writes each
    connection's data up to its `limit`, reads (and drops) what Herald sends, notes when
    Herald closes. Returns when every connection is closed or at `until`."""
    live = set(conns)
    while live and time.monotonic() < until and not ctx.aborted():
        if on_idle:
            on_idle(live)
        for key, mask in sel.select(0.05):
            c = key.data
            if c not in live:
                continue
            ended = False
            if mask & selectors.EVENT_WRITE:
                if not c.connected:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        c.kind += ":connect_failed"
                        ended = True
                    c.connected = True
                if not ended and c.off < c.limit:
                    try:
                        c.off += c.sock.send(memoryview(c.data)[c.off:c.limit])
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        ended = True
            if not ended and mask & selectors.EVENT_READ:
                try:
                    data = c.sock.recv(65536)
                    if not data:
                        ended = True
                    elif data[0] == 0x20:
                        c.got_connack = True
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    ended = True
            if ended:
                c.closed_at = time.monotonic()
                live.discard(c)
                sel.unregister(c.sock)
                c.sock.close()
            elif c.connected and c.off >= c.limit:
                sel.modify(c.sock, selectors.EVENT_READ, c)
        now = time.monotonic()
        for c in [c for c in live if c.deadline is not None and now >= c.deadline]:
            live.discard(c)
            sel.unregister(c.sock)
            c.sock.close()
    for c in live:
        sel.unregister(c.sock)
        c.sock.close()


def big_first_packet(announced, will=False, byte1=0x10):
    """The first ~1 MiB of a packet that announces `announced` bytes: a CONNECT (with the will
    flag if `will`) whose client id claims 65,535 bytes, then filler; with another `byte1`,
    the same bytes under another packet type."""
    flags = 0x06 if will else 0x02  # clean session, and the will flag (will QoS 0)
    body_start = mstr(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + struct.pack("!H", 65535)
    return bytes([byte1]) + varint(announced) + body_start + b"c" * (announced - len(body_start))


def _unfinished_first_packets(ctx, plan):
    """Opens every socket of `plan` ([(kind, count, [packets], slow)]); each sends one of its
    packets but the last byte, at once or (slow) 64 KiB every 0.5 s after the fixed header,
    then waits until Herald closes it, or connect_timeout + 5 s."""
    sel = selectors.DefaultSelector()
    conns = []
    for kind, count, packets, slow in plan:
        for i in range(count):
            if len(conns) % 100 == 0:
                time.sleep(0.01)  # as in conn-flood: no more than the listen backlog at once
            data = packets[i % len(packets)]
            s, _ = open_nonblocking(ctx.port)
            # Slow ones start with the fixed header only; trickle() raises their limit.
            c = Conn(s, data, limit=1 + len(varint(len(data))) if slow else len(data) - 1, kind=kind)
            conns.append(c)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    slow_kinds = {kind for kind, _, _, slow in plan if slow}
    t0 = time.monotonic()
    step = 64 * KiB

    def trickle(live):
        ticks = int((time.monotonic() - t0) / 0.5)
        for c in live:
            if c.kind in slow_kinds:
                want = min(len(c.data) - 1, 4 + ticks * step)
                if want > c.limit:
                    c.limit = want
                    sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

    run_sockets(ctx, sel, conns, t0 + CONNECT_TIMEOUT + 5, on_idle=trickle)
    out = {"sockets": len(conns), "sent_mib": round(sum(c.off for c in conns) / MiB, 1)}
    for kind, _, _, _ in plan:
        mine = [c for c in conns if c.kind == kind]
        times = [c.closed_at - c.opened for c in mine if c.closed_at is not None]
        p50 = f"{percentile(times, 50):.2f}s" if times else "-"
        out[kind] = (f"closed {len(times)}/{len(mine)} after p50 {p50}, "
                     f"sent {sum(c.off for c in mine) // len(mine) // KiB} KiB each")
    return out


def case_unfinished_connect(ctx):
    """300 sockets send the fixed header of a ~1 MiB CONNECT and all of it but the last byte
    (150 at once, 150 at 64 KiB every 0.5 s), then wait for Herald to close them. 100 more do
    the same at once with a first packet that is not a CONNECT (PUBLISH, SUBSCRIBE, reserved
    type 15): a limit that looks only at CONNECT would let them through."""
    announced = MiB - 16  # remaining length: within server.max_packet_size (1 MiB)
    connect = big_first_packet(announced)
    others = [big_first_packet(announced, byte1=b) for b in (0x30, 0x82, 0xF0)]
    return _unfinished_first_packets(ctx, [("connect-fast", 150, [connect], False),
                                           ("connect-slow", 150, [connect], True),
                                           ("other-first-fast", 100, others, False)])


def case_unfinished_will_connect(ctx):
    """As unfinished-connect, with the will flag set in the 300 CONNECTs: a CONNECT with a will
    may be larger than server.max_connect_size, so what bounds these is whatever Herald keeps
    for large CONNECTs over all sockets."""
    will = big_first_packet(MiB - 16, will=True)
    return _unfinished_first_packets(ctx, [("will-fast", 150, [will], False),
                                           ("will-slow", 150, [will], True)])


BAD_UTF8 = [b"\xc3\x28", b"\xed\xa0\x80", b"\xff", b"\xc0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80"]


def mutated_packet(rng, i):
    """One hostile byte string for connection i: (kind, bytes). Kinds rotate so that every
    kind is sent; the details are random (seeded)."""
    cid = f"mut-{i}".encode()
    good = connect_packet(cid)
    pkid = rng.randrange(1, 65536)
    others = [
        publish_packet(b"mut/t", b"x" * rng.randrange(64), qos=0),
        publish_packet(b"mut/t", b"x" * rng.randrange(64), qos=1, pkid=pkid),
        publish_packet(b"mut/t", b"x" * rng.randrange(64), qos=2, pkid=pkid),
        subscribe_packet(pkid, [(b"mut/#", 1), (b"a/+/b", 0)]),
        unsubscribe_packet(pkid, [b"mut/#"]),
        id_packet(0x40, pkid), id_packet(0x50, pkid), id_packet(0x62, pkid), id_packet(0x70, pkid),
        PINGREQ,
    ]

    def flip(b, n=None):
        b = bytearray(b)
        for _ in range(n or rng.randrange(1, 4)):
            j = rng.randrange(len(b))
            b[j] ^= 1 << rng.randrange(8)
        return bytes(b)

    def bad(s):
        """`s` with U+0000 or an invalid UTF-8 sequence inside."""
        seq = b"\x00" if rng.random() < 0.3 else rng.choice(BAD_UTF8)
        j = rng.randrange(len(s) + 1)
        return s[:j] + seq + s[j:]

    kinds = [
        ("bitflip-connect", lambda: flip(good)),
        ("bitflip-packet", lambda: good + flip(rng.choice(others))),
        ("truncated-connect", lambda: good[:rng.randrange(1, len(good))]),
        ("truncated-then-packet", lambda: good + (lambda p: p[:rng.randrange(1, len(p))])(rng.choice(others)) + PINGREQ),
        ("len-5-bytes", lambda: good + b"\x30\xff\xff\xff\xff\x7f"),
        ("len-over-max", lambda: good + b"\x30\xff\xff\xff\x7f"),
        ("len-over-max-connect", lambda: b"\x10\xff\xff\xff\x7f" + good[2:]),
        ("len-short-publish", lambda: good + b"\x32\x03\x00\x10a"),
        ("len-short-connect", lambda: b"\x10\x05" + good[2:7]),
        ("len-long-connect", lambda: frame(0x10, good[2:] + b"\x00" * rng.randrange(1, 64))),
        ("len-ack", lambda: good + b"\x40\x03\x00\x01\x00"),
        ("nul-or-utf8-client-id", lambda: connect_packet(bad(cid))),
        ("nul-or-utf8-topic", lambda: good + publish_packet(bad(b"mut/t"), b"x")),
        ("nul-or-utf8-filter", lambda: good + subscribe_packet(pkid, [(bad(b"mut/#"), 0)])),
        ("nul-or-utf8-unsub", lambda: good + unsubscribe_packet(pkid, [bad(b"mut/#")])),
        ("nul-or-utf8-user", lambda: connect_packet(cid, user=bad(b"user"), password=b"pw")),
        ("nul-or-utf8-will-topic", lambda: connect_packet(cid, will=(bad(b"will/t"), b"w", 0, False))),
        ("flags-subscribe", lambda: good + subscribe_packet(pkid, [(b"a", 0)], byte1=rng.choice([0x80, 0x83, 0x8a]))),
        ("flags-unsubscribe", lambda: good + unsubscribe_packet(pkid, [b"a"], byte1=0xa0)),
        ("flags-pubrel", lambda: good + id_packet(0x60, pkid)),
        ("flags-publish-qos3", lambda: good + b"\x36" + publish_packet(b"mut/t", b"x", 1, pkid)[1:]),
        ("flags-connect-byte1", lambda: bytes([0x10 | rng.randrange(1, 16)]) + good[1:]),
        ("flags-connect-reserved", lambda: connect_packet(cid, extra_flags=0x01)),
        ("flags-password-no-user", lambda: connect_packet(cid, password=b"pw")),
        ("flags-will-qos3", lambda: connect_packet(cid, will=(b"will/t", b"w", 3, False))),
        ("flags-will-retain-no-will", lambda: connect_packet(cid, extra_flags=0x20)),
        ("flags-pingreq", lambda: good + b"\xc1\x00"),
        ("type-reserved", lambda: good + rng.choice([b"\x00\x00", b"\xf0\x00"])),
        ("type-first-not-connect", lambda: rng.choice(others)),
        ("type-second-connect", lambda: good + good),
        ("type-server-packets", lambda: good + rng.choice([b"\x20\x02\x00\x00", b"\x90\x03\x00\x01\x00", b"\xd0\x00", b"\xb0\x02\x00\x01"])),
        ("proto-name", lambda: connect_packet(cid, proto=rng.choice([b"MQTX", b"", b"MQIsdpX", b"mqtt"]))),
        ("proto-level", lambda: connect_packet(cid, level=rng.choice([0, 1, 2, 5, 6, 255]))),
        ("subscribe-qos3", lambda: good + subscribe_packet(pkid, [(b"a", 3)])),
        ("subscribe-empty", lambda: good + frame(0x82, struct.pack("!H", pkid))),
        ("unsubscribe-empty", lambda: good + frame(0xa2, struct.pack("!H", pkid))),
        ("pkid-zero", lambda: good + publish_packet(b"mut/t", b"x", 1, 0)),
        ("wildcard-publish-topic", lambda: good + publish_packet(rng.choice([b"a/+", b"#", b"a/#"]), b"x")),
        ("empty-topic", lambda: good + publish_packet(b"", b"x")),
        ("garbage", lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))),
        ("garbage-after-connect", lambda: good + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))),
        ("many-flipped", lambda: good + b"".join(flip(rng.choice(others), 1) for _ in range(50))),
    ]
    kind, make = kinds[i % len(kinds)]
    return kind, make()


def case_malformed(ctx):
    """3,000 short connections, 50 at a time, each sending one mutated byte string, waiting up
    to 1 s for Herald to close it."""
    total = ctx.pick(3000, 1000)
    concurrency = 50
    rng = random.Random(ctx.seed)
    sel = selectors.DefaultSelector()
    conns = []
    started = [0]

    def refill(live):
        while started[0] < total and len(live) < concurrency:
            kind, data = mutated_packet(rng, started[0])
            s, _ = open_nonblocking(ctx.port)
            c = Conn(s, data, kind=kind, deadline=time.monotonic() + 1.0)
            conns.append(c)
            live.add(c)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
            started[0] += 1

    seed = set()
    refill(seed)
    run_sockets(ctx, sel, list(seed), time.monotonic() + ctx.pick(120, 60), on_idle=refill)
    closed = sum(1 for c in conns if c.closed_at is not None)
    by_kind = collections.Counter()
    open_kinds = collections.Counter()
    for c in conns:
        by_kind[c.kind] += 1
        if c.closed_at is None:
            open_kinds[c.kind] += 1
    return {"connections": len(conns), "kinds": len(by_kind),
            "closed_by_herald": closed, "left_open_1s": len(conns) - closed,
            "connack_seen": sum(1 for c in conns if c.got_connack),
            "left_open_by_kind": dict(open_kinds.most_common())}


def case_conn_flood(ctx):
    """5,000 connections opened as fast as possible that never send CONNECT, held until
    Herald closes them or connect_timeout + 5 s."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(ctx.pick(5000, 2000), max(100, min(soft, hard) // 2 - 1000))
    sel = selectors.DefaultSelector()
    conns = []
    t0 = time.monotonic()
    failed = 0
    for i in range(n):
        if ctx.aborted():
            break
        if i % 100 == 0:
            # 100 per 10 ms: quick, but slow enough for Herald's accept loop to keep its listen
            # backlog (128) from overflowing; the connections the kernel drops then (with
            # syncookies) would never reach Herald, so they would test nothing.
            time.sleep(0.01)
        try:
            s, err = open_nonblocking(ctx.port, rcvbuf=4096)
        except OSError:
            failed += 1
            continue
        c = Conn(s, b"", kind="idle")
        conns.append(c)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    open_secs = time.monotonic() - t0
    # A few handshakes may still complete on the SYN-ACK retransmit 1 s later.
    run_sockets(ctx, sel, conns, t0 + CONNECT_TIMEOUT + 6)
    closed = [c for c in conns if c.closed_at is not None and not c.kind.endswith("connect_failed")]
    times = [c.closed_at - c.opened for c in closed]
    return {"connections": len(conns), "open_seconds": round(open_secs, 2),
            "socket_errors": failed,
            "connect_failed": sum(1 for c in conns if c.kind.endswith("connect_failed")),
            "closed_by_herald": len(closed),
            "still_open_at_end": sum(1 for c in conns if c.closed_at is None),
            "close_after_s_p50": round(percentile(times, 50), 2) if times else None,
            "close_after_s_max": round(max(times), 2) if times else None}


class Case:
    def __init__(self, name, fn, bound, seconds):
        self.name = name
        self.fn = fn
        self.bound = bound  # store -> MiB over baseline
        self.seconds = seconds  # (full, quick): the longest the attack may take


CASES = [
    Case("retained-dup", case_retained_dup, {"memory": 64, "redis": 64}, (40, 30)),
    Case("retained-overlap", case_retained_overlap, {"memory": 64, "redis": 64}, (40, 30)),
    Case("slow-readers", case_slow_readers, {"memory": 64, "redis": 64}, (50, 35)),
    Case("trickle-reader", case_trickle_reader, {"memory": 64, "redis": 64}, (45, 30)),
    Case("stored-bytes", case_stored_bytes, {"memory": 256 + 64, "redis": 64}, (110, 65)),
    Case("unfinished-connect", case_unfinished_connect, {"memory": 64, "redis": 64}, (40, 40)),
    Case("unfinished-will-connect", case_unfinished_will_connect, {"memory": 96, "redis": 96}, (40, 40)),
    Case("malformed", case_malformed, {"memory": 64, "redis": 64}, (140, 80)),
    Case("conn-flood", case_conn_flood, {"memory": 64, "redis": 64}, (50, 50)),
]


def attack_process(name, port, quick, seed, abort, out):
    """Entry point of the attack process: runs one case at nice +5 and sends back its
    figures (or the error that stopped it)."""
    try:
        os.nice(5)
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    case = next(c for c in CASES if c.name == name)
    try:
        result = case.fn(Ctx(port, quick, seed, abort))
    except Exception as e:  # reported as the case's error
        result = {"error": f"{type(e).__name__}: {e}"}
    # Evidence that the attacker itself stays small (it never holds more than a few buffers).
    result["attacker_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KiB, 1)
    out.send(result)
    out.close()


# ---------------------------------------------------------------------------------------------
# The honest clients: their own process, paho-mqtt.


def honest_process(conn, port, devices, rate):
    """20 devices (clean session 0, keepalive 30) and one publisher of QoS 1 pushes. Commands
    from the parent: "start" (publish at `rate`), "stop" (stop, wait up to HONEST_GRACE for
    the last pushes, send the figures back), "quit"."""
    import paho.mqtt.client as mqtt

    lock = threading.Lock()
    sent = {}  # seq -> time published
    latency = {}  # seq -> seconds
    counts = collections.Counter()
    connected = threading.Semaphore(0)
    started = set()

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.value == 0:
            with lock:
                if userdata in started:
                    counts["reconnects"] += 1
                started.add(userdata)
            connected.release()
        else:
            with lock:
                counts["refused"] += 1

    def on_disconnect(client, userdata, flags, reason_code, properties):
        with lock:
            counts["disconnects"] += 1

    def on_message(client, userdata, msg):
        now = time.monotonic()
        seq, t_pub = struct.unpack_from("!Qd", msg.payload)
        with lock:
            if seq in latency:
                counts["duplicates"] += 1
            else:
                latency[seq] = now - t_pub

    def on_publish(client, userdata, mid, reason_code, properties):
        with lock:
            counts["pubacked"] += 1

    def client(cid, clean):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean,
                        protocol=mqtt.MQTTv311, userdata=cid)
        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = on_message
        c.on_publish = on_publish
        c.max_queued_messages_set(0)
        c.connect(HOST, port, keepalive=30)
        c.loop_start()
        return c

    clients = [client(f"honest-{i}", False) for i in range(devices)]
    pub = client("honest-pub", True)
    deadline = time.monotonic() + 10
    for _ in range(devices + 1):
        if not connected.acquire(timeout=max(0.0, deadline - time.monotonic())):
            conn.send(("error", "honest clients could not connect within 10 s"))
            return
    conn.send(("ready", None))

    stop = threading.Event()

    def publish_loop():
        seq = 0
        pad = b"h" * 48
        t_next = time.monotonic()
        while not stop.is_set():
            t_next += 1.0 / rate
            delay = t_next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            with lock:
                sent[seq] = now
            pub.publish(f"push/honest-{seq % devices}", struct.pack("!Qd", seq, now) + pad, qos=1)
            seq += 1

    publisher = None
    while True:
        cmd = conn.recv()
        if cmd == "start":
            publisher = threading.Thread(target=publish_loop, daemon=True)
            publisher.start()
        elif cmd == "stop":
            stop.set()
            if publisher:
                publisher.join(2)
            end = time.monotonic() + HONEST_GRACE
            while time.monotonic() < end:
                with lock:
                    if all(s in latency for s in sent):
                        break
                time.sleep(0.05)
            with lock:
                lat = [latency[s] * 1000 for s in sent if s in latency]
                late = [s for s in latency if s not in sent]
                result = {
                    "published": len(sent),
                    "pubacked": counts["pubacked"],
                    "received": len(lat),
                    "lost": len(sent) - len(lat),
                    "duplicates": counts["duplicates"],
                    "unexpected": len(late),
                    "disconnects": counts["disconnects"],
                    "reconnects": counts["reconnects"],
                    "p50_ms": percentile(lat, 50),
                    "p99_ms": percentile(lat, 99),
                    "max_ms": max(lat) if lat else None,
                    # The 5 slowest: (when published, time.monotonic(); latency in ms).
                    "worst": sorted(((sent[q], round(latency[q] * 1000, 1))
                                     for q in sent if q in latency), key=lambda w: -w[1])[:5],
                }
            conn.send(("result", result))
        elif cmd == "quit":
            for c in clients + [pub]:
                c.disconnect()
                c.loop_stop()
            conn.send(("bye", None))
            return


# ---------------------------------------------------------------------------------------------
# Processes this script starts, and what it reads from them.


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def stop_process(p, grace=5.0):
    """SIGTERM to the one process `p` (a Popen we started), then SIGKILL after `grace`."""
    if p is None or p.poll() is not None:
        return None if p is None else p.returncode
    p.terminate()
    try:
        return p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait(5)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_port(port, proc, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def redis_command(port, *args, timeout=10.0):
    """One Redis command over RESP; returns the reply's text (bulk or simple)."""
    req = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (x.encode() for x in args))
    with socket.create_connection((HOST, port), timeout) as s:
        s.sendall(req)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n")
        if head.startswith(b"$"):
            n = int(head[1:])
            while len(rest) < n:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return rest[:n].decode()
        return head.decode()


class Redis:
    """A private redis-server on a free loopback port, in a temp dir, in memory only (no AOF,
    no RDB: the attack is about Herald's memory, not Redis's durability)."""

    def __init__(self, tmp):
        self.dir = os.path.join(tmp, "redis")
        os.makedirs(self.dir)
        self.proc = None
        for _ in range(3):
            self.port = free_ports(1)[0]
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", HOST, "--dir", self.dir,
                 "--appendonly", "no", "--save", "", "--logfile", os.path.join(self.dir, "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._ready():
                return
            stop_process(self.proc)
        raise RuntimeError("redis-server did not start")

    def _ready(self):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                info = redis_command(self.port, "INFO", "server", timeout=0.5)
                if f"process_id:{self.proc.pid}" in info:
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def url(self):
        return f"redis://{HOST}:{self.port}/0"

    def used_memory(self):
        for line in redis_command(self.port, "INFO", "memory").splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        return None

    def flush(self):
        redis_command(self.port, "FLUSHALL", timeout=60)

    def stop(self):
        stop_process(self.proc)


class Herald:
    """One Herald process on free loopback ports, its log in the temp dir."""

    def __init__(self, binary, tmp, name, redis=None):
        self.port, self.metrics_port = free_ports(2)
        self.log_path = os.path.join(tmp, f"herald-{name}.log")
        args = [binary, "--listen", f"{HOST}:{self.port}", "--metrics-listen",
                f"{HOST}:{self.metrics_port}", "--log-level", "info"]
        if redis:
            args += ["--store", "redis", "--redis-url", redis.url()]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, NO_COLOR="1"))
        self.pid = self.proc.pid
        if not (wait_port(self.port, self.proc) and wait_port(self.metrics_port, self.proc)):
            self.stop()
            raise RuntimeError(f"herald did not start; its log:\n{self.log_tail()}")

    def alive(self):
        return self.proc.poll() is None

    def metrics(self):
        """Every series of a /metrics scrape: {'name{labels}': value}."""
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def log_tail(self, n=30):
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        rc = stop_process(self.proc)
        self.log.close()
        return rc


class RssSampler(threading.Thread):
    """Samples VmRSS every 100 ms; raises `abort` past `abort_kib`."""

    def __init__(self, pid, abort, abort_kib):
        super().__init__(daemon=True)
        self.pid = pid
        self.abort = abort
        self.abort_kib = abort_kib
        self.peak = 0
        self.samples = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        while not self.halt.is_set():
            kib = rss_kib(self.pid)
            if kib is None:
                break
            self.samples.append((round(time.monotonic() - self.t0, 2), kib))
            self.peak = max(self.peak, kib)
            if kib > self.abort_kib:
                self.abort.set()
            self.halt.wait(0.1)

    def stop(self):
        self.halt.set()
        self.join(2)


def probe_connect(port):
    """A fresh client's CONNECT: (ok, what happened)."""
    try:
        c = RawClient(port)
        t0 = time.monotonic()
        rc = c.connect(f"attack-probe-{os.getpid()}", timeout=5.0)
        ms = (time.monotonic() - t0) * 1000
        c.send(DISCONNECT)
        c.close()
        return rc == 0, f"CONNACK {rc} in {ms:.1f} ms"
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"


def metric_deltas(before, after):
    out = {}
    for key, value in after.items():
        if any(key == f or key.startswith(f + "{") for f in METRIC_FAMILIES):
            d = value - before.get(key, 0.0)
            if d:
                out[key] = int(d) if float(d).is_integer() else d
    return out


def short_metric(key):
    name, _, labels = key.partition("{")
    name = name.replace("herald_", "").replace("_total", "")
    labels = ",".join(part.split("=", 1)[1].strip('"') for part in labels.rstrip("}").split(",") if part)
    return f"{name}{{{labels}}}" if labels else name


# ---------------------------------------------------------------------------------------------
# Running a case.


def run_case(case, store, args, tmp, redis):
    """Fresh Herald, honest clients, the attack, the checks. Returns the case's record."""
    rec = {"case": case.name, "store": store, "failures": []}
    mp = multiprocessing.get_context("spawn")
    herald = honest = attacker = sampler = None
    try:
        if redis:
            redis.flush()
        herald = Herald(args.herald, tmp, f"{store}-{case.name}", redis)
        parent_end, child_end = mp.Pipe()
        honest = mp.Process(target=honest_process, args=(child_end, herald.port, HONEST_DEVICES, HONEST_RATE),
                            daemon=True)
        honest.start()
        if not parent_end.poll(30):
            raise RuntimeError("honest clients did not report within 30 s")
        kind, msg = parent_end.recv()
        if kind != "ready":
            raise RuntimeError(msg)
        time.sleep(0.5)
        base_kib = rss_kib(herald.pid)
        bound_kib = base_kib + case.bound[store] * KiB
        rec["baseline_mib"] = round(base_kib / KiB, 1)
        rec["bound_mib"] = round(bound_kib / KiB, 1)
        rec["bound_rule"] = f"baseline + {case.bound[store]} MiB"
        before = herald.metrics()

        abort = mp.Event()
        sampler = RssSampler(herald.pid, abort, args.rss_abort * KiB)
        sampler.start()
        parent_end.send("start")
        time.sleep(HONEST_WARMUP)

        att_parent, att_child = mp.Pipe()
        attacker = mp.Process(target=attack_process, daemon=True,
                              args=(case.name, herald.port, args.quick, args.seed, abort, att_child))
        t0 = time.monotonic()
        attacker.start()
        limit = case.seconds[1 if args.quick else 0]
        details = None
        while time.monotonic() - t0 < limit:
            if att_parent.poll(0.2):
                details = att_parent.recv()
                break
            if not attacker.is_alive():
                break
        if details is None:
            details = {"error": f"attack did not finish within {limit} s"}
        attacker.join(5)
        if attacker.is_alive():
            attacker.terminate()  # by PID: the process we started
            attacker.join(5)
        t_end = time.monotonic()
        rec["attack_seconds"] = round(t_end - t0, 1)
        rec["attack"] = details

        parent_end.send("stop")
        if not parent_end.poll(HONEST_GRACE + 15):
            raise RuntimeError("honest clients did not report after the attack")
        kind, honest_result = parent_end.recv()
        # CLOCK_MONOTONIC is system-wide: publish times relative to the attack's start.
        honest_result["worst"] = [(round(t - t0, 2), ms) for t, ms in honest_result["worst"]]
        rec["honest"] = honest_result

        rec["alive"] = herald.alive()
        ok, what = probe_connect(herald.port) if rec["alive"] else (False, "herald is not running")
        rec["fresh_connect"] = what
        if rec["alive"]:
            try:
                after = herald.metrics()
                rec["metrics"] = metric_deltas(before, after)
                rec["connections_active_after"] = after.get("herald_connections_active")
            except OSError as e:
                rec["metrics"] = {}
                rec["failures"].append(f"metrics scrape failed: {e}")
        else:
            rec["metrics"] = {}
        if redis:
            rec["redis_used_memory_mib"] = round(redis.used_memory() / MiB, 1)
        # Reported, not checked: whether Herald gives the memory back once the attack is over.
        time.sleep(max(0.0, t_end + AFTER_SECONDS - time.monotonic()))
        rec["rss_after_mib"] = round((rss_kib(herald.pid) or 0) / KiB, 1)
        sampler.stop()
        rec["peak_rss_mib"] = round(sampler.peak / KiB, 1)
        rec["rss_samples_kib"] = sampler.samples

        if sampler.peak > bound_kib:
            rec["failures"].append(f"peak RSS {sampler.peak / KiB:.1f} MiB > bound {bound_kib / KiB:.1f} MiB")
        if abort.is_set():
            rec["failures"].append(f"attack stopped early: RSS passed --rss-abort {args.rss_abort} MiB")
        if "error" in details:
            rec["failures"].append(f"attack: {details['error']}")
        h = honest_result
        if h["p99_ms"] is None or h["p99_ms"] >= HONEST_P99_MS:
            worst = ", ".join(f"{ms:.0f} ms at {t:+.1f} s" for t, ms in h["worst"][:3])
            rec["failures"].append(f"honest p99 {fmt(h['p99_ms'], ' ms')} >= {HONEST_P99_MS:.0f} ms"
                                   f" (slowest, by publish time from the attack's start: {worst})")
        if h["lost"]:
            rec["failures"].append(f"{h['lost']} of {h['published']} honest pushes not received")
        if not rec["alive"]:
            rec["failures"].append("herald died")
            rec["herald_log_tail"] = herald.log_tail()
        elif not ok:
            rec["failures"].append(f"fresh CONNECT failed: {what}")
            rec["herald_log_tail"] = herald.log_tail()
    except Exception as e:
        rec["failures"].append(f"{type(e).__name__}: {e}")
        if herald:
            rec.setdefault("herald_log_tail", herald.log_tail())
    finally:
        if sampler and sampler.is_alive():
            sampler.stop()
            rec.setdefault("peak_rss_mib", round(sampler.peak / KiB, 1))
        if attacker and attacker.is_alive():
            attacker.terminate()
            attacker.join(5)
        if honest:
            try:
                parent_end.send("quit")
                parent_end.poll(5)
            except (OSError, BrokenPipeError):
                pass
            honest.join(5)
            if honest.is_alive():
                honest.terminate()
                honest.join(5)
        if herald:
            rec["herald_exit"] = herald.stop()
    rec["result"] = "FAIL" if rec["failures"] else "PASS"
    return rec


def fmt(v, unit="", digits=1):
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def print_record(rec):
    h = rec.get("honest") or {}
    lost = f"{h['lost']}/{h['published']}" if h else "-"
    metrics = " ".join(f"{short_metric(k)}={v}" for k, v in sorted(rec.get("metrics", {}).items())
                       if any(k.startswith(f) for f in LINE_METRICS))
    print(f"{rec['case']:<23} {rec['store']:<6} peak {fmt(rec.get('peak_rss_mib'), ' MiB'):>12}"
          f"  bound {fmt(rec.get('bound_mib'), ' MiB'):>10}  p99 {fmt(h.get('p99_ms'), ' ms', 1):>9}"
          f"  lost {lost:>9}  {rec['result']}  {metrics}", flush=True)
    attack = {k: v for k, v in (rec.get("attack") or {}).items() if k != "error"}
    extra = " ".join(f"{k}=[{v}]" if isinstance(v, str) and " " in v else f"{k}={v}"
                     for k, v in attack.items())
    if "redis_used_memory_mib" in rec and rec["case"] == "stored-bytes":
        extra += f" redis_used_memory_mib={rec['redis_used_memory_mib']}"
    print(f"    baseline {fmt(rec.get('baseline_mib'), ' MiB')}, {fmt(rec.get('rss_after_mib'), ' MiB')}"
          f" {AFTER_SECONDS:.0f} s after the attack; {extra}", flush=True)
    for f in rec["failures"]:
        print(f"    FAIL: {f}", flush=True)
    if rec.get("herald_log_tail") and rec["failures"]:
        print("    herald log tail:\n" + "\n".join("      " + l for l in rec["herald_log_tail"].splitlines()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--herald", default=os.environ.get("HERALD", "target/release/herald"),
                    help="the herald binary (default: $HERALD, else target/release/herald)")
    ap.add_argument("--store", choices=["memory", "redis", "both"], default="both")
    ap.add_argument("--case", action="append", default=[],
                    help="run only this case (repeatable, or comma-separated); see --list")
    ap.add_argument("--quick", action="store_true", help="shorter attacks and fewer messages")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    ap.add_argument("--rss-abort", type=int, default=3072, metavar="MIB",
                    help="stop a case when Herald's RSS passes this (default 3072 MiB)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the malformed-packet mutations")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args()

    if args.list:
        for c in CASES:
            print(f"{c.name:<23} bound: baseline + {c.bound['memory']} MiB (memory), + {c.bound['redis']} MiB (redis)")
        return 0
    names = [n for arg in args.case for n in arg.split(",") if n]
    unknown = [n for n in names if n not in {c.name for c in CASES}]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(c.name for c in CASES)}")
    cases = [c for c in CASES if not names or c.name in names]
    if not os.path.isfile(args.herald) or not os.access(args.herald, os.X_OK):
        print(f"attack: no herald binary at {args.herald} (run 'make build' first, or pass --herald)", file=sys.stderr)
        return 2
    args.herald = os.path.abspath(args.herald)
    try:
        import paho.mqtt  # noqa: F401  (the honest clients need it)
    except ImportError:
        print("attack: paho-mqtt is missing: pip install -r interop/requirements.txt", file=sys.stderr)
        return 2
    stores = ["memory", "redis"] if args.store == "both" else [args.store]
    if "redis" in stores and not shutil.which("redis-server"):
        print("attack: redis-server is missing (Debian: apt-get install redis-server)", file=sys.stderr)
        return 2

    version = subprocess.run([args.herald, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"attack: {version} ({args.herald}); stores: {', '.join(stores)}; "
          f"{'quick' if args.quick else 'full'} run; honest: {HONEST_DEVICES} devices, "
          f"{HONEST_RATE:.0f} pushes/s QoS 1, p99 < {HONEST_P99_MS:.0f} ms", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    records = []
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="herald-attack-") as tmp:
            for store in stores:
                redis = Redis(tmp) if store == "redis" else None
                try:
                    for case in cases:
                        rec = run_case(case, store, args, tmp, redis)
                        records.append(rec)
                        print_record(rec)
                finally:
                    if redis:
                        redis.stop()
    except (KeyboardInterrupt, SystemExit):
        # run_case's and the loop's cleanup ran on the way out: nothing of ours is left running.
        print("attack: interrupted", file=sys.stderr)
        return 130
    failed = sum(1 for r in records if r["result"] == "FAIL")
    print(f"attack: {time.monotonic() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"herald": version, "quick": args.quick, "cases": records}, f, indent=1)
    print(f"{len(records) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
