#!/usr/bin/env bash
# `make fuzz`: runs each cargo-fuzz target in fuzz/ for a bounded time, one at a time, at the
# lowest CPU priority, then prints executions, coverage and crashes per target.
#
#   FUZZ_SECONDS=60        seconds per target (libFuzzer -max_total_time)
#   FUZZ_TARGETS="..."     which targets (default: all three)
#
# New inputs go to fuzz/corpus-work/<target> (git-ignored); the committed seeds in
# fuzz/corpus/<target> are read but not written. Crashes land in fuzz/artifacts/<target>/,
# logs in fuzz/logs/<target>.log. Exits 1 if any target crashed (or failed to run).
# Needs the nightly toolchain (cargo +nightly); installs cargo-fuzz if it is missing.
set -uo pipefail

cd "$(dirname "$0")/../fuzz"
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TARGETS=${FUZZ_TARGETS:-codec_decode codec_roundtrip session}
CARGO=${CARGO:-cargo}

if ! $CARGO +nightly --version >/dev/null 2>&1; then
    echo "fuzz: needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! $CARGO fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    nice -n 19 $CARGO install cargo-fuzz --locked || exit 1
fi

nice -n 19 $CARGO +nightly fuzz build || exit 1

mkdir -p logs
failed=0
summary=()
for t in $FUZZ_TARGETS; do
    mkdir -p "corpus-work/$t" "corpus/$t"
    log="logs/$t.log"
    echo "fuzz: $t for ${FUZZ_SECONDS}s (log: fuzz/$log)"
    # -timeout: one input running 10 s is a hang worth a report, not a slow machine.
    nice -n 19 $CARGO +nightly fuzz run "$t" "corpus-work/$t" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    # libFuzzer's last status line: "#N DONE cov: C ft: F corp: K/S ..." (or the last pulse).
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$')
    cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | grep -oE '[0-9]+')
    ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | grep -oE '[0-9]+')
    corp=$(grep -oE 'corp: [0-9]+/[0-9A-Za-z]+' <<<"$last" | cut -d' ' -f2)
    crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    line="$t: execs=${execs:-?} cov=${cov:-?} ft=${ft:-?} corpus=${corp:-?} artifacts=$crashes exit=$rc"
    echo "fuzz: $line"
    summary+=("$line")
    if [ "$rc" -ne 0 ]; then
        failed=1
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -5
    fi
done

echo "fuzz: summary"
printf '  %s\n' "${summary[@]}"
exit $failed
