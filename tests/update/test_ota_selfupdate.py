"""The agent updates itself: iot-agent-launch starts the release in `current`, a new release must
reconnect and confirm before its deadline, and one that cannot connect is rolled back by the
launcher without its own help. (A power cut at every step of a self-update: tests/update/test_sweep_updates.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cloudkit import wait_status
from otakit import World, tar_dir

from agent.update.install import slot
from agent.update.release import read_trial

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 25.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(
        tmp_path_factory.mktemp("otaself"),
        "OTAS",
        {"agent": {"directory": "agent-release", "self_update": True}},
        ota={"self_update_deadline_s": DEADLINE_S},
    )
    w.target = w.root / "device" / "agent-release"
    yield w
    w.close()


def launcher(world, agents, env=None):
    return agents(
        world.dev, env=env, cmd=[sys.executable, "-m", "agent.launch", "--config", str(world.dev.config_path)]
    )


def agent_release(world, job_id: str, version: str, patch=None) -> None:
    data = tar_dir(REPO / "agent", "agent", version, patch)
    world.jobs.create(job_id, world.thing, world.signed("agent", version, "agent.tar", data))


def test_self_update_confirms_and_a_release_that_cannot_connect_rolls_back(world, agents):
    a = launcher(world, agents)
    a.wait_for(r"starting the agent from the base installation")
    a.wait_for(rf"connected to localhost:\d+ as {world.thing}", timeout=90)

    agent_release(world, "self-2", "2.0.0")
    ex = wait_status(world.jobs, "self-2", world.thing, "SUCCEEDED", timeout=90)
    assert ex["statusDetails"]["version"] == "2.0.0"
    i = a.wait_for(r"starting the agent from release 2\.0\.0")
    a.wait_for(rf"connected to localhost:\d+ as {world.thing}", after=i)
    assert slot(world.target, "current") == "2.0.0" and read_trial(world.target) is None

    # 3.0.0 uses the wrong MQTT client ID: the broker refuses it, so it can never confirm.
    agent_release(
        world,
        "self-3",
        "3.0.0",
        {
            "runtime/daemon.py": (
                "cfg, identity.thing_name, identity.certificate_file",
                "cfg, identity.thing_name + '-x', identity.certificate_file",
            )
        },
    )
    ex = wait_status(world.jobs, "self-3", world.thing, "FAILED", timeout=DEADLINE_S + 90)
    reason = ex["statusDetails"]["reason"]
    assert "rolled back to 2.0.0" in reason and "did not confirm within the deadline" in reason, reason
    j = a.wait_for(r"starting the agent from release 3\.0\.0")
    k = a.wait_for(r"release 3\.0\.0 rolled back to 2\.0\.0", after=j, timeout=5)
    a.wait_for(r"starting the agent from release 2\.0\.0", after=k, timeout=5)
    assert slot(world.target, "current") == "2.0.0" and slot(world.target, "broken") == "3.0.0"
    assert read_trial(world.target) is None
    # The broken release is never tried again.
    agent_release(world, "self-3-again", "3.0.0")
    ex = wait_status(world.jobs, "self-3-again", world.thing, "REJECTED", timeout=60)
    assert "failed on this device before" in ex["statusDetails"]["reason"]
    assert a.stop() == 0
