#!/usr/bin/env bash
# DynaKV against a three-member etcd cluster, same machine, same client harness, same workload,
# one after the other in one invocation. Prints both results and their ratio; every figure of
# docs/benchmarks.md comes from here.
#
#   scripts/bench-vs-etcd.sh              # full matrix: put and get at 1, 16 and 64 clients
#   CLIENTS="64" DURATION=5s scripts/bench-vs-etcd.sh    # a quick look
#
# Settings (environment): CLIENTS ("1 16 64"), DURATION (10s), WARMUP (2s), KEYS (100000),
# VALUE_SIZE (1024), DIST (uniform), ROUNDS (1: repeat the whole matrix, e.g. 2 on a shared
# machine), OUT (results; default ${TMPDIR:-/tmp}/dynakv-bench/<UTC time>), BENCH_DIR (data
# directories; default a temporary directory on the disk of $TMPDIR: put it on the disk you want
# to measure), COMMIT (default: `git rev-parse`), CARGO_TARGET_DIR.
#
# Steps: build release; machine facts and the disk's fsync rates (single and batched writes);
# `dynakv dev` (3 nodes, n=3) on its own data directory: puts at W=2 and W=ONE, load, gets at
# R=2 and R=ONE, cart; stop it; scripts/etcd-cluster.sh: puts, load, linearizable and serializable
# gets, cart (Range then Txn);
# stop it; summary. Each result is one JSON file in $OUT with the server CPU, the client CPU and
# DynaKV's group-commit statistics (commits/s, mean batch) of that run added.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CLIENTS=${CLIENTS:-"1 16 64"}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
KEYS=${KEYS:-100000}
VALUE_SIZE=${VALUE_SIZE:-1024}
DIST=${DIST:-uniform}
ROUNDS=${ROUNDS:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
export CLIENTS DURATION WARMUP KEYS VALUE_SIZE DIST TARGET_DIR
LIB="python3 $REPO/scripts/benchlib.py"
DYNAKV=$TARGET_DIR/release/dynakv
PEER=$TARGET_DIR/release/dynakv-peer-bench
COMMON=(-d "$DIST" -k "$KEYS" -s "$VALUE_SIZE" -t "$DURATION" --warmup "$WARMUP" --no-progress -o json)

# Runs with the etcd cluster up (scripts/etcd-cluster.sh calls this script back).
if [[ "${1:-}" == "--etcd-phase" ]]; then
  out=$2
  pids=$(cat "$ETCD_DATA_ROOT"/m*.pid | paste -sd,)
  eps=$ETCD_ENDPOINTS
  for c in $CLIENTS; do
    echo "etcd: put, $c clients" >&2
    $LIB run "$out/etcd-put-c$c.json" --pids "$pids" -- \
      "$PEER" etcd -e "$eps" -W W -c "$c" "${COMMON[@]}"
  done
  echo "etcd: loading $KEYS keys" >&2
  $LIB run "$out/etcd-load.json" --pids "$pids" -- \
    "$PEER" etcd -e "$eps" --load-only -c 64 -k "$KEYS" -s "$VALUE_SIZE" --no-progress -o json
  for c in $CLIENTS; do
    echo "etcd: linearizable get, $c clients" >&2
    $LIB run "$out/etcd-get-lin-c$c.json" --pids "$pids" -- \
      "$PEER" etcd -e "$eps" -W C -c "$c" "${COMMON[@]}"
    echo "etcd: serializable get, $c clients" >&2
    $LIB run "$out/etcd-get-ser-c$c.json" --pids "$pids" -- \
      "$PEER" etcd -e "$eps" -W C -c "$c" --serializable "${COMMON[@]}"
    echo "etcd: cart (Range, then Txn on the revision read), $c clients" >&2
    $LIB run "$out/etcd-cart-c$c.json" --pids "$pids" -- \
      "$PEER" etcd -e "$eps" -W cart -c "$c" "${COMMON[@]}"
  done
  du -sb "$ETCD_DATA_ROOT"/m*/data >"$out/etcd-du.txt"
  exit 0
fi

OUT=${OUT:-${TMPDIR:-/tmp}/dynakv-bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
BENCH_DIR=${BENCH_DIR:-$(mktemp -d -t dynakv-bench.XXXXXX)}
mkdir -p "$BENCH_DIR"
if [[ -z "${COMMIT:-}" ]]; then
  COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]]; then COMMIT="$COMMIT+uncommitted"; fi
fi

echo "building (release)..." >&2
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p dynakv-node -p dynakv-peers >&2

{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $COMMIT"
  echo "machine: $($LIB machine)"
  echo "fsync ($BENCH_DIR): $($LIB fsync "$BENCH_DIR" 3)"
  echo "settings: CLIENTS='$CLIENTS' DURATION=$DURATION WARMUP=$WARMUP KEYS=$KEYS VALUE_SIZE=$VALUE_SIZE DIST=$DIST ROUNDS=$ROUNDS"
  echo "etcd: $(command -v etcd >/dev/null && etcd --version | head -1 || echo 'not installed yet')"
} | tee "$OUT/machine.txt" >&2

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

for round in $(seq "$ROUNDS"); do
  R=$OUT/round$round
  mkdir -p "$R"

  # --- DynaKV: a fresh 3-node dev cluster -----------------------------------------------------
  rm -rf "$BENCH_DIR/dynakv"
  "$DYNAKV" dev --insecure --data-dir "$BENCH_DIR/dynakv" >"$R/dynakv-dev.log" 2>&1 &
  DEV_PID=$!
  pids=$($LIB dev-ready "$R/dynakv-dev.log" "$DEV_PID")
  metrics=$(grep -o 'http://[0-9.:]*/metrics' "$R/dynakv-dev.log" | paste -sd,)

  for c in $CLIENTS; do
    for w in 2 one; do
      echo "round $round dynakv: put W=$w, $c clients" >&2
      $LIB run "$R/dynakv-put-w$w-c$c.json" --pids "$pids" --metrics "$metrics" -- \
        "$DYNAKV" bench -W W -c "$c" -w "$w" "${COMMON[@]}"
    done
  done
  echo "round $round dynakv: loading $KEYS keys (W=2)" >&2
  $LIB run "$R/dynakv-load.json" --pids "$pids" --metrics "$metrics" -- \
    "$DYNAKV" bench --load-only -c 64 -w 2 -k "$KEYS" -s "$VALUE_SIZE" --no-progress -o json
  for c in $CLIENTS; do
    for r in 2 one; do
      echo "round $round dynakv: get R=$r, $c clients" >&2
      $LIB run "$R/dynakv-get-r$r-c$c.json" --pids "$pids" --metrics "$metrics" -- \
        "$DYNAKV" bench -W C -c "$c" -r "$r" "${COMMON[@]}"
    done
    echo "round $round dynakv: cart (R=2 read, W=2 write with its context), $c clients" >&2
    $LIB run "$R/dynakv-cart-c$c.json" --pids "$pids" --metrics "$metrics" -- \
      "$DYNAKV" bench -W cart -c "$c" -r 2 -w 2 "${COMMON[@]}"
  done
  stop_dev
  du -sb "$BENCH_DIR"/dynakv/n*/data >"$R/dynakv-du.txt"

  # --- etcd: a fresh 3-member cluster ---------------------------------------------------------
  ETCD_DATA_ROOT="$BENCH_DIR/etcd" KEEP_DATA=1 "$REPO/scripts/etcd-cluster.sh" -- \
    "$REPO/scripts/bench-vs-etcd.sh" --etcd-phase "$R"

  echo >&2
  echo "=== round $round: $R ===" >&2
  $LIB summary "$R" | tee "$R/summary.md"
done
echo "results: $OUT" >&2
