"""Who may do what on the local cloud, and that it all survives `down` / `up`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cloudkit import Client, new_csr, provision_device

from localcloud.cloud import LocalCloud


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials([f"SN-{i:04d}" for i in range(10)])
    info = c.up()
    yield c, info
    c.down()


def test_claim_certificate_cannot_use_thing_topics(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0001")
    dev.subscribe("$aws/things/gw-SN-0001/#")
    cert, key = c.issue_claim("nosy")
    claim = Client(info["port"], c.ca.cert_path, cert, key, "nosy").start()
    try:
        assert claim.publish("$aws/things/gw-SN-0001/shadow/update", "{}") == 135
        assert claim.publish("dt/gw-SN-0001/x", "{}") == 135
        assert claim.publish("dt/claim-nosy/x", "{}") == 135  # no thing topics even under its own name
        claim.subscribe("$aws/things/gw-SN-0001/#")
        assert dev.publish("$aws/things/gw-SN-0001/jobs/get", "{}") in (0, 16)
        assert not [m for m in claim.received(1.0) if "gw-SN-0001" in m[0]]
    finally:
        claim.stop()
        dev.stop()


def test_device_cannot_use_another_things_topics(cloud, tmp_path):
    c, info = cloud
    a, _ = provision_device(c, info, tmp_path, "SN-0001")
    b, _ = provision_device(c, info, tmp_path, "SN-0002")
    try:
        b.subscribe("cmd/gw-SN-0001/#")  # granted by mosquitto, but nothing is delivered (read denied)
        a.subscribe("cmd/gw-SN-0001/#")
        assert a.publish("cmd/gw-SN-0001/ping", "own") in (0, 16)
        assert a.expect("cmd/gw-SN-0001/ping") == b"own"
        assert not [m for m in b.received(1.0) if "gw-SN-0001" in m[0]]
        assert b.publish("$aws/things/gw-SN-0001/jobs/start-next", "{}") == 135
    finally:
        a.stop()
        b.stop()


def test_provisioning_replies_reach_only_the_requester(cloud, tmp_path):
    """Two claim clients subscribed to the same response topics: each sees only its own answer."""
    c, info = cloud
    clients = []
    for n in ("one", "two"):
        cert, key = c.issue_claim(n)
        cl = Client(info["port"], c.ca.cert_path, cert, key, f"claimer-{n}").start()
        for t in ("$aws/certificates/create-from-csr/json/accepted", "$aws/certificates/create-from-csr/json/rejected"):
            assert cl.subscribe(t) < 128
        clients.append(cl)
    try:
        one, two = clients
        csr_pem, _ = new_csr()
        assert one.publish(
            "$aws/certificates/create-from-csr/json", json.dumps({"certificateSigningRequest": csr_pem})
        ) in (0, 16)
        reply = json.loads(one.expect("$aws/certificates/create-from-csr/json/accepted"))
        assert set(reply) == {"certificateId", "certificatePem", "certificateOwnershipToken"}
        assert two.received(1.0) == []
        assert one.received(0.1) == []  # exactly one reply
    finally:
        for cl in clients:
            cl.stop()


def test_revoked_and_deactivated_certificates_cannot_connect(cloud, tmp_path):
    c, info = cloud
    dev, cid = provision_device(c, info, tmp_path, "SN-0003")
    dev.stop()
    cli = [sys.executable, "-m", "localcloud", "--dir", str(c.directory)]
    r = subprocess.run(cli + ["certs", "deactivate", cid[:16]], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "INACTIVE" in r.stdout
    with pytest.raises(TimeoutError):
        Client(info["port"], c.ca.cert_path, tmp_path / "SN-0003.pem", tmp_path / "SN-0003.key", "gw-SN-0003").start(
            wait=4
        )
    r = subprocess.run(cli + ["certs", "activate", cid], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    Client(
        info["port"], c.ca.cert_path, tmp_path / "SN-0003.pem", tmp_path / "SN-0003.key", "gw-SN-0003"
    ).start().stop()
    r = subprocess.run(cli + ["certs", "revoke", cid], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "REVOKED" in r.stdout
    with pytest.raises(TimeoutError):
        Client(info["port"], c.ca.cert_path, tmp_path / "SN-0003.pem", tmp_path / "SN-0003.key", "gw-SN-0003").start(
            wait=4
        )
    r = subprocess.run(cli + ["certs", "activate", cid], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "revocation is final" in r.stderr
    listing = subprocess.run(cli + ["certs", "list"], capture_output=True, text=True, timeout=30).stdout
    assert f"{cid}\tREVOKED\tdevice\tgw-SN-0003" in listing


def test_up_down_up_keeps_things_and_certificates(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-0005"])
    info = c.up()
    try:
        dev, cid = provision_device(c, info, tmp_path, "SN-0005")
        dev.stop()
    finally:
        c.down()
    assert not c.running()
    c2 = LocalCloud(tmp_path / "cloud")  # a fresh process would do exactly this
    info2 = c2.up()
    try:
        assert info2["port"] == info["port"]
        assert [n for n, _ in c2.registry.things()] == ["gw-SN-0005"]
        assert c2.registry.certificate(cid).status == "ACTIVE"
        Client(
            info2["port"], c2.ca.cert_path, tmp_path / "SN-0005.pem", tmp_path / "SN-0005.key", "gw-SN-0005"
        ).start().stop()
    finally:
        c2.down()


def test_device_must_use_its_thing_name_as_client_id(cloud, tmp_path):
    """AWS's device policy allows iot:Connect only as client/${ThingName}; another client id gets nothing."""
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0004")
    dev.stop()
    imposter = Client(
        info["port"], c.ca.cert_path, tmp_path / "SN-0004.pem", tmp_path / "SN-0004.key", "not-the-thing"
    ).start()
    try:
        assert imposter.publish("dt/gw-SN-0004/x", "hi") == 135
        imposter.subscribe("cmd/gw-SN-0004/#")
    finally:
        imposter.stop()
    good = Client(
        info["port"], c.ca.cert_path, tmp_path / "SN-0004.pem", tmp_path / "SN-0004.key", "gw-SN-0004"
    ).start()
    try:
        assert good.publish("dt/gw-SN-0004/x", "hi") in (0, 16)
    finally:
        good.stop()
