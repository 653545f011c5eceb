#!/usr/bin/env python3
"""The cost of session replication on the message path (issue 16): QoS 1 to persistent
subscribers on a 3-core cluster with `cluster.session_replicas = 0` against `1`.

    tools/bench_replication.py [--runs 3] [--rate 3000] [--pairs 50] [--shards 1]
                               [--duration 10] [--data-dir] [--out FILE]

For each of RUNS rounds, for each setting (the order alternates from round to round: 0 then 1,
1 then 0, ...): starts a fresh 3-core cluster (tools/bench_failover.py's `Cluster`: node i's
MQTT port 127.0.0.1:BASE+i, default link timings, SHARDS shards a node, no data directory
unless --data-dir), runs

    shardmq-bench run pairs --host N1 --host N2 --host N3 -c PAIRS --total-rate RATE --qos 1
        --duration DURATION --mqtt 5 --clean-start false --session-expiry 3600

(clients go round-robin over the hosts by index and subscriber i has index PAIRS + i, so with
PAIRS not a multiple of 3 every pair's publisher and subscriber are on different nodes: each
delivery crosses a data link, and each subscriber's session is replicated to one other node
when replicas = 1), and reads the CPU time (utime + stime in /proc/PID/stat) of the three node
processes just before the generator starts and just after it ends. CPU per delivered message
is that difference over the generator's `received` count (the whole run: connects, warm-up and
the measured seconds; the connects of 2 x PAIRS clients are a small part). Before stopping the
cluster it reads each node's `sessions` status (home, replica counts) to show that the
setting took effect. Prints one line per run and the medians per setting; --out appends them
as Markdown. Build first: `cargo build --release`.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_failover import NODES, ROOT, SHARDMQ, Cluster, TrialError, markdown_header  # noqa: E402

BENCH = os.path.join(ROOT, "target", "release", "shardmq-bench")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    # Fields after the command name (which may hold spaces) start at the state, field 3.
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def one_run(args, replicas, work):
    cluster = Cluster(types.SimpleNamespace(
        base_port=args.base_port, fast_links=False, shards=args.shards, replicas=replicas,
        data_dir=args.data_dir), work)
    try:
        cluster.wait("every node sees 3 members",
                     lambda: all(len(cluster.status(i)["members"]) == 3 for i in NODES))
        time.sleep(1)
        pids = [p.pid for p in cluster.processes.values()]
        hosts = sum((["--host", f"127.0.0.1:{cluster.mqtt[i]}"] for i in NODES), [])
        command = [BENCH, "run", "pairs", *hosts, "-c", str(args.pairs), "--total-rate", str(args.rate),
                   "--qos", "1", "--duration", str(args.duration), "--mqtt", "5",
                   "--clean-start", "false", "--session-expiry", "3600",
                   "--label", f"replicas-{replicas}", "--json", os.path.join(work, "summary.json")]
        load = open("/proc/loadavg").read().split()[0]
        before = sum(cpu_seconds(pid) for pid in pids)
        started = time.monotonic()
        finished = subprocess.run(command, capture_output=True, text=True,
                                  timeout=args.duration + 120)
        wall = time.monotonic() - started
        after = sum(cpu_seconds(pid) for pid in pids)
        sessions = [cluster.status(i)["sessions"] for i in NODES]
        try:
            summary = json.load(open(os.path.join(work, "summary.json")))
        except (OSError, ValueError):
            raise TrialError(f"no summary (exit {finished.returncode}): {finished.stderr[-500:]}")
        return {
            "replicas": replicas, "exit": finished.returncode, "load": load, "wall_s": wall,
            "delivered": summary["messages_per_second"], "offered": summary["offered_per_second"],
            "p50": summary["latency_us"]["p50"], "p99": summary["latency_us"]["p99"],
            "ack_p50": summary["acknowledgement_us"]["p50"], "ack_p99": summary["acknowledgement_us"]["p99"],
            "received": summary["received"], "lost": summary["lost"],
            "cpu_s": after - before,
            "cpu_us_per_message": (after - before) * 1e6 / summary["received"] if summary["received"] else None,
            "home": sum(s.get("home", 0) for s in sessions),
            "replica": sum(s.get("replica", 0) for s in sessions),
            "command": " ".join(command),
        }
    finally:
        cluster.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=3000)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--base-port", type=int, default=23500)
    parser.add_argument("--data-dir", action="store_true", help="give each node a fresh data directory")
    parser.add_argument("--out", help="append the results as Markdown to this file")
    args = parser.parse_args()
    for binary in (SHARDMQ, BENCH):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} is missing: cargo build --release")
    root = tempfile.mkdtemp(prefix="bench-replication-")
    load_before = open("/proc/loadavg").read().split()[:3]
    rows = []
    for run in range(1, args.runs + 1):
        order = (0, 1) if run % 2 else (1, 0)
        for replicas in order:
            work = os.path.join(root, f"run-{run}-replicas-{replicas}")
            os.makedirs(work)
            try:
                row = one_run(args, replicas, work)
            except (TrialError, OSError, subprocess.TimeoutExpired) as error:
                print(f"run {run} replicas {replicas}: failed: {error!r} (logs in {work})", flush=True)
                continue
            row["run"] = run
            rows.append(row)
            print(f"run {run} replicas {replicas}: {row['delivered']:.0f} msg/s of {row['offered']:.0f}, "
                  f"p50 {row['p50']} us, p99 {row['p99']} us, PUBACK p50 {row['ack_p50']} p99 {row['ack_p99']} us, "
                  f"lost {row['lost']}, CPU {row['cpu_s']:.2f} s for {row['received']} messages = "
                  f"{row['cpu_us_per_message']:.1f} us/msg, sessions home {row['home']} replica {row['replica']}, "
                  f"exit {row['exit']}, load {row['load']}", flush=True)
            if row["exit"] == 0:
                shutil.rmtree(work, ignore_errors=True)
    load_after = open("/proc/loadavg").read().split()[:3]
    medians = {}
    for replicas in (0, 1):
        mine = [r for r in rows if r["replicas"] == replicas]
        if mine:
            medians[replicas] = {key: statistics.median(r[key] for r in mine)
                                 for key in ("delivered", "p50", "p99", "ack_p50", "ack_p99", "cpu_us_per_message")}
            m = medians[replicas]
            print(f"median replicas {replicas} ({len(mine)} runs): {m['delivered']:.0f} msg/s, p50 {m['p50']:.0f} us, "
                  f"p99 {m['p99']:.0f} us, PUBACK p50 {m['ack_p50']:.0f} p99 {m['ack_p99']:.0f} us, "
                  f"{m['cpu_us_per_message']:.1f} us CPU/msg")
    print(f"load average before {load_before}, after {load_after}")
    if args.out:
        write_markdown(args, rows, medians, load_before, load_after)
    return 0 if rows and all(r["exit"] == 0 for r in rows) else 1


def write_markdown(args, rows, medians, load_before, load_after):
    lines = [*markdown_header(load_before, load_after),
             f"- generator (run 1): `{rows[0]['command'] if rows else '-'}`", "",
             "| replicas | runs | delivered msg/s | end-to-end p50 us | p99 us | PUBACK p50 us | PUBACK p99 us | broker CPU us per message |",
             "|---|---|---|---|---|---|---|---|"]
    for replicas, m in medians.items():
        count = sum(1 for r in rows if r["replicas"] == replicas)
        lines.append(f"| {replicas} | {count} | {m['delivered']:.0f} | {m['p50']:.0f} | {m['p99']:.0f} | "
                     f"{m['ack_p50']:.0f} | {m['ack_p99']:.0f} | {m['cpu_us_per_message']:.1f} |")
    if 0 in medians and 1 in medians:
        a, b = medians[0], medians[1]
        ratio = lambda x, y: f"{y / x:.2f}x" if x else "-"
        lines.append(f"| 1 vs 0 | | {ratio(a['delivered'], b['delivered'])} | {ratio(a['p50'], b['p50'])} | "
                     f"{ratio(a['p99'], b['p99'])} | {ratio(a['ack_p50'], b['ack_p50'])} | "
                     f"{ratio(a['ack_p99'], b['ack_p99'])} | {ratio(a['cpu_us_per_message'], b['cpu_us_per_message'])} |")
    lines += ["", "| run | replicas | delivered msg/s | offered | p50 us | p99 us | PUBACK p50 | PUBACK p99 | lost | received | node CPU s | CPU us/msg | sessions home / replica | load (1 min) | exit |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['replicas']} | {r['delivered']:.0f} | {r['offered']:.0f} | {r['p50']} | "
                     f"{r['p99']} | {r['ack_p50']} | {r['ack_p99']} | {r['lost']} | {r['received']} | "
                     f"{r['cpu_s']:.2f} | {r['cpu_us_per_message']:.1f} | {r['home']} / {r['replica']} | "
                     f"{r['load']} | {r['exit']} |")
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    sys.exit(main())
