"""Shared helpers for the paho-mqtt interop tests (paho-mqtt 2.x, MQTT 3.1.1).

Every wait is bounded by a timeout so a misbehaving broker fails a test instead of hanging it.
The broker address comes from HERALD_HOST / HERALD_PORT (interop/run.sh sets them); a Peer
can also speak MQTT over TLS, WebSocket (ws) or WebSocket over TLS (wss), on the ports and with
the CA that run.sh exports (HERALD_TLS_PORT, HERALD_WS_PORT, HERALD_WSS_PORT, HERALD_CAFILE).
"""

import os
import queue
import sys
import threading
import time

import paho.mqtt
import paho.mqtt.client as mqtt

if int(paho.mqtt.__version__.split(".")[0]) < 2:
    sys.exit(f"paho-mqtt >= 2 is required, found {paho.mqtt.__version__} (scripts/deps.sh installs it)")

HOST = os.environ.get("HERALD_HOST", "127.0.0.1")
PORT = int(os.environ.get("HERALD_PORT", "1883"))
WS_PATH = "/mqtt"
# transport name -> (port environment variable, paho transport, TLS?)
TRANSPORTS = {
    "tcp": ("HERALD_PORT", "tcp", False),
    "tls": ("HERALD_TLS_PORT", "tcp", True),
    "ws": ("HERALD_WS_PORT", "websockets", False),
    "wss": ("HERALD_WSS_PORT", "websockets", True),
}
WAIT = float(os.environ.get("INTEROP_WAIT", "5"))  # seconds for anything that must arrive
QUIET = float(os.environ.get("INTEROP_QUIET", "1"))  # seconds of silence that mean "nothing came"
RUN = str(os.getpid())  # keeps client ids and topics of concurrent runs apart

_failures = []


def check(ok, what):
    """Records one assertion; the test goes on so that one run shows every failure."""
    print(("ok   - " if ok else "FAIL - ") + what, flush=True)
    if not ok:
        _failures.append(what)
    return ok


def finish():
    """Exit status of the script: 0 when every check passed."""
    if _failures:
        print(f"{len(_failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)
    sys.exit(0)


class Peer:
    """One MQTT 3.1.1 connection driven by paho's network thread."""

    def __init__(self, client_id, clean_session=True, manual_ack=False, transport="tcp", ca_certs=None):
        """transport: "tcp", "tls", "ws" or "wss" (see TRANSPORTS); ca_certs: the CA file that
        TLS checks the server against (default HERALD_CAFILE)."""
        self.client_id = client_id
        port_var, paho_transport, tls = TRANSPORTS[transport]
        self.port = PORT if transport == "tcp" else int(os.environ[port_var])
        self.messages = queue.Queue()
        self._cond = threading.Condition()
        self._connack = None
        self._subacks = {}
        self._unsubacks = set()
        self._disconnected = threading.Event()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            manual_ack=manual_ack,
            transport=paho_transport,
        )
        if paho_transport == "websockets":
            self.c.ws_set_options(path=WS_PATH)
        if tls:
            self.c.tls_set(ca_certs=ca_certs or os.environ["HERALD_CAFILE"])
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.c.on_disconnect = lambda *_a: self._disconnected.set()

    # paho callbacks (network thread)
    def _on_connect(self, _c, _u, flags, reason_code, _p):
        with self._cond:
            self._connack = (bool(flags.session_present), reason_code.value)
            self._cond.notify_all()

    def _on_subscribe(self, _c, _u, mid, reason_codes, _p):
        with self._cond:
            self._subacks[mid] = [rc.value for rc in reason_codes]
            self._cond.notify_all()

    def _on_unsubscribe(self, _c, _u, mid, _rc, _p):
        with self._cond:
            self._unsubacks.add(mid)
            self._cond.notify_all()

    def _wait_for(self, pred, what):
        with self._cond:
            if not self._cond.wait_for(pred, timeout=WAIT):
                raise TimeoutError(f"{self.client_id}: no {what} within {WAIT}s")

    # what the tests call
    def connect(self, keepalive=30):
        """Connects and returns (session_present, connack return code)."""
        self.c.connect(HOST, self.port, keepalive=keepalive)
        self.c.loop_start()
        self._wait_for(lambda: self._connack is not None, "CONNACK")
        return self._connack

    def subscribe(self, *filters):
        """filters: (filter, qos) pairs, sent in one SUBSCRIBE. Returns the SUBACK codes."""
        rc, mid = self.c.subscribe(list(filters))
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"{self.client_id}: subscribe failed locally: {rc}")
        self._wait_for(lambda: mid in self._subacks, "SUBACK")
        return self._subacks[mid]

    def subscribe_unchecked(self, *filters):
        """Like subscribe, but without paho's own filter validation, so that invalid filters
        reach the broker (paho's public subscribe() refuses them locally). Uses paho's
        internal _send_subscribe, present throughout paho-mqtt 2.x."""
        rc, mid = self.c._send_subscribe(False, [(f.encode("utf-8"), q) for f, q in filters])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"{self.client_id}: subscribe failed locally: {rc}")
        self._wait_for(lambda: mid in self._subacks, "SUBACK")
        return self._subacks[mid]

    def unsubscribe(self, topic):
        rc, mid = self.c.unsubscribe(topic)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"{self.client_id}: unsubscribe failed locally: {rc}")
        self._wait_for(lambda: mid in self._unsubacks, "UNSUBACK")

    def publish(self, topic, payload, qos=1, retain=False):
        """Publishes and, for QoS > 0, waits for the broker's acknowledgement."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            info.wait_for_publish(timeout=WAIT)
            if not info.is_published():
                raise TimeoutError(f"{self.client_id}: no PUBACK/PUBCOMP for {topic} within {WAIT}s")
        return info

    def recv(self, timeout=None):
        """The next message, or None if none arrives in time."""
        try:
            return self.messages.get(timeout=WAIT if timeout is None else timeout)
        except queue.Empty:
            return None

    def recv_n(self, n, timeout=None):
        """Up to n messages, waiting at most `timeout` in all."""
        deadline = time.monotonic() + (WAIT if timeout is None else timeout)
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            m = self.recv(left)
            if m is None:
                break
            out.append(m)
        return out

    def drain(self, quiet=None):
        """Everything that arrives until the connection has been quiet for `quiet` seconds."""
        out = []
        while True:
            m = self.recv(QUIET if quiet is None else quiet)
            if m is None:
                return out
            out.append(m)

    def until(self, topic, timeout=None):
        """Messages up to and including the first one on `topic` (a marker)."""
        deadline = time.monotonic() + (WAIT if timeout is None else timeout)
        out = []
        while True:
            left = deadline - time.monotonic()
            m = self.recv(left) if left > 0 else None
            if m is None:
                return out, False
            out.append(m)
            if m.topic == topic:
                return out, True

    def is_connected(self):
        return self.c.is_connected() and not self._disconnected.is_set()

    def disconnect(self):
        """Clean DISCONNECT (no will), then stops the network thread."""
        try:
            self.c.disconnect()
            self._disconnected.wait(WAIT)
        finally:
            self.c.loop_stop()

    def drop(self):
        """Goes away without DISCONNECT, like a device losing its network."""
        sock = self.c.socket()
        self.c.loop_stop()
        if sock is not None:
            sock.close()


def show(msgs):
    return [(m.topic, m.payload.decode(errors="replace"), m.qos, int(m.retain), int(m.dup)) for m in msgs]
