#!/usr/bin/env bash
# Makes throw-away certificates for trying Herald's TLS listeners and for tests:
# a dev CA, a server certificate for localhost / 127.0.0.1 / ::1 and a client certificate.
# NEVER use them in production (see certs/README.md).
#
# Usage: certs/gen-dev-certs.sh [--force] [OUTDIR [CLIENT_CN]]
#   OUTDIR     where the files go (default: certs/dev next to this script; git-ignored)
#   CLIENT_CN  the client certificate's CN, i.e. the device identity (default: $CLIENT_CN,
#              else dev42)
#   --force    overwrite existing files (otherwise the script refuses)
#
# Needs only `openssl` (1.1.1 or later). All keys are ECDSA P-256 in PKCS#8 PEM, mode 600.
set -euo pipefail

force=0
args=()
for a in "$@"; do
    case "$a" in
        --force) force=1 ;;
        -h | --help)
            sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "gen-dev-certs: unknown option $a" >&2
            exit 2
            ;;
        *) args+=("$a") ;;
    esac
done
if [ "${#args[@]}" -gt 2 ]; then
    echo "usage: $0 [--force] [OUTDIR [CLIENT_CN]]" >&2
    exit 2
fi
out="${args[0]:-$(dirname "$0")/dev}"
cn="${args[1]:-${CLIENT_CN:-dev42}}"

command -v openssl >/dev/null || {
    echo "gen-dev-certs: openssl not found" >&2
    exit 1
}

files=(ca.pem ca.key server.pem server.key client.pem client.key)
mkdir -p "$out"
if [ "$force" = 0 ]; then
    for f in "${files[@]}"; do
        if [ -e "$out/$f" ]; then
            echo "gen-dev-certs: $out/$f exists; not overwriting (use --force to replace all)" >&2
            exit 1
        fi
    done
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

key() {
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null)
}
serial() {
    echo "0x$(openssl rand -hex 16)"
}

# Everything is made in a temporary directory and moved into place at the end, so a failure
# half-way leaves OUTDIR as it was.
key "$tmp/ca.key"
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days 3650 -set_serial "$(serial)" \
    -subj "/O=Herald dev (throw-away)/CN=Herald dev CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$tmp/ca.pem"

# leaf NAME CN EXTENSIONS: a key, a request, and the CA's signature (825 days: the longest
# validity Apple platforms accept for a TLS server certificate).
leaf() {
    key "$tmp/$1.key"
    openssl req -new -key "$tmp/$1.key" -subj "/O=Herald dev (throw-away)/CN=$2" -out "$tmp/$1.csr"
    printf '%s\n' "$3" >"$tmp/$1.ext"
    openssl x509 -req -in "$tmp/$1.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
        -set_serial "$(serial)" -days 825 -sha256 -extfile "$tmp/$1.ext" \
        -out "$tmp/$1.pem" 2>/dev/null
}
leaf server localhost "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
authorityKeyIdentifier=keyid"
leaf client "$cn" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
authorityKeyIdentifier=keyid"

openssl verify -CAfile "$tmp/ca.pem" "$tmp/server.pem" "$tmp/client.pem" >/dev/null
for f in "${files[@]}"; do
    mv -f "$tmp/$f" "$out/$f"
done
chmod 600 "$out"/*.key
chmod 644 "$out"/*.pem

cat <<EOF
Made in $out (throw-away, for trying Herald and tests only; never for production):
  ca.pem, ca.key          dev CA (ECDSA P-256, 10 years); clients trust ca.pem
  server.pem, server.key  server certificate for localhost, 127.0.0.1, ::1 (leaf only)
  client.pem, client.key  client certificate, CN=$cn (for tls.client_ca / mutual TLS)

Try it:
  herald --tls-listen 127.0.0.1:8883 --tls-cert $out/server.pem --tls-key $out/server.key
  mosquitto_sub -h localhost -p 8883 --cafile $out/ca.pem -i $cn -q 1 -t push/$cn
  mosquitto_pub -h localhost -p 8883 --cafile $out/ca.pem -q 1 -t push/$cn -m hello

Mutual TLS: set tls.client_ca = "$out/ca.pem" in herald's config and add
  --cert $out/client.pem --key $out/client.key
to the mosquitto commands (with tls.identity = "cert" the client id must be $cn).
EOF
