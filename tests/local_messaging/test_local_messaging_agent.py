"""Local messaging end to end: a real `iot-agent run` on SoftHSM, the local cloud's real broker, and apps
that are real paho-mqtt clients (and the `iot-agent publish/subscribe` commands) on the Unix socket.

Each refusal must reach the app with its reason and leave everything else working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from localcloud import pace
from localcloud.bench import enrolled_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.recorder import Recorder

REPO = Path(__file__).resolve().parents[2]
THING = "gw-local"
NOBODY = 65534


class App:
    """A paho MQTT 5 client on the agent's socket that remembers every answer."""

    def __init__(self, path: Path, client_id: str = "") -> None:
        self.connack = threading.Event()
        self.cond = threading.Condition()
        self.acks: dict[int, tuple[int, str | None]] = {}
        self.subacks: dict[int, tuple[list[int], str | None]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.properties: dict[str, object] = {}
        self.disconnect: tuple[int, str | None] | None = None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, transport="unix")
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        self.c = c
        c.connect(str(path), keepalive=30)
        c.loop_start()
        assert self.connack.wait(pace.scaled(10)), "no CONNACK"

    @staticmethod
    def _why(props) -> str | None:
        return getattr(props, "ReasonString", None) if props else None

    def _on_connect(self, _c, _u, _f, reason, props):
        self.connect_reason = (reason.value, self._why(props))
        self.connack.set()

    def _on_publish(self, _c, _u, mid, reason, props):
        with self.cond:
            self.acks[mid] = (reason.value, self._why(props))
            self.cond.notify_all()

    def _on_subscribe(self, _c, _u, mid, reasons, props):
        with self.cond:
            self.subacks[mid] = ([r.value for r in reasons], self._why(props))
            self.cond.notify_all()

    def _on_message(self, _c, _u, msg):
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.properties[msg.topic] = msg.properties
            self.cond.notify_all()

    def _on_disconnect(self, _c, _u, _f, reason, props):
        with self.cond:
            self.disconnect = (reason.value, self._why(props))
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes, qos: int = 1, properties=None) -> tuple[int, str | None]:
        info = self.c.publish(topic, payload, qos=qos, properties=properties)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.acks, pace.scaled(10)), f"no PUBACK for {topic}"
            return self.acks[info.mid]

    def subscribe(self, topic: str) -> tuple[list[int], str | None]:
        _, mid = self.c.subscribe(topic, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, pace.scaled(10)), f"no SUBACK for {topic}"
            return self.subacks[mid]

    def wait_message(self, topic: str, timeout: float = 10.0) -> bytes:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(t == topic for t, _ in self.messages), pace.scaled(timeout))
            assert ok, f"no message on {topic}; got {[t for t, _ in self.messages]}"
            return next(p for t, p in reversed(self.messages) if t == topic)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def world(tmp_path, softhsm, agents):
    c = LocalCloud(tmp_path / "cloud")
    # Sessions and queued messages survive a broker restart (as AWS IoT Core keeps what it acknowledged): the
    # recorder then misses nothing the agent delivers before it has subscribed again.
    c.configure(broker_persistence=True)
    ntp = Chrony(tmp_path / "chrony").start()
    c.up()
    # Outside pytest's 0700 tree: the wrong-uid peer must reach the socket, to be refused by the agent itself.
    run = Path(tempfile.mkdtemp(prefix="iot-agent-run-", dir="/tmp"))
    run.chmod(0o755)
    sock = run / "local.sock"
    dev = enrolled_device(
        c,
        softhsm,
        THING,
        tmp_path / "dev",
        [ntp.server],
        extra={
            "local_messaging": {
                "enabled": True,
                "socket": str(sock),
                "socket_group": str(NOBODY),  # the gid nobody's process has: the kernel lets it connect
                "spool_max_mib": 1,
                "apps": {
                    "sensor": {
                        "user": str(os.getuid()),
                        "publish": ["dt/${thing}/sensor/#"],
                        "subscribe": ["cmd/${thing}/sensor/#"],
                    }
                },
            }
        },
    )
    rec = Recorder(c, [f"dt/{THING}/#"], identity="operator", client_id="operator").start()
    a = agents(dev)
    a.wait_for("local messaging: serving MQTT 5", timeout=60)
    a.wait_for(f"connected to localhost:\\d+ as {THING}", timeout=60)
    yield c, dev, a, sock, rec
    rec.stop()
    c.down()
    ntp.stop()
    shutil.rmtree(run, ignore_errors=True)


def test_publish_subscribe_and_connection_state(world):
    c, dev, a, sock, rec = world
    app = App(sock, "sensor-1")
    try:
        assert app.connect_reason[0] == 0
        codes, _ = app.subscribe("$agent/connection")
        assert codes == [0]
        state = json.loads(app.wait_message("$agent/connection"))
        assert state["connected"] is True
        assert app.publish(f"dt/{THING}/sensor/temp", b'{"t": 21.5}') == (0, None)
        assert rec.expect(f"dt/{THING}/sensor/temp") == b'{"t": 21.5}'
        assert app.subscribe(f"cmd/{THING}/sensor/#")[0] == [0]
        deadline = time.monotonic() + pace.scaled(10)
        while True:  # the agent's cloud subscription is asynchronous: the first command may precede it
            assert rec.publish(f"cmd/{THING}/sensor/led", b"on") < 0x80
            with app.cond:
                if app.cond.wait_for(lambda: app.messages[1:], 0.5):
                    break
            assert time.monotonic() < deadline, "the app never got the command"
        assert app.wait_message(f"cmd/{THING}/sensor/led") == b"on"
        # Request and response through the agent: the app's MQTT 5 properties reach the cloud unaltered (they
        # went through the spool), and the cloud's answer reaches the app with its own.
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"cmd/{THING}/sensor/answer"
        props.CorrelationData = b"\xff\x00req-7"
        props.UserProperty = [("trace", "a"), ("trace", "b")]
        props.ContentType = "application/json"
        assert app.publish(f"dt/{THING}/sensor/ask", b"{}", properties=props) == (0, None)
        assert rec.expect(f"dt/{THING}/sensor/ask") == b"{}"
        assert rec.properties[f"dt/{THING}/sensor/ask"] == {
            "content_type": "application/json",
            "response_topic": f"cmd/{THING}/sensor/answer",
            "correlation_data": b"\xff\x00req-7",
            "user_properties": [("trace", "a"), ("trace", "b")],
        }
        code = rec.publish(
            f"cmd/{THING}/sensor/answer",
            b"42",
            correlation_data=b"\xff\x00req-7",
            user_properties=[("from", "cloud")],
            content_type="text/plain",
        )
        assert code < 0x80
        assert app.wait_message(f"cmd/{THING}/sensor/answer") == b"42"
        answer = app.properties[f"cmd/{THING}/sensor/answer"]
        assert answer.CorrelationData == b"\xff\x00req-7" and answer.UserProperty == [("from", "cloud")]
        assert answer.ContentType == "text/plain"
    finally:
        app.close()
    # The commands for people, on the same endpoint.
    env = {**os.environ, **dev.token.full_env()}
    r = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(dev.config_path), "publish", f"dt/{THING}/sensor/cli"],
        input=b"from the command line",
        capture_output=True,
        env=env,
        timeout=pace.scaled(30),
    )
    assert r.returncode == 0, r.stderr
    assert rec.expect(f"dt/{THING}/sensor/cli") == b"from the command line"
    r = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(dev.config_path), "publish", f"dt/{THING}/elsewhere"],
        input=b"x",
        capture_output=True,
        env=env,
        timeout=pace.scaled(30),
    )
    assert r.returncode == 1
    assert b"not in local_messaging.apps.sensor.publish" in r.stderr
    sub = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(dev.config_path), "subscribe", f"cmd/{THING}/sensor/#"]
        + ["--count", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + pace.scaled(20)
        while sub.poll() is None:  # until the command's subscription reaches the cloud and the message it
            assert rec.publish(f"cmd/{THING}/sensor/cli", b"to the command\nline") < 0x80
            try:
                sub.wait(0.5)
            except subprocess.TimeoutExpired:
                assert time.monotonic() < deadline, "iot-agent subscribe printed nothing"
        out = sub.stdout.read()
        assert sub.returncode == 0, sub.stderr.read()
        assert out == f"cmd/{THING}/sensor/cli\tto the command\\nline\n", out  # network text escaped
    finally:
        if sub.poll() is None:
            sub.kill()
        sub.wait(5)
    st = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(dev.config_path), "status", "--json"],
        capture_output=True,
        env=env,
        timeout=pace.scaled(30),
    )
    lm = json.loads(st.stdout)["local_messaging"]
    assert lm["delivered"] >= 2 and lm["messages"] == 0, lm


def test_refusals_reach_the_app_and_harm_nothing(world):
    c, dev, a, sock, rec = world
    app = App(sock, "sensor-2")
    try:
        # A publish outside the app's allowlist: PUBACK 0x87 with the reason; the connection goes on.
        code, why = app.publish(f"dt/{THING}/other/x", b"no")
        assert code == 0x87 and "not in local_messaging.apps.sensor.publish" in why
        code, why = app.publish(f"$aws/things/{THING}/shadow/update", b"{}")
        assert code == 0x87
        # A subscription to another thing's topic: SUBACK 0x87 with the reason.
        codes, why = app.subscribe("cmd/other-thing/sensor/#")
        assert codes == [0x87] and "not in local_messaging.apps.sensor.subscribe" in why
        codes, _ = app.subscribe("cmd/+/sensor/#")  # a wildcard that would reach other things
        assert codes == [0x87]
        # Still working after the refusals.
        assert app.publish(f"dt/{THING}/sensor/ok", b"still fine") == (0, None)
        assert rec.expect(f"dt/{THING}/sensor/ok") == b"still fine"
    finally:
        app.close()
    # A peer with the wrong uid (the kernel lets it in through the socket's group; the agent refuses it).
    # The system's python3 (the test's own venv may sit where nobody can read it), a hand-written CONNECT
    # (MQTT 5, clean start, empty client id) and the CONNACK's reason code and reason string.
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(10)\n"
        f"s.connect({str(sock)!r})\n"
        "s.sendall(bytes.fromhex('100d00044d5154540502003c000000'))\n"
        "data = b''\n"
        "while True:\n"
        "    chunk = s.recv(4096)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "sys.stdout.write(data.hex())\n"
    )
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    r = subprocess.run(
        [python, "-c", probe],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=pace.scaled(30),
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    connack = bytes.fromhex(r.stdout)
    assert connack[0] == 0x20 and connack[3] == 0x87, connack  # CONNACK, Not authorized
    assert f"uid {NOBODY}".encode() in connack and b"no local_messaging app entry matches" in connack
    a.wait_for("local messaging: refused pid \\d+ uid 65534")


def test_full_spool_is_refused_with_a_reason(world):
    c, dev, a, sock, rec = world
    app = App(sock, "sensor-3")
    down = threading.Thread(target=c.restart_broker, kwargs={"down_for": pace.scaled(6)})
    try:
        down.start()
        a.wait_for("disconnected", timeout=20)
        payload = os.urandom(100 * 1024)
        codes = []
        for _ in range(14):  # 1 MiB of spool: about ten of these fit
            code, why = app.publish(f"dt/{THING}/sensor/bulk", payload)
            codes.append(code)
            if code:
                assert code == 0x97 and "spool full" in why, why
        stored = codes.count(0)
        assert 5 <= stored < 14 and codes[stored:] == [0x97] * (14 - stored), codes
        down.join(pace.scaled(30))
        # What was stored arrives once the broker is back; the refused ones were never acknowledged.
        deadline = time.monotonic() + pace.scaled(30)
        while sum(1 for t, _ in rec.snapshot() if t.endswith("/bulk")) < stored:
            assert time.monotonic() < deadline, "the spooled messages did not arrive"
            time.sleep(0.1)
        assert app.publish(f"dt/{THING}/sensor/after", b"room again") == (0, None)
    finally:
        app.close()
        down.join(pace.scaled(30))
