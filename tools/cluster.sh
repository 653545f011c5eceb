#!/usr/bin/env bash
# A local shardmq cluster on this machine, for trying things out and for benchmarks.
#
#   tools/cluster.sh up [--cores C] [--edges E] [--base-port P] [--shards N]
#   tools/cluster.sh status
#   tools/cluster.sh down
#
# Node i (1..C+E; the first C are cores) serves MQTT on 127.0.0.1:P+i, its cluster port on
# 127.0.0.1:P+100+i and its admin endpoint on 127.0.0.1:P+200+i. Every edge and core lists
# every core as a seed. Configurations, logs and pids live in $SHARDMQ_CLUSTER_DIR
# (default /tmp/shardmq-cluster), with the nodes' admin token in admin.token there
# (shardmq ctl --token-file ...); `down` stops the nodes with SIGTERM.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
dir=${SHARDMQ_CLUSTER_DIR:-/tmp/shardmq-cluster}
# SHARDMQ_BINARY runs that binary instead of building and running target/release/shardmq.
binary=${SHARDMQ_BINARY:-$top/target/release/shardmq}

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

up() {
    local cores=1 edges=2 base=18000 shards=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --cores) cores=$2; shift 2 ;;
            --edges) edges=$2; shift 2 ;;
            --base-port) base=$2; shift 2 ;;
            --shards) shards=$2; shift 2 ;;
            *) echo "cluster.sh: unknown option $1" >&2; usage ;;
        esac
    done
    if [ "$cores" -lt 1 ]; then
        echo "cluster.sh: a cluster needs at least one core" >&2
        exit 2
    fi
    if [ -f "$dir/pids" ] && [ -s "$dir/pids" ]; then
        echo "cluster.sh: a cluster is already up (see $dir); run 'tools/cluster.sh down' first" >&2
        exit 1
    fi
    [ -n "${SHARDMQ_BINARY:-}" ] || (cd "$top" && cargo build --release -q --bin shardmq)
    mkdir -p "$dir"
    : > "$dir/pids"
    local secret seeds="" total=$((cores + edges))
    secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/admin.token")
    for i in $(seq 1 "$cores"); do
        seeds="$seeds\"127.0.0.1:$((base + 100 + i))\", "
    done
    seeds="[${seeds%, }]"
    printf '%-5s %-5s %-22s %-22s %-22s\n' node role mqtt cluster admin
    for i in $(seq 1 "$total"); do
        local role=edge
        [ "$i" -le "$cores" ] && role=core
        cat > "$dir/node-$i.toml" <<EOF
[server]
listen = ["127.0.0.1:$((base + i))"]
shards = $shards
pin_cores = false

[cluster]
enabled = true
secret = "$secret"
node_id = $i
role = "$role"
listen = "127.0.0.1:$((base + 100 + i))"
seeds = $seeds

[admin]
listen = "127.0.0.1:$((base + 200 + i))"
token_file = "$dir/admin.token"
EOF
        "$binary" serve --config "$dir/node-$i.toml" 2> "$dir/node-$i.log" &
        echo $! >> "$dir/pids"
        printf '%-5s %-5s %-22s %-22s %-22s\n' "$i" "$role" "127.0.0.1:$((base + i))" \
            "127.0.0.1:$((base + 100 + i))" "127.0.0.1:$((base + 200 + i))"
    done
    # Wait until every node reports every other as a member (or give up after 15 s).
    local deadline=$((SECONDS + 15))
    for i in $(seq 1 "$total"); do
        until "$binary" ctl --admin "127.0.0.1:$((base + 200 + i))" --token-file "$dir/admin.token" cluster status 2>/dev/null \
            | grep -c '"cluster_address"' | awk -v want="$total" '{ exit !($1 >= want) }'; do
            if [ $SECONDS -ge $deadline ]; then
                echo "cluster.sh: node $i did not see the whole cluster within 15 s; logs in $dir" >&2
                exit 1
            fi
            sleep 0.2
        done
    done
    echo "$base $total" > "$dir/ports"
    echo "cluster up: $cores core(s), $edges edge(s); logs and configurations in $dir"
    echo "try: mosquitto_sub -p $((base + 1)) -t 'demo/#' -v &   mosquitto_pub -p $((base + total)) -t demo/x -m hello"
}

status() {
    [ -f "$dir/ports" ] || { echo "cluster.sh: no cluster is up" >&2; exit 1; }
    read -r base total < "$dir/ports"
    "$binary" ctl --admin "127.0.0.1:$((base + 201))" --token-file "$dir/admin.token" cluster status
}

down() {
    [ -f "$dir/pids" ] || { echo "cluster.sh: no cluster is up"; return 0; }
    while read -r pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done < "$dir/pids"
    while read -r pid; do
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done < "$dir/pids"
    rm -f "$dir/pids" "$dir/ports" "$dir/admin.token"
    echo "cluster down"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    status) status ;;
    down) down ;;
    *) usage ;;
esac
