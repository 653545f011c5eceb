#!/usr/bin/env python3
"""The cost of per-client tracing on the message path when no trace covers the clients: one
shardmq-bench scenario against a release broker built without tracing (BEFORE, the commit
before it), the same broker with it (AFTER) and no trace, and AFTER with a trace running for a
client that is not in the run (the CONNECT check then looks in a non-empty set). The variants
run one after the other in each round; medians over RUNS rounds, into
tuning/results/<date>-trace-cost.md.

    tools/bench_trace.py BEFORE-BINARY AFTER-BINARY BENCH-BINARY RUNS -- SHARDMQ-BENCH-RUN-ARGS...
    tools/bench_trace.py /tmp/shardmq-before target/release/shardmq \
        target/release/shardmq-bench 5 -- pairs -c 50 --rate 2000 --qos 0 --duration 10

Build BEFORE from the commit before the trace change (`git archive 86591b4 | tar -x -C DIR`,
then `cargo build --release -p shardmq` there). The broker runs pinned to core 0 with
--shards 1, the generator to core 1. Broker CPU per message: utime + stime of /proc/PID/stat
over the generator run, over the messages received.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT, ADMIN_PORT = 18871, 18872
TOKEN = "bench-trace-token-0123456789"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_trace():
    request = urllib.request.Request(
        f"http://127.0.0.1:{ADMIN_PORT}/api/v1/traces",
        data=json.dumps({"client_id": "not-in-this-run", "minutes": 5}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 201, answer.status


def run(variant, binary, bench, round_, bench_args, work):
    config = os.path.join(work, "broker.toml")
    with open(config, "w") as f:
        f.write(f'[server]\ndata_dir = ""\n[admin]\nlisten = "127.0.0.1:{ADMIN_PORT}"\n')
    log = open(os.path.join(work, f"{variant}-{round_}.log"), "w")
    broker = subprocess.Popen(
        ["taskset", "-c", "0", binary, "serve", "--shards", "1",
         "--listen", f"127.0.0.1:{PORT}", "--config", config],
        stderr=log, env={**os.environ, "SHARDMQ_ADMIN_TOKEN": TOKEN},
    )
    time.sleep(1.0)
    if variant == "after-trace-other":
        start_trace()
    out = os.path.join(work, f"{variant}-{round_}.json")
    command = ["taskset", "-c", "1", bench, "run", *bench_args,
               "--host", f"127.0.0.1:{PORT}", "--label", variant, "--json", out]
    cpu_before = cpu_seconds(broker.pid)
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    cpu_after = cpu_seconds(broker.pid)
    broker.terminate()
    broker.wait(timeout=30)
    result = json.load(open(out))
    result["broker_cpu_seconds"] = cpu_after - cpu_before
    return command, result


def main():
    before, after, bench, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    bench_args = sys.argv[6:] if sys.argv[5] == "--" else sys.argv[5:]
    variants = [("before", before), ("after", after), ("after-trace-other", after)]
    results = {v: [] for v, _ in variants}
    commands = {}
    load_before = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(1, runs + 1):
            for variant, binary in variants:
                command, result = run(variant, binary, bench, round_, bench_args, work)
                commands.setdefault(variant, " ".join(command))
                results[variant].append(result)
                print(variant, round_, result["messages_per_second"],
                      f'{result["broker_cpu_seconds"]:.2f} s CPU', flush=True)
    load_after = open("/proc/loadavg").read().split()[:3]

    def values(variant, *path):
        out = []
        for r in results[variant]:
            v = r
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if v is not None:
                out.append(v)
        return out

    def cpu_per_message(variant):
        return [r["broker_cpu_seconds"] / r["received"] * 1e6
                for r in results[variant] if r.get("received")]

    med = lambda xs: statistics.median(xs) if xs else None
    spread = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}" if xs else "-"
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                         capture_output=True, text=True).stdout.strip()
    out = os.path.join(ROOT, "tuning/results", f"{datetime.date.today()}-trace-cost.md")
    lines = [
        f"# The cost of per-client tracing when no trace covers the clients: {' '.join(bench_args)}, {datetime.date.today()}",
        "",
        f"- Machine: {cpu}, {os.cpu_count()} vCPU, Linux {platform.release()}; a shared 2-core VM "
        f"(load average {' '.join(load_before)} before, {' '.join(load_after)} after: other "
        "engineers' builds ran at the same time, so absolute figures are noisy; compare the rows)",
        "- shardmq (release) pinned to core 0 with `--shards 1`, the generator to core 1; no data "
        "directory",
        "- `before`: the commit before the trace change; `after`: with it, no trace running; "
        "`after-trace-other`: with a trace running for a client id that is not in the run",
        "- Broker CPU per message: the broker's CPU time over the whole generator run (connects "
        "and warm-up included) over the messages received in the measured window",
        f"- Medians over {runs} rounds (min-max of the CPU figure in brackets); in each round the "
        "variants run one after the other",
        f"- Reproduce: `tools/bench_trace.py BEFORE AFTER BENCH {runs} -- {' '.join(bench_args)}`",
        "",
        "| variant | delivered msg/s | end-to-end p50 us | p99 us | broker CPU us per message (min-max) |",
        "|---|---|---|---|---|",
    ]
    fmt = lambda v, p=0: "-" if v is None else f"{v:.{p}f}"
    for variant, _ in variants:
        lines.append(
            f"| {variant} | {fmt(med(values(variant, 'messages_per_second')))} | "
            f"{fmt(med(values(variant, 'latency_us', 'p50')))} | "
            f"{fmt(med(values(variant, 'latency_us', 'p99')))} | "
            f"{fmt(med(cpu_per_message(variant)), 3)} ({spread(cpu_per_message(variant))}) |")
    base = med(cpu_per_message("before"))
    for variant in ("after", "after-trace-other"):
        other = med(cpu_per_message(variant))
        if base and other:
            lines.append("")
            lines.append(f"Broker CPU per message, {variant} over before: {other / base:.3f}x.")
    lines += ["", "Generator commands (round 1):", ""]
    lines += [f"    {commands[v]}" for v, _ in variants]
    open(out, "w").write("\n".join(lines) + "\n")
    print("wrote", out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
