#!/usr/bin/env bash
# Large values on the hit path: this project's cluster (balancer -> 3 lru proxies -> origin)
# next to twemproxy (nutcracker) over 3 memcached, loaded by the very same closed-loop
# generator (`client bench`; `--wire memcache` speaks memcached's `get` to twemproxy).
# Every key is warm in both stacks: all answers are hits. Runs alternate between the stacks.
# Servers pinned to CPU 0, the generator to CPU 1.
#
#   VALUE_SIZES ("65536 524288")  value bytes per run set
#   CONNECTIONS ("1 16")          connections per point (pipeline 1)
#   DURATION (5) REPS (3)         seconds per run, runs per point (medians quoted; "paired" is
#                                 the median of each run's ratio to the twemproxy run after it)
#   KEYS (200)                    keys in the working set
#   STRATEGY (consistent_hash)    the balancer's strategy: twemproxy hashes keys (ketama), so
#                                 the like-for-like setting is consistent_hash (each key cached
#                                 on one proxy, as on one memcached); round_robin makes every
#                                 proxy hold every value, three times the memory to read from
#   STRACE (0)                    1: also count syscalls per answer of the balancer and one
#                                 proxy (and of nutcracker) at the last connection count
#
# Needs: nutcracker and memcached (Debian: apt-get install nutcracker memcached), taskset,
# python3; strace for STRACE=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
VALUE_SIZES="${VALUE_SIZES:-65536 524288}"
CONNECTIONS="${CONNECTIONS:-1 16}"
DURATION="${DURATION:-5}"
REPS="${REPS:-3}"
KEYS="${KEYS:-200}"
STRATEGY="${STRATEGY:-consistent_hash}"
STRACE="${STRACE:-0}"
SERVER_CPU="${SERVER_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"

for tool in nutcracker memcached taskset python3; do
    command -v "$tool" >/dev/null || { echo "bench_vs_twemproxy: $tool is needed (apt-get install nutcracker memcached)" >&2; exit 1; }
done
[[ "$STRACE" == 0 ]] || command -v strace >/dev/null || { echo "bench_vs_twemproxy: strace is needed for STRACE=1" >&2; exit 1; }
echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release --quiet --bin origin --bin proxy --bin balancer --bin client)

NAME=bench_vs_twemproxy
source "$ROOT/scripts/bench_common.sh"
field() { python3 -c "import json,sys; r=json.load(sys.stdin); print($1)"; }

# strace_per_answer PID PORT WIRE CONNECTIONS [PASSING]: syscalls per answer of PID over one
# run, where PASSING answers in every 1 pass through PID (a proxy sees a third).
strace_per_answer() {
    local pid="$1" port="$2" wire="$3" c="$4" passing="${5:-1}" out="$WORK/strace.$1" answers
    strace -c -f -p "$pid" -o "$out" 2>/dev/null & local tracer=$!
    sleep 0.5
    answers=$(load "$port" --wire "$wire" --connections "$c" --duration "$DURATION" --warmup 0 --keys "$KEYS" | field 'r["requests"]')
    kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
    python3 - "$out" "$answers" "$passing" <<'EOF'
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
top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
print("  ".join(f"{name} {n / answers:.2f}" for name, n in top) + f"  (mremap {calls.get('mremap', 0) / answers:.2f}; {answers} answers)")
EOF
}

echo "# large values: cachetier vs twemproxy+memcached — $(date -u +%Y-%m-%dT%H:%MZ)"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "# servers on CPU $SERVER_CPU, generator on CPU $LOAD_CPU; ${DURATION}s runs, medians of $REPS; $KEYS keys, all hits; balancer --strategy $STRATEGY"

for bytes in $VALUE_SIZES; do
    # Our stack: origin with synthetic values of about $bytes bytes, 3 lru proxies, balancer.
    ORIGIN=$(free_port); LB=$(free_port); ports=()
    serve "$BIN/origin" --port "$ORIGIN" --synthetic-keys "$KEYS" --value-bytes "$bytes" --log-level warn
    wait_port "$ORIGIN"
    for _ in 1 2 3; do
        p=$(free_port); ports+=("$p")
        serve "$BIN/proxy" --port "$p" --origin-port "$ORIGIN" --cache-type lru --log-level warn; PROXY_PID=$LAST_PID
    done
    for p in "${ports[@]}"; do wait_port "$p"; done
    serve "$BIN/balancer" --port "$LB" --strategy "$STRATEGY" --log-level warn \
        --proxies "127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" "127.0.0.1:${ports[2]}"; LB_PID=$LAST_PID
    wait_port "$LB"
    sleep 1.2 # first probes done

    # twemproxy over 3 memcached, filled through twemproxy so that its hashing places the keys.
    TW=$(free_port); STATS=$(free_port); mports=()
    for _ in 1 2 3; do
        p=$(free_port); mports+=("$p")
        serve memcached -u root -l 127.0.0.1 -p "$p" -U 0 -t 1 -m 2048 -I 4m
    done
    for p in "${mports[@]}"; do wait_port "$p"; done
    cat > "$WORK/nutcracker.yml" <<EOF
cache:
  listen: 127.0.0.1:$TW
  hash: fnv1a_64
  distribution: ketama
  timeout: 2000
  server_connections: 1
  servers:
   - 127.0.0.1:${mports[0]}:1
   - 127.0.0.1:${mports[1]}:1
   - 127.0.0.1:${mports[2]}:1
EOF
    serve nutcracker -c "$WORK/nutcracker.yml" -s "$STATS" -o "$WORK/nutcracker.log"; TW_PID=$LAST_PID
    wait_port "$TW"
    # The same value for both: the origin's own answer for one key (its JSON), stored as is.
    "$BIN/client" --port "$ORIGIN" --get synthetic/0 --timeout-ms 5000 | field 'len(__import__("json").dumps(r["data"]))' > "$WORK/len"
    python3 - "$TW" "$KEYS" "$(cat "$WORK/len")" <<'EOF'
import socket, sys
port, keys, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
value = b'"' + b"x" * max(0, size - 2) + b'"'
f = s.makefile("rb")
for i in range(keys):
    s.sendall(b"set synthetic/%d 0 0 %d\r\n%s\r\n" % (i, len(value), value))
    reply = f.readline()
    if reply != b"STORED\r\n":
        sys.exit(f"twemproxy refused a set: {reply!r}")
EOF
    # Every key warm on every proxy (under consistent_hash the bounded-load rule sends some GETs
    # to a key's second choice), so that all answers are hits in both stacks.
    for p in "${ports[@]}"; do load "$p" --connections 4 --requests $((KEYS * 12)) --keys "$KEYS" --warmup 0 > /dev/null; done

    echo
    echo "## values of $(cat "$WORK/len") bytes (pipeline 1)"
    echo
    echo "| connections | cachetier req/s | p50 us | p99 us | errors | twemproxy req/s | p50 us | p99 us | errors | cachetier/twemproxy | paired |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    for c in $CONNECTIONS; do
        ours=(); theirs=()
        for _ in $(seq "$REPS"); do
            ours+=("$(load "$LB" --connections "$c" --duration "$DURATION" --warmup 1 --keys "$KEYS" \
                | field 'round(r["throughput_rps"]), r["latency_us"]["p50"], r["latency_us"]["p99"], r["errors"]')")
            theirs+=("$(load "$TW" --wire memcache --connections "$c" --duration "$DURATION" --warmup 1 --keys "$KEYS" \
                | field 'round(r["throughput_rps"]), r["latency_us"]["p50"], r["latency_us"]["p99"], r["errors"]')")
        done
        col() { local i="$1"; shift; printf '%s\n' "$@" | awk -v i="$i" '{print $i}' | median; }
        sum() { local i="$1"; shift; printf '%s\n' "$@" | awk -v i="$i" '{s+=$i} END {print s}'; }
        o=$(col 1 "${ours[@]}"); t=$(col 1 "${theirs[@]}")
        # The median of each run's ratio to the twemproxy run right after it: steadier than the
        # ratio of the medians when the machine's speed drifts during the sitting.
        paired=$(for i in "${!ours[@]}"; do echo "${ours[$i]%% *} ${theirs[$i]%% *}" | awk '{printf "%.4f\n", $1/$2}'; done | median)
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %.2fx | %.2fx |\n' "$c" \
            "$o" "$(col 2 "${ours[@]}")" "$(col 3 "${ours[@]}")" "$(sum 4 "${ours[@]}")" \
            "$t" "$(col 2 "${theirs[@]}")" "$(col 3 "${theirs[@]}")" "$(sum 4 "${theirs[@]}")" \
            "$(echo "$o $t" | awk '{print $1/$2}')" "$paired"
    done
    if [[ "$STRACE" != 0 ]]; then
        c=$(echo "$CONNECTIONS" | awk '{print $NF}')
        echo
        echo "syscalls per answer at $c connections (strace -c; tracing slows the traced process):"
        echo "- balancer:   $(strace_per_answer "$LB_PID" "$LB" line "$c")"
        echo "- one proxy:  $(strace_per_answer "$PROXY_PID" "$LB" line "$c" 0.3333) (per answer it served)"
        echo "- nutcracker: $(strace_per_answer "$TW_PID" "$TW" memcache "$c")"
    fi
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
done
