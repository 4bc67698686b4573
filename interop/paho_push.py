#!/usr/bin/env python3
"""The push model with paho-mqtt: a device with a persistent session that received messages
but did not acknowledge them, lost its network and came back gets them again first, with DUP=1
and the same packet ids, then what was pushed while it was away; its will is published.

Run against a running Herald: HERALD_HOST=127.0.0.1 HERALD_PORT=18830 python3 interop/paho_push.py
"""

import time

from _paho import RUN, Peer, check, finish, show

DEV = f"push-{RUN}-dev"
TOPIC = f"push/{DEV}"
WILL = f"interop/p{RUN}/will"


def main():
    watcher = Peer(f"push-{RUN}-watcher")
    watcher.connect()
    watcher.subscribe((WILL, 1))

    # The device connects with a persistent session, a will, and holds back its PUBACKs.
    dev = Peer(DEV, clean_session=False, manual_ack=True)
    dev.c.will_set(WILL, "gone", qos=1)
    present, rc = dev.connect()
    check(rc == 0 and not present, f"first CONNECT: rc 0, no session present ({present}, {rc})")

    backend = Peer(f"push-{RUN}-backend")
    backend.connect()
    for i in (1, 2, 3):
        backend.publish(TOPIC, f"m{i}", qos=1)  # raises without PUBACK
    first = dev.recv_n(3)
    check(show(first) == [(TOPIC, f"m{i}", 1, 0, 0) for i in (1, 2, 3)],
          f"online device gets m1..m3 live, QoS 1, DUP=0: {show(first)}")

    # Network loss: no DISCONNECT, no PUBACK for m1..m3.
    dev.drop()
    got = watcher.recv_n(1)
    check(show(got) == [(WILL, "gone", 1, 0, 0)], f"the will is published on connection loss: {show(got)}")
    time.sleep(0.2)
    backend.publish(TOPIC, "m4", qos=1)  # while the device is offline

    back = Peer(DEV, clean_session=False)
    present, rc = back.connect()
    check(rc == 0 and present, f"reconnect with clean session 0: session present ({present}, {rc})")
    again = back.recv_n(4)
    check(show(again) == [(TOPIC, f"m{i}", 1, 0, 1) for i in (1, 2, 3)] + [(TOPIC, "m4", 1, 0, 0)],
          f"replay m1..m3 with DUP=1, then m4 with DUP=0, in order: {show(again)}")
    check([m.mid for m in again[:3]] == [m.mid for m in first],
          f"redelivered with the original packet ids: {[m.mid for m in first]} -> {[m.mid for m in again[:3]]}")
    check(len({m.mid for m in again}) == len(again), "no two in-flight messages share a packet id")
    time.sleep(0.3)  # paho sends its PUBACKs from the network thread
    back.disconnect()

    # Everything was acknowledged: the next session is present but empty.
    third = Peer(DEV, clean_session=False)
    present, rc = third.connect()
    got = third.drain()
    check(rc == 0 and present and got == [], f"after PUBACKs nothing is redelivered ({present}, {show(got)})")
    third.disconnect()
    check(watcher.drain(0.3) == [], "a clean DISCONNECT publishes no will")

    # A clean session discards the stored session.
    gone = Peer(DEV, clean_session=True)
    present, rc = gone.connect()
    check(rc == 0 and not present, "clean session 1: no session present")
    gone.disconnect()

    for p in (watcher, backend):
        p.disconnect()
    finish()


if __name__ == "__main__":
    main()
