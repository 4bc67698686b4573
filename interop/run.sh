#!/usr/bin/env bash
# Runs the interop suite: third-party MQTT clients (Mosquitto's CLI, Python paho-mqtt)
# against a Herald this script starts on a free loopback port, then stopped with SIGTERM.
#
# Usage: interop/run.sh [HERALD_BINARY] [TEST...]
#   HERALD_BINARY  default target/release/herald (built by `make build`; this script builds nothing)
#   TEST           names of scripts in interop/ to run (default: all of them)
# Environment: PYTHON (default python3), HERALD_LOG (log filter, default info),
#   HERALD_ARGS (more herald flags, e.g. "--store redis --redis-url redis://127.0.0.1:6379/0"),
#   INTEROP_TIMEOUT (seconds per test script, default 120).
#
# Prints one line per test and, last, exactly `N passed, N failed`; exits 1 if any failed.
set -uo pipefail

cd "$(dirname "$0")/.."
HERALD=${1:-target/release/herald}
shift $(( $# > 0 ? 1 : 0 ))
PYTHON=${PYTHON:-python3}
PER_TEST=${INTEROP_TIMEOUT:-120}

if [ ! -x "$HERALD" ]; then
    echo "interop: no herald binary at $HERALD (run 'make build' first)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

if [ $# -gt 0 ]; then
    tests=("$@")
else
    tests=()
    for f in interop/*.sh interop/*.py; do
        case "$(basename "$f")" in run.sh | _*) continue ;; esac
        tests+=("$(basename "$f")")
    done
fi

tmp=$(mktemp -d)
herald_pid=
stop_herald() {
    if [ -n "$herald_pid" ]; then
        kill -TERM "$herald_pid" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$herald_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$herald_pid" 2>/dev/null
        wait "$herald_pid" 2>/dev/null
        herald_pid=
    fi
}
trap 'stop_herald; rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$tmp/herald.log
# shellcheck disable=SC2086 # HERALD_ARGS is a list of flags
NO_COLOR=1 "$HERALD" --listen "127.0.0.1:$port" --log-level "${HERALD_LOG:-info}" ${HERALD_ARGS:-} >"$log" 2>&1 &
herald_pid=$!

# Ready when the port accepts a connection (and the process is still ours and alive).
ready=0
for _ in $(seq 100); do
    if ! kill -0 "$herald_pid" 2>/dev/null; then
        break
    fi
    if "$PYTHON" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$port" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
if [ "$ready" -ne 1 ]; then
    echo "interop: herald did not accept connections on 127.0.0.1:$port; its log:" >&2
    cat "$log" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
echo "interop: $("$HERALD" --version) on 127.0.0.1:$port (pid $herald_pid), $("$PYTHON" -c 'import paho.mqtt; print("paho-mqtt", paho.mqtt.__version__)' 2>&1), $(mosquitto_sub --help 2>/dev/null | sed -n "s/^mosquitto_sub version \([^ ]*\).*/mosquitto-clients \1/p")"

passed=0
failed=0
failed_names=()
for t in "${tests[@]}"; do
    case "$t" in
        *.py) cmd=("$PYTHON" "interop/$t") ;;
        *) cmd=(bash "interop/$t") ;;
    esac
    echo "=== $t"
    start=$(date +%s)
    HERALD_HOST=127.0.0.1 HERALD_PORT=$port timeout -k 5 "$PER_TEST" "${cmd[@]}" </dev/null
    rc=$?
    secs=$(($(date +%s) - start))
    if [ "$rc" -eq 0 ] && kill -0 "$herald_pid" 2>/dev/null; then
        echo "PASS $t (${secs}s)"
        passed=$((passed + 1))
    else
        [ "$rc" -eq 124 ] && echo "interop: $t timed out after ${PER_TEST}s"
        kill -0 "$herald_pid" 2>/dev/null || echo "interop: herald is no longer running"
        echo "FAIL $t (exit $rc, ${secs}s)"
        failed=$((failed + 1))
        failed_names+=("$t")
    fi
done

# Graceful shutdown is part of the contract: SIGTERM, exit 0 within a few seconds.
echo "=== sigterm"
if kill -0 "$herald_pid" 2>/dev/null; then
    kill -TERM "$herald_pid"
    status=timeout
    for _ in $(seq 100); do
        if ! kill -0 "$herald_pid" 2>/dev/null; then
            wait "$herald_pid"
            status=$?
            herald_pid=
            break
        fi
        sleep 0.1
    done
else
    status=dead
fi
if [ "$status" = 0 ]; then
    echo "PASS sigterm (herald exited 0)"
    passed=$((passed + 1))
else
    echo "FAIL sigterm (herald: $status)"
    failed=$((failed + 1))
    failed_names+=(sigterm)
fi

if [ "$failed" -gt 0 ]; then
    echo "interop: failed: ${failed_names[*]}; last 50 lines of the herald log:"
    tail -n 50 "$log"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
