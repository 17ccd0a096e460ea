#!/usr/bin/env bash
# Stops the cluster started by start_cluster.sh (SPEC 5): the PIDs recorded under RUN_DIR get
# SIGTERM (a graceful drain), then SIGKILL after a grace period; then any leftover process of
# this checkout's own binaries (matched by full path) still serving one of this cluster's ports.
# A recorded PID that is no longer this checkout's binary (the PID was reused) is left alone.
# The binaries are looked for under CARGO_TARGET_DIR (default target/), as cargo builds them.
#
# Settings: RUN_DIR, and ORIGIN_PORT, PROXY_PORTS, LB_PORT as for start_cluster.sh.
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/cluster_env.sh"
GRACE_SECONDS=6

# stop PID...: TERM, wait up to the grace period, then KILL.
stop() {
    local pids=("$@") deadline=$((SECONDS + GRACE_SECONDS)) pid
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null
    for pid in "${pids[@]}"; do
        while alive "$pid" && (( SECONDS < deadline )); do sleep 0.1; done
        if alive "$pid"; then
            echo "kill_cluster: pid $pid did not stop in ${GRACE_SECONDS}s; killing it"
            kill -KILL "$pid" 2>/dev/null
        fi
    done
}

recorded=()
if [[ -f "$PIDS" ]]; then
    while read -r name pid port; do
        if ours "$pid" "$name"; then
            recorded+=("$pid")
            echo "stopping $name (pid $pid, port $port)"
        elif alive "$pid"; then
            echo "leaving pid $pid alone: it is no longer $name ($BIN/${name%%-*})"
        fi
    done < "$PIDS"
    stop "${recorded[@]}"
    rm -f "$PIDS"
else
    echo "no PID file in $RUN_DIR"
fi

# Leftovers: this checkout's binaries (by the full path of their executable) serving one of
# this cluster's ports.
leftovers=()
for port in "$ORIGIN_PORT" $PROXY_PORTS "$LB_PORT"; do
    while read -r pid; do
        [[ -n "$pid" ]] || continue
        for binary in origin proxy balancer; do
            if ours "$pid" "$binary"; then
                leftovers+=("$pid")
                break
            fi
        done
    done < <(pgrep -f -- "--port $port( |$)" || true)
done
if ((${#leftovers[@]})); then
    echo "stopping leftover processes: ${leftovers[*]}"
    stop "${leftovers[@]}"
fi
echo "cluster stopped"
