#!/usr/bin/env python3
"""paho-mqtt over WebSocket: `transport="websockets"`, path /mqtt, paho's default subprotocol
(`mqtt`), once on the ws listener and once on the wss listener (tls_set with the run's CA).
For each:
  1. connect (CONNACK 0);
  2. push to a device: the device is subscribed to push/<its id> at CONNECT without a
     SUBSCRIBE; a second paho client publishes QoS 1 to push/<id> and the device gets it;
  3. QoS 1 round trip on an ordinary topic;
  4. persistent session: the device goes away, three QoS 1 pushes are stored, it reconnects
     with clean session 0 (session present) and gets them in order;
  5. a 200 KB payload (more than one WebSocket frame's worth at any usual frame size, and more
     than one read) arrives intact, both as a push and on an ordinary topic;
  6. a device on WebSocket gets a push published over plain TCP (and the reverse), so the
     transports share one broker.
Finally, wss with a CA that did not sign Herald's certificate fails to connect.

Run by interop/run.sh (HERALD_WS_PORT, HERALD_WSS_PORT, HERALD_CAFILE, HERALD_OTHER_CAFILE).
"""

import hashlib
import os
import ssl
import time

from _paho import RUN, Peer, check, finish, show

BIG = 200 * 1024


def digest(b):
    return hashlib.sha256(bytes(b)).hexdigest()[:16]


def run(transport):
    tag = f"{transport}-{RUN}"
    dev_id = f"dev-{tag}"
    push = f"push/{dev_id}"
    topic = f"interop/{tag}/t"

    # 1. connect
    dev = Peer(dev_id, clean_session=False, transport=transport)
    present, rc = dev.connect()
    check(rc == 0, f"{transport}: device connects, CONNACK {rc}")
    if rc != 0:
        return
    backend = Peer(f"backend-{tag}", transport=transport)
    present_b, rc = backend.connect()
    check(rc == 0 and not present_b, f"{transport}: backend connects with a clean session, CONNACK {rc}")

    # 2. push to a device that sent no SUBSCRIBE
    backend.publish(push, b"hello", qos=1)
    got = dev.recv_n(1)
    check(show(got) == [(push, "hello", 1, 0, 0)], f"{transport}: device gets its push, QoS 1: {show(got)}")

    # 3. QoS 1 round trip on an ordinary topic (backend subscribes, device publishes)
    codes = backend.subscribe((topic, 1))
    check(codes == [1], f"{transport}: SUBSCRIBE {topic} QoS 1 granted: {codes}")
    dev.publish(topic, b"ping", qos=1)
    got = backend.recv_n(1)
    check(show(got) == [(topic, "ping", 1, 0, 0)], f"{transport}: QoS 1 publish arrives at QoS 1: {show(got)}")

    # 5. large payloads, both directions through the WebSocket layer
    big = os.urandom(BIG)
    backend.publish(push, big, qos=1)
    got = dev.recv_n(1, timeout=15)
    check(len(got) == 1 and got[0].payload == big,
          f"{transport}: {BIG}-byte push arrives intact "
          f"({[(len(m.payload), digest(m.payload)) for m in got]} vs {digest(big)})")
    big2 = os.urandom(BIG)
    dev.publish(topic, big2, qos=1)
    got = backend.recv_n(1, timeout=15)
    check(len(got) == 1 and got[0].payload == big2,
          f"{transport}: {BIG}-byte QoS 1 publish on an ordinary topic arrives intact "
          f"({[(len(m.payload), digest(m.payload)) for m in got]} vs {digest(big2)})")
    check(dev.is_connected() and backend.is_connected(), f"{transport}: both connections still up")

    # 4. persistent session: offline pushes are stored and replayed in order
    time.sleep(0.3)  # let paho's PUBACKs for what the device got leave before it goes
    dev.disconnect()
    for i in (1, 2, 3):
        backend.publish(push, f"offline-{i}", qos=1)  # raises without PUBACK
    back = Peer(dev_id, clean_session=False, transport=transport)
    present, rc = back.connect()
    check(rc == 0 and present, f"{transport}: reconnect with clean session 0: session present ({present}, rc {rc})")
    got = back.recv_n(3)
    check(show(got) == [(push, f"offline-{i}", 1, 0, 0) for i in (1, 2, 3)],
          f"{transport}: offline pushes replayed in order: {show(got)}")

    # 6. across transports: a plain-TCP backend pushes to the WebSocket device, and the
    #    WebSocket device publishes to a plain-TCP subscriber
    tcp = Peer(f"tcp-{tag}")
    tcp.connect()
    tcp.subscribe((topic + "/x", 1))
    tcp.publish(push, b"from tcp", qos=1)
    got = back.recv_n(1)
    check(show(got) == [(push, "from tcp", 1, 0, 0)], f"{transport}: push published over TCP reaches the device: {show(got)}")
    back.publish(topic + "/x", b"to tcp", qos=1)
    got = tcp.recv_n(1)
    check(show(got) == [(topic + "/x", "to tcp", 1, 0, 0)], f"{transport}: publish reaches a TCP subscriber: {show(got)}")
    check(back.drain(0.5) == [], f"{transport}: nothing delivered twice")

    # Leave no session behind.
    time.sleep(0.3)
    back.disconnect()
    gone = Peer(dev_id, clean_session=True, transport=transport)
    gone.connect()
    gone.disconnect()
    for p in (tcp, backend):
        p.disconnect()


def untrusted():
    """wss against a CA that did not sign the server's certificate: the TLS handshake fails."""
    p = Peer(f"untrusted-{RUN}", transport="wss", ca_certs=os.environ["HERALD_OTHER_CAFILE"])
    try:
        p.connect()
        check(False, "wss with a CA that did not sign the server certificate must not connect")
        p.disconnect()
    except ssl.SSLCertVerificationError as e:
        check(True, f"wss with the wrong CA is refused by the client: {e.reason}")
    except Exception as e:  # any other failure to connect still counts, but say which
        check(isinstance(e, (ssl.SSLError, OSError)), f"wss with the wrong CA fails to connect: {type(e).__name__}: {e}")


def main():
    for transport in ("ws", "wss"):
        try:
            run(transport)
        except Exception as e:  # a timeout in one transport must not hide the other's results
            check(False, f"{transport}: {type(e).__name__}: {e}")
    untrusted()
    finish()


if __name__ == "__main__":
    main()
