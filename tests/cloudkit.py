"""Test helpers for the local cloud: software-key MQTT clients and the SDK's identity client."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import awscrt.mqtt5 as m5
from awsiot import iotidentity, mqtt5_client_builder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from localcloud import pace


def new_csr(cn: str = "device") -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


@dataclass(eq=False)
class Client:
    """An MQTT 5 client with a software key (stands in for a device in localcloud tests)."""

    port: int
    ca: Path
    cert: Path
    key: Path
    client_id: str
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    failures: list = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)

    def start(self, wait: float | None = 10.0) -> Client:
        self.mqtt = mqtt5_client_builder.mtls_from_path(
            endpoint="localhost",
            port=self.port,
            cert_filepath=str(self.cert),
            pri_key_filepath=str(self.key),
            ca_filepath=str(self.ca),
            client_id=self.client_id,
            enable_metrics_collection=False,
            min_reconnect_delay_ms=200,
            max_reconnect_delay_ms=2000,
            on_publish_received=lambda d: self.messages.put(
                (d.publish_packet.topic, bytes(d.publish_packet.payload or b""))
            ),
            on_lifecycle_connection_success=lambda d: self.connected.set(),
            on_lifecycle_connection_failure=lambda d: self.failures.append(d.exception),
            on_lifecycle_stopped=lambda d: self.stopped.set(),
        )
        self.mqtt.start()
        if wait is not None and not self.connected.wait(wait):
            self.stop()
            raise TimeoutError(f"{self.client_id} could not connect: {self.failures[-3:]}")
        return self

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int:
        data = payload.encode() if isinstance(payload, str) else payload
        r = self.mqtt.publish(m5.PublishPacket(topic=topic, payload=data, qos=m5.QoS(qos))).result(10)
        return int(r.puback.reason_code) if qos else 0

    def subscribe(self, topic: str) -> int:
        r = self.mqtt.subscribe(m5.SubscribePacket([m5.Subscription(topic, m5.QoS.AT_LEAST_ONCE)])).result(10)
        return int(r.reason_codes[0])

    def expect(self, topic: str, timeout: float = 10.0) -> bytes:
        deadline = pace.deadline(timeout)
        while time.monotonic() < deadline:
            try:
                t, p = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if t == topic:
                return p
        raise TimeoutError(f"{self.client_id}: nothing on {topic}")

    def received(self, within: float = 1.0) -> list[tuple[str, bytes]]:
        time.sleep(within)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def stop(self) -> None:
        if getattr(self, "mqtt", None) is not None:
            self.mqtt.stop()
            self.stopped.wait(5)
            self.mqtt = None


def identity_client(client: Client):
    import awscrt.mqtt_request_response as rr
    from awsiot import iotidentity

    return iotidentity.IotIdentityClientV2(
        client.mqtt,
        rr.ClientOptions(
            max_request_response_subscriptions=3, max_streaming_subscriptions=2, operation_timeout_in_seconds=15
        ),
    )


def session_conn(client: Client):
    """What a feature sees of a connection (agent.session.connection.Connection's surface), over a test client."""
    from types import SimpleNamespace

    import awscrt.mqtt_request_response as rr

    def service_client(cls, subscriptions: int, streaming: int = 0, timeout_s: float = 10.0):
        return cls(
            client.mqtt,
            rr.ClientOptions(
                max_request_response_subscriptions=subscriptions,
                max_streaming_subscriptions=streaming,
                operation_timeout_in_seconds=int(timeout_s),
            ),
        )

    return SimpleNamespace(service_client=service_client, connected=client.connected)


def register_csr(idc, csr_pem: str, template: str, parameters: dict[str, str]):
    """CreateCertificateFromCsr then RegisterThing with that template: (created, registered)."""
    created = idc.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem)
    ).result(20)
    reg = idc.register_thing(
        iotidentity.RegisterThingRequest(
            template_name=template,
            certificate_ownership_token=created.certificate_ownership_token,
            parameters=parameters,
        )
    ).result(20)
    return created, reg


def provision_device(c, info, tmp_path, serial) -> tuple[Client, str]:
    """Provision through the SDK and return a connected device client and its certificate id."""
    cert, key = c.issue_claim(f"for-{serial}")
    claim = Client(info["port"], c.ca.cert_path, cert, key, f"claimer-{serial}").start()
    try:
        idc = identity_client(claim)
        csr_pem, dkey = new_csr()
        created, reg = register_csr(idc, csr_pem, "iot-agent-fleet", {"SerialNumber": serial})
    finally:
        claim.stop()
    pem_path, key_path = tmp_path / f"{serial}.pem", tmp_path / f"{serial}.key"
    pem_path.write_text(created.certificate_pem)
    key_path.write_bytes(
        dkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    dev = Client(info["port"], c.ca.cert_path, pem_path, key_path, reg.thing_name).start()
    return dev, created.certificate_id


def wait_status(jobs, job_id: str, thing: str, status: str, timeout: float = 30.0) -> dict:
    deadline = pace.deadline(timeout)
    while time.monotonic() < deadline:
        ex = jobs.execution(job_id, thing)
        if ex and ex["status"] == status:
            return ex
        time.sleep(0.1)
    raise AssertionError(f"{job_id}: {jobs.execution(job_id, thing)}")
