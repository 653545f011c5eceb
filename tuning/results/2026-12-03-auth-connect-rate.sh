#!/bin/bash
# run.sh NAME CLIENTS [auth lines...]: one broker, one conn run; prints NAME, connect_us, failures.
B=/work/wt/auth/target/release
name=$1; clients=$2; shift 2
{
  echo "[admin]"; echo 'listen = "127.0.0.1:28899"'
  if [ $# -gt 0 ]; then echo "[auth]"; for line in "$@"; do echo "$line"; done; fi
} > /tmp/authbench/$name.toml
$B/shardmq serve --shards 1 --listen 127.0.0.1:28898 --config /tmp/authbench/$name.toml 2> /tmp/authbench/$name.log &
broker=$!
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/28898) 2>/dev/null && break; sleep 0.05; done
$B/shardmq-bench conn -c $clients --connect-rate 200000 --duration 1 --warmup 0 \
  --host 127.0.0.1:28898 --source 127.0.0.2-127.0.0.17 --username bench --password pw \
  --json /tmp/authbench/$name.json > /dev/null 2> /tmp/authbench/$name.bench.err
python3 - "$name" "$clients" <<'PY'
import json, sys
s = json.load(open(f"/tmp/authbench/{sys.argv[1]}.json"))
c = s["connect_us"]
n = int(sys.argv[2]) - s["connect_failures"]
print(f'{sys.argv[1]}: clients={sys.argv[2]} failures={s["connect_failures"]} connect p50={c["p50"]/1000:.0f}ms max={c["max"]/1000:.0f}ms rate={n/(c["max"]/1e6):.0f}/s')
PY
kill $broker; wait $broker 2>/dev/null
