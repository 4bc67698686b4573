#!/usr/bin/env python3
"""MQTT over WebSocket at the frame level, with a hand-written WebSocket client (RFC 6455, MQTT
3.1.1 section 6), on the ws and the wss listener. Real clients frame differently (paho: one
frame per write; MQTT.js: one per packet; browsers as they like), and the broker must not care:
  - the opening handshake: 101, Sec-WebSocket-Accept, the subprotocol chosen among those
    offered (`mqtt`, `mqttv3.1`); a request for another path, or with no MQTT subprotocol, is
    not upgraded;
  - one MQTT packet split over several frames, and several packets in one frame;
  - a message fragmented into a binary frame and continuation frames;
  - a WebSocket ping is answered with a pong carrying the same data, between MQTT packets;
  - a 200 KB PUBLISH arrives intact whatever frames the server cuts it into;
  - a text frame closes the connection (MQTT-6.0.0-1); a close frame is answered.

Run by interop/run.sh (HERALD_HOST, HERALD_WS_PORT, HERALD_WSS_PORT, HERALD_CAFILE).
"""

import base64
import hashlib
import os
import socket
import ssl
import struct
import time

from _paho import RUN, WAIT, check, finish

HOST = os.environ.get("HERALD_HOST", "127.0.0.1")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BIN, CONT, TEXT, CLOSE, PING, PONG = 0x2, 0x0, 0x1, 0x8, 0x9, 0xA


# --- MQTT packets (3.1.1) -------------------------------------------------------------------

def remaining_length(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s):
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def packet(first, body):
    return bytes([first]) + remaining_length(len(body)) + body


def connect(client_id, clean=True, keepalive=30):
    return packet(0x10, utf8("MQTT") + bytes([4, 0x02 if clean else 0]) + struct.pack("!H", keepalive) + utf8(client_id))


def subscribe(pid, topic, qos=1):
    return packet(0x82, struct.pack("!H", pid) + utf8(topic) + bytes([qos]))


def publish(topic, payload, qos=0, pid=1):
    body = utf8(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


def puback(pid):
    return packet(0x40, struct.pack("!H", pid))


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


# --- WebSocket client -----------------------------------------------------------------------

class WsError(Exception):
    pass


class Ws:
    def __init__(self, transport, path="/mqtt", protocols=("mqtt",)):
        port = int(os.environ["HERALD_WSS_PORT" if transport == "wss" else "HERALD_WS_PORT"])
        sock = socket.create_connection((HOST, port), WAIT)
        if transport == "wss":
            ctx = ssl.create_default_context(cafile=os.environ["HERALD_CAFILE"])
            sock = ctx.wrap_socket(sock, server_hostname=HOST)
        sock.settimeout(WAIT)
        self.sock = sock
        self.buf = b""   # bytes read from the socket, not yet parsed as frames
        self.mqtt = b""  # MQTT bytes from binary/continuation frames, not yet parsed as packets
        self.pongs = []
        self.closed = None  # the close frame's payload, once one came
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if protocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(4096)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1]) if status_line.startswith("HTTP/") else None
        self.headers = {}
        for h in header_lines:
            k, _, v = h.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        want = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        self.accept_ok = self.headers.get("sec-websocket-accept") == want

    def send_frame(self, opcode, data, fin=True):
        mask = os.urandom(4)
        n = len(data)
        head = bytes([(0x80 if fin else 0) | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        # XOR with the mask, 4 bytes at a time through one big integer (fast enough for 200 KB).
        pad = (-n) % 4
        m = int.from_bytes(mask * ((n + pad) // 4), "big")
        masked = (int.from_bytes(bytes(data) + b"\0" * pad, "big") ^ m).to_bytes(n + pad, "big")[:n]
        self.sock.sendall(head + mask + masked)

    def send(self, data):
        """MQTT bytes in one binary frame."""
        self.send_frame(BIN, data)

    def _read_frame(self, deadline):
        while True:
            if len(self.buf) >= 2:
                b0, b1 = self.buf[0], self.buf[1]
                n, off = b1 & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, off = struct.unpack("!H", self.buf[2:4])[0], 4
                elif n == 127 and len(self.buf) >= 10:
                    n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
                if b1 & 0x80:
                    raise WsError("the server sent a masked frame")
                if (b1 & 0x7F) < 126 or off > 2:
                    if len(self.buf) >= off + n:
                        data, self.buf = self.buf[off:off + n], self.buf[off + n:]
                        return b0 & 0x0F, bool(b0 & 0x80), data
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete WebSocket frame in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk

    def _pump(self, deadline):
        """Reads one frame and files it: MQTT bytes, a pong, or a close."""
        opcode, _fin, data = self._read_frame(deadline)
        if opcode in (BIN, CONT):
            self.mqtt += data
        elif opcode == PONG:
            self.pongs.append(data)
        elif opcode == PING:
            self.send_frame(PONG, data)
        elif opcode == CLOSE:
            self.closed = data
            raise ConnectionError(f"close frame from the server: {data[:2].hex()}")
        else:
            raise WsError(f"unexpected frame opcode {opcode:#x} from the server")

    def recv_packet(self, timeout=None):
        """The next MQTT packet (first byte, body)."""
        deadline = time.monotonic() + (WAIT if timeout is None else timeout)
        while True:
            parsed = self._parse()
            if parsed:
                return parsed
            self._pump(deadline)

    def _parse(self):
        b = self.mqtt
        if len(b) < 2:
            return None
        n, mult, i = 0, 1, 1
        while True:
            if i >= len(b):
                return None
            n += (b[i] & 0x7F) * mult
            mult *= 128
            i += 1
            if not b[i - 1] & 0x80:
                break
        if len(b) < i + n:
            return None
        first, body = b[0], b[i:i + n]
        self.mqtt = b[i + n:]
        return first, body

    def recv_pong(self, timeout=None):
        deadline = time.monotonic() + (WAIT if timeout is None else timeout)
        while not self.pongs:
            self._pump(deadline)
        return self.pongs.pop(0)

    def expect_closed(self, timeout=None):
        """True once the server closes: a close frame, or the TCP connection ends."""
        deadline = time.monotonic() + (WAIT if timeout is None else timeout)
        try:
            while True:
                self._pump(deadline)
        except (ConnectionError, ssl.SSLError, OSError) as e:
            return not isinstance(e, (TimeoutError, socket.timeout))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def kind(p):
    return p[0] >> 4


def connected(ws, what):
    first, body = ws.recv_packet()
    return check(kind((first, body)) == 2 and body[1] == 0, f"{what}: CONNACK 0 ({first:#x} {body.hex()})")


# --- the checks -----------------------------------------------------------------------------

def handshake(transport):
    ws = Ws(transport)
    check(ws.status == 101 and ws.accept_ok, f"{transport}: GET /mqtt upgrades: 101, Sec-WebSocket-Accept right ({ws.status})")
    check(ws.headers.get("sec-websocket-protocol") == "mqtt",
          f"{transport}: subprotocol mqtt chosen: {ws.headers.get('sec-websocket-protocol')!r}")
    ws.close()
    ws = Ws(transport, protocols=("mqttv3.1",))
    check(ws.status == 101 and ws.headers.get("sec-websocket-protocol") == "mqttv3.1",
          f"{transport}: subprotocol mqttv3.1 accepted ({ws.status}, {ws.headers.get('sec-websocket-protocol')!r})")
    ws.close()
    ws = Ws(transport, protocols=("chat", "mqtt"))
    check(ws.status == 101 and ws.headers.get("sec-websocket-protocol") == "mqtt",
          f"{transport}: of 'chat, mqtt', mqtt is chosen ({ws.status}, {ws.headers.get('sec-websocket-protocol')!r})")
    ws.close()
    ws = Ws(transport, path="/not-mqtt")
    check(ws.status != 101, f"{transport}: GET /not-mqtt is not upgraded (HTTP {ws.status})")
    ws.close()
    ws = Ws(transport, protocols=("chat",))
    check(ws.status != 101 or "sec-websocket-protocol" not in ws.headers,
          f"{transport}: no MQTT subprotocol offered: not upgraded, or no subprotocol chosen "
          f"(HTTP {ws.status}, {ws.headers.get('sec-websocket-protocol')!r})")
    ws.close()


def framing(transport):
    tag = f"wsf-{transport}-{RUN}"
    topic = f"interop/{tag}/t"
    ws = Ws(transport)
    try:
        # CONNECT cut into three frames: 1 byte, 2 bytes, the rest.
        c = connect(tag)
        ws.send(c[:1])
        ws.send(c[1:3])
        ws.send(c[3:])
        connected(ws, f"{transport}: CONNECT split over 3 frames")

        # SUBSCRIBE, a QoS 1 PUBLISH to it and PINGREQ, all in one frame.
        ws.send(subscribe(7, topic, 1) + publish(topic, b"one-frame", qos=1, pid=8) + PINGREQ)
        got = [ws.recv_packet() for _ in range(4)]
        kinds = sorted(kind(p) for p in got)
        check(kinds == [3, 4, 9, 13], f"{transport}: SUBSCRIBE+PUBLISH+PINGREQ in one frame: SUBACK, PUBACK, PUBLISH, PINGRESP ({kinds})")
        pub = next((p for p in got if kind(p) == 3), None)
        if pub is not None:
            check(pub[1].endswith(b"one-frame"), f"{transport}: the PUBLISH carries its payload")
            if pub[0] & 0x06:
                ws.send(puback(struct.unpack("!H", pub[1][2 + len(topic):4 + len(topic)])[0]))

        # A PUBLISH fragmented: binary frame (FIN=0), continuation (FIN=0), continuation (FIN=1),
        # with a ping between the fragments (control frames may be interleaved).
        p = publish(topic, b"fragmented", qos=0)
        ws.send_frame(BIN, p[:4], fin=False)
        ws.send_frame(PING, b"between")
        ws.send_frame(CONT, p[4:9], fin=False)
        ws.send_frame(CONT, p[9:], fin=True)
        first, body = ws.recv_packet()
        check(first >> 4 == 3 and body.endswith(b"fragmented"),
              f"{transport}: a PUBLISH fragmented over 3 frames arrives ({first:#x}, {body[-10:]!r})")
        check(ws.recv_pong() == b"between", f"{transport}: a ping between fragments gets its pong")

        # A ping on its own.
        ws.send_frame(PING, b"hi")
        check(ws.recv_pong() == b"hi", f"{transport}: WebSocket ping answered with a pong, same data")

        # 200 KB in, 200 KB out, as QoS 0 to itself.
        big = os.urandom(200 * 1024)
        ws.send(publish(topic, big, qos=0))
        first, body = ws.recv_packet(timeout=15)
        check(first >> 4 == 3 and body[2 + len(topic):] == big, f"{transport}: 200 KB PUBLISH comes back intact ({len(body)} bytes)")

        # A clean end: DISCONNECT, then a close frame; the server closes too.
        ws.send(DISCONNECT)
        try:
            ws.send_frame(CLOSE, struct.pack("!H", 1000))
        except OSError:
            pass  # the server may already have closed after DISCONNECT
        check(ws.expect_closed(), f"{transport}: DISCONNECT + close frame: the server closes")
    except Exception as e:
        check(False, f"{transport}: {type(e).__name__}: {e}")
    finally:
        ws.close()

    # A text frame is a protocol error for MQTT over WebSocket: the server closes.
    ws = Ws(transport)
    try:
        ws.send(connect(tag + "-text"))
        connected(ws, f"{transport}: second connection")
        ws.send_frame(TEXT, b"\xc0\x00")
        check(ws.expect_closed(), f"{transport}: a text frame closes the connection")
    except Exception as e:
        check(False, f"{transport}: text frame: {type(e).__name__}: {e}")
    finally:
        ws.close()


def main():
    for transport in ("ws", "wss"):
        try:
            handshake(transport)
        except Exception as e:
            check(False, f"{transport}: handshake: {type(e).__name__}: {e}")
        framing(transport)
    finish()


if __name__ == "__main__":
    main()
