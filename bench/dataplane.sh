#!/usr/bin/env bash
# Data-path benchmark: requests/s and p50/p99 latency through fwdproxy's built-in data plane vs
# HAProxy doing the same TLS origination (client chain, Istio SNI and ALPN, server chain verified
# against the mesh root) to the same sidecar through the same east-west gateway stand-in, plus a
# direct baseline (the same applications in plain text, no proxy), on the same machine in the
# same run:
#   - HTTP keep-alive: wrk, $CONNS connections, $DURATION each;
#   - new TCP connections: meshbench tcpload, $TCP_WORKERS workers each opening a connection,
#     sending a line, half-closing and reading the echo, $DURATION each.
#
# Usage: bench/dataplane.sh            (needs go, wrk and haproxy: apt-get install -y wrk haproxy)
# Tunables: DURATION=10s CONNS=32 THREADS=2 TCP_WORKERS=16; FWDPROXY=path to benchmark a built
# binary instead of building ./cmd/fwdproxy.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
TCP_WORKERS=${TCP_WORKERS:-16}

for bin in go wrk haproxy curl; do
  command -v "$bin" >/dev/null || { echo "dataplane.sh: $bin not found; install it (apt-get install -y wrk haproxy curl)" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

fwdproxy=${FWDPROXY:-$work/fwdproxy}
[ -n "${FWDPROXY:-}" ] || go build -o "$fwdproxy" ./cmd/fwdproxy
go build -o "$work/meshbench" ./bench/meshbench

mkdir "$work/mesh"
"$work/meshbench" mesh -dir "$work/mesh" >"$work/mesh.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/mesh/env.sh" ] && break; sleep 0.1; done
[ -s "$work/mesh/env.sh" ] || { echo "mesh did not start:"; cat "$work/mesh.log"; exit 1; } >&2
# shellcheck disable=SC1091
. "$work/mesh/env.sh"

"$fwdproxy" run --config "$work/mesh/config.yaml" --log-format text --log-level warn >"$work/fwdproxy.log" 2>&1 &
pids+=($!)
haproxy -db -f "$work/mesh/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
pids+=($!)

ready() { curl -fsS -m 2 -o /dev/null -H "Host: $HTTP_HOST" "http://$1/"; }
for _ in $(seq 300); do
  if ready "$FWDPROXY_HTTP" 2>/dev/null && ready "$HAPROXY_HTTP" 2>/dev/null; then break; fi
  sleep 0.1
done
for target in "$FWDPROXY_HTTP" "$HAPROXY_HTTP" "$DIRECT_HTTP"; do
  ready "$target" || { echo "not answering on $target"; tail -20 "$work/fwdproxy.log" "$work/haproxy.log"; exit 1; } >&2
done

# wrk prints latencies as 812.00us, 1.25ms or 1.02s; print milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.3f", v}'; }

declare -A RPS P50 P99
http_run() { # name addr
  wrk -t"$THREADS" -c"$CONNS" -d1s -H "Host: $HTTP_HOST" "http://$2/" >/dev/null # warm up
  local out
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -H "Host: $HTTP_HOST" "http://$2/")
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "$1: errors during the run:"; echo "$out"; fi >&2
  RPS[http-$1]=$(echo "$out" | awk '/^Requests\/sec:/ {printf "%.0f", $2}')
  P50[http-$1]=$(echo "$out" | awk '$1=="50%" {print $2}' | to_ms)
  P99[http-$1]=$(echo "$out" | awk '$1=="99%" {print $2}' | to_ms)
}
tcp_run() { # name addr
  "$work/meshbench" tcpload -addr "$2" -c "$TCP_WORKERS" -d 1s >/dev/null # warm up
  local out
  out=$("$work/meshbench" tcpload -addr "$2" -c "$TCP_WORKERS" -d "$DURATION" -label "$1")
  RPS[tcp-$1]=$(echo "$out" | sed -n 's/.*conns\/s=\([0-9.]*\).*/\1/p')
  P50[tcp-$1]=$(echo "$out" | sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p')
  P99[tcp-$1]=$(echo "$out" | sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p')
  case "$out" in *"errors=0"*) ;; *) echo "$1: $out" >&2 ;; esac
}

http_run direct "$DIRECT_HTTP"
http_run fwdproxy "$FWDPROXY_HTTP"
http_run haproxy "$HAPROXY_HTTP"
tcp_run direct "$DIRECT_TCP"
tcp_run fwdproxy "$FWDPROXY_TCP"
tcp_run haproxy "$HAPROXY_TCP"

echo
echo "Data path, $(nproc) cores, $DURATION per run; HTTP: wrk -t$THREADS -c$CONNS keep-alive; TCP: $TCP_WORKERS workers, one connection per exchange"
printf '%-14s %-9s %12s %10s %10s\n' mode path "req|conn/s" p50_ms p99_ms
for mode in http tcp; do
  for path in direct fwdproxy haproxy; do
    k=$mode-$path
    printf '%-14s %-9s %12s %10s %10s\n' "$mode" "$path" "${RPS[$k]}" "${P50[$k]}" "${P99[$k]}"
  done
done
echo
for mode in http tcp; do
  awk -v m="$mode" -v fr="${RPS[$mode-fwdproxy]}" -v hr="${RPS[$mode-haproxy]}" \
      -v f50="${P50[$mode-fwdproxy]}" -v h50="${P50[$mode-haproxy]}" -v d50="${P50[$mode-direct]}" \
      -v f99="${P99[$mode-fwdproxy]}" -v h99="${P99[$mode-haproxy]}" \
      'BEGIN { printf "%s: fwdproxy/haproxy: throughput %.2fx, p50 %.2fx, p99 %.2fx; p50 added over direct: fwdproxy %.3f ms, haproxy %.3f ms\n", m, fr/hr, f50/h50, f99/h99, f50-d50, h50-d50 }'
done
