"""Power loss during an update: SIGKILL at every fail point of download, verify and install, then a
restart. The device must end on exactly one good version (the new one, or the old one when the new
one is unhealthy), the job must reach a terminal state, and nothing may be left half-installed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent.failpoints import ENV
from agent.install import slot
from otakit import HEALTH, World, our_doc, release

INSTALL_POINTS = [
    "ota.after_accept",
    "ota.download_midway",
    "ota.after_download",
    "ota.after_verify",
    "ota.after_stage",
    "ota.after_activate",
    "ota.after_health",
]
SELF_TEST_POINTS = ["ota.before_restart", "ota.before_confirm"]  # in test_ota_selfupdate.py


def test_every_fail_point_is_declared():
    src = (Path(__file__).resolve().parent.parent / "agent" / "ota.py").read_text()
    assert sorted(set(re.findall(r'failpoints\.hit\("([^"]+)"\)', src))) == sorted(INSTALL_POINTS + SELF_TEST_POINTS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("otakill"), "OTAK", {
        "app": {"directory": "app", "health_command": HEALTH, "health_timeout_s": 10.0}})
    yield w
    w.close()


CASES = [(p, "https", True) for p in INSTALL_POINTS] + [
    ("ota.download_midway", "stream", True),
    ("ota.after_activate", "https", False),  # an unhealthy release: the rollback itself survives the kill
    ("ota.after_health", "stream", True),
]


@pytest.mark.parametrize("point,via,healthy", CASES, ids=[f"{p}-{v}-{'good' if h else 'unhealthy'}" for p, v, h in CASES])
def test_kill_then_restart(world, agents, point, via, healthy):
    i = CASES.index((point, via, healthy))
    version = f"3.{i + 1}.0"
    before = slot(world.app, "current")
    data = release(version, None if healthy else "unhealthy\n") + os.urandom(1_000_000)
    src = world.https(data) if via == "https" else None
    stream = None if src else (world.stream(data), 0)
    world.jobs.create(f"kill-{i}", world.thing, our_doc("app", version, "app.tar", data, world.signer.sign(data),
                                                        url=src, stream=stream))
    a = agents(world.dev, env={ENV: point})
    assert a.wait_exit(90) == -9, a.text()[-3000:]
    assert f"test fail point {point} reached" in a.text()
    b = agents(world.dev)
    from test_jobs_engine import wait_status

    ex = wait_status(world.jobs, f"kill-{i}", world.thing, "SUCCEEDED" if healthy else "FAILED", timeout=90)
    assert b.stop() == 0
    if healthy:
        assert ex["statusDetails"]["version"] == version
        world.assert_clean(version)
        assert slot(world.app, "previous") == before
        assert (world.app / "current" / "app.txt").read_text() == f"app {version}\n"
    else:
        assert "health check exited 1" in ex["statusDetails"]["reason"]
        world.assert_clean(before)
        assert slot(world.app, "broken") == version
