#!/usr/bin/env bash
# Runs one shardmq-bench scenario against shardmq, Mosquitto and rumqttd, one after another on
# this machine, and writes tuning/results/<date>-<name>.md with the table and exact commands.
#
#   tools/compare_brokers.sh NAME RUNS -- SHARDMQ-BENCH-RUN-ARGS...
#   tools/compare_brokers.sh pairs-qos1 3 -- pairs -c 50 --rate 200 --qos 1 --duration 10
#
# Each broker runs pinned to core 0 and the load generator to core 1 (taskset), so the figures
# compare brokers per core. Mosquitto (Debian's package) is installed if missing; rumqttd is used
# if `rumqttd` is on PATH (`cargo install rumqttd`), and left out of the table otherwise, which
# the report says. Medians over RUNS runs are reported.
set -euo pipefail
cd "$(dirname "$0")/.."

name="$1"; runs="$2"; shift 2
[ "$1" = "--" ] && shift
bench_args=("$@")

command -v mosquitto >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }
cargo build --release -q -p shardmq -p shardmq-bench
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

port_shardmq=18841; port_mosquitto=18842; port_rumqttd=18843
cat > "$work/mosquitto.conf" <<CONF
listener $port_mosquitto 127.0.0.1
allow_anonymous true
max_queued_messages 100000
max_inflight_messages 1000
CONF
cat > "$work/rumqttd.toml" <<CONF
id = 0
[router]
id = 0
max_connections = 100010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:$port_rumqttd"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 1000
dynamic_filters = true
[v5.1]
name = "v5-1"
listen = "127.0.0.1:$((port_rumqttd + 1))"
next_connection_delay_ms = 0
[v5.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 1000
CONF

brokers=(shardmq mosquitto)
# rumqttd 0.20 does not build with --locked on current rustc (its lockfile pins metrics 0.22.1).
command -v rumqttd >/dev/null || cargo install rumqttd || echo "rumqttd could not be installed: left out"
command -v rumqttd >/dev/null && brokers+=(rumqttd)

start() {
    case "$1" in
        shardmq) taskset -c 0 target/release/shardmq serve --shards 1 --listen "127.0.0.1:$port_shardmq" 2>"$work/shardmq.log" & ;;
        mosquitto) taskset -c 0 mosquitto -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" & ;;
        rumqttd) taskset -c 0 rumqttd --config "$work/rumqttd.toml" >"$work/rumqttd.log" 2>&1 & ;;
    esac
    pid=$!
    sleep 1
}
port_of() { case "$1" in shardmq) echo $port_shardmq;; mosquitto) echo $port_mosquitto;; rumqttd) echo $port_rumqttd;; esac; }

commands=()
for run in $(seq 1 "$runs"); do
    for broker in "${brokers[@]}"; do
        start "$broker"
        command=(taskset -c 1 target/release/shardmq-bench run "${bench_args[@]}" --host "127.0.0.1:$(port_of "$broker")" --label "$broker" --json "$work/$broker-$run.json" --hgrm "$work/$broker-$run.hgrm")
        [ "$run" = 1 ] && commands+=("${command[*]}")
        echo "== $broker, run $run: ${command[*]}"
        "${command[@]}" >/dev/null 2>"$work/$broker-$run.err" || echo "   (exit $? — see the run's errors below)"
        tail -n 2 "$work/$broker-$run.err"
        kill "$pid"; wait "$pid" 2>/dev/null || true
        sleep 0.5
    done
done

out="tuning/results/$(date +%F)-$name.md"
mkdir -p tuning/results
BENCH_ARGS="${bench_args[*]}" python3 - "$work" "$runs" "$out" "$name" "${brokers[@]}" <<'PY'
import json, os, statistics, sys, platform, subprocess, datetime
work, runs, out, name, brokers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
rows = {}
for broker in brokers:
    results = []
    for run in range(1, runs + 1):
        try:
            results.append(json.load(open(f"{work}/{broker}-{run}.json")))
        except FileNotFoundError:
            pass
    rows[broker] = results
def med(results, *path):
    values = []
    for r in results:
        v = r
        for key in path:
            v = v[key] if v is not None else None
        if v is not None:
            values.append(v)
    return statistics.median(values) if values else None
base = rows.get("mosquitto") or []
lines = []
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
lines.append(f"# {name}: shardmq, Mosquitto and rumqttd, {datetime.date.today()}\n")
lines.append(f"- Machine: {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} vCPU, Linux {platform.release()}; shared and noisy")
lines.append(f"- Each broker pinned to core 0, the load generator to core 1; shardmq with `--shards 1`")
lines.append(f"- Medians over {runs} runs per broker; brokers run one after another in each round")
lines.append(f"- Reproduce: `tools/compare_brokers.sh {name} {runs} -- {os.environ.get('BENCH_ARGS', '')}` (the exact generator commands are below)")
if "rumqttd" not in brokers:
    lines.append("- rumqttd: not measured (not installed on this machine; see the closing note of the run)")
lines.append("")
lines.append("| broker | delivered msg/s | offered msg/s | p50 us | p90 us | p99 us | p99.9 us | max us | lost | dup | delivered vs Mosquitto | p99 vs Mosquitto |")
lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
brate, bp99 = med(base, "messages_per_second"), med(base, "latency_us", "p99")
for broker in brokers:
    r = rows[broker]
    if not r:
        lines.append(f"| {broker} | failed | | | | | | | | | | |")
        continue
    p50, p99 = med(r, "latency_us", "p50"), med(r, "latency_us", "p99")
    ratio = lambda a, b: f"{a / b:.3g}x" if a and b else "-"
    lines.append(f"| {broker} | {med(r, 'messages_per_second'):.0f} | {med(r, 'offered_per_second'):.0f} | {p50:.0f} | {med(r, 'latency_us', 'p90'):.0f} | {p99:.0f} | {med(r, 'latency_us', 'p999'):.0f} | {med(r, 'latency_us', 'max'):.0f} | {med(r, 'lost'):.0f} | {med(r, 'duplicated'):.0f} | {ratio(med(r, 'messages_per_second'), brate)} | {ratio(p99, bp99)} |")
open(out, "w").write("\n".join(lines) + "\n")
PY
# The chart of run 1 of every broker, beside the report.
chart="${out%.md}"
first_runs=()
for broker in "${brokers[@]}"; do first_runs+=("$work/$broker-1.json"); done
target/release/shardmq-bench compare "${first_runs[@]}" --output "$chart" > /dev/null 2>"$work/compare.err" || true
{
    echo
    if [ -f "$chart.svg" ]; then
        echo "Latency by percentile, run 1 of each broker: ![chart]($(basename "$chart").png) ([SVG]($(basename "$chart").svg))"
    else
        echo "(no chart: $(cat "$work/compare.err"))"
    fi
    echo
    echo "Generator commands (run 1; ports as in the script):"
    echo
    for command in "${commands[@]}"; do echo "    $command"; done
} >> "$out"
echo "wrote $out"
