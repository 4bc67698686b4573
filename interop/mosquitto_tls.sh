#!/usr/bin/env bash
# The push flow over TLS with Mosquitto's command-line clients and `--cafile`:
#   1. a device subscribes over TLS with a persistent session (-c -i devtls) and goes away;
#   2. a backend pushes 5 QoS 1 messages over TLS (each mosquitto_pub waits for PUBACK), one
#      more over plain TCP;
#   3. the device comes back over TLS and gets all 6 in order, and nothing twice;
#   4. a live push while the device is connected (-h localhost: the DNS name in the certificate);
#   5. clients that do not trust Herald's CA fail to connect and deliver nothing: --cafile with
#      another CA, --tls-use-os-certs (the system's roots), and plain MQTT on the TLS port.
#
# Usage (interop/run.sh sets these): HERALD_HOST=127.0.0.1 HERALD_PORT=... HERALD_TLS_PORT=...
#   HERALD_CAFILE=ca.pem HERALD_OTHER_CAFILE=other-ca.pem interop/mosquitto_tls.sh
set -uo pipefail

H=${HERALD_HOST:-127.0.0.1}
P=${HERALD_PORT:-1883}
T=${HERALD_TLS_PORT:?HERALD_TLS_PORT is not set (run this through interop/run.sh)}
CA=${HERALD_CAFILE:?HERALD_CAFILE is not set}
OTHER_CA=${HERALD_OTHER_CAFILE:?HERALD_OTHER_CAFILE is not set}
W=${INTEROP_WAIT:-5}          # seconds mosquitto_sub waits for a message before giving up
DEV=devtls
tmp=$(mktemp -d)
dev_pid=
cleanup() {
    [ -n "$dev_pid" ] && kill "$dev_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

failures=0
ok() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; failures=$((failures + 1)); }
# Over TLS, trusting the run's CA.
sub() { timeout $((W + 10)) mosquitto_sub -h "$H" -p "$T" --cafile "$CA" "$@"; }
pub() { timeout $((W + 10)) mosquitto_pub -h "$H" -p "$T" --cafile "$CA" "$@"; }

# Start from no session (a clean session discards one a previous run may have left).
sub -i "$DEV" -t "push/$DEV" -E >/dev/null 2>&1

# 1. The device subscribes over TLS with a persistent session and leaves (-E: after the SUBACK).
if out=$(sub -c -i "$DEV" -q 1 -t "push/$DEV" -E 2>&1); then
    ok "$DEV subscribed over TLS with a persistent session and left"
else
    fail "$DEV: mosquitto_sub --cafile ... -c -i $DEV -E exited non-zero: $out"
fi

# 2. Five QoS 1 pushes over TLS while the device is away, then one over plain TCP.
pushed=0
for i in 1 2 3 4 5; do
    if out=$(pub -q 1 -t "push/$DEV" -m "tls-$i" 2>&1); then
        pushed=$((pushed + 1))
    else
        fail "mosquitto_pub --cafile ... -q 1 -t push/$DEV -m tls-$i failed: $out"
    fi
done
[ "$pushed" -eq 5 ] && ok "backend: 5 QoS 1 publishes over TLS acknowledged"
if out=$(timeout $((W + 10)) mosquitto_pub -h "$H" -p "$P" -q 1 -t "push/$DEV" -m tcp-6 2>&1); then
    ok "backend: a QoS 1 publish over plain TCP acknowledged"
else
    fail "mosquitto_pub (plain TCP) -q 1 -t push/$DEV -m tcp-6 failed: $out"
fi

# 3. The device comes back over TLS and gets the 6 in order, QoS 1, not retained.
#    (--nodelay: see mosquitto_push.sh; with -C the last PUBACKs must leave before the close.)
got=$(sub -c -i "$DEV" -q 1 -t "push/$DEV" -C 6 -W "$W" --nodelay -F '%t %q %r %p' 2>&1)
want=$(for i in 1 2 3 4 5; do echo "push/$DEV 1 0 tls-$i"; done; echo "push/$DEV 1 0 tcp-6")
if [ "$got" = "$want" ]; then
    ok "$DEV reconnected over TLS and received tls-1..tls-5, tcp-6 in order"
else
    fail "$DEV reconnect over TLS: expected:"$'\n'"$want"$'\n'"got:"$'\n'"$got"
fi
got=$(sub -c -i "$DEV" -q 1 -t "push/$DEV" -C 1 -W 2 -F '%t %p' 2>/dev/null)
if [ -z "$got" ]; then
    ok "acknowledged messages are not redelivered"
else
    fail "$DEV got a message again after acknowledging it: $got"
fi

# 4. A live push, this time naming the server by its DNS name (localhost). The device's
#    session is persistent, so the push reaches it whether it is already connected or not.
timeout $((W + 10)) mosquitto_sub -h localhost -p "$T" --cafile "$CA" -c -i "$DEV" -q 1 -t "push/$DEV" \
    -C 1 -W "$W" --nodelay -F '%t %q %p' >"$tmp/live" 2>&1 &
dev_pid=$!
sleep 0.5
if out=$(timeout $((W + 10)) mosquitto_pub -h localhost -p "$T" --cafile "$CA" -q 1 -t "push/$DEV" -m live 2>&1); then
    ok "mosquitto_pub -h localhost over TLS acknowledged"
else
    fail "mosquitto_pub -h localhost over TLS failed: $out"
fi
wait "$dev_pid"
dev_pid=
got=$(cat "$tmp/live")
if [ "$got" = "push/$DEV 1 live" ]; then
    ok "$DEV (-h localhost) received the live push"
else
    fail "$DEV live push over TLS: expected 'push/$DEV 1 live', got: $got"
fi

# 5. Clients that do not trust Herald's CA. Each must exit non-zero, and what they tried to
#    publish must not reach the device.
untrusted() { # description, then the client's command line
    local what=$1
    shift
    local out rc
    out=$(timeout $((W + 10)) "$@" 2>&1)
    rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then
        ok "$what: refused (exit $rc: $(head -n 1 <<<"$out"))"
    elif [ "$rc" -eq 124 ]; then
        fail "$what: still running after $((W + 10))s instead of failing"
    else
        fail "$what: exited 0 (it connected): $out"
    fi
}
untrusted "mosquitto_pub --cafile <a CA that did not sign the server's certificate>" \
    mosquitto_pub -h "$H" -p "$T" --cafile "$OTHER_CA" -q 1 -t "push/$DEV" -m untrusted-1
untrusted "mosquitto_pub --tls-use-os-certs (system roots, no --cafile)" \
    mosquitto_pub -h "$H" -p "$T" --tls-use-os-certs -q 1 -t "push/$DEV" -m untrusted-2
untrusted "mosquitto_sub --cafile <another CA>" \
    mosquitto_sub -h "$H" -p "$T" --cafile "$OTHER_CA" -i "$DEV-spy" -q 1 -t '#' -C 1 -W "$W"
untrusted "plain MQTT (no TLS) on the TLS port" \
    mosquitto_pub -h "$H" -p "$T" -q 1 -t "push/$DEV" -m plaintext
got=$(sub -c -i "$DEV" -q 1 -t "push/$DEV" -C 1 -W 2 -F '%t %p' 2>/dev/null)
if [ -z "$got" ]; then
    ok "nothing from the refused clients reached $DEV"
else
    fail "$DEV received a message from a client that should have been refused: $got"
fi

# Forget the device's session.
sub -i "$DEV" -t "push/$DEV" -E >/dev/null 2>&1

if [ "$failures" -gt 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all checks passed"
