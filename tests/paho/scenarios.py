#!/usr/bin/env python3
"""paho-mqtt (Eclipse Paho, from PyPI) against a shardmq broker: `scenarios.py PORT`.

Each scenario asserts what a subscriber receives; the script exits non-zero at the first
failure, printing what differed. Every wait is bounded.
"""
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

PORT = int(sys.argv[1])
TIMEOUT = 10


class Collector:
    """A connected client that records the messages it receives."""

    def __init__(self, client_id, protocol, clean=True):
        self.messages = []
        self.lock = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                  clean_session=None if protocol == mqtt.MQTTv5 else clean)
        self.client.on_message = self.on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        if protocol == mqtt.MQTTv5:
            self.client.connect("127.0.0.1", PORT, clean_start=clean)
        else:
            self.client.connect("127.0.0.1", PORT)
        self.client.loop_start()

    def on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append(message)
            self.lock.notify_all()

    def subscribe(self, *args, **kwargs):
        self.subscribed.clear()
        self.client.subscribe(*args, **kwargs)
        assert self.subscribed.wait(TIMEOUT), "no SUBACK"

    def wait(self, count, timeout=TIMEOUT):
        deadline = time.time() + timeout
        with self.lock:
            while len(self.messages) < count and time.time() < deadline:
                self.lock.wait(deadline - time.time())
            return list(self.messages)

    def stop(self):
        self.client.loop_stop()
        self.client.disconnect()


def publisher(client_id, protocol):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    client.connect("127.0.0.1", PORT)
    client.loop_start()
    return client


def check(condition, message):
    if not condition:
        print("FAIL:", message)
        sys.exit(1)


def qos2_in_order(protocol, name):
    sub = Collector(f"paho-sub-{name}", protocol)
    sub.subscribe("paho/order/#", qos=2)
    pub = publisher(f"paho-pub-{name}", protocol)
    for index in range(50):
        pub.publish("paho/order/x", f"{index}", qos=2).wait_for_publish(TIMEOUT)
    got = [m.payload.decode() for m in sub.wait(50)]
    time.sleep(0.3)
    check(got == [str(i) for i in range(50)], f"{name}: QoS 2 in order exactly once, got {got}")
    check(len(sub.messages) == 50, f"{name}: duplicates arrived")
    pub.loop_stop()
    sub.stop()


def v5_properties_and_topic_alias():
    sub = Collector("paho-props-sub", mqtt.MQTTv5)
    properties = Properties(PacketTypes.SUBSCRIBE)
    properties.SubscriptionIdentifier = 42
    sub.subscribe("paho/props/#", qos=1, properties=properties)
    pub = publisher("paho-props-pub", mqtt.MQTTv5)
    first = Properties(PacketTypes.PUBLISH)
    first.TopicAlias = 1
    first.ContentType = "application/json"
    first.ResponseTopic = "paho/replies"
    first.CorrelationData = b"\x01\x02"
    first.UserProperty = [("a", "1"), ("b", "2")]
    first.MessageExpiryInterval = 60
    pub.publish("paho/props/t", "{}", qos=1, properties=first).wait_for_publish(TIMEOUT)
    # The alias alone now stands for the topic.
    second = Properties(PacketTypes.PUBLISH)
    second.TopicAlias = 1
    pub.publish("", "by-alias", qos=1, properties=second).wait_for_publish(TIMEOUT)
    got = sub.wait(2)
    check(len(got) == 2, f"two messages expected, got {len(got)}")
    one, two = got
    check(one.topic == "paho/props/t" and two.topic == "paho/props/t", f"topics {one.topic!r} {two.topic!r}")
    check(two.payload == b"by-alias", "the aliased publish")
    p = one.properties
    check(p.ContentType == "application/json", f"content type {p.ContentType!r}")
    check(p.ResponseTopic == "paho/replies", "response topic")
    check(p.CorrelationData == b"\x01\x02", "correlation data")
    check(p.UserProperty == [("a", "1"), ("b", "2")], f"user properties {p.UserProperty}")
    check(0 < p.MessageExpiryInterval <= 60, f"message expiry {p.MessageExpiryInterval}")
    check(p.SubscriptionIdentifier == [42], f"subscription identifier {p.SubscriptionIdentifier}")
    pub.loop_stop()
    sub.stop()


def v5_no_local_and_retain_handling():
    client = Collector("paho-self", mqtt.MQTTv5)
    client.subscribe("paho/self", options=SubscribeOptions(qos=1, noLocal=True))
    client.client.publish("paho/self", "echo", qos=1)
    time.sleep(0.5)
    check(client.messages == [], "No Local: own message came back")
    client.client.publish("paho/kept", "retained", qos=1, retain=True).wait_for_publish(TIMEOUT)
    time.sleep(0.3)
    client.subscribe("paho/kept", options=SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
    time.sleep(0.5)
    check(client.messages == [], "retain handling 2: retained message was sent")
    client.subscribe("paho/kept", options=SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
    time.sleep(0.5)
    check(client.messages == [], "retain handling 1 on an existing subscription: retained message was sent")
    client.subscribe("paho/kept", options=SubscribeOptions(qos=1))
    got = client.wait(1)
    check(len(got) == 1 and got[0].retain and got[0].payload == b"retained", "retain handling 0 sends it")
    client.stop()


qos2_in_order(mqtt.MQTTv311, "v311")
qos2_in_order(mqtt.MQTTv5, "v5")
v5_properties_and_topic_alias()
v5_no_local_and_retain_handling()
print("paho scenarios passed")
