#!/usr/bin/env bash
# `client bench` through one balancer process, then through several sharing one port with
# --reuse-port (SO_REUSEPORT: the kernel spreads new connections over them), over the same
# origin and 3 lru proxies, all keys warm. Nothing is pinned to a CPU: this is how a user runs
# one balancer process per core.
#
#   ./scripts/bench_reuseport.sh
#
# Settings: DURATION (s per run, 10), PROCESSES ("1 2": balancer processes per run),
# CONNECTIONS (64), PIPELINE (1). Starts everything on free ports and stops it all on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(cd "$ROOT" && realpath -m "${CARGO_TARGET_DIR:-target}")/release" # cargo's target dir, relative to the root
DURATION="${DURATION:-10}"
PROCESSES="${PROCESSES:-1 2}"
CONNECTIONS="${CONNECTIONS:-64}"
PIPELINE="${PIPELINE:-1}"

command -v python3 >/dev/null || { echo "bench_reuseport: python3 is needed" >&2; exit 1; }
echo "building release binaries (if needed)..." >&2
(cd "$ROOT" && cargo build --release --quiet --bin origin --bin proxy --bin balancer --bin client)

OUT="$(mktemp -d)"
PIDS=()
stop_pids() { (($#)) || return 0; kill -TERM "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; }
cleanup() { stop_pids "${PIDS[@]}"; PIDS=(); rm -rf "$OUT"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() {
    for _ in $(seq 200); do "$BIN/client" --port "$1" --health --timeout-ms 200 >/dev/null 2>&1 && return 0; sleep 0.05; done
    echo "bench_reuseport: nothing answers HEALTH on port $1" >&2
    exit 1
}
field() { python3 -c "import json,sys; r=json.load(sys.stdin); print($1)"; }

ORIGIN=$(free_port)
"$BIN/origin" --port "$ORIGIN" --data-dir "$ROOT/origin/data" --synthetic-keys 1000 --value-bytes 200 --log-level warn \
    >/dev/null 2>&1 & PIDS+=($!)
wait_up "$ORIGIN"
PROXIES=()
for _ in 1 2 3; do
    p=$(free_port)
    "$BIN/proxy" --port "$p" --origin-port "$ORIGIN" --cache-type lru --log-level warn >/dev/null 2>&1 & PIDS+=($!)
    PROXIES+=("127.0.0.1:$p")
done
for p in "${PROXIES[@]}"; do wait_up "${p##*:}"; done

echo "# --reuse-port: $CONNECTIONS connections x pipeline $PIPELINE, ${DURATION}s, unpinned, $(nproc) cores"
echo "| balancer processes | req/s | p50 us | p99 us | errors |"
echo "| --- | --- | --- | --- | --- |"
for n in $PROCESSES; do
    LB=$(free_port)
    balancers=()
    for i in $(seq "$n"); do
        "$BIN/balancer" --port "$LB" --reuse-port --strategy consistent_hash --log-level warn --proxies "${PROXIES[@]}" \
            >"$OUT/lb-$n-$i.out" 2>&1 & balancers+=($!); PIDS+=($!)
    done
    # Each process is ready once it has printed its `listening on` line.
    for i in $(seq "$n"); do
        for _ in $(seq 200); do grep -q '^listening on' "$OUT/lb-$n-$i.out" && break; sleep 0.05; done
        grep -q '^listening on' "$OUT/lb-$n-$i.out" || { echo "bench_reuseport: balancer $i of $n did not start:" >&2; cat "$OUT/lb-$n-$i.out" >&2; exit 1; }
    done
    "$BIN/client" --port "$LB" bench --connections 16 --requests 20000 --keys 1000 --warmup 0 >/dev/null # warm
    if ! json=$("$BIN/client" --port "$LB" bench --json --connections "$CONNECTIONS" --pipeline "$PIPELINE" \
        --duration "$DURATION" --warmup 1 --keys 1000 2>"$OUT/bench.err"); then
        echo "bench_reuseport: client bench failed with $n balancer processes:" >&2
        cat "$OUT/bench.err" >&2
        exit 1
    fi
    r=$(printf '%s' "$json" | field 'round(r["throughput_rps"]), r["latency_us"]["p50"], r["latency_us"]["p99"], r["errors"]')
    # shellcheck disable=SC2086
    printf '| %s | %s | %s | %s | %s |\n' "$n" $r
    stop_pids "${balancers[@]}"
    remaining=()
    for pid in "${PIDS[@]}"; do [[ " ${balancers[*]} " == *" $pid "* ]] || remaining+=("$pid"); done
    PIDS=("${remaining[@]}")
done
