#!/usr/bin/env python3
"""Route propagation across a cluster, measured with paho-mqtt.

    python3 tools/route_propagation.py SUB_HOST:PORT PUB_HOST:PORT COUNT

COUNT times, 20 per second: subscribe to a new topic on the SUB node; from the SUBACK on,
publish QoS 0 probes to that topic on the PUB node every 100 us, each carrying its send time;
the delay is the send time of the first probe that arrives, minus the SUBACK time (so it
includes one hop's delivery, and is exact to about 100 us). Prints p50, p99 and max in ms.
A probe that never arrives within 2 s counts as a failure (exit status 1).
"""
import struct
import sys
import threading
import time

import paho.mqtt.client as mqtt


def client(address, name):
    host, port = address.rsplit(":", 1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.connect(host, int(port))
    c.loop_start()
    return c


def main():
    sub_address, pub_address, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    arrived = {}
    subacked = {}
    events = {}

    def on_message(_c, _u, message):
        topic = message.topic
        if topic not in arrived:
            arrived[topic] = struct.unpack(">d", message.payload)[0]
            events[topic].set()

    def on_subscribe(_c, _u, mid, _codes, _props):
        subacked[mid] = time.monotonic()

    subscriber = client(sub_address, "route-probe-sub")
    subscriber.on_message = on_message
    subscriber.on_subscribe = on_subscribe
    publisher = client(pub_address, "route-probe-pub")
    time.sleep(0.5)
    delays, failures = [], 0
    for i in range(count):
        topic = f"probe/{time.monotonic_ns()}/{i}"
        events[topic] = threading.Event()
        _, mid = subscriber.subscribe(topic, qos=0)
        while mid not in subacked:
            time.sleep(0.0001)
        start = subacked[mid]
        deadline = start + 2.0
        while not events[topic].is_set() and time.monotonic() < deadline:
            publisher.publish(topic, struct.pack(">d", time.monotonic()), qos=0)
            time.sleep(0.0001)
        if events[topic].wait(0.5):
            delays.append(max(0.0, arrived[topic] - start) * 1000)
        else:
            failures += 1
        subscriber.unsubscribe(topic)
        time.sleep(0.05)
    delays.sort()
    pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))]
    if delays:
        print(f"route propagation over {len(delays)} subscriptions: "
              f"p50 {pick(0.5):.2f} ms  p99 {pick(0.99):.2f} ms  max {delays[-1]:.2f} ms  "
              f"failures {failures}")
    subscriber.loop_stop()
    publisher.loop_stop()
    return 1 if failures or not delays else 0


if __name__ == "__main__":
    sys.exit(main())
