#!/usr/bin/env bash
# The cost of the durable log: one shardmq-bench scenario against shardmq without a data
# directory and with each sync policy ("always", "interval", "none"), and against Mosquitto with
# `persistence true` (its default autosave), interleaved in each round on this machine, medians
# over RUNS runs, into tuning/results/<date>-<name>.md.
#
#   tools/bench_durability.sh NAME RUNS -- SHARDMQ-BENCH-RUN-ARGS...
#   tools/bench_durability.sh durability 3 -- pairs -c 50 --rate 200 --qos 1 --duration 10 \
#       --mqtt 5 --clean-start false --session-expiry 3600
#
# The log's I/O runs on each shard's io_uring ring (file queue 0); the broker prints its records
# and fdatasyncs at shutdown ("durable log: this run's records and fdatasyncs"), which the report
# turns into records and messages per fdatasync.
# The subscribers must be persistent (--clean-start false with a session expiry) for anything to
# reach the log: clean sessions and QoS 0 never touch the disk. The broker runs pinned to core 0
# with --shards 1, the generator to core 1; the data directory is a fresh one under target/ (on
# the machine's disk, not a tmpfs, where fdatasync would cost nothing).
set -euo pipefail
cd "$(dirname "$0")/.."

name="$1"; runs="$2"; shift 2
[ "$1" = "--" ] && shift
bench_args=("$@")

command -v mosquitto >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }
cargo build --release -q -p shardmq -p shardmq-bench
work="$(mktemp -d)"
data="$PWD/target/bench-durability-data"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work" "$data"' EXIT
port=18851

variants=(no-data-dir always interval none mosquitto-persist)
loads=()
config_of() {
    case "$1" in
        no-data-dir) printf '[server]\ndata_dir = ""\n' ;;
        always) printf '[server]\ndata_dir = "%s"\n[storage]\nsync = "always"\n' "$data" ;;
        interval) printf '[server]\ndata_dir = "%s"\n[storage]\nsync = "interval"\nsync_interval_ms = 100\n' "$data" ;;
        none) printf '[server]\ndata_dir = "%s"\n[storage]\nsync = "none"\n' "$data" ;;
        mosquitto-persist) printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\nmax_queued_messages 100000\nmax_inflight_messages 1000\n' "$port" "$data" ;;
    esac
}

# Waits until something accepts on the port (at most 20 s), so a slow start on a busy machine
# does not fail the run.
wait_listening() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "   (nothing listening on $port after 20 s)"
}

commands=()
for run in $(seq 1 "$runs"); do
    for variant in "${variants[@]}"; do
        rm -rf "$data"
        config_of "$variant" > "$work/$variant.toml"
        if [ "$variant" = mosquitto-persist ]; then
            mkdir -p "$data"
            taskset -c 0 mosquitto -c "$work/$variant.toml" 2>"$work/$variant-$run.log" &
        else
            taskset -c 0 target/release/shardmq serve --shards 1 --listen "127.0.0.1:$port" \
                --config "$work/$variant.toml" 2>"$work/$variant-$run.log" &
        fi
        pid=$!
        wait_listening
        loads+=("$(cut -d' ' -f1-3 /proc/loadavg)")
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
BENCH_ARGS="${bench_args[*]}" LOADS="${loads[*]}" python3 - "$work" "$runs" "$out" "$name" "${variants[@]}" <<'PY'
import json, os, re, statistics, sys, platform, subprocess, datetime
work, runs, out, name, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
args = os.environ.get("BENCH_ARGS", "").split()
def arg(flag, default):
    return float(args[args.index(flag) + 1]) if flag in args else default
duration, warmup = arg("--duration", 10.0), arg("--warmup", 2.0)
def load(variant):
    results = []
    for run in range(1, runs + 1):
        try:
            results.append(json.load(open(f"{work}/{variant}-{run}.json")))
        except (FileNotFoundError, json.JSONDecodeError):
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
def syncs(variant, rate):
    """Medians of records per fdatasync, messages per fdatasync and fdatasyncs per second, from
    the broker's shutdown line. The counts cover the whole run (connects, warm-up and the
    measured seconds); messages are the offered rate times warm-up plus measured seconds."""
    per_sync, messages, per_second = [], [], []
    for run in range(1, runs + 1):
        try:
            text = open(f"{work}/{variant}-{run}.log").read()
        except FileNotFoundError:
            continue
        m = re.search(r"records=(\d+) syncs=(\d+)", text)
        if m and int(m.group(2)) > 0:
            records, count = int(m.group(1)), int(m.group(2))
            per_sync.append(records / count)
            per_second.append(count / (duration + warmup))
            if rate:
                messages.append(rate * (duration + warmup) / count)
    f = lambda v: f"{statistics.median(v):.0f}" if v else "-"
    return f(per_sync), f(messages), f(per_second)
sh = lambda c: subprocess.run(["sh", "-c", c], capture_output=True, text=True).stdout.strip()
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
loads = os.environ.get("LOADS", "").split()
one_minute = [float(x) for x in loads[0::3]] if loads else []
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
lines = [f"# {name}: QoS 1 with each sync policy against no data directory, and Mosquitto with persistence, {now}\n",
         f"- Machine: {cpu}, `nproc` {sh('nproc')}, `uname -r` {platform.release()}; a shared 2-core VM, other engineers building on it (noisy)",
         f"- Load average (1 min) when each run started: min {min(one_minute):.2f}, median {statistics.median(one_minute):.2f}, max {max(one_minute):.2f}" if one_minute else "- Load average: not recorded",
         "- Each broker pinned to core 0 (shardmq with `--shards 1`: its log I/O on the shard's own io_uring ring, file queue 0), the generator to core 1; the data directory on the VM's disk (virtio), fresh for every run",
         "- mosquitto-persist: Mosquitto " + sh("mosquitto -h | head -1 | awk '{print $3}'") + " with `persistence true`, `persistence_location` a fresh directory and `user root` (so that it can write there when started as root), its default autosave (`autosave_interval 1800`: it writes its database every 30 minutes and at shutdown, never per message)",
         f"- Medians over {runs} runs per variant; the variants are interleaved in each round (one run of each, then the next round)",
         "- records per fdatasync and fdatasyncs per second: from shardmq's shutdown line `durable log: this run's records and fdatasyncs` (counts over the whole run: connects, warm-up and the measured seconds); messages per fdatasync = offered rate x (warm-up + measured seconds) / fdatasyncs; each QoS 1 message to a persistent subscriber is about three records (queued, sent, acknowledged)",
         f"- Reproduce: `tools/bench_durability.sh {name} {runs} -- {os.environ.get('BENCH_ARGS', '')}`",
         "",
         "| variant | delivered msg/s | offered msg/s | end-to-end p50 us | p99 us | PUBACK p50 us | PUBACK p99 us | lost | delivered vs no data dir | PUBACK p50 vs no data dir | PUBACK p99 vs no data dir | records per fdatasync | messages per fdatasync | fdatasyncs/s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
base = rows.get("no-data-dir") or []
brate, bp50, bp99 = med(base, "messages_per_second"), med(base, "acknowledgement_us", "p50"), med(base, "acknowledgement_us", "p99")
ratio = lambda a, b: f"{a / b:.3g}x" if a and b else "-"
fmt = lambda v: "-" if v is None else f"{v:.0f}"
for variant in variants:
    r = rows[variant]
    if not r:
        lines.append(f"| {variant} | failed | | | | | | | | | | | | |")
        continue
    per_sync, messages, per_second = syncs(variant, med(r, "offered_per_second"))
    lines.append(f"| {variant} ({len(r)} runs) | {fmt(med(r, 'messages_per_second'))} | {fmt(med(r, 'offered_per_second'))} | {fmt(med(r, 'latency_us', 'p50'))} | {fmt(med(r, 'latency_us', 'p99'))} | {fmt(med(r, 'acknowledgement_us', 'p50'))} | {fmt(med(r, 'acknowledgement_us', 'p99'))} | {fmt(med(r, 'lost'))} | {ratio(med(r, 'messages_per_second'), brate)} | {ratio(med(r, 'acknowledgement_us', 'p50'), bp50)} | {ratio(med(r, 'acknowledgement_us', 'p99'), bp99)} | {per_sync} | {messages} | {per_second} |")
lines += ["", "Per run (delivered msg/s, PUBACK p50/p99 us, records/syncs from the broker):", ""]
for variant in variants:
    for run in range(1, runs + 1):
        try:
            r = json.load(open(f"{work}/{variant}-{run}.json"))
            text = open(f"{work}/{variant}-{run}.log").read()
        except (FileNotFoundError, json.JSONDecodeError):
            lines.append(f"- {variant} run {run}: no result")
            continue
        m = re.search(r"records=(\d+) syncs=(\d+)", text)
        counts = f", records {m.group(1)}, syncs {m.group(2)}" if m else ""
        ack = r.get("acknowledgement_us") or {}
        lines.append(f"- {variant} run {run}: {fmt(r.get('messages_per_second'))} msg/s, PUBACK {fmt(ack.get('p50'))}/{fmt(ack.get('p99'))}, lost {fmt(r.get('lost'))}{counts}")
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
