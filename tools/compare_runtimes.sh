#!/usr/bin/env bash
# Echo servers on shardmq's reactor, tokio and glommio, measured by one client in one run, and
# written to tuning/results/<date>-runtimes.md.
#
#   tools/compare_runtimes.sh [RUNS] [CONNECTIONS] [IN_FLIGHT] [SIZE]     (defaults 3 100 16 64)
#
# Each server is single-threaded and pinned to core 0; the client (on the reactor) to core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"; connections="${2:-100}"; in_flight="${3:-16}"; size="${4:-64}"
cargo build --release -q -p shardmq-bench
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18851
for run in $(seq 1 "$runs"); do
    for runtime in reactor tokio glommio; do
        taskset -c 0 target/release/shardmq-echo server --runtime "$runtime" --listen "127.0.0.1:$port" &
        server=$!
        sleep 0.5
        taskset -c 1 target/release/shardmq-echo client --host "127.0.0.1:$port" --connections "$connections" \
            --in-flight "$in_flight" --size "$size" --duration 5 --warmup 1 > "$work/$runtime-$run.json"
        echo "$runtime run $run: $(cat "$work/$runtime-$run.json")"
        kill "$server"; wait "$server" 2>/dev/null || true
        port=$((port + 1))
    done
done
out="tuning/results/$(date +%F)-runtimes.md"
python3 - "$work" "$runs" "$out" "$connections" "$in_flight" "$size" <<'PY'
import json, statistics, sys, subprocess, platform, datetime
work, runs, out, connections, in_flight, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:]
rates = {r: [json.load(open(f"{work}/{r}-{i}.json"))["messages_per_second"] for i in range(1, runs + 1)] for r in ("reactor", "tokio", "glommio")}
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
base = statistics.median(rates["reactor"])
lines = [f"# Echo throughput per core: shardmq's reactor, tokio, glommio, {datetime.date.today()}", "",
         f"- Machine: {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} vCPU, Linux {platform.release()}; shared and noisy",
         f"- Command: `tools/compare_runtimes.sh {runs} {connections} {in_flight} {size}`: {connections} connections, {in_flight} messages of {size} B in flight each; server single-threaded on core 0, client (on the reactor) on core 1; 1 s warm-up, 5 s measured; medians over {runs} runs", "",
         "| server runtime | echoed msg/s (median) | runs | vs reactor |", "|---|---|---|---|"]
for runtime, values in rates.items():
    median = statistics.median(values)
    lines.append(f"| {runtime} | {median:.0f} | {', '.join(f'{v:.0f}' for v in values)} | {median / base:.2f}x |")
open(out, "w").write("\n".join(lines) + "\n")
print("wrote", out)
PY
