#!/usr/bin/env bash
# The backend HTTP API with curl, and the device with Mosquitto's mosquitto_sub, against a
# running Herald (interop/run.sh starts it with --http-listen and one bearer token):
#   1. curl pushes two QoS 1 messages (a single push and a batch of one) to a device that is
#      offline and has never connected; each answer is 202 / 200 with the message's id;
#   2. the single push's 202 JSON has `id`, `client_id` (the device) and `queued` (>= 1);
#   3. no token, a wrong token: 401 with a JSON error, and nothing is queued;
#   4. qos=3: 400 `bad_qos`, and nothing is queued;
#   5. the device connects (persistent session, mosquitto_sub -c) and gets both messages in
#      order, at QoS 1, and nothing else.
#
# Usage: HERALD_HOST=127.0.0.1 HERALD_PORT=18830 HERALD_HTTP_PORT=18080 \
#        HERALD_HTTP_TOKEN=... interop/http_push.sh
set -uo pipefail

H=${HERALD_HOST:-127.0.0.1}
P=${HERALD_PORT:-1883}
W=${INTEROP_WAIT:-5}          # seconds mosquitto_sub waits for a message before giving up
if [ -z "${HERALD_HTTP_PORT:-}" ] || [ -z "${HERALD_HTTP_TOKEN:-}" ]; then
    echo "FAIL - HERALD_HTTP_PORT and HERALD_HTTP_TOKEN must be set (interop/run.sh sets them)"
    exit 1
fi
PYTHON=${PYTHON:-python3}
for tool in curl mosquitto_sub "$PYTHON"; do
    if ! command -v "$tool" >/dev/null; then
        echo "FAIL - $tool is not installed"
        exit 1
    fi
done
API=http://$H:$HERALD_HTTP_PORT
DEV=httpdev$$
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failures=0
ok() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; failures=$((failures + 1)); }
sub() { timeout $((W + 10)) mosquitto_sub -h "$H" -p "$P" "$@"; }

# post PATH [curl args...]: the status on stdout, the body in $tmp/body. The token goes
# through a header file, not the command line, so `ps` does not show it.
printf 'Authorization: Bearer %s\n' "$HERALD_HTTP_TOKEN" >"$tmp/auth"
printf 'Authorization: Bearer %s\n' "not-the-token-0123456789" >"$tmp/wrong"
post() {
    local path=$1
    shift
    curl -s -o "$tmp/body" -w '%{http_code}' --max-time 10 -X POST "$@" "$API$path"
}
# body_is EXPR: the last body, parsed as JSON into `b`, makes the Python expression EXPR true
# (`dev` is the device's id). Python rather than jq: the interop suite needs it anyway.
body_is() {
    "$PYTHON" -c 'import json, sys
b = json.load(open(sys.argv[1]))
dev = sys.argv[2]
sys.exit(0 if eval("(" + sys.argv[3] + ")") else 1)' "$tmp/body" "$DEV" "$1" 2>/dev/null
}
# queued: the device's outbox length from GET /v1/clients/{id}.
queued() {
    curl -s -o "$tmp/body" --max-time 10 -H @"$tmp/auth" "$API/v1/clients/$DEV"
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("queued"))' \
        "$tmp/body" 2>/dev/null
}

# 1 + 2. A single push to the offline device, then a batch of one.
status=$(post "/v1/push/$DEV?qos=1" -H @"$tmp/auth" --data-binary 'http-1')
if [ "$status" = 202 ] && body_is 'isinstance(b.get("id"), str) and b["id"] != ""
        and b.get("client_id") == dev and isinstance(b.get("queued"), int) and b["queued"] >= 1'; then
    ok "POST /v1/push/$DEV?qos=1: 202 $(cat "$tmp/body")"
else
    fail "POST /v1/push/$DEV?qos=1: expected 202 with id, client_id and queued, got $status $(cat "$tmp/body")"
fi
status=$(post /v1/push -H @"$tmp/auth" -H 'Content-Type: application/json' \
    --data-binary "{\"messages\":[{\"client_id\":\"$DEV\",\"payload\":\"http-2\",\"qos\":1}]}")
if [ "$status" = 200 ] && body_is 'len(b["results"]) == 1 and b["results"][0]["status"] == 202
        and b["results"][0]["client_id"] == dev and b["results"][0]["id"] != ""'; then
    ok "POST /v1/push (a batch of one): 200, the entry 202"
else
    fail "POST /v1/push: expected 200 with one 202 result, got $status $(cat "$tmp/body")"
fi
before=$(queued)
if [ "$before" = 2 ]; then
    ok "GET /v1/clients/$DEV: queued 2"
else
    fail "GET /v1/clients/$DEV: expected queued 2, got $before"
fi

# 3. Without a token, and with a wrong one: 401 with a JSON error.
status=$(post "/v1/push/$DEV?qos=1" --data-binary 'no-token')
if [ "$status" = 401 ] && body_is 'isinstance(b.get("error"), str)'; then
    ok "no token: 401 $(cat "$tmp/body")"
else
    fail "no token: expected 401 with a JSON error, got $status $(cat "$tmp/body")"
fi
status=$(post "/v1/push/$DEV?qos=1" -H @"$tmp/wrong" --data-binary 'wrong-token')
if [ "$status" = 401 ]; then
    ok "wrong token: 401"
else
    fail "wrong token: expected 401, got $status $(cat "$tmp/body")"
fi

# 4. qos=3: 400 bad_qos.
status=$(post "/v1/push/$DEV?qos=3" -H @"$tmp/auth" --data-binary 'qos-3')
if [ "$status" = 400 ] && body_is 'b.get("error") == "bad_qos"'; then
    ok "qos=3: 400 $(cat "$tmp/body")"
else
    fail "qos=3: expected 400 bad_qos, got $status $(cat "$tmp/body")"
fi
after=$(queued)
if [ "$after" = 2 ]; then
    ok "the refused requests queued nothing"
else
    fail "queued $after after the refused requests (expected 2)"
fi

# 5. The device connects with a persistent session and gets both, in order, at QoS 1.
#    --nodelay: see mosquitto_push.sh (the last PUBACKs must leave before the socket closes).
got=$(sub -c -i "$DEV" -q 1 -t "push/$DEV" -C 2 -W "$W" --nodelay -F '%t %q %r %p')
want="push/$DEV 1 0 http-1"$'\n'"push/$DEV 1 0 http-2"
if [ "$got" = "$want" ]; then
    ok "$DEV connected and received http-1, http-2 in order"
else
    fail "$DEV: expected:"$'\n'"$want"$'\n'"got:"$'\n'"$got"
fi
got=$(sub -c -i "$DEV" -q 1 -t "push/$DEV" -C 1 -W 2 -F '%t %p' 2>/dev/null)
if [ -z "$got" ]; then
    ok "nothing else arrived (acknowledged messages are gone)"
else
    fail "$DEV got another message: $got"
fi
# Forget the session (clean session discards it).
sub -i "$DEV" -t "push/$DEV" -E >/dev/null 2>&1

if [ "$failures" -gt 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all checks passed"
