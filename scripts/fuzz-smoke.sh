#!/bin/bash
# Fuzz smoke run (CI, and before sending a change to a guest-facing parser):
# builds the cargo-fuzz targets in fuzz/ and runs each for SECONDS (default
# 60) from its committed seed corpus. Fails on a crash, a leak, a timeout or
# running out of memory; the input is then in fuzz/artifacts/<target>/.
# Fix the bug and commit that input to fuzz/regressions/<target>/, where a
# plain `cargo test` replays it (tests/fuzz_regressions.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz builds with AddressSanitizer (-Zsanitizer=address): a nightly
# flag, which the stable toolchain accepts with RUSTC_BOOTSTRAP=1. The
# targets are then built by the same compiler as everything else.
export RUSTC_BOOTSTRAP=1

start=$(date +%s)
nice -n 19 cargo fuzz build --fuzz-dir fuzz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in $(cargo fuzz list --fuzz-dir fuzz); do
    echo "fuzz-smoke: $t for ${secs}s"
    # New inputs go to a scratch corpus; the committed one stays the seeds.
    mkdir -p "$work/$t"
    log="$work/$t.log"
    if ! nice -n 19 cargo fuzz run --fuzz-dir fuzz "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 80 "$log" >&2
        echo "fuzz-smoke: $t found something; its input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" || true
done
echo "fuzz-smoke: all targets ran ${secs}s each without a finding ($(($(date +%s) - start))s in all)"
