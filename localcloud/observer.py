"""A privileged MQTT client that watches what devices publish (tests and the demo use it)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from . import pace
from .broker import OBSERVER, Broker


@dataclass
class Observer:
    broker: Broker
    client_id: str = OBSERVER
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    _client: object = None
    _connected: threading.Event = field(default_factory=threading.Event)
    _stopped: threading.Event = field(default_factory=threading.Event)

    def start(self, topics: list[str], timeout: float = 10.0) -> Observer:
        import awscrt.mqtt5 as m5
        from awsiot import mqtt5_client_builder

        issued = self.broker.ca.issue_client(f"client-{self.client_id}", OBSERVER)
        self._client = mqtt5_client_builder.mtls_from_path(
            endpoint="localhost",
            port=self.broker.port,
            cert_filepath=str(issued.cert_path),
            pri_key_filepath=str(issued.key_path),
            ca_filepath=str(self.broker.ca.cert_path),
            client_id=self.client_id,
            enable_metrics_collection=False,
            on_publish_received=lambda d: self.messages.put(
                (d.publish_packet.topic, bytes(d.publish_packet.payload or b""))
            ),
            on_lifecycle_connection_success=lambda d: self._connected.set(),
            on_lifecycle_stopped=lambda d: self._stopped.set(),
            min_reconnect_delay_ms=100,
            max_reconnect_delay_ms=1000,
        )
        self._client.start()
        if not self._connected.wait(pace.scaled(timeout)):
            raise TimeoutError("observer could not connect to the broker")
        for t in topics:
            sub = self._client.subscribe(m5.SubscribePacket([m5.Subscription(t, m5.QoS.AT_LEAST_ONCE)])).result(
                pace.scaled(timeout)
            )
            if int(sub.reason_codes[0]) >= 128:
                raise RuntimeError(f"observer refused subscription to {t}: {sub.reason_codes[0]}")
        return self

    def expect(self, topic: str, timeout: float = 10.0) -> bytes:
        """The next message on `topic` (others are skipped)."""
        import time

        deadline = pace.deadline(timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message on {topic} within {timeout} s")
            try:
                t, p = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if t == topic:
                return p

    def drain(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        if self._client is not None:
            self._client.stop()
            self._stopped.wait(5)
            self._client = None
