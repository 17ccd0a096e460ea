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
BIN="$ROOT/target/release"
PIDS="$RUN_DIR/pids"

alive() { kill -0 "$1" 2>/dev/null; }
