#!/usr/bin/env python3
"""Latency under faults: a 5-node `dynakv dev` cluster under a steady workload while one node is
paused (SIGSTOP) for FAULT_S seconds every PERIOD_S seconds, then cut off by packet drops
(iptables DROP of its loopback address, both ways) on the same schedule.

The workload runs in chunks aligned with the schedule: a healthy chunk of PERIOD_S - FAULT_S
seconds, then a fault chunk of FAULT_S seconds, CYCLES times per fault kind. Clients talk only to
the four healthy nodes (so every request should succeed); one more client process talks to the
faulty node alone, to show how fast it answers or fails. Prints one JSON object: per chunk, the
phase (healthy / paused / cut_off), ops, errors and the p50/p99/p99.9 of successful operations
per op, and a summary of the worst fault-window and healthy-window figures.

  scripts/bench-faults.py                        # 64 clients, workload A, 5 s faults every 15 s
  WORKLOAD=cart CLIENTS=8 scripts/bench-faults.py
  CYCLES=2 KEYS=20000 scripts/bench-faults.py    # quicker
  KINDS=pause scripts/bench-faults.py            # skip the iptables part (needs root + iptables)
  BENCH_ARGS=--no-routing scripts/bench-faults.py # clients that know no ring (nodes forward)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = int(os.environ.get("CLIENTS", "64"))
WORKLOAD = os.environ.get("WORKLOAD", "A")
KEYS = int(os.environ.get("KEYS", "100000"))
VALUE_SIZE = int(os.environ.get("VALUE_SIZE", "100"))
PERIOD_S = int(os.environ.get("PERIOD_S", "15"))
FAULT_S = int(os.environ.get("FAULT_S", "5"))
CYCLES = int(os.environ.get("CYCLES", "4"))
KINDS = os.environ.get("KINDS", "pause,cut").split(",")
BENCH_ARGS = os.environ.get("BENCH_ARGS", "").split()
BASE = "127.0.5."
NODES = 5
FAULTY = NODES  # n5
ADDR = {i: f"{BASE}{i + 1}" for i in range(1, NODES + 1)}
HEALTHY_EP = ",".join(f"{ADDR[i]}:7100" for i in range(1, NODES))
FAULTY_EP = f"{ADDR[FAULTY]}:7100"


def dynakv_path():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    subprocess.run(["cargo", "build", "--release", "-p", "dynakv-node"], cwd=ROOT, check=True,
                   stdout=sys.stderr, env=dict(os.environ, CARGO_TARGET_DIR=target))
    return os.path.join(target, "release", "dynakv")


def status(dynakv):
    out = subprocess.run([dynakv, "cluster", "status", "-o", "json", "-e", HEALTHY_EP],
                         capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return None


def bench(dynakv, endpoints, clients, seconds):
    return subprocess.Popen(
        [dynakv, "bench", "-e", endpoints, "-W", WORKLOAD, "-k", str(KEYS), "-s", str(VALUE_SIZE),
         "-c", str(clients), "-t", f"{seconds}s", "--warmup", "0s", "--no-progress", "-o", "json"]
        + BENCH_ARGS,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def summarize(out):
    """Ops, errors and the latency of successful operations (ok and not found) per op."""
    try:
        run = json.loads(out)["run"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return {"error": "no report"}
    ops = {}
    for row in run.get("by_op", []):
        if row["outcome"] == "error":
            continue
        lat = row["latency_ms"]
        cur = ops.get(row["op"])
        # ok and not_found rows of one op: keep the worse percentiles.
        ops[row["op"]] = {
            "count": row["count"] + (cur["count"] if cur else 0),
            **{q: max(lat[q], cur[q] if cur else 0) for q in ("p50", "p99", "p999", "max")},
        }
    return {"ops_total": run["ops"], "errors": run["errors"], "ops_per_s": run["ops_per_s"],
            "error_codes": run.get("error_codes", []), "ops": ops}


def iptables(action, ip):
    for chain, flag in (("INPUT", "-d"), ("OUTPUT", "-s"), ("INPUT", "-s"), ("OUTPUT", "-d")):
        subprocess.run(["iptables", action, chain, flag, ip, "-j", "DROP"], check=False,
                       stderr=subprocess.DEVNULL)


def main():
    dynakv = dynakv_path()
    work = tempfile.mkdtemp(prefix="dynakv-faults-")
    dev = subprocess.Popen(
        [dynakv, "dev", "--insecure", "--nodes", str(NODES), "--data-dir", os.path.join(work, "dev"),
         "--base-ip", ADDR[1]],
        stdout=open(os.path.join(work, "dev.out"), "w"), stderr=subprocess.STDOUT)
    chunks = []
    cut = False
    try:
        for _ in range(300):
            s = status(dynakv)
            if s and sum(m["state"] == "alive" for m in s.get("members", [])) == NODES:
                break
            time.sleep(0.2)
        subprocess.run([dynakv, "bench", "-e", HEALTHY_EP, "--load-only", "-k", str(KEYS), "-s",
                        str(VALUE_SIZE), "-c", "64", "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL)
        pid = int(subprocess.run(["pgrep", "-f", f"{work}/dev/n{FAULTY}/config.yaml"],
                                 capture_output=True, text=True).stdout.split()[0])
        for kind in KINDS:
            for cycle in range(CYCLES):
                healthy = bench(dynakv, HEALTHY_EP, CLIENTS, PERIOD_S - FAULT_S)
                chunks.append(dict(summarize(healthy.communicate()[0]), phase="healthy",
                                   kind=kind, cycle=cycle))
                faulty_client = bench(dynakv, FAULTY_EP, 4, FAULT_S)
                main_bench = bench(dynakv, HEALTHY_EP, CLIENTS, FAULT_S)
                time.sleep(0.05)
                if kind == "pause":
                    os.kill(pid, signal.SIGSTOP)
                else:
                    iptables("-A", ADDR[FAULTY])
                    cut = True
                out = main_bench.communicate()[0]
                if kind == "pause":
                    os.kill(pid, signal.SIGCONT)
                else:
                    iptables("-D", ADDR[FAULTY])
                    cut = False
                phase = "paused" if kind == "pause" else "cut_off"
                chunks.append(dict(summarize(out), phase=phase, kind=kind, cycle=cycle))
                chunks.append(dict(summarize(faulty_client.communicate()[0]),
                                   phase=phase + "_node_itself", kind=kind, cycle=cycle))
        worst = {}
        for c in chunks:
            for op, v in c.get("ops", {}).items():
                for q in ("p99", "p999"):
                    k = f"{c['phase']}.{op}.{q}"
                    if v.get(q) is not None:
                        worst[k] = max(worst.get(k, 0), v[q])
        print(json.dumps({"clients": CLIENTS, "workload": WORKLOAD, "keys": KEYS,
                          "period_s": PERIOD_S, "fault_s": FAULT_S, "worst_ms": worst,
                          "chunks": chunks}, indent=2))
    finally:
        if cut:
            iptables("-D", ADDR[FAULTY])
        subprocess.run(["pkill", "-CONT", "-f", work], check=False)
        dev.send_signal(signal.SIGTERM)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dev.kill()
        subprocess.run(["pkill", "-KILL", "-f", work], check=False)
        if os.environ.get("KEEP"):
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
