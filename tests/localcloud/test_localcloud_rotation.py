"""The cloud side of certificate rotation, with software-key devices and AWS's SDK clients: a device
renews its own certificate through the rotation template (never another thing's), and after the
commit the broker refuses the old certificate while the new one connects."""

from __future__ import annotations

import json

import pytest
from awsiot import V2ServiceException, iotidentity
from cloudkit import Client, identity_client, new_csr, register_csr
from cryptography.hazmat.primitives import serialization
from test_localcloud_authz import cloud, provision_device  # noqa: F401  (fixture)


def renew(dev: Client, thing: str, tmp_path, name: str):
    idc = identity_client(dev)
    csr_pem, key = new_csr()
    created, reg = register_csr(idc, csr_pem, "iot-agent-rotation", {"ThingName": thing})
    pem, keyf = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    pem.write_text(created.certificate_pem)
    keyf.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return created.certificate_id, reg.thing_name, pem, keyf


def commit(dev: Client, thing: str, action: str, body: dict) -> tuple[str, dict]:
    prefix = f"cmd/{thing}/certificate-rotation/{action}/"
    dev.subscribe(prefix + "+")
    assert dev.publish(f"dt/{thing}/certificate-rotation/{action}", json.dumps({**body, "clientToken": "t1"})) in (
        0,
        16,
    )
    for _ in range(50):
        t, p = dev.messages.get(timeout=10)
        if t.startswith(prefix):
            return t[len(prefix) :], json.loads(p)
    raise AssertionError("no answer")


def test_rotation_then_the_broker_refuses_the_old_certificate(cloud, tmp_path):
    c, info = cloud
    dev, old_id = provision_device(c, info, tmp_path, "SN-0001")
    new_id, thing, pem, key = renew(dev, "gw-SN-0001", tmp_path, "new")
    assert thing == "gw-SN-0001" and c.registry.certificate(new_id).status == "ACTIVE"
    dev.stop()
    new = Client(info["port"], c.ca.cert_path, pem, key, "gw-SN-0001").start()
    try:
        # Abandoning the only other active certificate is refused; committing deactivates the old one.
        kind, doc = commit(new, "gw-SN-0001", "commit", {"newCertificateId": new_id, "oldCertificateId": old_id})
        assert kind == "accepted" and doc == {"clientToken": "t1"}
        assert c.registry.certificate(old_id).status == "INACTIVE"
        kind, doc = commit(new, "gw-SN-0001", "commit", {"newCertificateId": new_id, "oldCertificateId": old_id})
        assert kind == "accepted"  # a repeat (lost answer) gets the same answer
        kind, doc = commit(new, "gw-SN-0001", "abandon", {"certificateId": new_id})
        assert kind == "rejected" and "only active certificate" in doc["message"]
    finally:
        new.stop()
    with pytest.raises(TimeoutError):
        Client(info["port"], c.ca.cert_path, tmp_path / "SN-0001.pem", tmp_path / "SN-0001.key", "gw-SN-0001").start(
            wait=4
        )
    Client(info["port"], c.ca.cert_path, pem, key, "gw-SN-0001").start().stop()


def test_a_device_cannot_renew_for_another_thing_or_use_the_fleet_template(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0002")
    other, other_id = provision_device(c, info, tmp_path, "SN-0004")
    other.stop()
    try:
        idc = identity_client(dev)
        csr_pem, _ = new_csr()
        created = idc.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem)
        ).result(20)
        with pytest.raises(V2ServiceException) as e:
            idc.register_thing(
                iotidentity.RegisterThingRequest(
                    template_name="iot-agent-rotation",
                    certificate_ownership_token=created.certificate_ownership_token,
                    parameters={"ThingName": "gw-SN-0004"},
                )
            ).result(20)
        assert e.value.modeled_error.error_code == "Forbidden"
        # A device certificate may not use the claim's fleet template at all (dropped, as the broker refuses it).
        with pytest.raises(V2ServiceException):
            idc.register_thing(
                iotidentity.RegisterThingRequest(
                    template_name="iot-agent-fleet",
                    certificate_ownership_token=created.certificate_ownership_token,
                    parameters={"SerialNumber": "SN-0009"},
                )
            ).result(20)
        # Nor deactivate another thing's certificate through the commit topic.
        kind, doc = commit(dev, "gw-SN-0002", "abandon", {"certificateId": other_id})
        assert kind == "rejected" and c.registry.certificate(other_id).status == "ACTIVE"
    finally:
        dev.stop()
