#!/usr/bin/env bash
# The cluster benchmark of issue 5: a QoS 1 push published on node A to devices on node B
# (forwarded over the node-to-node link), against everything on one node (local).
# `scripts/bench.sh --cluster [options]` and `make bench ARGS=--cluster` run this;
# BENCHMARKS.md ("Cluster (issue 5)") holds the figures.
#
#   scripts/bench-cluster.sh           push (as fast as the window allows) and push-rate at
#                                      2,000 and 5,000 msgs/s, 1,000 devices, 8 s each, every
#                                      case twice on each setup (about 4 minutes)
#   scripts/bench-cluster.sh --quick   200 devices, 3 s, once each (about 1 minute)
#
# Setups (each run starts its own fresh processes):
#   local       one Herald node, `--store redis --cluster-listen 127.0.0.1:0 --node-id a`:
#               publisher and devices on it, so it pays the same cluster bookkeeping
#   forwarded   two nodes, a and b (`--cluster-listen 127.0.0.1:0 --node-id a|b`): the
#               publisher on a, the devices on b; every message is stored in Redis by a and
#               forwarded to b
#   plain       one node with `--store redis` and no cluster flags, for reference
#               (--no-plain leaves it out)
# Each run gets a fresh redis-server on a free loopback port (never 6379) in a temporary
# directory: `--appendonly yes --appendfsync everysec --save ""`. The nodes and Redis are
# pinned to core 0 (`taskset -c 0`: on 2 cores they share it, so compare the CPU per
# message, not the speed), the load generator to core 1. herald-bench gets every node's pid
# (`--broker-pid`, summed; node A first) and Redis's (`--store-pid`), so the broker CPU per
# delivered message is summed over the nodes and Redis's is shown apart; `--store-addr` adds
# the Redis commands per message (INFO commandstats), which machine load does not blur.
# With --warmup every device gets one message before the measured phase (it hid a bug of
# first hints, fixed since; see BENCHMARKS.md).
#
# Options:
#   --quick            the small, short run
#   --reps N           runs of each case on each setup (default 2; --quick 1)
#   --secs S           seconds of publishing per run (default 8; --quick 3)
#   --devices N        devices (default 1000; --quick 200)
#   --rates "R1 R2"    offered rates of the push-rate cases (default "2000 5000")
#   --only "A B"       only the cases whose names start with A or B (push, push-rate-2000, ...)
#   --no-plain         leave out the node without cluster flags
#   --warmup           one warm-up message per device before the measured phase
#   --no-warmup        none (the default)
#   --b-cpu CPUS       pin node b there instead (e.g. 1, the load generator's core): the hop
#                      without the nodes sharing a core; no longer a per-core comparison
#   --out DIR          keep results there (default: target/bench/cluster-<mode>-<date>)
#   --no-build         use the binaries in target/release as they are (HERALD=PATH in the
#                      environment: another herald binary)
#
# Results: DIR/<setup>/<case>.<run>.{json,txt,metrics} (the metrics files hold each node's
# herald_cluster_* and herald_messages_* counters after the run), the node and Redis logs,
# and DIR/summary.md, the Markdown for BENCHMARKS.md (`herald-bench cluster-report`). Only
# processes this script started are stopped, by pid. Exit status 1 if any run failed to
# connect every device or to deliver every message.
set -euo pipefail

ARGV=
for a in "$@"; do
    case $a in *' '*) ARGV+="${ARGV:+ }\"$a\"" ;; *) ARGV+="${ARGV:+ }$a" ;; esac
done
MODE=full
REPS=
SECS=
DEVICES=
RATES="2000 5000"
ONLY=
PLAIN=1
WARMUP=0
OUT=
BUILD=1
B_CPU=
while [ $# -gt 0 ]; do
    case "$1" in
        --cluster) ;;
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        --reps) REPS=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --devices) DEVICES=$2; shift ;;
        --rates) RATES=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --no-plain) PLAIN=0 ;;
        --no-warmup) WARMUP=0 ;;
        --warmup) WARMUP=1 ;;
        --b-cpu) B_CPU=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-cluster.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$MODE" = quick ]; then
    REPS=${REPS:-1}
    SECS=${SECS:-3}
    DEVICES=${DEVICES:-200}
else
    REPS=${REPS:-2}
    SECS=${SECS:-8}
    DEVICES=${DEVICES:-1000}
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CARGO=${CARGO:-cargo}
HERALD=${HERALD:-$ROOT/target/release/herald}
BENCH=$ROOT/target/release/herald-bench

# name | herald-bench scenario | arguments
CASES=("push|push|--window 1000")
for r in $RATES; do
    CASES+=("push-rate-$r|push-rate|--rate $r --variant push-rate-$r")
done
SETUPS=()
[ "$PLAIN" = 1 ] && SETUPS+=(plain)
SETUPS+=(local forwarded)

if [ "$BUILD" = 1 ]; then
    echo "bench-cluster: building herald and herald-bench (release)" >&2
    "$CARGO" build --release --bin herald --bin herald-bench >&2
fi
for b in "$HERALD" "$BENCH"; do
    [ -x "$b" ] || { echo "bench-cluster: $b is missing (build it, or drop --no-build)" >&2; exit 2; }
done
REDIS_BIN=$(command -v redis-server || true)
[ -z "$REDIS_BIN" ] && [ -x /usr/bin/redis-server ] && REDIS_BIN=/usr/bin/redis-server
if [ -z "$REDIS_BIN" ]; then
    echo "bench-cluster: redis-server is not installed (Debian: apt-get install redis-server)" >&2
    exit 2
fi

PIN_NODE=()
PIN_BENCH=()
PIN_B=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    PIN_NODE=(taskset -c 0)
    PIN_BENCH=(taskset -c 1)
    PIN_B=(taskset -c "${B_CPU:-0}")
else
    echo "bench-cluster: fewer than 2 cores or no taskset: nothing is pinned" >&2
fi

ME=bench-cluster
TMP=$(mktemp -d "${TMPDIR:-/tmp}/herald-bench-cluster.XXXXXX")
STARTED=()
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

OUT=${OUT:-$ROOT/target/bench/cluster-$MODE-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

# FREE := a free loopback port below the ephemeral range, never 1883 or 6379, and never one
# handed out earlier in this run (a process may not have bound it yet).

# The node-to-node link admits only nodes that know the cluster secret.
export HERALD_CLUSTER_SECRET=${HERALD_CLUSTER_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}

NODE_PIDS=()
NODE_PORTS=()
NODE_METRICS=()
NODE_LOGS=()
# start_node ID|- CLUSTER(0|1)
start_node() {
    local id=$1 cluster=$2 port metrics log args=()
    free_port || return 1
    port=$FREE
    free_port || return 1
    metrics=$FREE
    log=$TMP/node-$port.log
    args=(--listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" --log-level warn
        --store redis --redis-url "redis://127.0.0.1:$REDIS_PORT/0")
    [ "$cluster" = 1 ] && args+=(--cluster-listen 127.0.0.1:0)
    [ "$id" != - ] && args+=(--node-id "$id")
    if [ "$id" = b ]; then
        "${PIN_B[@]}" "$HERALD" "${args[@]}" >"$log" 2>&1 &
    else
        "${PIN_NODE[@]}" "$HERALD" "${args[@]}" >"$log" 2>&1 &
    fi
    local pid=$!
    STARTED+=("$pid")
    NODE_PIDS+=("$pid")
    NODE_PORTS+=("$port")
    NODE_METRICS+=("$metrics")
    NODE_LOGS+=("$log")
    wait_port "herald node ${id/-/(no id)}" "$pid" "$port" "$log"
}

# The herald_cluster_* and herald_messages_* counters of one node.
scrape() {
    local port=$1
    if command -v curl >/dev/null; then
        curl -s --max-time 5 "http://127.0.0.1:$port/metrics" || true
    else
        "${PYTHON:-python3}" -c 'import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=5).read().decode())' "$port" 2>/dev/null || true
    fi | grep -E '^herald_(cluster|messages)_' | grep -v ' 0$' || true
}

FAILED=()

# run_case SETUP NAME SCENARIO ARGS REP
run_case() {
    local setup=$1 name=$2 scenario=$3 args=$4 rep=$5
    local dir=$OUT/$setup
    mkdir -p "$dir"
    echo >&2
    echo "bench-cluster: $name on $setup, run $rep" >&2
    NODE_PIDS=()
    NODE_PORTS=()
    NODE_METRICS=()
    NODE_LOGS=()
    local ok=1
    start_redis "${PIN_NODE[@]+"${PIN_NODE[@]}"}" || ok=0
    if [ "$ok" = 1 ]; then
        case $setup in
        plain) start_node - 0 || ok=0 ;;
        local) start_node a 1 || ok=0 ;;
        forwarded) { start_node a 1 && start_node b 1; } || ok=0 ;;
        esac
        # A node re-reads the table of live nodes every 500 ms, and until then forwards to
        # a node it has not seen yet are dropped (all but one look-up per 500 ms; see
        # BENCHMARKS.md): let both nodes see each other first. Every setup waits alike.
        sleep 1.2
    fi
    local rc=1
    if [ "$ok" = 1 ]; then
        # Devices on the last node started (b), the publisher on the first (a).
        local dev_port=${NODE_PORTS[-1]} pub_port=${NODE_PORTS[0]} pids=() p
        for p in "${NODE_PIDS[@]}"; do pids+=(--broker-pid "$p"); done
        local warm=()
        [ "$WARMUP" = 1 ] && warm=(--warmup)
        set +e
        # shellcheck disable=SC2086
        "${PIN_BENCH[@]}" "$BENCH" "$scenario" --port "$dev_port" --publish-port "$pub_port" \
            "${pids[@]}" --store-pid "$REDIS_PID" \
            --store-addr "127.0.0.1:$REDIS_PORT" "${warm[@]+"${warm[@]}"}" \
            --devices "$DEVICES" --secs "$SECS" --label "$setup" \
            --json "$dir/$name.$rep.json" $args | tee "$dir/$name.$rep.txt"
        rc=${PIPESTATUS[0]}
        set -e
        local i
        for i in "${!NODE_PIDS[@]}"; do
            if kill -0 "${NODE_PIDS[$i]}" 2>/dev/null; then
                { echo "# node $((i + 1)) (pid ${NODE_PIDS[$i]}, MQTT ${NODE_PORTS[$i]})"
                  scrape "${NODE_METRICS[$i]}"; } >>"$dir/$name.$rep.metrics"
            else
                echo "bench-cluster: node $((i + 1)) died during $name; its log:" >&2
                tail -20 "${NODE_LOGS[$i]}" >&2 || true
            fi
        done
        if ! kill -0 "$REDIS_PID" 2>/dev/null; then
            echo "bench-cluster: redis-server died during $name; its log:" >&2
            tail -20 "$REDIS_LOG" >&2 || true
        fi
    fi
    # Nodes first (they may still write to Redis on the way out), then Redis.
    local i
    for ((i = ${#NODE_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${NODE_PIDS[$i]}"
        cp "${NODE_LOGS[$i]}" "$dir/$name.$rep.node$((i + 1)).log" 2>/dev/null || true
    done
    if [ -n "$REDIS_PID" ]; then
        stop_pid "$REDIS_PID"
        cp "$REDIS_LOG" "$dir/$name.$rep.redis.log" 2>/dev/null || true
    fi
    REDIS_PID=
    [ "$rc" = 0 ] || FAILED+=("$setup/$name.$rep")
}

COMMAND="scripts/bench-cluster.sh${ARGV:+ $ARGV}"
T0=$(date +%s)
for c in "${CASES[@]}"; do
    IFS='|' read -r name scenario args <<<"$c"
    selected "$name" || continue
    # Runs of one case alternate between the setups, so load that drifts hits them alike.
    for rep in $(seq 1 "$REPS"); do
        for setup in "${SETUPS[@]}"; do
            run_case "$setup" "$name" "$scenario" "$args" "$rep"
        done
    done
done
T1=$(date +%s)

{
    echo "## Cluster results ($MODE run)"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), Linux $(uname -r), load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- Herald $("$HERALD" --version 2>/dev/null | awk '{print $2}'), $("$REDIS_BIN" --version | awk '{print $1, $2, $3}') (\`--appendonly yes --appendfsync everysec --save \"\"\`, a fresh one per run)"
    [ "$HERALD" != "$ROOT/target/release/herald" ] && echo "- herald binary: \`$HERALD\` (HERALD=; the commit above is the work tree's, not necessarily the binary's)"
    echo "- pinning: nodes and redis-server \`${PIN_NODE[*]-none}\`$([ -n "$B_CPU" ] && echo ", except node b: \`${PIN_B[*]-none}\`"), load generator \`${PIN_BENCH[*]-none}\`"
    echo "- $DEVICES devices, $SECS s of publishing per run, $REPS run(s) per case and setup$([ "$WARMUP" = 1 ] && echo ', one warm-up message per device first')"
    echo "- command: \`$COMMAND\` ($((T1 - T0)) s)"
    echo
} >"$OUT/summary.md"
rc=0
plain=()
[ "$PLAIN" = 1 ] && [ -d "$OUT/plain" ] && plain=(--plain "$OUT/plain")
if [ -d "$OUT/local" ] && [ -d "$OUT/forwarded" ]; then
    "$BENCH" cluster-report --local "$OUT/local" --forwarded "$OUT/forwarded" \
        "${plain[@]+"${plain[@]}"}" --markdown "$OUT/table.md" || rc=$?
    cat "$OUT/table.md" >>"$OUT/summary.md"
fi
# What went over the link in the forwarded runs (node A's counters, then node B's).
if [ -d "$OUT/forwarded" ]; then
    {
        echo
        echo "Node-to-node counters of the forwarded runs, whole run$([ "$WARMUP" = 1 ] && echo ' (warm-up included)'):"
        echo
        for f in "$OUT"/forwarded/*.metrics; do
            [ -e "$f" ] || continue
            echo "- $(basename "$f" .metrics): $(awk '
                /^# node/ { node = $3 }
                /^herald_cluster_forwards_total\{kind="push"\}/ { printf "node %s forwarded %s, ", node, $2 }
                /^herald_cluster_forwards_received_total\{kind="push"\}/ { printf "node %s received %s, ", node, $2 }
                /^herald_cluster_forward_failures_total/ { printf "node %s forward failures %s, ", node, $2 }
                /^herald_cluster_sweep_wakeups_total/ { printf "node %s sweep wake-ups %s, ", node, $2 }
                /^herald_cluster_stale_routes_total/ { printf "node %s stale routes %s, ", node, $2 }
                /^herald_messages_sent_total\{qos="1"\}/ { printf "node %s sent %s, ", node, $2 }
            ' "$f" | sed 's/, $//')"
        done
    } >>"$OUT/summary.md"
fi
echo
echo "bench-cluster: results in $OUT (summary.md: the table for BENCHMARKS.md)"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "bench-cluster: FAILED: ${FAILED[*]}"
    exit 1
fi
exit "$rc"
