#!/usr/bin/env bash
# B1w: foundation API throughput measured with wrk (Debian package `wrk`) as the load
# generator, so the client's own CPU cost stays small. Bounded: each run lasts --seconds.
#   bash bench/bench_api_wrk.sh [seconds=10] [connections=32] [database-url]
# One worker is measured on a core of its own: the server is pinned to CPU 0 and wrk to the
# others (PIN=0 shares every core between them, as runs before 2026-12-06 07:00 UTC did: the
# server's threads and wrk's then compete for both cores, and the tail is the machine's).
# Routes: the five of the first table (the device list of an empty product), then a device's
# pages in a second product, with CONNECTIONS in flight and one at a time (issue 22).
set -euo pipefail
cd "$(dirname "$0")/.."
# this checkout's code (the shared venv's editable install may point at another checkout)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SECS=${1:-10}; CONNS=${2:-32}; DBURL=${3:-}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install -y wrk)"; exit 1; }
PIN=${PIN:-1}
CORES=$(nproc)
SERVER_PIN=(); WRK=(wrk -t2)
if [ "$PIN" = 1 ] && [ "$CORES" -ge 2 ] && command -v taskset >/dev/null; then
  SERVER_PIN=(taskset -c 0); WRK=(taskset -c "1-$((CORES - 1))" wrk -t"$((CORES - 1))")
fi
TMP=$(mktemp -d)
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
env -u CORRAL_DATABASE_URL CORRAL_DATA_DIR="$TMP" CORRAL_LOG_LEVEL=WARNING CORRAL_API_RATE_LIMIT=0 \
    ${DBURL:+CORRAL_DATABASE_URL=$DBURL} \
    "${SERVER_PIN[@]}" .venv/bin/python -m uvicorn corral.web.app:asgi_app --factory --host 127.0.0.1 --port "$PORT" \
    --no-access-log --log-level warning --loop uvloop --http httptools --no-proxy-headers &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$TMP"' EXIT
for _ in $(seq 1 60); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done
BASE="http://127.0.0.1:$PORT"
curl -sf -X POST "$BASE/v1/users" -H 'content-type: application/json' \
  -d '{"username":"wrk@example.com","password":"wrk-password"}' >/dev/null || true
TOKEN=$(curl -sf -X POST "$BASE/oauth/token" -d grant_type=password -d username=wrk@example.com \
  -d password=wrk-password -d client_id=bench -d client_secret=bench | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
curl -sf -X POST "$BASE/v1/user/products" -H "Authorization: Bearer $TOKEN" \
  -H 'content-type: application/json' -d '{"product":{"name":"Bench"}}' >/dev/null
# a second product with one device, for the device pages (issue 22: p99 under 10 ms)
DEV=0123456789abcdef01234567
curl -sf -X POST "$BASE/v1/user/products" -H "Authorization: Bearer $TOKEN" \
  -H 'content-type: application/json' -d '{"product":{"name":"Fleet"}}' >/dev/null
curl -sf -X POST "$BASE/v1/products/fleet/devices" -H "Authorization: Bearer $TOKEN" \
  -H 'content-type: application/json' -d "{\"id\":\"$DEV\"}" >/dev/null
# server CPU (user + system) of the uvicorn process, in clock ticks: robust to other load
cpu_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
TICK=$(getconf CLK_TCK)
printf '%-60s %9s %9s %9s %9s\n' route req/s p50_ms p99_ms cpu_ms/req
run() {  # run CONNECTIONS PATH: one row of the table
  local conns=$1 path=$2 wrk=("${WRK[@]}")
  [ "$conns" = 1 ] && wrk=("${WRK[@]:0:${#WRK[@]}-1}" -t1)
  c0=$(cpu_ticks)
  out=$("${wrk[@]}" -c"$conns" -d"${SECS}s" --latency -H "Authorization: Bearer $TOKEN" "$BASE$path")
  c1=$(cpu_ticks)
  nreq=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu=$(awk -v a="$c0" -v b="$c1" -v t="$TICK" -v n="$nreq" 'BEGIN { printf "%.2f", (b - a) * 1000 / t / n }')
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  printf '%-60s %9s %9s %9s %9s %s\n' "GET $path${3:-}" "$rps" "$p50" "$p99" "$cpu" "${non2xx:+non-2xx=$non2xx}"
}
for path in /healthz /v1/user /v1/products/bench /v1/products/bench/team /v1/products/bench/devices; do
  run "$CONNS" "$path"
done
# the device pages: with CONNECTIONS in flight, then one at a time (wrk -c1)
for path in "/v1/products/fleet/devices/$DEV" "/v1/devices/$DEV"; do
  run "$CONNS" "$path"
  run 1 "$path" " (1 conn)"
done
