"""The device and claim policies in provisioning/ and the broker's behaviour agree, case by case.

For each (identity, action, topic) the expected answer is computed from the policy JSON by
localcloud.policy.permits, and the same case is tried against the real broker.
"""

from __future__ import annotations

import pytest
from cloudkit import Client, provision_device

from localcloud import policy
from localcloud.cloud import LocalCloud

DEVICE_CASES = [
    ("write", "dt/{me}/telemetry"),
    ("write", "dt/{other}/telemetry"),
    ("write", "$aws/things/{me}/shadow/update"),
    ("write", "$aws/things/{other}/shadow/update"),
    ("write", "$aws/things/{me}/jobs/get"),
    ("write", "cmd/{me}/x"),
    ("write", "$aws/certificates/create/json"),
    ("write", "$aws/provisioning-templates/iot-agent-fleet/provision/json"),
    ("write", "other/topic"),
    ("read", "cmd/{me}/reboot"),
    ("read", "cmd/{other}/reboot"),
    ("read", "$aws/things/{me}/jobs/notify"),
    ("read", "$aws/things/{other}/jobs/notify"),
    ("read", "$aws/things/{me}/shadow/name/$package/update/accepted"),
    ("write", "$aws/things/{me}/shadow/name/$package/update"),
    ("write", "$aws/commands/things/{me}/executions/e1/response/json"),
    ("write", "$aws/commands/things/{me}/executions/e1/response"),
    ("write", "$aws/commands/things/{other}/executions/e1/response/json"),
    ("write", "$aws/commands/clients/{me}/executions/e1/response/json"),
    ("read", "$aws/commands/things/{me}/executions/e1/request/json"),
    ("read", "$aws/commands/things/{me}/executions/e1/request"),
    ("read", "$aws/commands/things/{me}/executions/e1/response/accepted/json"),
    ("read", "$aws/commands/things/{other}/executions/e1/request/json"),
    ("read", "$aws/commands/things/{other}/executions/e1/response/accepted/json"),
]
CLAIM_CASES = [
    ("write", "$aws/certificates/create/json"),
    ("write", "$aws/certificates/create-from-csr/json"),
    ("write", "$aws/provisioning-templates/iot-agent-fleet/provision/json"),
    ("write", "$aws/provisioning-templates/other/provision/json"),
    ("write", "dt/{other}/telemetry"),
    ("write", "$aws/things/{other}/shadow/update"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("acl")
    c = LocalCloud(d / "cloud")
    c.registry.allow_serials(["SN-A", "SN-B"])
    info = c.up()
    me, _ = provision_device(c, info, d, "SN-A")
    other, _ = provision_device(c, info, d, "SN-B")
    cert, key = c.issue_claim("acl")
    claim = Client(info["port"], c.ca.cert_path, cert, key, "claim-acl").start()
    yield c, me, other, claim
    for cl in (me, other, claim, getattr(c, "_svc_writer", None)):
        if cl:
            cl.stop()
    c.down()


def broker_allows_write(client: Client, topic: str) -> bool:
    return client.publish(topic, b"{}") != 135


def broker_allows_read(reader: Client, writer: Client, topic: str) -> bool:
    """The writer (which may publish there) publishes; does the reader receive it?"""
    reader.subscribe(topic)
    assert writer.publish(topic, b"probe") != 135
    return any(t == topic for t, _ in reader.received(0.5))


def test_device_policy_and_broker_agree(world):
    c, me, other, _ = world
    rules = policy.rules(policy.load_policy("device-policy.json"))
    for access, pattern in DEVICE_CASES:
        topic = pattern.format(me="gw-SN-A", other="gw-SN-B")
        expected = policy.permits(rules, access, topic, thing_name="gw-SN-A")
        if access == "write":
            actual = broker_allows_write(me, topic)
        else:
            writer = other if "{other}" in pattern else c_service_writer(c)
            actual = broker_allows_read(me, writer, topic)
        assert actual == expected, (access, topic, expected, actual)


def test_claim_policy_and_broker_agree(world):
    c, _, _, claim = world
    rules = policy.rules(policy.load_policy("claim-policy.json"))
    for access, pattern in CLAIM_CASES:
        topic = pattern.format(other="gw-SN-B")
        assert broker_allows_write(claim, topic) == policy.permits(rules, access, topic), topic


def c_service_writer(c: LocalCloud) -> Client:
    """A client with the service identity (it may publish anywhere), to test what a device may read."""
    if not hasattr(c, "_svc_writer"):
        pki = c.directory / "pki"
        c._svc_writer = Client(
            c.endpoint()["port"], c.ca.cert_path, pki / "service.pem", pki / "service.key", "acl-probe-writer"
        ).start()
    return c._svc_writer


def test_policies_are_least_privilege():
    device = policy.load_policy("device-policy.json")
    connect = [s for s in device["Statement"] if s["Action"] == "iot:Connect"]
    assert connect[0]["Resource"].endswith("client/${iot:Connection.Thing.ThingName}")
    for st in device["Statement"]:
        for res in st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]:
            # Nothing outside the thing's own namespace, except the two certificate-rotation APIs, whose
            # replies go to the calling connection only (and whose template binds the caller's thing).
            assert (
                "${iot:Connection.Thing.ThingName}" in res
                or "/$aws/certificates/create-from-csr/json" in res
                or "/$aws/provisioning-templates/iot-agent-rotation/provision/json" in res
            ), res
    claim = policy.load_policy("claim-policy.json")
    for st in claim["Statement"][1:]:
        for res in st["Resource"]:
            assert "/$aws/certificates/" in res or "/$aws/provisioning-templates/iot-agent-fleet/" in res, res
