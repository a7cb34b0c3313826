"""Jobs on the local cloud, driven by AWS's own IotJobsClientV2 and by raw MQTT for the edge cases."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time

import awscrt.mqtt_request_response as rr
import pytest
from awsiot import ServiceStreamOptions, V2ServiceException, iotjobs
from cloudkit import Client, provision_device

from localcloud.cloud import LocalCloud
from localcloud.jobs import Jobs


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-0001", "SN-0002"])
    info = c.up()
    yield c, info
    c.down()


def jobs_cli(c, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localcloud", "--dir", str(c.directory), "jobs", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_sdk_jobs_client_receives_starts_and_completes_a_job(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0001")
    thing = "gw-SN-0001"
    try:
        jc = iotjobs.IotJobsClientV2(
            dev.mqtt,
            rr.ClientOptions(
                max_request_response_subscriptions=4, max_streaming_subscriptions=2, operation_timeout_in_seconds=15
            ),
        )
        events: queue.Queue = queue.Queue()
        subscribed: queue.Queue = queue.Queue()
        stream = jc.create_next_job_execution_changed_stream(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing),
            ServiceStreamOptions(incoming_event_listener=events.put, subscription_status_listener=subscribed.put),
        )
        stream.open()
        subscribed.get(timeout=10)
        doc = tmp_path / "job.json"
        doc.write_text(json.dumps({"operation": "reboot", "why": "test"}))
        r = jobs_cli(c, "create", "--thing", thing, "--document", str(doc), "--job-id", "job-1")
        assert r.returncode == 0, r.stderr
        ev = events.get(timeout=10)
        assert ev.execution.job_id == "job-1" and ev.execution.job_document == {"operation": "reboot", "why": "test"}

        started = jc.start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing, status_details={"step": "starting"})
        ).result(15)
        assert started.execution.job_id == "job-1"
        assert started.execution.status == "IN_PROGRESS" and started.execution.version_number == 2
        upd = jc.update_job_execution(
            iotjobs.UpdateJobExecutionRequest(
                thing_name=thing,
                job_id="job-1",
                status="SUCCEEDED",
                status_details={"result": "ok"},
                expected_version=2,
                include_job_execution_state=True,
            )
        ).result(15)
        assert upd.execution_state.status == "SUCCEEDED"
        assert upd.execution_state.status_details == {"step": "starting", "result": "ok"}
        # Nothing left: notify-next arrives without an execution.
        ev = events.get(timeout=10)
        assert ev.execution is None
        with pytest.raises(V2ServiceException) as e:
            jc.update_job_execution(
                iotjobs.UpdateJobExecutionRequest(thing_name=thing, job_id="job-1", status="FAILED")
            ).result(15)
        assert e.value.modeled_error.code == "InvalidStateTransition"
        del stream
    finally:
        dev.stop()
    listing = jobs_cli(c, "list").stdout
    assert listing.startswith("job-1\tgw-SN-0001\tSUCCEEDED\tv3\t")


def raw_request(dev: Client, topic: str, payload: dict | bytes) -> tuple[str, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    assert dev.publish(topic, body) in (0, 16)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        t, p = dev.messages.get(timeout=10)
        if t in (topic + "/accepted", topic + "/rejected"):
            return t.rsplit("/", 1)[1], json.loads(p)
    raise TimeoutError(topic)


def test_versions_errors_and_step_timeouts(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0002")
    thing = "gw-SN-0002"
    base = f"$aws/things/{thing}/jobs"
    try:
        dev.subscribe(f"{base}/#")
        jobs = Jobs(c.registry.db, c.registry.lock)
        jobs.create("j1", thing, {"a": 1})
        jobs.create("j2", thing, {"b": 2}, step_timeout_min=1)
        kind, doc = raw_request(dev, f"{base}/get", {"clientToken": "t1"})
        assert kind == "accepted" and doc["clientToken"] == "t1"
        assert [j["jobId"] for j in doc["queuedJobs"]] == ["j1", "j2"] and doc["inProgressJobs"] == []
        kind, doc = raw_request(dev, f"{base}/$next/get", {})
        assert doc["execution"]["jobId"] == "j1" and doc["execution"]["status"] == "QUEUED"
        kind, doc = raw_request(dev, f"{base}/j1/update", {"status": "IN_PROGRESS", "expectedVersion": 7})
        assert kind == "rejected" and doc["code"] == "VersionMismatch" and doc["executionState"]["versionNumber"] == 1
        kind, doc = raw_request(dev, f"{base}/j1/update", {"status": "QUEUED"})
        assert (kind, doc["code"]) == ("rejected", "InvalidRequest")
        kind, doc = raw_request(dev, f"{base}/nope/update", {"status": "SUCCEEDED"})
        assert (kind, doc["code"]) == ("rejected", "ResourceNotFound")
        kind, doc = raw_request(dev, f"{base}/j1/update", b"{not json")
        assert (kind, doc["code"]) == ("rejected", "InvalidJson")
        kind, doc = raw_request(dev, f"{base}/j1/update", {"status": "FAILED", "bogus": 1})
        assert (kind, doc["code"]) == ("rejected", "InvalidRequest") and "bogus" in doc["message"]
        kind, doc = raw_request(
            dev,
            f"{base}/j1/update",
            {"status": "REJECTED", "statusDetails": {"reason": "bad doc"}, "executionNumber": 1, "expectedVersion": 1},
        )
        assert kind == "accepted"
        # j2 has a 1-minute step timeout: start it, then move the cloud's clock past it.
        kind, doc = raw_request(dev, f"{base}/start-next", {"stepTimeoutInMinutes": 1})
        assert doc["execution"]["jobId"] == "j2" and doc["execution"]["status"] == "IN_PROGRESS"
        c.registry.db.execute("UPDATE executions SET step_deadline = 0 WHERE job_id = 'j2'")
        deadline = time.monotonic() + 10
        while jobs.execution("j2", thing)["status"] != "TIMED_OUT" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert jobs.execution("j2", thing)["status"] == "TIMED_OUT"
        kind, doc = raw_request(dev, f"{base}/j2/update", {"status": "SUCCEEDED"})
        assert (kind, doc["code"]) == ("rejected", "InvalidStateTransition") and doc["executionState"][
            "status"
        ] == "TIMED_OUT"
        kind, doc = raw_request(dev, f"{base}/start-next", {})
        assert kind == "accepted" and "execution" not in doc
    finally:
        dev.stop()


def test_jobs_survive_down_up_and_cancel(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    Jobs(c.registry.db, c.registry.lock).create("keep-me", "gw-x", {"k": 1})
    c.up()
    c.down()
    c2 = LocalCloud(tmp_path / "cloud")
    c2.up()
    try:
        r = jobs_cli(c2, "describe", "keep-me", "--thing", "gw-x")
        assert json.loads(r.stdout)["status"] == "QUEUED"
        assert jobs_cli(c2, "cancel", "keep-me").stdout.strip() == "canceled 1 execution(s)"
        assert "CANCELED" in jobs_cli(c2, "list").stdout
    finally:
        c2.down()
