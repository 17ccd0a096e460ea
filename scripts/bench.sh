#!/usr/bin/env bash
# Hit-path benchmark (W1): its own cluster on free ports (origin with 1000 synthetic keys of
# 200 bytes, 3 lru proxies, the balancer), all keys warm, uniform GETs through the balancer
# at 1, 16 and 64 connections, each point 3 times; medians reported.
#
# Servers run pinned to CPU 0 and the load generator to CPU 1 (taskset), so that figures are
# comparable between runs. Settings: DURATION (seconds per point, default 10), STRATEGY
# (default round_robin), POINTS (default "1 16 64").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
DURATION="${DURATION:-10}"
STRATEGY="${STRATEGY:-round_robin}"
POINTS="${POINTS:-1 16 64}"
SERVER_CPU="${SERVER_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"

(cd "$ROOT" && cargo build --release --quiet --bin origin --bin proxy --bin balancer --bin client)
command -v taskset >/dev/null || { echo "bench: taskset (util-linux) is needed" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

serve() { taskset -c "$SERVER_CPU" "$@" --log-level warn > /dev/null 2>&1 & PIDS+=($!); }
wait_up() { for _ in $(seq 100); do "$BIN/client" --port "$1" --health --timeout-ms 200 >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "bench: port $1 did not come up" >&2; exit 1; }

ORIGIN=$(free_port); P1=$(free_port); P2=$(free_port); P3=$(free_port); LB=$(free_port)
serve "$BIN/origin" --port "$ORIGIN" --synthetic-keys 1000 --value-bytes 200 --data-dir "$ROOT/origin/data"
wait_up "$ORIGIN"
for p in $P1 $P2 $P3; do serve "$BIN/proxy" --port "$p" --origin-port "$ORIGIN" --cache-type lru; done
for p in $P1 $P2 $P3; do wait_up "$p"; done
serve "$BIN/balancer" --port "$LB" --strategy "$STRATEGY" --proxies "127.0.0.1:$P1" "127.0.0.1:$P2" "127.0.0.1:$P3"
wait_up "$LB"

# Warm every key on every proxy.
for p in $P1 $P2 $P3; do
    "$BIN/client" --port "$p" bench --connections 4 --requests 20000 --keys 1000 --warmup 0 --json > /dev/null 2>&1
done

run_point() { # connections pipeline -> "rps p50 p99"
    taskset -c "$LOAD_CPU" "$BIN/client" --port "$LB" bench --connections "$1" --pipeline "$2" \
        --duration "$DURATION" --warmup 1 --keys 1000 --json 2>/dev/null \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["throughput_rps"]), r["latency_us"]["p50"], r["latency_us"]["p99"], r["errors"])'
}
median() { sort -n | sed -n 2p; }

echo "W1 hit path through balancer ($STRATEGY) and 3 proxies; servers on CPU $SERVER_CPU, load on CPU $LOAD_CPU; ${DURATION}s per run, median of 3"
printf '%-12s %-10s %12s %10s %10s %8s\n' connections pipeline "req/s" "p50 us" "p99 us" errors
for c in $POINTS; do
    results=$(for _ in 1 2 3; do run_point "$c" 1; done)
    rps=$(echo "$results" | awk '{print $1}' | median)
    p50=$(echo "$results" | awk '{print $2}' | median)
    p99=$(echo "$results" | awk '{print $3}' | median)
    errors=$(echo "$results" | awk '{s+=$4} END {print s}')
    printf '%-12s %-10s %12s %10s %10s %8s\n' "$c" 1 "$rps" "$p50" "$p99" "$errors"
done
