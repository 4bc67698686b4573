# Process and port helpers shared by scripts/bench.sh, scripts/bench-cluster.sh and
# scripts/cluster.sh (sourced, not run). The caller sets ME (the name its messages start with), TMP (a directory it
# removes at exit), STARTED=() (the pids it started: the only ones it ever stops) and, for
# start_redis, REDIS_BIN; `cleanup` is meant for its EXIT trap.

cleanup() {
    local pid
    for pid in "${STARTED[@]+"${STARTED[@]}"}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]+"${STARTED[@]}"}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}

# selected NAME: is NAME among the cases of --only (all when it is empty)?
selected() {
    [ -z "$ONLY" ] && return 0
    local w
    for w in $ONLY; do
        case "$1" in "$w"*) return 0 ;; esac
    done
    return 1
}

port_in_use() {
    if command -v ss >/dev/null; then
        ss -Htan "sport = :$1" 2>/dev/null | grep -q .
    else
        (echo -n >"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

# FREE := a free loopback port below the ephemeral range (so no client socket can hold it),
# never MQTT's 1883 or Redis's 6379, and never one handed out earlier in this run (its
# process may not have bound it yet).
TAKEN=" "
FREE=
free_port() {
    local p i
    for i in $(seq 1 500); do
        p=$((20000 + RANDOM % 12000))
        case $p in 1883 | 6379) continue ;; esac
        [[ "$TAKEN" == *" $p "* ]] && continue
        port_in_use "$p" && continue
        TAKEN+="$p "
        FREE=$p
        return 0
    done
    echo "$ME: no free port found" >&2
    return 1
}

# wait_port WHAT PID PORT LOG
wait_port() {
    local what=$1 pid=$2 port=$3 log=$4 i
    for i in $(seq 1 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$ME: $what exited at start; the end of its log:" >&2
            tail -20 "$log" >&2 || true
            return 1
        fi
        (echo -n >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$ME: $what does not listen on $port after 10 s" >&2
    return 1
}

# stop_pid PID: TERM, up to 10 s, then KILL; only a process this script started.
stop_pid() {
    local pid=$1 i p keep=()
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${STARTED[@]+"${STARTED[@]}"}"; do
        [ "$p" = "$pid" ] || keep+=("$p")
    done
    STARTED=("${keep[@]+"${keep[@]}"}")
}

# start_redis [PIN...]: a fresh redis-server (run under PIN, e.g. taskset -c 0) on a free
# port, in an empty directory, AOF on (fsync every second), no RDB. Sets REDIS_PORT,
# REDIS_PID and REDIS_LOG.
REDIS_PID=
REDIS_PORT=
REDIS_LOG=
start_redis() {
    free_port || return 1
    REDIS_PORT=$FREE
    local dir=$TMP/redis-$REDIS_PORT
    mkdir -p "$dir"
    REDIS_LOG=$dir/redis.log
    "$@" "$REDIS_BIN" --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$dir" \
        --appendonly yes --appendfsync everysec --save "" --daemonize no \
        --logfile "" >"$REDIS_LOG" 2>&1 &
    REDIS_PID=$!
    STARTED+=("$REDIS_PID")
    wait_port redis-server "$REDIS_PID" "$REDIS_PORT" "$REDIS_LOG" || return 1
    # Listening comes before the AOF is loaded: wait for PONG when redis-cli is at hand.
    if command -v redis-cli >/dev/null; then
        local i
        for i in $(seq 1 100); do
            [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return 0
            sleep 0.1
        done
        echo "$ME: redis-server on $REDIS_PORT does not answer PING" >&2
        return 1
    fi
}
