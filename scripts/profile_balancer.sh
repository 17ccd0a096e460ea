#!/usr/bin/env bash
# Instructions per GET through the balancer (BENCHMARKS.md "Profile of the hit path"): the
# balancer under callgrind in front of one proxy and origin, 5,000 warm-up hits, counters
# zeroed, 25,000 measured hits, then the top self costs. Repeatable under load (it counts
# instructions, not time).
#
#   scripts/profile_balancer.sh [BINDIR] [OUTDIR]    (default: target/release, a temp dir)
#
# BINDIR holds origin, proxy and balancer (build them with `cargo build --release`); the load
# generator is this tree's target/release/client.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
OUT=${2:-$(mktemp -d)}
mkdir -p "$OUT"
CLIENT=target/release/client
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OP=$(port); PP=$(port); LP=$(port)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
"$BIN/origin" --port "$OP" --synthetic-keys 100 --data-dir origin/data >"$OUT/origin.log" 2>&1 & PIDS+=($!)
"$BIN/proxy" --port "$PP" --origin-port "$OP" >"$OUT/proxy.log" 2>&1 & PIDS+=($!)
valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" "$BIN/balancer" --port "$LP" \
    --proxies "127.0.0.1:$PP" >"$OUT/balancer.log" 2>"$OUT/valgrind.log" & LB=$!
PIDS+=("$LB")
for _ in $(seq 1 150); do grep -q listening "$OUT/balancer.log" && break; sleep 0.2; done
# Let the first probes find out that the proxy multiplexes.
for _ in $(seq 1 50); do
    "$CLIENT" --port "$LP" --metrics 2>/dev/null | grep -q '"multiplexed": *true' && break; sleep 0.2
done
"$CLIENT" --port "$LP" bench --connections 16 --requests 5000 --keys 100 --warmup 0 >/dev/null
callgrind_control -z "$LB" >/dev/null
"$CLIENT" --port "$LP" bench --connections 16 --requests 25000 --keys 100 --warmup 0 | tail -4
callgrind_control -d "$LB" >/dev/null
total=$(grep -h '^summary:' "$OUT"/cg.out.* | head -1 | awk '{print $2}')
echo "balancer: $total Ir for 25,000 GETs = $((total / 25000)) Ir per GET ($OUT)"
callgrind_annotate --inclusive=no --threshold=100 "$(ls "$OUT"/cg.out.* | head -1)" 2>/dev/null \
    | grep -E '^ *[0-9,]+ \(' | grep -v '(100.0%)' | head -25
