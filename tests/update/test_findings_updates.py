"""Findings of the hardening review (issue 17, items 2, 5 and 6) against the real agent, the local
cloud and the root helper. Written with the legacy document format (schema 1) so each runs on the
code before the fix (commit a3a3cd0) as well, where each failed.

- Item 2: old signed bytes relabelled as 99.0.0 (a single-file target, a tar without VERSION, and a
  request straight to the root helper) installed; now refused, nothing installed.
- Item 5: a kill -9 right after the agent wrote its spool request left the agent reporting FAILED
  with nothing recorded while root installed the release; now the job ends SUCCEEDED and both agree.
  A directory or FIFO named like a request, an artifact that keeps growing and a spool swapped for a
  symlink: refused and reported, the next request still answered (in test_ota_privileged.py).
- Item 6: a release that failed came back under another spelling of its version (6.0, Arabic-Indic
  digits, a trailing newline); now refused as not canonical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from otakit import HEALTH, World, make_tar, our_doc, release
from sweep import Run
from test_ota_privileged import helper_config

from agent.update.install import slot

HERE = Path(__file__).resolve().parent.parent  # tests/, beside killwrap.py
REPO = HERE.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(
        tmp_path_factory.mktemp("findupd"),
        "FUPD",
        {
            "app": {"directory": "app", "health_command": HEALTH, "health_timeout_s": 10.0},
            "blob": {"directory": "blob", "unpack": False},
            "fw": {"directory": "fw", "privileged": True},
        },
        ota={"privileged_timeout_s": 60.0},
    )
    w.fw = w.root / "device" / "fw"
    w.spool = w.dev.directory / "state" / "ota" / "spool"
    w.helper_cfg = helper_config(w.root / "install.toml", w.signer.cert_path, w.spool, w.fw)
    yield w
    w.close()


@pytest.fixture(scope="module")
def path_unit(world):
    """Plays the systemd path unit: runs the root helper whenever a request (or a claimed one) waits."""
    stop = threading.Event()

    def loop():
        while not stop.wait(0.2):
            if world.spool.is_dir() and any(
                p.name.endswith((".request.json", ".claimed.json")) for p in world.spool.iterdir()
            ):
                subprocess.run(
                    [sys.executable, "-m", "agent.update.privileged", "--config", str(world.helper_cfg)],
                    cwd=REPO,
                    timeout=60,
                )

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(5)


def _legacy(world, target: str, version: str, name: str, data: bytes) -> dict:
    return our_doc(target, version, name, data, world.signer.sign(data), url=world.https(data))


def _agent(world):
    from conftest import AgentProcess

    a = AgentProcess(world.dev).start()
    a.wait_for(rf"connected to localhost:\d+ as {world.thing}", timeout=90)
    world.agent = a
    return a


def test_relabelled_signed_artifacts_do_not_install(world):
    """Item 2: the version an update installs as must come from signed bytes."""
    a = _agent(world)
    try:
        good = release("2.0.0", target="app")
        world.run("base-app", _legacy(world, "app", "2.0.0", "app.tar", good), "SUCCEEDED")
        old_blob = os.urandom(1000)  # old firmware, genuinely signed: its version is not in its bytes
        ex = world.run("relabel-blob", _legacy(world, "blob", "99.0.0", "firmware.bin", old_blob), "REJECTED")
        assert slot(world.blob, "current") is None, ex
        no_version = make_tar({"app.txt": b"app 1.0.0\n"})  # an old release without VERSION inside
        ex = world.run("relabel-tar", _legacy(world, "app", "99.0.0", "app.tar", no_version), "REJECTED")
        assert slot(world.app, "current") == "2.0.0", ex
        # The real next release still installs.
        world.run("real-3", _legacy(world, "app", "3.0.0", "app.tar", release("3.0.0", target="app")), "SUCCEEDED")
        assert slot(world.app, "current") == "3.0.0"
    finally:
        assert a.stop() == 0


def test_a_failed_release_cannot_return_under_another_spelling(world):
    """Item 6: 6.0.0 fails its health check; "6.0", "٦.0.0" (Arabic-Indic digits) and "6.0.0\\n" are
    refused as not canonical, never installed again."""
    a = _agent(world)
    try:
        bad = release("6.0.0", "unhealthy\n", target="app")
        world.run("six", _legacy(world, "app", "6.0.0", "app.tar", bad), "FAILED")
        assert slot(world.app, "broken") == "6.0.0"
        for i, spelling in enumerate(["6.0", "\u0666.0.0", "6.0.0\n", "06.0.0"]):
            data = make_tar({"app.txt": b"app 6\n"}, spelling.rstrip("\n"), "app")
            ex = world.run(f"six-again-{i}", _legacy(world, "app", spelling, "app.tar", data), "REJECTED")
            assert slot(world.app, "current") == "3.0.0", (spelling, ex)
    finally:
        assert a.stop() == 0


def test_the_root_helper_takes_no_version_from_the_request(world, tmp_path):
    """Item 2 through the root helper: a request (as a taken-over agent could write it) labelling an
    old signed tar without VERSION as 99.0.0 installed it as 99.0.0."""
    spool = tmp_path / "spool"
    spool.mkdir()
    fw = tmp_path / "fw"
    cfg = helper_config(tmp_path / "install.toml", world.signer.cert_path, spool, fw)
    old = make_tar({"app.txt": b"app 1.0.0\n"})
    key = "00000000000000d1"
    (spool / f"{key}.artifact").write_bytes(old)
    (spool / f"{key}.request.json").write_text(
        json.dumps(
            {
                "job_id": "relabel",
                "target": "fw",
                "version": "99.0.0",
                "version_label": "99.0.0",
                "name": "fw.tar",
                "signature": world.signer.sign(old),
            }
        )
    )
    subprocess.run(
        [sys.executable, "-m", "agent.update.privileged", "--config", str(cfg)], cwd=REPO, timeout=60, check=True
    )
    result = json.loads((spool / f"{key}.result.json").read_text())
    assert result["status"] == "REJECTED", result
    assert slot(fw, "current") is None


def test_a_kill_right_after_the_hand_over_ends_with_one_outcome(world, path_unit, tmp_path):
    """Item 5: SIGKILL just after the agent's spool request is written. The helper installs while the
    agent is down; after a restart the agent records the install and the job is SUCCEEDED."""
    data = release("1.0.0", target="fw")
    world.jobs.create("handover", world.thing, _legacy(world, "fw", "1.0.0", "fw.tar", data))
    cut = Run(
        [
            sys.executable,
            str(HERE / "killwrap.py"),
            "--path",
            "*.request.json",
            "--",
            "--config",
            str(world.dev.config_path),
            "run",
        ],
        world.token.full_env(),
        tmp_path / "cut.log",
    ).start()
    assert cut.wait(90) == -9, cut.text()[-3000:]
    cut.reap()
    a = _agent(world)
    try:
        ex = world.run_wait("handover", "SUCCEEDED", timeout=90)
        assert ex["statusDetails"].get("version") == "1.0.0", ex
        assert slot(world.fw, "current") == "1.0.0"
        status = json.loads(world.dev.cli("status", "--json").stdout)
        assert status["updates"]["fw"]["current"] == "1.0.0"
        state = json.loads((world.dev.directory / "state" / "state.json").read_text())["data"]
        assert state["ota"]["installed"].get("fw") == "1.0.0", state["ota"]
        assert not [p for p in world.spool.iterdir() if p.name.endswith((".json", ".artifact"))], os.listdir(
            world.spool
        )
    finally:
        assert a.stop() == 0
