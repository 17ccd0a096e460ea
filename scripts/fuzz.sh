#!/usr/bin/env bash
# Fuzzes request parsing, line framing and the balancer's answer relay with cargo-fuzz
# (libFuzzer) for FUZZ_SECONDS each (default 60). Not part of CI. Installs cargo-fuzz from
# crates.io if it is missing; the stable toolchain is used with RUSTC_BOOTSTRAP=1, since
# cargo-fuzz needs a nightly flag (-Zsanitizer). Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
TARGETS="${TARGETS:-parse_request framing relay}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$ROOT"
for target in $TARGETS; do
    echo "== $target for ${FUZZ_SECONDS}s"
    RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz "$target" -- \
        -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 2>&1 \
        | grep -E 'stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs|ERROR|SUMMARY|panicked|crash-' || true
done
