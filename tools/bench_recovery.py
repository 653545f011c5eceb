#!/usr/bin/env python3
"""Recovery time of a shardmq node holding many persistent sessions with queued messages.

    tools/bench_recovery.py [--sessions 100000] [--queued 3] [--shards 2] [--workers 4]
                            [--out tuning/results/DATE-recovery.md]

1. Starts `target/release/shardmq serve` on a fresh data directory (`[storage] sync` as given,
   "always" by default) and makes SESSIONS persistent sessions (MQTT 5, clean start false,
   session expiry 3600 s), each subscribed at QoS 1 to its own topic `rec/{i}`, then
   disconnected (DISCONNECT 0x00: the session stays). WORKERS processes share the work; each
   connection comes from one of 127.0.0.2-127.0.0.9 so that the 4-tuples of 100,000 short
   connections do not run out, and is closed before the next one opens (no process holds
   more than a few hundred sockets).
2. Publishes QUEUED QoS 1 messages (100 bytes) to each session's topic while it is offline,
   every PUBACK checked (0x00; "no matching subscribers" would mean a lost session).
3. Records the data directory's size and the broker's RSS, kills the broker with SIGKILL and
   restarts it on the same directory, measuring from the new process's start: when each log
   line appears ("durable log recovered" with its replay_ms, "restored from the durable log",
   "shardmq serving MQTT"), the first CONNACK a probe client (connecting every 5 ms from the
   process's start) gets, the CONNACK and queued messages of sample sessions (the first
   SAMPLE sessions, which fall on every shard), and the RSS once the sample is served.
4. Stops the broker with SIGTERM, restarts it again (a clean restart) and measures the same.

Step 3 samples sessions 0..SAMPLE-1, which receive and acknowledge their messages; step 4
samples the next SAMPLE sessions, whose queues are still full.
Build first: `cargo build --release`.
"""
import argparse
import asyncio
import atexit
import datetime
import multiprocessing
import os
import platform
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDMQ = os.path.join(ROOT, "target", "release", "shardmq")
PORT = 18871
SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]
PAYLOAD = b"x" * 100


# --- MQTT 5 packets (only what this tool sends and reads) ---------------------------------

def varint(n):
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect(client_id, clean_start, expiry=3600):
    properties = b"\x11" + struct.pack(">I", expiry)  # session expiry interval
    body = string("MQTT") + bytes([5, 0x02 if clean_start else 0x00]) + struct.pack(">H", 60)
    return packet(0x10, body + varint(len(properties)) + properties + string(client_id))


def subscribe(packet_id, topic):
    return packet(0x82, struct.pack(">H", packet_id) + b"\x00" + string(topic) + b"\x01")


def publish(packet_id, topic):
    return packet(0x32, string(topic) + struct.pack(">H", packet_id) + b"\x00" + PAYLOAD)


def puback(packet_id):
    return packet(0x40, struct.pack(">H", packet_id))


DISCONNECT = b"\xe0\x00"


async def read_packet(reader):
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


def read_packet_blocking(sock):
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    first = exactly(1)[0]
    length, shift = 0, 0
    while True:
        byte = exactly(1)[0]
        length += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, exactly(length)


# --- phase 1 and 2: sessions and queued messages ------------------------------------------

async def make_session(i, semaphore, failures):
    async with semaphore:
        for attempt in range(5):
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", PORT, local_addr=(SOURCES[i % len(SOURCES)], 0)), 30)
                writer.write(connect(f"rec-{i}", False) + subscribe(1, f"rec/{i}"))
                first, body = await asyncio.wait_for(read_packet(reader), 60)
                if first != 0x20 or body[1] != 0:
                    raise RuntimeError(f"CONNACK {body[1:2].hex()}")
                first, body = await asyncio.wait_for(read_packet(reader), 60)
                if first != 0x90 or body[-1] >= 0x80:
                    raise RuntimeError(f"SUBACK {body[-1:].hex()}")
                writer.write(DISCONNECT)
                await writer.drain()
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass
                return
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, RuntimeError) as error:
                failures.append(f"rec-{i} attempt {attempt}: {error!r}")
                await asyncio.sleep(0.2 * (attempt + 1))


async def publish_range(indices, queued, failures):
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT, local_addr=(SOURCES[0], 0))
    writer.write(connect(f"rec-publisher-{indices[0]}", True, 0))
    first, body = await read_packet(reader)
    if first != 0x20 or body[1] != 0:
        raise RuntimeError("publisher refused")
    window = asyncio.Semaphore(200)
    done = asyncio.Event()
    total = len(indices) * queued
    answered = [0]

    async def acks():
        while answered[0] < total:
            first, body = await read_packet(reader)
            if first >> 4 == 4:
                answered[0] += 1
                if len(body) > 2 and body[2] != 0:
                    failures.append(f"PUBACK reason 0x{body[2]:02x}")
                window.release()
        done.set()

    task = asyncio.create_task(acks())
    packet_id = 0
    for _ in range(queued):
        for i in indices:
            await window.acquire()
            packet_id = packet_id % 65535 + 1
            writer.write(publish(packet_id, f"rec/{i}"))
            if packet_id % 64 == 0:
                await writer.drain()
    await writer.drain()
    await asyncio.wait_for(done.wait(), 300)
    await task
    writer.write(DISCONNECT)
    await writer.drain()
    writer.close()


def worker(args):
    phase, indices, queued = args
    failures = []

    async def run():
        if phase == "sessions":
            semaphore = asyncio.Semaphore(100)
            await asyncio.gather(*(make_session(i, semaphore, failures) for i in indices))
        else:
            await publish_range(indices, queued, failures)

    asyncio.run(run())
    return failures


def in_workers(phase, sessions, workers, queued):
    chunks = [list(range(k, sessions, workers)) for k in range(workers)]
    with multiprocessing.Pool(workers) as pool:
        failures = sum(pool.map(worker, [(phase, chunk, queued) for chunk in chunks]), [])
    return failures


# --- phase 3 and 4: a restart, measured ---------------------------------------------------

def rss_kib(pid):
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def directory_bytes(path):
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True).stdout.split()[0])


def start(config, log_path, shards):
    log = open(log_path, "w")
    started = time.monotonic()
    process = subprocess.Popen(
        [SHARDMQ, "serve", "--shards", str(shards), "--listen", f"127.0.0.1:{PORT}", "--config", config],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    atexit.register(lambda: process.poll() is None and process.kill())
    lines = []  # (seconds since start, line)

    def pump():
        for line in process.stdout:
            lines.append((time.monotonic() - started, line.rstrip()))
            log.write(line)
            log.flush()

    threading.Thread(target=pump, daemon=True).start()
    return process, started, lines


def first_connack(started, limit=600.0):
    n = 0
    while time.monotonic() - started < limit:
        n += 1
        try:
            with socket.create_connection(("127.0.0.1", PORT), timeout=2) as sock:
                sock.settimeout(5)
                sock.sendall(connect(f"probe-{n}", True, 0))
                first, body = read_packet_blocking(sock)
                if first == 0x20:
                    at = time.monotonic() - started
                    sock.sendall(DISCONNECT)
                    return at, body[1]
        except OSError:
            time.sleep(0.005)
    return None, None


def sample_session(i, queued, started):
    """Connects session rec-{i} (clean start false): CONNACK time, session present, messages."""
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as sock:
        # A shard may be slow to answer after "serving": wait up to 120 s and report it.
        sock.settimeout(120)
        sent = time.monotonic()
        sock.sendall(connect(f"rec-{i}", False))
        try:
            first, body = read_packet_blocking(sock)
        except (socket.timeout, ConnectionError) as error:
            return {"connack_after_start_s": time.monotonic() - started, "connack_wait_ms": None,
                    "present": False, "received": 0, "all_received_ms": None, "error": repr(error)}
        connack = time.monotonic()
        present = bool(body[0] & 1)
        received = 0
        sock.settimeout(1.0)
        try:
            while received < queued:
                first, body = read_packet_blocking(sock)
                if first >> 4 == 3:
                    topic_length = struct.unpack(">H", body[:2])[0]
                    packet_id = struct.unpack(">H", body[2 + topic_length:4 + topic_length])[0]
                    sock.sendall(puback(packet_id))
                    received += 1
        except (socket.timeout, ConnectionError):
            pass
        done = time.monotonic()
        sock.sendall(DISCONNECT)
    return {
        "connack_after_start_s": connack - started,
        "connack_wait_ms": (connack - sent) * 1000,
        "present": present,
        "received": received,
        "all_received_ms": (done - sent) * 1000,
    }


def probes_after(started, lines, count=10, spacing=0.1):
    """From the `serving` line on, COUNT new clean clients SPACING s apart, each waiting up to
    30 s for its CONNACK: (sent at s after the start, CONNACK wait ms or None)."""
    deadline = time.monotonic() + 600
    while not any("serving MQTT" in line for _, line in list(lines)) and time.monotonic() < deadline:
        time.sleep(0.002)
    results = []

    def probe(n):
        sent = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", PORT), timeout=5) as sock:
                sock.settimeout(30)
                sock.sendall(connect(f"after-{n}", True, 0))
                first, _ = read_packet_blocking(sock)
                waited = (time.monotonic() - sent) * 1000 if first == 0x20 else None
        except OSError:
            waited = None
        results.append((sent - started, waited))

    threads = []
    for n in range(count):
        threads.append(threading.Thread(target=probe, args=(n,)))
        threads[-1].start()
        time.sleep(spacing)
    for thread in threads:
        thread.join()
    return sorted(results)


def measure_restart(config, log_path, shards, sample_indices, queued):
    process, started, lines = start(config, log_path, shards)
    after = []
    prober = threading.Thread(target=lambda: after.extend(probes_after(started, lines)))
    prober.start()
    connack_at, reason = first_connack(started)
    prober.join()

    def line_at(pattern):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            for at, line in list(lines):
                if re.search(pattern, line):
                    return at, line
            if process.poll() is not None:
                return None, None
            time.sleep(0.01)
        return None, None

    serving_at, _ = line_at("shardmq serving MQTT")
    samples = [sample_session(i, queued, started) for i in sample_indices]
    time.sleep(2)
    rss, hwm = rss_kib(process.pid)
    replay = [(at, line) for at, line in lines if "durable log recovered" in line]
    restored = [(at, line) for at, line in lines if "restored from the durable log" in line]
    return process, {
        "serving_s": serving_at,
        "first_connack_s": connack_at,
        "first_connack_reason": reason,
        "replay": replay,
        "restored": restored,
        "after": after,
        "serving": [(at, line) for at, line in lines if "serving MQTT" in line],
        "log_tail": [(at, line) for at, line in lines][-5:],
        "samples": samples,
        "rss_kib": rss,
        "hwm_kib": hwm,
    }


def fmt_ms(v):
    return "-" if v is None else f"{v:.1f} ms"


def describe(title, m, queued):
    out = [f"### {title}", ""]
    out.append(f"- process start to `shardmq serving MQTT`: {m['serving_s']:.2f} s" if m["serving_s"] is not None else "- no serving line")
    out.append(f"- process start to the first CONNACK of a probe (a new clean session, tried every 5 ms): {m['first_connack_s']:.2f} s (reason 0x{m['first_connack_reason']:02x})" if m["first_connack_s"] is not None else "- no CONNACK")
    for at, line in m["replay"]:
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        out.append(f"- `durable log recovered` at {at:.2f} s: {os.path.basename(fields.get('directory', '?'))}, segments {fields.get('segments')}, records {fields.get('records')}, sessions {fields.get('sessions')}, replay_ms {fields.get('replay_ms')}")
    for at, line in m["serving"]:
        out.append(f"- `shardmq serving MQTT` at {at:.2f} s")
    if m["after"]:
        out.append("- new clean clients from the `serving` line on, 0.1 s apart, each waiting up to 30 s: " + ", ".join(
            f"sent at {at:.2f} s: {fmt_ms(waited)}" for at, waited in m["after"]))
    for at, line in m["restored"]:
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        out.append(f"- `restored from the durable log` at {at:.2f} s: shard {fields.get('shard')}, sessions {fields.get('sessions')}")
    for i, x in enumerate(m["samples"]):
        out.append(f"  - sample {i}: CONNACK at {x['connack_after_start_s']:.2f} s after the start, waited {fmt_ms(x['connack_wait_ms'])}, session present {x['present']}, {x['received']} messages{', ' + x['error'] if 'error' in x else ''}")
    s = [x for x in m["samples"] if x["connack_wait_ms"] is not None]
    if len(s) < len(m["samples"]):
        out.append(f"- {len(m['samples']) - len(s)} sample sessions got no CONNACK within 120 s")
    if s:
        out.append(f"- {len(s)} sample sessions reconnected one after another from {s[0]['connack_after_start_s']:.2f} s: CONNACK wait median {statistics.median(x['connack_wait_ms'] for x in s):.1f} ms, max {max(x['connack_wait_ms'] for x in s):.1f} ms; session present {sum(x['present'] for x in s)}/{len(s)}; queued messages received {sum(x['received'] for x in s)} of {queued * len(s)} expected (all of a session's within median {statistics.median(x['all_received_ms'] for x in s):.1f} ms of its CONNECT)")
    out.append(f"- RSS 2 s after the samples: {m['rss_kib'] / 1024:.0f} MiB (peak {m['hwm_kib'] / 1024:.0f} MiB)")
    return out + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100000)
    parser.add_argument("--queued", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--sync", default="always")
    parser.add_argument("--out", default=os.path.join(ROOT, "tuning", "results", f"{datetime.date.today()}-recovery.md"))
    args = parser.parse_args()
    sh = lambda c: subprocess.run(["sh", "-c", c], capture_output=True, text=True).stdout.strip()
    loads = {}
    # The logs stay in target/bench-recovery/ after the run (the next run clears it).
    work = os.path.join(ROOT, "target", "bench-recovery")
    subprocess.run(["rm", "-rf", work], check=True)
    os.makedirs(work)
    data = os.path.join(work, "data")
    config = os.path.join(work, "shardmq.toml")
    with open(config, "w") as f:
        f.write(f'[server]\ndata_dir = "{data}"\n[storage]\nsync = "{args.sync}"\n')
    process, started, lines = start(config, os.path.join(work, "first.log"), args.shards)
    first_connack(started, 30)
    loads["sessions"] = open("/proc/loadavg").read().split()[0]
    t = time.monotonic()
    failures = in_workers("sessions", args.sessions, args.workers, args.queued)
    sessions_s = time.monotonic() - t
    print(f"{args.sessions} sessions in {sessions_s:.1f} s, {len(failures)} failed attempts", flush=True)
    loads["publish"] = open("/proc/loadavg").read().split()[0]
    t = time.monotonic()
    publish_failures = in_workers("publish", args.sessions, args.workers, args.queued)
    publish_s = time.monotonic() - t
    print(f"{args.sessions * args.queued} messages in {publish_s:.1f} s, {len(publish_failures)} failures", flush=True)
    time.sleep(1)
    rss_before, hwm_before = rss_kib(process.pid)
    size_before = directory_bytes(data)
    process.send_signal(signal.SIGKILL)
    process.wait()
    loads["crash restart"] = open("/proc/loadavg").read().split()[0]
    process, crash = measure_restart(config, os.path.join(work, "crash.log"), args.shards, range(args.sample), args.queued)
    print("after SIGKILL:", {k: v for k, v in crash.items() if k != "samples"}, flush=True)
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    size_clean = directory_bytes(data)
    loads["clean restart"] = open("/proc/loadavg").read().split()[0]
    process, clean = measure_restart(config, os.path.join(work, "clean.log"), args.shards, range(args.sample, 2 * args.sample), args.queued)
    print("after SIGTERM:", {k: v for k, v in clean.items() if k != "samples"}, flush=True)
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    errors = failures[:5] + publish_failures[:5]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
    lines = [
        f"# Recovery of {args.sessions:,} persistent sessions with {args.queued} queued QoS 1 messages each, {now}",
        "",
        f"- Machine: {cpu}, `nproc` {sh('nproc')}, `uname -r` {platform.release()}; shared with other engineers' builds (noisy)",
        "- Load average (1 min): " + ", ".join(f"{k} {v}" for k, v in loads.items()),
        f"- shardmq {sh(f'git -C {ROOT} rev-parse --short HEAD')} release build, `serve --shards {args.shards}`, `[storage] sync = \"{args.sync}\"`, data directory under target/ (the VM's disk)",
        f"- Reproduce: `cargo build --release && tools/bench_recovery.py --sessions {args.sessions} --queued {args.queued} --shards {args.shards} --workers {args.workers} --sample {args.sample} --sync {args.sync}`",
        "",
        "## Load",
        "",
        f"- {args.sessions:,} sessions (MQTT 5, clean start false, session expiry 3600 s, one QoS 1 subscription `rec/{{i}}` each, then DISCONNECT) made in {sessions_s:.1f} s by {args.workers} processes ({args.sessions / sessions_s:,.0f}/s); {len(failures)} failed attempts (retried)",
        f"- {args.sessions * args.queued:,} QoS 1 messages of {len(PAYLOAD)} bytes published to the offline sessions in {publish_s:.1f} s ({args.sessions * args.queued / publish_s:,.0f}/s), every PUBACK checked: {len(publish_failures)} not 0x00",
        f"- Before the SIGKILL: data directory {size_before / 1e6:.1f} MB, broker RSS {rss_before / 1024:.0f} MiB (peak {hwm_before / 1024:.0f} MiB)",
        f"- After the SIGTERM that ended the crash restart: data directory {size_clean / 1e6:.1f} MB",
    ]
    if errors:
        lines.append("- First failures: " + "; ".join(errors))
    lines += ["", "## Restart after SIGKILL", ""] + describe("measured from the new process's start", crash, args.queued)
    lines += ["## Clean restart (after SIGTERM)", ""] + describe("measured from the new process's start", clean, args.queued)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
