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
# With --rolling, once the cluster is up it restarts the nodes one after the other, as a
# rolling upgrade would: SIGTERM to node a (a graceful stop: the node drains its device
# connections over cluster.drain_duration, which reconnect to the other nodes), wait for its
# exit (status 0), start it again with the same node id and ports, wait until it listens (and,
# with curl, until GET /readyz answers 200 where the node serves /readyz), then b, then c. It
# prints each step. Then it runs on as usual: with --for the whole run, restarts included,
# ends by itself (`make cluster ARGS='--rolling --for 40'`).
#
# Usage: scripts/cluster.sh [--for SECONDS] [--rolling] [--drain DURATION] [--herald PATH]
#                           [--ports P1,P2,P3] [--keep-logs]
#   --for SECONDS     non-interactive: run that long, then stop (exit 0 if all nodes lived);
#                     a rolling restart still under way then is finished first
#   --rolling         restart the nodes one by one with SIGTERM once the cluster is up
#   --drain DURATION  the nodes' cluster.drain_duration (default 5s: a stop, and each step of
#                     --rolling, takes seconds rather than Herald's default 30s)
#   --herald PATH     the binary (default: target/release/herald)
#   --ports A,B,C     MQTT ports of nodes a, b, c (default 1883,1884,1885, or free ports)
#   --keep-logs       copy the node logs to target/cluster-logs/ before removing the temp dir
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERALD=$ROOT/target/release/herald
FOR=
PORTS=
KEEP_LOGS=0
ROLLING=0
DRAIN=5s
while [ $# -gt 0 ]; do
    case "$1" in
        --for) FOR=$2; shift ;;
        --rolling) ROLLING=1 ;;
        --drain) DRAIN=$2; shift ;;
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
if ! [[ "$DRAIN" =~ ^[0-9]+(ms|s|m)$ ]]; then
    echo "cluster.sh: --drain takes a duration such as 500ms, 5s or 1m, got '$DRAIN'" >&2
    exit 2
fi
# The drain duration in milliseconds.
drain_ms() {
    case $DRAIN in
        *ms) echo $((10#${DRAIN%ms})) ;;
        *s) echo $((10#${DRAIN%s} * 1000)) ;;
        *m) echo $((10#${DRAIN%m} * 60000)) ;;
    esac
}

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
    # Nodes first (SIGTERM: graceful, a drain of drain_duration), then Redis.
    local i limit=$(($(drain_ms) / 100 + 100))
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        local pid=${PIDS[$i]} waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$limit" ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster.sh: ${NAMES[$i]} (pid $pid) did not stop in $((limit / 10)) s: SIGKILL" >&2
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
# The one setting the nodes read from a file.
CONFIG=$TMP/herald.toml
printf '[cluster]\ndrain_duration = "%s"\n' "$DRAIN" >"$CONFIG"

# start_node I: starts node IDS[I] (again: same id, ports and config; its log appended to)
# and waits until it listens; its pid goes to PIDS[I + 1] (PIDS[0] is Redis).
start_node() {
    local i=$1 id=${IDS[$1]}
    "$HERALD" --node-id "$id" \
        --config "$CONFIG" \
        --listen "127.0.0.1:${MQTT[$i]}" \
        --store redis --redis-url "$REDIS_URL" \
        --cluster-listen "127.0.0.1:${CLUSTER_PORT[$id]}" \
        --metrics-listen "127.0.0.1:${METRICS_PORT[$id]}" \
        --log-level info \
        >>"$TMP/$id.log" 2>&1 &
    PIDS[$((i + 1))]=$!
    NAMES[$((i + 1))]="herald $id"
    wait_port "herald node $id" "$!" "${MQTT[$i]}" "$TMP/$id.log"
}

for i in 0 1 2; do
    id=${IDS[$i]}
    free_port || exit 1
    CLUSTER_PORT[$id]=$FREE
    free_port || exit 1
    METRICS_PORT[$id]=$FREE
    start_node "$i" || exit 1
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
# Milliseconds since $1 (an $EPOCHREALTIME).
ms_since() {
    local now=${EPOCHREALTIME//[.,]/} then=${1//[.,]/}
    echo $(((now - then) / 1000))
}

# restart_node I: SIGTERM to node IDS[I], its exit (status 0 within drain_duration + 10 s,
# else SIGKILL and failure), then start_node I and, with curl, GET /readyz until 200 (a node
# without /readyz answers 404: listening is then all there is to wait for).
restart_node() {
    local i=$1 id=${IDS[$1]} pid=${PIDS[$(($1 + 1))]} t0 rc limit code
    limit=$(($(drain_ms) + 10000))
    t0=$EPOCHREALTIME
    echo "rolling: node $id (pid $pid): SIGTERM"
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(ms_since "$t0")" -gt "$limit" ]; then
            echo "cluster.sh: node $id (pid $pid) still running ${limit} ms after SIGTERM: SIGKILL; its log:" >&2
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            tail -n 50 "$TMP/$id.log" >&2
            return 1
        fi
        sleep 0.05
    done
    rc=0
    wait "$pid" || rc=$?
    echo "rolling: node $id exited with status $rc after $(ms_since "$t0") ms"
    if [ "$rc" -ne 0 ]; then
        echo "cluster.sh: node $id exited with status $rc after SIGTERM; its log:" >&2
        tail -n 50 "$TMP/$id.log" >&2
        return 1
    fi
    t0=$EPOCHREALTIME
    start_node "$i" || return 1
    echo "rolling: node $id started again (pid ${PIDS[$((i + 1))]}), listening on ${MQTT[$i]} after $(ms_since "$t0") ms"
    if command -v curl >/dev/null; then
        local tries=0
        while :; do
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
                "http://127.0.0.1:${METRICS_PORT[$id]}/readyz" 2>/dev/null || true)
            case $code in
                200) echo "rolling: node $id ready (GET /readyz 200) after $(ms_since "$t0") ms"; break ;;
                404) break ;;
            esac
            tries=$((tries + 1))
            if [ "$tries" -ge 200 ]; then
                echo "cluster.sh: node $id: GET /readyz still answers '$code' after 10 s" >&2
                return 1
            fi
            sleep 0.05
        done
    fi
}

if [ -n "$FOR" ]; then
    echo "running for $FOR s"
    end=$((SECONDS + FOR))
fi
if [ "$ROLLING" -eq 1 ]; then
    echo "rolling: restarting nodes a, b, c one after the other (drain_duration $DRAIN)"
    for i in 0 1 2; do
        restart_node "$i" || exit 1
        check_alive || exit 1
    done
    echo "rolling: all three nodes restarted"
fi
if [ -n "$FOR" ]; then
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
