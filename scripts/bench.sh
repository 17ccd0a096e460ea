#!/usr/bin/env bash
# The benchmark suite. Starts its own services on free ports; servers pinned to CPU 0, the
# load generator to CPU 1, so figures are comparable from run to run.
#
#   W1  hit path: all keys warm, uniform GETs through the balancer, 1, 16 and 64 connections
#   W2  pipelined: 64 connections x pipeline 16
#   W3  thundering herd: fresh cluster, origin --latency-ms 100, 500 concurrent GETs of one
#       cold key: origin fetches, and when the last answer came; per strategy
#   W4  hit ratio: Zipf(0.99) over 100,000 keys, 3 proxies of 10,000 entries; per strategy,
#       next to one LRU of 30,000 fed the same key sequence (computed by the bench)
#   W5  large values: 64 KiB values (origin --synthetic-keys 200 --value-bytes 65536), all
#       hits, through the balancer (round_robin) and 3 lru proxies, 1 and 16 connections
#   W6  the same with 512 KiB values
#   (W5/W6 next to twemproxy over 3 memcached, same generator: scripts/bench_vs_twemproxy.sh,
#   run at the end with TWEMPROXY=1.)
#
# W1 and W2 also run against a baseline in the same run, alternating with the cluster: a
# naive 2-hop relay (client/examples/relay.rs, one upstream connection per client, bytes
# copied) in front of a responder answering every line with a fixed 250-byte line.
#
# Settings: DURATION (s per W1/W2/W5/W6 run, 10), REPS (3), W4_DURATION (20),
# WORKLOADS ("W1 W2 W3 W4 W5 W6"), SERVER_CPU (0), LOAD_CPU (1); STRACE=1: W1/W5/W6 also count
# syscalls per answer (strace -c -f) at the balancer and one proxy over a bounded run;
# TWEMPROXY=1: then runs scripts/bench_vs_twemproxy.sh (needs nutcracker and memcached).
# LB_ARGS: extra balancer flags for every cluster (e.g. "--access-log /tmp/lb.log", to measure
# what the access log costs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(cd "$ROOT" && realpath -m "${CARGO_TARGET_DIR:-target}")/release" # cargo's target dir, relative to the root
DURATION="${DURATION:-10}"
REPS="${REPS:-3}"
W4_DURATION="${W4_DURATION:-20}"
WORKLOADS="${WORKLOADS:-W1 W2 W3 W4 W5 W6}"
STRACE="${STRACE:-0}"
TWEMPROXY="${TWEMPROXY:-0}"
SERVER_CPU="${SERVER_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"

command -v taskset >/dev/null || { echo "bench: taskset (util-linux) is needed" >&2; exit 1; }
command -v python3 >/dev/null || { echo "bench: python3 is needed to read the JSON results" >&2; exit 1; }
[[ "$STRACE" == 0 ]] || command -v strace >/dev/null || { echo "bench: strace is needed for STRACE=1" >&2; exit 1; }
echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release --quiet --bin origin --bin proxy --bin balancer --bin client \
    && cargo build --release --quiet -p client --examples)

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
serve() { taskset -c "$SERVER_CPU" "$@" > /dev/null 2>&1 & PIDS+=($!); LAST_PID=$!; }
wait_up() { # port [health]: until it accepts (and answers HEALTH unless told not to)
    for _ in $(seq 200); do
        if [[ "${2:-health}" == health ]]; then
            "$BIN/client" --port "$1" --health --timeout-ms 200 >/dev/null 2>&1 && return 0
        else
            (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        fi
        sleep 0.05
    done
    echo "bench: port $1 did not come up" >&2; exit 1
}
stop_all() { cleanup; PIDS=(); }

# cluster STRATEGY ORIGIN_ARGS PROXY_ARGS: starts origin, 3 proxies, balancer; sets ORIGIN, LB.
cluster() {
    local strategy="$1" origin_args="$2" proxy_args="$3" p ports=()
    ORIGIN=$(free_port); LB=$(free_port)
    # shellcheck disable=SC2086
    serve "$BIN/origin" --port "$ORIGIN" --data-dir "$ROOT/origin/data" --log-level warn $origin_args
    wait_up "$ORIGIN"
    for _ in 1 2 3; do
        p=$(free_port); ports+=("$p")
        # shellcheck disable=SC2086
        serve "$BIN/proxy" --port "$p" --origin-port "$ORIGIN" --log-level warn $proxy_args; PROXY_PID=$LAST_PID
    done
    for p in "${ports[@]}"; do wait_up "$p"; done
    # shellcheck disable=SC2086
    serve "$BIN/balancer" --port "$LB" --strategy "$strategy" --log-level warn ${LB_ARGS:-} \
        --proxies "127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" "127.0.0.1:${ports[2]}"; LB_PID=$LAST_PID
    wait_up "$LB"
    sleep 1.2 # the first probes and METRICS polls are done
}

# load PORT ARGS...: runs client bench pinned, prints its JSON.
load() { local port="$1"; shift; taskset -c "$LOAD_CPU" "$BIN/client" --port "$port" bench --json "$@" 2>/dev/null; }
field() { python3 -c "import json,sys; r=json.load(sys.stdin); print($1)"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# syscalls PID REQUESTS SHARE KEYS: strace -c of PID over a bounded run of REQUESTS GETs (16
# connections) through the balancer; prints the busiest syscalls per answer PID handled (SHARE:
# the fraction of answers that pass through it, 1/3 for one of 3 round_robin proxies).
syscalls() {
    local pid="$1" n="$2" share="$3" keys="$4" out
    out=$(mktemp)
    strace -c -f -p "$pid" -o "$out" 2>/dev/null & local tracer=$!
    sleep 0.5
    load "$LB" --connections 16 --requests "$n" --keys "$keys" --warmup 0 > /dev/null
    kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
    python3 - "$out" "$n" "$share" <<'EOF'
import sys
path, answers = sys.argv[1], max(1, round(int(sys.argv[2]) * float(sys.argv[3])))
calls = {}
for line in open(path):
    parts = line.split()
    if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
        try:
            calls[parts[-1]] = int(parts[3])
        except ValueError:
            pass
top = sorted(calls.items(), key=lambda kv: -kv[1])[:5]
print(", ".join(f"{name} {n / answers:.2f}" for name, n in top) + f" (mremap {calls.get('mremap', 0) / answers:.3f})")
EOF
    rm -f "$out"
}

echo "# cachetier benchmarks — $(date -u +%Y-%m-%dT%H:%MZ)"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "# servers on CPU $SERVER_CPU, load generator on CPU $LOAD_CPU; medians of $REPS runs"

if [[ "$WORKLOADS" == *W1* || "$WORKLOADS" == *W2* ]]; then
    cluster round_robin "--synthetic-keys 1000 --value-bytes 200" "--cache-type lru"
    CLUSTER_LB=$LB
    RESPONDER=$(free_port); RELAY=$(free_port)
    serve "$BIN/examples/responder" "127.0.0.1:$RESPONDER"; wait_up "$RESPONDER" raw
    serve "$BIN/examples/relay" "127.0.0.1:$RELAY" "127.0.0.1:$RESPONDER"; wait_up "$RELAY" raw
    load "$CLUSTER_LB" --connections 16 --requests 100000 --keys 1000 --warmup 0 > /dev/null # warm every key everywhere

    point() { # name connections pipeline
        local name="$1" c="$2" d="$3" cl=() bl=() r
        for _ in $(seq "$REPS"); do
            r=$(load "$CLUSTER_LB" --connections "$c" --pipeline "$d" --duration "$DURATION" --warmup 1 --keys 1000 \
                | field 'round(r["throughput_rps"]), r["latency_us"]["p50"], r["latency_us"]["p99"], r["errors"]')
            cl+=("$r")
            r=$(load "$RELAY" --connections "$c" --pipeline "$d" --duration "$DURATION" --warmup 1 --keys 1000 \
                | field 'round(r["throughput_rps"]), r["latency_us"]["p50"], r["latency_us"]["p99"], r["errors"]')
            bl+=("$r")
        done
        local crps cp50 cp99 cerr brps bp50 bp99
        crps=$(printf '%s\n' "${cl[@]}" | awk '{print $1}' | median)
        cp50=$(printf '%s\n' "${cl[@]}" | awk '{print $2}' | median)
        cp99=$(printf '%s\n' "${cl[@]}" | awk '{print $3}' | median)
        cerr=$(printf '%s\n' "${cl[@]}" | awk '{s+=$4} END {print s}')
        brps=$(printf '%s\n' "${bl[@]}" | awk '{print $1}' | median)
        bp50=$(printf '%s\n' "${bl[@]}" | awk '{print $2}' | median)
        bp99=$(printf '%s\n' "${bl[@]}" | awk '{print $3}' | median)
        printf '| %s | %s x %s | %s | %s | %s | %s | %s | %s | %s | %.2fx |\n' "$name" "$c" "$d" \
            "$crps" "$cp50" "$cp99" "$cerr" "$brps" "$bp50" "$bp99" "$(echo "$crps $brps" | awk '{print $1/$2}')"
    }
    echo
    echo "## W1/W2: hit path through the balancer (round_robin) and 3 lru proxies, vs the relay baseline (${DURATION}s runs)"
    echo
    echo "| workload | connections x pipeline | cluster req/s | p50 us | p99 us | errors | relay req/s | p50 us | p99 us | cluster/relay |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    if [[ "$WORKLOADS" == *W1* ]]; then
        for c in 1 16 64; do point W1 "$c" 1; done
    fi
    if [[ "$WORKLOADS" == *W2* ]]; then point W2 64 16; fi
    if [[ "$STRACE" != 0 ]]; then
        echo
        echo "W1 syscalls per answer (strace -c over 20,000 GETs, 16 connections; tracing slows the traced process):"
        echo "- balancer: $(syscalls "$LB_PID" 20000 1 1000)"
        echo "- one proxy: $(syscalls "$PROXY_PID" 20000 0.3333 1000)"
    fi
    stop_all
fi

if [[ "$WORKLOADS" == *W3* ]]; then
    echo
    echo "## W3: thundering herd — fresh cluster, origin --latency-ms 100, 500 concurrent GETs of one cold key"
    echo
    echo "| strategy | origin fetches | answered OK | last answer after (ms) |"
    echo "| --- | --- | --- | --- |"
    for strategy in round_robin least_loaded consistent_hash; do
        cluster "$strategy" "--synthetic-keys 10 --latency-ms 100" "--cache-type lru"
        r=$(load "$LB" --connections 500 --requests 500 --keys 1 --warmup 0 \
            | field 'r["statuses"].get("OK", 0), round(r["latency_us"]["max"] / 1000, 1)')
        fetches=$("$BIN/client" --port "$ORIGIN" --metrics | field 'r["data"]["ok"]')
        printf '| %s | %s | %s | %s |\n' "$strategy" "$fetches" "$(echo "$r" | awk '{print $1}')" "$(echo "$r" | awk '{print $2}')"
        stop_all
    done
fi

if [[ "$WORKLOADS" == *W4* ]]; then
    echo
    echo "## W4: hit ratio — Zipf(0.99) over 100,000 keys, 3 lru proxies of 10,000 entries (${W4_DURATION}s after 5s warm-up)"
    echo
    echo "| strategy | cluster hit ratio | one LRU of 30,000, same keys | ratio | req/s |"
    echo "| --- | --- | --- | --- | --- |"
    for strategy in round_robin least_loaded consistent_hash; do
        cluster "$strategy" "--synthetic-keys 100000 --value-bytes 200" "--cache-type lru --capacity 10000"
        r=$(load "$LB" --connections 64 --duration "$W4_DURATION" --warmup 5 --keys 100000 --dist zipf:0.99 --simulate-lru 30000 \
            | field 'round(r["hit_ratio"], 4), round(r["simulated_lru"]["hit_ratio"], 4), round(r["hit_ratio"] / r["simulated_lru"]["hit_ratio"], 3), round(r["throughput_rps"])')
        printf '| %s | %s | %s | %s | %s |\n' "$strategy" $r
        stop_all
    done
fi

for w in W5 W6; do
    [[ "$WORKLOADS" == *$w* ]] || continue
    if [[ $w == W5 ]]; then bytes=65536; else bytes=524288; fi
    cluster round_robin "--synthetic-keys 200 --value-bytes $bytes" "--cache-type lru"
    load "$LB" --connections 8 --requests 4000 --keys 200 --warmup 0 > /dev/null # every key on every proxy
    echo
    echo "## $w: $((bytes / 1024)) KiB values, all hits, through the balancer (round_robin) and 3 lru proxies (${DURATION}s runs)"
    echo
    echo "| workload | connections | req/s | p50 us | p99 us | errors | MiB/s |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
    for c in 1 16; do
        runs=()
        for _ in $(seq "$REPS"); do
            runs+=("$(load "$LB" --connections "$c" --duration "$DURATION" --warmup 1 --keys 200 \
                | field 'round(r["throughput_rps"]), r["latency_us"]["p50"], r["latency_us"]["p99"], r["errors"]')")
        done
        rps=$(printf '%s\n' "${runs[@]}" | awk '{print $1}' | median)
        printf '| %s | %s | %s | %s | %s | %s | %.0f |\n' "$w" "$c" "$rps" \
            "$(printf '%s\n' "${runs[@]}" | awk '{print $2}' | median)" \
            "$(printf '%s\n' "${runs[@]}" | awk '{print $3}' | median)" \
            "$(printf '%s\n' "${runs[@]}" | awk '{s+=$4} END {print s}')" \
            "$(echo "$rps $bytes" | awk '{print $1 * $2 / 1048576}')"
    done
    if [[ "$STRACE" != 0 ]]; then
        n=$((bytes > 100000 ? 1000 : 4000))
        echo
        echo "$w syscalls per answer (strace -c over $n GETs, 16 connections):"
        echo "- balancer: $(syscalls "$LB_PID" "$n" 1 200)"
        echo "- one proxy: $(syscalls "$PROXY_PID" "$n" 0.3333 200)"
    fi
    stop_all
done

if [[ "$TWEMPROXY" != 0 ]]; then
    echo
    DURATION="$DURATION" REPS="$REPS" SERVER_CPU="$SERVER_CPU" LOAD_CPU="$LOAD_CPU" STRACE="$STRACE" \
        "$ROOT/scripts/bench_vs_twemproxy.sh"
fi
