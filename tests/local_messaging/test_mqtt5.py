"""The local endpoint's MQTT 5 codec: exact bytes, paho-mqtt interop, and hostile input.

Section numbers are those of the MQTT Version 5.0 OASIS Standard (7 March 2019). Client packets are built here
by a separate, deliberately plain encoder (`C`), so the decoder is not checked against itself; server packets
are read back with paho-mqtt's own decoders (paho.mqtt._packet), and a real paho client talks to a small
in-test server over a Unix socket.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.local_messaging import mqtt5
from agent.local_messaging.mqtt5 import (
    CONNACK_CODES,
    SERVER_DISCONNECT_CODES,
    Connect,
    Decoder,
    Disconnect,
    PingReq,
    ProtocolError,
    PubAck,
    Publish,
    Subscribe,
    Subscription,
    Unsubscribe,
    UnsupportedVersion,
    connack,
    connack_v311,
    disconnect,
    pingresp,
    puback,
    publish,
    suback,
    unsuback,
)
from localcloud import pace

V5 = MQTTProtocolVersion.MQTTv5
PACKET_TYPES = (Connect, Publish, PubAck, Subscribe, Unsubscribe, PingReq, Disconnect)


# ---- a plain client-side encoder (the decoder's counterpart, written from the standard) ----


class C:
    """Client packets, byte by byte. Properties are given pre-encoded so tests can put anything there."""

    @staticmethod
    def vbi(n: int) -> bytes:  # 1.5.5
        out = bytearray()
        while True:
            n, d = divmod(n, 128)
            out.append(d | (0x80 if n else 0))
            if not n:
                return bytes(out)

    @staticmethod
    def s(text: str | bytes) -> bytes:  # 1.5.4 / 1.5.6: 2-byte length, then the bytes
        raw = text.encode() if isinstance(text, str) else text
        return len(raw).to_bytes(2, "big") + raw

    @classmethod
    def props(cls, *parts: bytes) -> bytes:  # 2.2.2: Property Length, then the properties
        body = b"".join(parts)
        return cls.vbi(len(body)) + body

    @classmethod
    def user(cls, k: str, v: str) -> bytes:
        return b"\x26" + cls.s(k) + cls.s(v)

    @classmethod
    def packet(cls, first: int, body: bytes) -> bytes:  # 2.1: fixed header
        return bytes((first,)) + cls.vbi(len(body)) + body

    @classmethod
    def connect(
        cls,
        client_id: str = "c",
        *,
        clean: bool = True,
        keepalive: int = 60,
        props: bytes = b"\x00",
        will: bytes | None = None,  # Will Properties + Will Topic + Will Payload, pre-encoded
        will_flags: int = 0,
        username: str | None = None,
        password: bytes | None = None,
        level: int = 5,
        name: bytes = b"MQTT",
        extra_flags: int = 0,
    ) -> bytes:  # 3.1
        flags = extra_flags | (0x02 if clean else 0) | will_flags
        if will is not None:
            flags |= 0x04
        if username is not None:
            flags |= 0x80
        if password is not None:
            flags |= 0x40
        body = cls.s(name) + bytes((level, flags)) + keepalive.to_bytes(2, "big") + props + cls.s(client_id)
        if will is not None:
            body += will
        if username is not None:
            body += cls.s(username)
        if password is not None:
            body += cls.s(password)
        return cls.packet(0x10, body)

    @classmethod
    def publish(
        cls,
        topic: str | bytes,
        payload: bytes = b"",
        *,
        qos: int = 0,
        pid: int | None = None,
        props: bytes = b"\x00",
        dup: bool = False,
        retain: bool = False,
    ) -> bytes:  # 3.3
        body = cls.s(topic) + (pid.to_bytes(2, "big") if pid is not None else b"") + props + payload
        return cls.packet(0x30 | (dup << 3) | (qos << 1) | retain, body)

    @classmethod
    def puback(cls, pid: int, rc: int | None = None, props: bytes | None = None) -> bytes:  # 3.4
        body = pid.to_bytes(2, "big") + (bytes((rc,)) if rc is not None else b"") + (props or b"")
        return cls.packet(0x40, body)

    @classmethod
    def subscribe(cls, pid: int, subs: list[tuple[str | bytes, int]], props: bytes = b"\x00", flags: int = 2) -> bytes:
        body = pid.to_bytes(2, "big") + props + b"".join(cls.s(f) + bytes((o,)) for f, o in subs)
        return cls.packet(0x80 | flags, body)  # 3.8

    @classmethod
    def unsubscribe(cls, pid: int, filters: list[str | bytes], props: bytes = b"\x00", flags: int = 2) -> bytes:
        return cls.packet(0xA0 | flags, pid.to_bytes(2, "big") + props + b"".join(cls.s(f) for f in filters))

    PINGREQ = b"\xc0\x00"  # 3.12

    @classmethod
    def disconnect(cls, rc: int | None = None, props: bytes | None = None) -> bytes:  # 3.14
        return cls.packet(0xE0, (bytes((rc,)) if rc is not None else b"") + (props or b""))


CONNECT = C.connect()
CONNECTED = Connect(protocol_level=5, client_id="c", clean_start=True, keepalive=60)


def connected(max_packet_size: int = mqtt5.DEFAULT_MAX_PACKET_SIZE, **kw) -> Decoder:
    d = Decoder(max_packet_size, **kw)
    assert d.feed(CONNECT) == [CONNECTED]
    return d


def refused(data: bytes, *, decoder: Decoder | None = None) -> ProtocolError:
    d = decoder or connected()
    with pytest.raises(ProtocolError) as e:
        d.feed(data)
    return e.value


def split(packet: bytes) -> tuple[int, bytes]:
    """(first byte, body) of one encoded packet, for paho's decoders."""
    n, shift, i = 0, 0, 1
    while True:
        b = packet[i]
        n |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            break
    assert len(packet) == i + n
    return packet[0], packet[i:]


# ---- exact bytes ----


def test_minimal_connect_decodes():
    # 3.1: Protocol Name "MQTT", level 5, Connect Flags 0x02 (Clean Start), Keep Alive 60, no properties, id "c"
    raw = b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01c"
    assert raw == CONNECT
    assert Decoder().feed(raw) == [CONNECTED]


def test_connect_with_everything():
    props = C.props(
        b"\x11\x00\x00\x01\x2c",  # Session Expiry Interval 300 (3.1.2.11.2)
        b"\x21\x00\x0a",  # Receive Maximum 10
        b"\x27\x00\x00\x10\x00",  # Maximum Packet Size 4096
        b"\x22\x00\x05",  # Topic Alias Maximum 5
        b"\x19\x01",  # Request Response Information 1
        b"\x17\x00",  # Request Problem Information 0
        C.user("a", "1"),
        C.user("a", "2"),  # User Property may repeat, order kept (3.1.2.11.8)
    )
    will = C.props(b"\x01\x01", b"\x18\x00\x00\x00\x05") + C.s("will/t") + C.s("bye")  # 3.1.3.2 - 3.1.3.4
    raw = C.connect("dev-1", clean=False, keepalive=5, props=props, will=will, username="u", password=b"\x00pw")
    assert Decoder().feed(raw) == [
        Connect(
            protocol_level=5,
            client_id="dev-1",
            clean_start=False,
            keepalive=5,
            session_expiry=300,
            receive_maximum=10,
            maximum_packet_size=4096,
            username="u",
            password=b"\x00pw",
            will=True,
            request_problem_information=False,
            user_properties=(("a", "1"), ("a", "2")),
            topic_alias_maximum=5,
            request_response_information=True,
        )
    ]


def test_password_without_user_name_is_mqtt5():
    # 3.1.2.9: MQTT 5 lets a client send a Password without a User Name (3.1.1 did not)
    [p] = Decoder().feed(C.connect(password=b"x"))
    assert isinstance(p, Connect) and p.username is None and p.password == b"x"


def test_client_packets_decode():
    d = connected()
    stream = (
        C.publish("a/b", b"hi")  # 3.3: QoS 0, no Packet Identifier
        + b"\x32\x0a\x00\x03a/b\x00\x07\x00hi"  # 3.3: QoS 1, Packet Identifier 7, no properties, "hi"
        + b"\x40\x02\x00\x07"  # 3.4.2.1: PUBACK short form, Success
        + b"\x40\x03\x00\x08\x10"  # PUBACK with Reason Code 0x10, no Property Length
        + b"\x82\x09\x00\x01\x00\x00\x03a/+\x2d"  # 3.8: SUBSCRIBE id 1, "a/+" QoS 1 + NL + RAP + RH 2
        + b"\xa2\x07\x00\x02\x00\x00\x02a/"  # 3.10: UNSUBSCRIBE id 2, "a/"
        + b"\xc0\x00"  # 3.12 PINGREQ
        + b"\xe0\x00"  # 3.14.2.1: DISCONNECT, Normal disconnection implied
    )
    assert d.feed(stream) == [
        Publish("a/b", b"hi", 0, False, False, None),
        Publish("a/b", b"hi", 1, False, False, 7),
        PubAck(7, 0),
        PubAck(8, 0x10),
        Subscribe(1, (Subscription("a/+", 1, True, True, 2),), None),
        Unsubscribe(2, ("a/",)),
        PingReq(),
        Disconnect(0, None),
    ]


def test_publish_properties_decode():
    props = C.props(
        b"\x01\x01",  # Payload Format Indicator: UTF-8
        b"\x02\x00\x00\x00\x3c",  # Message Expiry Interval 60
        b"\x03" + C.s("application/json"),
        b"\x08" + C.s("reply/here"),
        b"\x09" + C.s(b"\x00\xff"),
        C.user("k", "v"),
    )
    [p] = connected().feed(C.publish("t", "é".encode(), qos=1, pid=9, props=props, dup=True))
    assert p == Publish(
        topic="t",
        payload="é".encode(),
        qos=1,
        retain=False,
        dup=True,
        packet_id=9,
        content_type="application/json",
        payload_format=1,
        message_expiry=60,
        response_topic="reply/here",
        correlation_data=b"\x00\xff",
        user_properties=(("k", "v"),),
    )


def test_subscribe_with_identifier_and_shared_filter_decodes():
    raw = C.subscribe(3, [("$share/g/a/#", 0x01), ("b", 0x10)], props=C.props(b"\x0b\x80\x01", C.user("x", "y")))
    [p] = connected().feed(raw)
    assert p == Subscribe(
        packet_id=3,
        subscriptions=(Subscription("$share/g/a/#", 1, False, False, 0), Subscription("b", 0, False, False, 1)),
        subscription_identifier=128,  # 1.5.5: 0x80 0x01
        user_properties=(("x", "y"),),
    )


def test_puback_and_disconnect_with_properties_decode():
    d = connected()
    got = d.feed(C.puback(5, 0x87, C.props(b"\x1f" + C.s("no"))) + C.puback(6, 0x00, b"\x00"))
    assert got == [PubAck(5, 0x87, "no"), PubAck(6, 0)]
    # Session Expiry may change at DISCONNECT unless it was 0 at CONNECT (3.14.2.2.2); it was 300 here
    d = Decoder()
    d.feed(C.connect(props=C.props(b"\x11\x00\x00\x01\x2c")))
    assert d.feed(C.disconnect(0x04, C.props(b"\x11\x00\x00\x00\x0a", b"\x1f" + C.s("bye")))) == [
        Disconnect(0x04, 10, "bye")
    ]


@pytest.mark.parametrize(
    ("n", "encoded"),
    [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"), (16384, b"\x80\x80\x01")]
    + [(2097151, b"\xff\xff\x7f"), (2097152, b"\x80\x80\x80\x01"), (268435455, b"\xff\xff\xff\x7f")],
)
def test_variable_byte_integer(n, encoded):
    # 1.5.5, Table 1-1's boundaries, through the Subscription Identifier (a VBI property)
    assert mqtt5._varint(n) == encoded
    if n:
        [p] = connected().feed(C.subscribe(1, [("a", 0)], props=C.props(b"\x0b" + encoded)))
        assert isinstance(p, Subscribe) and p.subscription_identifier == n


def test_server_packets_exact_bytes():
    # 3.2: CONNACK flags 0, Success, properties: Session Expiry 0 (0x11), Maximum QoS 1 (0x24), Retain
    # Available 0 (0x25), Subscription Identifiers Available 0 (0x29), Shared Subscription Available 0 (0x2A);
    # Wildcard Subscription Available is left out because absent means 1 (3.2.2.3.13).
    assert connack() == bytes.fromhex("2010 0000 0d 1100000000 2401 2500 2900 2a00")
    assert connack_v311(1) == b"\x20\x02\x00\x01"  # MQTT 3.1.1 3.2.2.3: 0x01 unacceptable protocol version
    assert puback(1) == b"\x40\x02\x00\x01"  # 3.4.2.1: Success, no properties: Remaining Length 2
    assert puback(1, 0x87) == b"\x40\x03\x00\x01\x87"  # 3.4.2.2.1: Property Length omitted
    assert puback(1, 0x87, "no") == b"\x40\x09\x00\x01\x87\x05\x1f\x00\x02no"
    assert suback(10, [1, 0x87]) == b"\x90\x05\x00\x0a\x00\x01\x87"  # 3.9
    assert unsuback(10, [0, 0x11]) == b"\xb0\x05\x00\x0a\x00\x00\x11"  # 3.11
    assert publish("a/b", b"hi") == b"\x30\x08\x00\x03a/b\x00hi"  # 3.3
    assert publish("a/b", b"hi", qos=1, packet_id=7) == b"\x32\x0a\x00\x03a/b\x00\x07\x00hi"
    assert pingresp() == b"\xd0\x00"  # 3.13
    assert disconnect() == b"\xe0\x00"  # 3.14.2.1: 0x00 with no properties may be omitted
    assert disconnect(0x8E) == b"\xe0\x01\x8e"
    assert disconnect(0x82, "x") == b"\xe0\x06\x82\x04\x1f\x00\x01x"


def test_server_packets_read_back_by_paho():
    # CONNACK with every property we set
    first, body = split(
        connack(
            session_present=True,
            reason_string="hello",
            receive_maximum=20,
            maximum_packet_size=70000,
            assigned_client_id="auto-1",
            topic_alias_maximum=3,
            wildcard_available=False,
            server_keep_alive=30,
            session_expiry=None,
        )
    )
    c = paho_packet.decode_connack(first, body, V5)
    assert c.flags == 1 and c.reason == 0 and c.properties is not None
    got = c.properties.json()
    assert got == {
        "ReceiveMaximum": 20,
        "MaximumQoS": 1,
        "RetainAvailable": 0,
        "MaximumPacketSize": 70000,
        "AssignedClientIdentifier": "auto-1",
        "TopicAliasMaximum": 3,
        "ReasonString": "hello",
        "WildcardSubscriptionAvailable": 0,
        "SubscriptionIdentifierAvailable": 0,
        "SharedSubscriptionAvailable": 0,
        "ServerKeepAlive": 30,
    }
    first, body = split(connack(mqtt5.NOT_AUTHORIZED, reason_string="who?"))
    c = paho_packet.decode_connack(first, body, V5)
    assert c.reason == 0x87 and c.properties.ReasonString == "who?"

    raw = publish(
        "a/é",
        b"\x01",
        qos=1,
        packet_id=65535,
        dup=True,
        content_type="ct",
        message_expiry=7,
        user_properties=[("k", "v"), ("k", "w")],
        payload_format=0,
        response_topic="r",
        correlation_data=b"id",
    )
    p = paho_packet.decode_publish(*split(raw), V5)
    assert (p.topic, p.payload, p.qos, p.dup, p.retain, p.mid) == ("a/é".encode(), b"\x01", 1, True, False, 65535)
    assert p.properties.json() == {
        "PayloadFormatIndicator": 0,
        "MessageExpiryInterval": 7,
        "ContentType": "ct",
        "ResponseTopic": "r",
        "CorrelationData": b"id".hex(),
        "UserProperty": [("k", "v"), ("k", "w")],
    }
    a = paho_packet.decode_puback(*split(puback(9, mqtt5.QUOTA_EXCEEDED, "full")), V5)
    assert (a.mid, a.reason, a.properties.ReasonString) == (9, 0x97, "full")
    s = paho_packet.decode_suback(*split(suback(4, [0, 1, 0x87, 0x8F, 0x9E, 0xA2], "some refused")), V5)
    assert (s.mid, [r.value for r in s.reason_codes], s.properties.ReasonString) == (
        4,
        [0, 1, 0x87, 0x8F, 0x9E, 0xA2],
        "some refused",
    )
    u = paho_packet.decode_unsuback(*split(unsuback(4, [0, 0x11])), V5)
    assert (u.mid, [r.value for r in u.reason_codes]) == (4, [0, 0x11])
    d = paho_packet.decode_disconnect(*split(disconnect(0x9B, "QoS 2 is not supported")), V5)
    assert (d.reason, d.properties.ReasonString) == (0x9B, "QoS 2 is not supported")


@pytest.mark.parametrize(
    "call",
    [
        lambda: puback(0),  # 2.2.1: Packet Identifier 0
        lambda: puback(1, mqtt5.PACKET_TOO_LARGE),  # not a PUBACK reason code (3.4.2.1)
        lambda: suback(1, []),
        lambda: suback(1, [mqtt5.PROTOCOL_ERROR]),
        lambda: unsuback(1, [mqtt5.QUOTA_EXCEEDED]),
        lambda: connack(mqtt5.TOPIC_FILTER_INVALID),
        lambda: connack(mqtt5.NOT_AUTHORIZED, session_present=True),  # 3.2.2-6
        lambda: connack(receive_maximum=0),
        lambda: connack(maximum_qos=3),
        lambda: disconnect(mqtt5.DISCONNECT_WITH_WILL),  # client-only code
        lambda: connack_v311(6),
        lambda: publish("a/+", b""),
        lambda: publish("", b""),
        lambda: publish("a", b"", qos=2, packet_id=1),
        lambda: publish("a", b"", qos=1),
        lambda: publish("a", b"", packet_id=1),
        lambda: publish("a", b"", dup=True),
        lambda: publish("a", b"\xff", payload_format=1),
        lambda: publish("a", b"", content_type="a\x00"),
        lambda: publish("a", b"", user_properties=[("\ud800", "x")]),
        lambda: publish("a", b"", correlation_data=b"x" * 65536),
    ],
)
def test_encoders_refuse_what_a_server_must_not_send(call):
    with pytest.raises(ValueError):
        call()


# ---- Reason Strings fit the client's Maximum Packet Size ----


def test_reason_string_is_shortened_to_fit():
    text = "x" * 1000
    raw = puback(1, 0x87, text, max_packet_size=50)
    assert len(raw) == 50  # 9 bytes of packet, 41 of reason
    assert paho_packet.decode_puback(*split(raw), V5).properties.ReasonString == "x" * 41
    raw = puback(1, 0x87, "é" * 100, max_packet_size=50)
    assert len(raw) == 49  # 41 bytes of room hold 20 two-byte characters, never half of one
    assert paho_packet.decode_puback(*split(raw), V5).properties.ReasonString == "é" * 20
    assert len(puback(1, 0x87, text, max_packet_size=10)) == 10  # room for exactly one character
    assert puback(1, 0x87, text, max_packet_size=9) == puback(1, 0x87)  # no room for even one character
    assert puback(1, 0x87, text, max_packet_size=3) == puback(1, 0x87)  # too large anyway: the caller decides
    assert puback(1, 0, text, max_packet_size=4) == puback(1)  # dropped: back to the short form
    assert disconnect(0, text, max_packet_size=4) == b"\xe0\x00"


@pytest.mark.parametrize(
    "build",
    [
        lambda text, m: puback(1, 0x87, text, max_packet_size=m),
        lambda text, m: suback(1, [0x87] * 5, text, max_packet_size=m),
        lambda text, m: unsuback(1, [0x11], text, max_packet_size=m),
        lambda text, m: disconnect(0x82, text, max_packet_size=m),
        lambda text, m: connack(0x85, reason_string=text, max_packet_size=m),
    ],
)
def test_reason_string_always_fits_and_is_a_prefix(build):
    """Every limit from 'nothing fits' to 'everything fits', across the Property Length VBI's 127/128 step."""
    text = "ab€" * 100  # 500 bytes, mixed widths
    bare = build(None, None)
    full = build(text, None)
    for limit in range(1, len(full) + 3):
        raw = build(text, limit)
        assert len(raw) <= max(limit, len(bare)), limit
        if len(bare) < limit:
            # the longest prefix that fits: one more character would not
            first, body = split(raw)
            reason = _reason_of(first, body)
            assert text.startswith(reason)
            if reason != text:
                assert len(build(text[: len(reason) + 1], None)) > limit, limit


def _reason_of(first: int, body: bytes) -> str:
    kind = first >> 4
    if kind == 2:
        props = paho_packet.decode_connack(first, body, V5).properties
    elif kind == 4:
        props = paho_packet.decode_puback(first, body, V5).properties
    elif kind == 9:
        props = paho_packet.decode_suback(first, body, V5).properties
    elif kind == 11:
        props = paho_packet.decode_unsuback(first, body, V5).properties
    else:
        props = paho_packet.decode_disconnect(first, body, V5).properties
    return getattr(props, "ReasonString", "") if props is not None else ""


def test_reason_string_is_made_sendable():
    # U+0000 and lone surrogates cannot be in a UTF-8 string (1.5.4); paho also refuses U+FEFF: all replaced
    raw = disconnect(0x82, "a\x00b\ud800c\ufeffd")
    reason = paho_packet.decode_disconnect(*split(raw), V5).properties.ReasonString
    assert reason == "a\ufffdb?c\ufffdd"
    assert len(paho_packet.decode_disconnect(*split(disconnect(0x82, "é" * 40000)), V5).properties.ReasonString) == (
        32767  # 65535 bytes hold 32767 two-byte characters
    )


# ---- refusals, one by one ----


def P(*parts: bytes) -> bytes:
    return C.props(*parts)


REFUSALS_AFTER_CONNECT = [
    # fixed header (2.1)
    ("reserved type 0", b"\x00\x00", mqtt5.MALFORMED),
    ("second CONNECT", CONNECT, mqtt5.PROTOCOL_ERROR),  # 3.1.0-2
    ("CONNACK from a client", b"\x20\x02\x00\x00", mqtt5.PROTOCOL_ERROR),
    ("SUBACK from a client", b"\x90\x03\x00\x01\x00", mqtt5.PROTOCOL_ERROR),
    ("UNSUBACK from a client", b"\xb0\x03\x00\x01\x00", mqtt5.PROTOCOL_ERROR),
    ("PINGRESP from a client", b"\xd0\x00", mqtt5.PROTOCOL_ERROR),
    ("PUBREC", b"\x50\x02\x00\x01", mqtt5.QOS_NOT_SUPPORTED),
    ("PUBREL", b"\x62\x02\x00\x01", mqtt5.QOS_NOT_SUPPORTED),
    ("PUBCOMP", b"\x70\x02\x00\x01", mqtt5.QOS_NOT_SUPPORTED),
    ("AUTH", b"\xf0\x00", mqtt5.PROTOCOL_ERROR),  # 4.12: no Authentication Method was given
    ("PUBACK flags", b"\x41\x02\x00\x01", mqtt5.MALFORMED),  # 2.1.3: reserved flags
    ("SUBSCRIBE flags", C.subscribe(1, [("a", 0)], flags=0), mqtt5.MALFORMED),
    ("UNSUBSCRIBE flags", C.unsubscribe(1, ["a"], flags=3), mqtt5.MALFORMED),
    ("PINGREQ flags", b"\xc1\x00", mqtt5.MALFORMED),
    ("DISCONNECT flags", b"\xe8\x00", mqtt5.MALFORMED),
    ("Remaining Length not shortest", b"\xc0\x80\x00", mqtt5.MALFORMED),  # 1.5.5-1
    # PUBLISH (3.3)
    ("QoS 3", C.publish("a", qos=3, pid=1), mqtt5.MALFORMED),  # 3.3.1-4
    ("QoS 2", C.publish("a", qos=2, pid=1), mqtt5.QOS_NOT_SUPPORTED),
    ("retain", C.publish("a", retain=True), mqtt5.RETAIN_NOT_SUPPORTED),
    ("DUP on QoS 0", C.publish("a", dup=True), mqtt5.MALFORMED),  # 3.3.1-2
    ("Packet Identifier 0", C.publish("a", qos=1, pid=0), mqtt5.PROTOCOL_ERROR),  # 2.2.1-3
    ("'+' in topic", C.publish("a/+"), mqtt5.TOPIC_NAME_INVALID),  # 3.3.2-2
    ("'#' in topic", C.publish("#"), mqtt5.TOPIC_NAME_INVALID),
    ("empty topic", C.publish(""), mqtt5.PROTOCOL_ERROR),  # 3.3.2.3.4
    ("Topic Alias", C.publish("a", props=P(b"\x23\x00\x01")), mqtt5.TOPIC_ALIAS_INVALID),
    ("empty topic + alias", C.publish("", props=P(b"\x23\x00\x01")), mqtt5.TOPIC_ALIAS_INVALID),
    ("Subscription Identifier", C.publish("a", props=P(b"\x0b\x01")), mqtt5.PROTOCOL_ERROR),  # 3.3.4-6
    ("U+0000 in topic", C.publish("a\x00"), mqtt5.MALFORMED),  # 1.5.4-2
    ("invalid UTF-8", C.publish(b"a\xff"), mqtt5.MALFORMED),  # 1.5.4-1
    ("UTF-8 surrogate", C.publish(b"\xed\xa0\x80"), mqtt5.MALFORMED),  # 1.5.4-1: U+D800
    ("overlong UTF-8", C.publish(b"\xc0\xaf"), mqtt5.MALFORMED),
    ("topic length past end", b"\x30\x03\x00\x05a", mqtt5.MALFORMED),
    ("no topic length", b"\x30\x01\x00", mqtt5.MALFORMED),
    ("no Packet Identifier", b"\x32\x04\x00\x01a\x00", mqtt5.MALFORMED),
    ("no properties", b"\x30\x03\x00\x01a", mqtt5.MALFORMED),
    ("payload not UTF-8", C.publish("a", b"\xff", props=P(b"\x01\x01")), mqtt5.PAYLOAD_FORMAT_INVALID),
    ("payload format 2", C.publish("a", props=P(b"\x01\x02")), mqtt5.PROTOCOL_ERROR),
    ("property twice", C.publish("a", props=P(b"\x03" + C.s("x"), b"\x03" + C.s("y"))), mqtt5.PROTOCOL_ERROR),
    ("expiry twice", C.publish("a", props=P(b"\x02\0\0\0\1", b"\x02\0\0\0\2")), mqtt5.PROTOCOL_ERROR),
    ("wrong property", C.publish("a", props=P(b"\x11\0\0\0\1")), mqtt5.PROTOCOL_ERROR),
    ("Reason String", C.publish("a", props=P(b"\x1f" + C.s("x"))), mqtt5.PROTOCOL_ERROR),
    ("unknown property", C.publish("a", props=P(b"\x7f\x00")), mqtt5.MALFORMED),
    ("2-byte property id", C.publish("a", props=P(b"\x81\x00\x00")), mqtt5.MALFORMED),
    ("property length past end", C.publish("a", props=b"\x05\x01"), mqtt5.MALFORMED),
    ("property value past end", C.publish("a", props=b"\x02\x02\x00"), mqtt5.MALFORMED),
    ("string property past end", C.publish("a", props=P(b"\x03\x00\x09ab")), mqtt5.MALFORMED),
    ("property length not shortest", C.publish("a", props=b"\x80\x00"), mqtt5.MALFORMED),
    ("bad UTF-8 in user property", C.publish("a", props=P(b"\x26" + C.s(b"\xff") + C.s("v"))), mqtt5.MALFORMED),
    ("Response Topic with '+'", C.publish("a", props=P(b"\x08" + C.s("r/+"))), mqtt5.PROTOCOL_ERROR),
    # PUBACK (3.4)
    ("PUBACK id 0", C.puback(0), mqtt5.PROTOCOL_ERROR),
    ("PUBACK reason 0x01", C.puback(1, 0x01), mqtt5.PROTOCOL_ERROR),
    ("PUBACK too short", b"\x40\x01\x00", mqtt5.MALFORMED),
    ("PUBACK trailing bytes", C.puback(1, 0, b"\x00\x00"), mqtt5.MALFORMED),
    ("PUBACK bad property", C.puback(1, 0, P(b"\x03" + C.s("x"))), mqtt5.PROTOCOL_ERROR),
    # SUBSCRIBE (3.8)
    ("SUBSCRIBE id 0", C.subscribe(0, [("a", 0)]), mqtt5.PROTOCOL_ERROR),
    ("SUBSCRIBE without filters", C.subscribe(1, []), mqtt5.PROTOCOL_ERROR),  # 3.8.3-2
    ("reserved option bits", C.subscribe(1, [("a", 0x40)]), mqtt5.MALFORMED),  # 3.8.3-5
    ("Maximum QoS 3", C.subscribe(1, [("a", 3)]), mqtt5.PROTOCOL_ERROR),
    ("Retain Handling 3", C.subscribe(1, [("a", 0x30)]), mqtt5.PROTOCOL_ERROR),
    ("no options byte", C.packet(0x82, b"\x00\x01\x00" + C.s("a")), mqtt5.MALFORMED),
    ("'#' not last", C.subscribe(1, [("a/#/b", 0)]), mqtt5.TOPIC_FILTER_INVALID),
    ("'+' in a level", C.subscribe(1, [("a+", 0)]), mqtt5.TOPIC_FILTER_INVALID),
    ("empty filter", C.subscribe(1, [("", 0)]), mqtt5.TOPIC_FILTER_INVALID),
    ("share without filter", C.subscribe(1, [("$share/g", 0)]), mqtt5.TOPIC_FILTER_INVALID),
    ("share without name", C.subscribe(1, [("$share//a", 0)]), mqtt5.TOPIC_FILTER_INVALID),
    ("shared No Local", C.subscribe(1, [("$share/g/a", 0x04)]), mqtt5.PROTOCOL_ERROR),  # 3.8.3-4
    ("Subscription Identifier 0", C.subscribe(1, [("a", 0)], props=P(b"\x0b\x00")), mqtt5.PROTOCOL_ERROR),
    ("two Subscription Ids", C.subscribe(1, [("a", 0)], props=P(b"\x0b\x01", b"\x0b\x02")), mqtt5.PROTOCOL_ERROR),
    ("5-byte Subscription Id", C.subscribe(1, [("a", 0)], props=P(b"\x0b\xff\xff\xff\xff\x01")), mqtt5.MALFORMED),
    ("too many filters", C.subscribe(1, [("a", 0)] * 65), mqtt5.QUOTA_EXCEEDED),
    ("too many user properties", C.subscribe(1, [("a", 0)], props=P(*[C.user("k", "v")] * 65)), mqtt5.QUOTA_EXCEEDED),
    # UNSUBSCRIBE (3.10)
    ("UNSUBSCRIBE id 0", C.unsubscribe(0, ["a"]), mqtt5.PROTOCOL_ERROR),
    ("UNSUBSCRIBE without filters", C.unsubscribe(1, []), mqtt5.PROTOCOL_ERROR),  # 3.10.3-2
    ("UNSUBSCRIBE bad filter", C.unsubscribe(1, ["a/#/"]), mqtt5.TOPIC_FILTER_INVALID),
    ("UNSUBSCRIBE too many", C.unsubscribe(1, ["a"] * 65), mqtt5.QUOTA_EXCEEDED),
    ("UNSUBSCRIBE Subscription Id", C.unsubscribe(1, ["a"], props=P(b"\x0b\x01")), mqtt5.PROTOCOL_ERROR),
    # PINGREQ (3.12) and DISCONNECT (3.14)
    ("PINGREQ with a body", b"\xc0\x01\x00", mqtt5.MALFORMED),
    ("server-only DISCONNECT code", C.disconnect(0x87), mqtt5.PROTOCOL_ERROR),
    ("Server Reference from a client", C.disconnect(0, P(b"\x1c" + C.s("x"))), mqtt5.PROTOCOL_ERROR),
    ("Session Expiry after 0", C.disconnect(0, P(b"\x11\x00\x00\x00\x01")), mqtt5.PROTOCOL_ERROR),  # 3.14.2-2
    ("DISCONNECT trailing bytes", C.disconnect(0, b"\x00\x00"), mqtt5.MALFORMED),
]


@pytest.mark.parametrize(
    ("data", "code"), [r[1:] for r in REFUSALS_AFTER_CONNECT], ids=[r[0] for r in REFUSALS_AFTER_CONNECT]
)
def test_refusals_after_connect(data, code):
    e = refused(data)
    assert (e.reason_code, e.in_connect, e.packets) == (code, False, ())
    assert isinstance(e.message, str) and str(e) == e.message and e.message
    assert code in SERVER_DISCONNECT_CODES  # the server can say it in a DISCONNECT as is


def _will(topic: str = "w", payload: bytes = b"x", props: bytes = b"\x00") -> bytes:
    return props + C.s(topic) + C.s(payload)


REFUSALS_IN_CONNECT = [
    ("PINGREQ first", C.PINGREQ, mqtt5.PROTOCOL_ERROR),  # 3.1.0-1
    ("PUBLISH first", C.publish("a"), mqtt5.PROTOCOL_ERROR),
    ("AUTH first", b"\xf0\x00", mqtt5.PROTOCOL_ERROR),
    ("CONNECT flags", b"\x11" + CONNECT[1:], mqtt5.MALFORMED),
    ("reserved Connect Flag", C.connect(extra_flags=0x01), mqtt5.MALFORMED),  # 3.1.2-3
    ("Will QoS 3", C.connect(will=_will(), will_flags=0x18), mqtt5.MALFORMED),  # 3.1.2-12
    ("Will QoS without Will", C.connect(extra_flags=0x08), mqtt5.MALFORMED),  # 3.1.2-11
    ("Will Retain without Will", C.connect(extra_flags=0x20), mqtt5.MALFORMED),  # 3.1.2-13
    ("Receive Maximum 0", C.connect(props=P(b"\x21\x00\x00")), mqtt5.PROTOCOL_ERROR),
    ("Maximum Packet Size 0", C.connect(props=P(b"\x27\x00\x00\x00\x00")), mqtt5.PROTOCOL_ERROR),
    ("Request Problem Information 2", C.connect(props=P(b"\x17\x02")), mqtt5.PROTOCOL_ERROR),
    ("Request Response Information 2", C.connect(props=P(b"\x19\x02")), mqtt5.PROTOCOL_ERROR),
    ("Authentication Method", C.connect(props=P(b"\x15" + C.s("SCRAM-SHA-1"))), mqtt5.BAD_AUTH_METHOD),
    ("Authentication Data alone", C.connect(props=P(b"\x16" + C.s(b"x"))), mqtt5.PROTOCOL_ERROR),
    ("Topic Alias in CONNECT", C.connect(props=P(b"\x23\x00\x01")), mqtt5.PROTOCOL_ERROR),
    ("Session Expiry twice", C.connect(props=P(b"\x11\0\0\0\1", b"\x11\0\0\0\1")), mqtt5.PROTOCOL_ERROR),
    ("client id U+0000", C.connect("a\x00"), mqtt5.MALFORMED),
    ("trailing bytes", C.packet(0x10, CONNECT[2:] + b"\x00"), mqtt5.MALFORMED),
    ("truncated", C.packet(0x10, CONNECT[2:-1]), mqtt5.MALFORMED),
    ("Will topic with '#'", C.connect(will=_will("w/#")), mqtt5.TOPIC_NAME_INVALID),
    ("Will payload not UTF-8", C.connect(will=_will(payload=b"\xff", props=P(b"\x01\x01"))), 0x99),
    ("Will Session Expiry", C.connect(will=_will(props=P(b"\x11\0\0\0\1"))), mqtt5.PROTOCOL_ERROR),
    ("Will Delay twice", C.connect(will=_will(props=P(b"\x18\0\0\0\1", b"\x18\0\0\0\1"))), mqtt5.PROTOCOL_ERROR),
    ("Will missing", C.connect(will=b"\x00" + C.s("w")), mqtt5.MALFORMED),
    ("user name missing", C.packet(0x10, CONNECT[2:9] + b"\x82" + CONNECT[10:]), mqtt5.MALFORMED),
    ("too many user properties", C.connect(props=P(*[C.user("k", "v")] * 65)), mqtt5.QUOTA_EXCEEDED),
]


@pytest.mark.parametrize(
    ("data", "code"), [r[1:] for r in REFUSALS_IN_CONNECT], ids=[r[0] for r in REFUSALS_IN_CONNECT]
)
def test_refusals_in_connect(data, code):
    e = refused(data, decoder=Decoder())
    assert (e.reason_code, e.in_connect, e.packets) == (code, True, ())
    assert code in CONNACK_CODES  # the server can say it in a CONNACK as is


def test_will_is_validated_then_only_flagged():
    [p] = Decoder().feed(C.connect(will=_will("w/t", b"\xff"), will_flags=0x30))  # QoS 2 + retain: the server refuses
    assert isinstance(p, Connect) and p.will is True


@pytest.mark.parametrize(
    ("raw", "level", "mqtt311"),
    [
        (C.connect(level=4), 4, True),  # MQTT 3.1.1
        (C.connect(level=3, name=b"MQIsdp"), 3, True),  # MQTT 3.1
        (C.connect(level=0x84), 0x84, True),  # 3.1.1 bridge (mosquitto's convention)
        (C.connect(level=6), 6, False),
        (C.connect(level=5, name=b"MQIsdp"), 5, False),
        (C.connect(level=5, name=b"HTTP"), 5, False),
        (C.packet(0x10, C.s("MQTT") + b"\x04"), 4, True),  # nothing after the level: still recognised
    ],
)
def test_other_protocol_versions(raw, level, mqtt311):
    with pytest.raises(UnsupportedVersion) as e:
        Decoder().feed(raw)
    assert (e.value.reason_code, e.value.protocol_level, e.value.mqtt311) == (0x84, level, mqtt311)
    assert isinstance(e.value, ProtocolError) and e.value.in_connect


def test_remaining_length_of_five_bytes():
    # 1.5.5: at most 4 bytes; with the largest limit the length's own form is what gets it refused
    e = refused(b"\xc0\x80\x80\x80\x80\x01", decoder=connected(mqtt5.MAX_PACKET))
    assert e.reason_code == mqtt5.MALFORMED
    e = refused(b"\xc0\x80\x80\x80\x80\x01")  # with a smaller one, its size already is
    assert e.reason_code == mqtt5.PACKET_TOO_LARGE


def test_oversized_packet_refused_from_its_header_alone():
    d = connected(1000)
    with pytest.raises(ProtocolError) as e:
        d.feed(b"\x30\xff\xff\x03")  # PUBLISH announcing 65535 bytes: refused before any of them arrives
    assert e.value.reason_code == mqtt5.PACKET_TOO_LARGE and d.pending == 0
    d = connected(1000)
    with pytest.raises(ProtocolError) as e:
        d.feed(b"\x30\xff\xff")  # the length is not even complete, but is already at least 16384
    assert e.value.reason_code == mqtt5.PACKET_TOO_LARGE
    # the limit is the whole packet, as a Maximum Packet Size is (3.1.2.11.4): 1000 fits, 1001 does not
    d = connected(1000)
    body = C.s("t") + b"\x00"
    assert d.feed(C.publish("t", b"x" * (1000 - 3 - len(body)))) != []
    e2 = refused(C.publish("t", b"x" * (1001 - 3 - len(body))), decoder=d)
    assert e2.reason_code == mqtt5.PACKET_TOO_LARGE


def test_errors_keep_the_packets_before_them_and_stick():
    d = connected()
    with pytest.raises(ProtocolError) as e:
        d.feed(C.publish("a", b"1") + C.PINGREQ + C.publish("a/+"))
    assert e.value.packets == (Publish("a", b"1", 0, False, False, None), PingReq())
    with pytest.raises(ProtocolError) as again:
        d.feed(b"")
    assert again.value is e.value  # a broken stream stays broken


def test_connect_and_more_in_one_read():
    # 3.1.4: a client may send packets right after CONNECT, before CONNACK; an error after it is not in_connect
    d = Decoder()
    with pytest.raises(ProtocolError) as e:
        d.feed(CONNECT + C.subscribe(1, [("a/#/b", 0)]))
    assert (e.value.in_connect, e.value.packets, e.value.reason_code) == (False, (CONNECTED,), 0x8F)
    assert d.connect == CONNECTED


def test_nothing_after_disconnect():
    d = connected()
    with pytest.raises(ProtocolError) as e:
        d.feed(C.disconnect() + C.PINGREQ)  # 3.14.4-2: the client sends nothing more
    assert e.value.reason_code == mqtt5.PROTOCOL_ERROR and e.value.packets == (Disconnect(),)


def test_pending_and_partial_packets():
    d = connected()
    raw = C.publish("a/b", b"x" * 300, qos=1, pid=5)
    for i, byte in enumerate(raw[:-1]):
        assert d.feed(bytes((byte,))) == []
        assert d.pending == i + 1
    assert d.feed(raw[-1:]) == [Publish("a/b", b"x" * 300, 1, False, False, 5)]
    assert d.pending == 0


def test_decoder_accepts_buffers_and_rejects_bad_limits():
    d = Decoder()
    assert d.feed(bytearray(CONNECT)) == [CONNECTED]
    assert d.feed(memoryview(C.PINGREQ)) == [PingReq()]
    for bad in (0, 1, mqtt5.MAX_PACKET + 1):
        with pytest.raises(ValueError):
            Decoder(bad)


# ---- hostile input, by property ----

TOPIC_LEVELS = ["a", "b", "é", "$aws", ""]
topics_st = st.lists(st.sampled_from(TOPIC_LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
filters_st = st.one_of(topics_st, st.sampled_from(["#", "+", "a/+", "a/#", "+/b/#", "$share/g/a/#"]))
text_st = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)
user_st = st.lists(st.tuples(text_st, text_st), max_size=3).map(tuple)
pid_st = st.integers(1, 65535)


def shuffled(draw, parts: list[bytes], user: tuple[tuple[str, str], ...]) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """Properties in any order (2.2.2.2), and the User Properties in the order that order gives them."""
    coded = {C.user(k, v): (k, v) for k, v in user}
    order = draw(st.permutations([*parts, *(C.user(k, v) for k, v in user)]))
    return C.props(*order), tuple(coded[p] for p in order if p in coded)


@st.composite
def client_packets(draw) -> tuple[bytes, Connect | Publish | PubAck | Subscribe | Unsubscribe | PingReq | Disconnect]:
    """A valid client packet (not CONNECT) and what it must decode to."""
    kind = draw(st.sampled_from(["publish", "puback", "subscribe", "unsubscribe", "ping"]))
    if kind == "publish":
        qos = draw(st.integers(0, 1))
        pid = draw(pid_st) if qos else None
        topic = draw(topics_st)
        fmt = draw(st.sampled_from([None, 0, 1]))
        payload = draw(text_st.map(str.encode) if fmt == 1 else st.binary(max_size=40))
        user = draw(user_st)
        ct = draw(st.none() | text_st)
        expiry = draw(st.none() | st.integers(0, 2**32 - 1))
        response = draw(st.none() | topics_st)
        correlation = draw(st.none() | st.binary(max_size=8))
        parts = [b"\x01" + bytes((fmt,))] if fmt is not None else []
        parts += [b"\x02" + expiry.to_bytes(4, "big")] if expiry is not None else []
        parts += [b"\x03" + C.s(ct)] if ct is not None else []
        parts += [b"\x08" + C.s(response)] if response is not None else []
        parts += [b"\x09" + C.s(correlation)] if correlation is not None else []
        props, user = shuffled(draw, parts, user)
        raw = C.publish(topic, payload, qos=qos, pid=pid, props=props, dup=bool(qos) and draw(st.booleans()))
        dup = bool(raw[0] & 8)
        return raw, Publish(topic, payload, qos, False, dup, pid, ct, fmt, expiry, response, correlation, user)
    if kind == "puback":
        pid = draw(pid_st)
        rc = draw(st.sampled_from(sorted(mqtt5.PUBACK_CODES)))
        reason = draw(st.none() | text_st)
        if reason is None and not rc and draw(st.booleans()):
            return C.puback(pid), PubAck(pid, 0)
        props = C.props(b"\x1f" + C.s(reason)) if reason is not None else b"\x00"
        return C.puback(pid, rc, props), PubAck(pid, rc, reason)
    if kind == "subscribe":
        pid = draw(pid_st)
        subs = draw(
            st.lists(
                st.tuples(filters_st, st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2)),
                min_size=1,
                max_size=4,
            )
        )
        subs = [(f, q, nl and not f.startswith("$share/"), rap, rh) for f, q, nl, rap, rh in subs]
        sub_id = draw(st.none() | st.integers(1, 268435455))
        props = C.props(b"\x0b" + C.vbi(sub_id)) if sub_id is not None else b"\x00"
        raw = C.subscribe(pid, [(f, q | nl << 2 | rap << 3 | rh << 4) for f, q, nl, rap, rh in subs], props)
        return raw, Subscribe(pid, tuple(Subscription(*s) for s in subs), sub_id)
    if kind == "unsubscribe":
        pid = draw(pid_st)
        filters = draw(st.lists(filters_st, min_size=1, max_size=4))
        return C.unsubscribe(pid, filters), Unsubscribe(pid, tuple(filters))
    return C.PINGREQ, PingReq()


@st.composite
def connects(draw) -> tuple[bytes, Connect]:
    """A valid MQTT 5 CONNECT, properties, Will, User Name and Password all optional, and what it decodes to."""
    client_id = draw(text_st)
    clean = draw(st.booleans())
    keepalive = draw(st.integers(0, 65535))
    expiry = draw(st.none() | st.integers(0, 2**32 - 1))
    receive_max = draw(st.none() | st.integers(1, 65535))
    max_packet = draw(st.none() | st.integers(1, 2**32 - 1))
    alias_max = draw(st.none() | st.integers(0, 65535))
    problem = draw(st.none() | st.integers(0, 1))
    response = draw(st.none() | st.integers(0, 1))
    user = draw(user_st)
    parts = [b"\x11" + expiry.to_bytes(4, "big")] if expiry is not None else []
    parts += [b"\x21" + receive_max.to_bytes(2, "big")] if receive_max is not None else []
    parts += [b"\x27" + max_packet.to_bytes(4, "big")] if max_packet is not None else []
    parts += [b"\x22" + alias_max.to_bytes(2, "big")] if alias_max is not None else []
    parts += [b"\x17" + bytes((problem,))] if problem is not None else []
    parts += [b"\x19" + bytes((response,))] if response is not None else []
    props, user = shuffled(draw, parts, user)
    will = None
    will_flags = 0
    if draw(st.booleans()):
        fmt = draw(st.sampled_from([None, 0, 1]))
        wparts = [b"\x01" + bytes((fmt,))] if fmt is not None else []
        wparts += [b"\x18" + draw(st.binary(min_size=4, max_size=4))] if draw(st.booleans()) else []
        wparts += [b"\x02" + draw(st.binary(min_size=4, max_size=4))] if draw(st.booleans()) else []
        wparts += [b"\x03" + C.s(draw(text_st))] if draw(st.booleans()) else []
        wparts += [b"\x08" + C.s(draw(topics_st))] if draw(st.booleans()) else []
        wparts += [b"\x09" + C.s(draw(st.binary(max_size=8)))] if draw(st.booleans()) else []
        wparts += [C.user(k, v) for k, v in draw(user_st)]
        payload = draw(text_st.map(str.encode) if fmt == 1 else st.binary(max_size=20))
        will = C.props(*draw(st.permutations(wparts))) + C.s(draw(topics_st)) + C.s(payload)
        will_flags = draw(st.integers(0, 2)) << 3 | draw(st.booleans()) << 5
    username = draw(st.none() | text_st)
    password = draw(st.none() | st.binary(max_size=12))
    raw = C.connect(
        client_id,
        clean=clean,
        keepalive=keepalive,
        props=props,
        will=will,
        will_flags=will_flags,
        username=username,
        password=password,
    )
    return raw, Connect(
        protocol_level=5,
        client_id=client_id,
        clean_start=clean,
        keepalive=keepalive,
        session_expiry=expiry or 0,
        receive_maximum=65535 if receive_max is None else receive_max,
        maximum_packet_size=max_packet,
        username=username,
        password=password,
        will=will is not None,
        request_problem_information=problem != 0,
        user_properties=user,
        topic_alias_maximum=alias_max or 0,
        request_response_information=response == 1,
    )


@st.composite
def streams(draw) -> tuple[bytes, list]:
    """A whole valid conversation: CONNECT, packets, DISCONNECT (in one of its forms), and what it decodes to."""
    raw, connect = draw(connects())
    packets = draw(st.lists(client_packets(), max_size=6))
    rc = draw(st.sampled_from(sorted(mqtt5.CLIENT_DISCONNECT_CODES)))
    expiry = draw(st.none() | st.integers(0, 2**32 - 1)) if connect.session_expiry else None
    reason = draw(st.none() | text_st)
    parts = [b"\x11" + expiry.to_bytes(4, "big")] if expiry is not None else []
    parts += [b"\x1f" + C.s(reason)] if reason is not None else []
    if parts:
        end = C.disconnect(rc, C.props(*parts))
    else:
        end = draw(
            st.sampled_from([C.disconnect(rc), C.disconnect(rc, b"\x00")] + ([C.disconnect()] if not rc else []))
        )
    data = raw + b"".join(r for r, _ in packets) + end
    return data, [connect, *[p for _, p in packets], Disconnect(rc, expiry, reason)]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def feed_all(d: Decoder, chunks: list[bytes]) -> tuple[list, ProtocolError | None]:
    """Everything decoded, and the error if any; anything but ProtocolError fails the test."""
    out: list = []
    error = None
    for chunk in chunks:
        try:
            out += d.feed(chunk)
        except ProtocolError as e:
            out += e.packets
            error = e
            break
        assert d.pending <= d.max_packet_size
    assert all(isinstance(p, PACKET_TYPES) for p in out)
    if error is not None:
        # the code can be sent back as is: in a CONNACK while no CONNECT was decoded, else in a DISCONNECT
        assert error.in_connect is (d.connect is None)
        assert error.reason_code in (CONNACK_CODES if error.in_connect else SERVER_DISCONNECT_CODES), error
        assert isinstance(error.message, str) and error.message
        with pytest.raises(ProtocolError):
            d.feed(b"")  # and the decoder stays refused
    return out, error


HOSTILE = settings(
    max_examples=1000, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@HOSTILE
@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_chunking_does_not_change_what_is_decoded(stream, cuts):
    data, expected = stream
    whole, err = feed_all(Decoder(), [data])
    assert err is None and whole == expected
    parts, err = feed_all(Decoder(), chunked(data, cuts))
    assert err is None and parts == expected


framed = st.tuples(st.integers(0, 255), st.binary(max_size=60)).map(lambda t: C.packet(t[0], t[1]))


@HOSTILE
@given(st.lists(st.binary(max_size=40) | framed, max_size=6).map(b"".join), st.lists(st.integers(0, 500), max_size=8))
def test_arbitrary_bytes_after_connect(data, cuts):
    d = connected()
    feed_all(d, chunked(data, cuts))


mutation = st.tuples(st.sampled_from(["flip", "set", "cut", "drop", "insert", "dup"]), st.integers(0, 10**6), st.data())


def mutate(data: bytes, op: str, at: int, draw) -> bytes:
    if not data:
        return data
    i = at % len(data)
    if op == "flip":
        return data[:i] + bytes((data[i] ^ (1 << draw(st.integers(0, 7))),)) + data[i + 1 :]
    if op == "set":  # a length field (or anything) replaced by an arbitrary value
        return (
            data[:i]
            + bytes((draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))])),))
            + data[i + 1 :]
        )
    if op == "cut":
        return data[:i]
    if op == "drop":
        return data[:i] + data[i + 1 :]
    if op == "insert":
        return data[:i] + bytes((draw(st.integers(0, 255)),)) + data[i:]
    j = min(len(data), i + draw(st.integers(1, 20)))
    return data[:j] + data[i:j] + data[j:]


@HOSTILE
@given(streams(), st.lists(mutation, min_size=1, max_size=4), st.lists(st.integers(0, 2000), max_size=6))
def test_mutated_streams(stream, mutations, cuts):
    data, _ = stream
    for op, at, data_st in mutations:
        data = mutate(data, op, at, data_st.draw)
    feed_all(Decoder(), chunked(data, cuts))
    feed_all(Decoder(max_packet_size=64), chunked(data, cuts))


def _outcome(d: Decoder, chunks: list[bytes]) -> tuple[list, tuple | None]:
    out, error = feed_all(d, chunks)
    return out, None if error is None else (error.reason_code, error.message, error.in_connect)


@HOSTILE
@given(streams(), st.lists(mutation, max_size=4), st.integers(16, 2000))
def test_fast_paths_decide_as_the_byte_by_byte_path_does(stream, mutations, limit):
    """The decoder reads a fixed header that arrived whole in one go, and a PUBLISH without properties without
    the general reader; fed one byte at a time, every header takes the careful path. Whatever the bytes (valid,
    mutated, oversized), both give the same packets and the same refusal, reason and message included."""
    data, _ = stream
    for op, at, data_st in mutations:
        data = mutate(data, op, at, data_st.draw)
    for max_packet_size in (mqtt5.DEFAULT_MAX_PACKET_SIZE, limit):
        whole = _outcome(Decoder(max_packet_size), [data])
        bytewise = _outcome(Decoder(max_packet_size), [data[i : i + 1] for i in range(len(data))])
        assert whole == bytewise


@HOSTILE
@given(
    st.integers(0, 1),
    st.booleans(),
    st.sampled_from([b"a/b", b"", b"a/+", b"#", b"a\x00b", b"\xff", b"a\xed\xa0\x80"]) | st.binary(max_size=20),
    st.sampled_from([b"", b"\x00\x00", b"\x00\x01", b"\xff\xff"]) | st.binary(max_size=3),
    st.sampled_from([b"", b"\x00", b"\x01", b"\x02\x01\x00", b"\x02\x01\x01", b"\x80", b"\x03\x23\x00\x01"])
    | st.binary(max_size=4),
    st.binary(max_size=12),
)
def test_publish_fast_path_agrees_with_the_general_reader(qos, dup, topic, packet_id, props, payload):
    """Bodies built near the fast path's case (a length-prefixed topic, a packet identifier, a property length
    that may or may not be 0): it returns only what the general reader returns, and leaves everything else to it."""
    first = 0x30 | (qos << 1) | (0x08 if dup and qos else 0)
    body = len(topic).to_bytes(2, "big") + topic + packet_id + props + payload
    d = connected()

    def run(fn):
        try:
            return fn(first, body)
        except ProtocolError as e:
            return (e.reason_code, e.message)

    assert run(d._publish) == run(d._publish_general)


@HOSTILE
@given(
    st.integers(16, 400),
    st.lists(st.binary(max_size=80) | framed | client_packets().map(lambda t: t[0]), max_size=8),
    st.lists(st.integers(1, 64), min_size=1, max_size=20),
)
def test_pending_never_exceeds_the_limit(limit, pieces, sizes):
    d = Decoder(limit)
    data = CONNECT + b"".join(pieces)
    pos = i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        i += 1
        try:
            d.feed(data[pos : pos + n])
        except ProtocolError:
            break
        finally:
            assert d.pending <= limit + 5
            assert d.pending <= limit  # the bound actually kept: the whole packet, header included
        pos += n


# ---- paho-mqtt 2.x against this codec ----


class Peer:
    """The server's end of one connection: our Decoder and encoders, with every wait bounded."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.decoder = Decoder()
        self.queue: list = []
        self.pings = 0

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def next(self, timeout: float = 5.0, *, ping: bool = False):
        """The next packet that is not a PINGREQ (those are answered, as a server must, and counted; with `ping`,
        a PINGREQ is returned too)."""
        deadline = time.monotonic() + pace.scaled(timeout)
        while True:
            while self.queue:
                p = self.queue.pop(0)
                if isinstance(p, PingReq):
                    self.pings += 1
                    self.send(pingresp())
                    if not ping:
                        continue
                return p
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no packet from paho in time")
            self.conn.settimeout(left)
            try:
                data = self.conn.recv(65536)
            except TimeoutError:
                raise AssertionError("no packet from paho in time") from None
            if not data:
                raise EOFError("paho closed the connection")
            self.queue += self.decoder.feed(data)

    def wait_for_ping(self, timeout: float = 5.0) -> None:
        if not self.pings:
            p = self.next(timeout, ping=True)
            assert isinstance(p, PingReq), p


class Harness:
    """A listening Unix socket, paho clients on it, and their callbacks as a queue of events."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.events: queue.Queue = queue.Queue()
        self.clients: list[mqtt.Client] = []
        self.conns: list[socket.socket] = []

    def client(self, client_id: str = "app-1", protocol=mqtt.MQTTv5, retry: bool = True) -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            transport="unix",
            reconnect_on_failure=retry,
        )
        put = self.events.put
        c.on_connect = lambda _c, _u, flags, rc, props: put(Event("connect", rc=rc, props=props, flags=flags))
        c.on_publish = lambda _c, _u, mid, rc, props: put(Event("publish", mid=mid, rc=rc, props=props))
        c.on_subscribe = lambda _c, _u, mid, rcs, props: put(Event("subscribe", mid=mid, rc=rcs, props=props))
        c.on_unsubscribe = lambda _c, _u, mid, rcs, props: put(Event("unsubscribe", mid=mid, rc=rcs, props=props))
        c.on_message = lambda _c, _u, msg: put(Event("message", msg=msg))
        c.on_disconnect = lambda _c, _u, flags, rc, props: put(Event("disconnect", rc=rc, props=props))
        self.clients.append(c)
        return c

    def accept(self, timeout: float = 5.0) -> Peer:
        self.listener.settimeout(pace.scaled(timeout))
        conn, _ = self.listener.accept()
        self.conns.append(conn)
        return Peer(conn)

    def event(self, kind: str, timeout: float = 5.0, **match) -> Event:
        """The next event of `kind` (with the given fields); other kinds are skipped."""
        deadline = time.monotonic() + pace.scaled(timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event from paho in time")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev.kind == kind and all(getattr(ev, k) == v for k, v in match.items()):
                return ev

    def close(self) -> None:
        for c in self.clients:  # first, so that no loop thread is left waiting to reconnect
            c.disconnect()
        for conn in self.conns:
            conn.close()
        self.listener.close()
        for c in self.clients:
            c.loop_stop()


@dataclass
class Event:
    kind: str
    rc: object = None
    props: object = None
    mid: int | None = None
    msg: object = None
    flags: object = None


@pytest.fixture
def harness():
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer
    d = tempfile.mkdtemp(prefix="lm-", dir="/tmp")
    h = Harness(os.path.join(d, "s"))
    yield h
    h.close()
    shutil.rmtree(d, ignore_errors=True)


def _props(kind: int, **values) -> Properties:
    p = Properties(kind)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def test_paho_session(harness):
    c = harness.client("sensor-1")
    c.username_pw_set("alice", "s3cret")
    props = _props(
        PacketTypes.CONNECT,
        SessionExpiryInterval=30,
        ReceiveMaximum=10,
        MaximumPacketSize=4096,
        RequestProblemInformation=1,
    )
    props.UserProperty = ("app", "sensor")
    props.UserProperty = ("v", "1")  # paho appends: User Property may repeat
    c.connect(harness.path, keepalive=1, properties=props)  # keepalive 1 s: paho pings within about 2 s
    c.loop_start()
    srv = harness.accept()

    p = srv.next()
    assert p == Connect(
        protocol_level=5,
        client_id="sensor-1",
        clean_start=True,  # MQTT_CLEAN_START_FIRST_ONLY: set on the first connect
        keepalive=1,
        session_expiry=30,
        receive_maximum=10,
        maximum_packet_size=4096,
        username="alice",
        password=b"s3cret",
        will=False,
        request_problem_information=True,
        user_properties=(("app", "sensor"), ("v", "1")),
    )
    srv.send(connack(receive_maximum=5, maximum_packet_size=65536, reason_string="welcome", max_packet_size=4096))
    ev = harness.event("connect")
    assert ev.rc == 0 and not ev.flags.session_present
    assert ev.props.json() == {
        "SessionExpiryInterval": 0,
        "ReceiveMaximum": 5,
        "MaximumQoS": 1,
        "RetainAvailable": 0,
        "MaximumPacketSize": 65536,
        "ReasonString": "welcome",
        "SubscriptionIdentifierAvailable": 0,
        "SharedSubscriptionAvailable": 0,
    }

    # QoS 0 with every PUBLISH property a client may send
    pp = _props(
        PacketTypes.PUBLISH,
        PayloadFormatIndicator=1,
        MessageExpiryInterval=60,
        ContentType="application/json",
        ResponseTopic="reply/to",
        CorrelationData=b"\x00\x01",
    )
    pp.UserProperty = ("k", "v")
    c.publish("sensors/t1", b'{"t": 21}', qos=0, properties=pp)
    assert srv.next() == Publish(
        topic="sensors/t1",
        payload=b'{"t": 21}',
        qos=0,
        retain=False,
        dup=False,
        packet_id=None,
        content_type="application/json",
        payload_format=1,
        message_expiry=60,
        response_topic="reply/to",
        correlation_data=b"\x00\x01",
        user_properties=(("k", "v"),),
    )

    # QoS 1, accepted
    info = c.publish("sensors/t1", b"1", qos=1, properties=_props(PacketTypes.PUBLISH, ContentType="text/plain"))
    p = srv.next()
    assert isinstance(p, Publish) and (p.qos, p.packet_id, p.content_type, p.dup) == (1, info.mid, "text/plain", False)
    srv.send(puback(p.packet_id))
    ev = harness.event("publish", mid=info.mid)
    assert ev.rc == 0 and info.is_published()

    # QoS 1, refused with a reason: paho hands both to on_publish (its reason code and properties arguments)
    info = c.publish("other/x", b"2", qos=1)
    p = srv.next()
    srv.send(puback(p.packet_id, mqtt5.NOT_AUTHORIZED, "not allowed: x", max_packet_size=4096))
    ev = harness.event("publish", mid=info.mid)
    assert ev.rc == 0x87 and str(ev.rc) == "Not authorized" and ev.props.ReasonString == "not allowed: x"
    assert info.is_published()  # paho counts a refused message as "published": only on_publish's rc tells

    # a reason string longer than the client's Maximum Packet Size allows arrives shortened, not dropped
    info = c.publish("other/y", b"3", qos=1)
    p = srv.next()
    long = "y" * 10_000
    raw = puback(p.packet_id, mqtt5.QUOTA_EXCEEDED, long, max_packet_size=4096)
    assert len(raw) == 4096
    srv.send(raw)
    ev = harness.event("publish", mid=info.mid)
    assert ev.rc == 0x97 and ev.props.ReasonString == long[: 4096 - 11]  # 11 bytes of packet around it

    # SUBSCRIBE with options; one granted, one refused
    _, mid = c.subscribe(
        [
            ("a/+/c", SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True, retainHandling=2)),
            ("$aws/things/t/#", SubscribeOptions(qos=0)),
        ]
    )
    assert srv.next() == Subscribe(
        packet_id=mid,
        subscriptions=(Subscription("a/+/c", 1, True, True, 2), Subscription("$aws/things/t/#", 0, False, False, 0)),
        subscription_identifier=None,
    )
    srv.send(suback(mid, [mqtt5.GRANTED_QOS_1, mqtt5.NOT_AUTHORIZED], "$aws/things/t/#: not allowed"))
    ev = harness.event("subscribe", mid=mid)
    assert [r.value for r in ev.rc] == [1, 0x87] and ev.props.ReasonString == "$aws/things/t/#: not allowed"

    # a QoS 1 message to the app: paho PUBACKs it, and we decode that PUBACK
    srv.send(
        publish(
            "a/b/c",
            b"hello",
            qos=1,
            packet_id=42,
            content_type="text/plain",
            message_expiry=30,
            payload_format=1,
            user_properties=[("from", "agent")],
        )
    )
    msg = harness.event("message").msg
    assert (msg.topic, msg.payload, msg.qos, msg.retain, msg.mid) == ("a/b/c", b"hello", 1, False, 42)
    assert msg.properties.json() == {
        "PayloadFormatIndicator": 1,
        "MessageExpiryInterval": 30,
        "ContentType": "text/plain",
        "UserProperty": [("from", "agent")],
    }
    assert srv.next() == PubAck(42, 0)

    _, mid = c.unsubscribe(["a/+/c", "never/subscribed"])
    assert srv.next() == Unsubscribe(mid, ("a/+/c", "never/subscribed"))
    srv.send(unsuback(mid, [mqtt5.SUCCESS, mqtt5.NO_SUBSCRIPTION_EXISTED]))
    ev = harness.event("unsubscribe", mid=mid)
    assert [r.value for r in ev.rc] == [0, 0x11]

    srv.wait_for_ping()  # a real keepalive: paho sends PINGREQ, Peer answers PINGRESP

    c.disconnect(
        reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection"),
        properties=_props(PacketTypes.DISCONNECT, SessionExpiryInterval=0),
    )
    assert srv.next() == Disconnect(0, 0)
    assert srv.decoder.pending == 0


def test_paho_hears_a_server_disconnect(harness):
    c = harness.client(retry=False)
    c.connect(harness.path, keepalive=30)
    c.loop_start()
    srv = harness.accept()
    assert isinstance(srv.next(), Connect)
    srv.send(connack())
    harness.event("connect")
    # payload format 1 with a payload that is not UTF-8: the decoder refuses, the server says why and closes
    c.publish("a", b"\xff\xfe", qos=1, properties=_props(PacketTypes.PUBLISH, PayloadFormatIndicator=1))
    with pytest.raises(ProtocolError) as e:
        srv.next()
    assert e.value.reason_code == mqtt5.PAYLOAD_FORMAT_INVALID and not e.value.in_connect
    srv.send(disconnect(e.value.reason_code, e.value.message))
    ev = harness.event("disconnect")
    assert ev.rc == 0x99 and str(ev.rc) == "Payload format invalid"
    assert ev.props.ReasonString == e.value.message


def test_paho_refused_at_connect(harness):
    c = harness.client(retry=False)
    c.connect(harness.path, keepalive=30)
    c.loop_start()
    srv = harness.accept()
    assert isinstance(srv.next(), Connect)
    srv.send(connack(mqtt5.NOT_AUTHORIZED, reason_string="uid 1000 is not an app"))
    ev = harness.event("connect")
    assert ev.rc == 0x87 and ev.props.ReasonString == "uid 1000 is not an app"


def test_paho_mqtt311_is_refused_the_311_way(harness):
    c = harness.client(protocol=mqtt.MQTTv311)
    c.reconnect_delay_set(30, 30)
    c.connect(harness.path, keepalive=30)
    c.loop_start()
    srv = harness.accept()
    with pytest.raises(UnsupportedVersion) as e:
        srv.next()
    assert (e.value.mqtt311, e.value.protocol_level, e.value.reason_code) == (True, 4, 0x84)
    srv.send(connack_v311(1))
    # paho reads return code 1 as "unacceptable protocol version" and, by design, retries at once as MQTT 3.1
    # ("MQIsdp", level 3) on a new connection (client.py _handle_connack, reconnect_on_failure=True)
    srv2 = harness.accept()
    with pytest.raises(UnsupportedVersion) as e:
        srv2.next()
    assert (e.value.mqtt311, e.value.protocol_level) == (True, 3)
    srv2.send(connack_v311(1))
    ev = harness.event("connect")  # now paho gives up and reports it
    assert ev.rc == 0x84 and str(ev.rc) == "Unsupported protocol version"


@pytest.mark.parametrize("clean_start", [mqtt.MQTT_CLEAN_START_FIRST_ONLY, True], ids=["first-only", "always"])
def test_paho_resends_unacknowledged_qos1_after_reconnect(harness, clean_start):
    """What paho does with an unacknowledged QoS 1 message when the connection drops: it always resends it,
    DUP set and same Packet Identifier, once the new CONNACK arrives, whatever Clean Start and Session Present say."""
    c = harness.client("r-1")
    c.reconnect_delay_set(0.1, 0.1)
    c.connect(harness.path, keepalive=30, clean_start=clean_start)
    c.loop_start()
    srv = harness.accept()
    first = srv.next()
    assert isinstance(first, Connect) and first.clean_start
    srv.send(connack())
    harness.event("connect")
    info = c.publish("t", b"once", qos=1)
    p1 = srv.next()
    assert isinstance(p1, Publish) and not p1.dup
    srv.conn.close()  # the server goes away without acknowledging

    srv2 = harness.accept()
    second = srv2.next()
    assert isinstance(second, Connect)
    assert second.clean_start is (clean_start is True)  # FIRST_ONLY: Clean Start 0 from the second connect on
    srv2.send(connack(session_present=False))  # no session kept: paho resends anyway
    p2 = srv2.next()
    assert p2 == Publish("t", b"once", 1, False, True, p1.packet_id)
    srv2.send(puback(p2.packet_id))
    assert harness.event("publish", mid=info.mid).rc == 0
