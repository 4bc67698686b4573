#!/usr/bin/env bash
# The body of `make test` (which first runs scripts/deps.sh and builds the release binary):
#   1. cargo test --no-fail-fast: unit and integration tests (tests/), every test binary even
#      after a failure, output shown as it runs; the integration tests' brokers use the memory
#      store;
#   2. the behavioural test binaries (REDIS_PASS_TESTS) again with HERALD_TEST_STORE=redis:
#      each test's broker uses the Redis store, on a private redis-server the test starts
#      (tests/common/mod.rs);
#   3. the same behavioural binaries with HERALD_TEST_TRANSPORT=tls: each test's broker
#      listens on TLS only and the tests' clients speak TLS (tests/common/pki.rs makes the
#      certificates);
#   4. behavioural binaries (RCLUSTER_PASS_TESTS) with HERALD_TEST_STORE=redis-cluster: each test's broker
#      uses the Redis store on a private Redis Cluster (3 primaries, 3 replicas,
#      tests/common/redis_cluster.rs);
#   5. interop/run.sh against HERALD (default target/release/herald): third-party clients;
#   6. scripts/bench.sh --smoke --no-build: the benchmark tool still works (one test).
# Ends with `total: N passed, N failed` over all six; exits non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
HERALD=${HERALD:-target/release/herald}
# The test binaries (tests/*.rs) whose brokers come from tests/common's `start`, i.e. all but
# cli (the binary's flags) and redis_durability (Redis store only, already in pass 1).
REDIS_PASS_TESTS=${REDIS_PASS_TESTS:-sessions push publish subscribe will connect limits malformed http_api http_broadcast http_receipts}
# The Redis Cluster pass: the same binaries on a Redis Cluster store.
RCLUSTER_PASS_TESTS=${RCLUSTER_PASS_TESTS:-$REDIS_PASS_TESTS}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Sums the "test result: ok. 12 passed; 0 failed; 0 ignored; ..." lines of a cargo test log.
count_cargo() {
    awk '
    /^test result: / { for (i = 1; i <= NF; i++) {
        if ($(i + 1) ~ /^passed;/) p += $i; if ($(i + 1) ~ /^failed;/) f += $i } }
    END { print p + 0, f + 0 }' "$1"
}

echo "=== cargo test"
"$CARGO" test --no-fail-fast 2>&1 | tee "$log"
cargo_rc=${PIPESTATUS[0]}
read -r cargo_passed cargo_failed < <(count_cargo "$log")
if [ "$cargo_rc" -ne 0 ] && [ "$cargo_failed" -eq 0 ]; then
    cargo_failed=1 # it did not build, or a test binary crashed: count that as a failure
fi

echo "=== cargo test, Redis store (HERALD_TEST_STORE=redis: $REDIS_PASS_TESTS)"
redis_args=()
for t in $REDIS_PASS_TESTS; do redis_args+=(--test "$t"); done
HERALD_TEST_STORE=redis "$CARGO" test --no-fail-fast "${redis_args[@]}" 2>&1 | tee "$log"
redis_rc=${PIPESTATUS[0]}
read -r redis_passed redis_failed < <(count_cargo "$log")
if [ "$redis_rc" -ne 0 ] && [ "$redis_failed" -eq 0 ]; then
    redis_failed=1
fi
# Checks that do not apply to the Redis store print one such line each (with the reason).
redis_skipped=$(grep -o 'SKIPPED under HERALD_TEST_STORE=redis' "$log" | wc -l)

echo "=== cargo test, over TLS (HERALD_TEST_TRANSPORT=tls: $REDIS_PASS_TESTS)"
HERALD_TEST_TRANSPORT=tls "$CARGO" test --no-fail-fast "${redis_args[@]}" 2>&1 | tee "$log"
tls_rc=${PIPESTATUS[0]}
read -r tls_passed tls_failed < <(count_cargo "$log")
if [ "$tls_rc" -ne 0 ] && [ "$tls_failed" -eq 0 ]; then
    tls_failed=1
fi

echo "=== cargo test, Redis Cluster store (HERALD_TEST_STORE=redis-cluster: $RCLUSTER_PASS_TESTS)"
# One Redis Cluster (3 primaries, 3 replicas) per test: two tests at a time keep the 2-core
# machine from timing out the clusters' own failure detection.
rcluster_args=()
for t in $RCLUSTER_PASS_TESTS; do rcluster_args+=(--test "$t"); done
HERALD_TEST_STORE=redis-cluster "$CARGO" test --no-fail-fast "${rcluster_args[@]}" -- --test-threads 2 2>&1 | tee "$log"
rcluster_rc=${PIPESTATUS[0]}
read -r rcluster_passed rcluster_failed < <(count_cargo "$log")
if [ "$rcluster_rc" -ne 0 ] && [ "$rcluster_failed" -eq 0 ]; then
    rcluster_failed=1
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
echo "cargo test, Redis store (exit $redis_rc): $redis_passed passed; $redis_failed failed;" \
    "$redis_skipped check(s) skipped under Redis (SKIPPED lines above give the reasons)"
echo "cargo test, over TLS (exit $tls_rc): $tls_passed passed; $tls_failed failed"
echo "cargo test, Redis Cluster store (exit $rcluster_rc): $rcluster_passed passed; $rcluster_failed failed"
echo "interop (exit $interop_rc): $interop_passed passed; $interop_failed failed"
echo "bench smoke (exit $bench_rc): $bench_passed passed; $bench_failed failed"
echo "total: $((cargo_passed + redis_passed + tls_passed + rcluster_passed + interop_passed + bench_passed)) passed, $((cargo_failed + redis_failed + tls_failed + rcluster_failed + interop_failed + bench_failed)) failed"
[ "$cargo_rc" -eq 0 ] && [ "$redis_rc" -eq 0 ] && [ "$tls_rc" -eq 0 ] && [ "$rcluster_rc" -eq 0 ] && [ "$interop_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
