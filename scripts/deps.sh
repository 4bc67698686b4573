#!/usr/bin/env bash
# Checks for the third-party programs that `make test` needs besides Rust, and installs the
# missing ones when run as root (Debian: apt-get, PyPI: pip). Not root: prints what to
# install and exits 1. MQTT.js needs no root: it goes to interop/node_modules (npm ci, from
# interop/package-lock.json), whoever runs this.
#
#   mosquitto_pub, mosquitto_sub  (Debian: mosquitto-clients)  interop/mosquitto_*.sh
#   mosquitto                     (Debian: mosquitto)          reference broker for comparisons
#   redis-server                  (Debian: redis-server)       Redis store tests
#   redis-cli                     (Debian: redis-tools)        tests/redis_cluster.rs: creates the
#                                                              test Redis Cluster
#   openssl                       (Debian: openssl)            interop/run.sh's test certificates
#   curl                          (Debian: curl)               interop/http_push.sh
#   promtool                      (Debian: prometheus)         tests/promtool.rs: checks /metrics,
#                                                              config/alerts.yml and its unit tests
#   node, npm                     (Debian: nodejs, npm)        interop/*.js
#   paho-mqtt >= 2 for python3    (PyPI: paho-mqtt)            interop/paho_*.py
#   mqtt (MQTT.js) v5             (npm: interop/package.json)  interop/mqttjs_*.js
#
# PYTHON picks the interpreter (default: python3 on PATH). Runs without stdin (CI); Debian
# packages are installed with --no-install-recommends.
set -euo pipefail

PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
requirements="$here/interop/requirements.txt"
interop="$here/interop"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have_paho() {
    "$PYTHON" - <<'PY' >/dev/null 2>&1
import sys
import paho.mqtt
sys.exit(0 if int(paho.mqtt.__version__.split(".")[0]) >= 2 else 1)
PY
}
have_pip() { "$PYTHON" -m pip --version >/dev/null 2>&1; }
# MQTT.js is there, and npm installed it from the package-lock.json we have now (npm writes
# node_modules/.package-lock.json at each install; an older one means the lock changed since).
have_mqttjs() {
    [ -f "$interop/node_modules/mqtt/package.json" ] &&
        ! [ "$interop/package-lock.json" -nt "$interop/node_modules/.package-lock.json" ]
}

apt_pkgs=()
have mosquitto_pub && have mosquitto_sub || apt_pkgs+=(mosquitto-clients)
have mosquitto || apt_pkgs+=(mosquitto)
have redis-server || apt_pkgs+=(redis-server)
have redis-cli || apt_pkgs+=(redis-tools)
have openssl || apt_pkgs+=(openssl)
have curl || apt_pkgs+=(curl)
have promtool || apt_pkgs+=(prometheus)
# nodejs first: Debian's npm depends on it. (A Node.js from elsewhere, e.g. NodeSource's
# nodejs, brings its own npm and conflicts with Debian's npm package.)
have node || apt_pkgs+=(nodejs)
have npm || apt_pkgs+=(npm)
if ! have "$PYTHON"; then
    apt_pkgs+=(python3 python3-pip)
    PYTHON=python3
elif ! have_paho && ! have_pip; then
    apt_pkgs+=(python3-pip)
fi
need_paho=0
have_paho || need_paho=1
need_mqttjs=0
have_mqttjs || need_mqttjs=1

if [ ${#apt_pkgs[@]} -eq 0 ] && [ $need_paho -eq 0 ] && [ $need_mqttjs -eq 0 ]; then
    echo "deps: all present (mosquitto, mosquitto-clients, redis-server, openssl, curl, promtool, node with MQTT.js, $PYTHON with paho-mqtt)"
    exit 0
fi

# MQTT.js: exactly the versions in package-lock.json (npm ci), into interop/node_modules.
install_mqttjs() {
    local cmd=(ci)
    [ -f "$interop/package-lock.json" ] || cmd=(install)
    echo "deps: installing MQTT.js in interop/node_modules (npm ${cmd[*]})"
    (cd "$interop" && npm "${cmd[@]}" --no-audit --no-fund --no-update-notifier --loglevel=error </dev/null)
}

# pip refuses to touch a Debian-managed interpreter (PEP 668) unless told to.
pip_flags=()
externally_managed() {
    "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' 2>/dev/null
}

if [ "$(id -u)" -ne 0 ] && [ ${#apt_pkgs[@]} -eq 0 ] && [ $need_paho -eq 0 ]; then
    # Only MQTT.js is missing, and that needs no root.
    install_mqttjs
    have_mqttjs || { echo "deps: npm did not install MQTT.js in interop/node_modules" >&2; exit 1; }
    echo "deps: ok"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing programs; install them as root, or run 'make test' as root:" >&2
    if [ ${#apt_pkgs[@]} -gt 0 ]; then
        echo "  apt-get update && apt-get install -y ${apt_pkgs[*]}" >&2
    fi
    if [ $need_paho -eq 1 ]; then
        if have "$PYTHON" && externally_managed; then
            echo "  $PYTHON -m pip install --break-system-packages -r interop/requirements.txt   (or use a virtualenv and PYTHON=...)" >&2
        else
            echo "  $PYTHON -m pip install -r interop/requirements.txt" >&2
        fi
    fi
    if [ $need_mqttjs -eq 1 ]; then
        echo "  (cd interop && npm ci)   (no root needed; this script does it once node and npm are there)" >&2
    fi
    exit 1
fi

if [ ${#apt_pkgs[@]} -gt 0 ]; then
    echo "deps: installing Debian packages: ${apt_pkgs[*]}"
    # Do not let the packages start their own services: a Debian mosquitto daemon would take
    # port 1883, which is Herald's (and a prometheus one 9090). policy-rc.d is the Debian way
    # to say so during an install.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${apt_pkgs[@]}"
fi

if [ $need_paho -eq 1 ]; then
    externally_managed && pip_flags+=(--break-system-packages)
    echo "deps: installing paho-mqtt for $("$PYTHON" -c 'import sys; print(sys.executable)')"
    "$PYTHON" -m pip install --disable-pip-version-check --no-input ${pip_flags[@]+"${pip_flags[@]}"} -r "$requirements"
    # pyenv keeps shims for installed scripts; harmless when pyenv is absent.
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi

if [ $need_mqttjs -eq 1 ] && have npm; then
    install_mqttjs
fi

missing=()
have mosquitto_pub || missing+=(mosquitto_pub)
have mosquitto_sub || missing+=(mosquitto_sub)
have mosquitto || missing+=(mosquitto)
have redis-server || missing+=(redis-server)
have openssl || missing+=(openssl)
have promtool || missing+=(promtool)
have node || missing+=(node)
have npm || missing+=(npm)
have_mqttjs || missing+=("MQTT.js in interop/node_modules")
have_paho || missing+=("paho-mqtt>=2 for $PYTHON")
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: still missing after install: ${missing[*]}" >&2
    exit 1
fi
echo "deps: ok"
