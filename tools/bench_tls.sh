#!/usr/bin/env bash
# TLS against plain TCP, shardmq beside Mosquitto with the same certificates, interleaved in
# each round, into tuning/results/<date>-tls.md:
#   - connects per second (TCP connect + TLS handshake + CONNECT/CONNACK) of CONNS clients,
#     from the generator's "connected N (F failed) in X s" line;
#   - QoS 0 pairs throughput and end-to-end p50/p99 (50 pairs at RATE messages/s each);
#   - the broker's RSS with CONNS idle connections held, less its RSS before they connect.
#
#   tools/bench_tls.sh RUNS CONNS RATE [CONNECT_RATE]
#   tools/bench_tls.sh 3 5000 1000              # all CONNS at once -> <date>-tls.md
#   tools/bench_tls.sh 3 2000 1000 500          # paced at 500/s -> <date>-tls-paced-500.md
#
# The connect latency (TCP connect to CONNACK, p50/p99 from the generator's JSON) is the cost
# of a handshake when the clients are paced at a rate both brokers follow.
#
# Certificates: a P-256 authority and a server certificate for IP 127.0.0.1 made by openssl in
# a temporary directory; shardmq serves TCP and TLS on two [[listener]] tables, Mosquitto on
# two `listener` blocks (cafile/certfile/keyfile). Each broker pinned to core 0 (shardmq with
# --shards 1), the generator to core 1.
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${1:-3}"; conns="${2:-5000}"; rate="${3:-1000}"; connect_rate="${4:-1000000}"
command -v mosquitto >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }
cargo build --release -q -p shardmq -p shardmq-bench
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
tcp_port=18881; tls_port=18882
bench=target/release/shardmq-bench

(
    cd "$work"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
        -keyout ca.key -out ca.pem -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
        -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' > server.ext
    openssl x509 -req -in server.csr -days 2 -CA ca.pem -CAkey ca.key -CAcreateserial \
        -extfile server.ext -out server.pem 2>/dev/null
)
cat > "$work/shardmq.toml" <<CONF
[[listener]]
bind = "127.0.0.1:$tcp_port"
[[listener]]
bind = "127.0.0.1:$tls_port"
transport = "tls"
tls_cert_file = "$work/server.pem"
tls_key_file = "$work/server.key"
CONF
# user root: started as root, Mosquitto 2 drops to the `mosquitto` user, which cannot read the
# key in this root-only temporary directory.
cat > "$work/mosquitto.conf" <<CONF
user root
allow_anonymous true
max_queued_messages 100000
listener $tcp_port 127.0.0.1
listener $tls_port 127.0.0.1
cafile $work/ca.pem
certfile $work/server.pem
keyfile $work/server.key
CONF

start() {
    if [ "$1" = shardmq ]; then
        taskset -c 0 target/release/shardmq serve --shards 1 --config "$work/shardmq.toml" 2>"$work/broker.log" &
    else
        taskset -c 0 mosquitto -c "$work/mosquitto.conf" 2>"$work/broker.log" &
    fi
    pid=$!
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$tls_port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "   ($1 not listening after 20 s)"
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; sleep 0.5; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0; }
tls_args() { [ "$1" = tls ] && echo "--tls --ca-file $work/ca.pem" || true; }
port_of() { [ "$1" = tls ] && echo $tls_port || echo $tcp_port; }

results="$work/results.txt"; : > "$results"
loads=()
for run in $(seq 1 "$runs"); do
    for broker in shardmq mosquitto; do
        for transport in tcp tls; do
            # Connect rate and memory: CONNS clients connect at once and hold for 3 s.
            start "$broker"
            loads+=("$(cut -d' ' -f1 /proc/loadavg)")
            sleep 0.5
            before=$(rss)
            # shellcheck disable=SC2046
            taskset -c 1 $bench conn -c "$conns" --connect-rate "$connect_rate" --duration 4 --warmup 0 \
                --host "127.0.0.1:$(port_of $transport)" --source 127.0.0.2-127.0.0.9 $(tls_args $transport) \
                --json "$work/conn-$broker-$transport-$run.json" >/dev/null 2>"$work/conn.err" &
            gen=$!
            held=""
            for _ in $(seq 1 $((200 + 10 * conns / (connect_rate < conns ? connect_rate : conns)))); do
                if grep -q '^connected' "$work/conn.err"; then sleep 1; held=$(rss); break; fi
                sleep 0.1
            done
            wait "$gen" || true
            line=$(grep -m1 '^connected' "$work/conn.err" || echo "connected 0 (0 failed) in 0 s")
            echo "conn $broker $transport $run $before ${held:-0} $line" >> "$results"
            echo "== conn $broker $transport run $run: rss $before -> ${held:-?} KiB; $line"
            stop
            # QoS 0 throughput.
            start "$broker"
            # shellcheck disable=SC2046
            taskset -c 1 $bench run pairs -c 50 --rate "$rate" --qos 0 --duration 10 \
                --host "127.0.0.1:$(port_of $transport)" $(tls_args $transport) \
                --json "$work/pairs-$broker-$transport-$run.json" >/dev/null 2>"$work/pairs.err" || true
            tail -n 1 "$work/pairs.err"
            stop
        done
    done
done

if [ "$connect_rate" = 1000000 ]; then out="tuning/results/$(date +%F)-tls.md"; else out="tuning/results/$(date +%F)-tls-paced-$connect_rate.md"; fi
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
MOSQUITTO_VERSION="$(mosquitto -h | head -1 | cut -d' ' -f3)" \
CONNECT_RATE="$connect_rate" RESULTS="$results" WORK="$work" RUNS="$runs" CONNS="$conns" RATE="$rate" LOADS="${loads[*]}" python3 - "$out" <<'PY'
import datetime, json, os, platform, re, statistics, subprocess, sys
out = sys.argv[1]
runs, conns, rate, work = int(os.environ["RUNS"]), int(os.environ["CONNS"]), float(os.environ["RATE"]), os.environ["WORK"]
sh = lambda c: subprocess.run(["sh", "-c", c], capture_output=True, text=True).stdout.strip()
conn = {}
for line in open(os.environ["RESULTS"]):
    f = line.split()
    m = re.search(r"connected (\d+) \((\d+) failed\) in ([\d.]+) s", line)
    key = (f[1], f[2])
    ok, failed, seconds = int(m.group(1)), int(m.group(2)), float(m.group(3))
    conn.setdefault(key, []).append({"rate": ok / seconds if seconds else 0, "failed": failed,
                                     "per_conn": (int(f[5]) - int(f[4])) * 1024 / ok if ok and int(f[5]) else None})
connect_rate = int(os.environ["CONNECT_RATE"])
def conn_latency(broker, transport):
    p50, p99 = [], []
    for run in range(1, runs + 1):
        try:
            j = json.load(open(f"{work}/conn-{broker}-{transport}-{run}.json"))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        p50.append(j["connect_us"]["p50"]); p99.append(j["connect_us"]["p99"])
    return p50, p99
pairs = {}
for broker in ("shardmq", "mosquitto"):
    for transport in ("tcp", "tls"):
        for run in range(1, runs + 1):
            try:
                pairs.setdefault((broker, transport), []).append(json.load(open(f"{work}/pairs-{broker}-{transport}-{run}.json")))
            except (FileNotFoundError, json.JSONDecodeError):
                pass
med = lambda v: statistics.median(v) if v else None
fmt = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"
loads = [float(x) for x in os.environ.get("LOADS", "").split()]
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
lines = [f"# TLS against plain TCP, shardmq beside Mosquitto, {now}", "",
         f"- Machine: {os.environ['CPU']}, `nproc` {sh('nproc')}, `uname -r` {platform.release()}; shared with other engineers' builds (noisy)",
         f"- Load average (1 min) at the start of each measurement: min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}" if loads else "- Load average: not recorded",
         f"- shardmq {sh('git rev-parse --short HEAD')} release build (`--shards 1`, rustls; both ends offer TLS 1.3) and Mosquitto {os.environ['MOSQUITTO_VERSION']} (OpenSSL), each pinned to core 0, the generator (shardmq-bench, rustls) to core 1; the same P-256 certificate for both",
         f"- {runs} rounds; in each, per broker and transport: {conns} clients connect ({'at once' if connect_rate >= 1000000 else f'paced at {connect_rate}/s'}: `conn -c {conns} --connect-rate {connect_rate} --source 127.0.0.2-127.0.0.9`, with `--tls --ca-file ca.pem` for TLS) and are held; then a fresh broker for `run pairs -c 50 --rate {rate:.0f} --qos 0 --duration 10`",
         "- connects/s: clients over the generator's `connected N in X s` (it polls every 100 ms: +-0.1 s); memory: broker RSS 1 s after all are connected, less its RSS before, per connection",
         f"- Reproduce: `tools/bench_tls.sh {runs} {conns} {rate:.0f}{'' if connect_rate >= 1000000 else f' {connect_rate}'}`", "",
         "| broker | transport | connects/s (median) | TLS vs TCP | connect p50 / p99 us | RSS per idle connection, bytes | QoS 0 delivered msg/s | offered | end-to-end p50 us | p99 us | p99 TLS vs TCP |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for broker in ("shardmq", "mosquitto"):
    base_rate = med([c["rate"] for c in conn.get((broker, "tcp"), [])])
    base_p99 = med([p["latency_us"]["p99"] for p in pairs.get((broker, "tcp"), [])])
    for transport in ("tcp", "tls"):
        c = conn.get((broker, transport), [])
        p = pairs.get((broker, transport), [])
        r = med([x["rate"] for x in c])
        mem = med([x["per_conn"] for x in c if x["per_conn"] is not None])
        p99 = med([x["latency_us"]["p99"] for x in p])
        c50, c99 = conn_latency(broker, transport)
        lines.append(f"| {broker} | {transport} | {fmt(r)} | {fmt(r / base_rate, 2) + 'x' if r and base_rate else '-'} | {fmt(med(c50))} / {fmt(med(c99))} | {fmt(mem)} | {fmt(med([x['messages_per_second'] for x in p]))} | {fmt(med([x['offered_per_second'] for x in p]))} | {fmt(med([x['latency_us']['p50'] for x in p]))} | {fmt(p99)} | {fmt(p99 / base_p99, 2) + 'x' if p99 and base_p99 else '-'} |")
lines += ["", "Per run (connects/s, failed, bytes per connection):", ""]
for key, values in conn.items():
    lines.append(f"- {key[0]} {key[1]}: " + "; ".join(f"{v['rate']:,.0f}/s, {v['failed']} failed, {fmt(v['per_conn'])} B" for v in values))
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "wrote $out"
