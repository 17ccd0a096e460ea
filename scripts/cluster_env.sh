# The cluster's settings and their defaults (SPEC 5), shared by the scripts that source it.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORIGIN_PORT="${ORIGIN_PORT:-8000}"
PROXY_PORTS="${PROXY_PORTS:-8001 8002 8003}"
LB_PORT="${LB_PORT:-9000}"
CACHE_TYPE="${CACHE_TYPE:-lru}"
# consistent_hash by default: each key is cached by one proxy, so a second GET is a hit.
STRATEGY="${STRATEGY:-consistent_hash}"
ORIGIN_LATENCY_MS="${ORIGIN_LATENCY_MS:-100}"
RUN_DIR="${RUN_DIR:-$ROOT/.cluster}"
# The binaries: under cargo's target dir, CARGO_TARGET_DIR if set (a relative one is taken from
# the repository root, where the scripts run cargo), else target/. Canonical, so that it can be
# compared with /proc/PID/exe.
BIN="$(cd "$ROOT" && realpath -m "${CARGO_TARGET_DIR:-target}")/release"
PIDS="$RUN_DIR/pids"

alive() { kill -0 "$1" 2>/dev/null; }

# ours PID NAME: PID is still running this checkout's binary for NAME (origin, proxy-PORT or
# balancer). A recorded PID may belong to any other program once the service has exited, and
# that one is never signalled. A binary rebuilt while running shows as "PATH (deleted)".
ours() {
    local expected exe
    expected="$(readlink -f "$BIN/${2%%-*}")" || return 1
    exe="$(readlink "/proc/$1/exe" 2>/dev/null)" || return 1
    [[ "$exe" == "$expected" || "$exe" == "$expected (deleted)" ]]
}
