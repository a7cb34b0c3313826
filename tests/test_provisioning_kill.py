"""Power loss during provisioning: SIGKILL at every fail point, then restart, on SoftHSM and swtpm.

Every scenario must end with the device connected as its own thing, exactly one thing and one
ACTIVE device certificate for it in the cloud, the certificate matching the key on the token,
and no private key anywhere on disk.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony

FAIL_POINTS = [
    "provisioning.before_keygen",
    "provisioning.after_keygen",
    "provisioning.after_csr",
    "provisioning.after_claim_connect",
    "provisioning.before_create_certificate",
    "provisioning.after_create_certificate",
    "provisioning.after_certificate_saved",
    "provisioning.before_register",
    "provisioning.after_register",
    "provisioning.after_registered_saved",
    "provisioning.after_claim_disconnect",
    "provisioning.after_commit",
]


def test_every_fail_point_is_declared_in_the_code():
    src = (Path(__file__).resolve().parent.parent / "agent" / "provisioning.py").read_text()
    assert sorted(set(re.findall(r'failpoints\.hit\("([^"]+)"\)', src))) == sorted(FAIL_POINTS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    cloud = LocalCloud(d / "cloud")
    cloud.up()
    ntp = Chrony(d / "chrony").start()
    yield cloud, ntp
    ntp.stop()
    cloud.down()


@pytest.mark.parametrize("point", FAIL_POINTS)
def test_kill_at_fail_point_then_restart(world, token, agents, tmp_path, point):
    cloud, ntp = world
    serial = f"K{token.kind[:3]}{FAIL_POINTS.index(point):02d}"
    cloud.registry.allow_serials([serial])
    dev = fresh_device(cloud, token, serial, tmp_path / "device", [ntp.server])
    a = agents(dev, env={"IOT_AGENT_TEST_FAILPOINT": point})
    assert a.wait_exit(60) == -9, a.text()
    assert f"test fail point {point} reached" in a.text()
    if token.tpm:
        # A device's kernel resource manager (/dev/tpmrm0) flushes a dead process's objects; swtpm has none.
        token.tpm.tools("tpm2_flushcontext", "-t")
        token.tpm.tools("tpm2_flushcontext", "-s")
    thing = f"gw-{serial}"
    b = agents(dev)
    b.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=90)
    assert b.stop() == 0

    assert [n for n, _ in cloud.registry.things() if n == thing] == [thing]
    active = [c for c in cloud.registry.certificates() if c.thing == thing and c.status == "ACTIVE"]
    assert len(active) == 1
    status = json.loads(dev.cli("status", "--json").stdout)
    assert status["thing_name"] == thing and status["provisioning"]["step"] == "done"
    # The certificate in use is the ACTIVE one, and it is for the key on the token.
    cert_pem = open(status["certificate_file"]).read()
    assert cert_pem.strip() == active[0].pem.strip()
    keys = [l.split("\t")[0] for l in dev.cli("keys", "list").stdout.splitlines()]
    assert keys.count("device") == 1
    leaked = subprocess.run(["grep", "-rl", "PRIVATE KEY", str(dev.directory)], capture_output=True, text=True).stdout
    assert leaked == ""
