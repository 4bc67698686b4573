#!/usr/bin/env bash
# Herald against Mosquitto, side by side (issue 3), and Herald with its Redis store
# (issue 4). `make bench` runs this; BENCHMARKS.md holds the figures.
#
#   scripts/bench.sh           full run: idle at 10,000 and 19,000, push to 1,000 devices,
#                              push at 20,000 msgs/s, QoS 0 with 1 and 4 pairs, offline drain
#                              of 1,000 x 10, and push, push-rate and drain again against
#                              Herald --store redis (about 9 minutes), then the cases of
#                              issue 10 below (about 7 minutes more) and the http case of
#                              issue 15 (under a minute)
#   scripts/bench.sh --quick   the same scenarios, small and short (about 2.5 minutes)
#   scripts/bench.sh --smoke   a few clients, about a second per scenario, Herald only; exits
#                              non-zero if any scenario does not deliver everything
#                              (`make test` runs it so the tool keeps working)
#   scripts/bench.sh --only tls
#                              the TLS and authentication cases of issue 10 only (part of the
#                              full and quick runs; the smoke run has a short TLS and login
#                              case): TLS handshakes/s, RSS per idle TLS connection and QoS 1
#                              push over TLS against Mosquitto with TLS; a login storm during
#                              pushes; push with and without a password file (Herald)
#   scripts/bench.sh --only storm
#                              the reconnect storm (below; part of the full, quick and smoke
#                              runs): 19,000 persistent sessions with one queued QoS 1 message
#                              each reconnect at once, Herald (redis) against Mosquitto
#                              (--quick: 5,000; --smoke: 300, Herald only)
#   scripts/bench.sh --only http
#                              the backend HTTP API against MQTT (issue 15; part of the full,
#                              quick and smoke runs): one Herald with --http-listen per store
#                              (memory, then redis), `herald-bench http` against each (below)
#   scripts/bench.sh --cluster [--quick ...]
#                              the cluster benchmark of issue 5 instead (publish on node A,
#                              devices on node B, against one node): runs
#                              scripts/bench-cluster.sh with the other options (see its --help)
#
# Options:
#   --out DIR          keep results there (default: target/bench/<mode>-<date>,
#                      target/bench/smoke for --smoke)
#   --only "A B"       run only the cases whose names start with A or B (idle, push, qos0, ...)
#   --no-build         use the binaries in target/release (or $CARGO_TARGET_DIR/release) as they are
#   --no-mosquitto     Herald only
#   --no-2core         skip the row with Herald on both cores
#   --redis            include the "Herald (redis)" column (the default, except --smoke)
#   --no-redis         leave it out
#   --redis-cpu CPUS   cores for redis-server (taskset -c; default 0, the broker's core)
#   --no-tls           leave out the cases of issue 10 (tls-*, auth-*)
#   --no-metrics       leave out the "Herald (metrics)" column
#
# Issue 13 (the cost of metrics): every Herald column above runs without a metrics
# listener, which turns metrics off (no recorder, no histograms, no store sample). The
# "Herald (metrics)" column runs push and push-rate with `--metrics-listen` on a free
# loopback port while a scraper (curl on the load generator's core) reads /metrics once a
# second, 15 times Prometheus's default rate: its push figure against the Herald column's,
# from the same run, is the cost of metrics.
#
# Issue 10 (TLS and authentication; `--only tls` selects these cases, tls-* and auth-*): a
# certificate is made per run in the temporary directory with openssl (a throw-away CA and
# an ECDSA P-256 server certificate for IP 127.0.0.1). Herald runs with `--listen ""
# --tls-listen 127.0.0.1:PORT --tls-cert --tls-key` (TLS only), Mosquitto with the same
# certificate on a `listener PORT 127.0.0.1` with `certfile`, `keyfile` and `tls_version
# tlsv1.3` (its other settings as above), and in a second column ("mosquitto-tls-nodelay")
# also `set_tcp_nodelay true`: with Mosquitto's default (Nagle's algorithm on) its small
# post-handshake writes (session tickets, CONNACK) wait for the client's delayed ACK, so
# its handshake rate is bound by latency, not by its CPU. herald-bench connects with `--tls --cafile CA`:
# rustls, TLS 1.3, session resumption off, so every connection is a full handshake.
# tls-handshake: fresh connections as fast as they go (100 in flight), each CONNECT then
# DISCONNECT, with `--tls-no-verify` (herald-bench skips checking the certificate chain and
# the handshake signature, two ECDSA verifications of its own: the broker's side of the
# handshake is the same, and the load generator's core goes further); tls-idle-N: the idle
# case over TLS; tls-push: the push case over TLS.
# auth-storm (Herald only): a password file (`herald passwd`, argon2id defaults) and
# `auth.allow_anonymous = true` in a config file; 1,000 anonymous devices get pushes at
# 2,000 msgs/s while 5,000 clients log in with the file's user (1,000 in flight): push p99
# before and during the storm, logins/s. auth-push: the push case on Herald without
# authentication ("herald-noauth") and with the password file, every client logged in
# ("herald-auth"); the devices connect one at a time in both (the logins queue for the one
# password worker anyway, and the order in which devices connect moves Herald's push figure
# by 10-20 %). The summary ends with the issue 10 table (`herald-bench security-report`).
#
# storm (the reconnect storm: a node died and all its devices come back to another one at
# once): `herald-bench storm --no-wipe` (every case has a fresh broker) against Herald
# (redis) (column storm-herald-redis, with --store-pid and --store-addr: Redis CPU seconds
# and commands per reconnect; storm-herald, the memory store, with --no-redis and in the
# smoke run) and Mosquitto with `persistence false` (column storm-mosquitto: its persistent
# sessions and queued messages live in memory; its other settings as below, its listen
# backlog Mosquitto's fixed 100). The devices (clean session = false, each subscribed to
# push/<id> at QoS 1) connect and disconnect, get --queued QoS 1 messages each while offline,
# then all reconnect at once, with no cap on connects in flight (--storm-concurrency 0):
# seconds until all are connected (CONNACK 0, session present) and until every queued
# message has arrived, CONNACK latency, CONNACK 3 (retried after 100 ms, doubling, with
# jitter) and other refusals, connection errors, broker and Redis CPU. Targets, printed as
# notes: all connected within 3 s, no error other than CONNACK 3. The summary ends with the
# two columns side by side.
#
# http (issue 15; `--only http`): Herald with `-c CONFIG --http-listen 127.0.0.1:PORT`, the
# config holding one bearer token made for the run (`http.tokens`), on the memory store
# (column herald-http) and on `--store redis` with its own redis-server as for Herald (redis)
# (column herald-http-redis; left out with --no-redis and in the smoke run). `herald-bench
# http` runs, against each, with the same 1,000 devices online throughout (push/<id>, QoS 1,
# PUBACKing), --secs per phase: (a) MQTT QoS 1 push as in the push case; (b) `POST
# /v1/push/{id}?qos=1` on 64 keep-alive connections, a request in flight on each; (c) the batch
# `POST /v1/push`, 100 messages per request, 4 in flight; (d) (b) with `receipt=true`, or the
# note "receipts: not supported by this Herald (400)" when Herald refuses the parameter; (e)
# MQTT, then HTTP, at 5,000 msgs/s: p99 from the PUBACK or the 202 to the device's PUBLISH.
# A message counts when its device has it. The summary ends with `herald-bench http-report`:
# both stores side by side with the targets (b >= 50 % of a, c >= a, d at most 25 % below b
# on Redis), and the load generator's CPU per phase (over 80 % of its core: it may have set
# the pace).
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
TLS=1
METRICS=1
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
        --no-tls) TLS=0 ;;
        --no-metrics) METRICS=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CARGO=${CARGO:-cargo}
# The binaries of `cargo build --release` (CARGO_TARGET_DIR is honoured).
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
HERALD=$TARGET_DIR/release/herald
BENCH=$TARGET_DIR/release/herald-bench

if [ "$MODE" = smoke ]; then
    MOSQUITTO=0
    TWO_CORE=0
    METRICS=0
    REDIS=${REDIS:-0}
fi
REDIS=${REDIS:-1}
# The scenarios (second field of CASES) run against Herald (redis).
REDIS_SCENARIOS="push push-rate drain"

# name | herald-bench scenario | arguments [| set: tls, storm or auth (issue 10); reconnect:
# the reconnect storm; none: issue 3]
case $MODE in
full) CASES=(
    "idle-10000|idle|--clients 10000 --idle-secs 30"
    "idle-19000|idle|--clients 19000 --idle-secs 30"
    "push|push|--devices 1000 --window 1000 --secs 10"
    "push-rate|push-rate|--devices 1000 --rate 20000 --secs 10"
    "qos0|qos0|--pairs 1,4 --payload 64 --secs 10"
    "drain|drain|--devices 1000 --per-device 10"
    "tls-handshake|handshake|--connections 20000 --concurrency 100 --tls-no-verify|tls"
    "tls-idle-10000|idle|--clients 10000 --idle-secs 30|tls"
    "tls-push|push|--devices 1000 --window 1000 --secs 10|tls"
    "auth-storm|login-storm|--devices 1000 --rate 2000 --logins 5000 --login-concurrency 1000 --baseline-secs 10 --after-secs 3|storm"
    "auth-push|push|--devices 1000 --window 1000 --secs 10 --id-prefix bench-dev --no-wipe --concurrency 1 --handshake-timeout 60|auth"
    "storm|storm|--devices 19000 --queued 1 --no-wipe|reconnect"
    "http|http|--devices 1000 --secs 4 --no-wipe|http"
) ;;
quick) CASES=(
    "idle-1000|idle|--clients 1000 --idle-secs 5"
    "idle-2000|idle|--clients 2000 --idle-secs 5"
    "push|push|--devices 200 --window 1000 --secs 3"
    "push-rate|push-rate|--devices 200 --rate 5000 --secs 3"
    "qos0|qos0|--pairs 1,4 --payload 64 --secs 3"
    "drain|drain|--devices 200 --per-device 10"
    "tls-handshake|handshake|--connections 3000 --concurrency 100 --tls-no-verify|tls"
    "tls-idle-2000|idle|--clients 2000 --idle-secs 5|tls"
    "tls-push|push|--devices 200 --window 1000 --secs 3|tls"
    "auth-storm|login-storm|--devices 200 --rate 2000 --logins 200 --login-concurrency 200 --baseline-secs 3 --after-secs 1|storm"
    "auth-push|push|--devices 200 --window 1000 --secs 3 --id-prefix bench-dev --no-wipe --concurrency 1 --handshake-timeout 60|auth"
    "storm|storm|--devices 5000 --queued 1 --no-wipe|reconnect"
    "http|http|--devices 1000 --secs 2 --no-wipe|http"
) ;;
smoke) CASES=(
    "idle|idle|--clients 20 --idle-secs 1"
    "push|push|--devices 10 --messages 2000"
    "push-rate|push-rate|--devices 10 --rate 1000 --secs 1"
    "qos0|qos0|--pairs 1,4 --payload 64 --secs 1"
    "drain|drain|--devices 10 --per-device 10"
    "tls-handshake|handshake|--connections 50 --concurrency 10|tls"
    "tls-push|push|--devices 10 --messages 2000|tls"
    "auth-storm|login-storm|--devices 10 --rate 1000 --logins 4 --login-concurrency 4 --baseline-secs 0.3 --after-secs 0.2|storm"
    "storm|storm|--devices 300 --queued 1 --no-wipe|reconnect"
    "http|http|--devices 10 --secs 0.3 --http-rate 500 --no-wipe|http"
) ;;
esac
# `--only tls` means every case of issue 10: tls-* and auth-*.
if [ -n "$ONLY" ]; then
    ONLY_WORDS=
    for w in $ONLY; do
        ONLY_WORDS+=" $w"
        [ "$w" = tls ] && ONLY_WORDS+=" auth"
    done
    ONLY=$ONLY_WORDS
fi

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

# Issue 10 cases: is any selected, and can they run?
TLS_CASES=0
if [ "$TLS" = 1 ]; then
    for c in "${CASES[@]}"; do
        IFS='|' read -r name _ _ set <<<"$c"
        case $set in tls | storm | auth) selected "$name" && TLS_CASES=1 ;; esac
    done
    if [ "$TLS_CASES" = 1 ] && ! command -v openssl >/dev/null; then
        echo "bench: openssl is not installed: the TLS and login cases (issue 10) are skipped" >&2
        TLS=0
        TLS_CASES=0
    fi
fi
PKI=$TMP/pki
BENCH_USER=bench
BENCH_PASSWORD=
if [ "$TLS_CASES" = 1 ]; then
    # A throw-away CA and an ECDSA P-256 server certificate for IP 127.0.0.1 (both brokers
    # serve it; herald-bench trusts the CA), and a password file with one user.
    mkdir -p "$PKI"
    (
        cd "$PKI"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=herald-bench CA" -out ca.pem
        openssl ecparam -name prime256v1 -genkey -noout -out server.key
        openssl req -new -key server.key -subj "/CN=127.0.0.1" -out server.csr
        printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
            -days 2 -extfile server.ext -out server.pem
    ) >"$TMP/pki.log" 2>&1 || { echo "bench: openssl failed:" >&2; cat "$TMP/pki.log" >&2; exit 2; }
    # Mosquitto, started as root, reads them as user mosquitto.
    chmod 755 "$TMP" "$PKI"
    chmod 644 "$PKI"/*
    BENCH_PASSWORD=pw-$RANDOM$RANDOM$RANDOM
    printf '%s\n' "$BENCH_PASSWORD" | "$HERALD" passwd "$TMP/passwd" "$BENCH_USER" >&2
    cat >"$TMP/herald-storm.toml" <<EOF
[auth]
password_file = "$TMP/passwd"
allow_anonymous = true
EOF
fi

BROKER_PID=
BROKER_PORT=
BROKER_LOG=
# The HTTP API of the herald-http kinds: its port, and the bearer token of this run (in the
# config file those brokers read; a token of 16 characters at least).
HTTP_PORT=
HTTP_TOKEN=bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
(umask 077 && printf '[http]\ntokens = ["%s"]\n' "$HTTP_TOKEN" >"$TMP/herald-http.toml")
# redis-server behind Herald (redis), while a herald-redis case runs: REDIS_PID, REDIS_PORT
# and REDIS_LOG (set by start_redis).

# mosquitto_conf DIR PORT [tls|tls-nodelay|nopersist]: Mosquitto's config (see Method in
# BENCHMARKS.md); with tls the listener serves TLS 1.3 with the run's certificate, with
# tls-nodelay also `set_tcp_nodelay true`; nopersist: `persistence false` (sessions and
# queued messages in memory only).
mosquitto_conf() {
    local dir=$1 port=$2
    {
        echo "listener $port 127.0.0.1"
        case ${3:-} in
        tls | tls-nodelay)
            echo "certfile $PKI/server.pem"
            echo "keyfile $PKI/server.key"
            echo "tls_version tlsv1.3"
            ;;
        esac
        # Mosquitto's default leaves Nagle's algorithm on; the second TLS column turns it off.
        [ "${3:-}" = tls-nodelay ] && echo "set_tcp_nodelay true"
        if [ "${3:-}" = nopersist ]; then
            echo "persistence false"
        else
            echo "persistence true"
            echo "persistence_location $dir/"
        fi
        cat <<EOF
max_connections -1
allow_anonymous true
max_queued_messages 1000
log_dest stderr
log_type error
log_type warning
EOF
    } >"$dir/mosquitto.conf"
}

# start_broker KIND CPUS...: KIND herald, herald-redis, mosquitto, mosquitto-nopersist
# (`persistence false`, the reconnect storm); issue 10: herald-tls,
# mosquitto-tls (TLS only), herald-auth (--password-file), herald-storm (password file and
# anonymous clients allowed).
start_broker() {
    local kind=$1
    shift
    REDIS_PID=
    SCRAPER_PID=
    case $kind in herald-redis | herald-http-redis)
        start_redis "${PIN_REDIS[@]}" || return 1
        ;;
    esac
    free_port || return 1
    BROKER_PORT=$FREE
    local dir=$TMP/$kind-$BROKER_PORT
    mkdir -p "$dir"
    BROKER_LOG=$dir/broker.log
    case $kind in
    herald)
        "$@" "$HERALD" --listen "127.0.0.1:$BROKER_PORT" --log-level warn >"$BROKER_LOG" 2>&1 &
        ;;
    herald-metrics)
        free_port || return 1
        local mport=$FREE
        "$@" "$HERALD" --listen "127.0.0.1:$BROKER_PORT" --log-level warn \
            --metrics-listen "127.0.0.1:$mport" >"$BROKER_LOG" 2>&1 &
        BROKER_PID=$!
        STARTED+=("$BROKER_PID")
        # shellcheck disable=SC2016
        "${PIN_BENCH[@]}" bash -c 'while kill -0 "$1" 2>/dev/null; do
                curl -s -o /dev/null "http://127.0.0.1:$2/metrics"; sleep 1; done' \
            scraper "$BROKER_PID" "$mport" &
        SCRAPER_PID=$!
        STARTED+=("$SCRAPER_PID")
        wait_port "the broker" "$BROKER_PID" "$BROKER_PORT" "$BROKER_LOG"
        return
        ;;
    herald-redis)
        "$@" "$HERALD" --listen "127.0.0.1:$BROKER_PORT" --log-level warn \
            --store redis --redis-url "redis://127.0.0.1:$REDIS_PORT/0" >"$BROKER_LOG" 2>&1 &
        ;;
    herald-http | herald-http-redis)
        free_port || return 1
        HTTP_PORT=$FREE
        local store=()
        [ "$kind" = herald-http-redis ] &&
            store=(--store redis --redis-url "redis://127.0.0.1:$REDIS_PORT/0")
        "$@" "$HERALD" -c "$TMP/herald-http.toml" --listen "127.0.0.1:$BROKER_PORT" \
            --http-listen "127.0.0.1:$HTTP_PORT" --log-level warn "${store[@]+"${store[@]}"}" \
            >"$BROKER_LOG" 2>&1 &
        BROKER_PID=$!
        STARTED+=("$BROKER_PID")
        wait_port "the broker" "$BROKER_PID" "$BROKER_PORT" "$BROKER_LOG" &&
            wait_port "the broker's HTTP API" "$BROKER_PID" "$HTTP_PORT" "$BROKER_LOG"
        return
        ;;
    herald-tls)
        "$@" "$HERALD" --listen "" --tls-listen "127.0.0.1:$BROKER_PORT" \
            --tls-cert "$PKI/server.pem" --tls-key "$PKI/server.key" \
            --log-level warn >"$BROKER_LOG" 2>&1 &
        ;;
    herald-auth)
        "$@" "$HERALD" --listen "127.0.0.1:$BROKER_PORT" --password-file "$TMP/passwd" \
            --log-level warn >"$BROKER_LOG" 2>&1 &
        ;;
    herald-storm)
        "$@" "$HERALD" -c "$TMP/herald-storm.toml" --listen "127.0.0.1:$BROKER_PORT" \
            --log-level warn >"$BROKER_LOG" 2>&1 &
        ;;
    mosquitto | mosquitto-tls | mosquitto-tls-nodelay | mosquitto-nopersist)
        mosquitto_conf "$dir" "$BROKER_PORT" "${kind#mosquitto-}"
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
    if [ -n "$SCRAPER_PID" ]; then
        stop_pid "$SCRAPER_PID"
    fi
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
    local rc store=() extra=()
    [ -n "$REDIS_PID" ] && store=(--store-pid "$REDIS_PID" --store-addr "127.0.0.1:$REDIS_PORT")
    case $kind in
    *-tls | *-tls-nodelay) extra=(--tls --cafile "$PKI/ca.pem") ;;
    herald-auth | herald-storm) extra=(--username "$BENCH_USER" --password "$BENCH_PASSWORD") ;;
    herald-http | herald-http-redis)
        extra=(--http-addr "127.0.0.1:$HTTP_PORT" --http-token "$HTTP_TOKEN")
        ;;
    esac
    set +e
    # shellcheck disable=SC2086
    "${PIN_BENCH[@]}" "$BENCH" "$scenario" --port "$BROKER_PORT" --broker-pid "$BROKER_PID" \
        "${store[@]+"${store[@]}"}" "${extra[@]+"${extra[@]}"}" \
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
[ "$METRICS" = 1 ] && COLS+=("herald-metrics|herald-metrics|${PIN_BROKER[*]-}|push push-rate")
# Issue 10: the columns of each set of cases.
TLS_COLS=("herald-tls|herald-tls|${PIN_BROKER[*]-}|")
[ "$MOSQUITTO" = 1 ] && TLS_COLS+=("mosquitto-tls|mosquitto-tls|${PIN_BROKER[*]-}|"
    "mosquitto-tls-nodelay|mosquitto-tls-nodelay|${PIN_BROKER[*]-}|")
STORM_COLS=("herald-storm|herald-storm|${PIN_BROKER[*]-}|")
AUTH_COLS=("herald-noauth|herald|${PIN_BROKER[*]-}|" "herald-auth|herald-auth|${PIN_BROKER[*]-}|")
# Issue 15: the HTTP API on the memory store, and on Redis.
HTTP_COLS=("herald-http|herald-http|${PIN_BROKER[*]-}|")
[ "$REDIS" = 1 ] && HTTP_COLS+=("herald-http-redis|herald-http-redis|${PIN_BROKER[*]-}|")
# The reconnect storm: Herald (redis) (the memory store with --no-redis and in the smoke
# run) and Mosquitto with `persistence false`.
if [ "$REDIS" = 1 ]; then
    RECONNECT_COLS=("storm-herald-redis|herald-redis|${PIN_BROKER[*]-}|")
else
    RECONNECT_COLS=("storm-herald|herald|${PIN_BROKER[*]-}|")
fi
[ "$MOSQUITTO" = 1 ] && RECONNECT_COLS+=("storm-mosquitto|mosquitto-nopersist|${PIN_BROKER[*]-}|")

COMMAND="scripts/bench.sh${ARGV:+ $ARGV}"
T0=$(date +%s)
for c in "${CASES[@]}"; do
    IFS='|' read -r name scenario args set <<<"$c"
    selected "$name" || continue
    case $set in tls | storm | auth) [ "$TLS" = 0 ] && continue ;; esac
    case $set in
    "") cols=("${COLS[@]}") ;;
    tls) cols=("${TLS_COLS[@]}") ;;
    storm) cols=("${STORM_COLS[@]}") ;;
    auth) cols=("${AUTH_COLS[@]}") ;;
    reconnect) cols=("${RECONNECT_COLS[@]}") ;;
    http) cols=("${HTTP_COLS[@]}") ;;
    esac
    # The columns of one case run back to back, so load that drifts hits them alike.
    for col in "${cols[@]}"; do
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
COMPARE=()
[ -d "$OUT/herald" ] && COMPARE+=("Herald=$OUT/herald")
[ "$MOSQUITTO" = 1 ] && [ -d "$OUT/mosquitto" ] && COMPARE+=("Mosquitto=$OUT/mosquitto")
# Herald (redis) is compared with Mosquitto (its ratio and the issue 4 target); without
# Mosquitto its results are printed as they are.
DURABLE=()
if [ "$REDIS" = 1 ] && [ "$MOSQUITTO" = 1 ] && [ -d "$OUT/herald-redis" ]; then
    COMPARE+=("Herald (redis)=$OUT/herald-redis")
    DURABLE=(--durable "Herald (redis)")
fi
[ "$TWO_CORE" = 1 ] && [ -d "$OUT/herald-2core" ] && COMPARE+=("Herald 2 cores=$OUT/herald-2core")
[ "$METRICS" = 1 ] && [ -d "$OUT/herald-metrics" ] && COMPARE+=("Herald (metrics)=$OUT/herald-metrics")
{
    echo "## Results ($MODE run)"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
    echo "- brokers: Herald $("$HERALD" --version 2>/dev/null | awk '{print $2}'), $([ -n "$MOSQUITTO_BIN" ] && "$MOSQUITTO_BIN" -h 2>/dev/null | head -1)"
    echo "- pinning: brokers \`${PIN_BROKER[*]-none}\`, Herald 2 cores \`${PIN_BOTH[*]-none}\`, load generator \`${PIN_BENCH[*]-none}\`$([ "$REDIS" = 1 ] && echo ", redis-server of Herald (redis) \`${PIN_REDIS[*]-none}\`")"
    if [ "$REDIS" = 1 ] && [ -d "$OUT/herald-redis" ]; then
        echo "- Herald (redis): \`--store redis\`, $("$REDIS_BIN" --version | awk '{print $1, $2, $3}'), \`--appendonly yes --appendfsync everysec --save \"\"\`, a fresh redis-server per case on loopback (push, push-rate, drain only)"
    fi
    if [ "$TLS_CASES" = 1 ]; then
        echo "- TLS (issue 10): $(openssl version | awk '{print $1, $2}') made a CA and an ECDSA P-256 server certificate (SAN IP:127.0.0.1) for this run; Herald \`--listen \"\" --tls-listen\` (rustls, ring), Mosquitto \`certfile\`/\`keyfile\`/\`tls_version tlsv1.3\` ($(ldd "${MOSQUITTO_BIN:-/usr/sbin/mosquitto}" 2>/dev/null | awk '/libssl/ {print $1}')); herald-bench: rustls, ring, TLS 1.3, resumption off"
        echo "- authentication (issue 10): a password file with one user made by \`herald passwd\` (argon2id, the argon2 crate's defaults); login storm: the same file and \`auth.allow_anonymous = true\` (the devices and the publisher are anonymous)"
    fi
    if [ -d "$OUT/herald-http" ]; then
        echo "- HTTP API (issue 15): Herald \`--http-listen\` with one bearer token (\`http.tokens\`), memory store$([ -d "$OUT/herald-http-redis" ] && echo " and \`--store redis\` (its redis-server pinned as above)"); herald-bench: hyper's HTTP/1.1 client, keep-alive connections, on the load generator's core"
    fi
    if [ -d "$OUT/storm-herald-redis" ] || [ -d "$OUT/storm-herald" ] || [ -d "$OUT/storm-mosquitto" ]; then
        echo "- reconnect storm: Herald $([ -d "$OUT/storm-herald-redis" ] && echo "(redis, pinned with Herald as above)" || echo "(memory store)"), Mosquitto with \`persistence false\` (persistent sessions and queued messages in memory); every device back at once (no cap on connects in flight), CONNACK 3 retried after 100 ms (doubling, with jitter)"
    fi
    echo "- command: \`$COMMAND\` ($((T1 - T0)) s)"
    echo
} >"$OUT/summary.md"
if [ ${#COMPARE[@]} -ge 2 ]; then
    rc=0
    "$BENCH" compare "${COMPARE[@]}" "${DURABLE[@]+"${DURABLE[@]}"}" --markdown "$OUT/table.md" || rc=$?
    cat "$OUT/table.md" >>"$OUT/summary.md"
elif [ -d "$OUT/herald" ]; then
    cat "$OUT"/herald/*.txt
fi
# Issue 10: Herald and Mosquitto over TLS side by side, then the table of the five targets.
if [ -d "$OUT/herald-tls" ] && [ -d "$OUT/mosquitto-tls" ]; then
    echo
    {
        echo
        echo "### TLS: Herald against Mosquitto, both with TLS"
    } >>"$OUT/summary.md"
    MQ_NODELAY=()
    [ -d "$OUT/mosquitto-tls-nodelay" ] &&
        MQ_NODELAY=("Mosquitto (TLS, nodelay)=$OUT/mosquitto-tls-nodelay")
    "$BENCH" compare "Herald (TLS)=$OUT/herald-tls" "Mosquitto (TLS)=$OUT/mosquitto-tls" \
        "${MQ_NODELAY[@]+"${MQ_NODELAY[@]}"}" --markdown "$OUT/table-tls.md" || true
    cat "$OUT/table-tls.md" >>"$OUT/summary.md"
fi
if [ "$TLS_CASES" = 1 ]; then
    for d in herald-storm herald-noauth herald-auth; do
        [ -d "$OUT/$d" ] && cat "$OUT/$d"/*.txt
    done
    echo
    {
        echo
        echo "### TLS and authentication (issue 10): the targets"
        echo
    } >>"$OUT/summary.md"
    "$BENCH" security-report "$OUT" --markdown "$OUT/security.md" || true
    cat "$OUT/security.md" >>"$OUT/summary.md"
fi
if [ "$MOSQUITTO" = 0 ] && [ -d "$OUT/herald-redis" ]; then
    cat "$OUT"/herald-redis/*.txt
fi
# The reconnect storm: Herald against Mosquitto (persistence false); the targets are in the
# notes under the table.
STORM_HERALD=
if [ -d "$OUT/storm-herald-redis" ]; then
    STORM_HERALD="Herald (redis)=$OUT/storm-herald-redis"
elif [ -d "$OUT/storm-herald" ]; then
    STORM_HERALD="Herald=$OUT/storm-herald"
fi
if [ -n "$STORM_HERALD" ] && [ -d "$OUT/storm-mosquitto" ]; then
    echo
    {
        echo
        echo "### Reconnect storm: Herald against Mosquitto (persistence false)"
    } >>"$OUT/summary.md"
    "$BENCH" compare "$STORM_HERALD" "Mosquitto=$OUT/storm-mosquitto" \
        --markdown "$OUT/table-storm.md" || true
    cat "$OUT/table-storm.md" >>"$OUT/summary.md"
elif [ -n "$STORM_HERALD" ]; then
    cat "${STORM_HERALD#*=}"/*.txt
fi
# Issue 15: the HTTP API against MQTT, the memory and the Redis store side by side.
HTTP_REPORT=()
[ -d "$OUT/herald-http" ] && HTTP_REPORT+=("Herald=$OUT/herald-http")
[ -d "$OUT/herald-http-redis" ] && HTTP_REPORT+=("Herald (redis)=$OUT/herald-http-redis")
if [ ${#HTTP_REPORT[@]} -gt 0 ]; then
    {
        echo
        echo "### HTTP API against MQTT (issue 15)"
        echo
    } >>"$OUT/summary.md"
    "$BENCH" http-report "${HTTP_REPORT[@]}" --markdown "$OUT/table-http.md" || true
    cat "$OUT/table-http.md" >>"$OUT/summary.md"
fi
echo
echo "bench: results in $OUT (summary.md: the table for BENCHMARKS.md)"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "bench: FAILED: ${FAILED[*]}"
    exit 1
fi
