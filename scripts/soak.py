#!/usr/bin/env python3
"""Soak test: many persistent-session devices, churn and QoS 1 pushes against one Herald on Redis.

`make soak` runs it (not part of `make test` or CI). Python 3 standard library only: the MQTT
3.1.1 client is the few packets it needs (CONNECT/CONNACK, PUBLISH QoS 1/PUBACK,
PINGREQ/PINGRESP, DISCONNECT), hand-encoded on asyncio sockets, so that 15,000 devices fit
in one process and one core.

What it does:
  1. Starts its own redis-server (free loopback port, temp dir, appendonly yes, appendfsync
     everysec, no RDB) and Herald (--store redis, MQTT and /metrics on free loopback ports,
     --log-level warn, its log in the temp dir). It stops exactly these two processes, by PID,
     at the end, on error and on Ctrl-C. Its own RLIMIT_NOFILE soft limit is raised to the hard
     limit first (Herald inherits it).
  2. Baseline: Herald's RSS and open fds, Redis used_memory and keys, before any client.
  3. Connect: N devices (`soak-<i>`, clean session 0, keepalive 60) at --connect-rate.
     Each device PUBACKs every QoS 1 PUBLISH and records the payload's message id.
  4. Churn, for --duration seconds: every --churn-interval s, --churn % of the devices go
     offline at a random moment of the interval, for a random --offline-min..--offline-max s:
     DISCONNECT, a plain close (FIN), a reset (RST), or "vanish" (stop reading and acking,
     socket left open: the device's next CONNECT takes the session over and Herald must close
     the old socket). Meanwhile --publishers connections push QoS 1 to random devices'
     `push/soak-<i>` at --rate msgs/s in total, each payload carrying a unique id. A message
     is "acknowledged" once its publisher got the PUBACK (Herald stored it in the outbox).
  5. Drain: publishing stops; after a short settle every device reconnects with clean
     session 0 and the run waits until every acknowledged message has arrived, or --drain-timeout.
  6. Clean: every device disconnects, connects once with clean session 1 (Herald discards its
     session) and disconnects again; the publishers leave.
  7. Checks, a summary table, --json FILE:
     (a) zero acknowledged messages lost (duplicates are allowed and counted);
     (b) Herald's RSS flat after warm-up: the mean RSS of the last third of the churn phase
         (after --warmup s) is less than --rss-growth % (default 10) above the first third's;
     (c) Herald's open fds back to the baseline + --fd-slack once every client is gone;
     (d) Redis back to its baseline: keys other than the kinds Herald keeps by design
         (--persistent-kinds, default `box`: herald:box:{cid}, a client's outbox, a stream that
         stays, empty, until its TTL (session.message_ttl) once it has held a message, see
         src/redis/keys.rs) back to the baseline count, and used_memory within
         --redis-slack-mb of the baseline plus what those kept keys take (MEMORY USAGE of a
         sample of them times their number);
     (e) no protocol anomalies: no PUBLISH on the wrong device's connection, no redelivery
         without DUP=1, no out-of-order first delivery (same publisher, same device), no lost
         persistent session (session present 0 on a reconnect), no device connection closed
         by Herald, no CONNECT refused.
  It prints one line per --sample-interval (5 s): Herald's RSS (VmRSS) and fds
  (/proc/PID/fd), Redis used_memory and keys, connections_active and messages_dropped from
  /metrics, throughput, and the CPU of Herald, Redis and this script, plus the worst
  event-loop lag (a lagging loop would mean the load generator is the bottleneck).

Exit status: 0 when every check passed, 1 when one failed, 2 on a usage or setup error.

Usage: scripts/soak.py [--herald PATH] [--quick] [--devices N] [--duration S] [--rate R] ...
       (see --help)
"""

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
ME = "soak"


def log(msg):
    print(f"{ME}: {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# MQTT 3.1.1, the few packets a device and a publisher need

class ProtocolError(Exception):
    pass


def _varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _str(b):
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id, clean, keepalive):
    body = _str(b"MQTT") + bytes([4, 0x02 if clean else 0x00]) + struct.pack("!H", keepalive)
    body += _str(client_id)
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic, packet_id, payload, dup=False):
    body = _str(topic) + struct.pack("!H", packet_id) + payload
    return bytes([0x32 | (0x08 if dup else 0)]) + _varint(len(body)) + body


def puback_packet(packet_id):
    return b"\x40\x02" + struct.pack("!H", packet_id)


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
T_CONNACK, T_PUBLISH, T_PUBACK, T_PINGRESP = 2, 3, 4, 13


def parse_packets(buf):
    """Takes the complete packets off the front of the bytearray `buf`: [(first byte, body)]."""
    out = []
    i, n = 0, len(buf)
    while n - i >= 2:
        j, mult, length = i + 1, 1, 0
        while True:
            if j >= n:
                length = None
                break
            b = buf[j]
            j += 1
            length += (b & 0x7F) * mult
            if not b & 0x80:
                break
            mult *= 128
            if mult > 128 ** 3:
                raise ProtocolError("remaining length over 4 bytes")
        if length is None or n - j < length:
            break
        out.append((buf[i], bytes(buf[j:j + length])))
        i = j + length
    if i:
        del buf[:i]
    return out


# --------------------------------------------------------------------------------------------
# Redis: a blocking RESP client, enough for INFO, DBSIZE, SCAN and MEMORY USAGE

class RedisError(Exception):
    pass


class Resp:
    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def close(self):
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def cmd(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self):
        line = self.f.readline()
        if not line:
            raise RedisError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RedisError(f"unexpected reply {line!r}")

    def info(self, section):
        text = self.cmd("INFO", section).decode()
        out = {}
        for ln in text.splitlines():
            if ":" in ln and not ln.startswith("#"):
                k, v = ln.split(":", 1)
                out[k] = v
        return out


def redis_memory_stats(port):
    """MEMORY STATS as a flat dict (db.N entries flattened to db.N.overhead.hashtable.main, ...)."""
    with Resp(port) as r:
        reply = r.cmd("MEMORY", "STATS")
    out = {}

    def walk(prefix, items):
        for i in range(0, len(items) - 1, 2):
            k = items[i].decode() if isinstance(items[i], bytes) else str(items[i])
            v = items[i + 1]
            if isinstance(v, list):
                walk(prefix + k + ".", v)
            else:
                out[prefix + k] = v.decode() if isinstance(v, bytes) else v
    walk("", reply)
    return out


def redis_keys_by_kind(port, sample_per_kind=0):
    """SCAN of the whole keyspace: {kind: count}, kind = `box` for herald:box:{..}, the whole
    key for keys without a client part, `other` for keys not Herald's. With sample_per_kind,
    also {kind: [a few key names]} (for MEMORY USAGE)."""
    counts, samples = {}, {}
    with Resp(port, timeout=30) as r:
        cursor = b"0"
        while True:
            cursor, keys = r.cmd("SCAN", cursor, "COUNT", 2000)
            for k in keys:
                if k.startswith(b"herald:"):
                    parts = k.split(b":", 2)
                    kind = parts[1].decode() if len(parts) == 3 and parts[2].startswith(b"{") else k.decode()
                else:
                    kind = "other"
                counts[kind] = counts.get(kind, 0) + 1
                if sample_per_kind and len(samples.setdefault(kind, [])) < sample_per_kind:
                    samples[kind].append(k)
            if cursor == b"0":
                break
    return counts, samples


# --------------------------------------------------------------------------------------------
# The processes this script starts, and only those

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    return None


def proc_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def self_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _pdeathsig():
    """In the child: SIGKILL it if this script dies without cleaning up (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def port_free(port):
    s = socket.socket()
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


_taken = set()


def free_port():
    """A free loopback port below the ephemeral range (32768+), so that none of the
    thousands of client sockets can be holding it; never 1883 or 6379, never twice."""
    for _ in range(1000):
        p = random.randrange(20000, 32000)
        if p in (1883, 6379) or p in _taken or not port_free(p):
            continue
        _taken.add(p)
        return p
    raise RuntimeError("no free port found")


class Procs:
    def __init__(self, tmp):
        self.tmp = tmp
        self.started = []  # (name, Popen)

    def spawn(self, name, argv, logfile):
        f = open(logfile, "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=_pdeathsig,
                             env=dict(os.environ, NO_COLOR="1"))
        f.close()
        self.started.append((name, p))
        return p

    def stop(self, p, timeout=10.0):
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                return p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
        return p.wait()

    def stop_all(self):
        for _name, p in reversed(self.started):
            if p.poll() is None:
                self.stop(p)


def start_redis(procs, tmp):
    for _ in range(5):
        port = free_port()
        d = os.path.join(tmp, f"redis-{port}")
        os.makedirs(d)
        p = procs.spawn("redis-server", [
            "redis-server", "--bind", HOST, "--port", str(port), "--dir", d,
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--logfile", "",
            # Redis 7 allocates a ~24 KB latency histogram for each command name the first
            # time it runs: a step in used_memory unrelated to the data, off for check (d).
            "--latency-tracking", "no"], os.path.join(d, "redis.log"))
        deadline = time.time() + 20
        while time.time() < deadline and p.poll() is None:
            try:
                with Resp(port, timeout=1) as r:
                    # Answered by our redis-server, and done loading.
                    if int(r.info("server").get("process_id", -1)) == p.pid:
                        r.cmd("PING")
                        return p, port
            except (OSError, RedisError, ValueError):
                pass
            time.sleep(0.05)
        procs.stop(p)
    raise RuntimeError("could not start redis-server (see its log in the temp dir)")


def start_herald(procs, tmp, binary, redis_port, extra):
    port, mport = free_port(), free_port()
    logfile = os.path.join(tmp, "herald.log")
    argv = [binary, "--listen", f"{HOST}:{port}", "--metrics-listen", f"{HOST}:{mport}",
            "--store", "redis", "--redis-url", f"redis://{HOST}:{redis_port}/0",
            "--log-level", "warn"] + extra
    p = procs.spawn("herald", argv, logfile)
    deadline = time.time() + 15
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"herald exited at start ({p.returncode}): {tail(logfile)}")
        try:
            socket.create_connection((HOST, port), 0.5).close()
            socket.create_connection((HOST, mport), 0.5).close()
            return p, port, mport, logfile, argv
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"herald does not listen on {port}/{mport}: {tail(logfile)}")


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def scrape_metrics(mport):
    """/metrics as {name: total over its labels} plus {name{labels}: value}."""
    with urllib.request.urlopen(f"http://{HOST}:{mport}/metrics", timeout=5) as r:
        text = r.read().decode()
    totals, series = {}, {}
    for ln in text.splitlines():
        if not ln or ln.startswith("#"):
            continue
        try:
            key, val = ln.rsplit(" ", 1)
            v = float(val)
        except ValueError:
            continue
        name = key.split("{", 1)[0]
        totals[name] = totals.get(name, 0.0) + v
        series[key] = v
    return totals, series


# --------------------------------------------------------------------------------------------
# Devices and publishers

OFFLINE, CONNECTING, ONLINE = 0, 1, 2


class Device:
    __slots__ = ("idx", "cid", "topic", "conn", "zombie", "busy", "handle", "connected_once",
                 "last_from", "gen")

    def __init__(self, idx, prefix):
        self.idx = idx
        self.cid = f"{prefix}{idx}".encode()
        self.topic = b"push/" + self.cid
        self.conn = None         # the live connection (CONNACKed), if any
        self.zombie = None       # a vanished connection still open, to be taken over
        self.busy = False        # a (re)connect is under way
        self.handle = None       # a scheduled reconnect (TimerHandle)
        self.connected_once = False
        self.last_from = None    # publisher -> highest message id first delivered from it
        self.gen = 0             # connections so far (CONNACKed)


class DeviceConn(asyncio.Protocol):
    def __init__(self, soak, dev, clean):
        self.soak, self.dev, self.clean = soak, dev, clean
        self.transport = None
        self.buf = bytearray()
        self.connack = soak.loop.create_future()
        self.closed = soak.loop.create_future()
        self.online = False
        self.gen = 0           # the device's connection number (Device.gen) once CONNACKed
        self.dead = False      # vanished: input discarded, nothing acknowledged
        self.closing = False   # this side ended it (DISCONNECT, close, reset)
        self.last_tx = 0.0

    def connection_made(self, transport):
        self.transport = transport
        transport.write(connect_packet(self.dev.cid, self.clean, self.soak.args.keepalive))
        self.last_tx = self.soak.loop.time()

    def data_received(self, data):
        if self.dead:
            return
        self.buf += data
        try:
            packets = parse_packets(self.buf)
        except ProtocolError as e:
            self.soak.anomaly("bad_packet_from_herald", f"{self.dev.cid.decode()}: {e}")
            self.abort()
            return
        soak = self.soak
        for first, body in packets:
            t = first >> 4
            if t == T_PUBLISH:
                qos = (first >> 1) & 3
                tlen = (body[0] << 8) | body[1]
                topic = body[2:2 + tlen]
                pos = 2 + tlen
                if qos:
                    pid = (body[pos] << 8) | body[pos + 1]
                    pos += 2
                    self.transport.write(puback_packet(pid))
                    self.last_tx = soak.loop.time()
                if qos != 1:
                    soak.anomaly("publish_not_qos1", f"{self.dev.cid.decode()}: qos {qos}")
                soak.on_delivery(self, topic, body[pos:], bool(first & 0x08))
            elif t == T_CONNACK:
                if len(body) != 2:
                    soak.anomaly("bad_packet_from_herald", "CONNACK of wrong length")
                if not self.connack.done():
                    self.connack.set_result((body[1], body[0] & 1))
                    if body[1] == 0:
                        # Numbered here: a replay can follow the CONNACK in the same read.
                        self.dev.gen += 1
                        self.gen = self.dev.gen
            elif t == T_PINGRESP:
                soak.stats["pingresp"] += 1
            else:
                soak.anomaly("unexpected_packet", f"{self.dev.cid.decode()}: type {t}")

    def connection_lost(self, exc):
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK ({exc})"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.soak.on_device_conn_lost(self)

    # Ways to leave
    def abort(self):
        self.closing = True
        if self.transport:
            self.transport.abort()

    def close_fin(self):
        self.closing = True
        self.transport.close()

    def reset(self):
        """RST instead of FIN: SO_LINGER 0, then close."""
        self.closing = True
        sock = self.transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.transport.abort()

    async def disconnect(self, timeout=5.0):
        """DISCONNECT, then wait for Herald to close (so the TIME_WAIT is on its side)."""
        self.closing = True
        if self.transport.is_closing():
            return True
        self.transport.write(DISCONNECT)
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
            return True
        except asyncio.TimeoutError:
            self.transport.abort()
            return False


class PubConn(asyncio.Protocol):
    def __init__(self, soak, k):
        self.soak, self.k = soak, k
        self.cid = f"{soak.args.id_prefix}pub-{k}".encode()
        self.transport = None
        self.buf = bytearray()
        self.connack = soak.loop.create_future()
        self.closed = soak.loop.create_future()
        self.inflight = {}  # packet id -> message id
        self.next_pid = 1
        self.closing = False
        self.last_tx = 0.0

    def connection_made(self, transport):
        self.transport = transport
        transport.write(connect_packet(self.cid, True, self.soak.args.keepalive))
        self.last_tx = self.soak.loop.time()

    def send(self, msgid, dup=False):
        while self.next_pid in self.inflight:
            self.next_pid = self.next_pid % 65535 + 1
        pid = self.next_pid
        self.next_pid = pid % 65535 + 1
        self.inflight[pid] = msgid
        s = self.soak
        dev = s.devices[s.msg_dev[msgid]]
        self.transport.write(publish_packet(dev.topic, pid, s.payload(msgid), dup))
        self.last_tx = s.loop.time()

    def data_received(self, data):
        self.buf += data
        try:
            packets = parse_packets(self.buf)
        except ProtocolError as e:
            self.soak.anomaly("bad_packet_from_herald", f"publisher: {e}")
            self.transport.abort()
            return
        for first, body in packets:
            t = first >> 4
            if t == T_PUBACK:
                pid = (body[0] << 8) | body[1]
                msgid = self.inflight.pop(pid, None)
                if msgid is None:
                    self.soak.anomaly("unexpected_puback", f"packet id {pid}")
                else:
                    self.soak.on_acked(msgid)
            elif t == T_CONNACK:
                if not self.connack.done():
                    self.connack.set_result((body[1], body[0] & 1))
            elif t == T_PINGRESP:
                pass
            elif t == T_PUBLISH:
                self.soak.anomaly("unexpected_packet", "PUBLISH to a publisher")
            else:
                self.soak.anomaly("unexpected_packet", f"publisher: type {t}")

    def connection_lost(self, exc):
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK ({exc})"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.soak.on_pub_lost(self)


class Pacer:
    """Hands out start slots at most `rate` per second, in call order."""

    def __init__(self, loop, rate):
        self.loop, self.interval, self.next = loop, 1.0 / rate, 0.0

    async def wait(self):
        now = self.loop.time()
        t = max(now, self.next)
        self.next = t + self.interval
        if t > now:
            await asyncio.sleep(t - now)


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def mean(values):
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------
# The run

ANOMALY_KINDS = [
    "misrouted", "bad_payload", "redelivery_without_dup", "order_inversion", "session_lost",
    "closed_by_herald", "connack_refused", "session_present_on_clean", "publish_not_qos1",
    "bad_packet_from_herald", "unexpected_packet", "unexpected_puback", "takeover_not_closed",
    "delivery_on_clean_connection", "publisher_lost",
]


class Soak:
    def __init__(self, args, herald_pid, redis_pid, port, mport, redis_port, herald_proc):
        self.args = args
        self.herald_pid, self.redis_pid = herald_pid, redis_pid
        self.herald_proc = herald_proc
        self.port, self.mport, self.redis_port = port, mport, redis_port
        self.loop = asyncio.get_running_loop()
        self.devices = [Device(i, args.id_prefix) for i in range(args.devices)]
        self.pacer = Pacer(self.loop, args.connect_rate)
        self.conn_sem = asyncio.Semaphore(args.connect_concurrency)
        self.phase = "baseline"
        self.t0 = self.loop.time()
        self.tasks = set()
        self.stats = {k: 0 for k in [
            "connects", "connect_errors", "pingresp", "published", "acked", "delivered",
            "duplicates", "dup_flagged", "churn_disconnect", "churn_close", "churn_reset",
            "churn_vanish", "takeovers_closed", "pub_resent"]}
        self.anomalies = {k: 0 for k in ANOMALY_KINDS}
        self.anomaly_examples = {}
        # Per message id: target device, publisher, publish time, acked, deliveries, online at publish.
        self.msg_dev = array("i")
        self.msg_pub = array("b")
        self.msg_t = array("d")
        self.msg_acked = bytearray()
        self.msg_recv = bytearray()
        self.msg_gen = array("I")  # the device's connection at publish (0: offline)
        self.msg_resent = bytearray()
        self.pending = 0  # acknowledged, not delivered yet
        self.latencies = []  # first deliveries on the connection the device had at publish
        self.connack_times = []
        self.pad = b"." * max(0, args.payload_size - 11)
        self.pubs = [None] * args.publishers
        self.resend = []
        self.publishing = False
        self.samples = []
        self.lag_max = 0.0
        self.online = 0
        self.fatal = None
        self.main_task = None

    # ---- bookkeeping
    def spawn(self, coro):
        t = self.loop.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t):
        self.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            # A dead Herald (found by the sampler) or a bug here: stop the run.
            self.fatal = t.exception()
            if self.main_task is not None and not self.main_task.done():
                self.main_task.cancel()

    def anomaly(self, kind, example):
        self.anomalies[kind] = self.anomalies.get(kind, 0) + 1
        if kind not in self.anomaly_examples:
            self.anomaly_examples[kind] = example
            log(f"anomaly {kind}: {example} (t={self.now():.1f}s)")

    def now(self):
        return self.loop.time() - self.t0

    def payload(self, msgid):
        return b"%010d " % msgid + self.pad

    # ---- devices
    async def connect(self, dev, clean, pace=True):
        """One connection attempt (paced unless the caller took the slot): the CONNACKed
        DeviceConn, or None."""
        if pace:
            await self.pacer.wait()
        async with self.conn_sem:
            conn = DeviceConn(self, dev, clean)
            t = self.loop.time()
            try:
                await asyncio.wait_for(self.loop.create_connection(lambda: conn, HOST, self.port), 10)
                rc, sp = await asyncio.wait_for(conn.connack, 10)
            except (OSError, asyncio.TimeoutError, ConnectionError) as e:
                self.stats["connect_errors"] += 1
                if self.stats["connect_errors"] <= 5:
                    log(f"connect {dev.cid.decode()} failed: {e!r}")
                conn.abort()
                return None
        self.connack_times.append(self.loop.time() - t)
        if rc != 0:
            self.anomaly("connack_refused", f"{dev.cid.decode()}: CONNACK {rc}")
            conn.abort()
            return None
        self.stats["connects"] += 1
        if clean and sp:
            self.anomaly("session_present_on_clean", dev.cid.decode())
        if not clean and dev.connected_once and not sp:
            self.anomaly("session_lost", f"{dev.cid.decode()}: session present 0 on reconnect")
        dev.connected_once = True
        conn.online = True
        return conn

    async def bring_online(self, dev, pace=True):
        """(Re)connects `dev` with clean session 0 until it is online; takes over a zombie.
        pace=False: the caller took the first attempt's slot from the pacer."""
        if dev.busy or dev.conn is not None:
            return
        dev.busy = True
        dev.handle = None
        try:
            delay = 0.5
            while True:
                conn = await self.connect(dev, clean=False, pace=pace)
                pace = True
                if conn is not None:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
            dev.conn = conn
            self.online += 1
            z = dev.zombie
            if z is not None:
                # Herald must close the taken-over connection: read it again to see the FIN.
                z.transport.resume_reading()
                self.loop.call_later(5, self._check_zombie, z)
        finally:
            dev.busy = False

    def _check_zombie(self, z):
        if not z.closed.done():
            self.anomaly("takeover_not_closed", f"{z.dev.cid.decode()}: old connection open 5 s after takeover")
            z.abort()

    def on_device_conn_lost(self, conn):
        dev = conn.dev
        if conn.dead:
            if dev.zombie is conn:
                dev.zombie = None
            if not conn.closing:
                self.stats["takeovers_closed"] += 1
            return
        if conn is dev.conn:
            dev.conn = None
            self.online -= 1
            if not conn.closing:
                self.anomaly("closed_by_herald", f"{dev.cid.decode()} (phase {self.phase})")
                if self.phase in ("connect", "churn", "drain"):
                    dev.handle = self.loop.call_later(1.0, self._reconnect, dev)

    def _reconnect(self, dev):
        dev.handle = None
        if self.phase in ("connect", "churn", "drain"):
            self.spawn(self.bring_online(dev))

    def take_offline(self, dev):
        if self.phase != "churn" or dev.busy or dev.conn is None:
            return
        conn = dev.conn
        mode = random.choices(["disconnect", "close", "reset", "vanish"],
                              weights=self.args.churn_modes)[0]
        self.stats["churn_" + mode] += 1
        dev.conn = None
        self.online -= 1
        if mode == "disconnect":
            self.spawn(conn.disconnect())
        elif mode == "close":
            conn.close_fin()
        elif mode == "reset":
            conn.reset()
        else:
            conn.dead = True
            conn.transport.pause_reading()
            dev.zombie = conn
        off = random.uniform(self.args.offline_min, self.args.offline_max)
        dev.handle = self.loop.call_later(off, self._reconnect, dev)

    def on_delivery(self, conn, topic, payload, dup):
        dev = conn.dev
        try:
            msgid = int(payload[:10])
        except ValueError:
            self.anomaly("bad_payload", repr(payload[:20]))
            return
        if msgid >= len(self.msg_dev) or self.msg_dev[msgid] != dev.idx or topic != dev.topic:
            self.anomaly("misrouted", f"message {msgid} on {topic!r} to {dev.cid.decode()}")
            return
        if conn.clean:
            self.anomaly("delivery_on_clean_connection", f"message {msgid} to {dev.cid.decode()}")
        if dup:
            self.stats["dup_flagged"] += 1
        c = self.msg_recv[msgid]
        if c:
            self.stats["duplicates"] += 1
            if not dup and not self.msg_resent[msgid]:
                self.anomaly("redelivery_without_dup", f"message {msgid} to {dev.cid.decode()}")
        else:
            self.stats["delivered"] += 1
            if self.msg_acked[msgid]:
                self.pending -= 1
            if self.msg_gen[msgid] == conn.gen:
                self.latencies.append(self.loop.time() - self.msg_t[msgid])
            p = self.msg_pub[msgid]
            if dev.last_from is None:
                dev.last_from = {}
            last = dev.last_from.get(p, -1)
            if msgid < last and not self.msg_resent[msgid]:
                self.anomaly("order_inversion", f"{dev.cid.decode()}: message {msgid} after {last} (publisher {p})")
            else:
                dev.last_from[p] = msgid
        if c < 255:
            self.msg_recv[msgid] = c + 1

    # ---- publishers
    async def start_publisher(self, k):
        while True:
            conn = PubConn(self, k)
            try:
                await asyncio.wait_for(self.loop.create_connection(lambda: conn, HOST, self.port), 10)
                rc, _ = await asyncio.wait_for(conn.connack, 10)
                if rc == 0:
                    self.pubs[k] = conn
                    return
                self.anomaly("connack_refused", f"publisher {k}: CONNACK {rc}")
            except (OSError, asyncio.TimeoutError, ConnectionError) as e:
                log(f"publisher {k} connect failed: {e!r}")
            if conn.transport:
                conn.transport.abort()
            await asyncio.sleep(1)

    def on_pub_lost(self, conn):
        if self.pubs[conn.k] is conn:
            self.pubs[conn.k] = None
            if not conn.closing:
                self.anomaly("publisher_lost", f"publisher {conn.k} closed by Herald, {len(conn.inflight)} unacknowledged")
                # Unacknowledged: sent again (at-least-once) on a new connection.
                for msgid in conn.inflight.values():
                    self.msg_resent[msgid] = 1
                    self.resend.append(msgid)
                conn.inflight.clear()
                self.spawn(self.start_publisher(conn.k))

    def on_acked(self, msgid):
        if not self.msg_acked[msgid]:
            self.msg_acked[msgid] = 1
            self.stats["acked"] += 1
            if not self.msg_recv[msgid]:
                self.pending += 1

    async def publish_loop(self, end):
        """--rate msgs/s over the publishers, to uniformly random devices, until `end`."""
        a = self.args
        start = self.loop.time()
        sent = 0
        rr = 0
        ndev = len(self.devices)
        while self.loop.time() < end:
            await asyncio.sleep(0.01)
            due = int((self.loop.time() - start) * a.rate) - sent
            while due > 0:
                conn = None
                for _ in range(len(self.pubs)):
                    c = self.pubs[rr % len(self.pubs)]
                    rr += 1
                    if c is not None and len(c.inflight) < a.window:
                        conn = c
                        break
                if conn is None:
                    break  # every window full (or publishers reconnecting): fall behind
                if self.resend:
                    conn.send(self.resend.pop(), dup=True)
                    self.stats["pub_resent"] += 1
                    continue
                msgid = len(self.msg_dev)
                d = random.randrange(ndev)
                self.msg_dev.append(d)
                self.msg_pub.append(conn.k)
                self.msg_t.append(self.loop.time())
                self.msg_acked.append(0)
                self.msg_recv.append(0)
                self.msg_resent.append(0)
                c = self.devices[d].conn
                self.msg_gen.append(c.gen if c is not None else 0)
                conn.send(msgid)
                self.stats["published"] += 1
                sent += 1
                due -= 1

    # ---- periodic work
    async def pinger(self):
        """PINGREQ from every connection that sent nothing for half its keepalive."""
        every = self.args.keepalive / 2.0
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()
            for d in self.devices:
                c = d.conn
                if c is not None and now - c.last_tx >= every and not c.transport.is_closing():
                    c.transport.write(PINGREQ)
                    c.last_tx = now
            for c in self.pubs:
                if c is not None and now - c.last_tx >= every:
                    c.transport.write(PINGREQ)
                    c.last_tx = now

    async def lag_monitor(self):
        while True:
            t = self.loop.time()
            await asyncio.sleep(0.1)
            self.lag_max = max(self.lag_max, self.loop.time() - t - 0.1)

    def probe(self):
        """Runs in a worker thread: the figures from /proc, Redis and /metrics."""
        s = {}
        try:
            s["rss_kb"] = proc_rss_kb(self.herald_pid)
            s["fds"] = proc_fds(self.herald_pid)
            s["herald_cpu_s"] = proc_cpu_s(self.herald_pid)
        except OSError:
            s["herald_gone"] = True
        try:
            s["redis_cpu_s"] = proc_cpu_s(self.redis_pid)
            with Resp(self.redis_port) as r:
                s["redis_used_memory"] = int(r.info("memory")["used_memory"])
                s["redis_keys"] = r.cmd("DBSIZE")
        except (OSError, RedisError, KeyError, ValueError) as e:
            s["redis_error"] = repr(e)
        try:
            totals, _ = scrape_metrics(self.mport)
            s["connections_active"] = int(totals.get("herald_connections_active", -1))
            s["messages_dropped"] = int(totals.get("herald_messages_dropped_total", 0))
            s["takeovers"] = int(totals.get("herald_session_takeovers_total", 0))
        except (OSError, ValueError) as e:
            s["metrics_error"] = repr(e)
        return s

    async def sample(self):
        s = await self.loop.run_in_executor(None, self.probe)
        s["t"] = round(self.now(), 1)
        s["wall"] = time.time()
        s["phase"] = self.phase
        s["soak_cpu_s"] = self_cpu_s()
        s["online"] = self.online
        s["published"] = self.stats["published"]
        s["acked"] = self.stats["acked"]
        s["delivered"] = self.stats["delivered"]
        s["duplicates"] = self.stats["duplicates"]
        s["pending"] = self.pending
        s["lag_max_ms"] = round(self.lag_max * 1000, 1)
        s["loadavg"] = os.getloadavg()[0]
        self.lag_max = 0.0
        prev = self.samples[-1] if self.samples else None
        if prev:
            dt = s["wall"] - prev["wall"]
            for who in ("herald", "redis", "soak"):
                a, b = prev.get(f"{who}_cpu_s"), s.get(f"{who}_cpu_s")
                if a is not None and b is not None and dt > 0:
                    s[f"{who}_cpu_pct"] = round(100.0 * (b - a) / dt, 1)
            s["pub_rate"] = round((s["published"] - prev["published"]) / dt) if dt > 0 else 0
        self.samples.append(s)

        def f(v, fmt):
            return fmt.format(v) if v is not None else "-"

        print(f"t={s['t']:6.0f}s {s['phase']:<8} online {s['online']:>6} "
              f"conns {f(s.get('connections_active'), '{:>6}')} "
              f"rss {f((s.get('rss_kb') or 0) / 1024, '{:7.1f}')}M fds {f(s.get('fds'), '{:>6}')} "
              f"redis {f((s.get('redis_used_memory') or 0) / 1048576, '{:7.1f}')}M keys {f(s.get('redis_keys'), '{:>6}')} "
              f"pub/s {s.get('pub_rate', 0):>4} acked {s['acked']:>7} deliv {s['delivered']:>7} "
              f"pend {s['pending']:>5} dup {s['duplicates']:>5} dropped {f(s.get('messages_dropped'), '{}')} "
              f"cpu herald {f(s.get('herald_cpu_pct'), '{:.0f}')}% redis {f(s.get('redis_cpu_pct'), '{:.0f}')}% "
              f"soak {f(s.get('soak_cpu_pct'), '{:.0f}')}% lag {s['lag_max_ms']:.0f}ms load {s['loadavg']:.1f}",
              flush=True)
        if s.get("herald_gone") or self.herald_proc.poll() is not None:
            raise RuntimeError(f"herald died (exit {self.herald_proc.poll()})")
        return s

    async def sampler(self):
        nxt = self.loop.time()
        while True:
            nxt += self.args.sample_interval
            await asyncio.sleep(max(0.0, nxt - self.loop.time()))
            await self.sample()

    # ---- phases
    async def run(self):
        a = self.args
        res = {}
        base = await self.sample()
        counts, _ = await self.loop.run_in_executor(None, redis_keys_by_kind, self.redis_port)
        mstats = await self.loop.run_in_executor(None, redis_memory_stats, self.redis_port)
        res["baseline"] = {"rss_kb": base["rss_kb"], "fds": base["fds"], "redis_memory_stats": mstats,
                           "redis_used_memory": base["redis_used_memory"],
                           "redis_keys": base["redis_keys"], "redis_keys_by_kind": counts}
        log(f"baseline: herald rss {base['rss_kb']} kB, {base['fds']} fds; redis used_memory "
            f"{base['redis_used_memory']} B, {base['redis_keys']} keys {counts}")
        bg = [self.spawn(self.sampler()), self.spawn(self.pinger()), self.spawn(self.lag_monitor())]

        # Connect
        self.phase = "connect"
        log(f"connecting {a.devices} devices at {a.connect_rate}/s (clean session 0, keepalive {a.keepalive})")
        t = self.loop.time()
        await asyncio.gather(*(self.bring_online(d) for d in self.devices))
        res["connect_s"] = round(self.loop.time() - t, 1)
        res["connect_rate"] = round(a.devices / max(1e-9, self.loop.time() - t))
        log(f"{self.online} devices online in {res['connect_s']} s ({res['connect_rate']}/s)")
        await asyncio.gather(*(self.start_publisher(k) for k in range(a.publishers)))
        gc.collect()
        gc.freeze()  # the devices' objects live for the whole run: out of the collector's way

        # Churn and publish
        self.phase = "churn"
        self.churn_start = self.now()
        end = self.loop.time() + a.duration
        log(f"churn for {a.duration} s: {a.churn} % of the devices offline every {a.churn_interval} s "
            f"for {a.offline_min}-{a.offline_max} s; {a.rate} msgs/s over {a.publishers} publishers")
        pub = self.spawn(self.publish_loop(end))
        per = int(round(len(self.devices) * a.churn / 100.0))
        while self.loop.time() < end:
            online = [d for d in self.devices if d.conn is not None and not d.busy]
            for d in random.sample(online, min(per, len(online))):
                self.loop.call_later(random.uniform(0, a.churn_interval), self.take_offline, d)
            await asyncio.sleep(min(a.churn_interval, max(0.0, end - self.loop.time())))
        await pub
        self.churn_end = self.now()

        # Drain
        self.phase = "drain"
        t = self.loop.time()
        while any(p and p.inflight for p in self.pubs) and self.loop.time() - t < 30:
            await asyncio.sleep(0.1)
        res["unacked_at_end"] = sum(len(p.inflight) for p in self.pubs if p)
        # Messages for devices that are online now should arrive within a few seconds.
        t = self.loop.time()
        missing = [m for m in range(len(self.msg_dev)) if self.msg_acked[m] and not self.msg_recv[m]]
        while True:
            stuck = [m for m in missing if not self.msg_recv[m] and self.devices[self.msg_dev[m]].conn]
            if not stuck or self.loop.time() - t >= a.settle:
                break
            await asyncio.sleep(0.5)
        res["undelivered_to_online_after_settle"] = len(stuck)
        if stuck:
            log(f"{len(stuck)} acknowledged messages for online devices not delivered after {a.settle} s, "
                f"e.g. {stuck[:5]} to {[self.devices[self.msg_dev[m]].cid.decode() for m in stuck[:5]]}")
        log(f"drain: every device reconnects with clean session 0; {self.pending} messages pending")
        t = self.loop.time()

        async def redo(d):
            if d.handle:
                d.handle.cancel()
                d.handle = None
            while d.busy:
                await asyncio.sleep(0.1)
            # One pacer slot for the disconnect and the connect, so that devices leave at the
            # connect rate too instead of all at once.
            await self.pacer.wait()
            c = d.conn
            if c is not None:
                d.conn = None
                self.online -= 1
                await c.disconnect()
            await self.bring_online(d, pace=False)

        await asyncio.gather(*(redo(d) for d in self.devices))
        log(f"all {self.online} devices reconnected in {self.loop.time() - t:.1f} s; {self.pending} pending")
        t = self.loop.time()
        while self.pending > 0 and self.loop.time() - t < a.drain_timeout:
            await asyncio.sleep(0.2)
        res["drain_s"] = round(self.loop.time() - t, 1)
        await asyncio.sleep(1.0)  # late duplicates
        lost = [m for m in range(len(self.msg_dev)) if self.msg_acked[m] and not self.msg_recv[m]]
        res["lost_ids"] = lost[:50]
        log(f"drain done in {res['drain_s']} s after the reconnects: {len(lost)} acknowledged messages missing")
        counts, _ = await self.loop.run_in_executor(None, redis_keys_by_kind, self.redis_port)
        peak = await self.sample()
        mstats = await self.loop.run_in_executor(None, redis_memory_stats, self.redis_port)
        res["before_clean"] = {"redis_used_memory": peak["redis_used_memory"], "redis_memory_stats": mstats,
                               "redis_keys": peak["redis_keys"], "redis_keys_by_kind": counts,
                               "rss_kb": peak["rss_kb"], "fds": peak["fds"]}

        # Clean
        self.phase = "clean"
        log("clean: every device disconnects, connects with clean session 1 and disconnects")
        t = self.loop.time()
        not_closed = [0]

        async def clean(d):
            await self.pacer.wait()
            c = d.conn
            if c is not None:
                d.conn = None
                self.online -= 1
                if not await c.disconnect():
                    not_closed[0] += 1
            for i in range(5):
                c = await self.connect(d, clean=True, pace=i > 0)
                if c is not None:
                    if not await c.disconnect():
                        not_closed[0] += 1
                    return
                await asyncio.sleep(1)

        await asyncio.gather(*(clean(d) for d in self.devices))
        for p in self.pubs:
            if p is not None:
                p.closing = True
                await pub_disconnect(p)
        res["clean_s"] = round(self.loop.time() - t, 1)
        res["not_closed_after_disconnect"] = not_closed[0]
        log(f"clean done in {res['clean_s']} s")

        # Settle: wait for Herald to let go of every connection.
        self.phase = "end"
        t = self.loop.time()
        while self.loop.time() - t < 30:
            s = await self.loop.run_in_executor(None, self.probe)
            if s.get("connections_active") == 0 and s.get("fds", 1 << 30) <= base["fds"] + a.fd_slack:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(a.end_wait)
        final = await self.sample()
        counts, samples = await self.loop.run_in_executor(None, redis_keys_by_kind, self.redis_port, 100)
        usage = {}
        with Resp(self.redis_port) as r:
            for kind, keys in samples.items():
                sizes = [r.cmd("MEMORY", "USAGE", k, "SAMPLES", "0") or 0 for k in keys]
                usage[kind] = sum(sizes) / len(sizes) if sizes else 0
            mem = r.info("memory")
        mstats = await self.loop.run_in_executor(None, redis_memory_stats, self.redis_port)
        res["end"] = {"rss_kb": final["rss_kb"], "fds": final["fds"],
                      "connections_active": final.get("connections_active"),
                      "redis_used_memory": final["redis_used_memory"], "redis_keys": final["redis_keys"],
                      "redis_keys_by_kind": counts, "redis_key_bytes_by_kind": usage,
                      "redis_used_memory_peak": int(mem.get("used_memory_peak", 0)),
                      "redis_mem_fragmentation_ratio": float(mem.get("mem_fragmentation_ratio", 0)),
                      "redis_used_memory_rss": int(mem.get("used_memory_rss", 0)),
                      "redis_memory_stats": mstats}
        for b in bg:
            b.cancel()
        totals, series = await self.loop.run_in_executor(None, scrape_metrics, self.mport)
        res["metrics"] = {k: v for k, v in series.items() if v and not k.startswith("herald_log")}
        res["lost"] = len(lost)
        return res


async def pub_disconnect(p):
    if p.transport and not p.transport.is_closing():
        p.transport.write(DISCONNECT)
        try:
            await asyncio.wait_for(asyncio.shield(p.closed), 5)
        except asyncio.TimeoutError:
            p.transport.abort()


# --------------------------------------------------------------------------------------------
# Checks and report

def evaluate(args, soak, res):
    st, an = soak.stats, soak.anomalies
    checks = []

    def check(name, ok, detail):
        checks.append({"check": name, "pass": bool(ok), "detail": detail})

    # (a)
    check("a. no acknowledged message lost", res["lost"] == 0,
          f"{st['acked']} acknowledged, {res['lost']} lost, {st['duplicates']} duplicate deliveries")

    # (b) RSS over the churn phase after warm-up: last third against first third.
    w0 = soak.churn_start + args.warmup
    rs = [s["rss_kb"] for s in soak.samples
          if s["phase"] == "churn" and s["t"] >= w0 and s["t"] <= soak.churn_end and s.get("rss_kb")]
    third = len(rs) // 3
    if third >= 2:
        first, last = mean(rs[:third]), mean(rs[-third:])
        growth = 100.0 * (last - first) / first
        res["rss"] = {"first_third_kb": round(first), "last_third_kb": round(last),
                      "growth_pct": round(growth, 2), "samples": len(rs)}
        check(f"b. RSS flat after {args.warmup:g} s warm-up (growth < {args.rss_growth:g} %)",
              growth < args.rss_growth,
              f"mean {first / 1024:.1f} MB (first third) -> {last / 1024:.1f} MB (last third): {growth:+.1f} %")
    else:
        check("b. RSS flat after warm-up", False,
              f"only {len(rs)} samples after warm-up: run longer than --warmup")

    # (c)
    b, e = res["baseline"], res["end"]
    check(f"c. fds back to baseline (+{args.fd_slack})", e["fds"] <= b["fds"] + args.fd_slack,
          f"{b['fds']} at start, {res['before_clean']['fds']} before clean, {e['fds']} at the end; "
          f"connections_active {e['connections_active']}")

    # (d)
    keep = set(args.persistent_kinds)
    kept = {k: v for k, v in e["redis_keys_by_kind"].items() if k in keep}
    other_end = sum(v for k, v in e["redis_keys_by_kind"].items() if k not in keep)
    other_base = sum(v for k, v in b["redis_keys_by_kind"].items() if k not in keep)
    kept_bytes = sum(kept[k] * e["redis_key_bytes_by_kind"].get(k, 0) for k in kept)
    extra = e["redis_used_memory"] - b["redis_used_memory"] - kept_bytes
    slack = args.redis_slack_mb * 1048576
    res["redis"] = {"kept_keys": kept, "kept_bytes": round(kept_bytes), "other_keys_end": other_end,
                    "other_keys_base": other_base, "excess_bytes": round(extra)}
    leftover = {k: v for k, v in e["redis_keys_by_kind"].items()
                if k not in keep and v > b["redis_keys_by_kind"].get(k, 0)}
    check("d. Redis keys back to baseline (apart from " + ", ".join(sorted(keep)) + ")",
          other_end <= other_base,
          f"{b['redis_keys']} keys at start, {e['redis_keys']} at the end; kept by design {kept}; "
          f"left over {leftover or 'none'}")
    check(f"d. Redis used_memory back near baseline (+ kept keys, slack {args.redis_slack_mb:g} MB)",
          extra <= slack,
          f"{b['redis_used_memory'] / 1048576:.2f} MB at start, "
          f"{res['before_clean']['redis_used_memory'] / 1048576:.2f} MB before clean, "
          f"{e['redis_used_memory'] / 1048576:.2f} MB at the end; kept keys ~{kept_bytes / 1048576:.2f} MB; "
          f"excess {extra / 1048576:+.2f} MB")

    # (e)
    bad = {k: v for k, v in an.items() if v}
    check("e. no protocol anomalies", not bad, ", ".join(f"{k} {v}" for k, v in bad.items()) or "none")
    return checks


def human(n):
    return f"{n:,}" if isinstance(n, int) else str(n)


def report(args, soak, res, checks, herald_exit, binary, version):
    st = soak.samples
    churn = [s for s in st if s["phase"] == "churn"]
    w0 = soak.churn_start + args.warmup
    after_warm = [s for s in churn if s["t"] >= w0]

    def cpu(phase, who):
        """Mean and max CPU % over the sample windows wholly inside `phase` (the first
        sample of a phase also covers the end of the one before)."""
        v = [s[f"{who}_cpu_pct"] for p, s in zip(st, st[1:])
             if s["phase"] == phase and p["phase"] == phase and s.get(f"{who}_cpu_pct") is not None]
        return (round(mean(v), 1), max(v)) if v else ("-", "-")

    lat = soak.latencies
    conn_t = soak.connack_times
    a = soak.stats
    rss_start = res["baseline"]["rss_kb"]
    rss_warm = after_warm[0]["rss_kb"] if after_warm else None
    rss_peak = max(s["rss_kb"] for s in st if s.get("rss_kb"))
    rss_churn_end = churn[-1]["rss_kb"] if churn else None
    summary = {
        "binary": binary, "version": version,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(soak.start_wall)),
        "devices": args.devices, "duration_s": args.duration, "rate": args.rate,
        "publishers": args.publishers, "churn_pct_per_interval": args.churn,
        "churn_interval_s": args.churn_interval,
        "connect_s": res["connect_s"], "connect_rate": res["connect_rate"],
        "published": a["published"], "acknowledged": a["acked"], "delivered": a["delivered"],
        "lost": res["lost"], "duplicates": a["duplicates"], "dup_flagged": a["dup_flagged"],
        "unacked_at_end": res["unacked_at_end"],
        "undelivered_to_online_after_settle": res["undelivered_to_online_after_settle"],
        "drain_s": res["drain_s"], "clean_s": res["clean_s"],
        "churn": {k[6:]: a[k] for k in a if k.startswith("churn_")},
        "takeovers_closed_by_herald": a["takeovers_closed"],
        "takeovers_metric": int(res["metrics"].get("herald_session_takeovers_total", 0)),
        "connects": a["connects"], "connect_errors": a["connect_errors"],
        "latency_live_ms": {"p50": round(pct(lat, 50) * 1000, 2) if lat else None,
                            "p99": round(pct(lat, 99) * 1000, 2) if lat else None,
                            "max": round(max(lat) * 1000, 2) if lat else None, "n": len(lat)},
        "connack_ms": {"p50": round(pct(conn_t, 50) * 1000, 2) if conn_t else None,
                       "p99": round(pct(conn_t, 99) * 1000, 2) if conn_t else None},
        "rss_kb": {"start": rss_start, "after_warmup": rss_warm, "peak": rss_peak,
                   "end_of_churn": rss_churn_end, "before_clean": res["before_clean"]["rss_kb"],
                   "end": res["end"]["rss_kb"], **res.get("rss", {})},
        "fds": {"start": res["baseline"]["fds"], "before_clean": res["before_clean"]["fds"],
                "end": res["end"]["fds"]},
        "redis": {"used_memory_start": res["baseline"]["redis_used_memory"],
                  "used_memory_before_clean": res["before_clean"]["redis_used_memory"],
                  "used_memory_end": res["end"]["redis_used_memory"],
                  "used_memory_peak": res["end"]["redis_used_memory_peak"],
                  "keys_start": res["baseline"]["redis_keys"],
                  "keys_before_clean": res["before_clean"]["redis_keys"],
                  "keys_end": res["end"]["redis_keys"],
                  "keys_by_kind_start": res["baseline"]["redis_keys_by_kind"],
                  "keys_by_kind_before_clean": res["before_clean"]["redis_keys_by_kind"],
                  "keys_by_kind_end": res["end"]["redis_keys_by_kind"],
                  "key_bytes_by_kind_end": {k: round(v) for k, v in res["end"]["redis_key_bytes_by_kind"].items()},
                  **res["redis"]},
        "messages_dropped": int(sum(v for k, v in res["metrics"].items()
                                    if k.startswith("herald_messages_dropped_total"))),
        "cpu_pct_by_phase": {ph: {who: cpu(ph, who) for who in ("soak", "herald", "redis")}
                             for ph in ("connect", "churn", "drain", "clean")},
        "lag_max_ms_churn": max((s["lag_max_ms"] for s in churn), default=None),
        "lag_ms_churn_per_sample_p50_p90": (pct([s["lag_max_ms"] for s in churn], 50),
                                            pct([s["lag_max_ms"] for s in churn], 90)),
        "loadavg_churn": (round(min(s["loadavg"] for s in churn), 2), round(max(s["loadavg"] for s in churn), 2)) if churn else None,
        "achieved_rate": round(a["published"] / max(1e-9, soak.churn_end - soak.churn_start)),
        "anomalies": {k: v for k, v in soak.anomalies.items() if v},
        "anomaly_examples": soak.anomaly_examples,
        "herald_exit": herald_exit,
        "not_closed_after_disconnect": res["not_closed_after_disconnect"],
        "lost_ids": res["lost_ids"],
    }

    def mb(kb):
        return f"{kb / 1024:.1f} MB" if kb is not None else "-"

    rows = [
        ("binary", f"{binary} ({version})"),
        ("devices / duration / rate", f"{args.devices:,} / {args.duration:g} s / {args.rate:g} msgs/s "
         f"({args.publishers} publishers; achieved {summary['achieved_rate']:,}/s)"),
        ("connect", f"{res['connect_s']} s ({res['connect_rate']:,}/s); CONNACK p50/p99 "
         f"{summary['connack_ms']['p50']}/{summary['connack_ms']['p99']} ms; {a['connects']:,} connects, "
         f"{a['connect_errors']} errors"),
        ("churn (went offline)", ", ".join(f"{k} {v:,}" for k, v in summary["churn"].items())
         + f"; vanished connections closed by Herald on takeover {a['takeovers_closed']:,} "
         f"(herald_session_takeovers_total {summary['takeovers_metric']:,})"),
        ("messages published / acknowledged", f"{a['published']:,} / {a['acked']:,} (unacknowledged at end {res['unacked_at_end']})"),
        ("delivered / lost / duplicated", f"{a['delivered']:,} / {res['lost']:,} / {a['duplicates']:,} "
         f"(DUP=1 deliveries {a['dup_flagged']:,})"),
        ("live delivery latency p50/p99/max", f"{summary['latency_live_ms']['p50']} / {summary['latency_live_ms']['p99']} / "
         f"{summary['latency_live_ms']['max']} ms (publish .. PUBLISH at the device, {len(lat):,} msgs "
         "delivered on the connection the device had at publish)"),
        ("drain", f"{res['drain_s']} s after the reconnects; undelivered to online devices after "
         f"{args.settle:g} s settle: {res['undelivered_to_online_after_settle']}"),
        ("Herald RSS", f"start {mb(rss_start)}, after warm-up {mb(rss_warm)}, peak {mb(rss_peak)}, "
         f"end of churn {mb(rss_churn_end)}, before clean {mb(res['before_clean']['rss_kb'])}, end {mb(res['end']['rss_kb'])}"),
        ("Herald RSS per connected device", f"{(res['before_clean']['rss_kb'] - rss_start) * 1024 / args.devices:,.0f} B "
         "(before clean - start) / devices"),
        ("Herald fds", f"start {res['baseline']['fds']}, before clean {res['before_clean']['fds']}, end {res['end']['fds']}"),
        ("Redis used_memory", f"start {res['baseline']['redis_used_memory'] / 1048576:.2f} MB, before clean "
         f"{res['before_clean']['redis_used_memory'] / 1048576:.2f} MB, end {res['end']['redis_used_memory'] / 1048576:.2f} MB "
         f"(peak {res['end']['redis_used_memory_peak'] / 1048576:.2f} MB)"),
        ("Redis keys", f"start {res['baseline']['redis_keys']}, before clean {res['before_clean']['redis_keys']:,} "
         f"{res['before_clean']['redis_keys_by_kind']}, end {res['end']['redis_keys']:,} {res['end']['redis_keys_by_kind']}"),
        ("messages dropped (metrics)", summary["messages_dropped"]),
        ("CPU % mean/max: script | herald | redis", "; ".join(
            "{} {}/{} | {}/{} | {}/{}".format(ph, *c["soak"], *c["herald"], *c["redis"])
            for ph, c in summary["cpu_pct_by_phase"].items())),
        ("event-loop lag (churn)", "worst per sample: median {} ms, p90 {} ms, max {} ms; load average {}".format(
            *summary["lag_ms_churn_per_sample_p50_p90"], summary["lag_max_ms_churn"], summary["loadavg_churn"])),
        ("Herald exit on SIGTERM", herald_exit),
    ]
    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'':=<{w + 40}}")
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(f"{'':-<{w + 40}}")
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['detail']}")
    if soak.anomaly_examples:
        print("anomaly examples: " + "; ".join(f"{k}: {v}" for k, v in soak.anomaly_examples.items()))
    return summary


# --------------------------------------------------------------------------------------------

class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ones --quick decides (None here)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/soak.py", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--herald", default=os.path.join(ROOT, "target/release/herald"), help="the herald binary")
    p.add_argument("--herald-arg", action="append", default=[], metavar="ARG",
                   help="one more herald flag (repeatable), e.g. --herald-arg=--config --herald-arg=x.toml")
    p.add_argument("--quick", action="store_true",
                   help="a fast check: 2,000 devices, 60 s, warm-up 15 s (explicit flags win)")
    p.add_argument("--devices", type=int, help="devices (default 15000; --quick 2000)")
    p.add_argument("--duration", type=float, help="seconds of churn and publishing (default 600; --quick 60)")
    p.add_argument("--rate", type=float, help="QoS 1 pushes per second over all publishers (default 500)")
    p.add_argument("--warmup", type=float, help="seconds of churn left out of the RSS check (default 60; --quick 15)")
    p.add_argument("--publishers", type=int, default=4, help="publisher connections")
    p.add_argument("--window", type=int, default=256, help="unacknowledged publishes per publisher")
    p.add_argument("--payload-size", type=int, default=64, help="bytes per push payload (>= 11)")
    p.add_argument("--connect-rate", type=float, default=500, help="device connects per second")
    p.add_argument("--connect-concurrency", type=int, default=200, help="connects in flight at most")
    p.add_argument("--keepalive", type=int, default=60, help="MQTT keepalive of every connection (s)")
    p.add_argument("--churn", type=float, default=1.5, help="percent of the devices taken offline per interval")
    p.add_argument("--churn-interval", type=float, default=10, help="seconds")
    p.add_argument("--offline-min", type=float, default=1, help="seconds offline, at least")
    p.add_argument("--offline-max", type=float, default=20, help="seconds offline, at most")
    p.add_argument("--churn-modes", type=lambda s: [float(x) for x in s.split(",")], default=[40, 25, 25, 10],
                   help="weights of DISCONNECT, close (FIN), reset (RST), vanish (taken over later)")
    p.add_argument("--settle", type=float, default=10, help="seconds to wait, after publishing, for messages to online devices")
    p.add_argument("--drain-timeout", type=float, default=60, help="seconds to wait for the last messages after the reconnects")
    p.add_argument("--sample-interval", type=float, default=5, help="seconds between samples")
    p.add_argument("--end-wait", type=float, default=5, help="seconds to wait after the clients are gone, before the last sample")
    p.add_argument("--rss-growth", type=float, default=10, help="check (b): allowed RSS growth, percent")
    p.add_argument("--fd-slack", type=int, default=5, help="check (c): fds allowed over the baseline")
    p.add_argument("--redis-slack-mb", type=float, default=2,
                   help="check (d): used_memory allowed over the baseline plus the kept keys (MB)")
    p.add_argument("--persistent-kinds", type=lambda s: [x for x in s.split(",") if x], default=["box"],
                   help="check (d): key kinds (herald:KIND:{cid}) Herald keeps by design after a clean session")
    p.add_argument("--id-prefix", default="soak-", help="client id prefix")
    p.add_argument("--seed", type=int, help="random seed (default: time)")
    p.add_argument("--json", metavar="FILE", help="write the results, every sample and the checks here")
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, AOF) and print where")
    a = p.parse_args(argv)
    quick = {"devices": 2000, "duration": 60, "rate": 500, "warmup": 15}
    full = {"devices": 15000, "duration": 600, "rate": 500, "warmup": 60}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.payload_size < 11 or a.devices < 1 or a.rate <= 0 or a.duration <= 0 or len(a.churn_modes) != 4:
        p.error("bad --payload-size, --devices, --rate, --duration or --churn-modes")
    return a


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need > soft:
        raise SystemExit(f"{ME}: {need} sockets needed but RLIMIT_NOFILE is {soft} (hard {hard}): use fewer --devices")
    return soft


def main(argv):
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    random.seed(seed)
    binary = os.path.abspath(args.herald)
    if not os.access(binary, os.X_OK):
        print(f"{ME}: no herald binary at {binary} (make build, or --herald PATH)", file=sys.stderr)
        return 2
    if not shutil.which("redis-server"):
        print(f"{ME}: redis-server not on PATH (apt-get install redis-server)", file=sys.stderr)
        return 2
    # Devices, vanished sockets still open (at most one churn interval's worth, and the ones
    # offline), publishers, and the process's own files: the same bound holds for Herald.
    need = args.devices + int(args.devices * args.churn / 100 * (args.offline_max / args.churn_interval + 2)) \
        + args.publishers + 200
    nofile = raise_nofile(need)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="herald-soak.")
    procs = Procs(tmp)
    log(f"{version} ({binary}); RLIMIT_NOFILE {nofile}; seed {seed}; temp dir {tmp}")

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    rc = 2
    herald = None
    soak = None
    try:
        redis, redis_port = start_redis(procs, tmp)
        herald, port, mport, hlog, hargv = start_herald(procs, tmp, binary, redis_port, args.herald_arg)
        log(f"redis-server pid {redis.pid} on {redis_port}; herald pid {herald.pid} on {port} (metrics {mport})")
        log("herald: " + " ".join(hargv))

        async def go():
            nonlocal soak
            soak = Soak(args, herald.pid, redis.pid, port, mport, redis_port, herald)
            soak.start_wall = time.time()
            soak.main_task = asyncio.current_task()
            try:
                return await soak.run()
            except asyncio.CancelledError:
                if soak.fatal is not None:
                    raise RuntimeError(f"run stopped: {soak.fatal!r}") from None
                raise
            finally:
                for t in list(soak.tasks):
                    t.cancel()

        t_start = time.time()
        res = asyncio.run(go())
        log(f"run took {time.time() - t_start:.0f} s; stopping herald (SIGTERM)")
        herald_exit = procs.stop(herald)
        checks = evaluate(args, soak, res)
        summary = report(args, soak, res, checks, herald_exit, binary, version)
        warn_lines = [ln for ln in tail(hlog, 100000).splitlines()
                      if ln.strip() and "no authentication configured" not in ln]
        summary["herald_log_lines"] = len(warn_lines)
        summary["herald_log_sample"] = warn_lines[:20]
        if warn_lines:
            print(f"herald log: {len(warn_lines)} lines at warn or above, first ones:")
            for ln in warn_lines[:10]:
                print("  " + ln)
        ok = all(c["pass"] for c in checks) and herald_exit == 0
        if herald_exit != 0:
            print(f"FAIL  herald exited {herald_exit} on SIGTERM")
        print(f"{ME}: {'PASS' if ok else 'FAIL'} ({sum(c['pass'] for c in checks)}/{len(checks)} checks)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "seed": seed, "summary": summary, "checks": checks,
                           "results": res, "samples": soak.samples}, f, indent=1, default=str)
            log(f"results in {args.json}")
        rc = 0 if ok else 1
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    except Exception as e:  # noqa: BLE001 (report and clean up whatever went wrong)
        log(f"error: {e!r}")
        if herald is not None:
            print(f"{ME}: end of the herald log:\n{tail(os.path.join(tmp, 'herald.log'))}", file=sys.stderr)
        rc = 2
    finally:
        procs.stop_all()
        if args.keep_temp or rc == 2:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
