#!/usr/bin/env python3
"""paho-mqtt (Eclipse Paho, from PyPI) with a username and password: `auth.py PORT`.

Run by tests/auth_broker.rs against a broker whose password file (written by
mosquitto_passwd) holds alice/secret and bob/hunter2, and whose ACL lets alice read and
write public/#. Checks, in 3.1.1 and 5.0: good credentials connect and a message goes
through; a wrong password gets CONNACK 0x86 (3.1.1: return code 4). Every wait is bounded.
"""
import sys
import threading

import paho.mqtt.client as mqtt

PORT = int(sys.argv[1])
TIMEOUT = 10


def check(condition, message):
    if not condition:
        print("FAIL:", message)
        sys.exit(1)


def connect(client_id, protocol, username, password):
    """Connects and waits for CONNACK: (client, reason code as a number)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    client.username_pw_set(username, password)
    answered = threading.Event()
    outcome = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        outcome["code"] = reason_code.value
        answered.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", PORT)
    client.loop_start()
    check(answered.wait(TIMEOUT), f"{client_id}: no CONNACK")
    return client, outcome["code"]


# paho reports a 3.1.1 return code as the 5.0 reason code it stands for (4 as 0x86).
for protocol, name, bad_code in [(mqtt.MQTTv311, "3.1.1", 0x86), (mqtt.MQTTv5, "5.0", 0x86)]:
    subscriber, code = connect(f"paho-sub-{name}", protocol, "alice", "secret")
    check(code == 0, f"{name}: alice was refused with {code}")
    got = threading.Event()
    received = []

    def on_message(client, userdata, message, received=received, got=got):
        received.append(message.payload)
        got.set()

    subscriber.on_message = on_message
    subscribed = threading.Event()
    subscriber.on_subscribe = lambda *args, subscribed=subscribed: subscribed.set()
    subscriber.subscribe("public/paho", qos=1)
    check(subscribed.wait(TIMEOUT), f"{name}: no SUBACK")
    publisher, code = connect(f"paho-pub-{name}", protocol, "bob", "hunter2")
    check(code == 0, f"{name}: bob was refused with {code}")
    publisher.publish("public/paho", b"from paho " + name.encode(), qos=1).wait_for_publish(TIMEOUT)
    check(got.wait(TIMEOUT), f"{name}: the message did not arrive")
    check(received == [b"from paho " + name.encode()], f"{name}: received {received}")
    for client in (subscriber, publisher):
        client.loop_stop()
        client.disconnect()
    refused, code = connect(f"paho-bad-{name}", protocol, "alice", "not-her-password")
    refused.loop_stop()
    check(code == bad_code, f"{name}: a wrong password got {code}, not {bad_code}")

print("paho auth passed")
