#!/usr/bin/env bash
# A three-node Herald cluster on this machine, to try by hand (`make cluster` builds the
# release binary first, then runs this):
#
#   - a private redis-server on a free loopback port (never 6379), in a temporary directory,
#     with --appendonly yes;
#   - three herald nodes, ids a, b and c, all on 127.0.0.1: MQTT on 1883, 1884 and 1885 when
#     those are free (else free ports), node-to-node links and /metrics on free ports, logs
#     in the temporary directory.
#
# It prints how to try it (a mosquitto_sub on node b, a mosquitto_pub on node a), then waits
# until Ctrl-C (or SIGTERM), or for --for SECONDS. Then it stops exactly the processes it
# started (by PID) and removes its temporary directory.
#
# Usage: scripts/cluster.sh [--for SECONDS] [--herald PATH] [--ports P1,P2,P3] [--keep-logs]
#   --for SECONDS   non-interactive: run that long, then stop (exit 0 if all nodes lived)
#   --herald PATH   the binary (default: target/release/herald)
#   --ports A,B,C   MQTT ports of nodes a, b, c (default 1883,1884,1885, or free ports)
#   --keep-logs     copy the node logs to target/cluster-logs/ before removing the temp dir
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERALD=$ROOT/target/release/herald
FOR=
PORTS=
KEEP_LOGS=0
while [ $# -gt 0 ]; do
    case "$1" in
        --for) FOR=$2; shift ;;
        --herald) HERALD=$2; shift ;;
        --ports) PORTS=$2; shift ;;
        --keep-logs) KEEP_LOGS=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "cluster.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$FOR" ] && ! [[ "$FOR" =~ ^[0-9]+$ ]]; then
    echo "cluster.sh: --for takes whole seconds, got '$FOR'" >&2
    exit 2
fi
[ -x "$HERALD" ] || { echo "cluster.sh: $HERALD not found: run 'make build' (or make cluster)" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "cluster.sh: redis-server not on PATH (apt-get install redis-server)" >&2; exit 1; }
ME=cluster.sh
REDIS_BIN=redis-server
STARTED=()
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/herald-cluster.XXXXXX")
PIDS=()        # every process this script started, and only those
NAMES=()
stopping=0

cleanup() {
    local rc=$?
    [ "$stopping" -eq 1 ] && return
    stopping=1
    trap - INT TERM EXIT
    [ -n "$SLEEP_PID" ] && kill "$SLEEP_PID" 2>/dev/null || true
    # Nodes first (SIGTERM: graceful), then Redis.
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        local pid=${PIDS[$i]} waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 100 ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster.sh: ${NAMES[$i]} (pid $pid) did not stop in 10 s: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [ "$KEEP_LOGS" -eq 1 ]; then
        mkdir -p "$ROOT/target/cluster-logs"
        cp "$TMP"/*.log "$REDIS_LOG" "$ROOT/target/cluster-logs/" 2>/dev/null || true
        echo "logs kept in target/cluster-logs/"
    fi
    rm -rf "$TMP"
    echo "stopped ${#PIDS[@]} process(es), removed $TMP"
    exit "$rc"
}
SLEEP_PID=
trap cleanup EXIT
# Ctrl-C and SIGTERM are the normal way to stop: exit 0 after the cleanup.
trap 'exit 0' INT TERM

# Redis.
start_redis || exit 1
PIDS+=("$REDIS_PID")
NAMES+=(redis-server)
REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0

# MQTT ports.
if [ -n "$PORTS" ]; then
    IFS=, read -r -a MQTT <<<"$PORTS"
    [ "${#MQTT[@]}" -eq 3 ] || { echo "cluster.sh: --ports needs three ports" >&2; exit 2; }
else
    MQTT=()
    for p in 1883 1884 1885; do
        if port_in_use "$p"; then
            free_port || exit 1
            p=$FREE
        fi
        MQTT+=("$p")
    done
fi

IDS=(a b c)
declare -A CLUSTER_PORT METRICS_PORT
# The node-to-node link admits only nodes that know the cluster secret; a fresh one per run
# unless the caller gives one.
export HERALD_CLUSTER_SECRET=${HERALD_CLUSTER_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
for i in 0 1 2; do
    id=${IDS[$i]}
    free_port || exit 1
    CLUSTER_PORT[$id]=$FREE
    free_port || exit 1
    METRICS_PORT[$id]=$FREE
    "$HERALD" --node-id "$id" \
        --listen "127.0.0.1:${MQTT[$i]}" \
        --store redis --redis-url "$REDIS_URL" \
        --cluster-listen "127.0.0.1:${CLUSTER_PORT[$id]}" \
        --metrics-listen "127.0.0.1:${METRICS_PORT[$id]}" \
        --log-level info \
        >"$TMP/$id.log" 2>&1 &
    PIDS+=($!)
    NAMES+=("herald $id")
    wait_port "herald node $id" "${PIDS[-1]}" "${MQTT[$i]}" "$TMP/$id.log" || exit 1
done

cat <<EOF

Herald cluster running (temp dir $TMP)
  redis-server    127.0.0.1:$REDIS_PORT (pid ${PIDS[0]}, appendonly yes)
  node a          MQTT 127.0.0.1:${MQTT[0]}  cluster 127.0.0.1:${CLUSTER_PORT[a]}  metrics http://127.0.0.1:${METRICS_PORT[a]}/metrics  (pid ${PIDS[1]})
  node b          MQTT 127.0.0.1:${MQTT[1]}  cluster 127.0.0.1:${CLUSTER_PORT[b]}  metrics http://127.0.0.1:${METRICS_PORT[b]}/metrics  (pid ${PIDS[2]})
  node c          MQTT 127.0.0.1:${MQTT[2]}  cluster 127.0.0.1:${CLUSTER_PORT[c]}  metrics http://127.0.0.1:${METRICS_PORT[c]}/metrics  (pid ${PIDS[3]})
  logs            $TMP/{a,b,c}.log

Try it (in other terminals):
  # a device with a persistent session on node b (it is subscribed to push/dev1 by itself)
  mosquitto_sub -h 127.0.0.1 -p ${MQTT[1]} -i dev1 -c -q 1 -t push/dev1 -v
  # a backend pushes to it through node a (two hops: a -> b -> device)
  mosquitto_pub -h 127.0.0.1 -p ${MQTT[0]} -q 1 -t push/dev1 -m hello
  # ordinary topics cross nodes too: subscribe on c, publish on a
  mosquitto_sub -h 127.0.0.1 -p ${MQTT[2]} -t 'news/#' -v
  mosquitto_pub -h 127.0.0.1 -p ${MQTT[0]} -t news/today -m 'it works'
  # what went between the nodes
  curl -s http://127.0.0.1:${METRICS_PORT[a]}/metrics | grep herald_cluster_

EOF

# Waits (interruptibly) and notices a node that dies.
check_alive() {
    local i
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            echo "cluster.sh: ${NAMES[$i]} (pid ${PIDS[$i]}) exited; its log:" >&2
            case ${NAMES[$i]} in
                herald*) tail -n 50 "$TMP/${NAMES[$i]#herald }.log" >&2 ;;
                *) tail -n 50 "$REDIS_LOG" >&2 ;;
            esac
            return 1
        fi
    done
}
if [ -n "$FOR" ]; then
    echo "running for $FOR s"
    end=$((SECONDS + FOR))
    while [ "$SECONDS" -lt "$end" ]; do
        check_alive || exit 1
        sleep 1 &
        SLEEP_PID=$!
        wait "$SLEEP_PID" || true
        SLEEP_PID=
    done
    check_alive || exit 1
else
    echo "Ctrl-C to stop"
    while check_alive; do
        sleep 1 &
        SLEEP_PID=$!
        wait "$SLEEP_PID" || true
        SLEEP_PID=
    done
    exit 1
fi
