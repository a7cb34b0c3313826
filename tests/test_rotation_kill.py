"""Power loss during a certificate rotation: SIGKILL at every fail point, then a restart. The device
must come back connected as its thing (old or new identity, never neither) and end with exactly one
active certificate, which is the one it uses, and one device key on the token."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent.failpoints import ENV
from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony

FAIL_POINTS = [
    "rotation.before_keygen",
    "rotation.after_keygen",
    "rotation.after_create_certificate",
    "rotation.after_certificate_saved",
    "rotation.after_register",
    "rotation.after_switch_recorded",
    "rotation.after_commit_saved",
    "rotation.after_commit_sent",
    "rotation.after_old_key_deleted",
]


def test_every_fail_point_is_declared():
    src = (Path(__file__).resolve().parent.parent / "agent" / "rotation.py").read_text()
    assert sorted(set(re.findall(r'failpoints\.hit\("([^"]+)"\)', src))) == sorted(FAIL_POINTS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("rotkill")
    cloud = LocalCloud(d / "cloud")
    cloud.up()
    ntp = Chrony(d / "chrony").start()
    yield cloud, ntp
    ntp.stop()
    cloud.down()


@pytest.mark.parametrize("point", FAIL_POINTS)
def test_kill_at_fail_point_then_restart(world, token, agents, tmp_path, point):
    cloud, ntp = world
    serial = f"RK{token.kind[:3]}{FAIL_POINTS.index(point):02d}"
    cloud.registry.allow_serials([serial])
    thing = f"gw-{serial}"
    dev = fresh_device(cloud, token, serial, tmp_path / "device", [ntp.server], extra={"defender": {"enabled": False}})
    a = agents(dev)
    a.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=90)
    assert a.stop() == 0
    assert "agent is not running" in dev.cli("rotate").stdout
    b = agents(dev, env={ENV: point})
    assert b.wait_exit(90) == -9, b.text()[-3000:]
    assert f"test fail point {point} reached" in b.text()
    if token.tpm:
        token.tpm.tools("tpm2_flushcontext", "-t")
        token.tpm.tools("tpm2_flushcontext", "-s")
    c = agents(dev)
    c.wait_for(r"certificate rotation done", timeout=90)
    c.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=30)
    assert c.stop() == 0

    status = json.loads(dev.cli("status", "--json").stdout)
    active = [x for x in cloud.registry.certificates() if x.thing == thing and x.status == "ACTIVE"]
    assert len(active) == 1, [(x.id[:8], x.status) for x in cloud.registry.certificates() if x.thing == thing]
    assert open(status["certificate_file"]).read().strip() == active[0].pem.strip()
    keys = [l.split("\t")[0] for l in dev.cli("keys", "list").stdout.splitlines() if l.startswith("device")]
    assert keys == [status["key_label"]]
    assert status["rotation"]["step"] == "idle" and status["rotation"]["last"]["status"] == "SUCCEEDED"
