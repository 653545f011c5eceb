#!/usr/bin/env python3
"""Writes tests/corpus/malformed/*.txt: packets a peer might send that the codec must refuse.

Each file holds `key: value` lines:
  state     the connection's state when the bytes arrive: `connect` (they are the first bytes),
            or `v3.1`, `v3.1.1`, `v5` (a valid CONNECT of that version was accepted first; the
            socket replay sends it)
  rule      the normative statement (or section) the decoder must name
  reason    the MQTT 5 reason code of the error
  response  what the peer receives before the close: `close`, `connack-v5 0xNN`,
            `connack-v3 0xNN` or `disconnect 0xNN`
  max_packet_size  (optional) the server's maximum packet size for this case
  hex       the bytes

The expectations here are written by hand from the specification, not taken from the decoder.
Run `python3 tools/gen_malformed_corpus.py` after changing a case; the tests read the files.
"""
import os
import shutil

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "corpus", "malformed")


def vbi(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def s(text):
    data = text.encode() if isinstance(text, str) else bytes(text)
    return len(data).to_bytes(2, "big") + data


def u16(n):
    return n.to_bytes(2, "big")


def u32(n):
    return n.to_bytes(4, "big")


def props(*items):
    body = b"".join(items)
    return vbi(len(body)) + body


def pkt(first_byte, body):
    return bytes([first_byte]) + vbi(len(body)) + body


def connect(level=5, flags=0x02, properties=None, payload=None, name="MQTT"):
    body = s(name) + bytes([level, flags]) + u16(60)
    if level == 5:
        body += properties if properties is not None else props()
    body += payload if payload is not None else s("client-1")
    return pkt(0x10, body)


def publish(topic, qos=0, first_byte=None, packet_id=None, properties=b"", v5=True,
            payload=b"hi"):
    body = s(topic)
    if packet_id is not None:
        body += u16(packet_id)
    elif qos:
        body += u16(1)
    if v5:
        body += properties if properties else props()
    body += payload
    return pkt(first_byte if first_byte is not None else 0x30 | qos << 1, body)


def subscribe(entries, packet_id=1, properties=None, v5=True, first_byte=0x82):
    body = u16(packet_id)
    if v5:
        body += properties if properties is not None else props()
    for topic, options in entries:
        body += s(topic) + bytes([options])
    return pkt(first_byte, body)


CASES = []


def case(name, state, data, rule, reason, response, max_packet_size=None):
    CASES.append((name, state, data, rule, reason, response, max_packet_size))


# --- CONNECT, the first packet ---------------------------------------------------------------
case("connect-reserved-flag-v5", "connect", connect(flags=0x03),
     "MQTT-3.1.2-3", 0x81, "connack-v5 0x81")
case("connect-reserved-flag-v311", "connect", connect(level=4, flags=0x03),
     "MQTT-3.1.2-3", 0x81, "close")
case("connect-will-qos-without-will-flag-v5", "connect", connect(flags=0x0A),
     "MQTT-3.1.2-11", 0x81, "connack-v5 0x81")
case("connect-will-retain-without-will-flag-v311", "connect", connect(level=4, flags=0x22),
     "MQTT-3.1.2-13", 0x81, "close")
case("connect-will-qos-3-v5", "connect",
     connect(flags=0x1E, payload=s("c") + props() + s("will/t") + s("bye")),
     "MQTT-3.1.2-12", 0x81, "connack-v5 0x81")
case("connect-password-without-username-v311", "connect",
     connect(level=4, flags=0x42, payload=s("c") + s("secret")),
     "MQTT-3.1.2-22", 0x81, "close")
case("connect-unsupported-level-6", "connect", connect(level=6, properties=b""),
     "MQTT-3.1.2-2", 0x84, "connack-v3 0x01")
case("connect-mqisdp-with-level-4", "connect", connect(level=4, name="MQIsdp"),
     "MQTT-3.1.2-2", 0x84, "connack-v3 0x01")
case("connect-unknown-protocol-name", "connect", connect(level=4, name="MQTX"),
     "MQTT-3.1.2-1", 0x82, "close")
case("connect-client-id-null-character-v5", "connect", connect(payload=s(b"a\x00b")),
     "MQTT-1.5.4-2", 0x81, "connack-v5 0x81")
case("connect-client-id-surrogate-v311", "connect", connect(level=4, payload=s(b"\xed\xa0\x80")),
     "MQTT-1.5.4-1", 0x81, "close")
case("connect-client-id-overlong-utf8-v5", "connect", connect(payload=s(b"\xc0\xaf")),
     "MQTT-1.5.4-1", 0x81, "connack-v5 0x81")
case("connect-client-id-invalid-utf8-byte-v31", "connect",
     connect(level=3, name="MQIsdp", payload=s(b"\xff\xfe")),
     "MQTT-1.5.4-1", 0x81, "close")
case("connect-trailing-byte-v311", "connect", connect(level=4, payload=s("c") + b"\x00"),
     "§2.1.4", 0x81, "close")
case("connect-client-id-runs-past-end-v5", "connect", connect(payload=u16(10) + b"ab"),
     "§2.1.4", 0x81, "connack-v5 0x81")
case("connect-will-topic-wildcard-v311", "connect",
     connect(level=4, flags=0x06, payload=s("c") + s("a/+") + s("bye")),
     "MQTT-3.3.2-2", 0x90, "close")
case("connect-will-topic-wildcard-v5", "connect",
     connect(flags=0x06, payload=s("c") + props() + s("a/#") + s("bye")),
     "MQTT-3.3.2-2", 0x90, "connack-v5 0x90")
case("connect-duplicate-session-expiry-v5", "connect",
     connect(properties=props(b"\x11" + u32(1), b"\x11" + u32(2))),
     "§2.2.2.2", 0x82, "connack-v5 0x82")
case("connect-topic-alias-property-v5", "connect", connect(properties=props(b"\x23" + u16(1))),
     "§2.2.2.2", 0x81, "connack-v5 0x81")
case("connect-unknown-property-v5", "connect", connect(properties=props(b"\x7f\x00")),
     "§2.2.2.2", 0x81, "connack-v5 0x81")
case("connect-receive-maximum-zero-v5", "connect", connect(properties=props(b"\x21" + u16(0))),
     "§3.1.2.11.3", 0x82, "connack-v5 0x82")
case("connect-maximum-packet-size-zero-v5", "connect",
     connect(properties=props(b"\x27" + u32(0))),
     "§3.1.2.11.4", 0x82, "connack-v5 0x82")
case("connect-request-problem-information-2-v5", "connect",
     connect(properties=props(b"\x17\x02")),
     "§2.2.2.2", 0x82, "connack-v5 0x82")
case("connect-authentication-data-without-method-v5", "connect",
     connect(properties=props(b"\x16" + s(b"\x01"))),
     "§3.1.2.11.10", 0x82, "connack-v5 0x82")
case("connect-properties-run-past-end-v5", "connect",
     pkt(0x10, s("MQTT") + b"\x05\x02" + u16(60) + b"\x10\x11"),
     "§2.1.4", 0x81, "connack-v5 0x81")
case("connect-will-user-property-null-v5", "connect",
     connect(flags=0x06, payload=s("c") + props(b"\x26" + s(b"k\x00") + s("v")) + s("w") + s("x")),
     "MQTT-1.5.4-2", 0x81, "connack-v5 0x81")
case("connect-will-response-topic-wildcard-v5", "connect",
     connect(flags=0x06, payload=s("c") + props(b"\x08" + s("reply/#")) + s("w") + s("x")),
     "MQTT-3.3.2-14", 0x82, "connack-v5 0x82")
case("connect-reserved-fixed-header-flags", "connect", b"\x11" + connect()[1:],
     "MQTT-2.1.3-1", 0x81, "close")
case("connect-remaining-length-five-bytes", "connect", b"\x10\x80\x80\x80\x80\x01",
     "§1.5.5", 0x81, "close")
case("connect-remaining-length-not-shortest", "connect", b"\x10\x80\x00",
     "MQTT-1.5.5-1", 0x81, "close")
case("connect-larger-than-maximum-packet-size", "connect", b"\x10\xff\xff\xff\x7f",
     "§3.1.2.11.4", 0x95, "close", max_packet_size=1048576)
case("connect-reserved-packet-type-0", "connect", b"\x00\x00",
     "§2.1.2", 0x81, "close")
case("connect-connack-from-client", "connect", b"\x20\x02\x00\x00",
     "§2.1.2", 0x82, "close")

# --- after a 5.0 CONNECT ---------------------------------------------------------------------
case("publish-qos-3-v5", "v5", publish("a/b", first_byte=0x36, packet_id=1),
     "MQTT-3.3.1-4", 0x81, "disconnect 0x81")
case("publish-dup-on-qos-0-v5", "v5", publish("a/b", first_byte=0x38),
     "MQTT-3.3.1-2", 0x81, "disconnect 0x81")
case("publish-topic-with-plus-v5", "v5", publish("a/+"),
     "MQTT-3.3.2-2", 0x90, "disconnect 0x90")
case("publish-topic-with-hash-v5", "v5", publish("a/#", qos=1),
     "MQTT-3.3.2-2", 0x90, "disconnect 0x90")
case("publish-empty-topic-without-alias-v5", "v5", publish(""),
     "MQTT-4.7.3-1", 0x90, "disconnect 0x90")
case("publish-packet-id-zero-v5", "v5", publish("a/b", qos=1, packet_id=0),
     "MQTT-2.2.1-3", 0x82, "disconnect 0x82")
case("publish-topic-alias-zero-v5", "v5", publish("a/b", properties=props(b"\x23" + u16(0))),
     "MQTT-3.3.2-8", 0x94, "disconnect 0x94")
case("publish-subscription-identifier-from-client-v5", "v5",
     publish("a/b", properties=props(b"\x0b\x01")),
     "MQTT-3.3.4-6", 0x82, "disconnect 0x82")
case("publish-duplicate-topic-alias-v5", "v5",
     publish("a/b", properties=props(b"\x23" + u16(1), b"\x23" + u16(2))),
     "§2.2.2.2", 0x82, "disconnect 0x82")
case("publish-payload-format-indicator-2-v5", "v5", publish("a/b", properties=props(b"\x01\x02")),
     "§2.2.2.2", 0x82, "disconnect 0x82")
case("publish-session-expiry-property-v5", "v5",
     publish("a/b", properties=props(b"\x11" + u32(5))),
     "§2.2.2.2", 0x81, "disconnect 0x81")
case("publish-topic-null-character-v5", "v5", publish(b"a\x00b"),
     "MQTT-1.5.4-2", 0x81, "disconnect 0x81")
case("publish-topic-surrogate-v5", "v5", publish(b"a/\xed\xbf\xbf"),
     "MQTT-1.5.4-1", 0x81, "disconnect 0x81")
case("publish-user-property-runs-past-end-v5", "v5",
     pkt(0x30, s("a/b") + b"\x06\x26" + s("k") + u16(9)),
     "§2.1.4", 0x81, "disconnect 0x81")
case("publish-response-topic-wildcard-v5", "v5",
     publish("a/b", properties=props(b"\x08" + s("reply/+"))),
     "MQTT-3.3.2-14", 0x82, "disconnect 0x82")
case("publish-property-length-not-shortest-v5", "v5", pkt(0x30, s("a/b") + b"\x80\x00" + b"x"),
     "MQTT-1.5.5-1", 0x81, "disconnect 0x81")
case("publish-larger-than-maximum-packet-size-v5", "v5", b"\x30\xff\xff\xff\x7f",
     "§3.1.2.11.4", 0x95, "disconnect 0x95", max_packet_size=1048576)
case("packet-remaining-length-five-bytes-v5", "v5", b"\x30\xff\xff\xff\xff\x01",
     "§1.5.5", 0x81, "disconnect 0x81")
case("puback-reserved-flags-v5", "v5", b"\x41\x02\x00\x01",
     "MQTT-2.1.3-1", 0x81, "disconnect 0x81")
case("puback-invalid-reason-code-v5", "v5", b"\x40\x03\x00\x01\x05",
     "§3.4.2.1", 0x82, "disconnect 0x82")
case("puback-packet-id-zero-v5", "v5", b"\x40\x02\x00\x00",
     "MQTT-2.2.1-3", 0x82, "disconnect 0x82")
case("pubrec-invalid-reason-code-v5", "v5", b"\x50\x03\x00\x01\x92",
     "§3.5.2.1", 0x82, "disconnect 0x82")
case("pubrec-trailing-byte-v5", "v5", b"\x50\x05\x00\x01\x00\x00\xff",
     "§2.1.4", 0x81, "disconnect 0x81")
case("pubrel-flags-0000-v5", "v5", b"\x60\x02\x00\x01",
     "MQTT-3.6.1-1", 0x81, "disconnect 0x81")
case("pubrel-invalid-reason-code-v5", "v5", b"\x62\x03\x00\x01\x10",
     "§3.6.2.1", 0x82, "disconnect 0x82")
case("pubcomp-reason-string-runs-past-end-v5", "v5", b"\x70\x07\x00\x01\x00\x04\x1f\x00\x09",
     "§2.1.4", 0x81, "disconnect 0x81")
case("subscribe-flags-0000-v5", "v5", subscribe([("a", 0)], first_byte=0x80),
     "MQTT-3.8.1-1", 0x81, "disconnect 0x81")
case("subscribe-without-filter-v5", "v5", subscribe([]),
     "MQTT-3.8.3-2", 0x82, "disconnect 0x82")
case("subscribe-options-reserved-bits-v5", "v5", subscribe([("a", 0xC0)]),
     "MQTT-3.8.3-5", 0x81, "disconnect 0x81")
case("subscribe-qos-3-v5", "v5", subscribe([("a", 0x03)]),
     "§3.8.3.1", 0x81, "disconnect 0x81")
case("subscribe-retain-handling-3-v5", "v5", subscribe([("a", 0x30)]),
     "§3.8.3.1", 0x82, "disconnect 0x82")
case("subscribe-no-local-on-shared-v5", "v5", subscribe([("$share/g/a", 0x04)]),
     "MQTT-3.8.3-4", 0x82, "disconnect 0x82")
case("subscribe-hash-not-last-v5", "v5", subscribe([("a/#/b", 0)]),
     "MQTT-4.7.1-1", 0x8F, "disconnect 0x8F")
case("subscribe-hash-inside-level-v5", "v5", subscribe([("a/b#", 0)]),
     "MQTT-4.7.1-1", 0x8F, "disconnect 0x8F")
case("subscribe-plus-inside-level-v5", "v5", subscribe([("ok", 1), ("a/b+", 0)]),
     "MQTT-4.7.1-2", 0x8F, "disconnect 0x8F")
case("subscribe-shared-empty-group-v5", "v5", subscribe([("$share//a", 0)]),
     "MQTT-4.8.2-1", 0x8F, "disconnect 0x8F")
case("subscribe-shared-without-filter-v5", "v5", subscribe([("$share/g", 0)]),
     "MQTT-4.8.2-2", 0x8F, "disconnect 0x8F")
case("subscribe-shared-group-wildcard-v5", "v5", subscribe([("$share/g+/a", 0)]),
     "MQTT-4.8.2-2", 0x8F, "disconnect 0x8F")
case("subscribe-empty-filter-v5", "v5", subscribe([("", 0)]),
     "MQTT-4.7.3-1", 0x8F, "disconnect 0x8F")
case("subscribe-subscription-identifier-zero-v5", "v5",
     subscribe([("a", 0)], properties=props(b"\x0b\x00")),
     "§3.3.2.3.8", 0x82, "disconnect 0x82")
case("subscribe-two-subscription-identifiers-v5", "v5",
     subscribe([("a", 0)], properties=props(b"\x0b\x01", b"\x0b\x02")),
     "§2.2.2.2", 0x82, "disconnect 0x82")
case("subscribe-packet-id-zero-v5", "v5", subscribe([("a", 0)], packet_id=0),
     "MQTT-2.2.1-3", 0x82, "disconnect 0x82")
case("subscribe-options-missing-v5", "v5", pkt(0x82, u16(1) + props() + s("a")),
     "§2.1.4", 0x81, "disconnect 0x81")
case("unsubscribe-flags-0000-v5", "v5", pkt(0xA0, u16(1) + props() + s("a")),
     "MQTT-3.10.1-1", 0x81, "disconnect 0x81")
case("unsubscribe-without-filter-v5", "v5", pkt(0xA2, u16(1) + props()),
     "MQTT-3.10.3-2", 0x82, "disconnect 0x82")
case("unsubscribe-hash-not-last-v5", "v5", pkt(0xA2, u16(1) + props() + s("#/a")),
     "MQTT-4.7.1-1", 0x8F, "disconnect 0x8F")
case("pingreq-with-body-v5", "v5", b"\xc0\x01\x00",
     "§2.1.4", 0x81, "disconnect 0x81")
case("pingreq-reserved-flags-v5", "v5", b"\xc1\x00",
     "MQTT-2.1.3-1", 0x81, "disconnect 0x81")
case("disconnect-invalid-reason-code-v5", "v5", b"\xe0\x01\x05",
     "§3.14.2.1", 0x82, "disconnect 0x82")
case("disconnect-reserved-flags-v5", "v5", b"\xe2\x00",
     "MQTT-2.1.3-1", 0x81, "disconnect 0x81")
case("disconnect-assigned-client-identifier-property-v5", "v5",
     pkt(0xE0, b"\x00" + props(b"\x12" + s("x"))),
     "§2.2.2.2", 0x81, "disconnect 0x81")
case("auth-invalid-reason-code-v5", "v5", b"\xf0\x02\x01\x00",
     "§3.15.2.1", 0x82, "disconnect 0x82")
case("auth-reserved-flags-v5", "v5", b"\xf1\x00",
     "MQTT-2.1.3-1", 0x81, "disconnect 0x81")
case("auth-data-without-method-v5", "v5", pkt(0xF0, b"\x18" + props(b"\x16" + s(b"\x01"))),
     "§3.1.2.11.10", 0x82, "disconnect 0x82")
case("suback-from-client-v5", "v5", b"\x90\x04\x00\x01\x00\x00",
     "§2.1.2", 0x82, "disconnect 0x82")
case("pingresp-from-client-v5", "v5", b"\xd0\x00",
     "§2.1.2", 0x82, "disconnect 0x82")
case("connack-from-client-v5", "v5", b"\x20\x03\x00\x00\x00",
     "§2.1.2", 0x82, "disconnect 0x82")
case("reserved-packet-type-0-v5", "v5", b"\x00\x00",
     "§2.1.2", 0x81, "disconnect 0x81")

# --- after a 3.1.1 or 3.1 CONNECT ------------------------------------------------------------
case("auth-before-v5-v311", "v3.1.1", b"\xf0\x00",
     "§2.1.2", 0x81, "close")
case("subscribe-reserved-qos-bits-v311", "v3.1.1", subscribe([("a", 0x04)], v5=False),
     "MQTT-3.8.3-4", 0x81, "close")
case("subscribe-without-filter-v311", "v3.1.1", subscribe([], v5=False),
     "MQTT-3.8.3-2", 0x82, "close")
case("publish-qos-3-v311", "v3.1.1", publish("a", first_byte=0x36, packet_id=1, v5=False),
     "MQTT-3.3.1-4", 0x81, "close")
case("publish-topic-with-plus-v311", "v3.1.1", publish("+", v5=False),
     "MQTT-3.3.2-2", 0x90, "close")
case("publish-empty-topic-v311", "v3.1.1", publish("", v5=False),
     "MQTT-4.7.3-1", 0x90, "close")
case("publish-topic-null-character-v31", "v3.1", publish(b"\x00", v5=False),
     "MQTT-1.5.4-2", 0x81, "close")
case("puback-with-reason-code-v311", "v3.1.1", b"\x40\x03\x00\x01\x00",
     "§2.1.4", 0x81, "close")
case("disconnect-with-body-v311", "v3.1.1", b"\xe0\x01\x00",
     "§2.1.4", 0x81, "close")
case("unsuback-from-client-v311", "v3.1.1", b"\xb0\x02\x00\x01",
     "§2.1.2", 0x82, "close")
case("pubrel-flags-0000-v311", "v3.1.1", b"\x60\x02\x00\x01",
     "MQTT-3.6.1-1", 0x81, "close")


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    names = set()
    for name, state, data, rule, reason, response, max_packet_size in CASES:
        assert name not in names, name
        names.add(name)
        lines = [f"state: {state}", f"rule: {rule}", f"reason: 0x{reason:02X}",
                 f"response: {response}"]
        if max_packet_size is not None:
            lines.append(f"max_packet_size: {max_packet_size}")
        lines.append("hex: " + data.hex(" "))
        with open(os.path.join(OUT, name + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    print(f"wrote {len(CASES)} cases to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
