#!/usr/bin/env bash
# Herald against Mosquitto, side by side (issue 3), and Herald with its Redis store
# (issue 4). `make bench` runs this; BENCHMARKS.md holds the figures.
#
#   scripts/bench.sh           full run: idle at 10,000 and 19,000, push to 1,000 devices,
#                              push at 20,000 msgs/s, QoS 0 with 1 and 4 pairs, offline drain
#                              of 1,000 x 10, and push, push-rate and drain again against
#                              Herald --store redis (about 9 minutes)
#   scripts/bench.sh --quick   the same scenarios, small and short (about 2.5 minutes)
#   scripts/bench.sh --smoke   a few clients, about a second per scenario, Herald only; exits
#                              non-zero if any scenario does not deliver everything
#                              (`make test` runs it so the tool keeps working)
#   scripts/bench.sh --cluster [--quick ...]
#                              the cluster benchmark of issue 5 instead (publish on node A,
#                              devices on node B, against one node): runs
#                              scripts/bench-cluster.sh with the other options (see its --help)
#
# Options:
#   --out DIR          keep results there (default: target/bench/<mode>-<date>,
#                      target/bench/smoke for --smoke)
#   --only "A B"       run only the cases whose names start with A or B (idle, push, qos0, ...)
#   --no-build         use the binaries in target/release as they are
#   --no-mosquitto     Herald only
#   --no-2core         skip the row with Herald on both cores
#   --redis            include the "Herald (redis)" column (the default, except --smoke)
#   --no-redis         leave it out
#   --redis-cpu CPUS   cores for redis-server (taskset -c; default 0, the broker's core)
#
# The Redis-backed column of issue 4: `scripts/bench.sh --only "push drain"` (push and
# push-rate, drain) gives Herald (memory store), Mosquitto (persistence on) and Herald
# --store redis side by side in one run.
#
# Every case starts a fresh broker. Each broker (Herald, Mosquitto) is pinned to core 0 and
# the load generator to core 1 (`taskset`), so the comparison is per core; the "Herald 2
# cores" row runs Herald on cores 0 and 1 (the load generator stays on core 1). Brokers
# listen on free loopback ports (never 1883); only processes this script started are
# stopped. Mosquitto runs with its defaults plus: persistence true, max_queued_messages
# 1000, max_connections -1, anonymous access (the listen backlog is Mosquitto's fixed 100,
# which is why herald-bench keeps at most 100 handshakes in flight).
#
# Herald (redis): for the push, push-rate and drain cases only (the others never touch the
# store: clean sessions, QoS 0). Each case starts its own redis-server (`redis-server` from
# PATH, Debian package redis-server) on a free loopback port (never 6379) with a fresh
# temporary directory and `--appendonly yes --appendfsync everysec --save ""`, then Herald
# with `--store redis --redis-url redis://127.0.0.1:PORT/0`. Redis is a process of its
# own: by default it is pinned to core 0 together with Herald, so Herald and its store
# share the one core Mosquitto gets (Mosquitto's persistence runs inside its one process),
# and the load generator keeps core 1 to itself. `--redis-cpu 1` puts Redis on the load
# generator's core instead (Herald + Redis then use more than one core: not a per-core
# comparison). herald-bench reads Redis's CPU time from /proc (`--store-pid`), so its CPU
# and CPU per message show next to the broker's.
set -euo pipefail

# --cluster: the cluster benchmark (issue 5) is a script of its own; it takes the other options.
for a in "$@"; do
    if [ "$a" = --cluster ]; then
        exec bash "$(dirname "$0")/bench-cluster.sh" "$@"
    fi
done

# The command line as given, quoting the arguments with spaces (for the summary).
ARGV=
for a in "$@"; do
    case $a in *' '*) ARGV+="${ARGV:+ }\"$a\"" ;; *) ARGV+="${ARGV:+ }$a" ;; esac
done
MODE=full
OUT=
ONLY=
BUILD=1
MOSQUITTO=1
TWO_CORE=1
REDIS=
REDIS_CPU=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --smoke) MODE=smoke ;;
        --full) MODE=full ;;
        --out) OUT=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --no-build) BUILD=0 ;;
        --no-mosquitto) MOSQUITTO=0 ;;
        --no-2core) TWO_CORE=0 ;;
        --redis) REDIS=1 ;;
        --no-redis) REDIS=0 ;;
        --redis-cpu) REDIS_CPU=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CARGO=${CARGO:-cargo}
HERALD=$ROOT/target/release/herald
BENCH=$ROOT/target/release/herald-bench

if [ "$MODE" = smoke ]; then
    MOSQUITTO=0
    TWO_CORE=0
    REDIS=${REDIS:-0}
fi
REDIS=${REDIS:-1}
# The scenarios (second field of CASES) run against Herald (redis).
REDIS_SCENARIOS="push push-rate drain"

# name | herald-bench scenario | arguments
case $MODE in
full) CASES=(
    "idle-10000|idle|--clients 10000 --idle-secs 30"
    "idle-19000|idle|--clients 19000 --idle-secs 30"
    "push|push|--devices 1000 --window 1000 --secs 10"
    "push-rate|push-rate|--devices 1000 --rate 20000 --secs 10"
    "qos0|qos0|--pairs 1,4 --payload 64 --secs 10"
    "drain|drain|--devices 1000 --per-device 10"
) ;;
quick) CASES=(
    "idle-1000|idle|--clients 1000 --idle-secs 5"
    "idle-2000|idle|--clients 2000 --idle-secs 5"
    "push|push|--devices 200 --window 1000 --secs 3"
    "push-rate|push-rate|--devices 200 --rate 5000 --secs 3"
    "qos0|qos0|--pairs 1,4 --payload 64 --secs 3"
    "drain|drain|--devices 200 --per-device 10"
) ;;
smoke) CASES=(
    "idle|idle|--clients 20 --idle-secs 1"
    "push|push|--devices 10 --messages 2000"
    "push-rate|push-rate|--devices 10 --rate 1000 --secs 1"
    "qos0|qos0|--pairs 1,4 --payload 64 --secs 1"
    "drain|drain|--devices 10 --per-device 10"
) ;;
esac

if [ "$BUILD" = 1 ]; then
    echo "bench: building herald and herald-bench (release)" >&2
    "$CARGO" build --release --bin herald --bin herald-bench >&2
fi
for b in "$HERALD" "$BENCH"; do
    [ -x "$b" ] || { echo "bench: $b is missing (build it, or drop --no-build)" >&2; exit 2; }
done

MOSQUITTO_BIN=
if [ "$MOSQUITTO" = 1 ]; then
    MOSQUITTO_BIN=$(command -v mosquitto || true)
    [ -z "$MOSQUITTO_BIN" ] && [ -x /usr/sbin/mosquitto ] && MOSQUITTO_BIN=/usr/sbin/mosquitto
    if [ -z "$MOSQUITTO_BIN" ]; then
        echo "bench: mosquitto is not installed (Debian: apt-get install mosquitto, or scripts/deps.sh)" >&2
        exit 2
    fi
fi

REDIS_BIN=
if [ "$REDIS" = 1 ]; then
    REDIS_BIN=$(command -v redis-server || true)
    [ -z "$REDIS_BIN" ] && [ -x /usr/bin/redis-server ] && REDIS_BIN=/usr/bin/redis-server
    if [ -z "$REDIS_BIN" ]; then
        echo "bench: redis-server is not installed (Debian: apt-get install redis-server), or use --no-redis" >&2
        exit 2
    fi
fi

# Core pinning: brokers (and Redis, unless --redis-cpu) on core 0, load generator on core 1.
PIN_BROKER=()
PIN_BOTH=()
PIN_BENCH=()
PIN_REDIS=()
if [ "$MODE" != smoke ]; then
    if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
        PIN_BROKER=(taskset -c 0)
        PIN_BOTH=(taskset -c 0,1)
        PIN_BENCH=(taskset -c 1)
        PIN_REDIS=(taskset -c "$REDIS_CPU")
    else
        echo "bench: fewer than 2 cores or no taskset: nothing is pinned" >&2
    fi
fi

ME=bench
TMP=$(mktemp -d "${TMPDIR:-/tmp}/herald-bench.XXXXXX")
STARTED=()
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "$OUT" ]; then
    if [ "$MODE" = smoke ]; then
        OUT=$ROOT/target/bench/smoke
        rm -rf "$OUT"
    else
        OUT=$ROOT/target/bench/$MODE-$(date -u +%Y%m%d-%H%M%S)
    fi
fi
mkdir -p "$OUT"

BROKER_PID=
BROKER_PORT=
BROKER_LOG=
# redis-server behind Herald (redis), while a herald-redis case runs: REDIS_PID, REDIS_PORT
# and REDIS_LOG (set by start_redis).

# start_broker herald|herald-redis|mosquitto CPUS...
start_broker() {
    local kind=$1
    shift
    REDIS_PID=
    if [ "$kind" = herald-redis ]; then
        start_redis "${PIN_REDIS[@]}" || return 1
    fi
    free_port || return 1
    BROKER_PORT=$FREE
    local dir=$TMP/$kind-$BROKER_PORT
    mkdir -p "$dir"
    BROKER_LOG=$dir/broker.log
    case $kind in
    herald)
        "$@" "$HERALD" --listen "127.0.0.1:$BROKER_PORT" --log-level warn >"$BROKER_LOG" 2>&1 &
        ;;
    herald-redis)
        "$@" "$HERALD" --listen "127.0.0.1:$BROKER_PORT" --log-level warn \
            --store redis --redis-url "redis://127.0.0.1:$REDIS_PORT/0" >"$BROKER_LOG" 2>&1 &
        ;;
    mosquitto)
        cat >"$dir/mosquitto.conf" <<EOF
listener $BROKER_PORT 127.0.0.1
max_connections -1
allow_anonymous true
persistence true
persistence_location $dir/
max_queued_messages 1000
log_dest stderr
log_type error
log_type warning
EOF
        # Started as root, Mosquitto becomes user mosquitto: let it write its database.
        if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
            chmod 755 "$TMP"
            chown mosquitto "$dir"
        fi
        "$@" "$MOSQUITTO_BIN" -c "$dir/mosquitto.conf" >"$BROKER_LOG" 2>&1 &
        ;;
    esac
    BROKER_PID=$!
    STARTED+=("$BROKER_PID")
    wait_port "the broker" "$BROKER_PID" "$BROKER_PORT" "$BROKER_LOG"
}

# The broker first, then its store (Herald may still write to Redis on the way out).
stop_broker() {
    stop_pid "$BROKER_PID"
    if [ -n "$REDIS_PID" ]; then
        stop_pid "$REDIS_PID"
    fi
}

FAILED=()

# run_case COLUMN KIND "PIN..." NAME SCENARIO ARGS
run_case() {
    local col=$1 kind=$2 pin=$3 name=$4 scenario=$5 args=$6
    mkdir -p "$OUT/$col"
    echo >&2
    echo "bench: $name on $col" >&2
    # shellcheck disable=SC2086
    if ! start_broker "$kind" $pin; then
        FAILED+=("$col/$name (broker did not start)")
        [ -n "$REDIS_PID" ] && stop_pid "$REDIS_PID"
        return 0
    fi
    local rc store=()
    [ -n "$REDIS_PID" ] && store=(--store-pid "$REDIS_PID")
    set +e
    # shellcheck disable=SC2086
    "${PIN_BENCH[@]}" "$BENCH" "$scenario" --port "$BROKER_PORT" --broker-pid "$BROKER_PID" \
        "${store[@]+"${store[@]}"}" \
        --label "$col" --json "$OUT/$col/$name.json" $args | tee "$OUT/$col/$name.txt"
    rc=${PIPESTATUS[0]}
    set -e
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
        echo "bench: the broker died during $name; its log:" >&2
        tail -20 "$BROKER_LOG" >&2 || true
    fi
    if [ -n "$REDIS_PID" ] && ! kill -0 "$REDIS_PID" 2>/dev/null; then
        echo "bench: redis-server died during $name; its log:" >&2
        tail -20 "$REDIS_LOG" >&2 || true
    fi
    stop_broker
    cp "$BROKER_LOG" "$OUT/$col/$name.broker.log" 2>/dev/null || true
    [ -n "$REDIS_PID" ] && { cp "$REDIS_LOG" "$OUT/$col/$name.redis.log" 2>/dev/null || true; }
    [ "$rc" = 0 ] || FAILED+=("$col/$name")
}

# column | broker kind | pinning | scenarios it runs (empty: all)
COLS=("herald|herald|${PIN_BROKER[*]-}|")
[ "$MOSQUITTO" = 1 ] && COLS+=("mosquitto|mosquitto|${PIN_BROKER[*]-}|")
[ "$REDIS" = 1 ] && COLS+=("herald-redis|herald-redis|${PIN_BROKER[*]-}|$REDIS_SCENARIOS")
[ "$TWO_CORE" = 1 ] && COLS+=("herald-2core|herald|${PIN_BOTH[*]-}|")

COMMAND="scripts/bench.sh${ARGV:+ $ARGV}"
T0=$(date +%s)
for c in "${CASES[@]}"; do
    IFS='|' read -r name scenario args <<<"$c"
    selected "$name" || continue
    # The columns of one case run back to back, so load that drifts hits them alike.
    for col in "${COLS[@]}"; do
        IFS='|' read -r cname kind pin only <<<"$col"
        if [ -n "$only" ] && [[ " $only " != *" $scenario "* ]]; then
            continue
        fi
        run_case "$cname" "$kind" "$pin" "$name" "$scenario" "$args"
    done
done
T1=$(date +%s)

echo
if [ "$MODE" = smoke ]; then
    if [ ${#FAILED[@]} -gt 0 ]; then
        echo "bench smoke: FAILED: ${FAILED[*]} (results in $OUT)"
        exit 1
    fi
    echo "bench smoke: every scenario delivered everything ($((T1 - T0)) s; results in $OUT)"
    exit 0
fi

# Side-by-side table, and a Markdown summary to paste into BENCHMARKS.md.
COMPARE=("Herald=$OUT/herald")
[ "$MOSQUITTO" = 1 ] && COMPARE+=("Mosquitto=$OUT/mosquitto")
# Herald (redis) is compared with Mosquitto (its ratio and the issue 4 target); without
# Mosquitto its results are printed as they are.
DURABLE=()
if [ "$REDIS" = 1 ] && [ "$MOSQUITTO" = 1 ] && [ -d "$OUT/herald-redis" ]; then
    COMPARE+=("Herald (redis)=$OUT/herald-redis")
    DURABLE=(--durable "Herald (redis)")
fi
[ "$TWO_CORE" = 1 ] && COMPARE+=("Herald 2 cores=$OUT/herald-2core")
{
    echo "## Results ($MODE run)"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
    echo "- brokers: Herald $("$HERALD" --version 2>/dev/null | awk '{print $2}'), $([ -n "$MOSQUITTO_BIN" ] && "$MOSQUITTO_BIN" -h 2>/dev/null | head -1)"
    echo "- pinning: brokers \`${PIN_BROKER[*]-none}\`, Herald 2 cores \`${PIN_BOTH[*]-none}\`, load generator \`${PIN_BENCH[*]-none}\`$([ "$REDIS" = 1 ] && echo ", redis-server of Herald (redis) \`${PIN_REDIS[*]-none}\`")"
    if [ "$REDIS" = 1 ]; then
        echo "- Herald (redis): \`--store redis\`, $("$REDIS_BIN" --version | awk '{print $1, $2, $3}'), \`--appendonly yes --appendfsync everysec --save \"\"\`, a fresh redis-server per case on loopback (push, push-rate, drain only)"
    fi
    echo "- command: \`$COMMAND\` ($((T1 - T0)) s)"
    echo
} >"$OUT/summary.md"
if [ ${#COMPARE[@]} -ge 2 ]; then
    rc=0
    "$BENCH" compare "${COMPARE[@]}" "${DURABLE[@]+"${DURABLE[@]}"}" --markdown "$OUT/table.md" || rc=$?
    cat "$OUT/table.md" >>"$OUT/summary.md"
else
    cat "$OUT"/herald/*.txt
fi
if [ "$MOSQUITTO" = 0 ] && [ -d "$OUT/herald-redis" ]; then
    cat "$OUT"/herald-redis/*.txt
fi
echo
echo "bench: results in $OUT (summary.md: the table for BENCHMARKS.md)"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "bench: FAILED: ${FAILED[*]}"
    exit 1
fi
