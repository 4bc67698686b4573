#!/usr/bin/env python3
"""Retained messages with paho-mqtt: set, replace, clear, wildcard and `$` matching, QoS
downgrade, and push topics never being retained.

Run against a running Herald: HERALD_HOST=127.0.0.1 HERALD_PORT=18830 python3 interop/paho_retained.py
"""

from _paho import RUN, Peer, check, finish, show

P = f"interop/r{RUN}"
DOLLAR = f"$interop{RUN}"


def fresh(name, *filters):
    """A new clean-session client subscribed to `filters`, and the messages the SUBSCRIBE brought."""
    p = Peer(f"ret-{RUN}-{name}")
    p.connect()
    codes = p.subscribe(*filters)
    check(all(c != 0x80 for c in codes), f"{p.client_id}: subscribed {filters}: {codes}")
    return p, p.drain()


def main():
    pub = Peer(f"ret-{RUN}-pub")
    pub.connect()

    # Set.
    pub.publish(f"{P}/a", "v1", qos=1, retain=True)
    s1, got = fresh("s1", (f"{P}/#", 1))
    check(show(got) == [(f"{P}/a", "v1", 1, 1, 0)], f"new subscriber gets the retained v1 with RETAIN=1: {show(got)}")

    # Replace: an existing subscriber gets the new value live (RETAIN=0), a new one only v2.
    pub.publish(f"{P}/a", "v2", qos=1, retain=True)
    got = s1.recv_n(1)
    check(show(got) == [(f"{P}/a", "v2", 1, 0, 0)], f"live delivery of a retained publish has RETAIN=0: {show(got)}")
    s2, got = fresh("s2", (f"{P}/#", 1))
    check(show(got) == [(f"{P}/a", "v2", 1, 1, 0)], f"after replace, a new subscriber gets only v2: {show(got)}")

    # A non-retained publish does not replace the retained value.
    pub.publish(f"{P}/a", "plain", qos=1, retain=False)
    s3, got = fresh("s3", (f"{P}/a", 1))
    check(show(got) == [(f"{P}/a", "v2", 1, 1, 0)], f"a plain publish leaves the retained v2: {show(got)}")

    # QoS downgrade: a retained QoS 1 message to a QoS 0 subscription arrives at QoS 0.
    s4, got = fresh("s4", (f"{P}/a", 0))
    check(show(got) == [(f"{P}/a", "v2", 0, 1, 0)], f"retained QoS 1 to a QoS 0 subscriber: QoS 0: {show(got)}")

    # Wildcards pick retained messages as they pick live ones.
    pub.publish(f"{P}/x/y", "xy", qos=0, retain=True)
    s5, got = fresh("s5", (f"{P}/+/y", 1))
    check(show(got) == [(f"{P}/x/y", "xy", 0, 1, 0)], f"P/+/y gets the retained P/x/y at its QoS 0: {show(got)}")
    s6, got = fresh("s6", (f"{P}/+", 1))
    check(show(got) == [(f"{P}/a", "v2", 1, 1, 0)], f"P/+ gets P/a but not P/x/y: {show(got)}")

    # `$` topics: retained, but not given to a leading wildcard.
    pub.publish(f"{DOLLAR}/r", "d", qos=1, retain=True)
    s7, got = fresh("s7", ("#", 0))
    check(all(not m.topic.startswith("$") for m in got), f"'#' gets no retained $ topic: {show(got)}")
    s8, got = fresh("s8", (f"{DOLLAR}/#", 1))
    check(show(got) == [(f"{DOLLAR}/r", "d", 1, 1, 0)], f"{DOLLAR}/# gets the retained $ message: {show(got)}")

    # Push topics are never retained: the device gets the message (RETAIN=0), nobody else.
    dev = Peer(f"ret-{RUN}-dev")
    dev.connect()
    pub.publish(f"push/{dev.client_id}", "hello", qos=1, retain=True)
    got = dev.recv_n(1)
    check(show(got) == [(f"push/{dev.client_id}", "hello", 1, 0, 0)], f"device gets its push with RETAIN=0: {show(got)}")
    s9, got = fresh("s9", ("#", 1), ("push/#", 1))
    check(not any(m.topic.startswith("push/") for m in got), f"no retained push message for '#', 'push/#': {show(got)}")
    dev.disconnect()
    dev2 = Peer(f"ret-{RUN}-dev")  # same id, clean session: would see a retained copy if one existed
    dev2.connect()
    codes = dev2.subscribe((f"push/{dev2.client_id}", 1))
    got = dev2.drain()
    check(codes == [1] and got == [], f"device resubscribing to its push topic gets no retained copy: {show(got)}")

    # Clear: an empty retained payload removes it; current subscribers see the empty message.
    s1.drain(0.2)
    pub.publish(f"{P}/a", b"", qos=1, retain=True)
    got = s1.recv_n(1)
    check(show(got) == [(f"{P}/a", "", 1, 0, 0)], f"the clearing publish reaches current subscribers: {show(got)}")
    s10, got = fresh("s10", (f"{P}/#", 1))
    check(show(got) == [(f"{P}/x/y", "xy", 0, 1, 0)], f"after clear, only P/x/y is retained: {show(got)}")

    # Leave nothing retained behind for later tests.
    for topic in (f"{P}/x/y", f"{DOLLAR}/r"):
        pub.publish(topic, b"", qos=1, retain=True)
    s11, got = fresh("s11", (f"{P}/#", 1), (f"{DOLLAR}/#", 1))
    check(got == [], f"everything cleared: {show(got)}")

    for p in (pub, s1, s2, s3, s4, s5, s6, s7, s8, s9, dev2, s10, s11):
        p.disconnect()
    finish()


if __name__ == "__main__":
    main()
