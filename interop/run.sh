#!/usr/bin/env bash
# Runs the interop suite: third-party MQTT clients (Mosquitto's CLI, Python paho-mqtt, MQTT.js
# in Node) against one Herald this script starts, then stops with SIGTERM.
#
# Herald listens on five free loopback ports (never 1883): plain MQTT over TCP, MQTT over TLS,
# MQTT over WebSocket (ws) and over WebSocket on TLS (wss), the middle three with a throw-away
# certificate made for this run with openssl in a temp dir (an ECDSA P-256 CA and a server
# certificate for localhost and 127.0.0.1; no key is kept or committed), and the backend HTTP
# API (--http-listen), with one bearer token made for the run in a config file this script
# writes and passes with -c (so HERALD_ARGS must not name another). Each test script gets:
#   HERALD_HOST           127.0.0.1
#   HERALD_PORT           plain MQTT over TCP
#   HERALD_TLS_PORT       MQTT over TLS
#   HERALD_WS_PORT        MQTT over WebSocket, path /mqtt
#   HERALD_WSS_PORT       MQTT over WebSocket over TLS, path /mqtt
#   HERALD_CAFILE         the CA (PEM) that signed Herald's certificate
#   HERALD_OTHER_CAFILE   a CA that did not (for "untrusted server" checks)
#   HERALD_HTTP_PORT      the backend HTTP API (plain HTTP)
#   HERALD_HTTP_TOKEN     its bearer token (http.tokens)
#
# Usage: interop/run.sh [HERALD_BINARY] [TEST...]
#   HERALD_BINARY  default target/release/herald (built by `make build`; this script builds nothing)
#   TEST           names of scripts in interop/ to run (default: all of them: *.sh, *.py, *.js,
#                  *.mjs except run.sh and _*). *.py run with PYTHON, *.js/*.mjs with NODE (from
#                  interop/, where scripts/deps.sh put node_modules), the rest with bash.
# Environment: PYTHON (default python3), NODE (default node), HERALD_LOG (log filter, default
#   info), HERALD_ARGS (more herald flags, e.g. "--store redis --redis-url redis://127.0.0.1:6379/0"),
#   INTEROP_TIMEOUT (seconds per test script, default 120).
# Needs openssl, and for the tests mosquitto-clients, paho-mqtt 2.x and MQTT.js (scripts/deps.sh).
#
# Prints one line per test and, last, exactly `N passed, N failed`; exits 1 if any failed.
set -uo pipefail

cd "$(dirname "$0")/.."
HERALD=${1:-target/release/herald}
shift $(( $# > 0 ? 1 : 0 ))
PYTHON=${PYTHON:-python3}
NODE=${NODE:-node}
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
    for f in interop/*.sh interop/*.py interop/*.js interop/*.mjs; do
        [ -e "$f" ] || continue
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

# The per-run PKI: a CA, a server certificate it signs (SANs localhost and 127.0.0.1), and a
# second CA that signs nothing Herald presents. ECDSA P-256, PKCS#8 keys, valid for 2 days.
make_certs() {
    local d=$1
    mkdir -p "$d" && chmod 700 "$d" || return 1
    cat >"$d/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    local ec=(-algorithm EC -pkeyopt ec_paramgen_curve:P-256)
    openssl genpkey "${ec[@]}" -out "$d/ca.key" &&
        openssl req -config "$d/openssl.cnf" -x509 -new -key "$d/ca.key" -sha256 -days 2 \
            -subj "/CN=Herald interop CA $$" -extensions ca -out "$d/ca.pem" &&
        openssl genpkey "${ec[@]}" -out "$d/other-ca.key" &&
        openssl req -config "$d/openssl.cnf" -x509 -new -key "$d/other-ca.key" -sha256 -days 2 \
            -subj "/CN=Some other CA $$" -extensions ca -out "$d/other-ca.pem" &&
        openssl genpkey "${ec[@]}" -out "$d/server.key" &&
        openssl req -config "$d/openssl.cnf" -new -key "$d/server.key" -subj "/CN=localhost" \
            -out "$d/server.csr" &&
        openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" \
            -CAcreateserial -days 2 -sha256 -extfile "$d/openssl.cnf" -extensions server \
            -out "$d/server.pem"
}
certs=$tmp/certs
if ! make_certs "$certs" >"$tmp/openssl.log" 2>&1; then
    echo "interop: could not make the test certificates with openssl:" >&2
    cat "$tmp/openssl.log" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

# Five distinct free ports: all five sockets are bound at once, then released.
read -r port tls_port ws_port wss_port http_port < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
# The HTTP API's token: random, for this run only, readable by this user only.
http_token=interop-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
(umask 077 && printf '[http]\ntokens = ["%s"]\n' "$http_token" >"$tmp/herald.toml")
log=$tmp/herald.log
# shellcheck disable=SC2086 # HERALD_ARGS is a list of flags
NO_COLOR=1 "$HERALD" -c "$tmp/herald.toml" --listen "127.0.0.1:$port" \
    --tls-listen "127.0.0.1:$tls_port" --ws-listen "127.0.0.1:$ws_port" --wss-listen "127.0.0.1:$wss_port" \
    --http-listen "127.0.0.1:$http_port" \
    --tls-cert "$certs/server.pem" --tls-key "$certs/server.key" \
    --log-level "${HERALD_LOG:-info}" ${HERALD_ARGS:-} >"$log" 2>&1 &
herald_pid=$!

# Ready when every listener accepts a TCP connection (and the process is still ours and alive).
ready=0
for _ in $(seq 100); do
    if ! kill -0 "$herald_pid" 2>/dev/null; then
        break
    fi
    if "$PYTHON" -c '
import socket, sys
for p in sys.argv[1:]:
    socket.create_connection(("127.0.0.1", int(p)), 1).close()' "$port" "$tls_port" "$ws_port" "$wss_port" "$http_port" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
if [ "$ready" -ne 1 ]; then
    echo "interop: herald did not accept connections on 127.0.0.1 ports $port (tcp), $tls_port (tls), $ws_port (ws), $wss_port (wss), $http_port (http); its log:" >&2
    cat "$log" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
versions=(
    "$("$PYTHON" -c 'import paho.mqtt; print("paho-mqtt", paho.mqtt.__version__)' 2>&1 | tail -n 1)"
    "$(mosquitto_sub --help 2>/dev/null | sed -n "s/^mosquitto_sub version \([^ ]*\).*/mosquitto-clients \1/p")"
    "node $("$NODE" --version 2>&1) with mqtt $(cd interop && "$NODE" -p 'require("mqtt/package.json").version' 2>/dev/null || echo "missing (run scripts/deps.sh)")"
    "$(openssl version 2>&1 | cut -d' ' -f1-2)"
    "$(curl --version 2>/dev/null | head -n 1 | cut -d' ' -f1-2)"
)
echo "interop: $("$HERALD" --version) (pid $herald_pid) on 127.0.0.1: tcp $port, tls $tls_port, ws $ws_port, wss $wss_port, http $http_port"
echo "interop: clients: $(IFS=,; echo "${versions[*]}" | sed 's/,/, /g')"

passed=0
failed=0
failed_names=()
for t in "${tests[@]}"; do
    case "$t" in
        *.py) cmd=("$PYTHON" "interop/$t") ;;
        # From interop/, so that require("mqtt") finds interop/node_modules.
        *.js | *.mjs) cmd=(env -C interop "$NODE" "$t") ;;
        *) cmd=(bash "interop/$t") ;;
    esac
    echo "=== $t"
    start=$(date +%s)
    HERALD_HOST=127.0.0.1 HERALD_PORT=$port HERALD_TLS_PORT=$tls_port HERALD_WS_PORT=$ws_port \
        HERALD_WSS_PORT=$wss_port HERALD_CAFILE=$certs/ca.pem HERALD_OTHER_CAFILE=$certs/other-ca.pem \
        HERALD_HTTP_PORT=$http_port HERALD_HTTP_TOKEN=$http_token \
        timeout -k 5 "$PER_TEST" "${cmd[@]}" </dev/null
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
