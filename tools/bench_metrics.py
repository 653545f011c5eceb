#!/usr/bin/env python3
"""The cost of metrics collection on the message path: one shardmq-bench scenario against a
release broker with nobody scraping, and with `GET /metrics` scraped every second, one after
the other in each round, medians over RUNS rounds, into tuning/results/<date>-metrics-cost.md.

    tools/bench_metrics.py RUNS -- SHARDMQ-BENCH-RUN-ARGS...
    tools/bench_metrics.py 3 -- pairs -c 50 --rate 2000 --qos 0 --duration 10

The broker runs pinned to core 0 with --shards 1, the generator to core 1. Besides the
generator's figures, the broker's own CPU time (utime + stime of /proc/PID/stat over the
measured run) gives broker CPU microseconds per delivered message.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT, ADMIN_PORT = 18861, 18862
TOKEN = "bench-metrics-token-0123456789"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def scraper(stop, counts):
    request = urllib.request.Request(
        f"http://127.0.0.1:{ADMIN_PORT}/metrics",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                answer.read()
                counts["ok"] += 1
        except OSError:
            counts["failed"] += 1


def run(variant, round_, bench_args, work):
    config = os.path.join(work, "broker.toml")
    with open(config, "w") as f:
        f.write(f'[server]\ndata_dir = ""\n[admin]\nlisten = "127.0.0.1:{ADMIN_PORT}"\n')
    log = open(os.path.join(work, f"{variant}-{round_}.log"), "w")
    broker = subprocess.Popen(
        ["taskset", "-c", "0", f"{ROOT}/target/release/shardmq", "serve", "--shards", "1",
         "--listen", f"127.0.0.1:{PORT}", "--config", config],
        stderr=log, env={**os.environ, "SHARDMQ_ADMIN_TOKEN": TOKEN},
    )
    time.sleep(1.0)
    out = os.path.join(work, f"{variant}-{round_}.json")
    command = ["taskset", "-c", "1", f"{ROOT}/target/release/shardmq-bench", "run", *bench_args,
               "--host", f"127.0.0.1:{PORT}", "--label", variant, "--json", out]
    stop, counts = threading.Event(), {"ok": 0, "failed": 0}
    thread = threading.Thread(target=scraper, args=(stop, counts))
    cpu_before = cpu_seconds(broker.pid)
    if variant == "scrape-1s":
        thread.start()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    cpu_after = cpu_seconds(broker.pid)
    stop.set()
    if thread.is_alive():
        thread.join()
    broker.terminate()
    broker.wait(timeout=30)
    result = json.load(open(out))
    result["broker_cpu_seconds"] = cpu_after - cpu_before
    result["scrapes"] = counts
    return command, result


def main():
    runs = int(sys.argv[1])
    bench_args = sys.argv[3:] if sys.argv[2] == "--" else sys.argv[2:]
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "shardmq", "-p", "shardmq-bench"],
                   cwd=ROOT, check=True)
    variants = ["no-scrape", "scrape-1s"]
    results = {v: [] for v in variants}
    commands = {}
    load_before = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(1, runs + 1):
            for variant in variants:
                command, result = run(variant, round_, bench_args, work)
                commands.setdefault(variant, " ".join(command))
                results[variant].append(result)
                print(variant, round_, result["messages_per_second"], result["scrapes"],
                      f'{result["broker_cpu_seconds"]:.2f} s CPU', flush=True)
    load_after = open("/proc/loadavg").read().split()[:3]

    def med(variant, *path):
        values = []
        for r in results[variant]:
            v = r
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if v is not None:
                values.append(v)
        return statistics.median(values) if values else None

    def cpu_per_message(variant):
        values = [r["broker_cpu_seconds"] / r["received"] * 1e6
                  for r in results[variant] if r.get("received")]
        return statistics.median(values) if values else None

    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                         capture_output=True, text=True).stdout.strip()
    out = os.path.join(ROOT, "tuning/results", f"{datetime.date.today()}-metrics-cost.md")
    lines = [
        f"# The cost of metrics collection: {' '.join(bench_args)}, {datetime.date.today()}",
        "",
        f"- Machine: {cpu}, {os.cpu_count()} vCPU, Linux {platform.release()}; a shared 2-core VM "
        f"(load average {' '.join(load_before)} before, {' '.join(load_after)} after: other "
        "engineers' builds ran at the same time, so absolute figures are noisy; compare the rows)",
        "- shardmq (release) pinned to core 0 with `--shards 1`, the generator to core 1; no data "
        "directory",
        "- `scrape-1s`: `GET /metrics` with the token once a second during the run (every shard "
        "asked for its counters, its sessions walked for the gauges)",
        "- Broker CPU per message: the broker's CPU time over the whole generator run (connects "
        "and warm-up included) over the messages received in the measured window, so an upper "
        "bound, biased alike in both rows",
        f"- Medians over {runs} rounds; in each round the variants run one after the other",
        f"- Reproduce: `tools/bench_metrics.py {runs} -- {' '.join(bench_args)}`",
        "",
        "| variant | delivered msg/s | end-to-end p50 us | p99 us | broker CPU us per message | scrapes answered |",
        "|---|---|---|---|---|---|",
    ]
    fmt = lambda v, p=0: "-" if v is None else f"{v:.{p}f}"
    for variant in variants:
        scrapes = sum(r["scrapes"]["ok"] for r in results[variant])
        lines.append(
            f"| {variant} | {fmt(med(variant, 'messages_per_second'))} | "
            f"{fmt(med(variant, 'latency_us', 'p50'))} | {fmt(med(variant, 'latency_us', 'p99'))} | "
            f"{fmt(cpu_per_message(variant), 3)} | {scrapes} |")
    base, with_scrape = cpu_per_message("no-scrape"), cpu_per_message("scrape-1s")
    if base and with_scrape:
        lines += ["", f"Broker CPU per message with a scrape every second: {with_scrape / base:.3f}x "
                  "the figure without."]
    lines += ["", "Generator commands (round 1):", ""]
    lines += [f"    {commands[v]}" for v in variants]
    open(out, "w").write("\n".join(lines) + "\n")
    print("wrote", out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
