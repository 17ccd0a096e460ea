#!/usr/bin/env bash
# Soak test (not run in CI): SOAK_SECONDS (default 300) of mixed load through the balancer
# while a proxy is killed (-9) every 30 s and restarted 5 s later on its port. Every 5 s it
# samples each service's RSS and open file descriptors. At the end it prints the samples
# and, for each service, the growth between the first sample after the warm-up (60 s) and the
# last one. Everything runs on free ports and is stopped at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(cd "$ROOT" && realpath -m "${CARGO_TARGET_DIR:-target}")/release" # cargo's target dir, relative to the root
SOAK_SECONDS="${SOAK_SECONDS:-300}"
WARMUP=60
OUT="${SOAK_OUT:-$ROOT/.soak}"
mkdir -p "$OUT"
(cd "$ROOT" && cargo build --release --quiet --bin origin --bin proxy --bin balancer --bin client)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A PID
ALL=()
cleanup() { for pid in "${ALL[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_up() { for _ in $(seq 100); do "$BIN/client" --port "$1" --health --timeout-ms 200 >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "soak: port $1 did not come up" >&2; exit 1; }

ORIGIN=$(free_port); LB=$(free_port); PORTS=("$(free_port)" "$(free_port)" "$(free_port)")
"$BIN/origin" --port "$ORIGIN" --data-dir "$ROOT/origin/data" --synthetic-keys 20000 --latency-ms 5 --log-level warn \
    > "$OUT/origin.log" 2>&1 &
PID[origin]=$!; ALL+=($!)
wait_up "$ORIGIN"
start_proxy() { # index
    "$BIN/proxy" --port "${PORTS[$1]}" --origin-port "$ORIGIN" --cache-type ttl --ttl 5 --capacity 5000 \
        --stale-if-error 10 --log-level warn >> "$OUT/proxy$1.log" 2>&1 &
    PID[proxy$1]=$!; ALL+=($!)
}
for i in 0 1 2; do start_proxy "$i"; done
for i in 0 1 2; do wait_up "${PORTS[$i]}"; done
"$BIN/balancer" --port "$LB" --strategy consistent_hash --log-level warn \
    --proxies "127.0.0.1:${PORTS[0]}" "127.0.0.1:${PORTS[1]}" "127.0.0.1:${PORTS[2]}" > "$OUT/balancer.log" 2>&1 &
PID[balancer]=$!; ALL+=($!)
wait_up "$LB"

# Mixed load: a skewed pipelined stream and a uniform one.
"$BIN/client" --port "$LB" bench --connections 32 --pipeline 4 --duration "$SOAK_SECONDS" --warmup 0 \
    --keys 20000 --dist zipf:0.99 --json > "$OUT/load-zipf.json" 2> /dev/null & LOADS=($!); ALL+=($!)
"$BIN/client" --port "$LB" bench --connections 16 --duration "$SOAK_SECONDS" --warmup 0 --keys 20000 \
    --dist uniform --json > "$OUT/load-uniform.json" 2> /dev/null & LOADS+=($!); ALL+=($!)

sample() { # service -> "rss_kib fds"
    local pid="${PID[$1]}"
    local rss fds
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
    echo "$rss $fds"
}

SERVICES=(origin proxy0 proxy1 proxy2 balancer)
echo "t_s $(for s in "${SERVICES[@]}"; do printf '%s_rss_kib %s_fds ' "$s" "$s"; done)" > "$OUT/samples.txt"
start=$SECONDS
victim=0
killed_at=-1
next_kill=30
kills=0
while (( SECONDS - start < SOAK_SECONDS )); do
    t=$((SECONDS - start))
    if (( t >= next_kill && killed_at < 0 )); then
        kill -KILL "${PID[proxy$victim]}" 2>/dev/null || true
        killed_at=$t
        next_kill=$((next_kill + 30))
        kills=$((kills + 1))
    fi
    if (( killed_at >= 0 && t - killed_at >= 5 )); then
        start_proxy "$victim"
        victim=$(((victim + 1) % 3))
        killed_at=-1
    fi
    line="$t"
    for s in "${SERVICES[@]}"; do line="$line $(sample "$s")"; done
    echo "$line" >> "$OUT/samples.txt"
    sleep 5
done
wait "${LOADS[@]}" 2>/dev/null || true

echo "proxies killed (-9) and restarted: $kills"
echo "samples (every 5 s; proxies are killed and restarted in turn, so their figures restart):"
column -t "$OUT/samples.txt"
echo
python3 - "$OUT" "$WARMUP" <<'PY'
import json, sys
out, warmup = sys.argv[1], int(sys.argv[2])
rows = [l.split() for l in open(f"{out}/samples.txt")]
head, rows = rows[0], [list(map(int, r)) for r in rows[1:]]
after = [r for r in rows if r[0] >= warmup]
for col, name in enumerate(head[1:], start=1):
    if name.startswith(("origin", "balancer")):
        first, last, peak = after[0][col], after[-1][col], max(r[col] for r in after)
        print(f"{name:>20}: after warm-up {first} -> {last} (peak {peak}), growth {last - first}")
for kind in ("zipf", "uniform"):
    r = json.load(open(f"{out}/load-{kind}.json"))
    print(f"load {kind}: {r['requests']} answers, {round(r['throughput_rps'])} req/s, statuses {r['statuses']}, "
          f"connection errors {r['connection_errors']}, p99 {r['latency_us']['p99']} us")
PY
