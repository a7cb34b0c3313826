"""The agent's jobs engine against the local cloud, with AWS's IotJobsClientV2 underneath."""

from __future__ import annotations

import threading
import time

import pytest
from cloudkit import provision_device, session_conn, wait_status

from agent.jobs.engine import JobsEngine, Outcome
from localcloud.cloud import LocalCloud
from localcloud.jobs import Jobs


@pytest.fixture
def world(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-J1"])
    info = c.up()
    dev, _ = provision_device(c, info, tmp_path, "SN-J1")
    yield c, info, dev
    dev.stop()
    c.down()


def engine_for(dev, state: dict, handlers) -> JobsEngine:
    conn = session_conn(dev)
    return JobsEngine(
        "gw-SN-J1",
        conn,
        load_state=lambda: dict(state),
        save_state=lambda d: (state.clear(), state.update(d)),
        handlers=handlers,
    )


def test_jobs_run_one_at_a_time_with_progress_and_reasons(world):
    c, info, dev = world
    jobs = Jobs(c.registry.db, c.registry.lock)
    order = []

    def ok(job_id, doc, progress):
        order.append(doc["n"])
        progress({"progress": "50%"})
        return Outcome("SUCCEEDED", {"result": f"did {doc['n']}"})

    def boom(job_id, doc, progress):
        raise RuntimeError("disk on fire")

    jobs.create("a", "gw-SN-J1", {"operation": "ok", "n": 1})
    jobs.create("b", "gw-SN-J1", {"operation": "teleport"})
    jobs.create("c", "gw-SN-J1", {"operation": "boom"})
    jobs.create("d", "gw-SN-J1", {"no": "operation"})
    state: dict = {}
    eng = engine_for(dev, state, {"ok": ok, "boom": boom})
    eng.start()
    eng.on_connected()
    try:
        a = wait_status(jobs, "a", "gw-SN-J1", "SUCCEEDED")
        assert a["statusDetails"] == {"agent": "started", "progress": "50%", "result": "did 1"}
        b = wait_status(jobs, "b", "gw-SN-J1", "REJECTED")
        assert b["statusDetails"]["reason"] == "unsupported operation 'teleport'"
        c_ = wait_status(jobs, "c", "gw-SN-J1", "FAILED")
        assert c_["statusDetails"]["reason"] == "RuntimeError: disk on fire"
        d = wait_status(jobs, "d", "gw-SN-J1", "REJECTED")
        assert "no operation" in d["statusDetails"]["reason"]
        # A job queued later is picked up through notify-next, without a reconnect.
        jobs.create("e", "gw-SN-J1", {"operation": "ok", "n": 2})
        wait_status(jobs, "e", "gw-SN-J1", "SUCCEEDED")
        # The cloud has the status; the engine drops its outbox entry when the answer reaches it (bounded wait).
        deadline = time.monotonic() + 10
        while state["outbox"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert order == [1, 2] and state["outbox"] == []
    finally:
        eng.stop()


def test_status_survives_a_broker_restart_and_an_agent_restart(world):
    c, info, dev = world
    jobs = Jobs(c.registry.db, c.registry.lock)
    release = threading.Event()

    def slow(job_id, doc, progress):
        release.wait(60)
        return Outcome("SUCCEEDED", {"result": "installed"})

    jobs.create("slow", "gw-SN-J1", {"operation": "slow"})
    state: dict = {}
    eng = engine_for(dev, state, {"slow": slow})
    eng.start()
    eng.on_connected()
    try:
        wait_status(jobs, "slow", "gw-SN-J1", "IN_PROGRESS")
        c.down()  # the broker goes away while the job runs
        release.set()
        deadline = time.monotonic() + 30
        while not state.get("outbox") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state["outbox"][-1]["status"] == "SUCCEEDED"  # persisted, not lost
    finally:
        eng.stop()
    # The agent restarts (a new engine on the same state) and the broker comes back.
    c.up()
    assert dev.connected.wait(30)
    time.sleep(1.0)
    eng2 = engine_for(dev, state, {})
    eng2.start()
    eng2.on_connected()
    try:
        ex = wait_status(jobs, "slow", "gw-SN-J1", "SUCCEEDED")
        assert ex["statusDetails"]["result"] == "installed" and ex["versionNumber"] == 3  # delivered exactly once
        deadline = time.monotonic() + 10
        while state.get("outbox") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state["outbox"] == []
    finally:
        eng2.stop()


def test_the_daemon_rejects_operations_it_does_not_perform(world, softhsm, agents, tmp_path):
    from localcloud.bench import fresh_device
    from localcloud.ntp import Chrony

    c, info, dev = world
    c.registry.allow_serials(["SN-J2"])
    ntp = Chrony(tmp_path / "chrony").start()
    try:
        d = fresh_device(c, softhsm, "SN-J2", tmp_path / "agentdev", [ntp.server])
        jobs = Jobs(c.registry.db, c.registry.lock)
        jobs.create("ota-1", "gw-SN-J2", {"afr_ota": {"protocols": ["MQTT"], "files": []}})
        a = agents(d)
        a.wait_for(r"connected to localhost:\d+ as gw-SN-J2", timeout=60)
        ex = wait_status(jobs, "ota-1", "gw-SN-J2", "REJECTED")
        assert ex["statusDetails"]["reason"] == "unsupported operation 'ota-update'"
        a.wait_for(r"job ota-1: REJECTED", timeout=10)
    finally:
        ntp.stop()
