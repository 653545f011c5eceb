#!/bin/bash
# NAME CLIENTS [auth lines...]: one broker, one `shardmq-bench conn` run against it; prints
# the connect rate (2026-12-03-auth-connect-rate.md). Run from the repository's root after
# `cargo build --release -p shardmq -p shardmq-bench`; files go to $WORK (default /tmp/authbench).
B=${B:-target/release}
WORK=${WORK:-/tmp/authbench}
mkdir -p "$WORK"
name=$1; clients=$2; shift 2
{
  echo "[admin]"; echo 'listen = "127.0.0.1:28899"'
  if [ $# -gt 0 ]; then echo "[auth]"; for line in "$@"; do echo "$line"; done; fi
} > $WORK/$name.toml
$B/shardmq serve --shards 1 --listen 127.0.0.1:28898 --config $WORK/$name.toml 2> $WORK/$name.log &
broker=$!
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/28898) 2>/dev/null && break; sleep 0.05; done
$B/shardmq-bench conn -c $clients --connect-rate 200000 --duration 1 --warmup 0 \
  --host 127.0.0.1:28898 --source 127.0.0.2-127.0.0.17 --username bench --password pw \
  --json $WORK/$name.json > /dev/null 2> $WORK/$name.bench.err
python3 - "$WORK/$name.json" "$name" "$clients" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
sys.argv = sys.argv[1:]
c = s["connect_us"]
n = int(sys.argv[2]) - s["connect_failures"]
print(f'{sys.argv[1]}: clients={sys.argv[2]} failures={s["connect_failures"]} connect p50={c["p50"]/1000:.0f}ms max={c["max"]/1000:.0f}ms rate={n/(c["max"]/1e6):.0f}/s')
PY
kill $broker; wait $broker 2>/dev/null
