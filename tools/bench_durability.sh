#!/usr/bin/env bash
# The cost of the durable log: one shardmq-bench scenario against shardmq without a data
# directory and with each sync policy ("always", "interval", "none"), one after another on this
# machine, medians over RUNS runs, into tuning/results/<date>-<name>.md.
#
#   tools/bench_durability.sh NAME RUNS -- SHARDMQ-BENCH-RUN-ARGS...
#   tools/bench_durability.sh durability 3 -- pairs -c 50 --rate 200 --qos 1 --duration 10 \
#       --clean-start false --session-expiry 3600
#
# The subscribers must be persistent (--clean-start false with a session expiry) for anything to
# reach the log: clean sessions and QoS 0 never touch the disk. The broker runs pinned to core 0
# with --shards 1, the generator to core 1; the data directory is a fresh one under target/ (on
# the machine's disk, not a tmpfs, where fdatasync would cost nothing).
set -euo pipefail
cd "$(dirname "$0")/.."

name="$1"; runs="$2"; shift 2
[ "$1" = "--" ] && shift
bench_args=("$@")

cargo build --release -q -p shardmq -p shardmq-bench
work="$(mktemp -d)"
data="$PWD/target/bench-durability-data"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work" "$data"' EXIT
port=18851

variants=(no-data-dir always interval none)
config_of() {
    case "$1" in
        no-data-dir) printf '[server]\ndata_dir = ""\n' ;;
        always) printf '[server]\ndata_dir = "%s"\n[storage]\nsync = "always"\n' "$data" ;;
        interval) printf '[server]\ndata_dir = "%s"\n[storage]\nsync = "interval"\nsync_interval_ms = 100\n' "$data" ;;
        none) printf '[server]\ndata_dir = "%s"\n[storage]\nsync = "none"\n' "$data" ;;
    esac
}

commands=()
for run in $(seq 1 "$runs"); do
    for variant in "${variants[@]}"; do
        rm -rf "$data"
        config_of "$variant" > "$work/$variant.toml"
        taskset -c 0 target/release/shardmq serve --shards 1 --listen "127.0.0.1:$port" \
            --config "$work/$variant.toml" 2>"$work/$variant-$run.log" &
        pid=$!
        sleep 1
        command=(taskset -c 1 target/release/shardmq-bench run "${bench_args[@]}" --host "127.0.0.1:$port" --label "$variant" --json "$work/$variant-$run.json")
        [ "$run" = 1 ] && commands+=("${command[*]}")
        echo "== $variant, run $run: ${command[*]}"
        "${command[@]}" >/dev/null 2>"$work/$variant-$run.err" || echo "   (exit $? — see the run's errors)"
        tail -n 2 "$work/$variant-$run.err"
        kill "$pid"; wait "$pid" 2>/dev/null || true
        sleep 0.5
    done
done

out="tuning/results/$(date +%F)-$name.md"
mkdir -p tuning/results
BENCH_ARGS="${bench_args[*]}" python3 - "$work" "$runs" "$out" "$name" "${variants[@]}" <<'PY'
import json, os, statistics, sys, platform, subprocess, datetime
work, runs, out, name, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
def load(variant):
    results = []
    for run in range(1, runs + 1):
        try:
            results.append(json.load(open(f"{work}/{variant}-{run}.json")))
        except FileNotFoundError:
            pass
    return results
def med(results, *path):
    values = []
    for r in results:
        v = r
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if v is not None:
            values.append(v)
    return statistics.median(values) if values else None
rows = {v: load(v) for v in variants}
import re
def syncs(variant):
    """Median records per fdatasync and fdatasyncs per second, from the broker's shutdown line."""
    per_sync, per_second = [], []
    for run in range(1, runs + 1):
        try:
            text = open(f"{work}/{variant}-{run}.log").read()
        except FileNotFoundError:
            continue
        m = re.search(r"records=(\d+) syncs=(\d+)", text)
        if m and int(m.group(2)) > 0:
            per_sync.append(int(m.group(1)) / int(m.group(2)))
            per_second.append(int(m.group(2)) / duration)
    med2 = lambda v: f"{statistics.median(v):.0f}" if v else "-"
    return med2(per_sync), med2(per_second)
args = os.environ.get("BENCH_ARGS", "").split()
duration = float(args[args.index("--duration") + 1]) if "--duration" in args else 10.0
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
lines = [f"# {name}: QoS 1 with each sync policy against no data directory, {datetime.date.today()}\n",
         f"- Machine: {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} vCPU, Linux {platform.release()}; a shared 2-core VM, noisy",
         "- shardmq pinned to core 0 with `--shards 1`, the generator to core 1; the data directory on the VM's disk (virtio), fresh for every run",
         f"- Medians over {runs} runs per variant; the variants run one after another in each round",
         "- records per fdatasync and fdatasyncs per second: from the broker's shutdown line (records over the whole run, including connects; divided by the measured duration, so approximate)",
         f"- Reproduce: `tools/bench_durability.sh {name} {runs} -- {os.environ.get('BENCH_ARGS', '')}`",
         "",
         "| variant | delivered msg/s | offered msg/s | end-to-end p50 us | p99 us | PUBACK p50 us | PUBACK p99 us | lost | delivered vs no data dir | PUBACK p99 vs no data dir | records per fdatasync | fdatasyncs/s (approx.) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
base = rows.get("no-data-dir") or []
brate, back = med(base, "messages_per_second"), med(base, "acknowledgement_us", "p99")
ratio = lambda a, b: f"{a / b:.3g}x" if a and b else "-"
fmt = lambda v: "-" if v is None else f"{v:.0f}"
for variant in variants:
    r = rows[variant]
    if not r:
        lines.append(f"| {variant} | failed | | | | | | | | | | |")
        continue
    lines.append(f"| {variant} | {fmt(med(r, 'messages_per_second'))} | {fmt(med(r, 'offered_per_second'))} | {fmt(med(r, 'latency_us', 'p50'))} | {fmt(med(r, 'latency_us', 'p99'))} | {fmt(med(r, 'acknowledgement_us', 'p50'))} | {fmt(med(r, 'acknowledgement_us', 'p99'))} | {fmt(med(r, 'lost'))} | {ratio(med(r, 'messages_per_second'), brate)} | {ratio(med(r, 'acknowledgement_us', 'p99'), back)} | {syncs(variant)[0]} | {syncs(variant)[1]} |")
open(out, "w").write("\n".join(lines) + "\n")
PY
{
    echo
    echo "Generator commands (run 1; the same for every run):"
    echo
    for command in "${commands[@]}"; do echo "    $command"; done
} >> "$out"
echo "wrote $out"
cat "$out"
