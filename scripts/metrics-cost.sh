#!/usr/bin/env bash
# The cost of metrics (issue 13), counted rather than timed: the instructions Herald executes
# (valgrind's callgrind, total Ir) for the same QoS 1 push, with metrics off (no listener) and
# on (`--metrics-listen`, one scrape at the end: Prometheus's 15 s interval is one scrape per
# several million messages at full rate). This VM's speed moves by +-20 % from one run to
# the next, so a throughput A/B cannot resolve a few per cent; instruction counts can.
#
#   scripts/metrics-cost.sh [MESSAGES]     (default 300000; about 2 minutes per mode)
#
# Needs valgrind (Debian: valgrind) and the release binaries (cargo build --release).
# Prints, per mode, the total instructions and instructions per delivered message (the
# start and the 1,000 device connections included: the same in both modes), then the
# difference. Loopback only; stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300000}
H=${CARGO_TARGET_DIR:-target}/release/herald
B=${CARGO_TARGET_DIR:-target}/release/herald-bench
command -v valgrind >/dev/null || { echo "metrics-cost: valgrind is missing (apt-get install valgrind)" >&2; exit 2; }
for b in "$H" "$B"; do [ -x "$b" ] || { echo "metrics-cost: $b is missing (cargo build --release)" >&2; exit 2; }; done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 12000))
        (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo "$p"; return; }
    done
}
declare -A IR
for mode in off on; do
    port=$(free_port)
    args=(--listen "127.0.0.1:$port" --log-level warn)
    if [ "$mode" = on ]; then
        mport=$(free_port)
        args+=(--metrics-listen "127.0.0.1:$mport")
    fi
    valgrind --tool=callgrind --callgrind-out-file="$TMP/$mode.out" "$H" "${args[@]}" \
        >"$TMP/$mode.log" 2>&1 &
    hp=$!
    for _ in $(seq 1 150); do
        (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
        sleep 0.2
    done
    out=$("$B" push --port "$port" --devices 1000 --window 1000 --messages "$N" 2>&1)
    if [ "$mode" = on ]; then
        curl -s -o /dev/null "http://127.0.0.1:$mport/metrics"
    fi
    kill -TERM "$hp"
    wait "$hp" 2>/dev/null || true
    IR[$mode]=$(awk '/^summary:/ {print $2; exit}' "$TMP/$mode.out")
    echo "metrics $mode: ${IR[$mode]} instructions, $((IR[$mode] / N)) per message ($(echo "$out" | grep -m1 delivered | awk '{print $2, $3}') under valgrind)"
done
echo "metrics on costs $(( (IR[on] - IR[off]) / N )) instructions per message more: $(echo "scale=2; (${IR[on]} - ${IR[off]}) * 100 / ${IR[off]}" | bc) %"
