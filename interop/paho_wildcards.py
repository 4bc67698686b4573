#!/usr/bin/env python3
"""Wildcard subscriptions, filter validation, the `$` rule, push isolation and a QoS 1 round
trip, with paho-mqtt as the client.

Run against a running Herald: HERALD_HOST=127.0.0.1 HERALD_PORT=18830 python3 interop/paho_wildcards.py
"""

from _paho import RUN, Peer, check, finish, show

P = f"interop/w{RUN}"        # topic prefix of this run
DOLLAR = f"$interop{RUN}"    # a `$` topic root


def main():
    plus = Peer(f"wild-{RUN}-plus")      # P/+/temp at QoS 1
    hashq0 = Peer(f"wild-{RUN}-hash")    # P/# at QoS 0
    spy = Peer(f"wild-{RUN}-spy")        # '#' at QoS 1 and '+/+' at QoS 0 (overlapping)
    dollar = Peer(f"wild-{RUN}-dollar")  # DOLLAR/# explicitly
    pub = Peer(f"wild-{RUN}-pub")
    for p in (plus, hashq0, spy, dollar, pub):
        present, rc = p.connect()
        check(rc == 0 and not present, f"{p.client_id}: CONNACK 0, no session present")

    check(plus.subscribe((f"{P}/+/temp", 1)) == [1], "SUBACK grants QoS 1 for P/+/temp")
    check(hashq0.subscribe((f"{P}/#", 0)) == [0], "SUBACK grants QoS 0 for P/#")
    check(spy.subscribe(("#", 1), ("+/+", 0)) == [1, 0], "SUBACK grants 1, 0 for '#', '+/+'")
    check(dollar.subscribe((f"{DOLLAR}/#", 1)) == [1], "SUBACK grants QoS 1 for an explicit $ filter")

    # Invalid filters are refused one by one (0x80); the connection stays usable.
    codes = plus.subscribe_unchecked((f"{P}/a#", 1), (f"{P}/#/x", 1), (f"{P}/b+", 0), (f"{P}/ok/+", 1))
    check(codes == [0x80, 0x80, 0x80, 1], f"invalid filters get 0x80, the valid one its QoS: {codes}")
    check(plus.is_connected(), "connection stays open after refused filters")

    # Push topics: one's own may be named, another client's may not.
    check(pub.subscribe((f"push/{pub.client_id}", 1)) == [1], "own push topic: granted QoS 1")
    check(pub.subscribe((f"push/{plus.client_id}", 1)) == [0x80], "another client's push topic: 0x80")
    check(pub.subscribe((f"push/{plus.client_id}", 0), (f"{P}/x", 0)) == [0x80, 0],
          "refusal is per filter within one SUBSCRIBE")

    sent = [
        (f"{P}/kitchen/temp", "t1"),       # plus, hash, spy
        (f"{P}/kitchen/humidity", "h1"),   # hash, spy
        (f"{P}/a/b/temp", "deep"),         # hash, spy ('+' is one level only)
        (P, "parent"),                     # hash ('P/#' matches its parent), spy
        (f"{DOLLAR}/x", "dollar"),         # dollar only: no leading wildcard matches '$'
        (f"push/{plus.client_id}", "p1"),  # plus only, on its push topic
        (f"{P}/end", "end"),               # marker
    ]
    for topic, payload in sent:
        pub.publish(topic, payload, qos=1)  # raises if no PUBACK
    check(True, f"publisher got a PUBACK for each of {len(sent)} QoS 1 messages")
    # Overlap: a two-level topic matches both of spy's filters; it must arrive once, at QoS 1.
    two = f"w{RUN}/two"
    pub.publish(two, "overlap", qos=1)
    pub.publish(f"{P}/end2", "end", qos=1)

    got, ok = plus.until(f"push/{plus.client_id}")
    got += plus.drain()
    check(ok, "P/+/temp subscriber got its push message")
    check(show(got) == [(f"{P}/kitchen/temp", "t1", 1, 0, 0), (f"push/{plus.client_id}", "p1", 1, 0, 0)],
          f"P/+/temp: exactly t1 and its own push, QoS 1: {show(got)}")

    got, ok = hashq0.until(f"{P}/end2")
    got += hashq0.drain()
    check(ok, "P/# subscriber got the marker")
    check([(t, p) for t, p, *_ in show(got)] ==
          [(f"{P}/kitchen/temp", "t1"), (f"{P}/kitchen/humidity", "h1"), (f"{P}/a/b/temp", "deep"),
           (P, "parent"), (f"{P}/end", "end"), (f"{P}/end2", "end")],
          f"P/#: every P topic in publish order, nothing else: {show(got)}")
    check(all(m.qos == 0 for m in got), "P/# at QoS 0: QoS 1 messages are downgraded to 0")

    got, ok = spy.until(f"{P}/end2")
    got += spy.drain()
    check(ok, "'#' subscriber got the marker")
    topics = [m.topic for m in got]
    check(not any(t.startswith("$") for t in topics), f"'#' and '+/+' never match a $ topic: {topics}")
    check(not any(t.startswith("push/") for t in topics), f"'#' never receives a push topic: {topics}")
    check(topics.count(two) == 1, f"overlapping '#' and '+/+': one copy of {two}: {topics}")
    check([m.qos for m in got if m.topic == two] == [1], "the one copy has the highest QoS (1)")
    check(topics.count(f"{P}/kitchen/temp") == 1, "'#' receives P/kitchen/temp once")

    got = dollar.recv_n(1)
    check(show(got) == [(f"{DOLLAR}/x", "dollar", 1, 0, 0)], f"explicit $ filter receives the $ topic: {show(got)}")

    # Unsubscribe stops delivery; the push topic is not a subscription and stays.
    plus.unsubscribe(f"{P}/+/temp")
    pub.publish(f"{P}/kitchen/temp", "t2", qos=1)
    pub.publish(f"push/{plus.client_id}", "p2", qos=1)
    got = plus.drain()
    check(show(got) == [(f"push/{plus.client_id}", "p2", 1, 0, 0)],
          f"after UNSUBSCRIBE: only the push message: {show(got)}")

    # QoS 0 publish to a QoS 1 subscriber arrives at QoS 0.
    spy.drain(0.2)
    pub.publish(f"{P}/q0", "zero", qos=0)
    got = [m for m in spy.recv_n(1) if m.topic == f"{P}/q0"]
    check([m.qos for m in got] == [0], "QoS 0 publish reaches a QoS 1 subscriber at QoS 0")

    for p in (plus, hashq0, spy, dollar, pub):
        p.disconnect()
    finish()


if __name__ == "__main__":
    main()
