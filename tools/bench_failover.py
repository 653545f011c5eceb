#!/usr/bin/env python3
"""Failover time of a replicated persistent session (issue 16), over many trials.

    tools/bench_failover.py [--trials 20] [--messages 100] [--shards 2] [--replicas 1]
                            [--fast-links] [--no-settle] [--data-dir] [--out FILE]

Each trial starts a fresh 3-core cluster on loopback (node i: MQTT on 127.0.0.1:BASE+i, cluster
port on 127.0.0.(20+i):BASE+100+i, admin on 127.0.0.1:BASE+200+i; `session_replicas` as
given, default timings unless --fast-links, which takes tests/cluster_failover.rs's: heartbeat
100 ms, link timeout 600 ms, reconnect 100 ms, down grace 2 s), then:

1. a persistent subscriber (MQTT 5, clean start 0, session expiry 3600 s; a new client
   identifier each trial, so that the replica and the node that installs it vary) connects to
   node A (1), subscribes to `fo/#` at QoS 1, and disconnects once node B knows its route;
2. a publisher on node B (2) publishes MESSAGES QoS 1 messages to `fo/a`, one at a time, each
   waiting for its PUBACK (reason 0x00 required);
3. unless --no-settle: waits until node A holds all MESSAGES messages for the session and its
   replication is acknowledged (`sessions.replication_unacknowledged` 0, a replica on another
   node), as tests/cluster_failover.rs does. With --no-settle the kill follows the last PUBACK
   at once: under the `local` policy what had not reached the replica then is lost by design;
4. SIGKILLs node A and, from the instant the kill returns, reconnects to node C (3) with clean
   start 0 in a tight loop (a refused or closed connection or a refusing CONNACK is retried
   after 2 ms; at most 500 attempts and 30 s; a CONNACK may take up to 10 s, past the 5 s
   takeover timeout): (a) kill -> CONNACK, which must say session present;
   (b) kill -> the last of the MESSAGES messages received (each acknowledged), checked for
   count, order of first appearance and repeats (a repeat must carry DUP);
5. publishes 10 more messages on node B and checks that node C's client receives them;
6. stops the remaining nodes (SIGTERM, then SIGKILL after 5 s; also on error or Ctrl-C).

Prints one line per trial and p50/p99/max of (a) and (b); --out writes the same as Markdown.
A trial that lost messages, got session present 0 or failed, or whose CONNACK took longer
than --keep-slow-ms (1000), keeps its node logs in the work directory it names. Build first: `cargo build --release`. Exit status 1 if any trial failed.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_recovery import (  # noqa: E402  (the MQTT 5 packets this tool shares)
    DISCONNECT, connect, packet, puback, read_packet_blocking, string, subscribe)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDMQ = os.path.join(ROOT, "target", "release", "shardmq")
TOKEN = "bench-failover-admin-token-0123456789"
SECRET = "bench-failover-cluster-secret-0123456789"
NODES = (1, 2, 3)
HOME, PUBLISHER, RESUME = 1, 2, 3
RECONNECT_ATTEMPTS_MAX = 500
RECONNECT_SECONDS_MAX = 30.0
CONNACK_SECONDS_MAX = 10.0
DELIVERY_SECONDS_MAX = 15.0
DELIVERY_SILENCE_SECONDS = 3.0
AFTER_COUNT = 10


class TrialError(Exception):
    pass


def publish_packet(packet_id, topic, payload):
    return packet(0x32, string(topic) + struct.pack(">H", packet_id) + b"\x00" + payload)


def parse_publish(first, body):
    """(topic, packet id or None, payload, dup) of a 5.0 PUBLISH."""
    qos = (first >> 1) & 3
    length = struct.unpack(">H", body[:2])[0]
    topic = body[2:2 + length].decode()
    at = 2 + length
    packet_id = None
    if qos:
        packet_id = struct.unpack(">H", body[at:at + 2])[0]
        at += 2
    properties, shift = 0, 0
    while True:
        byte = body[at]
        at += 1
        properties += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return topic, packet_id, body[at + properties:], bool(first & 0x08)


class Cluster:
    """Three core nodes started from fresh configurations under `work`."""

    def __init__(self, args, work):
        self.args, self.work, self.processes, self.logs = args, work, {}, []
        base = args.base_port
        self.mqtt = {i: base + i for i in NODES}
        self.admin = {i: base + 200 + i for i in NODES}
        cluster = {i: f"127.0.0.{20 + i}:{base + 100 + i}" for i in NODES}
        seeds = ", ".join(f'"{cluster[i]}"' for i in NODES)
        timings = ("heartbeat_ms = 100\nlink_timeout_ms = 600\nreconnect_ms = 100\n"
                   "down_grace_seconds = 2\n") if args.fast_links else ""
        token_file = os.path.join(work, "admin.token")
        with open(token_file, "w") as f:
            f.write(TOKEN)
        os.chmod(token_file, 0o600)
        for i in NODES:
            data = ""
            if args.data_dir:
                data = f'data_dir = "{os.path.join(work, f"data-{i}")}"\n'
            config = (f'[server]\nlisten = ["127.0.0.1:{self.mqtt[i]}"]\nshards = {args.shards}\n'
                      f'pin_cores = false\n{data}'
                      f'[cluster]\nenabled = true\nsecret = "{SECRET}"\nnode_id = {i}\nrole = "core"\n'
                      f'listen = "{cluster[i]}"\nseeds = [{seeds}]\nsession_replicas = {args.replicas}\n'
                      f'{timings}[admin]\nlisten = "127.0.0.1:{self.admin[i]}"\n'
                      f'token_file = "{token_file}"\n')
            path = os.path.join(work, f"node-{i}.toml")
            with open(path, "w") as f:
                f.write(config)
            log = open(os.path.join(work, f"node-{i}.log"), "w")
            self.logs.append(log)
            self.processes[i] = subprocess.Popen(
                [SHARDMQ, "serve", "--config", path], stdout=log, stderr=subprocess.STDOUT)

    def get(self, node, path):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin[node]}{path}",
            headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.read().decode()

    def status(self, node):
        return json.loads(self.get(node, "/api/v1/cluster/status"))

    def gauge(self, node, name):
        prefix = f"shardmq_{name}{{"
        return sum(int(float(line.rsplit(" ", 1)[1]))
                   for line in self.get(node, "/metrics").splitlines() if line.startswith(prefix))

    def wait(self, what, check, seconds=20.0):
        deadline = time.monotonic() + seconds
        last = None
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (OSError, ValueError, KeyError) as error:
                last = error
            time.sleep(0.05)
        raise TrialError(f"{what}: not within {seconds:.0f} s (last error: {last!r})")

    def kill(self, node):
        self.processes[node].send_signal(signal.SIGKILL)

    def stop(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for log in self.logs:
            log.close()


class Client:
    """A blocking MQTT 5 connection that has had its CONNACK."""

    def __init__(self, port, client_id, clean_start, timeout):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.sendall(connect(client_id, clean_start, 3600 if not clean_start else 0))
        first, body = read_packet_blocking(self.sock)
        if first != 0x20:
            raise TrialError(f"expected CONNACK, got packet type {first >> 4}")
        self.session_present, self.reason = bool(body[0] & 1), body[1]

    def read(self, timeout):
        self.sock.settimeout(timeout)
        return read_packet_blocking(self.sock)

    def close(self):
        try:
            self.sock.sendall(DISCONNECT)
        except OSError:
            pass
        self.sock.close()


def publish_acknowledged(client, topic, payloads):
    for n, payload in enumerate(payloads):
        packet_id = n % 65535 + 1
        client.sock.sendall(publish_packet(packet_id, topic, payload))
        first, body = client.read(10)
        if first >> 4 != 4 or struct.unpack(">H", body[:2])[0] != packet_id:
            raise TrialError(f"expected PUBACK {packet_id}, got type {first >> 4}")
        if len(body) > 2 and body[2] != 0:
            raise TrialError(f"PUBACK {packet_id} reason 0x{body[2]:02x}")


def reconnect(port, client_id):
    """Connects with clean start 0 until a CONNACK 0x00 (bounded); (client, attempts, errors)."""
    started, attempts, errors = time.monotonic(), 0, []
    while attempts < RECONNECT_ATTEMPTS_MAX and time.monotonic() - started < RECONNECT_SECONDS_MAX:
        attempts += 1
        try:
            client = Client(port, client_id, False, CONNACK_SECONDS_MAX)
            if client.reason == 0:
                return client, attempts, errors
            errors.append(f"CONNACK 0x{client.reason:02x}")
            client.sock.close()
        except (OSError, ConnectionError, TrialError) as error:
            errors.append(repr(error))
        time.sleep(0.002)
    raise TrialError(f"no CONNACK 0x00 in {attempts} attempts: {errors[-3:]}")


def receive(client, expected, started):
    """Receives (acknowledging each) until every payload of `expected` arrived, a silence or the
    deadline; (list of (payload, dup), seconds from `started` to the last expected one)."""
    received, missing, last_at = [], set(expected), None
    deadline = time.monotonic() + DELIVERY_SECONDS_MAX
    while missing and time.monotonic() < deadline:
        try:
            first, body = client.read(min(DELIVERY_SILENCE_SECONDS, max(0.01, deadline - time.monotonic())))
        except (socket.timeout, TimeoutError):
            break
        if first >> 4 != 3:
            continue
        _, packet_id, payload, dup = parse_publish(first, body)
        if packet_id is not None:
            client.sock.sendall(puback(packet_id))
        received.append((payload, dup))
        if payload in missing:
            missing.discard(payload)
            if not missing:
                last_at = time.monotonic() - started
    return received, last_at


def check_delivery(expected, received):
    """Problems with `received` against `expected` (in order, each once, repeats with DUP)."""
    position = {p: i for i, p in enumerate(expected)}
    seen, order, problems = set(), [], []
    for payload, dup in received:
        if payload in seen:
            if not dup:
                problems.append(f"{payload.decode()} repeated without DUP")
            continue
        seen.add(payload)
        if payload not in position:
            problems.append(f"unexpected {payload[:40]!r}")
            continue
        order.append(position[payload])
    lost = [p.decode() for p in expected if p not in seen]
    if lost:
        problems.append(f"{len(lost)} of {len(expected)} lost (first {lost[0]}, last {lost[-1]})")
    disorder = next((pair for pair in zip(order, order[1:]) if pair[0] > pair[1]), None)
    if disorder:
        problems.append(f"out of order at positions {disorder}")
    return len(lost), problems


def trial(args, number, work):
    cluster = Cluster(args, work)
    result = {"trial": number, "problems": []}
    try:
        cluster.wait("every node sees 3 members",
                     lambda: all(len(cluster.status(i)["members"]) == 3 for i in NODES))
        client_id = f"fo-sub-{number}-{os.getpid()}"
        subscriber = Client(cluster.mqtt[HOME], client_id, False, 10)
        if subscriber.session_present or subscriber.reason:
            raise TrialError(f"first CONNACK: present {subscriber.session_present} reason {subscriber.reason}")
        subscriber.sock.sendall(subscribe(1, "fo/#"))
        first, body = subscriber.read(10)
        if first >> 4 != 9 or body[-1] >= 0x80:
            raise TrialError(f"SUBACK: type {first >> 4} code {body[-1:].hex()}")
        cluster.wait("node B knows node A's route", lambda: any(
            m["node"] == HOME and m.get("route_count", 0) >= 1 for m in cluster.status(PUBLISHER)["members"]))
        subscriber.close()

        publisher = Client(cluster.mqtt[PUBLISHER], f"fo-pub-{number}-{os.getpid()}", True, 10)
        before = [f"p1-{i:06d}".encode() for i in range(args.messages)]
        publish_acknowledged(publisher, "fo/a", before)
        settle_started = time.monotonic()
        if not args.no_settle:
            cluster.wait("node A holds every message", lambda: cluster.gauge(HOME, "queued_messages")
                         + cluster.gauge(HOME, "inflight_messages") == args.messages)

            def replicated():
                sessions = cluster.status(HOME)["sessions"]
                return (sessions["home"] >= 1 and sessions["replication_unacknowledged"] == 0
                        and any(cluster.status(i)["sessions"]["replica"] >= 1 for i in (PUBLISHER, RESUME)))
            cluster.wait("node A's replication acknowledged", replicated)
        result["settle_ms"] = (time.monotonic() - settle_started) * 1000
        result["leader"] = (cluster.status(PUBLISHER).get("raft") or {}).get("leader")

        cluster.kill(HOME)
        killed = time.monotonic()
        resumed, attempts, errors = reconnect(cluster.mqtt[RESUME], client_id)
        result["connack_ms"] = (time.monotonic() - killed) * 1000
        result["attempts"], result["retry_reasons"] = attempts, sorted(set(errors))
        result["session_present"] = resumed.session_present
        if not resumed.session_present:
            result["problems"].append("CONNACK on node C: session present 0")
        received, last_at = receive(resumed, before, killed)
        result["all_ms"] = None if last_at is None else last_at * 1000
        result["received"] = len(received)
        result["duplicates"] = len(received) - len({p for p, _ in received})
        result["lost"], problems = check_delivery(before, received)
        result["problems"] += problems

        after = [f"p1-after-{i:03d}".encode() for i in range(AFTER_COUNT)]
        cluster.wait("node B knows node C's route", lambda: any(
            m["node"] == RESUME and m.get("route_count", 0) >= 1 for m in cluster.status(PUBLISHER)["members"]),
            seconds=10)
        publish_acknowledged(publisher, "fo/b", after)
        received_after, _ = receive(resumed, after, time.monotonic())
        lost_after, problems = check_delivery(after, received_after)
        result["lost_after"] = lost_after
        result["problems"] += [f"after the failover: {p}" for p in problems]
        resumed.close()
        publisher.close()
    except (TrialError, OSError, ConnectionError, ValueError, KeyError) as error:
        result["problems"].append(f"failed: {error!r}")
    finally:
        cluster.stop()
    return result


def pick(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(name, values):
    if not values:
        return f"{name}: no value"
    return (f"{name}: p50 {statistics.median(values):.1f} ms, p99 {pick(values, 0.99):.1f} ms, "
            f"max {max(values):.1f} ms, min {min(values):.1f} ms ({len(values)} trials)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--base-port", type=int, default=23400)
    parser.add_argument("--fast-links", action="store_true")
    parser.add_argument("--no-settle", action="store_true")
    parser.add_argument("--data-dir", action="store_true", help="give each node a fresh data directory")
    parser.add_argument("--keep-slow-ms", type=float, default=1000,
                        help="keep the node logs of a trial whose CONNACK took longer")
    parser.add_argument("--out", help="write the results as Markdown to this file")
    args = parser.parse_args()
    if not os.access(SHARDMQ, os.X_OK):
        sys.exit(f"{SHARDMQ} is missing: cargo build --release")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    root = tempfile.mkdtemp(prefix="bench-failover-")
    load_before = open("/proc/loadavg").read().split()[:3]
    results = []
    for number in range(1, args.trials + 1):
        work = os.path.join(root, f"trial-{number}")
        os.makedirs(work)
        result = trial(args, number, work)
        results.append(result)
        keep = False
        line = (f"trial {number:3}: CONNACK {result.get('connack_ms', float('nan')):7.1f} ms "
                f"(attempts {result.get('attempts', '-')}, present {result.get('session_present', '-')}), "
                f"all {args.messages} at {result.get('all_ms') or float('nan'):7.1f} ms, "
                f"received {result.get('received', '-')}, lost {result.get('lost', '-')}, "
                f"after lost {result.get('lost_after', '-')}, "
                f"settle {result.get('settle_ms', float('nan')):.0f} ms, Raft leader before the kill {result.get('leader', '-')}")
        if result["problems"]:
            line += f"  PROBLEMS: {result['problems']} (logs kept in {work})"
            keep = True
        elif result.get("connack_ms", 0) > args.keep_slow_ms:
            line += f"  (slow: logs kept in {work})"
            keep = True
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        print(line, flush=True)
    load_after = open("/proc/loadavg").read().split()[:3]
    connack = [r["connack_ms"] for r in results if "connack_ms" in r]
    delivered = [r["all_ms"] for r in results if r.get("all_ms") is not None]
    failed = [r for r in results if r["problems"]]
    print(summary("kill -> CONNACK (session present)", connack))
    print(summary(f"kill -> all {args.messages} messages", delivered))
    for name, chosen in (("A was the Raft leader", [r for r in results if r.get("leader") == HOME]),
                         ("A was not the Raft leader", [r for r in results if r.get("leader") != HOME])):
        print(summary(f"kill -> CONNACK, {name}", [r["connack_ms"] for r in chosen if "connack_ms" in r]))
    print(f"trials with problems: {len(failed)} of {len(results)}; load average before {load_before}, after {load_after}")
    if args.out:
        write_markdown(args, results, connack, delivered, load_before, load_after)
    if not any(os.listdir(root)):
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def markdown_header(load_before, load_after):
    """A results section's heading (the command) and its lines on date, commit, machine, load."""
    sh = lambda c: subprocess.run(["sh", "-c", c], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"## {' '.join(sys.argv)}", "",
            f"- {now}, commit {sh('git rev-parse --short HEAD')}, {cpu}, "
            f"`nproc` {os.cpu_count()}, kernel {platform.release()}",
            f"- load average (1/5/15 min) before {' '.join(load_before)}, after {' '.join(load_after)}"]


def write_markdown(args, results, connack, delivered, load_before, load_after):
    lines = [*markdown_header(load_before, load_after),
             f"- {summary('kill -> CONNACK with session present on node C', connack)}",
             f"- {summary(f'kill -> all {args.messages} acknowledged messages received on node C', delivered)}",
             *[f"- {summary(f'kill -> CONNACK, {name}', [r['connack_ms'] for r in results if 'connack_ms' in r and (r.get('leader') == HOME) == leader])}"
               for name, leader in (("node A was the Raft leader", True), ("node A was not", False))],
             f"- trials with a problem: {sum(1 for r in results if r['problems'])} of {len(results)}; "
             f"messages lost in all: {sum(r.get('lost', 0) for r in results)}",
             "",
             "| trial | CONNACK ms | attempts | session present | all received ms | received | lost | lost after | settle ms | Raft leader before the kill | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
    for r in results:
        lines.append(f"| {r['trial']} | {fmt(r.get('connack_ms'))} | {fmt(r.get('attempts'))} | "
                     f"{fmt(r.get('session_present'))} | {fmt(r.get('all_ms'))} | {fmt(r.get('received'))} | "
                     f"{fmt(r.get('lost'))} | {fmt(r.get('lost_after'))} | "
                     f"{fmt(r.get('settle_ms'))} | {fmt(r.get('leader'))} | {'; '.join(r['problems']) or '-'} |")
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    sys.exit(main())
