#!/usr/bin/env bash
# What a relay pays per large answer, by how it moves the bytes: client/examples/relay.rs in
# its four modes (copy, copy-checked, splice-checked, splice; see that file) between the
# generator and one lru proxy whose every key is warm. `copy` is the baseline scripts/bench.sh
# measures (W1); it reads 64 KiB per call, the other modes up to 1 MiB. Runs alternate
# between the modes. A relay's log is printed on stderr when it exits abnormally or a run
# through it reports errors.
# Servers (origin, proxy, relay) pinned to CPU 0, the generator to CPU 1. Reports req/s and
# the relay's own CPU time per answer (utime + stime from /proc/PID/stat over the run).
#
#   VALUE_SIZES ("65536 524288")  value bytes
#   CONNECTIONS ("1 16")          connections per point (pipeline 1; one relay pair each)
#   MODES ("copy copy-checked splice-checked splice")
#   DURATION (3) REPS (3)         seconds per run, runs per point (medians quoted)
#   KEYS (200)
#
# Needs: taskset, python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
VALUE_SIZES="${VALUE_SIZES:-65536 524288}"
CONNECTIONS="${CONNECTIONS:-1 16}"
MODES="${MODES:-copy copy-checked splice-checked splice}"
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

# The relays are started here rather than with serve so that each one's log has a known name:
# it is shown (the logs go with $WORK at exit) when the relay died, exited other than by our
# SIGTERM, or a run through it reported errors.
declare -A relay_port=() relay_pid=() relay_log=()
start_relay() { # mode
    relay_port[$1]=$(free_port)
    relay_log[$1]="$WORK/relay.$1.$bytes.log"
    taskset -c "$SERVER_CPU" "$BIN/examples/relay" "127.0.0.1:${relay_port[$1]}" "127.0.0.1:$PROXY" "$1" \
        > "${relay_log[$1]}" 2>&1 &
    relay_pid[$1]=$!
    PIDS+=($!)
}
show_relay_log() { # mode why
    echo "$NAME: the $1 relay $2; its log:" >&2
    sed 's/^/    /' "${relay_log[$1]}" >&2 || true
}
# Whether the relay is still running (a process that died but is not reaped yet is a zombie).
relay_up() { [[ "$(awk '{print $3}' "/proc/${relay_pid[$1]}/stat" 2>/dev/null)" =~ ^[^Z]$ ]]; }
relay_gone() { # mode: stops the benchmark on a relay that is gone, after showing its log
    local status=0
    wait "${relay_pid[$1]}" || status=$?
    show_relay_log "$1" "exited with status $status while in use"
    exit 1
}
# A relay start that fails (say a panic) is reported with its log rather than just as a port
# that did not come up.
wait_relay() { # mode
    for _ in $(seq 200); do
        relay_up "$1" || relay_gone "$1"
        (exec 3<>"/dev/tcp/127.0.0.1/${relay_port[$1]}") 2>/dev/null && return 0
        sleep 0.05
    done
    show_relay_log "$1" "did not listen on port ${relay_port[$1]}"
    exit 1
}

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
    relay_port=() relay_pid=() relay_log=()
    for mode in $MODES; do
        start_relay "$mode"
        wait_relay "$mode"
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
                relay_up "$mode" || relay_gone "$mode"
                before=$(cpu_ticks "${relay_pid[$mode]}")
                if ! load "${relay_port[$mode]}" --connections "$c" --duration "$DURATION" --warmup 0 --keys "$KEYS" > "$WORK/run.json"; then
                    relay_up "$mode" || relay_gone "$mode"
                    show_relay_log "$mode" "is up, but the load generator failed through it"
                    exit 1
                fi
                relay_up "$mode" || relay_gone "$mode"
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
            [ "$errors" -eq 0 ] || show_relay_log "$mode" "relayed runs with $errors errors ($c connections, $bytes-byte values)"
        done
    done
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for mode in $MODES; do # 143: ended by the SIGTERM just sent
        status=0
        wait "${relay_pid[$mode]}" || status=$?
        [ "$status" -eq 143 ] || show_relay_log "$mode" "exited with status $status when stopped"
    done
    wait 2>/dev/null || true
    PIDS=()
done
