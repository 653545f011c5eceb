#!/usr/bin/env python3
"""paho-mqtt over WebSocket against a shardmq broker:
`websocket.py PORT PATH [CA_FILE]` (with CA_FILE: WebSocket over TLS, the server checked
against that authority).

A 5.0 and a 3.1.1 client subscribe, a third client publishes QoS 0, 1 and 2 with a payload
larger than one TCP segment, and each subscriber must receive each message exactly. Exits
non-zero at the first failure; every wait is bounded.
"""
import sys
import threading

import paho.mqtt.client as mqtt

PORT = int(sys.argv[1])
PATH = sys.argv[2]
CA_FILE = sys.argv[3] if len(sys.argv) > 3 else None
TIMEOUT = 10


def client(client_id, protocol):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                    transport="websockets")
    c.ws_set_options(path=PATH)
    if CA_FILE:
        c.tls_set(ca_certs=CA_FILE)
    connected = threading.Event()
    c.on_connect = lambda *args: connected.set()
    c.connect("127.0.0.1", PORT, keepalive=30)
    c.loop_start()
    if not connected.wait(TIMEOUT):
        sys.exit(f"{client_id}: no CONNACK over WebSocket")
    return c


def main():
    payloads = [b"qos0", b"qos1-" + bytes(range(256)) * 20, b"qos2-" + b"x" * 70000]
    received = {}
    done = threading.Condition()
    subscribers = []
    for client_id, protocol in [("ws-sub-5", mqtt.MQTTv5), ("ws-sub-4", mqtt.MQTTv311)]:
        sub = client(client_id, protocol)
        received[client_id] = []

        def on_message(c, userdata, message, client_id=client_id):
            with done:
                received[client_id].append(message.payload)
                done.notify_all()
        sub.on_message = on_message
        subscribed = threading.Event()
        sub.on_subscribe = lambda *args, e=subscribed: e.set()
        sub.subscribe("ws/test", qos=2)
        if not subscribed.wait(TIMEOUT):
            sys.exit(f"{client_id}: no SUBACK")
        subscribers.append(sub)
    pub = client("ws-pub", mqtt.MQTTv5)
    for qos, payload in enumerate(payloads):
        info = pub.publish("ws/test", payload, qos=qos)
        info.wait_for_publish(TIMEOUT)
        if not info.is_published():
            sys.exit(f"publish at QoS {qos} not acknowledged")
    with done:
        done.wait_for(lambda: all(len(r) >= len(payloads) for r in received.values()), TIMEOUT)
    for client_id, got in received.items():
        if got != payloads:
            sys.exit(f"{client_id} received {[len(p) for p in got]} bytes, expected {[len(p) for p in payloads]}")
    for c in subscribers + [pub]:
        c.disconnect()
        c.loop_stop()
    print("paho websocket passed")


main()
