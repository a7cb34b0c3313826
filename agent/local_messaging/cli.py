"""`iot-agent publish` and `iot-agent subscribe`: the local endpoint for people, through paho-mqtt.

The same endpoint and the same rules as for apps: the command runs as the user who types it, and that
user must be an app entry. paho-mqtt is the client the README shows apps; using it here keeps the
commands a working example of it.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from agent.base.config import Config
from agent.base.errors import AgentError

WAIT_S = 10.0


class LocalError(AgentError):
    exit_code = 1


def _client(path: Path, on_message: Any = None) -> tuple[Any, dict[str, Any]]:
    import paho.mqtt.client as mqtt

    box: dict[str, Any] = {"connack": threading.Event()}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, transport="unix")

    def on_connect(_c, _u, _flags, reason, props):
        box["reason"] = reason
        box["reason_string"] = getattr(props, "ReasonString", None) if props else None
        box["connack"].set()

    c.on_connect = on_connect
    if on_message is not None:
        c.on_message = on_message
    try:
        c.connect(str(path), keepalive=60)
    except OSError as e:
        raise LocalError(
            f"cannot connect to {path} ({e.strerror or e}): is the agent running with local_messaging.enabled, "
            "and is this user in the socket's group?"
        ) from None
    c.loop_start()
    if not box["connack"].wait(WAIT_S):
        c.loop_stop()
        raise LocalError(f"{path}: no answer from the agent within {WAIT_S:.0f} s")
    if box["reason"].is_failure:
        c.loop_stop()
        raise LocalError(f"refused: {box['reason_string'] or box['reason']}")
    return c, box


def publish(cfg: Config, topic: str, qos: int, socket: Path | None) -> int:
    from agent.local_messaging.feature import socket_path

    limit = cfg.local_messaging.max_message_kib * 1024
    payload = sys.stdin.buffer.read(limit + 1)
    if len(payload) > limit:
        raise LocalError(f"the message is larger than local_messaging.max_message_kib ({limit} bytes)")
    c, _ = _client(socket or socket_path(cfg))
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_publish(_c, _u, _mid, reason, props):
        result["reason"] = reason
        result["reason_string"] = getattr(props, "ReasonString", None) if props else None
        done.set()

    c.on_publish = on_publish
    try:
        info = c.publish(topic, payload, qos=qos)
        if qos == 0:
            info.wait_for_publish(WAIT_S)
            return 0
        if not done.wait(WAIT_S):
            raise LocalError(f"no acknowledgement within {WAIT_S:.0f} s")
        reason = result["reason"]
        if reason.is_failure:
            raise LocalError(f"refused: {result['reason_string'] or reason}")
        print("stored in the agent's spool; it goes to AWS IoT when connected", file=sys.stderr)
        return 0
    finally:
        c.disconnect()
        c.loop_stop()


def subscribe(cfg: Config, topics: list[str], count: int, socket: Path | None) -> int:
    from agent.base.logfmt import escape
    from agent.local_messaging.feature import socket_path

    got = threading.Semaphore(0)

    def on_message(_c, _u, msg):
        text = msg.payload.decode("utf-8", errors="backslashreplace")
        print(f"{escape(msg.topic)}\t{escape(text)}", flush=True)
        got.release()

    c, _ = _client(socket or socket_path(cfg), on_message)
    subscribed = threading.Event()
    refused: list[str] = []

    def on_subscribe(_c, _u, _mid, reasons, props):
        for t, r in zip(topics, reasons, strict=False):
            if r.is_failure:
                why = getattr(props, "ReasonString", None) if props else None
                refused.append(f"{t}: {why or r}")
        subscribed.set()

    c.on_subscribe = on_subscribe
    try:
        c.subscribe([(t, 0) for t in topics])
        if not subscribed.wait(WAIT_S):
            raise LocalError(f"no answer to the subscription within {WAIT_S:.0f} s")
        if refused:
            raise LocalError("refused: " + "; ".join(refused))
        n = 0
        while count <= 0 or n < count:
            if got.acquire(timeout=1.0):
                n += 1
            elif not c.is_connected():
                raise LocalError("the agent closed the connection")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        c.disconnect()
        c.loop_stop()
