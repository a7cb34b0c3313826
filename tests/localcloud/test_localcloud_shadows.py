"""Named device shadows on the local cloud, driven by AWS's own IotShadowClientV2 over MQTT 5 (as a device
agent would), by raw MQTT for hostile payloads, and the fleet query behind `things query` / `jobs create --query`."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time

import awscrt.mqtt_request_response as rr
import pytest
from awsiot import ServiceStreamOptions, V2ServiceException, iotjobs, iotshadow
from cloudkit import Client, provision_device

from localcloud.cloud import LocalCloud
from localcloud.shadows import Shadows, compare, parse_where

SHADOW = "inventory"


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials([f"SN-000{i}" for i in range(1, 6)])
    info = c.up()
    yield c, info
    c.down()


def cli(c, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localcloud", "--dir", str(c.directory), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def shadow_client(dev: Client) -> iotshadow.IotShadowClientV2:
    return iotshadow.IotShadowClientV2(
        dev.mqtt,
        rr.ClientOptions(
            max_request_response_subscriptions=6, max_streaming_subscriptions=3, operation_timeout_in_seconds=10
        ),
    )


def report(sc, thing: str, reported: dict, version: int | None = None) -> iotshadow.UpdateShadowResponse:
    return sc.update_named_shadow(
        iotshadow.UpdateNamedShadowRequest(
            thing_name=thing, shadow_name=SHADOW, state=iotshadow.ShadowState(reported=reported), version=version
        )
    ).result(15)


def open_stream(create, request) -> queue.Queue:
    events: queue.Queue = queue.Queue()
    status: queue.Queue = queue.Queue()
    stream = create(
        request, ServiceStreamOptions(incoming_event_listener=events.put, subscription_status_listener=status.put)
    )
    stream.open()
    st = status.get(timeout=10)
    assert st.error is None, st.error
    events.stream = stream  # keep it alive as long as the queue
    return events


def test_sdk_update_get_delta_conflict_delete(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0001")
    thing = "gw-SN-0001"
    try:
        sc = shadow_client(dev)
        with pytest.raises(V2ServiceException) as e:
            sc.get_named_shadow(iotshadow.GetNamedShadowRequest(thing_name=thing, shadow_name=SHADOW)).result(15)
        assert e.value.modeled_error.code == 404
        assert e.value.modeled_error.message == "No shadow exists with name: 'inventory'"

        before = int(time.time())
        up = report(sc, thing, {"targets": {"app": {"current": "1.1.0"}}, "uptime_s": 5})
        assert up.version == 1 and up.client_token  # the SDK's correlation token came back
        assert up.state.reported == {"targets": {"app": {"current": "1.1.0"}}, "uptime_s": 5}
        ts = up.metadata.reported["targets"]["app"]["current"]["timestamp"]
        assert before <= ts <= int(time.time()) + 1
        up = report(sc, thing, {"uptime_s": 9, "gone": None})
        assert up.version == 2

        got = sc.get_named_shadow(iotshadow.GetNamedShadowRequest(thing_name=thing, shadow_name=SHADOW)).result(15)
        assert got.version == 2 and got.state.delta is None and got.state.desired is None
        assert got.state.reported == {"targets": {"app": {"current": "1.1.0"}}, "uptime_s": 9}
        assert set(got.metadata.reported) == {"targets", "uptime_s"}

        # The app (here the CLI, as UpdateThingShadow) asks for 1.2.0: the device gets the delta.
        deltas = open_stream(
            sc.create_named_shadow_delta_updated_stream,
            iotshadow.NamedShadowDeltaUpdatedSubscriptionRequest(thing_name=thing, shadow_name=SHADOW),
        )
        docs = open_stream(
            sc.create_named_shadow_updated_stream,
            iotshadow.NamedShadowUpdatedSubscriptionRequest(thing_name=thing, shadow_name=SHADOW),
        )
        r = cli(c, "shadows", "update", thing, SHADOW, "--desired", '{"targets": {"app": {"current": "1.2.0"}}}')
        assert r.returncode == 0 and r.stdout.strip() == "version 3", r.stderr
        ev = deltas.get(timeout=10)
        assert ev.version == 3 and ev.state == {"targets": {"app": {"current": "1.2.0"}}}
        assert "timestamp" in ev.metadata["targets"]["app"]["current"]
        doc = docs.get(timeout=10)
        assert doc.previous.version == 2 and doc.current.version == 3
        assert doc.current.state.desired == {"targets": {"app": {"current": "1.2.0"}}}

        # An update based on a stale version is refused; the shadow is unchanged.
        with pytest.raises(V2ServiceException) as e:
            report(sc, thing, {"targets": {"app": {"current": "1.2.0"}}}, version=2)
        err = e.value.modeled_error
        assert (err.code, err.message) == (409, "Version conflict") and err.client_token
        up = report(sc, thing, {"targets": {"app": {"current": "1.2.0"}}}, version=3)
        assert up.version == 4
        assert docs.get(timeout=10).current.version == 4
        # Desired equal to reported: accepted, but no delta (nor for the reported update above).
        assert (
            cli(
                c, "shadows", "update", thing, SHADOW, "--desired", '{"targets": {"app": {"current": "1.2.0"}}}'
            ).returncode
            == 0
        )
        assert docs.get(timeout=10).current.version == 5  # the update went through ...
        with pytest.raises(queue.Empty):
            deltas.get(timeout=1.0)  # ... and no delta was published
    finally:
        dev.stop()


def test_delta_only_when_desired_differs_and_delete(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0001")
    thing = "gw-SN-0001"
    try:
        sc = shadow_client(dev)
        report(sc, thing, {"mode": "eco", "level": 3})
        deltas = open_stream(
            sc.create_named_shadow_delta_updated_stream,
            iotshadow.NamedShadowDeltaUpdatedSubscriptionRequest(thing_name=thing, shadow_name=SHADOW),
        )
        assert cli(c, "shadows", "update", thing, SHADOW, "--desired", '{"mode": "eco"}').returncode == 0
        assert cli(c, "shadows", "update", thing, SHADOW, "--desired", '{"level": 4}').returncode == 0
        ev = deltas.get(timeout=10)
        assert ev.state == {"level": 4} and ev.version == 3  # none for version 2: desired matched reported
        report(sc, thing, {"level": 4})
        got = sc.get_named_shadow(iotshadow.GetNamedShadowRequest(thing_name=thing, shadow_name=SHADOW)).result(15)
        assert got.version == 4 and got.state.delta is None and got.state.desired == {"mode": "eco", "level": 4}
        with pytest.raises(queue.Empty):
            deltas.get(timeout=1.0)

        gone = sc.delete_named_shadow(iotshadow.DeleteNamedShadowRequest(thing_name=thing, shadow_name=SHADOW)).result(
            15
        )
        assert gone.version == 4
        with pytest.raises(V2ServiceException) as e:
            sc.get_named_shadow(iotshadow.GetNamedShadowRequest(thing_name=thing, shadow_name=SHADOW)).result(15)
        assert (e.value.modeled_error.code, e.value.modeled_error.message) == (
            404,
            "No shadow exists with name: 'inventory'",
        )
        with pytest.raises(V2ServiceException) as e:
            sc.delete_named_shadow(iotshadow.DeleteNamedShadowRequest(thing_name=thing, shadow_name=SHADOW)).result(15)
        assert e.value.modeled_error.code == 404
        r = cli(c, "shadows", "get", thing, SHADOW)
        assert r.returncode == 2 and "404" in r.stderr
        # Recreated within 48 hours: the version continues from the deleted one, the old state is gone.
        up = report(sc, thing, {"fresh": True})
        assert up.version == 5
        shown = json.loads(cli(c, "shadows", "get", thing, SHADOW).stdout)
        assert shown["version"] == 5 and shown["state"] == {"reported": {"fresh": True}}
    finally:
        dev.stop()


def raw(dev: Client, topic: str, payload: bytes | dict) -> tuple[str, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    assert dev.publish(topic, body) in (0, 16)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        t, p = dev.messages.get(timeout=10)
        if t in (topic + "/accepted", topic + "/rejected"):
            return t.rsplit("/", 1)[1], json.loads(p)
    raise TimeoutError(topic)


def test_hostile_payloads_are_rejected_in_aws_shape(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0002")
    thing = "gw-SN-0002"
    base = f"$aws/things/{thing}/shadow/name/{SHADOW}"
    try:
        for op in ("get", "update", "delete"):
            dev.subscribe(f"{base}/{op}/accepted")
            dev.subscribe(f"{base}/{op}/rejected")

        def rejected(payload, code: int, message: str, op: str = "update") -> None:
            kind, doc = raw(dev, f"{base}/{op}", payload)
            assert (kind, doc["code"], doc["message"]) == ("rejected", code, message), doc
            assert isinstance(doc["timestamp"], int)

        rejected(b"{not json", 400, "Invalid JSON")
        rejected(b"", 400, "Invalid JSON")
        rejected(b"[1, 2]", 400, "Invalid JSON")
        rejected(b'{"state": {"reported": {"x": NaN}}}', 400, "Invalid JSON")
        rejected(b"[" * 5000 + b"]" * 5000, 400, "Invalid JSON")
        rejected(b"\xff\xfe", 415, "Unsupported documented encoding; supported encoding is UTF-8")
        rejected({"clientToken": "t"}, 400, "Missing required node: state")
        rejected({"state": [1]}, 400, "State node must be an object")
        rejected({"state": {"reported": "x"}}, 400, "Reported node must be an object")
        rejected({"state": {"desired": 1}}, 400, "Desired node must be an object")
        rejected({"state": {"delta": {"x": 1}}}, 400, "State contains an invalid node")
        rejected({"state": {"reported": {"x": 1}}, "version": "1"}, 400, "Invalid version")
        rejected({"state": {"reported": {"x": 1}}, "clientToken": "t" * 65}, 400, "Invalid clientToken")
        deep: dict = {"x": 1}
        for _ in range(6):
            deep = {"d": deep}
        rejected({"state": {"reported": deep}}, 400, "JSON contains too many levels of nesting; maximum is 6")
        rejected({"state": {"reported": {"blob": "x" * 9000}}}, 413, "The payload exceeds the maximum size allowed")
        rejected(
            b'{"state": {"reported": {"a": "' + b"x" * 70000 + b'"}}}',
            413,
            "The payload exceeds the maximum size allowed",
        )
        rejected(b"", 404, "No shadow exists with name: 'inventory'", op="get")
        # The error echoes a valid client token, as the SDK's correlation needs.
        kind, doc = raw(dev, f"{base}/update", {"state": {"reported": 5}, "clientToken": "tok-1"})
        assert (kind, doc["code"], doc["clientToken"]) == ("rejected", 400, "tok-1")

        # Nothing above created the shadow; a valid update still works and 8 KB in total is the limit.
        kind, doc = raw(dev, f"{base}/update", {"state": {"reported": {"blob": "x" * 7000}}, "clientToken": "ok"})
        assert (kind, doc["version"], doc["clientToken"]) == ("accepted", 1, "ok")
        rejected({"state": {"reported": {"more": "y" * 1500}}}, 413, "The payload exceeds the maximum size allowed")
        kind, doc = raw(dev, f"{base}/update", {"state": {"reported": {"blob": None, "more": "y" * 1500}}})
        assert (kind, doc["version"]) == ("accepted", 2)
        kind, doc = raw(dev, f"{base}/get", b"")
        assert kind == "accepted" and doc["state"] == {"reported": {"more": "y" * 1500}} and doc["version"] == 2
        # A get with a non-object body is refused; with an empty one it is not.
        rejected(b'"x"', 400, "Invalid JSON", op="get")

        # The classic (unnamed) shadow lives on its own topics and is not the named one.
        classic = f"$aws/things/{thing}/shadow"
        dev.subscribe(f"{classic}/get/+")
        dev.subscribe(f"{classic}/update/+")
        kind, doc = raw(dev, f"{classic}/get", b"")
        assert (kind, doc["code"], doc["message"]) == ("rejected", 404, f"No shadow exists with name: '{thing}'")
        kind, doc = raw(dev, f"{classic}/update", {"state": {"reported": {"k": 1}}})
        assert (kind, doc["version"]) == ("accepted", 1)
        assert json.loads(cli(c, "shadows", "get", thing).stdout)["state"] == {"reported": {"k": 1}}
        assert json.loads(cli(c, "shadows", "get", thing, SHADOW).stdout)["version"] == 2
    finally:
        dev.stop()


def test_another_things_shadow_is_out_of_reach(cloud, tmp_path):
    c, info = cloud
    a, _ = provision_device(c, info, tmp_path, "SN-0001")
    b, _ = provision_device(c, info, tmp_path, "SN-0002")
    victim = f"$aws/things/gw-SN-0001/shadow/name/{SHADOW}"
    try:
        report(shadow_client(a), "gw-SN-0001", {"secret": "a's"})
        b.subscribe(f"{victim}/#")  # mosquitto grants the SUBACK, but read is denied: nothing is delivered
        b.subscribe("$aws/things/gw-SN-0001/shadow/#")
        assert b.publish(f"{victim}/update", json.dumps({"state": {"desired": {"secret": "b's"}}})) == 135
        assert b.publish(f"{victim}/get", b"") == 135
        assert b.publish(f"{victim}/delete", b"") == 135
        assert b.publish("$aws/things/gw-SN-0001/shadow/update", b'{"state": {"reported": {"x": 1}}}') == 135
        # The SDK, pointed at another thing, gets nothing back.
        with pytest.raises(V2ServiceException):
            shadow_client(b).get_named_shadow(
                iotshadow.GetNamedShadowRequest(thing_name="gw-SN-0001", shadow_name=SHADOW)
            ).result(15)
        # A's own traffic never reaches B.
        report(shadow_client(a), "gw-SN-0001", {"secret": "still a's"})
        assert not [m for m in b.received(1.0) if "gw-SN-0001" in m[0]]
        shown = json.loads(cli(c, "shadows", "get", "gw-SN-0001", SHADOW).stdout)
        assert shown["version"] == 2 and shown["state"] == {"reported": {"secret": "still a's"}}
    finally:
        a.stop()
        b.stop()


def test_fleet_query_and_job_fan_out(cloud, tmp_path):
    c, info = cloud
    versions = {"SN-0001": "1.1.0", "SN-0002": "1.10.0", "SN-0003": "1.2.0-rc1", "SN-0004": "1.2.0"}
    devices = {}
    try:
        for serial, v in versions.items():
            dev, _ = provision_device(c, info, tmp_path, serial)
            devices[serial] = dev
            report(shadow_client(dev), f"gw-{serial}", {"targets": {"app": {"current": v}}})
        # SN-0005 has an inventory shadow that does not say which version it runs: never selected.
        dev, _ = provision_device(c, info, tmp_path, "SN-0005")
        devices["SN-0005"] = dev
        report(shadow_client(dev), "gw-SN-0005", {"targets": {"os": {"current": "6.1"}}})

        def query(where: str) -> list[str]:
            r = cli(c, "things", "query", "--shadow", SHADOW, "--where", where)
            assert r.returncode == 0, r.stderr
            return r.stdout.split()

        # "1.10.0" < "1.2.0" as text, but not as a version; a pre-release is below its release.
        assert query("reported.targets.app.current<1.2.0") == ["gw-SN-0001", "gw-SN-0003"]
        assert query("reported.targets.app.current>=1.2") == ["gw-SN-0002", "gw-SN-0004"]
        assert query("reported.targets.app.current==1.2") == ["gw-SN-0004"]
        assert query("reported.targets.app.current!=1.2.0") == ["gw-SN-0001", "gw-SN-0002", "gw-SN-0003"]
        assert query("reported.targets.app.current exists") == ["gw-SN-0001", "gw-SN-0002", "gw-SN-0003", "gw-SN-0004"]
        assert query("reported.targets exists") == [f"gw-SN-000{i}" for i in range(1, 6)]
        assert query("desired.targets.app.current exists") == []
        assert cli(c, "things", "query", "--shadow", SHADOW, "--where", "nonsense").returncode == 2

        job = tmp_path / "job.json"
        job.write_text(json.dumps({"operation": "update", "version": "1.2.0"}))
        r = cli(
            c,
            "jobs",
            "create",
            "--query",
            "reported.targets.app.current<1.2.0",
            "--shadow",
            SHADOW,
            "--document",
            str(job),
            "--job-id",
            "app-1_2_0",
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["app-1_2_0\tgw-SN-0001", "app-1_2_0\tgw-SN-0003"]
        # Each selected device sees the job through the SDK's jobs client; the others see nothing.
        for serial in versions:
            jc = iotjobs.IotJobsClientV2(
                devices[serial].mqtt,
                rr.ClientOptions(
                    max_request_response_subscriptions=4, max_streaming_subscriptions=2, operation_timeout_in_seconds=10
                ),
            )
            pending = jc.get_pending_job_executions(
                iotjobs.GetPendingJobExecutionsRequest(thing_name=f"gw-{serial}")
            ).result(15)
            ids = [j.job_id for j in pending.queued_jobs or []]
            assert ids == (["app-1_2_0"] if serial in ("SN-0001", "SN-0003") else []), serial
        listing = cli(c, "jobs", "list").stdout.splitlines()
        assert [line.split("\t")[:3] for line in listing] == [
            ["app-1_2_0", "gw-SN-0001", "QUEUED"],
            ["app-1_2_0", "gw-SN-0003", "QUEUED"],
        ]
        # No match: nothing is created.
        r = cli(
            c,
            "jobs",
            "create",
            "--query",
            "reported.targets.app.current<1.0",
            "--shadow",
            SHADOW,
            "--document",
            str(job),
            "--job-id",
            "none",
        )
        assert r.returncode == 2 and "no thing matches" in r.stderr
        assert cli(c, "jobs", "describe", "none", "--thing", "gw-SN-0001").returncode == 2
    finally:
        for d in devices.values():
            d.stop()


def test_reserved_package_shadow(cloud, tmp_path):
    """`$package`, the Software Package Catalog's reserved named shadow: the only name with a `$` that is
    allowed, reachable by the device (SDK and raw MQTT), the operator CLI and the fleet query, and its
    reported state must map packages to objects with a string version."""
    c, info = cloud
    a, _ = provision_device(c, info, tmp_path, "SN-0001")
    b, _ = provision_device(c, info, tmp_path, "SN-0002")
    base = "$aws/things/gw-SN-0001/shadow/name/$package"
    try:
        sc = shadow_client(a)
        sc.update_named_shadow(
            iotshadow.UpdateNamedShadowRequest(
                thing_name="gw-SN-0001",
                shadow_name="$package",
                state=iotshadow.ShadowState(
                    reported={
                        "app": {"version": "1.1.0", "attributes": {"channel": "stable"}},
                        "os": {"version": "6.1"},
                    }
                ),
            )
        ).result(15)
        got = sc.get_named_shadow(
            iotshadow.GetNamedShadowRequest(thing_name="gw-SN-0001", shadow_name="$package")
        ).result(15)
        assert got.state.reported["app"] == {"version": "1.1.0", "attributes": {"channel": "stable"}}
        report_b = {"state": {"reported": {"app": {"version": "1.10.0"}}}}
        b.subscribe("$aws/things/gw-SN-0002/shadow/name/$package/update/+")
        assert b.publish("$aws/things/gw-SN-0002/shadow/name/$package/update", json.dumps(report_b)) in (0, 16)
        assert json.loads(b.expect("$aws/things/gw-SN-0002/shadow/name/$package/update/accepted"))["version"] == 1

        # A partial update merges into an entry that keeps its version; one that leaves no version is refused.
        a.subscribe(f"{base}/update/+")
        a.received(0.3)  # the SDK's own replies, already seen
        a.publish(f"{base}/update", json.dumps({"state": {"reported": {"app": {"attributes": {"channel": "beta"}}}}}))
        assert json.loads(a.expect(f"{base}/update/accepted"))["version"] == 2
        for bad in (
            {"fw": "1.0.0"},
            {"fw": {"attributes": {"a": "b"}}},
            {"fw": {"version": 2}},
            {"fw": {"version": ""}},
            {"fw": {"version": "1", "attributes": "x"}},
            {"app": {"version": None}},
        ):
            a.publish(f"{base}/update", json.dumps({"state": {"reported": bad}}))
            rej = json.loads(a.expect(f"{base}/update/rejected"))
            assert rej["code"] == 400 and rej["message"].startswith("Invalid $package shadow: reported."), rej
        # Other names with a `$` stay refused.
        a.subscribe("$aws/things/gw-SN-0001/shadow/name/$other/get/rejected")
        a.publish("$aws/things/gw-SN-0001/shadow/name/$other/get", b"")
        assert json.loads(a.expect("$aws/things/gw-SN-0001/shadow/name/$other/get/rejected"))["code"] == 400

        shown = json.loads(cli(c, "shadows", "get", "gw-SN-0001", "$package").stdout)
        assert shown["version"] == 2
        assert shown["state"]["reported"] == {
            "app": {"version": "1.1.0", "attributes": {"channel": "beta"}},
            "os": {"version": "6.1"},
        }
        r = cli(c, "things", "query", "--shadow", "$package", "--where", "reported.app.version<1.2.0")
        assert r.returncode == 0 and r.stdout.split() == ["gw-SN-0001"], r.stderr
        r = cli(c, "things", "query", "--shadow", "$package", "--where", "reported.app.version>=1.10.0")
        assert r.stdout.split() == ["gw-SN-0002"]
        assert "$package" in cli(c, "shadows", "list", "--thing", "gw-SN-0001").stdout
        r = cli(c, "shadows", "update", "gw-SN-0001", "$package", "--desired", '{"app": {"version": "1.2.0"}}')
        assert r.returncode == 0, r.stderr
        assert cli(c, "shadows", "update", "gw-SN-0001", "$pkg", "--desired", "{}").returncode == 2
    finally:
        a.stop()
        b.stop()


def test_compare_and_parse_where():
    assert compare("1.10.0", ">", "1.9.9") and compare("1.2", "==", "1.2.0") and compare("v2.0.0", ">", "1.99")
    assert compare("1.2.0-rc.2", ">", "1.2.0-rc.1") and compare("1.2.0-rc.1", "<", "1.2.0")
    assert compare("1.2.0-alpha", "<", "1.2.0-beta") and compare("1.2.0-2", "<", "1.2.0-alpha")
    assert compare(3, ">", 2.5) and compare("1.10", ">", 1.2) and not compare(True, "==", 1)
    assert compare({"a": [1]}, "==", {"a": [1]}) and not compare({"a": 1}, "<", {"a": 2})
    assert not compare(None, "<", "1.0") and compare("abc", "<", "abd")
    assert parse_where("reported.a.b <= 1.2.0") == ("reported.a.b", "<=", "1.2.0")
    assert parse_where("reported.a=true") == ("reported.a", "==", True)
    assert parse_where('desired.mode != "eco"') == ("desired.mode", "!=", "eco")
    assert parse_where("reported.a exists") == ("reported.a", "exists", None)
    with pytest.raises(ValueError):
        parse_where("reported.a")
    import sqlite3
    import threading

    with pytest.raises(ValueError):
        Shadows(sqlite3.connect(":memory:"), threading.RLock()).things_matching("inventory", "state.x", "==", 1)


def test_concurrent_writers_never_share_a_version(cloud, tmp_path):
    """The CLI (another process) and the service write the same SQLite file: each update gets its own version."""
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0003")
    thing = "gw-SN-0003"
    try:
        sc = shadow_client(dev)
        report(sc, thing, {"n": 0})
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "localcloud",
                    "--dir",
                    str(c.directory),
                    "shadows",
                    "update",
                    thing,
                    SHADOW,
                    "--desired",
                    json.dumps({f"k{i}": i}),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(6)
        ]
        device_versions = [report(sc, thing, {"n": i}).version for i in range(1, 7)]
        cli_versions = [int(p.communicate(timeout=30)[0].split()[1]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert sorted(device_versions + cli_versions) == list(range(2, 14))
        shown = json.loads(cli(c, "shadows", "get", thing, SHADOW).stdout)
        assert shown["version"] == 13 and shown["state"]["desired"] == {f"k{i}": i for i in range(6)}
        assert shown["state"]["reported"] == {"n": 6}
    finally:
        dev.stop()


def test_fuzzed_requests_get_exactly_one_aws_shaped_reply(cloud, tmp_path):
    """Generated hostile payloads through the real broker: one reply each, never a 500, the service survives."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0004")
    thing = "gw-SN-0004"
    prefixes = [f"$aws/things/{thing}/shadow", f"$aws/things/{thing}/shadow/name/fz"]
    for p in prefixes:
        dev.subscribe(f"{p}/+/accepted")
        dev.subscribe(f"{p}/+/rejected")
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    )
    values = st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
        max_leaves=15,
    )
    section = st.one_of(st.none(), values, st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=3))
    shaped = st.fixed_dictionaries(
        {},
        optional={
            "state": st.one_of(
                values, st.fixed_dictionaries({}, optional={"desired": section, "reported": section, "delta": values})
            ),
            "version": st.one_of(st.integers(-1, 40), values),
            "clientToken": st.one_of(st.text(max_size=70), values),
        },
    )
    payloads = st.one_of(
        st.binary(max_size=80),
        values.map(lambda v: json.dumps(v).encode()),
        shaped.map(lambda v: json.dumps(v).encode()),
        st.integers(1, 12000).map(lambda n: json.dumps({"state": {"reported": {"x": "y" * n}}}).encode()),
    )
    stats = {"accepted": 0, "rejected": 0}
    versions = {p: 0 for p in prefixes}

    @settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(prefixes), st.sampled_from(["get", "update", "update", "update", "delete"]), payloads)
    def one(pfx, op, payload):
        topic = f"{pfx}/{op}"
        assert dev.publish(topic, payload) in (0, 16)
        reply_topic, body = dev.messages.get(timeout=10)
        assert reply_topic in (topic + "/accepted", topic + "/rejected"), (reply_topic, topic)
        doc = json.loads(body)
        if reply_topic.endswith("/rejected"):
            stats["rejected"] += 1
            assert set(doc) - {"clientToken"} == {"code", "message", "timestamp"}, doc
            assert doc["code"] in (400, 404, 409, 413, 415), doc
        else:
            stats["accepted"] += 1
            if op == "update":
                assert doc["version"] > versions[pfx]
                versions[pfx] = doc["version"]
        assert dev.received(0.02) == []  # exactly one reply

    try:
        one()
        assert stats["accepted"] >= 40 and stats["rejected"] >= 150, stats
        assert c.running() and "Traceback" not in (c.directory / "service.log").read_text()
        sc = shadow_client(dev)
        up = report(sc, thing, {"after": "fuzz"})
        assert up.version >= 1
        print("fuzz:", stats, versions)
        shadows = Shadows(c.registry.db, c.registry.lock)
        for t, name, _version in shadows.list(thing):
            state = shadows.get(t, name)["state"]
            state.pop("delta", None)
            assert len(json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode()) <= 8 * 1024
    finally:
        dev.stop()


def test_an_internal_failure_is_answered_with_aws_words():
    """500 "Internal service failure", word for word as AWS's Device Shadow error messages have it."""
    import sqlite3
    import threading

    s = Shadows(sqlite3.connect(":memory:"), threading.RLock(), now=lambda: 1000.0)

    def broken(*_a, **_k):
        raise ZeroDivisionError

    s.get = broken
    [(topic, doc)] = s.request("t1", "", "get", b'{"clientToken":"tk"}')
    assert topic == "$aws/things/t1/shadow/get/rejected"
    assert doc == {"code": 500, "message": "Internal service failure", "timestamp": 1000, "clientToken": "tk"}
