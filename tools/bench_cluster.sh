#!/usr/bin/env bash
# Cluster benchmarks on one machine: what a hop between nodes adds, and how fast a new route
# spreads. Results go to stdout; copy them under tuning/results/ with the date and machine.
#
#   tools/bench_cluster.sh RUNS RATE [QOS [SHARDS]]
#
# Starts a 2-node cluster (1 core + 1 edge, SHARDS shards each, default 1; also
# SHARDMQ_BENCH_SHARDS) with tools/cluster.sh, then, RUNS times, alternately:
#   local  shardmq-bench pairs against node 1 only: publisher and subscriber on one node;
#   cross  the same against both nodes with an odd pair count (51), so that every pair's
#          publisher and subscriber land on different nodes (clients alternate over --host
#          by index, and subscriber i has index 51 + i).
# Each run offers RATE messages/s in total, 64 B, QoS QOS (default 1), for 10 s; the medians of
# delivered rate, p50 and p99 end-to-end latency are printed per mode.
# Then route propagation: tools/route_propagation.py subscribes on node 2 and publishes on node
# 1 every 100 us until the first message arrives, 200 times at a steady pace.
# Then the connect rate: 19,000 clients (one process's open files) from 16 source addresses
# connect to node 1 of the cluster (every CONNECT claims the session from node 2 first) and to
# a standalone broker with the same shard count, RUNS times each. SHARDMQ_BENCH_FORWARD_ONLY=1
# stops after the forwarding runs.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:?runs}
rate=${2:?total rate}
qos=${3:-1}
shards=${4:-${SHARDMQ_BENCH_SHARDS:-1}}
base=${SHARDMQ_BENCH_BASE_PORT:-19000}
export SHARDMQ_CLUSTER_DIR=${SHARDMQ_CLUSTER_DIR:-/tmp/shardmq-bench-cluster}

# SHARDMQ_BENCH_BIN=DIR runs the shardmq and shardmq-bench binaries in DIR (say, copies of an
# earlier build, for a before/after comparison) instead of building target/release.
if [ -n "${SHARDMQ_BENCH_BIN:-}" ]; then
    bench="$SHARDMQ_BENCH_BIN/shardmq-bench"
    export SHARDMQ_BINARY="$SHARDMQ_BENCH_BIN/shardmq"
else
    cargo build --release -p shardmq -p shardmq-bench --quiet
    bench="$top/target/release/shardmq-bench"
    export SHARDMQ_BINARY="$top/target/release/shardmq"
fi
"$top/tools/cluster.sh" down >/dev/null 2>&1 || true
"$top/tools/cluster.sh" up --cores 1 --edges 1 --base-port "$base" --shards "$shards" >/dev/null
trap '"$top/tools/cluster.sh" down >/dev/null 2>&1 || true' EXIT
node1="127.0.0.1:$((base + 1))"
node2="127.0.0.1:$((base + 2))"
sleep 2

out=$(mktemp -d)
echo "$shards shard(s) per node, $runs runs, $rate msg/s offered, QoS $qos"
for run in $(seq 1 "$runs"); do
    for mode in local cross; do
        if [ "$mode" = local ]; then hosts=(--host "$node1"); else hosts=(--host "$node1" --host "$node2"); fi
        taskset -c 1 "$bench" run pairs "${hosts[@]}" -c 51 --total-rate "$rate" --qos "$qos" \
            --duration 10 --json "$out/$mode-$run.json" >/dev/null 2>"$out/$mode-$run.log" || {
            echo "run $run ($mode) failed:"; tail -5 "$out/$mode-$run.log"; }
    done
done
python3 - "$out" "$runs" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
print(f"{'mode':6} {'msg/s':>10} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'lost':>5}")
for mode in ("local", "cross"):
    rows = []
    for run in range(1, runs + 1):
        try:
            rows.append(json.load(open(f"{out}/{mode}-{run}.json")))
        except OSError:
            pass
    if not rows:
        print(f"{mode:6} no result"); continue
    med = lambda f: statistics.median(f(r) for r in rows)
    print(f"{mode:6} {med(lambda r: r['messages_per_second']):>10.0f} "
          f"{med(lambda r: r['latency_us']['p50']):>8.0f} {med(lambda r: r['latency_us']['p99']):>8.0f} "
          f"{med(lambda r: r['latency_us']['p999']):>9.0f} {sum(r['lost'] for r in rows):>5}")
PY
[ "${SHARDMQ_BENCH_FORWARD_ONLY:-0}" = 1 ] && exit 0
python3 "$top/tools/route_propagation.py" "$node2" "$node1" 200

echo
echo "connect rate, 19,000 clients (the generator reports to 0.1 s):"
standalone_port=$((base + 50))
standalone_config=$(mktemp)
printf '[admin]\nlisten = ""\n' >"$standalone_config"
"$SHARDMQ_BINARY" serve --shards "$shards" --listen "127.0.0.1:$standalone_port" \
    --config "$standalone_config" >/dev/null 2>&1 &
standalone=$!
trap 'kill $standalone 2>/dev/null || true; "$top/tools/cluster.sh" down >/dev/null 2>&1 || true' EXIT
sleep 1
for run in $(seq 1 "$runs"); do
    for target in cluster standalone; do
        if [ "$target" = cluster ]; then host=$node1; else host="127.0.0.1:$standalone_port"; fi
        line=$(taskset -c 1 "$bench" conn -c 19000 --connect-rate 200000 --duration 1 --warmup 0 \
            --host "$host" --source 127.0.0.2-127.0.0.17 2>&1 | grep -o 'connected [0-9]* ([0-9]* failed) in [0-9.]* s' || echo "no result")
        echo "  run $run $target: $line"
    done
done
