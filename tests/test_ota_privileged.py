"""The privileged install step: the agent hands a verified artifact to iot-agent-install, which trusts
nothing the agent wrote. The test plays the systemd path unit: it runs the helper when a request
appears in the spool (issue 8 wires the real unit)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent import privileged
from agent.install import slot
from otakit import CodeSigner, World, make_tar, our_doc, release

REPO = Path(__file__).resolve().parent.parent


def helper_config(path: Path, cert: Path, spool: Path, fw: Path) -> Path:
    path.write_text(f'code_signing_certificate = "{cert}"\nspool = "{spool}"\n'
                    f'[targets.fw]\ndirectory = "{fw}"\n'
                    'health_command = ["sh", "-c", "test -f app.txt && ! grep -q unhealthy app.txt"]\n')
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("otapriv"), "OTAP", {"fw": {"directory": "fw", "privileged": True}},
              ota={"privileged_timeout_s": 30.0})
    w.fw = w.root / "device" / "fw"
    w.spool = w.dev.directory / "state" / "ota" / "spool"
    w.helper_cfg = helper_config(w.root / "install.toml", w.signer.cert_path, w.spool, w.fw)
    yield w
    w.close()


@pytest.fixture
def path_unit(world):
    """Runs the helper whenever a request is waiting; `before` may tamper with the spool first."""
    stop = threading.Event()
    hooks: dict = {"before": None, "runs": 0}

    def loop():
        while not stop.wait(0.2):
            if world.spool.is_dir() and list(world.spool.glob("*.request.json")):
                if hooks["before"]:
                    hooks["before"](world.spool)
                subprocess.run([sys.executable, "-m", "agent.privileged", "--config", str(world.helper_cfg)],
                               cwd=REPO, check=True, timeout=60)
                hooks["runs"] += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield hooks
    stop.set()
    t.join(5)


@pytest.fixture(scope="module")
def agent(world):
    from conftest import AgentProcess

    a = AgentProcess(world.dev).start()
    a.wait_for(rf"connected to localhost:\d+ as {world.thing}", timeout=90)
    yield a
    assert a.stop() == 0


def doc_for(world, version: str, data: bytes, signer=None) -> dict:
    return our_doc("fw", version, "fw.tar", data, (signer or world.signer).sign(data), url=world.https(data))


def test_helper_installs_what_the_agent_verified(world, agent, path_unit):
    data = release("1.0.0")
    ex = world.run("priv-1", doc_for(world, "1.0.0", data), "SUCCEEDED")
    assert ex["statusDetails"]["by"] == "iot-agent-install" and path_unit["runs"] == 1
    assert slot(world.fw, "current") == "1.0.0" and (world.fw / "current" / "app.txt").read_text() == "app 1.0.0\n"
    ex = world.run("priv-2", doc_for(world, "1.1.0", release("1.1.0", "unhealthy\n")), "FAILED")
    assert "rolled back to 1.0.0: health check exited 1" in ex["statusDetails"]["reason"]
    assert slot(world.fw, "current") == "1.0.0" and slot(world.fw, "broken") == "1.1.0"
    assert sorted(os.listdir(world.spool)) == []


def test_helper_re_verifies_an_artifact_swapped_after_the_agent_checked_it(world, agent, path_unit):
    evil = release("2.0.0", "evil\n")

    def swap(spool: Path) -> None:  # a taken-over agent replaces the verified file
        for art in spool.glob("*.artifact"):
            art.write_bytes(evil)

    path_unit["before"] = swap
    good = release("2.0.0")
    ex = world.run("priv-3", doc_for(world, "2.0.0", good), "REJECTED")
    assert "signature does not verify with the helper's pinned" in ex["statusDetails"]["reason"]
    assert slot(world.fw, "current") == "1.0.0" and not (world.fw / "releases" / "2.0.0").exists()


def test_helper_refuses_requests_the_agent_should_never_send(world, tmp_path):
    """Direct requests, as a compromised agent could write them: each refused, nothing installed."""
    spool = tmp_path / "spool"
    spool.mkdir()
    fw = tmp_path / "fw"
    cfg = privileged.load_config(helper_config(tmp_path / "install.toml", world.signer.cert_path, spool, fw))
    other = CodeSigner(tmp_path / "other")
    os.symlink("/etc/shadow", spool / "0000000000000005.artifact")
    cases = {
        "0000000000000001": ("fw", "1.0.0", release("1.0.0"), world.signer, "SUCCEEDED", "installed"),
        "0000000000000002": ("fw", "0.9.0", release("0.9.0"), world.signer, "REJECTED", "not newer than the installed 1.0.0"),
        "0000000000000003": ("etc", "2.0.0", release("2.0.0"), world.signer, "REJECTED", "not one this helper may install"),
        "0000000000000004": ("fw", "2.0.0", release("2.0.0"), other, "REJECTED", "signature does not verify"),
        "0000000000000005": ("fw", "2.0.0", None, world.signer, "REJECTED", "is a symbolic link"),
        "0000000000000006": ("fw", "2.0.0", make_tar({"../x": b"1"}, "2.0.0"), world.signer, "REJECTED", "not a safe tar"),
    }
    for key, (target, version, data, signer, status, why) in sorted(cases.items()):
        if data is not None:
            (spool / f"{key}.artifact").write_bytes(data)
        sig = signer.sign(data if data is not None else b"x")
        (spool / f"{key}.request.json").write_text(json.dumps({"job_id": key, "target": target, "version": version,
                                                              "name": "fw.tar", "signature": sig}))
        privileged.process_spool(cfg)
        result = json.loads((spool / f"{key}.result.json").read_text())
        assert result["status"] == status and why in result["reason"], (key, result)
        assert slot(fw, "current") == "1.0.0"
    assert {p.name for p in (fw / "releases").iterdir()} == {"1.0.0"} and not (tmp_path / "x").exists()
