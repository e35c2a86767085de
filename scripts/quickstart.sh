#!/usr/bin/env bash
# tether by hand, on one machine: Redis, a PS, an agent and the redirector,
# then an unmodified curl that reaches the agent's target through the redirect.
# Run as root from the repository root, after `make build` (the redirector
# loads eBPF programs; see scripts/setup.sh for the packages).
set -euo pipefail

TETHER=${TETHER:-./bin/tether}
REDIS_PORT=${REDIS_PORT:-6390}       # a Redis of its own, not your 6379
PS_PORT=${PS_PORT:-7000}             # where agents dial the PS
PS_PORTS=${PS_PORTS:-21000-21099}    # the PS's data ports, one per endpoint
SERVICE_PORT=${SERVICE_PORT:-8081}   # the agent's local service
TARGET=127.77.0.1:8080               # the agent's own IP:port, what clients dial
REDIS=redis://127.0.0.1:$REDIS_PORT/0

work=$(mktemp -d)
cg2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)   # the cgroup2 mount
cgroup=$cg2/tether-quickstart-$$     # the redirector acts only on this cgroup
pins=/sys/fs/bpf/tether-quickstart-$$
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$TETHER" redirector uninstall --pin-dir "$pins" >/dev/null 2>&1 || true
  rmdir "$cgroup" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# 1. The registry.
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)

# 2. A credential: agent a1 may expose addresses in 127.77.0.0/16.
token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$token a1 127.77.0.0/16" >"$work/tokens"

# 3. A PS. --agent-cidrs names the loopback range it may expose (loopback is
#    refused unless named).
"$TETHER" ps --id ps1 --listen "127.0.0.1:$PS_PORT" --advertise 127.0.0.1 --ports "$PS_PORTS" \
  --redis "$REDIS" --token-file "$work/tokens" --agent-cidrs 127.77.0.0/16 >"$work/ps.log" 2>&1 &
pids+=($!)

# 4. The agent's local service, and the agent: it exposes 127.77.0.1:8080 and
#    dials the service at 127.0.0.1:$SERVICE_PORT. Nothing listens on the
#    target address itself, so only the redirect can reach it.
mkdir "$work/site" && echo "hello from a1" >"$work/site/index.html"
python3 -m http.server "$SERVICE_PORT" --bind 127.0.0.1 --directory "$work/site" >"$work/service.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$SERVICE_PORT/" && break; sleep 0.1; done
TETHER_TOKEN=$token "$TETHER" agent --id a1 --ip 127.77.0.1 --server "127.0.0.1:$PS_PORT" \
  --expose "8080=127.0.0.1:$SERVICE_PORT" --tunnels 1 >"$work/agent.log" 2>&1 &
pids+=($!)

# 5. The redirector, for one cgroup, redirecting the loopback test range.
mkdir "$cgroup"
"$TETHER" redirector --redis "$REDIS" --cgroup "$cgroup" --target-cidrs 127.77.0.0/16 \
  --pin-dir "$pins" >"$work/redirector.log" 2>&1 &
pids+=($!)

# 6. Wait for the route in Redis and in the kernel map.
for _ in $(seq 100); do
  "$TETHER" redirector routes "$TARGET" --pin-dir "$pins" >/dev/null 2>&1 && break
  sleep 0.2
done
"$TETHER" routes get "$TARGET" --redis "$REDIS"
"$TETHER" redirector routes "$TARGET" --pin-dir "$pins"

# 7. The same curl, outside and inside the cgroup.
echo "outside the cgroup:"
curl -sS --max-time 3 "http://$TARGET/" || echo "(refused: nothing listens on $TARGET)"
echo "inside the cgroup:"
sh -c 'echo $$ > "$1/cgroup.procs" && exec curl -sS --max-time 3 "http://$2/"' sh "$cgroup" "$TARGET"
