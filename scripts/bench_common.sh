# Shared by bench_vs_twemproxy.sh and bench_relay_modes.sh (sourced): processes started on the
# server CPU and stopped by PID at exit, free ports, readiness, the pinned load generator.
# The sourcing script sets NAME, BIN, SERVER_CPU and LOAD_CPU first.
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
serve() { taskset -c "$SERVER_CPU" "$@" > "$WORK/log.$RANDOM" 2>&1 & PIDS+=($!); LAST_PID=$!; }
wait_port() {
    for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
    echo "$NAME: port $1 did not come up" >&2; exit 1
}
load() { local port="$1"; shift; taskset -c "$LOAD_CPU" "$BIN/client" --port "$port" bench --json "$@" 2>/dev/null; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
