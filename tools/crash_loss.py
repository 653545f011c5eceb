#!/usr/bin/env python3
"""What a SIGKILL loses: QoS 1 messages acknowledged to a publisher for an offline persistent
subscriber, then the broker is killed with SIGKILL, restarted on the same data directory, and
the subscriber counts what it receives.

    tools/crash_loss.py [--rounds 3] [--messages 1000] [--out tuning/results/DATE-crash-loss.md]

Variants, interleaved in each round (a fresh data directory for each run):
  shardmq-always / -interval / -none   shardmq with a data directory and that [storage] sync
  shardmq-no-data-dir                  shardmq without one (the control that loses everything)
  mosquitto-autosave                   Mosquitto with `persistence true`, default autosave
  mosquitto-autosave-sigterm           the same, stopped with SIGTERM (the control that shows
                                       the harness counts what a clean restart keeps)

Every client speaks MQTT 5 (paho-mqtt 2): the subscriber with clean start false and a session
expiry of 3600 s. Both brokers may queue 100,000 messages per session, so nothing is dropped at
a queue limit. Build first: `cargo build --release`.
"""
import argparse
import datetime
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDMQ = os.path.join(ROOT, "target", "release", "shardmq")
PORT = 18861
TOPIC = "loss/t"
VARIANTS = [
    "shardmq-always",
    "shardmq-interval",
    "shardmq-none",
    "shardmq-no-data-dir",
    "mosquitto-autosave",
    "mosquitto-autosave-sigterm",
]


def config_of(variant, data):
    if variant.startswith("mosquitto"):
        return (
            # `user root`: run as root, Mosquitto 2 drops to the `mosquitto` user, which cannot
            # write its database into a root-owned temporary directory.
            f"user root\nlistener {PORT} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {data}/\nmax_queued_messages 100000\n"
        )
    limits = "[limits]\nqueued_messages_per_session_max = 100000\n"
    if variant == "shardmq-no-data-dir":
        return '[server]\ndata_dir = ""\n' + limits
    policy = variant.split("-", 1)[1]
    return (
        f'[server]\ndata_dir = "{data}"\n{limits}[storage]\nsync = "{policy}"\n'
        "sync_interval_ms = 100\n"
    )


def start(variant, work, data, log_name):
    path = os.path.join(work, "broker.conf")
    with open(path, "w") as f:
        f.write(config_of(variant, data))
    log = open(os.path.join(work, log_name), "w")
    if variant.startswith("mosquitto"):
        command = ["mosquitto", "-c", path]
    else:
        command = [SHARDMQ, "serve", "--shards", "1", "--listen", f"127.0.0.1:{PORT}", "--config", path]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{variant}: the broker exited with {process.returncode}, see {log.name}")
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{variant}: nothing listening on {PORT} after 30 s")


def client(client_id, clean_start):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    connected = threading.Event()
    c.on_connect = lambda client, userdata, flags, reason, props: (
        setattr(c, "session_present", flags.session_present),
        setattr(c, "connect_reason", reason),
        connected.set(),
    )
    c.connect("127.0.0.1", PORT, keepalive=60, clean_start=clean_start, properties=properties)
    c.loop_start()
    if not connected.wait(15) or c.connect_reason.is_failure:
        raise RuntimeError(f"{client_id}: no successful CONNACK")
    return c


def subscribe_offline():
    sub = client("loss-subscriber", False)
    done = threading.Event()
    sub.on_subscribe = lambda client, userdata, mid, reasons, props: done.set()
    sub.subscribe(TOPIC, qos=1)
    if not done.wait(15):
        raise RuntimeError("no SUBACK")
    sub.disconnect()
    sub.loop_stop()


def publish(messages):
    """Publishes MESSAGES at QoS 1 and returns the payloads whose PUBACK reported success."""
    pub = client("loss-publisher", True)
    # Packet identifiers are not reused below 65,536 messages, so a PUBACK's identifier names
    # one payload. The callback takes no lock that publish() could wait for.
    if messages > 65000:
        raise ValueError("at most 65,000 messages per run")
    succeeded, answered, all_done = set(), [0], threading.Event()

    def on_publish(client, userdata, mid, reason, props):
        answered[0] += 1
        if not reason.is_failure:
            succeeded.add(mid)
        if answered[0] == messages:
            all_done.set()

    pub.on_publish = on_publish
    mids = {}
    for i in range(messages):
        mids[pub.publish(TOPIC, str(i).encode(), qos=1).mid] = i
    all_done.wait(60)
    pub.disconnect()
    pub.loop_stop()
    acknowledged = {mids[mid] for mid in succeeded if mid in mids}
    return acknowledged


def receive(quiet_seconds=3.0, limit_seconds=30.0):
    """Reconnects the subscriber; returns (session present, payloads received, duplicates)."""
    received, duplicates, lock = set(), [0], threading.Lock()
    last = [time.monotonic()]

    def on_message(client, userdata, message):
        with lock:
            value = int(message.payload.decode())
            if value in received:
                duplicates[0] += 1
            received.add(value)
            last[0] = time.monotonic()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="loss-subscriber", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    connected = threading.Event()
    present = [None]
    sub.on_connect = lambda client, userdata, flags, reason, props: (
        present.__setitem__(0, flags.session_present),
        connected.set(),
    )
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    sub.connect("127.0.0.1", PORT, keepalive=60, clean_start=False, properties=properties)
    sub.loop_start()
    connected.wait(15)
    last[0] = time.monotonic()
    started = time.monotonic()
    while time.monotonic() - last[0] < quiet_seconds and time.monotonic() - started < limit_seconds:
        time.sleep(0.1)
    sub.disconnect()
    sub.loop_stop()
    return present[0], received, duplicates[0]


def one_run(variant, messages, work):
    data = os.path.join(work, "data")
    subprocess.run(["rm", "-rf", data], check=True)
    for name in os.listdir(work):
        if name.endswith(".log"):
            os.remove(os.path.join(work, name))
    os.makedirs(data)
    broker = start(variant, work, data, f"{variant}-first.log")
    try:
        subscribe_offline()
        acknowledged = publish(messages)
    finally:
        if variant.endswith("-sigterm"):
            broker.send_signal(signal.SIGTERM)
        else:
            broker.send_signal(signal.SIGKILL)
        broker.wait(30)
    broker = start(variant, work, data, f"{variant}-second.log")
    try:
        present, received, duplicates = receive()
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(30)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
    lost = len(acknowledged - received)
    return {
        "acknowledged": len(acknowledged),
        "received": len(received & acknowledged),
        "lost": lost,
        "duplicates": duplicates,
        "session_present": present,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--out", default=os.path.join(ROOT, "tuning", "results", f"{datetime.date.today()}-crash-loss.md"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    loads, results = [], {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(1, args.rounds + 1):
            for variant in variants:
                loads.append(float(open("/proc/loadavg").read().split()[0]))
                try:
                    r = one_run(variant, args.messages, work)
                except Exception as error:  # a failed run is reported, not hidden
                    r = {"error": str(error)}
                    # The brokers' logs of a failed run outlive the temporary directory.
                    keep = os.path.join(ROOT, "target", "crash-loss-failed", f"round{round_}-{variant}")
                    os.makedirs(keep, exist_ok=True)
                    for name in os.listdir(work):
                        if name.endswith(".log"):
                            subprocess.run(["cp", os.path.join(work, name), keep])
                    r["error"] += f" (broker logs in {os.path.relpath(keep, ROOT)})"
                print(f"round {round_} {variant}: {r}", flush=True)
                results[variant].append(r)
    sh = lambda c: subprocess.run(["sh", "-c", c], capture_output=True, text=True).stdout.strip()
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
    mosquitto_version = sh("mosquitto -h | head -1 | cut -d' ' -f3")
    revision = sh(f"git -C {ROOT} rev-parse --short HEAD")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# What a SIGKILL loses: QoS 1 messages acknowledged for an offline persistent subscriber, {now}",
        "",
        f"- Machine: {cpu}, `nproc` {sh('nproc')}, `uname -r` {platform.release()}; shared and noisy",
        f"- Load average (1 min) at the start of each run: min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}",
        f"- Per run: a persistent subscriber (MQTT 5, clean start false, session expiry 3600 s) subscribes to `{TOPIC}` at QoS 1 and disconnects; a publisher sends {args.messages} QoS 1 messages and waits for every PUBACK; the broker gets SIGKILL (SIGTERM for the control), is restarted on the same data directory, and the subscriber reconnects and counts the acknowledged messages it receives (until 3 s pass without one)",
        f"- shardmq `--shards 1`, {revision} release build; Mosquitto {mosquitto_version} with `persistence true`, `persistence_location` the data directory, `user root` (so that it can write there) and the default `autosave_interval` (1800 s); both with a session queue limit of 100,000",
        f"- {args.rounds} rounds, the variants interleaved in each; a fresh data directory per run",
        f"- Reproduce: `cargo build --release && tools/crash_loss.py --rounds {args.rounds} --messages {args.messages}`",
        "",
        "| variant | runs | acknowledged (per run) | received after restart | lost (median, per run) | duplicates | session present after restart |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        ok = [r for r in results[variant] if "error" not in r]
        errors = [r["error"] for r in results[variant] if "error" in r]
        if not ok:
            lines.append(f"| {variant} | 0 | failed: {'; '.join(errors)} | | | | |")
            continue
        per_run = lambda key: ", ".join(str(r[key]) for r in ok)
        lines.append(
            f"| {variant} | {len(ok)} | {per_run('acknowledged')} | {per_run('received')} | "
            f"{statistics.median(r['lost'] for r in ok):.0f} ({per_run('lost')}) | {per_run('duplicates')} | {per_run('session_present')} |"
        )
        for error in errors:
            lines.append(f"|  | failed run: {error} | | | | | |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
