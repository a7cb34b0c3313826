"""Provisioning by claim, end to end: a factory-fresh device on SoftHSM and swtpm against the local cloud."""

from __future__ import annotations

import json

import pytest

from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-1001", "SN-1002"])
    c.up()
    yield c
    c.down()


@pytest.fixture
def ntp(tmp_path):
    ch = Chrony(tmp_path / "chrony").start()
    yield ch
    ch.stop()


def test_fresh_device_provisions_and_connects_as_its_thing(cloud, token, ntp, agents, tmp_path):
    dev = fresh_device(cloud, token, "SN-1001", tmp_path / "device", [ntp.server])
    r = dev.cli("status", "--json")
    assert json.loads(r.stdout)["thing_name"] is None
    a = agents(dev)
    a.wait_for(r"connected with the claim certificate as claim-SN-1001", timeout=60)
    a.wait_for(r"provisioned as gw-SN-1001", timeout=60)
    a.wait_for(r"connected to localhost:\d+ as gw-SN-1001", timeout=60)
    things = cloud.registry.things()
    assert [n for n, _ in things] == ["gw-SN-1001"]
    device_certs = [c for c in cloud.registry.certificates() if c.kind == "device"]
    assert [(c.status, c.thing) for c in device_certs] == [("ACTIVE", "gw-SN-1001")]
    assert a.stop() == 0
    status = json.loads(dev.cli("status", "--json").stdout)
    assert status["thing_name"] == "gw-SN-1001" and status["provisioning"]["step"] == "done"
    assert status["certificate_expires"]
    keys = dev.cli("keys", "list").stdout
    assert {line.split("\t")[0] for line in keys.splitlines()} == {"claim", "device"}
    assert token.pin not in a.text()
    # A restart connects straight away with the new identity (no second provisioning).
    a2 = agents(dev)
    a2.wait_for(r"connected to localhost:\d+ as gw-SN-1001", timeout=60)
    assert "claim" not in a2.text()
    assert len([c for c in cloud.registry.certificates() if c.kind == "device"]) == 1


def test_not_allowed_serial_is_refused_clearly_with_bounded_retries(cloud, softhsm, ntp, agents, tmp_path):
    import time

    dev = fresh_device(cloud, softhsm, "SN-9999", tmp_path / "device", [ntp.server])
    a = agents(dev)
    first = a.wait_for(
        r"provisioning refused: Forbidden: pre-provisioning hook refused serial number 'SN-9999'", timeout=60
    )
    time.sleep(4)
    refusals = [line for _, line in a.lines if "provisioning refused" in line]
    assert 2 <= len(refusals) <= 8, a.text()  # retried with backoff (0.5-2 s here), not in a tight loop
    status = json.loads(dev.cli("status", "--json").stdout)
    assert status["provisioning"]["last_error"]["code"] == "Forbidden"
    assert status["thing_name"] is None
    human = dev.cli("status").stdout
    assert "last refusal Forbidden: pre-provisioning hook refused serial number 'SN-9999'" in human
    assert cloud.registry.things() == []
    assert not [c for c in cloud.registry.certificates() if c.kind == "device" and c.status == "ACTIVE"]
    # Once the operator allows the serial, the same agent finishes on its next retry.
    cloud.registry.allow_serials(["SN-9999"])
    a.wait_for(r"provisioned as gw-SN-9999", after=first, timeout=30)
    a.wait_for(r"connected to localhost:\d+ as gw-SN-9999", timeout=30)


def test_claim_key_removed_from_the_token_when_configured(cloud, softhsm, ntp, agents, tmp_path):
    dev = fresh_device(
        cloud, softhsm, "SN-1002", tmp_path / "device", [ntp.server], extra={"provisioning": {"delete_claim_key": True}}
    )
    a = agents(dev)
    a.wait_for(r"claim key deleted from the token", timeout=60)
    a.wait_for(r"connected to localhost:\d+ as gw-SN-1002", timeout=60)
    assert [line.split("\t")[0] for line in dev.cli("keys", "list").stdout.splitlines()] == ["device"]


def test_broker_refusing_the_claim_certificate_is_reported(cloud, softhsm, ntp, agents, tmp_path):
    dev = fresh_device(cloud, softhsm, "SN-1001", tmp_path / "device", [ntp.server])
    claim = [c for c in cloud.registry.certificates() if c.kind == "claim"][-1]
    cloud.set_certificate_status(claim.id, "REVOKED")
    a = agents(dev)
    a.wait_for(
        r"provisioning refused: ClaimConnectionRefused: the broker did not accept the claim certificate", timeout=60
    )
    status = json.loads(dev.cli("status", "--json").stdout)
    assert status["provisioning"]["last_error"]["code"] == "ClaimConnectionRefused"
    assert cloud.registry.things() == []
