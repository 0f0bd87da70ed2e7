#!/usr/bin/env bash
# Memory (RSS per node) and disk bytes per key with KEYS keys of VALUE_SIZE bytes (default 1 M
# keys of 100 bytes), on a fresh 3-node `dynakv dev` cluster (n=3: every node holds every key),
# then the same on the 3-member etcd cluster of scripts/etcd-cluster.sh (ETCD=0 skips it).
#
#   scripts/bench-memory.sh
#
# RSS is VmRSS from /proc/PID/status after the load (and VmHWM, the peak); disk is `du -sb` of
# each data directory. Settings: KEYS, VALUE_SIZE, CLIENTS (64), BENCH_DIR, OUT, CARGO_TARGET_DIR,
# DEV_ARGS (more flags of `dynakv dev`, e.g. "--set storage.cache_bytes=134217728").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
KEYS=${KEYS:-1000000}
VALUE_SIZE=${VALUE_SIZE:-100}
CLIENTS=${CLIENTS:-64}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
export KEYS VALUE_SIZE CLIENTS TARGET_DIR
LIB="python3 $REPO/scripts/benchlib.py"
DYNAKV=$TARGET_DIR/release/dynakv
PEER=$TARGET_DIR/release/dynakv-peer-bench

report() { # name pids data-dirs...
  local name=$1 pids=$2
  shift 2
  echo "$name: RSS after loading $KEYS keys of $VALUE_SIZE bytes: $($LIB rss "$pids")"
  local total=0
  for d in "$@"; do
    local b
    b=$(du -sb "$d" | awk '{print $1}')
    total=$((total + b))
    echo "$name: $d: $b bytes on disk, $(python3 -c "print(round($b / $KEYS, 1))") bytes per key"
  done
  echo "$name: all replicas: $total bytes, $(python3 -c "print(round($total / $KEYS, 1))") bytes per key (all copies)"
}

if [[ "${1:-}" == "--etcd-phase" ]]; then
  pids=$(cat "$ETCD_DATA_ROOT"/m*.pid | paste -sd,)
  echo "etcd: RSS before load: $($LIB rss "$pids")"
  "$PEER" etcd -e "$ETCD_ENDPOINTS" --load-only -c "$CLIENTS" -k "$KEYS" -s "$VALUE_SIZE" \
    --no-progress | grep -E '^(load|  insert)'
  sleep 2
  report etcd "$pids" "$ETCD_DATA_ROOT"/m*/data
  exit 0
fi

OUT=${OUT:-${TMPDIR:-/tmp}/dynakv-bench/memory-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
BENCH_DIR=${BENCH_DIR:-$(mktemp -d -t dynakv-mem.XXXXXX)}
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p dynakv-node -p dynakv-peers >&2

DEV_PID=
stop_dev() {
  if [[ -n "$DEV_PID" ]]; then
    kill -TERM "$DEV_PID" 2>/dev/null || true
    wait "$DEV_PID" 2>/dev/null || true
    DEV_PID=
  fi
}
trap stop_dev EXIT
trap 'exit 130' INT TERM

exec > >(tee "$OUT/memory.txt") 2>&1
echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine: $($LIB machine)"
rm -rf "$BENCH_DIR/dynakv"
# shellcheck disable=SC2086 # DEV_ARGS is a list of flags
"$DYNAKV" dev --insecure --data-dir "$BENCH_DIR/dynakv" ${DEV_ARGS:-} >"$OUT/dynakv-dev.log" 2>&1 &
DEV_PID=$!
pids=$($LIB dev-ready "$OUT/dynakv-dev.log" "$DEV_PID")
echo "dynakv: RSS before load: $($LIB rss "$pids")"
"$DYNAKV" bench --load-only -c "$CLIENTS" -k "$KEYS" -s "$VALUE_SIZE" --no-progress \
  | grep -E '^(load|  insert)'
sleep 2
report dynakv "$pids" "$BENCH_DIR"/dynakv/n*/data
stop_dev

if [[ "${ETCD:-1}" == 1 ]]; then
  ETCD_DATA_ROOT="$BENCH_DIR/etcd" KEEP_DATA=1 "$REPO/scripts/etcd-cluster.sh" -- \
    "$REPO/scripts/bench-memory.sh" --etcd-phase
fi
