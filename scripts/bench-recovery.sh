#!/usr/bin/env bash
# Time from a node's return to identical Merkle roots, and the hint queue it finds, on a 5-node
# `dynakv dev` cluster (n=3, W=2):
#   1. kill n5, 2. write KEYS keys (dynakv bench --load-only), 3. read the hint queues,
#   4. restart n5 and poll `dynakv cluster roots` until every pair of replicas is identical.
# Run twice: with hints (default) and with hints disabled (anti-entropy alone).
#
#   scripts/bench-recovery.sh            # KEYS=20000 VALUE_SIZE=100 by default
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-20000}
VALUE_SIZE=${VALUE_SIZE:-100}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
DYNAKV=$TARGET_DIR/release/dynakv
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p dynakv-node >&2
BASE=127.0.3.2
EP=127.0.3.2:7100,127.0.3.3:7100,127.0.3.4:7100

now() { python3 -c 'import time; print(time.time())'; }

run() { # label, extra dev args...
  local label=$1
  shift
  local dir
  dir=$(mktemp -d -t dynakv-recovery.XXXXXX)
  "$DYNAKV" dev --insecure --nodes 5 --data-dir "$dir" --base-ip $BASE "$@" >"$dir/dev.out" 2>&1 &
  local dev=$!
  trap "kill -TERM $dev 2>/dev/null; pkill -f '$dir/n5/config.yaml' 2>/dev/null" EXIT
  for _ in $(seq 1 100); do grep -q '^ready' "$dir/dev.out" && break; sleep 0.2; done
  local n5
  n5=$(pgrep -f "$dir/n5/config.yaml")
  kill -9 "$n5"
  "$DYNAKV" bench -e "$EP" --load-only -k "$KEYS" -s "$VALUE_SIZE" -c 32 --no-progress \
    | grep -E '^(load|  insert)' || true
  local hints
  # `cluster roots` exits 1 while replicas differ (n5 is down): that is expected here.
  hints=$({ "$DYNAKV" cluster roots -e "$EP" -o json || true; } | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(sum(h["count"] for n in d["nodes"] if n["hints"] for h in n["hints"] if h["target"] == "n5"))')
  "$DYNAKV" serve --config "$dir/n5/config.yaml" 2>>"$dir/n5/node.log" &
  local back=$!
  local t0 t1
  t0=$(now)
  until "$DYNAKV" cluster roots -e "$EP" -o json >/dev/null 2>&1; do sleep 0.2; done
  t1=$(now)
  echo "$label: $KEYS keys of $VALUE_SIZE bytes written with n5 down; hints queued for n5: $hints;" \
    "identical Merkle roots $(python3 -c "print(round($t1 - $t0, 2))") s after n5 restarted"
  kill -TERM "$back" "$dev" 2>/dev/null || true
  wait "$back" "$dev" 2>/dev/null || true
  rm -rf "$dir"
}

run "hints on " --set anti_entropy.interval_ms=5000
run "hints off" --set hints.max_per_target=0 --set anti_entropy.interval_ms=5000
