#!/usr/bin/env bash
# Fuzzes with cargo-fuzz (libFuzzer) for FUZZ_SECONDS each (default 60): request parsing,
# line framing and the balancer's answer relay, and whole services in process (origin with
# arbitrary client bytes; proxy with arbitrary client and origin bytes; balancer with
# arbitrary client and proxy bytes). Not part of CI. Installs cargo-fuzz from crates.io if it
# is missing; the stable toolchain is used with RUSTC_BOOTSTRAP=1, since cargo-fuzz needs a
# nightly flag (-Zsanitizer).
#
# Exits non-zero when a target fails to build or finds a crash (a panic, a hang past the
# harness's limit, an answer that breaks the protocol). Crashes land in
# fuzz/artifacts/<target>/; keep each as a regression test (balancer/tests/bad_input.rs).
# Each target's executions are printed and written to fuzz/stats.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
TARGETS="${TARGETS:-parse_request framing relay origin_service proxy_service balancer_service}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$ROOT"
mkdir -p fuzz/logs
: > fuzz/stats.txt

if ! RUSTC_BOOTSTRAP=1 cargo fuzz build --fuzz-dir fuzz; then
    echo "fuzz: the targets failed to build" >&2
    exit 1
fi

failed=()
for target in $TARGETS; do
    echo "== $target for ${FUZZ_SECONDS}s"
    log="fuzz/logs/$target.log"
    status=0
    extra=()
    # The service targets run peer threads (one per connection); LeakSanitizer reports
    # glibc's per-thread destructor records as leaks, which are the harness's, not the code's.
    [[ "$target" == *_service ]] && extra+=(-detect_leaks=0)
    RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz "$target" -- \
        -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 -timeout=30 "${extra[@]}" > "$log" 2>&1 || status=$?
    runs="$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)"
    rss="$(grep -oE 'stat::peak_rss_mb: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)"
    echo "$target executions=${runs:-?} peak_rss_mb=${rss:-?} exit=$status" | tee -a fuzz/stats.txt
    if [[ $status -ne 0 ]]; then
        grep -E 'panicked|ERROR|SUMMARY|crash-|timeout-|oom-' "$log" | head -n 20 >&2 || true
        failed+=("$target")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz: crashes or failures in: ${failed[*]} (inputs in fuzz/artifacts/, logs in fuzz/logs/)" >&2
    exit 1
fi
echo "fuzz: no crashes"
