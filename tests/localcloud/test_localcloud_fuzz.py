"""Hostile input to the provisioning APIs: 1,000+ generated requests through the real broker and service.

Every permitted request gets exactly one reply; every rejection is AWS-shaped; requests the claim
policy does not permit get no reply at all; the service survives and still provisions afterwards.
"""

from __future__ import annotations

import json

import cbor2
import pytest
from cloudkit import Client, identity_client, new_csr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localcloud.cloud import LocalCloud

TOPICS = [
    "$aws/certificates/create-from-csr/json",
    "$aws/certificates/create-from-csr/cbor",
    "$aws/certificates/create/json",
    "$aws/certificates/create/cbor",
    "$aws/provisioning-templates/iot-agent-fleet/provision/json",
    "$aws/provisioning-templates/iot-agent-fleet/provision/cbor",
]
# Not permitted by the claim policy: the broker refuses the publish (PUBACK 135).
DENIED_TOPICS = ["$aws/provisioning-templates/other-template/provision/json", "$aws/things/x/jobs/get"]
# Permitted by the policy's wildcard but not an API: accepted by the broker, no reply (as on AWS).
SILENT_TOPICS = ["$aws/certificates/create/xml", "$aws/certificates/create-from-csr/yaml"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["certificateSigningRequest", "certificateOwnershipToken", "parameters", "SerialNumber", "x"]
)
shaped = st.dictionaries(field_names, values, max_size=3)
csr_like = st.builds(
    lambda body: {
        "certificateSigningRequest": f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"
    },
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n", max_size=300),
)
register_like = st.builds(
    lambda tok, params: {"certificateOwnershipToken": tok, "parameters": params},
    st.one_of(st.text(max_size=60), values),
    st.one_of(st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=5), values),
)


@st.composite
def request(draw):
    n = draw(st.integers(0, 39))
    expect = "denied" if n == 0 else "silent" if n == 1 else "reply"
    topic = draw(st.sampled_from({"denied": DENIED_TOPICS, "silent": SILENT_TOPICS, "reply": TOPICS}[expect]))
    kind = draw(st.sampled_from(["bytes", "doc", "shaped", "csr", "register", "huge"]))
    if kind == "bytes":
        return topic, draw(st.binary(max_size=200)), expect
    if kind == "huge":
        return topic, json.dumps({"certificateSigningRequest": "A" * 70000}).encode(), expect
    doc = draw({"doc": values, "shaped": shaped, "csr": csr_like, "register": register_like}[kind])
    payload = cbor2.dumps(doc) if "/cbor" in topic else json.dumps(doc).encode()
    return topic, payload, expect


def decode(topic: str, payload: bytes):
    return (
        cbor2.loads(payload)
        if topic.endswith("/cbor/rejected") or topic.endswith("/cbor/accepted")
        else json.loads(payload)
    )


@pytest.fixture(scope="module")
def fuzz_cloud(tmp_path_factory):
    c = LocalCloud(tmp_path_factory.mktemp("fuzz") / "cloud")
    c.configure(defender_min_interval_s=0)  # so that well-formed fuzz reports are accepted, not throttled
    c.registry.allow_serials(["SN-OK"])
    info = c.up()
    cert, key = c.issue_claim("fuzzer")
    cl = Client(info["port"], c.ca.cert_path, cert, key, "fuzzer").start()
    for t in ("$aws/certificates/+/+/+", "$aws/provisioning-templates/+/provision/+/+"):  # replies, not requests
        cl.subscribe(t)
    stats = {"cases": 0, "accepted": 0, "rejected": 0, "denied": 0, "silent": 0}
    yield c, info, cl, stats
    cl.stop()
    c.down()


def test_malformed_requests_get_aws_shaped_rejections(fuzz_cloud):
    c, info, cl, stats = fuzz_cloud

    @settings(
        max_examples=1100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(request())
    def one(case):
        topic, payload, expect = case
        rc = cl.publish(topic, payload)
        stats["cases"] += 1
        if expect != "reply":
            assert rc == (135 if expect == "denied" else rc) and (expect == "denied" or rc in (0, 16)), rc
            assert cl.received(0.05) == []
            stats[expect] += 1
            return
        assert rc in (0, 16), rc
        reply_topic, body = cl.messages.get(timeout=10)
        assert reply_topic in (topic + "/accepted", topic + "/rejected"), (reply_topic, topic)
        doc = decode(reply_topic, body)
        if reply_topic.endswith("/rejected"):
            stats["rejected"] += 1
            assert set(doc) == {"statusCode", "errorCode", "errorMessage"}, doc
            assert isinstance(doc["statusCode"], int) and 400 <= doc["statusCode"] < 600
            assert isinstance(doc["errorCode"], str) and isinstance(doc["errorMessage"], str)
        else:
            stats["accepted"] += 1
            assert "certificateOwnershipToken" in doc or "thingName" in doc
        assert cl.messages.empty()  # exactly one reply

    one()
    print("fuzz:", stats)
    assert stats["cases"] >= 1000 and stats["rejected"] > 500 and stats["denied"] >= 5 and stats["silent"] >= 5

    # The service is still up and still provisions correctly.
    assert c.running()
    idc = identity_client(cl)
    from awsiot import iotidentity

    created = idc.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=new_csr()[0])
    ).result(20)
    reg = idc.register_thing(
        iotidentity.RegisterThingRequest(
            template_name="iot-agent-fleet",
            certificate_ownership_token=created.certificate_ownership_token,
            parameters={"SerialNumber": "SN-OK"},
        )
    ).result(20)
    assert reg.thing_name == "gw-SN-OK"
    assert "Traceback" not in (c.directory / "service.log").read_text()


JOB_CODES = {
    "InternalError",
    "InvalidJson",
    "InvalidRequest",
    "InvalidStateTransition",
    "ResourceNotFound",
    "VersionMismatch",
    "InvalidTopic",
    "RequestThrottled",
    "TerminalStateReached",
}


@st.composite
def jobs_request(draw):
    suffix = draw(
        st.sampled_from(
            ["get", "start-next", "$next/get", "j1/get", "j2/get", "nope/get", "j1/update", "j2/update", "nope/update"]
        )
    )
    kind = draw(st.sampled_from(["bytes", "doc", "shaped"]))
    if kind == "bytes":
        return suffix, draw(st.binary(max_size=100))
    if kind == "doc":
        return suffix, json.dumps(draw(values)).encode()
    keys = st.sampled_from(
        [
            "status",
            "statusDetails",
            "expectedVersion",
            "executionNumber",
            "clientToken",
            "includeJobDocument",
            "includeJobExecutionState",
            "stepTimeoutInMinutes",
            "x",
        ]
    )
    status = st.sampled_from(["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "QUEUED", "CANCELED", 3])
    doc = draw(st.dictionaries(keys, st.one_of(values, status, st.integers(-5, 20000)), max_size=4))
    return suffix, json.dumps(doc).encode()


def test_malformed_jobs_requests_get_aws_shaped_rejections(fuzz_cloud, tmp_path):
    from cloudkit import provision_device

    c, info, cl, _ = fuzz_cloud
    c.registry.allow_serials(["SN-JOBS"])
    dev, _ = provision_device(c, info, tmp_path, "SN-JOBS")
    base = "$aws/things/gw-SN-JOBS/jobs"
    from localcloud.jobs import Jobs

    jobs = Jobs(c.registry.db, c.registry.lock)
    jobs.create("j1", "gw-SN-JOBS", {"a": 1})
    jobs.create("j2", "gw-SN-JOBS", {"b": 2}, step_timeout_min=5)
    dev.subscribe(f"{base}/+/accepted")
    dev.subscribe(f"{base}/+/rejected")
    dev.subscribe(f"{base}/+/+/accepted")
    dev.subscribe(f"{base}/+/+/rejected")
    stats = {"cases": 0, "accepted": 0, "rejected": 0}
    try:

        @settings(
            max_examples=500, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(jobs_request())
        def one(case):
            suffix, payload = case
            topic = f"{base}/{suffix}"
            assert dev.publish(topic, payload) in (0, 16)
            reply_topic, body = dev.messages.get(timeout=10)
            assert reply_topic in (topic + "/accepted", topic + "/rejected"), (reply_topic, topic)
            doc = json.loads(body)
            stats["cases"] += 1
            assert isinstance(doc.get("timestamp"), int)
            if reply_topic.endswith("/rejected"):
                stats["rejected"] += 1
                assert doc["code"] in JOB_CODES and isinstance(doc["message"], str)
                assert set(doc) <= {"code", "message", "timestamp", "clientToken", "executionState"}
            else:
                stats["accepted"] += 1
            assert dev.messages.empty()

        one()
    finally:
        dev.stop()
    print("jobs fuzz:", stats)
    assert stats["cases"] >= 500 and stats["rejected"] > 100 and stats["accepted"] > 5
    assert c.running() and "Traceback" not in (c.directory / "service.log").read_text()


@st.composite
def defender_or_stream_request(draw):
    api = draw(st.sampled_from(["defender", "describe", "get"]))
    fmt = draw(st.sampled_from(["json", "cbor"]))
    if api == "defender":
        topic = f"defender/metrics/{fmt}"
        keys = st.sampled_from(["header", "hed", "metrics", "met", "custom_metrics", "cmet", "report_id", "version"])
        metric_names = st.sampled_from(["network_stats", "listening_tcp_ports", "tcp_connections", "x"])
        plausible = st.builds(
            lambda rid, m: {"header": {"report_id": rid, "version": "1.0"}, "metrics": m},
            st.integers(0, 2**40),
            st.dictionaries(metric_names, values, max_size=2),
        )
        doc = draw(st.one_of(values, st.dictionaries(keys, values, max_size=3), plausible))
    else:
        stream = draw(st.sampled_from(["fz", "missing"]))
        topic = f"streams/{stream}/{api}/{fmt}"
        keys = st.sampled_from(["c", "s", "f", "l", "o", "n", "b", "q"])
        doc = draw(
            st.one_of(
                values,
                st.dictionaries(keys, st.one_of(values, st.integers(-3, 300000), st.binary(max_size=8)), max_size=5),
            )
        )
    raw = draw(st.booleans()) and draw(st.booleans())
    if raw:
        return api, topic, fmt, draw(st.binary(max_size=64))
    try:
        body = cbor2.dumps(doc) if fmt == "cbor" else json.dumps(doc).encode()
    except (TypeError, ValueError):
        body = b"\x00"
    return api, topic, fmt, body


def test_malformed_defender_and_stream_requests(fuzz_cloud, tmp_path):
    from cloudkit import provision_device

    from localcloud.streams import Streams

    c, info, _, _ = fuzz_cloud
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 20)
    Streams(c.registry.db, c.registry.lock, c.directory / "streams").create([tmp_path / "blob"], "fz")
    c.registry.allow_serials(["SN-DS"])
    dev, _ = provision_device(c, info, tmp_path, "SN-DS")
    base = "$aws/things/gw-SN-DS"
    for t in (
        f"{base}/defender/metrics/+/+",
        f"{base}/streams/+/description/+",
        f"{base}/streams/+/data/+",
        f"{base}/streams/+/rejected/+",
    ):
        dev.subscribe(t)
    stats = {"cases": 0, "defender": 0, "stream_replies": 0, "rejected": 0}
    try:

        @settings(
            max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(defender_or_stream_request())
        def one(case):
            api, topic, fmt, body = case
            assert dev.publish(f"{base}/{topic}", body) in (0, 16)
            t, p = dev.messages.get(timeout=10)
            replies = [(t, p)] + dev.received(0.05 if api == "get" else 0.0)
            stats["cases"] += 1
            for t, p in replies:
                doc = (
                    cbor2.loads(p)
                    if t.endswith("/cbor") or t.endswith("cbor/accepted") or t.endswith("cbor/rejected")
                    else json.loads(p)
                )
                if api == "defender":
                    stats["defender"] += 1
                    assert t in (f"{base}/{topic}/accepted", f"{base}/{topic}/rejected"), t
                    assert doc["thingName"] == "gw-SN-DS" and doc["status"] in ("ACCEPTED", "REJECTED")
                    if doc["status"] == "REJECTED":
                        stats["rejected"] += 1
                        assert set(doc["statusDetails"]) == {"ErrorCode", "ErrorMessage"}
                    assert len(replies) == 1
                else:
                    stats["stream_replies"] += 1
                    kind = t.split("/")[-2]
                    assert kind in ("description", "data", "rejected") and t.endswith("/" + fmt)
                    if kind == "rejected":
                        stats["rejected"] += 1
                        assert isinstance(doc["o"], str) and isinstance(doc["m"], str)
                        assert len(replies) == 1

        one()
    finally:
        dev.stop()
    print("defender/streams fuzz:", stats)
    assert stats["cases"] >= 400 and stats["rejected"] > 100
    assert c.running() and "Traceback" not in (c.directory / "service.log").read_text()
