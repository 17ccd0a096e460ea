#!/usr/bin/env bash
# What a relay pays per large answer, by how it moves the bytes: client/examples/relay.rs in
# its four modes (copy, copy-checked, splice-checked, splice; see that file) between the
# generator and one lru proxy whose every key is warm. Runs alternate between the modes.
# Servers (origin, proxy, relay) pinned to CPU 0, the generator to CPU 1. Reports req/s and
# the relay's own CPU time per answer (utime + stime from /proc/PID/stat over the run).
#
#   VALUE_SIZES ("65536 524288")  value bytes
#   CONNECTIONS ("1 16")          connections per point (pipeline 1; one relay pair each)
#   MODES ("copy-checked splice-checked splice")
#   DURATION (3) REPS (3)         seconds per run, runs per point (medians quoted)
#   KEYS (200)
#
# Needs: taskset, python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
VALUE_SIZES="${VALUE_SIZES:-65536 524288}"
CONNECTIONS="${CONNECTIONS:-1 16}"
MODES="${MODES:-copy-checked splice-checked splice}"
DURATION="${DURATION:-3}"
REPS="${REPS:-3}"
KEYS="${KEYS:-200}"
SERVER_CPU="${SERVER_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"

for tool in taskset python3; do
    command -v "$tool" >/dev/null || { echo "bench_relay_modes: $tool is needed" >&2; exit 1; }
done
echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release --quiet --bin origin --bin proxy --bin client --example relay)

NAME=bench_relay_modes
source "$ROOT/scripts/bench_common.sh"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

echo "# relay modes with large values — $(date -u +%Y-%m-%dT%H:%MZ)"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "# servers on CPU $SERVER_CPU, generator on CPU $LOAD_CPU; ${DURATION}s runs, medians of $REPS; $KEYS keys, all hits"
TICK_US=$((1000000 / $(getconf CLK_TCK)))

for bytes in $VALUE_SIZES; do
    ORIGIN=$(free_port); PROXY=$(free_port)
    serve "$BIN/origin" --port "$ORIGIN" --synthetic-keys "$KEYS" --value-bytes "$bytes" --log-level warn
    wait_port "$ORIGIN"
    serve "$BIN/proxy" --port "$PROXY" --origin-port "$ORIGIN" --cache-type lru --log-level warn
    wait_port "$PROXY"
    load "$PROXY" --connections 4 --requests $((KEYS * 4)) --keys "$KEYS" --warmup 0 > /dev/null
    declare -A relay_port=() relay_pid=()
    for mode in $MODES; do
        relay_port[$mode]=$(free_port)
        serve "$BIN/examples/relay" "127.0.0.1:${relay_port[$mode]}" "127.0.0.1:$PROXY" "$mode"
        relay_pid[$mode]=$LAST_PID
        wait_port "${relay_port[$mode]}"
    done
    echo
    echo "## values of $bytes bytes"
    echo
    echo "| connections | mode | req/s | p50 us | relay CPU us per answer | errors |"
    echo "| --- | --- | --- | --- | --- | --- |"
    for c in $CONNECTIONS; do
        declare -A runs=()
        for _ in $(seq "$REPS"); do
            for mode in $MODES; do
                before=$(cpu_ticks "${relay_pid[$mode]}")
                load "${relay_port[$mode]}" --connections "$c" --duration "$DURATION" --warmup 0 --keys "$KEYS" > "$WORK/run.json"
                after=$(cpu_ticks "${relay_pid[$mode]}")
                runs[$mode]+="$(python3 - "$WORK/run.json" $((after - before)) "$TICK_US" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
answers = max(1, r["requests"])
print(round(r["throughput_rps"]), r["latency_us"]["p50"], round(int(sys.argv[2]) * int(sys.argv[3]) / answers, 1), r["errors"])
PY
)"$'\n'
            done
        done
        for mode in $MODES; do
            col() { printf '%s' "${runs[$mode]}" | awk -v i="$1" 'NF {print $i}' | median; }
            errors=$(printf '%s' "${runs[$mode]}" | awk 'NF {s += $4} END {print s}')
            echo "| $c | $mode | $(col 1) | $(col 2) | $(col 3) | $errors |"
        done
    done
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
done
