#!/usr/bin/env bash
# What token-aware routing saves on a cluster larger than N: `dynakv dev` with NODES nodes
# (n = 3), then W=2 puts and R=2 gets from CLIENTS clients spread over every node, each run
# twice in a row: with the bench's routing (each key sent to one of its replicas, `KV.Ring`) and
# with `--no-routing` (each request to the client task's own node, which forwards a put it does
# not replicate). The pairs are interleaved ROUNDS times, so a machine whose speed drifts moves
# both sides of a pair alike. Prints one line per run: ops/s, errors, latency, and the CPU of the
# nodes and of the client per operation (docs/benchmarks.md, "Token-aware routing on five
# nodes").
#
#   scripts/bench-routing.sh                          # NODES=5 CLIENTS=64 ROUNDS=3 DURATION=10s
#
# Settings (environment): NODES (5), CLIENTS (64), ROUNDS (3), DURATION (10s), WARMUP (2s), KEYS
# (100000), VALUE_SIZE (1024), BASE_IP (127.0.6.2), CARGO_TARGET_DIR. The gets read the keys the
# puts wrote (a key not written yet reads as absent, through the same quorum read).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

NODES=${NODES:-5}
CLIENTS=${CLIENTS:-64}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
KEYS=${KEYS:-100000}
VALUE_SIZE=${VALUE_SIZE:-1024}
BASE_IP=${BASE_IP:-127.0.6.2}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
DYNAKV=$TARGET_DIR/release/dynakv
LIB="python3 $REPO/scripts/benchlib.py"

echo "building (release)..." >&2
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p dynakv-node >&2
echo "commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%dT%H:%M:%SZ)" >&2

DATA=$(mktemp -d -t dynakv-routing.XXXXXX)
OUT=$DATA/results
mkdir -p "$OUT"
"$DYNAKV" dev --nodes "$NODES" --data-dir "$DATA/dev" --base-ip "$BASE_IP" --insecure \
  >"$DATA/dev.log" 2>&1 &
DEV=$!
cleanup() {
  kill "$DEV" 2>/dev/null || true
  wait "$DEV" 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT

# Ready when dev says so (its log names each node's pid).
PIDS=$($LIB dev-ready "$DATA/dev.log" "$DEV")
# The endpoints: node i listens on BASE_IP + i.
IFS=. read -r a b c d <<<"$BASE_IP"
EPS=$(for ((i = 0; i < NODES; i++)); do echo -n "$a.$b.$c.$((d + i)):7100,"; done)
EPS=${EPS%,}

run() { # label workload [bench args..]
  local label=$1 workload=$2
  shift 2
  $LIB run "$OUT/$label.json" --pids "$PIDS" -- \
    "$DYNAKV" bench -e "$EPS" -W "$workload" -c "$CLIENTS" -w 2 -r 2 -d uniform -k "$KEYS" \
    -s "$VALUE_SIZE" -t "$DURATION" --warmup "$WARMUP" --no-progress -o json "$@" >/dev/null
  python3 - "$OUT/$label.json" "$label" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r, m = d["run"], d["measured_by_script"]
cpu = sum(v["cpu_s"] for v in m["servers"].values())
ok = [o["latency_ms"] for o in r["by_op"] if o["outcome"] == "ok"][0]
ops = r["ops_per_s"] * m["wall_s"]
print("%-14s ops/s %6.0f  errors %d  p50 %5.1f  p99 %6.1f  p99.9 %6.1f ms  node us/op %5.1f  client us/op %5.1f"
      % (sys.argv[2], r["ops_per_s"], r["errors"], ok["p50"], ok["p99"], ok["p999"],
         1e6 * cpu / ops, 1e6 * m["client_cpu_s"] / ops))
PY
}

for _ in $(seq "$ROUNDS"); do
  run put-routed w
  run put-unrouted w --no-routing
done
for _ in $(seq "$ROUNDS"); do
  run get-routed c
  run get-unrouted c --no-routing
done
