"""The cloud's count of what arrived: a subscriber with a persistent session that records every message.

Tests that restart the broker while devices publish need a witness that misses nothing the broker
acknowledged: its session (subscriptions and queued QoS 1 messages) survives its own disconnections
and, with the local cloud's `broker_persistence` setting, the broker's restarts too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from . import pace
from .broker import OBSERVER


@dataclass
class Recorder:
    cloud: object  # LocalCloud
    topics: list[str]
    client_id: str = "recorder"
    identity: str = OBSERVER  # the certificate's CN: "operator" may also publish commands (cmd/#)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    properties: dict[str, dict] = field(default_factory=dict)  # the MQTT 5 properties of the last message per topic
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: object = None
    _subscribed: bool = False
    events: list[str] = field(default_factory=list)  # disconnections and failures, for a failing test's message
    _connected: threading.Event = field(default_factory=threading.Event)
    _stopped: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout: float = 10.0) -> Recorder:
        import awscrt.mqtt5 as m5
        from awsiot import mqtt5_client_builder

        info = self.cloud.endpoint()  # type: ignore[attr-defined]
        issued = self.cloud.ca.issue_client(f"client-{self.client_id}", self.identity)  # type: ignore[attr-defined]
        self._client = mqtt5_client_builder.mtls_from_path(
            endpoint="localhost",
            port=info["port"],
            cert_filepath=str(issued.cert_path),
            pri_key_filepath=str(issued.key_path),
            ca_filepath=info["ca_file"],
            client_id=self.client_id,
            session_behavior=m5.ClientSessionBehaviorType.REJOIN_ALWAYS,
            connect_options=m5.ConnectPacket(client_id=self.client_id, session_expiry_interval_sec=24 * 3600),
            enable_metrics_collection=False,
            on_publish_received=self._on_publish,
            on_lifecycle_connection_success=self._on_connected,
            on_lifecycle_disconnection=self._on_disconnected,
            on_lifecycle_connection_failure=lambda d: self.events.append(f"failed: {d.exception}"),
            on_lifecycle_stopped=lambda d: self._stopped.set(),
            min_reconnect_delay_ms=50,
            max_reconnect_delay_ms=500,
        )
        self._client.start()  # type: ignore[attr-defined]
        if not self._connected.wait(pace.scaled(timeout)):
            raise TimeoutError("recorder could not connect to the broker")
        subs = [m5.Subscription(t, m5.QoS.AT_LEAST_ONCE) for t in self.topics]
        sub = self._client.subscribe(m5.SubscribePacket(subs)).result(pace.scaled(timeout))  # type: ignore[attr-defined]
        bad = [int(c) for c in sub.reason_codes if int(c) >= 128]
        if bad:
            raise RuntimeError(f"recorder refused subscription: {bad}")
        self._subscribed = True
        return self

    def _on_disconnected(self, d) -> None:
        self.events.append(f"disconnected: {d.exception}")
        self._connected.clear()

    def _on_connected(self, d) -> None:
        """A broker that lost the session (restarted without persistence) forgot the subscriptions."""
        present = bool(getattr(getattr(d, "connack_packet", None), "session_present", False))
        if self._subscribed and not present:
            import awscrt.mqtt5 as m5

            subs = [m5.Subscription(t, m5.QoS.AT_LEAST_ONCE) for t in self.topics]
            self._client.subscribe(m5.SubscribePacket(subs))  # type: ignore[attr-defined]
        self.events.append(f"connected (session present: {present})")
        self._connected.set()

    def _on_publish(self, d) -> None:
        p = d.publish_packet
        with self._lock:
            self.messages.append((p.topic, bytes(p.payload or b"")))
            self.properties[p.topic] = {
                "content_type": p.content_type,
                "response_topic": p.response_topic,
                "correlation_data": p.correlation_data_bytes,  # binary; `correlation_data` is awscrt's str form
                "user_properties": [(u.name, u.value) for u in p.user_properties or ()],
            }

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0, **properties) -> int:
        """As the cloud: a QoS 1 message to a device's topic; the PUBACK reason code. `properties`: PublishPacket's
        MQTT 5 fields (content_type, response_topic, correlation_data; user_properties as (name, value) pairs)."""
        import awscrt.mqtt5 as m5

        if "user_properties" in properties:
            properties["user_properties"] = [m5.UserProperty(k, v) for k, v in properties["user_properties"]]
        packet = m5.PublishPacket(topic=topic, payload=payload, qos=m5.QoS.AT_LEAST_ONCE, **properties)
        fut = self._client.publish(packet)  # type: ignore[attr-defined]
        return int(fut.result(pace.scaled(timeout)).puback.reason_code)

    def expect(self, topic: str, timeout: float = 10.0) -> bytes:
        """The payload of the first message on `topic` (waiting for it)."""
        deadline = pace.deadline(timeout)
        while time.monotonic() < deadline:
            for t, p in self.snapshot():
                if t == topic:
                    return p
            time.sleep(0.05)
        raise TimeoutError(f"nothing arrived on {topic} within {timeout} s")

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def wait_connected(self, timeout: float = 20.0) -> bool:
        return self._connected.wait(pace.scaled(timeout))

    def wait_quiet(self, want: int, timeout: float, quiet_s: float = 2.0) -> int:
        """Wait until at least `want` messages arrived and nothing new came for `quiet_s` (late duplicates
        are counted too), or the timeout; returns the count."""
        deadline = pace.deadline(timeout)
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.count()
            if n != last:
                last, since = n, time.monotonic()
            elif n >= want and time.monotonic() - since >= quiet_s:
                return n
            time.sleep(0.1)
        return self.count()

    def stop(self) -> None:
        if self._client is not None:
            self._client.stop()  # type: ignore[attr-defined]
            self._stopped.wait(5)
            self._client = None
