#!/usr/bin/env bash
# How long after kill -9 of a proxy the balancer reports it `healthy: false`, with the
# default health settings (probe every 1000 ms, timeout 500 ms, fall 3), without traffic and
# with traffic. Runs its own cluster on free ports; repeats each case RUNS times (default 3).
# Whatever happens, it stops everything it started before it exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(cd "$ROOT" && realpath -m "${CARGO_TARGET_DIR:-target}")/release" # cargo's target dir, relative to the root
RUNS="${RUNS:-3}"
(cd "$ROOT" && cargo build --release --quiet --bin origin --bin proxy --bin balancer --bin client)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Everything started and not yet stopped; on any exit (a failure included, through set -e) it
# is all stopped, so a failed run leaves nothing behind.
PIDS=()
stop_pids() { # PID...: TERM, then wait for them (they are this script's children)
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    wait "$@" 2>/dev/null || true
}
cleanup() { stop_pids "${PIDS[@]}"; PIDS=(); }
trap cleanup EXIT
wait_up() {
    for _ in $(seq 100); do "$BIN/client" --port "$1" --health --timeout-ms 200 >/dev/null 2>&1 && return 0; sleep 0.05; done
    echo "failover: nothing answers HEALTH on port $1" >&2
    exit 1
}

ORIGIN=$(free_port)
"$BIN/origin" --port "$ORIGIN" --synthetic-keys 1000 --data-dir "$ROOT/origin/data" --log-level warn >/dev/null 2>&1 & PIDS+=($!)
wait_up "$ORIGIN"

# measure with_traffic: sets RESULT to the milliseconds from kill -9 to healthy:false. It runs
# in this shell (not in $(...)), so that what it starts is in PIDS and a failure ends the script.
measure() {
    local traffic="$1" p1 p2 p3 lb victim load="" keep=("${PIDS[@]}") started=()
    p1=$(free_port); p2=$(free_port); p3=$(free_port); lb=$(free_port)
    for p in $p1 $p2 $p3; do
        "$BIN/proxy" --port "$p" --origin-port "$ORIGIN" --log-level warn >/dev/null 2>&1 & started+=($!); PIDS+=($!)
    done
    for p in $p1 $p2 $p3; do wait_up "$p"; done
    "$BIN/balancer" --port "$lb" --proxies "127.0.0.1:$p1" "127.0.0.1:$p2" "127.0.0.1:$p3" --log-level warn >/dev/null 2>&1 & started+=($!); PIDS+=($!)
    wait_up "$lb"
    sleep 1.5 # let a few probes pass so that the proxies are known
    if [[ "$traffic" == yes ]]; then
        "$BIN/client" --port "$lb" bench --connections 4 --duration 30 --warmup 0 >/dev/null 2>&1 & load=$!; PIDS+=($!)
        sleep 0.5
    fi
    victim="${started[1]}"
    RESULT=$(python3 - "$lb" "127.0.0.1:$p2" "$victim" <<'PY'
import json, os, signal, socket, sys, time
lb, name, pid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def healthy():
    s = socket.create_connection(("127.0.0.1", lb)); s.sendall(b"METRICS\n")
    buf = b""
    while not buf.endswith(b"\n"): buf += s.recv(1 << 20)
    s.close()
    return json.loads(buf)["data"]["proxies"][name]["healthy"]
t0 = time.monotonic(); os.kill(pid, signal.SIGKILL)
while healthy() and time.monotonic() - t0 < 10: time.sleep(0.005)
print(round((time.monotonic() - t0) * 1000))
PY
)
    stop_pids "${started[@]}" $load
    PIDS=("${keep[@]}")
}

echo "kill -9 of one proxy to healthy:false (defaults: interval 1000 ms, timeout 500 ms, fall 3), ms"
for traffic in no yes; do
    printf 'traffic=%-4s' "$traffic"
    for _ in $(seq "$RUNS"); do measure "$traffic"; printf ' %6s' "$RESULT"; done
    echo
done
