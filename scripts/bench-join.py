#!/usr/bin/env python3
"""A node joins a loaded 3-node cluster: handoff rate, time until it serves its share, and the
foreground p99 during the handoff against before it (issue: membership change, performance).

  1. `dynakv dev` (3 nodes, n=3, on 127.0.4.2-4), KEYS keys of VALUE_SIZE bytes loaded;
  2. BEFORE: `dynakv bench` (YCSB A, CLIENTS clients) in CHUNK_S chunks, twice;
  3. n4 starts with --seed and `dynakv cluster weight n4 100` runs (one step: the whole share);
     `dynakv cluster status` is sampled every 0.5 s (phase, bytes moved) while the same bench
     runs in CHUNK_S chunks until the change is done;
  4. prints one JSON object: the streaming rate (bytes moved / time in phase "streaming"), the
     time from the request until n4 serves its share (the change committed), and each chunk's
     p99 per operation, marked before / during / after, with where the machine's time went in
     it (`cpu`: busy, iowait and steal shares of all cores, and the nodes' share) and what the
     nodes did besides (`nodes`, summed over all: gossip packets sent per second, a few per node
     in steady state, and rejoins; anti-entropy keys repaired and bytes sent; keys old owners
     dropped; read repairs).

  scripts/bench-join.py                       # KEYS=1000000 VALUE_SIZE=1024 by default
  KEYS=200000 scripts/bench-join.py           # a quicker run
  RATE=134217728 scripts/bench-join.py        # handoff.max_bytes_per_sec (default: the node's)
  SETS="handoff.parallel_ranges=4" scripts/bench-join.py  # more `--set`s for every node
  CLIENTS=0 scripts/bench-join.py             # the handoff alone, no foreground load
  AFTER=4 scripts/bench-join.py               # bench chunks after the commit (default 1)
  PROFILE=/tmp/join.perf scripts/bench-join.py # `perf record -a -g` for PROFILE_S (5) seconds
                                               # from the first "streaming" sample
  PROFILE_AT=commit PROFILE=/tmp/c.perf ...    # the same from the change's commit on
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import benchlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = int(os.environ.get("KEYS", "1000000"))
VALUE_SIZE = int(os.environ.get("VALUE_SIZE", "1024"))
CLIENTS = int(os.environ.get("CLIENTS", "16"))
CHUNK_S = int(os.environ.get("CHUNK_S", "10"))
AFTER = int(os.environ.get("AFTER", "1"))
RATE = os.environ.get("RATE")
SETS = os.environ.get("SETS", "")
PROFILE = os.environ.get("PROFILE")
PROFILE_S = os.environ.get("PROFILE_S", "5")
PROFILE_AT = os.environ.get("PROFILE_AT", "streaming")
BASE = "127.0.4."
EP = ",".join(f"{BASE}{i}:7100" for i in (2, 3, 4))


def dynakv_path():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    subprocess.run(
        ["cargo", "build", "--release", "-p", "dynakv-node"],
        cwd=ROOT,
        check=True,
        stdout=sys.stderr,
        env=dict(os.environ, CARGO_TARGET_DIR=target),
    )
    return os.path.join(target, "release", "dynakv")


def status(dynakv, quiet=False):
    out = subprocess.run(
        [dynakv, "cluster", "status", "-o", "json", "-e", EP],
        capture_output=True,
        text=True,
    )
    try:
        s = json.loads(out.stdout)
    except json.JSONDecodeError:
        s = None
    if out.returncode != 0 or not isinstance(s, dict) or "rebalance" not in s:
        # A sample missed (a node busy or restarting): say why and go on with the next one.
        if not quiet:
            print(f"bench-join: cluster status failed (exit {out.returncode}): "
                  f"{(out.stdout or out.stderr).strip()[:300]}", file=sys.stderr)
        return None
    return s


def cpu_snapshot(work):
    """Machine-wide CPU ticks by kind, and the CPU ticks of the nodes (every process whose
    command line names the run's directory)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    machine = {"busy": sum(fields[0:3]) + sum(fields[5:7]), "idle": fields[3],
               "iowait": fields[4], "steal": fields[7] if len(fields) > 7 else 0}
    nodes = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if work.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            nodes += int(stat[11]) + int(stat[12])
        except OSError:
            continue
    return machine, nodes


def cpu_delta(before, after):
    """Shares of the machine's time in a chunk (percent of all cores), and the nodes' share."""
    (m0, n0), (m1, n1) = before, after
    total = sum(m1[k] - m0[k] for k in m0) or 1
    out = {k + "_pct": round(100 * (m1[k] - m0[k]) / total, 1) for k in m0 if k != "idle"}
    out["nodes_pct"] = round(100 * (n1 - n0) / total, 1)
    return out


# Counters summed over every node per chunk: what the nodes did besides serving the bench.
COUNTERS = {
    'dynakv_gossip_packets_total{outcome="sent"}': "gossip_sent",
    "dynakv_gossip_rejoins_total": "gossip_rejoins",
    "dynakv_antientropy_keys_repaired_total": "antientropy_keys_repaired",
    "dynakv_antientropy_sent_bytes_total": "antientropy_sent_bytes",
    "dynakv_handoff_dropped_keys_total": "dropped_keys",
    "dynakv_read_repairs_total": "read_repairs",
}


def node_counters():
    """COUNTERS summed over every node that answers /metrics, and when they were read."""
    out = dict.fromkeys(COUNTERS.values(), 0)
    for i in (2, 3, 4, 5):
        scraped = benchlib.scrape(f"http://{BASE}{i}:9100/metrics", wanted=COUNTERS) or {}
        for series, value in scraped.items():
            out[COUNTERS[series]] += int(value)
    return time.time(), out


def bench_chunk(dynakv, work=None):
    started = cpu_snapshot(work) if work else None
    counted = node_counters()
    out = subprocess.run(
        [dynakv, "bench", "-e", EP, "-W", "A", "-k", str(KEYS), "-s", str(VALUE_SIZE),
         "-c", str(CLIENTS), "-t", f"{CHUNK_S}s", "--warmup", "0s", "--no-progress",
         "-o", "json"],
        capture_output=True,
        text=True,
    )
    report = json.loads(out.stdout)
    run = report.get("run") or report
    row = {"ops_per_s": round(run.get("ops_per_s", 0.0), 1)}
    for op in run.get("by_op", []):
        row[op["op"] + "_p99_ms"] = round(op["latency_ms"]["p99"], 2)
    row["errors"] = sum(e.get("count", 0) for e in run.get("error_codes", []))
    if started:
        # Where the machine's time went: a slow chunk with the nodes busy is the product's; one
        # with steal or iowait high, or the nodes idle, is the machine's.
        row["cpu"] = cpu_delta(started, cpu_snapshot(work))
    (t0, c0), (t1, c1) = counted, node_counters()
    row["nodes"] = {k: c1[k] - c0[k] for k in c1}
    row["nodes"]["gossip_sent_per_s"] = round(row["nodes"].pop("gossip_sent") / max(t1 - t0, 0.001), 1)
    return row


def main():
    dynakv = dynakv_path()
    work = tempfile.mkdtemp(prefix="dynakv-join-")
    procs = []
    try:
        sets = ["--set", f"handoff.max_bytes_per_sec={RATE}"] if RATE else []
        for kv in SETS.split():
            sets += ["--set", kv]
        dev = subprocess.Popen(
            [dynakv, "dev", "--insecure", "--nodes", "3", "--data-dir", os.path.join(work, "dev"),
             "--base-ip", BASE + "2", *sets],
            stdout=open(os.path.join(work, "dev.out"), "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(dev)
        for _ in range(200):
            s = status(dynakv, quiet=True)
            if s and sum(m["state"] == "alive" for m in s.get("members", [])) == 3:
                break
            time.sleep(0.2)
        t = time.time()
        subprocess.run(
            [dynakv, "bench", "-e", EP, "--load-only", "-k", str(KEYS), "-s", str(VALUE_SIZE),
             "-c", "64", "--no-progress"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        load_s = time.time() - t
        before = [dict(bench_chunk(dynakv, work), phase="before") for _ in range(2 if CLIENTS else 0)]

        # n4 takes the cluster's settings from n1's config file (its id, addresses and data
        # directory from the flags); it is in no member list and joins through the seed.
        n4 = subprocess.Popen(
            [dynakv, "serve", "--config", os.path.join(work, "dev", "n1", "config.yaml"),
             "--node-id", "n4", "--listen", BASE + "5:7100", "--metrics-listen", BASE + "5:9100",
             "--data-dir", os.path.join(work, "n4"), "--seed", BASE + "2:7100"],
            stdout=open(os.path.join(work, "n4.out"), "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(n4)
        for _ in range(200):
            s = status(dynakv, quiet=True)
            if s and any(m["id"] == "n4" and m["state"] == "alive" for m in s.get("members", [])):
                break
            time.sleep(0.2)

        samples = []
        done = threading.Event()

        profiler = []

        def sample():
            while not done.is_set():
                s = status(dynakv)
                if s:
                    r = s["rebalance"]
                    if PROFILE and PROFILE_AT == "streaming" and not profiler \
                            and r["phase"] == "streaming":
                        profiler.append(subprocess.Popen(
                            ["perf", "record", "-a", "-g", "-F", "999", "-o", PROFILE,
                             "--", "sleep", PROFILE_S],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    samples.append((time.time(), r["active"], r["phase"], r["bytes_done"],
                                    r["keys_done"], r["bytes_total"],
                                    sum(t["retries"] for t in r["transfers"])))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.time()
        change = subprocess.Popen(
            [dynakv, "cluster", "weight", "n4", "100", "--wait", "-o", "json", "-e", EP],
            stdout=subprocess.PIPE,
            text=True,
        )
        during = []
        while change.poll() is None:
            if CLIENTS:
                during.append(dict(bench_chunk(dynakv, work), phase="during"))
            else:
                time.sleep(0.2)
        t1 = time.time()
        done.set()
        sampler.join()
        if PROFILE and PROFILE_AT == "commit":
            profiler.append(subprocess.Popen(
                ["perf", "record", "-a", "-g", "-F", "999", "-o", PROFILE, "--", "sleep", PROFILE_S],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        after = [dict(bench_chunk(dynakv, work), phase="after")
                 for _ in range(AFTER if CLIENTS else 0)]

        for p in profiler:
            p.wait()
        streaming = [s for s in samples if s[2] == "streaming"]
        moved = max((s[3] for s in samples), default=0)
        keys = max((s[4] for s in samples), default=0)
        stream_s = (streaming[-1][0] - streaming[0][0]) if len(streaming) > 1 else None
        final = status(dynakv)
        result = {
            "keys": KEYS,
            "value_size": VALUE_SIZE,
            "load_seconds": round(load_s, 1),
            "handoff_bytes": moved,
            "handoff_keys": keys,
            "streaming_seconds": round(stream_s, 1) if stream_s else None,
            "streaming_mb_per_s": round(moved / stream_s / 1e6, 1) if stream_s else None,
            "seconds_until_n4_serves_its_share": round(t1 - t0, 1),
            "pull_retries": max((s[6] for s in samples), default=0),
            "n4_replica_ownership": next(
                (m["replica_ownership"] for m in (final or {}).get("members", [])
                 if m["id"] == "n4"), None),
            # (seconds since the request, phase, MB moved) about once a second: where the time
            # went when a run is slow.
            "timeline": [(round(s[0] - t0, 1), s[2], round(s[3] / 1e6, 1))
                         for i, s in enumerate(samples) if i % 2 == 0 or i == len(samples) - 1],
            "bench": before + during + after,
        }
        print(json.dumps(result, indent=2))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        # No node may outlive the run: one left on these addresses would join the next run's
        # cluster (same cluster id) and bring its data along.
        subprocess.run(["pkill", "-KILL", "-f", work], check=False)
        if os.environ.get("KEEP"):
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
