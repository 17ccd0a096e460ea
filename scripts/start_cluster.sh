#!/usr/bin/env bash
# Starts the whole cluster on this machine: origin, proxies, balancer (SPEC 5).
#
#   ./scripts/start_cluster.sh
#
# Settings (environment variables):
#   ORIGIN_PORT        origin port                          (default 8000)
#   PROXY_PORTS        space-separated proxy ports          (default "8001 8002 8003")
#   LB_PORT            balancer port                        (default 9000)
#   CACHE_TYPE         proxy cache: lru or ttl              (default lru)
#   STRATEGY           round_robin, least_loaded or consistent_hash (default consistent_hash:
#                      each key is cached by one proxy, so a second GET is a hit)
#   ORIGIN_LATENCY_MS  simulated origin latency per GET     (default 100)
#   RUN_DIR            PID file and logs                    (default .cluster/ at the repository root)
#   CARGO_TARGET_DIR   where cargo builds the binaries      (default target/)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/cluster_env.sh"
READY_SECONDS=15

die() { echo "start_cluster: $*" >&2; exit 1; }

# A cluster already running from this RUN_DIR is not started twice.
if [[ -f "$PIDS" ]]; then
    while read -r name pid port; do
        if ours "$pid" "$name"; then
            die "a cluster is already running from $RUN_DIR ($name, pid $pid, port $port); stop it with ./scripts/kill_cluster.sh"
        fi
    done < "$PIDS"
    rm -f "$PIDS"
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$ORIGIN_PORT" $PROXY_PORTS "$LB_PORT"; do
    [[ "$port" =~ ^[0-9]+$ ]] || die "'$port' is not a port number"
    if port_in_use "$port"; then
        die "port $port is already in use (set ORIGIN_PORT, PROXY_PORTS or LB_PORT to pick others)"
    fi
done

command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs)"
echo "building release binaries (if needed)..."
(cd "$ROOT" && cargo build --release --quiet --bin origin --bin proxy --bin balancer --bin client) \
    || die "the build failed"

mkdir -p "$RUN_DIR"
: > "$PIDS"
STARTED=()

stop_started() {
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    rm -f "$PIDS"
}

# start NAME PORT BINARY ARGS...: starts one service in the background, logging to RUN_DIR.
start() {
    local name="$1" port="$2" binary="$3"
    shift 3
    local log="$RUN_DIR/$name.log"
    nohup "$BIN/$binary" --port "$port" "$@" > "$log" 2>&1 < /dev/null &
    local pid=$!
    STARTED+=("$pid")
    echo "$name $pid $port" >> "$PIDS"
}

# wait_ready NAME PORT PID: waits until the service answers HEALTH, or fails showing its log.
wait_ready() {
    local name="$1" port="$2" pid="$3" deadline=$((SECONDS + READY_SECONDS))
    until "$BIN/client" --port "$port" --health --timeout-ms 500 > /dev/null 2>&1; do
        if ! alive "$pid"; then
            echo "start_cluster: $name (port $port) exited; the end of its log ($RUN_DIR/$name.log):" >&2
            tail -n 20 "$RUN_DIR/$name.log" >&2 || true
            stop_started
            exit 1
        fi
        if (( SECONDS >= deadline )); then
            echo "start_cluster: $name (port $port) did not answer HEALTH within ${READY_SECONDS}s; its log:" >&2
            tail -n 20 "$RUN_DIR/$name.log" >&2 || true
            stop_started
            exit 1
        fi
        sleep 0.1
    done
}

start origin "$ORIGIN_PORT" origin --data-dir "$ROOT/origin/data" --latency-ms "$ORIGIN_LATENCY_MS"
wait_ready origin "$ORIGIN_PORT" "${STARTED[-1]}"

PROXY_ADDRS=()
for port in $PROXY_PORTS; do
    start "proxy-$port" "$port" proxy --origin-port "$ORIGIN_PORT" --cache-type "$CACHE_TYPE"
    PROXY_ADDRS+=("127.0.0.1:$port")
done
i=1
for port in $PROXY_PORTS; do
    wait_ready "proxy-$port" "$port" "${STARTED[$i]}"
    i=$((i + 1))
done

start balancer "$LB_PORT" balancer --strategy "$STRATEGY" --proxies "${PROXY_ADDRS[@]}"
wait_ready balancer "$LB_PORT" "${STARTED[-1]}"

echo "cluster started:"
while read -r name pid port; do
    printf '  %-12s port %-5s pid %s\n' "$name" "$port" "$pid"
done < "$PIDS"
echo "  cache: $CACHE_TYPE, strategy: $STRATEGY, origin latency: ${ORIGIN_LATENCY_MS} ms"
echo "logs and PIDs: $RUN_DIR"
echo "try: $BIN/client --port $LB_PORT --get article/1"
echo "stop: ./scripts/kill_cluster.sh"
