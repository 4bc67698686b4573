#!/usr/bin/env bash
# Herald against Mosquitto, side by side (issue 3). `make bench` runs this; BENCHMARKS.md
# holds the figures.
#
#   scripts/bench.sh           full run: idle at 10,000 and 19,000, push to 1,000 devices,
#                              push at 20,000 msgs/s, QoS 0 with 1 and 4 pairs, offline drain
#                              of 1,000 x 10 (about 8 minutes)
#   scripts/bench.sh --quick   the same scenarios, small and short (about 2 minutes)
#   scripts/bench.sh --smoke   a few clients, about a second per scenario, Herald only; exits
#                              non-zero if any scenario does not deliver everything
#                              (`make test` runs it so the tool keeps working)
#
# Options:
#   --out DIR          keep results there (default: target/bench/<mode>-<date>,
#                      target/bench/smoke for --smoke)
#   --only "A B"       run only the cases whose names start with A or B (idle, push, qos0, ...)
#   --no-build         use the binaries in target/release as they are
#   --no-mosquitto     Herald only
#   --no-2core         skip the row with Herald on both cores
#
# Every case starts a fresh broker. Each broker (Herald, Mosquitto) is pinned to core 0 and
# the load generator to core 1 (`taskset`), so the comparison is per core; the "Herald 2
# cores" row runs Herald on cores 0 and 1 (the load generator stays on core 1). Brokers
# listen on free loopback ports (never 1883); only processes this script started are
# stopped. Mosquitto runs with its defaults plus: persistence true, max_queued_messages
# 1000, max_connections -1, anonymous access (the listen backlog is Mosquitto's fixed 100,
# which is why herald-bench keeps at most 100 handshakes in flight).
set -euo pipefail

ARGV="$*"
MODE=full
OUT=
ONLY=
BUILD=1
MOSQUITTO=1
TWO_CORE=1
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
fi

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

selected() {
    [ -z "$ONLY" ] && return 0
    local w
    for w in $ONLY; do
        case "$1" in "$w"*) return 0 ;; esac
    done
    return 1
}

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

# Core pinning: brokers on core 0, load generator on core 1.
PIN_BROKER=()
PIN_BOTH=()
PIN_BENCH=()
if [ "$MODE" != smoke ]; then
    if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
        PIN_BROKER=(taskset -c 0)
        PIN_BOTH=(taskset -c 0,1)
        PIN_BENCH=(taskset -c 1)
    else
        echo "bench: fewer than 2 cores or no taskset: nothing is pinned" >&2
    fi
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/herald-bench.XXXXXX")
STARTED=()
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
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

port_in_use() {
    if command -v ss >/dev/null; then
        ss -Htan "sport = :$1" 2>/dev/null | grep -q .
    else
        (echo -n >"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

# A free loopback port below the ephemeral range (so no client socket can hold it).
free_port() {
    local p i
    for i in $(seq 1 500); do
        p=$((20000 + RANDOM % 12000))
        [ "$p" = 1883 ] && continue
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    echo "bench: no free port found" >&2
    return 1
}

BROKER_PID=
BROKER_PORT=
BROKER_LOG=

wait_port() {
    local i
    for i in $(seq 1 100); do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            echo "bench: the broker exited at start; its log:" >&2
            cat "$BROKER_LOG" >&2 || true
            return 1
        fi
        (echo -n >"/dev/tcp/127.0.0.1/$BROKER_PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench: the broker does not listen on $BROKER_PORT after 10 s" >&2
    return 1
}

# start_broker herald|mosquitto CPUS...
start_broker() {
    local kind=$1
    shift
    BROKER_PORT=$(free_port)
    local dir=$TMP/$kind-$BROKER_PORT
    mkdir -p "$dir"
    BROKER_LOG=$dir/broker.log
    case $kind in
    herald)
        "$@" "$HERALD" --listen "127.0.0.1:$BROKER_PORT" --log-level warn >"$BROKER_LOG" 2>&1 &
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
    wait_port
}

stop_broker() {
    local i
    kill -TERM "$BROKER_PID" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$BROKER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    local keep=()
    local p
    for p in "${STARTED[@]}"; do
        [ "$p" = "$BROKER_PID" ] || keep+=("$p")
    done
    STARTED=("${keep[@]+"${keep[@]}"}")
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
        return 0
    fi
    local rc
    set +e
    # shellcheck disable=SC2086
    "${PIN_BENCH[@]}" "$BENCH" "$scenario" --port "$BROKER_PORT" --broker-pid "$BROKER_PID" \
        --label "$col" --json "$OUT/$col/$name.json" $args | tee "$OUT/$col/$name.txt"
    rc=${PIPESTATUS[0]}
    set -e
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
        echo "bench: the broker died during $name; its log:" >&2
        tail -20 "$BROKER_LOG" >&2 || true
    fi
    stop_broker
    cp "$BROKER_LOG" "$OUT/$col/$name.broker.log" 2>/dev/null || true
    [ "$rc" = 0 ] || FAILED+=("$col/$name")
}

COLS=("herald|herald|${PIN_BROKER[*]-}")
[ "$MOSQUITTO" = 1 ] && COLS+=("mosquitto|mosquitto|${PIN_BROKER[*]-}")
[ "$TWO_CORE" = 1 ] && COLS+=("herald-2core|herald|${PIN_BOTH[*]-}")

COMMAND="scripts/bench.sh${ARGV:+ $ARGV}"
T0=$(date +%s)
for c in "${CASES[@]}"; do
    IFS='|' read -r name scenario args <<<"$c"
    selected "$name" || continue
    # The columns of one case run back to back, so load that drifts hits them alike.
    for col in "${COLS[@]}"; do
        IFS='|' read -r cname kind pin <<<"$col"
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
[ "$TWO_CORE" = 1 ] && COMPARE+=("Herald 2 cores=$OUT/herald-2core")
{
    echo "## Results ($MODE run)"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
    echo "- brokers: Herald $("$HERALD" --version 2>/dev/null | awk '{print $2}'), $([ -n "$MOSQUITTO_BIN" ] && "$MOSQUITTO_BIN" -h 2>/dev/null | head -1)"
    echo "- pinning: brokers \`${PIN_BROKER[*]-none}\`, Herald 2 cores \`${PIN_BOTH[*]-none}\`, load generator \`${PIN_BENCH[*]-none}\`"
    echo "- command: \`$COMMAND\` ($((T1 - T0)) s)"
    echo
} >"$OUT/summary.md"
if [ ${#COMPARE[@]} -ge 2 ]; then
    rc=0
    "$BENCH" compare "${COMPARE[@]}" --markdown "$OUT/table.md" || rc=$?
    cat "$OUT/table.md" >>"$OUT/summary.md"
else
    cat "$OUT"/herald/*.txt
fi
echo
echo "bench: results in $OUT (summary.md: the table for BENCHMARKS.md)"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "bench: FAILED: ${FAILED[*]}"
    exit 1
fi
