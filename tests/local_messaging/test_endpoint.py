"""The endpoint alone (real socket, real spool, real paho and raw clients; the cloud side is a stub that
records what the endpoint asks of it): it stays bounded whatever a client does, and answers the
protocol's corner cases with the documented reason codes."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.local_messaging import mqtt5
from agent.local_messaging.config import AppConfig, LocalMessagingConfig
from agent.local_messaging.peers import resolve_apps
from agent.local_messaging.server import READ_CHUNK, STATE_TOPIC, Endpoint
from agent.local_messaging.spool import Spool, SpoolLimits

THING = "gw-ep"


class Cloud:
    """The endpoint's view of the cloud: what it asked for, nothing else."""

    def __init__(self) -> None:
        self.up = True
        self.spooled_calls = 0
        self.now: list[str] = []
        self.extras: list = []
        self.wanted: list[str] = []

    def connected(self) -> bool:
        return self.up

    def spooled(self) -> None:
        self.spooled_calls += 1

    def publish_now(self, topic, payload, content_type, expiry, extras=None) -> bool:
        self.now.append(topic)
        self.extras.append(extras)
        return self.up

    def want(self, f: str) -> None:
        self.wanted.append(f)

    def unwant(self, f: str) -> None:
        self.wanted.remove(f)


@pytest.fixture
def endpoint(tmp_path):
    cfg = LocalMessagingConfig(
        enabled=True,
        apps={"a": AppConfig(user=str(os.getuid()), publish=["dt/${thing}/#"], subscribe=["cmd/${thing}/#"])},
        client_buffer_kib=64,
        receive_maximum=16,
    )
    spool = Spool(tmp_path / "spool.sqlite", SpoolLimits(max_bytes=8 << 20))
    cloud = Cloud()
    ep = Endpoint(cfg, tmp_path / "local.sock", resolve_apps(cfg.apps, THING), spool, cloud).start()
    yield ep, cloud, spool, tmp_path / "local.sock"
    ep.stop()
    spool.close()


def raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(bytes.fromhex("100d00044d5154540502003c000000"))  # CONNECT v5, clean start, empty client id
    head = s.recv(2)
    assert head[0] == 0x20, head
    s.recv(head[1])
    return s


def test_a_client_that_never_reads_cannot_grow_the_agent(endpoint):
    ep, cloud, spool, path = endpoint
    s = raw_connect(path)
    topic = f"cmd/{THING}/#".encode()
    body = b"\x00\x01" + b"\x00" + len(topic).to_bytes(2, "big") + topic + b"\x00"
    sub = bytes([0x82, len(body)]) + body
    s.sendall(sub)
    time.sleep(0.3)
    # 20 MB of cloud messages for it; it reads nothing.
    for _ in range(2000):
        ep.cloud_message(f"cmd/{THING}/x", os.urandom(10_000))
    deadline = time.monotonic() + 10
    while ep.counters.dropped_to_apps == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    c = next(iter(ep.clients.values()))
    assert len(c.out) <= 64 * 1024, len(c.out)
    assert ep.counters.dropped_to_apps > 1500, ep.stats()
    s.close()


def test_a_flood_of_publishes_is_held_back_not_buffered(endpoint):
    """A client that publishes QoS 1 without ever reading its PUBACKs: the agent stops reading it once its
    answers pile up, so the client blocks on its own socket; nothing grows in the agent."""
    ep, cloud, spool, path = endpoint
    s = raw_connect(path)
    s.setblocking(False)
    topic = f"dt/{THING}/flood".encode()
    sent = 0
    pid = 1
    deadline = time.monotonic() + 20
    stalled_since = None
    while time.monotonic() < deadline:
        body = len(topic).to_bytes(2, "big") + topic + pid.to_bytes(2, "big") + b"\x00" + b"x" * 100
        pkt = bytes([0x32]) + _varint(len(body)) + body
        try:
            s.send(pkt)
            sent += 1
            pid = pid % 65535 + 1
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 2:
                break
            time.sleep(0.01)
    assert stalled_since is not None, "the agent kept reading a client that never reads its answers"
    c = next(iter(ep.clients.values()))
    # The buffer's bound plus the answers to one read (READ_CHUNK bytes of the smallest QoS 1 publish, 7 bytes,
    # each answered by a 4-byte PUBACK): past the bound the client is not read from again.
    assert len(c.out) <= 64 * 1024 + (READ_CHUNK // 7 + 1) * 4, len(c.out)
    stored = spool.stats()["messages"]
    assert 0 < stored < sent, (stored, sent)
    s.close()


def test_protocol_corners_answered_with_their_reason_codes(endpoint):
    ep, cloud, spool, path = endpoint
    got: dict[str, object] = {}
    ev = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, transport="unix")

    def on_subscribe(_c, _u, mid, reasons, props):
        got[mid] = [r.value for r in reasons]
        ev.set()

    c.on_subscribe = on_subscribe
    c.connect(str(path))
    c.loop_start()
    try:
        for topic, code in (
            ("$share/g/cmd/gw-ep/x", mqtt5.SHARED_SUB_NOT_SUPPORTED),
            (STATE_TOPIC, 0),
            (f"cmd/{THING}/a/#", 0),
            ("cmd/other/#", mqtt5.NOT_AUTHORIZED),
        ):
            ev.clear()
            _, mid = c.subscribe(topic)
            assert ev.wait(5)
            assert got[mid] == [code], (topic, got[mid])
        assert cloud.wanted == [f"cmd/{THING}/a/#"]  # the state topic is the agent's, never the cloud's
    finally:
        c.disconnect()
        c.loop_stop()
    deadline = time.monotonic() + 5
    while cloud.wanted and time.monotonic() < deadline:  # a client that leaves gives its subscriptions back
        time.sleep(0.05)
    assert cloud.wanted == []
    # An MQTT 3.1.1 client is told, the 3.1.1 way, that this endpoint speaks MQTT 5 only.
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(path))
    s.sendall(bytes.fromhex("100c00044d5154540402003c0000"))
    assert s.recv(4) == bytes([0x20, 0x02, 0x00, 0x01])
    s.close()


def test_mqtt5_properties_travel_both_ways_unaltered(endpoint):
    """Response topic, correlation data, user properties (in order, names repeated), content type and expiry: from
    an app to the spool (QoS 1) and to the cloud (QoS 0), and from the cloud to the app; too many refused."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from agent.local_messaging.server import MAX_EXTRAS_BYTES
    from agent.local_messaging.spool import Extras

    ep, cloud, spool, path = endpoint
    acks: dict[int, tuple[int, str | None]] = {}
    got: list = []
    cond = threading.Condition()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, transport="unix")

    def on_publish(_c, _u, mid, reason, props):
        with cond:
            acks[mid] = (reason.value, getattr(props, "ReasonString", None))
            cond.notify_all()

    def on_message(_c, _u, msg):
        with cond:
            got.append(msg)
            cond.notify_all()

    c.on_publish, c.on_message = on_publish, on_message
    c.connect(str(path))
    c.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"cmd/{THING}/answers"
        props.CorrelationData = b"\xff\x00req-1"
        props.UserProperty = [("trace", "a"), ("trace", "b"), ("unit", "°C")]
        props.ContentType = "application/json"
        want = Extras(f"cmd/{THING}/answers", b"\xff\x00req-1", (("trace", "a"), ("trace", "b"), ("unit", "°C")))
        for qos in (1, 0):
            info = c.publish(f"dt/{THING}/q{qos}", b"{}", qos=qos, properties=props)
            if qos:
                with cond:
                    assert cond.wait_for(lambda mid=info.mid: mid in acks, 5)
                assert acks[info.mid] == (0, None)
        (stored,) = spool.peek(0, 10)
        assert (stored.extras, stored.content_type) == (want, "application/json")
        deadline = time.monotonic() + 5
        while not cloud.extras and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cloud.extras == [want]
        big = Properties(PacketTypes.PUBLISH)
        big.UserProperty = [("k", "v" * MAX_EXTRAS_BYTES)]
        info = c.publish(f"dt/{THING}/big", b"{}", qos=1, properties=big)
        with cond:
            assert cond.wait_for(lambda: info.mid in acks, 5)
        assert acks[info.mid][0] == mqtt5.QUOTA_EXCEEDED and "user properties" in acks[info.mid][1]
        assert len(spool.peek(0, 10)) == 1
        # From the cloud: what the broker gave the agent reaches the app as it was.
        _, mid = c.subscribe(f"cmd/{THING}/a/#", qos=1)
        deadline = time.monotonic() + 5
        while cloud.wanted != [f"cmd/{THING}/a/#"] and time.monotonic() < deadline:
            time.sleep(0.02)

        class Props:  # agent.session.feature.MessageProperties' fields
            content_type = "text/plain"
            message_expiry_s = 30
            response_topic = f"dt/{THING}/replies"
            correlation_data = b"corr"
            user_properties = (("x", "1"), ("x", "2"))

        ep.cloud_message(f"cmd/{THING}/a/b", b"hello", Props())
        with cond:
            assert cond.wait_for(lambda: got, 5)
        m = got[0]
        assert (m.topic, m.payload) == (f"cmd/{THING}/a/b", b"hello")
        assert m.properties.ContentType == "text/plain" and m.properties.MessageExpiryInterval == 30
        assert m.properties.ResponseTopic == f"dt/{THING}/replies" and m.properties.CorrelationData == b"corr"
        assert m.properties.UserProperty == [("x", "1"), ("x", "2")]
        # A property MQTT 5 forbids (a wildcard in a response topic) is not relayed; the app stays connected.
        Props.response_topic = "bad/#"
        ep.cloud_message(f"cmd/{THING}/a/c", b"x", Props())
        deadline = time.monotonic() + 5
        while ep.counters.dropped_to_apps == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ep.counters.dropped_to_apps == 1 and len(got) == 1 and c.is_connected()
    finally:
        c.disconnect()
        c.loop_stop()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)
