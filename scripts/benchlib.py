#!/usr/bin/env python3
"""Helpers of the benchmark scripts (standard library only).

  benchlib.py fsync DIR [SECONDS]          disk fsync rates in DIR (JSON on stdout)
  benchlib.py run OUT.json --pids P,.. [--metrics URL,..] -- CMD ARGS..
                                           runs a `... bench -o json` command, adds the CPU
                                           seconds of the server processes, of the client, and
                                           deltas of DynaKV's storage metrics; writes OUT.json
  benchlib.py rss PID,..                   VmRSS/VmHWM of processes (JSON)
  benchlib.py summary DIR                  compares the dynakv-* and etcd-* results of a run
  benchlib.py machine DIR                  cores, CPU model, memory, kernel (JSON)
  benchlib.py dev-ready LOG PID            waits (60 s at most) for `dynakv dev` (process PID,
                                           output in LOG) to print `ready:`; prints its nodes'
                                           pids (comma-separated), or the log and exit 1
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def fsync_rates(directory, seconds=3.0):
    """Writes+fdatasyncs per second: one 4 KiB write per fsync (what an unbatched store can ack),
    and 64 x 1 KiB writes per fsync (what group commit can ack)."""
    path = os.path.join(directory, "fsync-probe.bin")
    out = {"dir": directory}
    try:
        for name, writes_per_sync, size in (("single_4k", 1, 4096), ("batch_64x1k", 64, 1024)):
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                buf = os.urandom(size)
                syncs = writes = 0
                started = time.monotonic()
                while time.monotonic() - started < seconds:
                    for _ in range(writes_per_sync):
                        os.write(fd, buf)
                        writes += 1
                    os.fdatasync(fd)
                    syncs += 1
                    # Keep the file small: rewrite from the start after 64 MiB.
                    if writes * size > 64 << 20:
                        os.lseek(fd, 0, os.SEEK_SET)
                elapsed = time.monotonic() - started
            finally:
                os.close(fd)
            out[name] = {
                "fsyncs_per_s": round(syncs / elapsed, 1),
                "writes_per_s": round(writes / elapsed, 1),
                "mean_fsync_ms": round(1000 * elapsed / syncs, 3),
            }
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return out


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of stat; after the ")" they are at 11 and 12.
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def status_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# What `run` reads of each node's /metrics.
STORAGE_METRICS = {
    "dynakv_storage_batch_ops_sum",
    "dynakv_storage_batch_ops_count",
    "dynakv_storage_commit_seconds_sum",
    "dynakv_storage_commit_seconds_count",
    "dynakv_forwarded_requests_total",
    "dynakv_read_repairs_total",
}


def scrape(url, wanted=STORAGE_METRICS):
    """The `wanted` series of one node's /metrics (None if it does not answer). A bare name is
    summed over its labels; `name{label="value"}` is that series alone."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m:
            continue
        series = m.group(1) + (m.group(2) or "")
        key = series if series in wanted else m.group(1) if m.group(1) in wanted else None
        if key:
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def run(out_path, pids, urls, cmd):
    before_cpu = {p: cpu_seconds(p) for p in pids}
    before_metrics = {u: scrape(u) for u in urls}
    started = time.monotonic()
    rusage_before = os.times()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE)
    rusage_after = os.times()
    wall = time.monotonic() - started
    after_cpu = {p: cpu_seconds(p) for p in pids}
    after_metrics = {u: scrape(u) for u in urls}
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        sys.stderr.write(proc.stdout.decode(errors="replace"))
        report = {"error": {"code": "NO_REPORT", "message": f"exit status {proc.returncode}"}}
    servers = {}
    for p in pids:
        if before_cpu[p] is not None and after_cpu[p] is not None:
            servers[p] = {
                "cpu_s": round(after_cpu[p] - before_cpu[p], 2),
                "cpu_percent": round(100 * (after_cpu[p] - before_cpu[p]) / wall, 1),
                "rss_kb": status_kb(p, "VmRSS"),
            }
    storage = {}
    for u in urls:
        b, a = before_metrics[u], after_metrics[u]
        if not a or not b:
            continue
        d = {k: a.get(k, 0.0) - b.get(k, 0.0) for k in a}
        commits = d.get("dynakv_storage_batch_ops_count", 0.0)
        storage[u] = {
            "commits": int(commits),
            "mean_batch_ops": round(d.get("dynakv_storage_batch_ops_sum", 0.0) / commits, 2)
            if commits
            else None,
            "mean_commit_ms": round(
                1000 * d.get("dynakv_storage_commit_seconds_sum", 0.0) / commits, 3
            )
            if commits
            else None,
            "commits_per_s": round(commits / wall, 1),
            "forwarded": int(d.get("dynakv_forwarded_requests_total", 0.0)),
            "read_repairs": int(d.get("dynakv_read_repairs_total", 0.0)),
        }
    client_cpu = (rusage_after.children_user - rusage_before.children_user) + (
        rusage_after.children_system - rusage_before.children_system
    )
    report["measured_by_script"] = {
        "wall_s": round(wall, 2),
        "client_cpu_s": round(client_cpu, 2),
        "client_cpu_percent": round(100 * client_cpu / wall, 1),
        "servers": servers,
        "storage": storage,
        "command": " ".join(cmd),
    }
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    return proc.returncode


def machine():
    info = {"cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    info["kernel"] = os.uname().release
    return info


def load(path):
    with open(path) as f:
        return json.load(f)


def row_of(report):
    """(ok ops/s, p50, p99, p99.9 of the main op's ok row) of a run report."""
    run = report.get("run") or {}
    rows = [r for r in run.get("by_op", []) if r["outcome"] in ("ok", "not_found")]
    if not rows:
        return None
    main = max(rows, key=lambda r: r["count"])
    lat = main["latency_ms"]
    return {
        "ops_per_s": run["ops_per_s"],
        "p50": lat["p50"],
        "p99": lat["p99"],
        "p999": lat["p999"],
        "errors": run["errors"],
    }


def summary(directory):
    """Markdown tables: each DynaKV figure beside the etcd figure it is compared with."""
    # (title, dynakv file stem, etcd file stem); {c} is the client count.
    pairs = [
        ("put, W=2 (QUORUM) vs etcd put", "dynakv-put-w2-c{c}", "etcd-put-c{c}"),
        ("put, W=ONE vs etcd put", "dynakv-put-wone-c{c}", "etcd-put-c{c}"),
        ("get, R=2 (QUORUM) vs etcd linearizable get", "dynakv-get-r2-c{c}", "etcd-get-lin-c{c}"),
        ("get, R=ONE vs etcd serializable get", "dynakv-get-rone-c{c}", "etcd-get-ser-c{c}"),
        ("cart (read, add an item, write back with the read's context) vs etcd Range + Txn",
         "dynakv-cart-c{c}", "etcd-cart-c{c}"),
    ]
    files = set(os.listdir(directory))
    clients = sorted(
        {int(m.group(1)) for f in files for m in [re.search(r"-c(\d+)\.json$", f)] if m}
    )
    lines = []
    for title, dk, et in pairs:
        lines.append(f"### {title}\n")
        lines.append(
            "| clients | DynaKV ops/s | p50 ms | p99 ms | p99.9 ms | etcd ops/s | p50 ms | p99 ms "
            "| p99.9 ms | ratio (ops/s) |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in clients:
            a_path = os.path.join(directory, dk.format(c=c) + ".json")
            b_path = os.path.join(directory, et.format(c=c) + ".json")
            a = row_of(load(a_path)) if os.path.exists(a_path) else None
            b = row_of(load(b_path)) if os.path.exists(b_path) else None
            if not a and not b:
                continue

            def cells(r):
                if not r:
                    return ["-"] * 4
                err = f" ({r['errors']} err)" if r["errors"] else ""
                return [f"{r['ops_per_s']:.0f}{err}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                        f"{r['p999']:.2f}"]

            ratio = f"{a['ops_per_s'] / b['ops_per_s']:.2f}x" if a and b and b["ops_per_s"] else "-"
            lines.append("| " + " | ".join([str(c)] + cells(a) + cells(b) + [ratio]) + " |")
        lines.append("")
    # Server-side evidence for the 64-client DynaKV runs.
    lines.append("### DynaKV server side (64 clients)\n")
    lines.append("| run | node CPU % (each) | client CPU % | commits/s per node | mean batch ops | mean commit ms |")
    lines.append("|---|---|---:|---|---|---|")
    for stem in ("dynakv-put-w2-c64", "dynakv-put-wone-c64", "dynakv-get-r2-c64", "dynakv-get-rone-c64",
                 "dynakv-cart-c64", "etcd-put-c64", "etcd-get-lin-c64", "etcd-cart-c64"):
        path = os.path.join(directory, stem + ".json")
        if not os.path.exists(path):
            continue
        m = load(path).get("measured_by_script", {})
        cpu = ", ".join(f"{s['cpu_percent']:.0f}" for s in m.get("servers", {}).values())
        st = m.get("storage", {}).values()
        cps = ", ".join(f"{s['commits_per_s']:.0f}" for s in st) or "-"
        batch = ", ".join(f"{s['mean_batch_ops']}" for s in st) or "-"
        commit = ", ".join(f"{s['mean_commit_ms']}" for s in st) or "-"
        lines.append(f"| {stem} | {cpu} | {m.get('client_cpu_percent', '-')} | {cps} | {batch} | {commit} |")
    return "\n".join(lines) + "\n"


def dev_ready(log, pid, seconds=60.0):
    """The node pids of a `dynakv dev` once its log says `ready:`, or None (dead or too slow)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = open(log, errors="replace").read() if os.path.exists(log) else ""
        if re.search(r"^ready:", text, re.M):
            return re.findall(r" pid (\d+)", text)
        try:
            os.kill(int(pid), 0)
        except OSError:
            return None
        time.sleep(0.1)
    return None


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd = argv[1]
    if cmd == "fsync":
        seconds = float(argv[3]) if len(argv) > 3 else 3.0
        print(json.dumps(fsync_rates(argv[2], seconds)))
        return 0
    if cmd == "machine":
        print(json.dumps(machine()))
        return 0
    if cmd == "rss":
        pids = [p for p in argv[2].split(",") if p]
        print(json.dumps({p: {"rss_kb": status_kb(p, "VmRSS"), "hwm_kb": status_kb(p, "VmHWM")}
                          for p in pids}))
        return 0
    if cmd == "dev-ready":
        pids = dev_ready(argv[2], argv[3])
        if pids is None:
            print("dev cluster not ready", file=sys.stderr)
            if os.path.exists(argv[2]):
                sys.stderr.write(open(argv[2], errors="replace").read())
            return 1
        print(",".join(pids))
        return 0
    if cmd == "summary":
        sys.stdout.write(summary(argv[2]))
        return 0
    if cmd == "run":
        out = argv[2]
        rest = argv[3:]
        pids, urls = [], []
        while rest and rest[0] != "--":
            flag, value = rest[0], rest[1]
            rest = rest[2:]
            if flag == "--pids":
                pids = [p for p in value.split(",") if p]
            elif flag == "--metrics":
                urls = [u for u in value.split(",") if u]
            else:
                print(f"unknown flag {flag}", file=sys.stderr)
                return 2
        return run(out, pids, urls, rest[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
