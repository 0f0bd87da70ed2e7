#!/usr/bin/env bash
# A three-member etcd cluster on loopback, the peer that docs/benchmarks.md compares DynaKV with.
#
#   scripts/etcd-cluster.sh                  # run until Ctrl-C
#   scripts/etcd-cluster.sh -- CMD ARGS...   # start, run CMD while the cluster is up, stop
#
# Members m1, m2, m3 serve clients on 127.0.0.1:12379, :22379, :32379 (peers on :12380, :22380,
# :32380; not etcd's default 2379, so a packaged etcd service that may be running does not clash).
# Each member has its own data directory under ETCD_DATA_ROOT (default: a new temporary
# directory, removed on exit unless KEEP_DATA=1). Member PIDs are written to
# $ETCD_DATA_ROOT/m<i>.pid, so callers can sample their CPU time and memory.
#
# etcd comes from Debian's etcd-server package (installed with apt-get when `etcd` is missing).
# Everything is stopped on exit, also on Ctrl-C or when CMD fails; the exit status is CMD's.
set -euo pipefail

ENDPOINTS="127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379"

if ! command -v etcd >/dev/null 2>&1; then
  echo "etcd not found: installing Debian's etcd-server" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y etcd-server >&2
fi

ROOT_GIVEN=${ETCD_DATA_ROOT:-}
ROOT=${ETCD_DATA_ROOT:-$(mktemp -d -t dynakv-etcd.XXXXXX)}
mkdir -p "$ROOT"

PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    # Give each member 10 s to stop, then kill it.
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ -z "$ROOT_GIVEN" && "${KEEP_DATA:-0}" != 1 ]]; then
    rm -rf "$ROOT"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CLUSTER="m1=http://127.0.0.1:12380,m2=http://127.0.0.1:22380,m3=http://127.0.0.1:32380"
for i in 1 2 3; do
  name="m$i"
  dir="$ROOT/$name"
  mkdir -p "$dir"
  # A leftover data directory of an earlier cluster would make `new` fail: start clean.
  rm -rf "$dir/data"
  etcd --name "$name" \
    --data-dir "$dir/data" \
    --listen-client-urls "http://127.0.0.1:${i}2379" \
    --advertise-client-urls "http://127.0.0.1:${i}2379" \
    --listen-peer-urls "http://127.0.0.1:${i}2380" \
    --initial-advertise-peer-urls "http://127.0.0.1:${i}2380" \
    --initial-cluster "$CLUSTER" \
    --initial-cluster-token dynakv-bench \
    --initial-cluster-state new \
    --logger zap --log-level warn \
    >"$dir/etcd.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$ROOT/$name.pid"
done

# Ready when every member reports itself healthy (a leader is elected and it can serve).
for i in 1 2 3; do
  ok=0
  for _ in $(seq 300); do
    if curl -fsS "http://127.0.0.1:${i}2379/health" 2>/dev/null | grep -q '"health":"true"'; then
      ok=1
      break
    fi
    sleep 0.1
  done
  if [[ $ok != 1 ]]; then
    echo "error: etcd member m$i did not become healthy within 30 s; log:" >&2
    tail -20 "$ROOT/m$i/etcd.log" >&2
    exit 1
  fi
done
echo "etcd $(etcd --version | head -1 | awk '{print $3}'): 3 members ready at $ENDPOINTS (data in $ROOT)" >&2

if [[ "${1:-}" == "--" ]]; then
  shift
  set +e
  ETCD_ENDPOINTS="$ENDPOINTS" ETCD_DATA_ROOT="$ROOT" "$@"
  status=$?
  set -e
  exit "$status"
fi

echo "Ctrl-C stops the cluster" >&2
wait
