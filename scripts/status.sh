#!/usr/bin/env bash
# Shows each service of the cluster: whether it answers HEALTH, and the balancer's view of
# its proxies. Settings as for start_cluster.sh.
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/cluster_env.sh"
CLIENT="$BIN/client"
[[ -x "$CLIENT" ]] || { echo "status: $CLIENT is not built (run ./scripts/start_cluster.sh)" >&2; exit 1; }

check() {
    local name="$1" port="$2" answer
    if answer=$("$CLIENT" --port "$port" --health --timeout-ms 1000 2>/dev/null); then
        local uptime
        uptime=$(printf '%s' "$answer" | grep -o '"uptime_s": [0-9]*' | grep -o '[0-9]*$')
        printf '  %-10s port %-5s UP    (up %ss)\n' "$name" "$port" "$uptime"
    else
        printf '  %-10s port %-5s DOWN\n' "$name" "$port"
    fi
}

echo "services:"
check origin "$ORIGIN_PORT"
for port in $PROXY_PORTS; do check proxy "$port"; done
check balancer "$LB_PORT"

read -r -d '' FORMAT <<'PY'
import json, sys
m = json.load(sys.stdin)["data"]
for name, p in m["proxies"].items():
    state = "healthy" if p["healthy"] else "UNHEALTHY"
    print(f"  {name:<21} {state:<9} in flight {p['in_flight']:<4} forwarded {p['forwarded']:<8} failures {p['failures']}")
c = m["cluster"]
print(f"  cluster: hits {c['hits']}, misses {c['misses']}, hit rate {c['hit_rate']:.3f}, origin fetches {c['origin_fetches']}")
PY

if metrics=$("$CLIENT" --port "$LB_PORT" --metrics --timeout-ms 1000 2>/dev/null); then
    echo "balancer's view ($(printf '%s' "$metrics" | grep -o '"strategy": "[a-z_]*"' | cut -d'"' -f4)):"
    if command -v python3 >/dev/null; then
        printf '%s' "$metrics" | python3 -c "$FORMAT"
    else
        printf '%s\n' "$metrics"
    fi
fi
