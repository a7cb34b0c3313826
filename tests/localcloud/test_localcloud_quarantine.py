"""The quarantine thing group: a quarantined device keeps only what an operator needs to fix it
(jobs, MQTT streams, certificate rotation), on the connection it already has, until it is released."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from cloudkit import Client, new_csr, provision_device
from test_localcloud_jobs import raw_request

from localcloud import policy
from localcloud.cloud import LocalCloud
from localcloud.jobs import Jobs

THING, OTHER = "gw-SN-0001", "gw-SN-0002"

# (access, topic) for the quarantined thing: the broker must agree with provisioning/quarantine-policy.json.
QUARANTINE_CASES = [
    ("write", "dt/{me}/telemetry"),
    ("write", "dt/{me}/certificate-rotation/commit"),
    ("write", "dt/{me}/certificate-rotation/abandon"),
    ("write", "cmd/{me}/x"),
    ("write", "$aws/things/{me}/shadow/update"),
    ("write", "$aws/things/{me}/shadow/name/inventory/update"),
    ("write", "$aws/things/{me}/defender/metrics/json"),
    ("write", "$aws/things/{me}/jobs/get"),
    ("write", "$aws/things/{me}/jobs/$next/get"),
    ("write", "$aws/things/{me}/streams/fw-1/get/json"),
    ("write", "$aws/things/{other}/jobs/get"),
    ("write", "dt/{other}/certificate-rotation/commit"),
    ("write", "$aws/certificates/create-from-csr/json"),
    ("write", "$aws/provisioning-templates/iot-agent-rotation/provision/json"),
    ("write", "$aws/provisioning-templates/iot-agent-fleet/provision/json"),
]


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-0001", "SN-0002"])
    info = c.up()
    yield c, info
    c.down()


def cli(c: LocalCloud, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localcloud", "--dir", str(c.directory), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def service_writer(c: LocalCloud, port: int) -> Client:
    pki = c.directory / "pki"
    return Client(port, c.ca.cert_path, pki / "service.pem", pki / "service.key", "quarantine-probe").start()


def test_quarantined_device_keeps_jobs_and_rotation_but_not_telemetry_until_released(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0001")
    other, _ = provision_device(c, info, tmp_path, "SN-0002")
    writer = service_writer(c, info["port"])
    try:
        assert dev.publish(f"dt/{THING}/telemetry", "{}") in (0, 16)
        assert dev.subscribe(f"$aws/things/{THING}/jobs/#") < 128
        assert dev.subscribe(f"cmd/{THING}/#") < 128
        assert dev.subscribe("$aws/certificates/create-from-csr/json/+") < 128
        Jobs(c.registry.db, c.registry.lock).create("fix-1", THING, {"operation": "rotate-certificate"}, None)

        r = cli(c, "things", "quarantine", THING)
        assert r.returncode == 0 and r.stdout.strip() == f"{THING} quarantined", r.stderr
        assert c.quarantined() == [THING] and LocalCloud(c.directory).quarantined() == [THING]  # persisted
        time.sleep(0.5)  # the broker's reload

        # On the connection opened before the quarantine: telemetry, shadows, Defender refused.
        assert dev.publish(f"dt/{THING}/telemetry", "{}") == 135
        assert dev.publish(f"$aws/things/{THING}/shadow/update", '{"state":{"reported":{"a":1}}}') == 135
        assert dev.publish(f"$aws/things/{THING}/defender/metrics/json", "{}") == 135
        rules = policy.rules(policy.load_policy("quarantine-policy.json"))
        for access, pattern in QUARANTINE_CASES:
            topic = pattern.format(me=THING, other=OTHER)
            expected = policy.permits(rules, access, topic, thing_name=THING)
            assert (dev.publish(topic, b"{}") != 135) == expected, (topic, expected)
        # Reading too: commands other than rotation answers are not delivered.
        writer.publish(f"cmd/{THING}/reboot", "{}")
        writer.publish(f"cmd/{THING}/certificate-rotation/commit/rejected", '{"code":"probe"}')
        got = [t for t, _ in dev.received(1.0)]
        assert f"cmd/{THING}/certificate-rotation/commit/rejected" in got and f"cmd/{THING}/reboot" not in got

        # Jobs: start-next and update still work.
        kind, doc = raw_request(dev, f"$aws/things/{THING}/jobs/start-next", {})
        assert kind == "accepted" and doc["execution"]["jobId"] == "fix-1", doc
        kind, doc = raw_request(
            dev,
            f"$aws/things/{THING}/jobs/fix-1/update",
            {
                "status": "IN_PROGRESS",
                "statusDetails": {"step": "rotating"},
                "expectedVersion": doc["execution"]["versionNumber"],
            },
        )
        assert kind == "accepted", doc
        # Certificate rotation: a new certificate from a CSR, and the rotation topic answered by the cloud.
        csr, _ = new_csr()
        kind, doc = raw_request(dev, "$aws/certificates/create-from-csr/json", {"certificateSigningRequest": csr})
        assert kind == "accepted" and doc["certificatePem"].startswith("-----BEGIN CERTIFICATE-----")
        assert dev.publish(
            f"dt/{THING}/certificate-rotation/commit", json.dumps({"newCertificateId": "x", "oldCertificateId": "y"})
        ) in (0, 16)
        assert json.loads(dev.expect(f"cmd/{THING}/certificate-rotation/commit/rejected"))["code"] == "InvalidRequest"

        # Other things are not affected.
        assert other.publish(f"dt/{OTHER}/telemetry", "{}") in (0, 16)

        r = cli(c, "things", "release", THING)
        assert r.returncode == 0 and r.stdout.strip() == f"{THING} released", r.stderr
        time.sleep(0.5)
        assert c.quarantined() == []
        assert dev.publish(f"dt/{THING}/telemetry", "{}") in (0, 16)
        assert dev.publish(f"$aws/things/{THING}/shadow/update", '{"state":{"reported":{"a":1}}}') in (0, 16)
        writer.publish(f"cmd/{THING}/reboot", "{}")
        assert dev.expect(f"cmd/{THING}/reboot") == b"{}"
    finally:
        for cl in (dev, other, writer):
            cl.stop()


def test_quarantine_survives_a_restart_and_applies_to_new_connections(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0001")
    dev.stop()
    assert c.quarantine(THING) is True
    assert c.quarantine(THING) is False  # already
    c.down()
    info = c.up()
    assert LocalCloud(c.directory).quarantined() == [THING]
    dev = Client(info["port"], c.ca.cert_path, tmp_path / "SN-0001.pem", tmp_path / "SN-0001.key", THING).start()
    try:
        assert dev.publish(f"dt/{THING}/telemetry", "{}") == 135
        assert dev.publish(f"$aws/things/{THING}/jobs/get", "{}") in (0, 16)
        assert c.release(THING) is True
        time.sleep(0.5)
        assert dev.publish(f"dt/{THING}/telemetry", "{}") in (0, 16)
    finally:
        dev.stop()
    r = cli(c, "things", "quarantine", "no-such-thing")
    assert r.returncode == 2 and "no thing" in r.stderr
