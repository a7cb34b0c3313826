"""Just-in-time provisioning against the real broker: a manufacturer CA registered with a template,
a device certificate it issued, the first connection refused while the cloud registers it, the
next one accepted as the thing with the device policy."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from awsiot import mqtt5_client_builder
from cloudkit import Client
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from localcloud import jitp
from localcloud.cloud import LocalCloud
from localcloud.pki import CertificateAuthority
from localcloud.registry import certificate_id

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "provisioning" / "jitp-template.json"


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    info = c.up()
    yield c, info
    c.down()


def cli(c: LocalCloud, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localcloud", "--dir", str(c.directory), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def cert_id(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return certificate_id(cert.public_bytes(serialization.Encoding.DER))


def attempt(port: int, c: LocalCloud, cert: Path, key: Path, client_id: str, timeout: float = 15.0):
    """One MQTT 5 connection attempt (awscrt, no retry within `timeout`): (connected?, CONNACK reason or error)."""
    done = threading.Event()
    out: list = []

    def failed(d):
        reason = getattr(getattr(d, "connack_packet", None), "reason_code", None)
        out.append((False, reason.name if reason is not None else getattr(d.exception, "name", str(d.exception))))
        done.set()

    def ok(d):
        out.append((True, None))
        done.set()

    stopped = threading.Event()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint="localhost",
        port=port,
        cert_filepath=str(cert),
        pri_key_filepath=str(key),
        ca_filepath=str(c.ca.cert_path),
        client_id=client_id,
        enable_metrics_collection=False,
        min_reconnect_delay_ms=60_000,
        max_reconnect_delay_ms=60_000,
        on_lifecycle_connection_success=ok,
        on_lifecycle_connection_failure=failed,
        on_lifecycle_stopped=lambda d: stopped.set(),
    )
    client.start()
    try:
        assert done.wait(timeout), "no connection outcome"
    finally:
        client.stop()
        stopped.wait(5)
    return out[0]


def wait_log(path: Path, pattern: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, path.read_text(errors="replace")):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{path.name} never matched {pattern!r}")


def wait_registered(c: LocalCloud, cid: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = c.registry.certificate(cid)
        if rec is not None and rec.status == "ACTIVE" and rec.thing:
            return rec
        time.sleep(0.1)
    raise TimeoutError(f"certificate {cid[:16]} was not registered")


def maker_ca(tmp_path: Path, name: str = "maker") -> CertificateAuthority:
    return CertificateAuthority(tmp_path / name, "Acme manufacturing CA")


def test_first_connection_registers_and_is_dropped_then_the_device_connects_as_its_thing(cloud, tmp_path):
    c, info = cloud
    maker = maker_ca(tmp_path)
    r = cli(c, "ca", "register", "--cert", str(maker.cert_path), "--template", str(TEMPLATE))
    assert r.returncode == 0, r.stderr
    assert str(info["jitp_port"]) in r.stdout
    assert maker.cert_path.read_text().strip() in [ca.pem.strip() for ca in c.registry.ca_certificates()]
    dev = maker.issue_client("sensor-0001", "sensor-0001")
    other = maker.issue_client("sensor-0002", "sensor-0002")
    cid = cert_id(dev.cert_path)

    # First connection: refused at CONNECT, and the cloud registers the certificate from the template.
    assert attempt(info["jitp_port"], c, dev.cert_path, dev.key_path, "sensor-0001") == (False, "NOT_AUTHORIZED")
    rec = wait_registered(c, cid)
    assert rec.thing == "sensor-0001" and rec.kind == "device" and rec.cn == jitp.username_for(cid)
    assert [cc.id for cc in c.registry.certificates()].count(cid) == 1
    things = dict(c.registry.things())
    assert things == {"sensor-0001": {"provisioning": "jitp", "certificateSerial": format(dev.cert.serial_number, "x")}}
    assert "just-in-time provisioning requested" in (c.broker_dir / "mosquitto.log").read_text()

    # The next connection is the thing, with the device policy.
    time.sleep(0.5)  # the reload that follows the registration
    device = Client(info["jitp_port"], c.ca.cert_path, dev.cert_path, dev.key_path, "sensor-0001").start()
    try:
        assert device.publish("dt/sensor-0001/telemetry", "{}") in (0, 16)
        assert device.publish("dt/sensor-0002/telemetry", "{}") == 135
        assert device.publish("$aws/things/sensor-0002/shadow/update", "{}") == 135
        assert device.subscribe("cmd/sensor-0001/#") < 128
    finally:
        device.stop()
    # Another device of the same maker gets its own thing; the first is untouched.
    assert attempt(info["jitp_port"], c, other.cert_path, other.key_path, "sensor-0002") == (False, "NOT_AUTHORIZED")
    wait_registered(c, cert_id(other.cert_path))
    assert sorted(n for n, _ in c.registry.things()) == ["sensor-0001", "sensor-0002"]

    # Registered for good: after down / up the device connects at once (same JITP port).
    c.down()
    info2 = c.up()
    assert info2["jitp_port"] == info["jitp_port"]
    assert attempt(info2["jitp_port"], c, dev.cert_path, dev.key_path, "sensor-0001") == (True, None)
    assert len(c.registry.certificates()) == 2


def test_certificates_of_an_unregistered_ca_are_refused_and_never_registered(cloud, tmp_path):
    c, info = cloud
    maker = maker_ca(tmp_path)
    c.register_ca(maker.cert_path.read_bytes(), json.loads(TEMPLATE.read_text()))
    # Another CA, even one with the registered CA's very name, is not trusted.
    rogue = maker_ca(tmp_path, "rogue")
    assert rogue.cert.subject == maker.cert.subject
    dev = rogue.issue_client("sensor-9999", "sensor-9999")
    for port in (info["jitp_port"], info["port"]):
        connected, why = attempt(port, c, dev.cert_path, dev.key_path, "sensor-9999")
        assert not connected and "TLS" in why, why
    time.sleep(1.0)
    assert c.registry.certificates() == [] and c.registry.things() == []
    # Even if its certificate reached the service, it would not be registered.
    outcome = jitp.JustInTimeProvisioning(c.registry, c.reconcile).register(dev.cert_path.read_bytes())
    assert "not a registered CA" in outcome
    assert c.registry.certificates() == [] and c.registry.things() == []
    # The maker's own devices are not taken for the local CA's (and vice versa): the main listener refuses them.
    good = maker.issue_client("sensor-0003", "sensor-0003")
    connected, why = attempt(info["port"], c, good.cert_path, good.key_path, "sensor-0003")
    assert not connected and "TLS" in why
    assert c.registry.certificates() == []


def test_two_quick_first_connections_register_the_thing_once(cloud, tmp_path):
    c, info = cloud
    maker = maker_ca(tmp_path)
    c.register_ca(maker.cert_path.read_bytes(), json.loads(TEMPLATE.read_text()))
    dev = maker.issue_client("sensor-0007", "sensor-0007")
    cid = cert_id(dev.cert_path)
    # The service is held while the connections arrive, so each of them races the registration.
    service = json.loads((c.directory / "pids.json").read_text())["service"]
    os.kill(service, signal.SIGSTOP)
    deadline = time.monotonic() + 5  # SIGSTOP is asynchronous: be sure it holds before the first connection
    while Path(f"/proc/{service}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
        assert time.monotonic() < deadline, "the service did not stop"
        time.sleep(0.01)
    try:
        results: list = []
        threads = [
            threading.Thread(
                target=lambda: results.append(attempt(info["jitp_port"], c, dev.cert_path, dev.key_path, "sensor-0007"))
            )
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.kill(service, signal.SIGCONT)
    assert results == [(False, "NOT_AUTHORIZED")] * 3  # none let in before (or while) it is registered
    assert c.registry.certificate(cid) is None
    wait_registered(c, cid)
    deadline = time.monotonic() + 10  # all three requests handled: the two late ones change nothing
    while (c.directory / "service.log").read_text().count(f"certificate {cid[:16]} already registered") < 2:
        assert time.monotonic() < deadline, "the service did not handle every request"
        time.sleep(0.1)
    log = (c.directory / "service.log").read_text()
    assert log.count(f"certificate {cid[:16]} registered by CA") == 1, log
    assert [cc.id for cc in c.registry.certificates()] == [cid]
    assert [n for n, _ in c.registry.things()] == ["sensor-0007"]
    assert attempt(info["jitp_port"], c, dev.cert_path, dev.key_path, "sensor-0007") == (True, None)


def test_a_certificate_the_template_cannot_register_stays_pending_and_refused(cloud, tmp_path):
    c, info = cloud
    maker = maker_ca(tmp_path)
    c.register_ca(maker.cert_path.read_bytes(), json.loads(TEMPLATE.read_text()))
    bad = maker.issue_client("bad", "not a thing name!")
    cid = cert_id(bad.cert_path)
    assert attempt(info["jitp_port"], c, bad.cert_path, bad.key_path, "x") == (False, "NOT_AUTHORIZED")
    deadline = time.monotonic() + 10
    while c.registry.certificate(cid) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.registry.certificate(cid).status == "PENDING_ACTIVATION" and c.registry.things() == []
    time.sleep(0.5)
    assert attempt(info["jitp_port"], c, bad.cert_path, bad.key_path, "x") == (False, "NOT_AUTHORIZED")
    assert "is PENDING_ACTIVATION: refused" in (c.broker_dir / "mosquitto.log").read_text()
    assert len(c.registry.certificates()) == 1


def test_deactivating_a_jitp_certificate_closes_its_connection(cloud, tmp_path):
    c, info = cloud
    maker = maker_ca(tmp_path)
    c.register_ca(maker.cert_path.read_bytes(), json.loads(TEMPLATE.read_text()))
    dev = maker.issue_client("sensor-0005", "sensor-0005")
    cid = cert_id(dev.cert_path)
    assert attempt(info["jitp_port"], c, dev.cert_path, dev.key_path, "sensor-0005")[0] is False
    wait_registered(c, cid)
    time.sleep(0.5)
    device = Client(info["jitp_port"], c.ca.cert_path, dev.cert_path, dev.key_path, "sensor-0005").start()
    try:
        c.set_certificate_status(cid, "INACTIVE")
        wait_log(c.broker_dir / "mosquitto.log", r"Client sensor-0005 (disconnected|closed)")
    finally:
        device.stop()
    assert attempt(info["jitp_port"], c, dev.cert_path, dev.key_path, "sensor-0005") == (False, "NOT_AUTHORIZED")
    c.set_certificate_status(cid, "ACTIVE")
    assert attempt(info["jitp_port"], c, dev.cert_path, dev.key_path, "sensor-0005") == (True, None)


def test_register_ca_refuses_what_it_could_not_honour(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    maker = maker_ca(tmp_path)
    template = json.loads(TEMPLATE.read_text())
    leaf = maker.issue_client("leaf", "leaf")
    with pytest.raises(ValueError, match="not a CA certificate"):
        c.register_ca(leaf.cert_path.read_bytes(), template)
    with pytest.raises(ValueError, match="own CA"):
        c.register_ca(c.ca.cert_path.read_bytes(), template)
    body = json.loads(template["templateBody"])
    body["Resources"]["policy"]["Properties"] = {"PolicyDocument": "{}"}
    with pytest.raises(ValueError, match="device policy"):
        c.register_ca(maker.cert_path.read_bytes(), {"templateBody": json.dumps(body)})
    body = json.loads(template["templateBody"])
    body["Parameters"]["SerialNumber"] = {"Type": "String"}
    with pytest.raises(ValueError, match="needs a Default"):
        c.register_ca(maker.cert_path.read_bytes(), {"templateBody": json.dumps(body)})
    assert c.registry.ca_certificates() == []
    first = c.register_ca(maker.cert_path.read_bytes(), template)
    assert (
        c.register_ca(maker.cert_path.read_bytes(), json.dumps(template)) == first
    )  # again: same CA, template replaced
    assert [ca.id for ca in c.registry.ca_certificates()] == [first]
    assert len(list((c.broker_dir / "cas").glob("*.0"))) == 1
    r = cli(c, "ca", "list")
    assert r.returncode == 0 and first in r.stdout and "Acme manufacturing CA" in r.stdout
