"""AWS IoT Device Management Commands on the local cloud: the execution state machine and its validation of
hostile device responses (localcloud/commands.py), then the whole path over the real broker: the CLI starts an
execution, a device with a certificate receives the request with its content type and message expiry, answers,
and `commands get` shows what it reported."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import awscrt.mqtt5 as m5
import cbor2
import pytest
from awsiot import mqtt5_client_builder
from cloudkit import Client, provision_device

from localcloud import pace, policy
from localcloud.cloud import LocalCloud
from localcloud.commands import (
    CLOUD_TIMEOUT_REASON,
    MAX_RESPONSE_BYTES,
    Commands,
    reply_topic,
    request_topic,
    route,
)

THING = "gw-SN-C1"


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def world():
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    clock = Clock()
    cmds = Commands(db, threading.RLock(), now=clock)
    cmds.create_command("reboot", b'{"action":"reboot"}', "application/json", "restart the gateway")
    yield cmds, clock
    db.close()


def respond(cmds: Commands, eid: str, doc, thing: str = THING, fmt: str | None = "json") -> tuple[bool, dict]:
    body = doc if isinstance(doc, bytes) else (cbor2.dumps(doc) if fmt == "cbor" else json.dumps(doc).encode())
    return cmds.device_response(thing, eid, fmt, body)


# -- operator side --------------------------------------------------------------------------------
def test_create_and_start_queue_the_request_with_type_and_expiry(world):
    cmds, clock = world
    cmds.create_command("blob", b"\x00\x01", "application/octet-stream")
    cmds.create_command("cb", cbor2.dumps({"a": 1}), "application/cbor")
    ex = cmds.start_execution("reboot", THING, 60)
    assert ex["status"] == "CREATED" and ex["thingName"] == THING and ex["executionTimeoutSeconds"] == 60
    assert len(ex["executionId"]) == 36  # a uuid4
    b = cmds.start_execution("blob", THING, 30)["executionId"]
    c = cmds.start_execution("cb", THING, 45)["executionId"]
    clock.t += 0.3
    out = cmds.take_outbox()
    requests = [r for r in out if r.expiry_s is not None]
    events = [r for r in out if r.expiry_s is None]
    assert [(r.topic, r.payload, r.content_type, r.expiry_s) for r in requests] == [
        (
            f"$aws/commands/things/{THING}/executions/{ex['executionId']}/request/json",
            b'{"action":"reboot"}',
            "application/json",
            60,
        ),
        (f"$aws/commands/things/{THING}/executions/{b}/request", b"\x00\x01", "application/octet-stream", 30),
        (f"$aws/commands/things/{THING}/executions/{c}/request/cbor", cbor2.dumps({"a": 1}), "application/cbor", 45),
    ]
    assert [e.topic for e in events] == [f"$aws/events/commandExecution/{x}/CREATED" for x in ("reboot", "blob", "cb")]
    ev = json.loads(events[0].payload)
    assert ev["eventType"] == "COMMAND_EXECUTION" and ev["executionId"] == ex["executionId"]
    assert ev["targetArn"].endswith(f":thing/{THING}") and ev["commandArn"].endswith(":command/reboot")
    assert cmds.take_outbox() == []  # drained once


@pytest.mark.parametrize(
    "args,error",
    [
        (("bad id!", b"{}"), "command id"),
        (("x" * 129, b"{}"), "command id"),
        (("ok", b""), "payload"),
        (("ok", b"{", "application/json"), "not UTF-8 JSON"),
        (("ok", b"\xff\xff", "application/cbor"), "not CBOR"),
        (("ok", b"{}", "application/json\n"), "content type"),
        (("reboot", b"{}"), "already exists"),
    ],
)
def test_create_command_refuses(world, args, error):
    cmds, _ = world
    with pytest.raises(ValueError, match=error):
        cmds.create_command(*args)


@pytest.mark.parametrize(
    "command,thing,timeout,error",
    [
        ("nope", THING, 10, "no command"),
        ("reboot", "", 10, "thing name"),
        ("reboot", "a/b", 10, "thing name"),
        ("reboot", THING, 0, "timeout"),
        ("reboot", THING, 43201, "timeout"),
        ("reboot", THING, True, "timeout"),
    ],
)
def test_start_execution_refuses(world, command, thing, timeout, error):
    cmds, _ = world
    with pytest.raises(ValueError, match=error):
        cmds.start_execution(command, thing, timeout)
    assert cmds.list() == [] and cmds.take_outbox() == []  # nothing half-made


# -- the state machine ----------------------------------------------------------------------------
def test_in_progress_repeats_then_a_terminal_status_is_final(world):
    cmds, clock = world
    eid = cmds.start_execution("reboot", THING, 60)["executionId"]
    for n in range(3):
        clock.t += 1
        assert respond(cmds, eid, {"status": "IN_PROGRESS", "result": {"step": {"s": str(n)}}}) == (
            True,
            {"executionId": eid},
        )
    assert cmds.get(eid)["status"] == "IN_PROGRESS"
    clock.t += 1
    ok, doc = respond(
        cmds,
        eid,
        {
            "status": "SUCCEEDED",
            "statusReason": {"reasonCode": "DONE_OK-1", "reasonDescription": "rebooted in 3 s"},
            "result": {
                "uptime": {"s": "3"},
                "clean": {"b": True},
                "log": {"bin": base64.b64encode(b"\x00ok").decode()},
            },
        },
    )
    assert ok, doc
    ex = cmds.get(eid)
    assert ex["status"] == "SUCCEEDED"
    assert ex["statusReason"] == {"reasonCode": "DONE_OK-1", "reasonDescription": "rebooted in 3 s"}
    assert ex["result"] == {"uptime": {"s": "3"}, "clean": {"b": True}, "log": {"bin": "AG9r"}}
    assert ex["completedAt"] == clock.t and ex["lastUpdatedAt"] == clock.t
    for late in ({"status": "IN_PROGRESS"}, {"status": "FAILED"}, {"status": "SUCCEEDED"}):
        ok, doc = respond(cmds, eid, late)
        assert not ok and doc["error"] == "InvalidStateTransition" and doc["executionId"] == eid
    assert cmds.get(eid)["status"] == "SUCCEEDED"
    statuses = [e.topic.rsplit("/", 1)[1] for e in cmds.take_outbox() if e.expiry_s is None]
    assert statuses == ["CREATED", "IN_PROGRESS", "IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED"]


@pytest.mark.parametrize("final", ["FAILED", "REJECTED", "TIMED_OUT"])
def test_every_device_terminal_status_is_final(world, final):
    cmds, _ = world
    eid = cmds.start_execution("reboot", THING, 60)["executionId"]
    assert respond(cmds, eid, {"status": final, "statusReason": {"reasonCode": "WHY"}})[0]
    ex = cmds.get(eid)
    assert ex["status"] == final and ex["statusReason"] == {"reasonCode": "WHY"} and "completedAt" in ex
    assert respond(cmds, eid, {"status": "SUCCEEDED"})[1]["error"] == "InvalidStateTransition"


def test_timeout_by_the_cloud_then_the_device_may_still_finish(world):
    cmds, clock = world
    quiet = cmds.start_execution("reboot", THING, 5)["executionId"]
    late = cmds.start_execution("reboot", THING, 5)["executionId"]
    busy = cmds.start_execution("reboot", THING, 5)["executionId"]
    assert respond(cmds, busy, {"status": "IN_PROGRESS"})[0]
    clock.t += 4.9
    assert {x["status"] for x in cmds.list()} == {"CREATED", "IN_PROGRESS"}
    clock.t += 0.2
    # Lazily, on get and list: no service tick needed.
    for eid in (quiet, late, busy):
        ex = cmds.get(eid)
        assert ex["status"] == "TIMED_OUT" and ex["statusReason"] == {"reasonCode": CLOUD_TIMEOUT_REASON}
        assert "completedAt" not in ex  # AWS sets it only when the device reports a terminal status
    # A request still queued when its execution timed out is not sent (it would carry a zero expiry).
    assert [r for r in cmds.take_outbox() if r.expiry_s is not None] == []
    # The cloud's TIMED_OUT is not terminal: the device may report a terminal status over it...
    assert respond(cmds, late, {"status": "SUCCEEDED"})[0]
    assert cmds.get(late)["status"] == "SUCCEEDED" and "completedAt" in cmds.get(late)
    # ...or its own TIMED_OUT, which replaces the reason and ends it; but not IN_PROGRESS.
    assert respond(cmds, busy, {"status": "IN_PROGRESS"})[1]["error"] == "InvalidStateTransition"
    assert respond(cmds, busy, {"status": "TIMED_OUT", "statusReason": {"reasonCode": "STUCK"}})[0]
    assert cmds.get(busy)["statusReason"] == {"reasonCode": "STUCK"}
    assert respond(cmds, busy, {"status": "SUCCEEDED"})[1]["error"] == "InvalidStateTransition"
    assert cmds.get(quiet)["status"] == "TIMED_OUT"
    assert [x["executionId"] for x in cmds.list(thing=THING, command_id="reboot")] == [quiet, late, busy]
    assert cmds.list(thing="other") == [] and cmds.list(command_id="other") == []


def test_a_response_for_another_things_execution_is_not_found(world):
    cmds, _ = world
    eid = cmds.start_execution("reboot", THING, 60)["executionId"]
    ok, doc = respond(cmds, eid, {"status": "SUCCEEDED"}, thing="gw-SN-OTHER")
    assert not ok and doc["error"] == "ResourceNotFound"
    ok, doc = respond(cmds, "no-such-execution", {"status": "SUCCEEDED"})
    assert not ok and doc == {
        "error": "ResourceNotFound",
        "errorMessage": "command execution no-such-execution not found",
        "executionId": "no-such-execution",
    }
    assert cmds.get(eid)["status"] == "CREATED"


def test_cbor_responses(world):
    cmds, _ = world
    eid = cmds.start_execution("reboot", THING, 60)["executionId"]
    ok, doc = respond(cmds, eid, {"status": "SUCCEEDED", "result": {"blob": {"bin": b"\x00\xff"}}}, fmt="cbor")
    assert ok, doc
    assert cmds.get(eid)["result"] == {"blob": {"bin": "AP8="}}


def test_the_sdks_own_request_fields_are_tolerated(world):
    """The Java SDK serializes the whole UpdateCommandExecutionRequest, device type and id included."""
    cmds, _ = world
    eid = cmds.start_execution("reboot", THING, 60)["executionId"]
    doc = {"deviceType": "things", "deviceId": THING, "executionId": eid, "status": "SUCCEEDED"}
    assert respond(cmds, eid, doc)[0]


HOSTILE = [
    (b"", "InvalidJson"),
    (b"\xff\xfe garbage", "InvalidJson"),
    (b"{", "InvalidJson"),
    (b'{"status": NaN}', "InvalidJson"),
    (b'{"status": 1e999}', "InvalidJson"),
    (b"[" * 100_000 + b"]" * 100_000, "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", "InvalidRequest"),
    (b" " * (MAX_RESPONSE_BYTES + 1), "InvalidRequest"),
    (b"[]", "InvalidRequest"),
    (b'"SUCCEEDED"', "InvalidRequest"),
    (b"{}", "InvalidRequest"),
    (b'{"status": "DONE"}', "InvalidRequest"),
    (b'{"status": "CREATED"}', "InvalidRequest"),
    (b'{"status": "succeeded"}', "InvalidRequest"),
    (b'{"status": ["SUCCEEDED"]}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "extra": 1}', "InvalidRequest"),
    (b'{"status": "FAILED", "statusReason": "broken"}', "InvalidRequest"),
    (b'{"status": "FAILED", "statusReason": {}}', "InvalidRequest"),
    (b'{"status": "FAILED", "statusReason": {"reasonCode": "lower"}}', "InvalidRequest"),
    (b'{"status": "FAILED", "statusReason": {"reasonCode": "$NO_RESPONSE_FROM_DEVICE"}}', "InvalidRequest"),
    (b'{"status": "FAILED", "statusReason": {"reasonCode": "' + b"A" * 65 + b'"}}', "InvalidRequest"),
    (b'{"status": "FAILED", "statusReason": {"reasonCode": 7}}', "InvalidRequest"),
    (b'{"status": "FAILED", "statusReason": {"reasonCode": "X", "reasonDescription": "' + b"d" * 1025 + b'"}}', None),
    (b'{"status": "FAILED", "statusReason": {"reasonCode": "X", "reasonDescription": "a\\nb"}}', None),
    (b'{"status": "FAILED", "statusReason": {"reasonCode": "X", "reasonDescription": "\\u001b[31m"}}', None),
    (b'{"status": "FAILED", "statusReason": {"reasonCode": "X", "reasonDescription": 5}}', None),
    (b'{"status": "FAILED", "statusReason": {"reasonCode": "X", "other": "y"}}', None),
    (b'{"status": "SUCCEEDED", "result": {}}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": []}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": {"a": "plain"}}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": {"a": {"s": 1}}}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": {"a": {"b": "true"}}}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": {"a": {"b": 1}}}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": {"a": {"bin": "***"}}}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": {"a": {"n": 1}}}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": {"a": {"s": "x", "b": true}}}', "InvalidRequest"),
    (b'{"status": "SUCCEEDED", "result": {"": {"s": "x"}}}', "InvalidRequest"),
    (
        b'{"status": "SUCCEEDED", "result": {' + b",".join(b'"k%d": {"b": true}' % i for i in range(101)) + b"}}",
        "InvalidRequest",
    ),
]


@pytest.mark.parametrize("payload,code", HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
def test_hostile_json_responses_are_rejected_and_change_nothing(world, payload, code):
    cmds, _ = world
    eid = cmds.start_execution("reboot", THING, 60)["executionId"]
    before = cmds.get(eid)
    ok, doc = cmds.device_response(THING, eid, "json", payload)
    assert not ok and doc["error"] == (code or "InvalidRequest") and doc["executionId"] == eid
    assert set(doc) == {"error", "errorMessage", "executionId"} and isinstance(doc["errorMessage"], str)
    assert cmds.get(eid) == before
    assert respond(cmds, eid, {"status": "SUCCEEDED"})[0]  # and the execution still works


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        b"\x9f" * 100_000,  # indefinite arrays, never closed
        b"\x81" * 100_000,  # nested arrays
        b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff",  # an array claiming 2**64-1 items
        b"\x5b\x00\x00\x00\x00\xff\xff\xff\xff",  # a byte string claiming 4 GiB
        cbor2.dumps({1: "SUCCEEDED"}),
        cbor2.dumps({"status": "SUCCEEDED", "result": {"a": {"s": b"bytes"}}}),
        cbor2.dumps({"status": "SUCCEEDED", "result": {"a": {"b": cbor2.CBORTag(99, 1)}}}),
        cbor2.dumps({"status": cbor2.CBORTag(1, 0)}),
    ],
)
def test_hostile_cbor_responses_are_rejected(world, payload):
    cmds, _ = world
    eid = cmds.start_execution("reboot", THING, 60)["executionId"]
    ok, doc = cmds.device_response(THING, eid, "cbor", payload)
    assert not ok and doc["error"] in ("InvalidJson", "InvalidRequest"), doc
    assert cmds.get(eid)["status"] == "CREATED"


def test_routes_and_reply_topics():
    base = f"$aws/commands/things/{THING}/executions/e1"
    assert route(f"{base}/response/json") == (THING, "e1", "json")
    assert route(f"{base}/response/cbor") == (THING, "e1", "cbor")
    assert route(f"{base}/response") == (THING, "e1", None)
    for not_a_response in (
        f"{base}/response/accepted/json",
        f"{base}/response/xml",
        f"{base}/request/json",
        f"$aws/commands/clients/{THING}/executions/e1/response/json",
        "$aws/commands/things//executions/e1/response/json",
        "$aws/commands/things/t/executions//response/json",
    ):
        assert route(not_a_response) is None, not_a_response
    assert reply_topic(THING, "e1", "json", True) == f"{base}/response/accepted/json"
    assert reply_topic(THING, "e1", None, False) == f"{base}/response/rejected"
    assert request_topic(THING, "e1", "application/json; charset=utf-8") == f"{base}/request/json"
    assert request_topic(THING, "e1", "text/plain") == f"{base}/request"


def test_the_device_policy_lets_a_thing_use_its_own_commands_topics_only():
    rules = policy.rules(policy.load_policy("device-policy.json"))
    me, other = "gw-SN-A", "gw-SN-B"
    for filt in (
        f"$aws/commands/things/{me}/executions/+/request/#",
        f"$aws/commands/things/{me}/executions/+/response/accepted/#",
        f"$aws/commands/things/{me}/executions/+/response/rejected/#",
    ):
        concrete = filt.replace("+", "e1").replace("#", "json")
        assert policy.permits(rules, "read", concrete, thing_name=me)
        assert not policy.permits(rules, "read", concrete.replace(me, other), thing_name=me)
    assert policy.permits(rules, "write", f"$aws/commands/things/{me}/executions/e1/response/json", thing_name=me)
    assert not policy.permits(rules, "write", f"$aws/commands/things/{other}/executions/e/response/json", thing_name=me)
    assert not policy.permits(rules, "write", f"$aws/commands/clients/{me}/executions/e/response/json", thing_name=me)


# -- over the real broker, driven by the CLI ------------------------------------------------------
@dataclass(eq=False)
class PacketClient(Client):
    """A device client that keeps whole PUBLISH packets: the test reads the MQTT 5 properties."""

    def start(self, wait: float | None = 10.0) -> PacketClient:
        self.mqtt = mqtt5_client_builder.mtls_from_path(
            endpoint="localhost",
            port=self.port,
            cert_filepath=str(self.cert),
            pri_key_filepath=str(self.key),
            ca_filepath=str(self.ca),
            client_id=self.client_id,
            enable_metrics_collection=False,
            on_publish_received=lambda d: self.messages.put((d.publish_packet.topic, d.publish_packet)),
            on_lifecycle_connection_success=lambda d: self.connected.set(),
            on_lifecycle_connection_failure=lambda d: self.failures.append(d.exception),
            on_lifecycle_stopped=lambda d: self.stopped.set(),
        )
        self.mqtt.start()
        if wait is not None and not self.connected.wait(wait):
            self.stop()
            raise TimeoutError(f"{self.client_id} could not connect: {self.failures[-3:]}")
        return self

    def packet(self, topic: str, timeout: float = 10.0) -> m5.PublishPacket:
        deadline = pace.deadline(timeout)
        while time.monotonic() < deadline:
            t, p = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if t == topic:
                return p
        raise TimeoutError(f"nothing on {topic}")


def cli(c: LocalCloud, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localcloud", "--dir", str(c.directory), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def device(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-C1", "SN-C2"])
    info = c.up()
    dev, _ = provision_device(c, info, tmp_path, "SN-C1")
    dev.stop()
    pdev = PacketClient(dev.port, dev.ca, dev.cert, dev.key, dev.client_id).start()
    try:
        yield c, info, pdev, tmp_path
    finally:
        pdev.stop()
        c.down()


def test_cli_start_device_receives_answers_and_get_shows_it(device):
    c, info, dev, _ = device
    base = f"$aws/commands/things/{THING}/executions"
    for filt in (
        f"{base}/+/request/#",
        f"{base}/+/request",
        f"{base}/+/response/accepted/#",
        f"{base}/+/response/rejected/#",
    ):
        assert dev.subscribe(filt) < 128, filt  # granted by the ACL generated from device-policy.json
    # (mosquitto grants any subscription and applies the ACL per message: another thing's commands topics
    # are tried message by message in test_policy_acl.py)

    r = cli(c, "commands", "create", "reboot", "--payload", '{"action": "reboot"}', "--description", "restart")
    assert r.returncode == 0, r.stderr
    r = cli(c, "commands", "start", "reboot", "--thing", THING, "--timeout", "60")
    assert r.returncode == 0, r.stderr
    eid = r.stdout.strip()

    req = dev.packet(f"{base}/{eid}/request/json")
    assert bytes(req.payload) == b'{"action": "reboot"}'
    assert req.content_type == "application/json"
    assert 50 <= req.message_expiry_interval_sec <= 60  # the broker counts down while it holds the message

    assert dev.publish(f"{base}/{eid}/response/json", json.dumps({"status": "IN_PROGRESS"})) in (0, 16)
    assert json.loads(bytes(dev.packet(f"{base}/{eid}/response/accepted/json").payload)) == {"executionId": eid}
    done = {
        "status": "SUCCEEDED",
        "statusReason": {"reasonCode": "REBOOTED", "reasonDescription": "back in 2 s"},
        "result": {"uptime": {"s": "2"}, "clean": {"b": True}},
    }
    dev.publish(f"{base}/{eid}/response/json", json.dumps(done))
    assert json.loads(bytes(dev.packet(f"{base}/{eid}/response/accepted/json").payload)) == {"executionId": eid}
    dev.publish(f"{base}/{eid}/response/json", json.dumps({"status": "FAILED"}))
    rej = json.loads(bytes(dev.packet(f"{base}/{eid}/response/rejected/json").payload))
    assert rej["error"] == "InvalidStateTransition" and rej["executionId"] == eid
    dev.publish(f"{base}/{eid}/response/json", b"\xff garbage")
    assert json.loads(bytes(dev.packet(f"{base}/{eid}/response/rejected/json").payload))["error"] == "InvalidJson"

    r = cli(c, "commands", "get", eid)
    assert r.returncode == 0, r.stderr
    ex = json.loads(r.stdout)
    assert ex["status"] == "SUCCEEDED" and ex["statusReason"] == done["statusReason"]
    assert ex["result"] == done["result"] and ex["completedAt"] >= ex["createdAt"]
    r = cli(c, "commands", "list", "--thing", THING)
    assert r.returncode == 0 and r.stdout.split("\t")[:4] == [eid, "reboot", THING, "SUCCEEDED"], r.stdout


def test_cbor_and_other_payload_types_and_a_cloud_timeout(device):
    c, info, dev, _ = device
    base = f"$aws/commands/things/{THING}/executions"
    dev.subscribe(f"{base}/+/request/#")
    dev.subscribe(f"{base}/+/request")
    dev.subscribe(f"{base}/+/response/accepted/#")
    dev.subscribe(f"{base}/+/response/rejected/#")
    cb = c.directory.parent / "cmd.cbor"
    cb.write_bytes(cbor2.dumps({"set": {"rate": 5}}))
    assert (
        cli(c, "commands", "create", "rate", "--payload-file", str(cb), "--content-type", "application/cbor").returncode
        == 0
    )
    assert cli(c, "commands", "create", "note", "--payload", "hello", "--content-type", "text/plain").returncode == 0

    eid = cli(c, "commands", "start", "rate", "--thing", THING, "--timeout", "30").stdout.strip()
    req = dev.packet(f"{base}/{eid}/request/cbor")
    assert cbor2.loads(bytes(req.payload)) == {"set": {"rate": 5}} and req.content_type == "application/cbor"
    dev.publish(
        f"{base}/{eid}/response/cbor", cbor2.dumps({"status": "SUCCEEDED", "result": {"raw": {"bin": b"\x01"}}})
    )
    assert cbor2.loads(bytes(dev.packet(f"{base}/{eid}/response/accepted/cbor").payload)) == {"executionId": eid}

    eid = cli(c, "commands", "start", "note", "--thing", THING, "--timeout", "2").stdout.strip()
    req = dev.packet(f"{base}/{eid}/request")
    assert bytes(req.payload) == b"hello" and req.content_type == "text/plain"
    assert req.message_expiry_interval_sec <= 2
    deadline = pace.deadline(15)
    while time.monotonic() < deadline:
        ex = json.loads(cli(c, "commands", "get", eid).stdout)
        if ex["status"] == "TIMED_OUT":
            break
        time.sleep(0.3)
    assert ex["status"] == "TIMED_OUT" and ex["statusReason"] == {"reasonCode": CLOUD_TIMEOUT_REASON}
    # A late answer still lands (AWS: the cloud's TIMED_OUT is not terminal); a bare `response` is JSON.
    dev.publish(f"{base}/{eid}/response", json.dumps({"status": "FAILED", "statusReason": {"reasonCode": "LATE"}}))
    assert json.loads(bytes(dev.packet(f"{base}/{eid}/response/accepted").payload)) == {"executionId": eid}
    assert json.loads(cli(c, "commands", "get", eid).stdout)["status"] == "FAILED"

    r = cli(c, "commands", "start", "missing", "--thing", THING)
    assert r.returncode == 2 and "no command" in r.stderr
    r = cli(c, "commands", "start", "note", "--thing", "gw-SN-NOBODY")
    assert r.returncode == 2 and "no thing" in r.stderr
    r = cli(c, "commands", "get", "nope")
    assert r.returncode == 2 and "no command execution" in r.stderr
