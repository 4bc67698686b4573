#!/usr/bin/env bash
# The push flow with Mosquitto's command-line clients against a running Herald:
#   1. a device subscribes with a persistent session (-c -i dev1) and goes away;
#   2. a backend publishes 5 QoS 1 messages to push/dev1 (each mosquitto_pub waits for PUBACK);
#   3. the device comes back with the same id and receives all 5, in order;
#   4. acknowledged messages are not delivered again;
#   5. a message to push/dev2 is not received by a '#' (or '+/+') subscriber, but dev2 gets it.
#
# Usage: HERALD_HOST=127.0.0.1 HERALD_PORT=18830 interop/mosquitto_push.sh
set -uo pipefail

H=${HERALD_HOST:-127.0.0.1}
P=${HERALD_PORT:-1883}
W=${INTEROP_WAIT:-5}          # seconds mosquitto_sub waits for a message before giving up
tmp=$(mktemp -d)
spy_pid=
cleanup() {
    [ -n "$spy_pid" ] && kill "$spy_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

failures=0
ok() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; failures=$((failures + 1)); }
sub() { timeout $((W + 10)) mosquitto_sub -h "$H" -p "$P" "$@"; }
pub() { timeout $((W + 10)) mosquitto_pub -h "$H" -p "$P" "$@"; }

# 1. The device subscribes (it is auto-subscribed to push/dev1; naming it is allowed), then
#    disconnects: -E exits once the SUBACK is in.
if sub -c -i dev1 -q 1 -t push/dev1 -E; then
    ok "dev1 subscribed with a persistent session and left"
else
    fail "dev1: mosquitto_sub -c -i dev1 -q 1 -t push/dev1 -E exited $?"
fi

# 2. The backend pushes 5 QoS 1 messages; mosquitto_pub exits 0 only after the PUBACK.
pushed=0
for i in 1 2 3 4 5; do
    if pub -q 1 -t push/dev1 -m "msg-$i"; then
        pushed=$((pushed + 1))
    else
        fail "mosquitto_pub -q 1 -t push/dev1 -m msg-$i exited $?"
    fi
done
[ "$pushed" -eq 5 ] && ok "backend: 5 QoS 1 publishes acknowledged"

# 3. The device comes back with the same id and gets all 5 in order, at QoS 1, not retained.
#    --nodelay: with -C, mosquitto_sub closes its socket right after the 5th message while the
#    SUBACK (which follows the replayed messages) is still unread, so the kernel resets the
#    connection and drops whatever it still holds back under Nagle's algorithm: the last
#    PUBACKs. Those messages would then be delivered again (at least once, correctly, and the
#    same happens with Mosquitto as the broker). Without Nagle the PUBACKs leave at once.
got=$(sub -c -i dev1 -q 1 -t push/dev1 -C 5 -W "$W" --nodelay -F '%t %q %r %p')
want=$(for i in 1 2 3 4 5; do echo "push/dev1 1 0 msg-$i"; done)
if [ "$got" = "$want" ]; then
    ok "dev1 reconnected and received msg-1..msg-5 in order"
else
    fail "dev1 reconnect: expected:"$'\n'"$want"$'\n'"got:"$'\n'"$got"
fi

# 4. They were acknowledged by mosquitto_sub: nothing comes a second time.
got=$(sub -c -i dev1 -q 1 -t push/dev1 -C 1 -W 2 -F '%t %p' 2>/dev/null)
if [ -z "$got" ]; then
    ok "acknowledged messages are not redelivered"
else
    fail "dev1 got a message again after acknowledging it: $got"
fi
# Forget dev1's session (clean session discards it).
sub -i dev1 -t push/dev1 -E >/dev/null 2>&1

# 5. Isolation: a wildcard subscriber never sees another device's push topic. A retained
#    canary tells when the spy is subscribed; the marker after the pushes tells it is done.
canary=interop/mosq$$/canary
marker=interop/mosq$$/marker
pub -q 1 -r -t "$canary" -m ready
sub -i "spy$$" -q 1 -t '#' -t '+/+' -C 2 -W $((W + 5)) -F '%t %p' >"$tmp/spy" 2>"$tmp/spy.err" &
spy_pid=$!
for _ in $(seq 50); do
    grep -q "^$canary ready" "$tmp/spy" 2>/dev/null && break
    sleep 0.1
done
if grep -q "^$canary ready" "$tmp/spy"; then
    pub -q 1 -t push/dev2 -m secret-q1
    pub -q 0 -t push/dev2 -m secret-q0
    pub -q 1 -r -t push/dev2 -m secret-retained
    pub -q 1 -t "$marker" -m done
    wait "$spy_pid"
    spy_pid=
    got=$(cat "$tmp/spy")
    if [ "$got" = "$canary ready"$'\n'"$marker done" ]; then
        ok "'#' and '+/+' subscriber did not receive push/dev2"
    else
        fail "'#' subscriber: expected the canary and the marker only, got:"$'\n'"$got"
    fi
else
    fail "spy did not subscribe in time: $(cat "$tmp/spy" "$tmp/spy.err")"
fi
pub -q 1 -r -t "$canary" -n   # clear the retained canary

# ...and a client may not subscribe to another device's push topic: SUBACK 0x80.
err=$(sub -i "spy2$$" -q 1 -t push/dev2 -E 2>&1)
if [ $? -ne 0 ] || grep -qi "denied\|refused\|fail" <<<"$err"; then
    ok "subscribing to another client's push topic is refused ($err)"
else
    fail "subscription to push/dev2 by another client was granted"
fi

# dev2 itself gets the two QoS 1 pushes (the QoS 0 one had no online receiver), not retained.
got=$(sub -c -i dev2 -q 1 -t push/dev2 -C 2 -W "$W" --nodelay -F '%t %q %r %p')
want="push/dev2 1 0 secret-q1"$'\n'"push/dev2 1 0 secret-retained"
if [ "$got" = "$want" ]; then
    ok "dev2 received its QoS 1 pushes, RETAIN=0"
else
    fail "dev2: expected:"$'\n'"$want"$'\n'"got:"$'\n'"$got"
fi
sub -i dev2 -t push/dev2 -E >/dev/null 2>&1

if [ "$failures" -gt 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all checks passed"
