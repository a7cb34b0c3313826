"""Fleet provisioning against the local cloud with AWS's own SDK client, unchanged."""

from __future__ import annotations

import pytest
from awsiot import V2ServiceException, iotidentity
from cloudkit import Client, identity_client, new_csr, register_csr
from cryptography import x509

from localcloud.cloud import LocalCloud


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-0001", "SN-0002", "SN-0003"])
    info = c.up()
    yield c, info
    c.down()


def claim_client(cloud, info, tmp_path, client_id="claimer-1") -> Client:
    cert, key = cloud.issue_claim(client_id)
    return Client(info["port"], cloud.ca.cert_path, cert, key, client_id).start()


def provision(idc, csr_pem, serial="SN-0001"):
    return register_csr(idc, csr_pem, "iot-agent-fleet", {"SerialNumber": serial})


def test_sdk_identity_client_provisions_a_device_from_a_claim_certificate(cloud, tmp_path):
    c, info = cloud
    claim = claim_client(c, info, tmp_path)
    try:
        idc = identity_client(claim)
        csr_pem, key = new_csr()
        created, reg = provision(idc, csr_pem)
        assert reg.thing_name == "gw-SN-0001"
        cert = x509.load_pem_x509_certificate(created.certificate_pem.encode())
        assert cert.public_key().public_numbers() == key.public_key().public_numbers()
        rec = c.registry.certificate(created.certificate_id)
        assert rec.status == "ACTIVE" and rec.thing == "gw-SN-0001"
        # Repeating RegisterThing with the same token (an answer lost in transit) is idempotent.
        again = idc.register_thing(
            iotidentity.RegisterThingRequest(
                template_name="iot-agent-fleet",
                certificate_ownership_token=created.certificate_ownership_token,
                parameters={"SerialNumber": "SN-0001"},
            )
        ).result(20)
        assert again.thing_name == "gw-SN-0001" and len(c.registry.certificates()) == 2
        assert [n for n, _ in c.registry.things()] == ["gw-SN-0001"]
    finally:
        claim.stop()

    # The new certificate connects with the thing name as client ID and may use the thing's topics only.
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "dev.pem").write_text(created.certificate_pem)
    (tmp_path / "dev.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    dev = Client(info["port"], c.ca.cert_path, tmp_path / "dev.pem", tmp_path / "dev.key", "gw-SN-0001").start()
    try:
        assert dev.publish("dt/gw-SN-0001/hello", "hi") in (0, 16)
        assert dev.publish("dt/gw-SN-0002/hello", "spoof") == 135
        assert dev.publish("$aws/certificates/create/json", "{}") == 135  # devices cannot call provisioning APIs
    finally:
        dev.stop()


def test_rejections_use_aws_error_payload(cloud, tmp_path):
    c, info = cloud
    claim = claim_client(c, info, tmp_path)
    try:
        idc = identity_client(claim)
        with pytest.raises(V2ServiceException) as e:
            provision(idc, new_csr()[0], serial="SN-9999")
        err = e.value.modeled_error
        assert (err.status_code, err.error_code) == (403, "Forbidden")
        assert "SN-9999" in err.error_message
        with pytest.raises(V2ServiceException) as e:
            idc.create_certificate_from_csr(
                iotidentity.CreateCertificateFromCsrRequest(
                    certificate_signing_request=(
                        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    )
                )
            ).result(20)
        assert e.value.modeled_error.error_code == "InvalidCsr"
        assert not c.registry.things()
    finally:
        claim.stop()


def test_pending_certificate_cannot_connect_until_registered(cloud, tmp_path):
    from cryptography.hazmat.primitives import serialization

    c, info = cloud
    claim = claim_client(c, info, tmp_path)
    try:
        idc = identity_client(claim)
        csr_pem, key = new_csr()
        created = idc.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem)
        ).result(20)
        (tmp_path / "p.pem").write_text(created.certificate_pem)
        (tmp_path / "p.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        with pytest.raises(TimeoutError):
            Client(info["port"], c.ca.cert_path, tmp_path / "p.pem", tmp_path / "p.key", "pending").start(wait=4)
        idc.register_thing(
            iotidentity.RegisterThingRequest(
                template_name="iot-agent-fleet",
                certificate_ownership_token=created.certificate_ownership_token,
                parameters={"SerialNumber": "SN-0002"},
            )
        ).result(20)
        Client(info["port"], c.ca.cert_path, tmp_path / "p.pem", tmp_path / "p.key", "gw-SN-0002").start().stop()
    finally:
        claim.stop()
