#!/usr/bin/env bash
# The body of `make test` (which first runs scripts/deps.sh and builds the release binary):
#   1. cargo test --no-fail-fast: unit and integration tests (tests/), every test binary even
#      after a failure, output shown as it runs;
#   2. interop/run.sh against HERALD (default target/release/herald): third-party clients;
#   3. scripts/bench.sh --smoke --no-build: the benchmark tool still works (one test).
# Ends with `total: N passed, N failed` over all three; exits non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
HERALD=${HERALD:-target/release/herald}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "=== cargo test"
"$CARGO" test --no-fail-fast 2>&1 | tee "$log"
cargo_rc=${PIPESTATUS[0]}
# Lines like "test result: ok. 12 passed; 0 failed; 0 ignored; ..."
read -r cargo_passed cargo_failed < <(awk '
    /^test result: / { for (i = 1; i <= NF; i++) {
        if ($(i + 1) ~ /^passed;/) p += $i; if ($(i + 1) ~ /^failed;/) f += $i } }
    END { print p + 0, f + 0 }' "$log")
if [ "$cargo_rc" -ne 0 ] && [ "$cargo_failed" -eq 0 ]; then
    cargo_failed=1 # it did not build, or a test binary crashed: count that as a failure
fi

echo "=== interop ($HERALD)"
bash interop/run.sh "$HERALD" 2>&1 | tee "$log"
interop_rc=${PIPESTATUS[0]}
read -r interop_passed interop_failed < <(awk '
    /^[0-9]+ passed, [0-9]+ failed$/ { p = $1; f = $3 } END { print p + 0, f + 0 }' "$log")
if [ "$interop_rc" -ne 0 ] && [ "$interop_failed" -eq 0 ]; then
    interop_failed=1
fi

bench_rc=0
bench_passed=0
bench_failed=0
if [ -f scripts/bench.sh ]; then
    echo "=== bench smoke"
    bash scripts/bench.sh --smoke --no-build </dev/null
    bench_rc=$?
    if [ "$bench_rc" -eq 0 ]; then bench_passed=1; else bench_failed=1; fi
fi

echo "=== summary"
echo "cargo test (exit $cargo_rc): $cargo_passed passed; $cargo_failed failed"
echo "interop (exit $interop_rc): $interop_passed passed; $interop_failed failed"
echo "bench smoke (exit $bench_rc): $bench_passed passed; $bench_failed failed"
echo "total: $((cargo_passed + interop_passed + bench_passed)) passed, $((cargo_failed + interop_failed + bench_failed)) failed"
[ "$cargo_rc" -eq 0 ] && [ "$interop_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
