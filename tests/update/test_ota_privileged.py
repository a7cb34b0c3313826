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
import time
from pathlib import Path

import pytest
from otakit import CodeSigner, World, make_tar, release

from agent.update import privileged
from agent.update.install import slot

REPO = Path(__file__).resolve().parents[2]


def helper_config(path: Path, cert: Path, spool: Path, fw: Path) -> Path:
    path.write_text(
        f'code_signing_certificate = "{cert}"\nspool = "{spool}"\n'
        f'[targets.fw]\ndirectory = "{fw}"\n'
        'health_command = ["sh", "-c", "test -f app.txt && ! grep -q unhealthy app.txt"]\n'
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(
        tmp_path_factory.mktemp("otapriv"),
        "OTAP",
        {"fw": {"directory": "fw", "privileged": True}},
        ota={"privileged_timeout_s": 30.0},
    )
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
            if world.spool.is_dir() and (
                list(world.spool.glob("*.request.json")) or list(world.spool.glob("*.claimed.json"))
            ):
                if hooks["before"]:
                    hooks["before"](world.spool)
                subprocess.run(
                    [sys.executable, "-m", "agent.update.privileged", "--config", str(world.helper_cfg)],
                    cwd=REPO,
                    check=True,
                    timeout=60,
                )
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
    return world.signed("fw", version, "fw.tar", data, signer=signer or world.signer)


def test_helper_installs_what_the_agent_verified(world, agent, path_unit):
    data = release("1.0.0", target="fw")
    ex = world.run("priv-1", doc_for(world, "1.0.0", data), "SUCCEEDED")
    # The agent may report the helper's answer before the helper process has exited and been counted.
    deadline = time.monotonic() + 30
    while path_unit["runs"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ex["statusDetails"]["by"] == "iot-agent-install" and path_unit["runs"] == 1
    assert slot(world.fw, "current") == "1.0.0" and (world.fw / "current" / "app.txt").read_text() == "app 1.0.0\n"
    ex = world.run("priv-2", doc_for(world, "1.1.0", release("1.1.0", "unhealthy\n", target="fw")), "FAILED")
    assert "rolled back to 1.0.0: health check exited 1" in ex["statusDetails"]["reason"]
    assert slot(world.fw, "current") == "1.0.0" and slot(world.fw, "broken") == "1.1.0"
    assert sorted(os.listdir(world.spool)) == []


def test_helper_re_verifies_an_artifact_swapped_after_the_agent_checked_it(world, agent, path_unit):
    evil = release("2.0.0", "evil\n", target="fw")

    def swap(spool: Path) -> None:  # a taken-over agent replaces the verified file
        for art in spool.glob("*.artifact"):
            art.write_bytes(evil)

    path_unit["before"] = swap
    good = release("2.0.0", target="fw")
    ex = world.run("priv-3", doc_for(world, "2.0.0", good), "REJECTED")
    assert "sha256 does not match the signed manifest" in ex["statusDetails"]["reason"]
    assert slot(world.fw, "current") == "1.0.0" and not (world.fw / "releases" / "2.0.0").exists()


def request(
    spool: Path,
    key: str,
    signer,
    target: str,
    version: str,
    data: bytes | None,
    *,
    name: str = "fw.tar",
    manifest_target: str | None = None,
    legacy: bool = False,
) -> None:
    """Write a request as an agent would (or a taken-over one could)."""
    import hashlib

    from agent.update.manifest import make

    if data is not None:
        (spool / f"{key}.artifact").write_bytes(data)
    body = data if data is not None else b"x"
    req = {"job_id": f"job-{key[-4:]}", "target": target, "name": name}
    if legacy:
        req.update(signature=signer.sign(body), version_label=version)
    else:
        raw = make(manifest_target or target, version, name, len(body), hashlib.sha256(body).hexdigest())
        req.update(manifest=base64.b64encode(raw).decode(), signature=signer.sign(raw))
    (spool / f"{key}.request.json").write_text(json.dumps(req))


def test_helper_refuses_requests_the_agent_should_never_send(world, tmp_path):
    """Direct requests, as a compromised agent could write them: each refused, nothing installed."""
    spool = tmp_path / "spool"
    spool.mkdir()
    fw = tmp_path / "fw"
    cfg = privileged.load_config(helper_config(tmp_path / "install.toml", world.signer.cert_path, spool, fw))
    other = CodeSigner(tmp_path / "other")
    os.symlink("/etc/shadow", spool / "0000000000000005.artifact")
    r = lambda v, **kw: release(v, target="fw", **kw)  # noqa: E731
    cases = {
        "0000000000000001": (dict(target="fw", version="1.0.0", data=r("1.0.0")), "SUCCEEDED", "installed"),
        "0000000000000002": (
            dict(target="fw", version="0.9.0", data=r("0.9.0")),
            "REJECTED",
            "not newer than the installed 1.0.0",
        ),
        "0000000000000003": (
            dict(target="etc", version="2.0.0", data=r("2.0.0")),
            "REJECTED",
            "not one this helper may install",
        ),
        "0000000000000004": (
            dict(target="fw", version="2.0.0", data=r("2.0.0"), signer=other),
            "REJECTED",
            "manifest signature does not verify",
        ),
        "0000000000000005": (dict(target="fw", version="2.0.0", data=None), "REJECTED", "is a symbolic link"),
        "0000000000000006": (
            dict(target="fw", version="2.0.0", data=make_tar({"../x": b"1"}, "2.0.0")),
            "REJECTED",
            "not a safe tar",
        ),
        "0000000000000007": (
            dict(target="fw", version="2.0.0", data=r("2.0.0"), manifest_target="app"),
            "REJECTED",
            "the signed manifest is for target 'app'",
        ),
        "0000000000000008": (
            dict(target="fw", version="99.0.0", data=make_tar({"app.txt": b"old"}), legacy=True),
            "REJECTED",
            "binds no version or target",
        ),
        "0000000000000009": (
            dict(target="fw", version="2.0.0", data=release("2.0.0", target="app"), legacy=True),
            "REJECTED",
            "a release of 'app', not of 'fw'",
        ),
        "0000000000000010": (dict(target="fw", version="2.0", data=r("2.0.0")), "REJECTED", "not MAJOR.MINOR.PATCH"),
    }
    for key, (kw, status, why) in sorted(cases.items()):
        request(spool, key, kw.pop("signer", world.signer), **kw)
        privileged.process_spool(cfg)
        result = json.loads((spool / f"{key}.result.json").read_text())
        assert result["status"] == status and why in result["reason"], (key, result)
        assert slot(fw, "current") == "1.0.0"
        assert not (spool / f"{key}.request.json").exists() and not (spool / f"{key}.claimed.json").exists()
    assert {p.name for p in (fw / "releases").iterdir()} == {"1.0.0"} and not (tmp_path / "x").exists()


def test_helper_never_blocks_on_or_follows_what_is_not_a_file(world, tmp_path):
    """Item 5 of the review: a directory or a FIFO named like a request crashed or hung the helper; an
    artifact that kept growing was copied past the size limit; a spool swapped for a symlink made root
    write elsewhere. Each is refused and reported, and the next request is still answered."""
    import subprocess
    import sys
    import threading
    import time

    spool = tmp_path / "spool"
    spool.mkdir()
    fw = tmp_path / "fw"
    cfg_path = helper_config(tmp_path / "install.toml", world.signer.cert_path, spool, fw)
    text = cfg_path.read_text().replace("[targets.fw]", "max_artifact_bytes = 2000000\n[targets.fw]")
    cfg_path.write_text(text)
    (spool / "00000000000000a1.request.json").mkdir()
    os.mkfifo(spool / "00000000000000a2.request.json")
    request(spool, "00000000000000a3", world.signer, "fw", "1.0.0", release("1.0.0", target="fw"))

    def run():
        return subprocess.run(
            [sys.executable, "-m", "agent.update.privileged", "--config", str(cfg_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = run()
    assert r.returncode == 0, r.stderr
    answers = {
        k: json.loads((spool / f"{k}.result.json").read_text())
        for k in ("00000000000000a1", "00000000000000a2", "00000000000000a3")
    }
    assert (
        answers["00000000000000a1"]["status"] == "REJECTED"
        and "not a regular file" in answers["00000000000000a1"]["reason"]
    )
    assert (
        answers["00000000000000a2"]["status"] == "REJECTED"
        and "not a regular file" in answers["00000000000000a2"]["reason"]
    )
    assert answers["00000000000000a3"]["status"] == "SUCCEEDED", answers
    assert not list(spool.glob("*.request.json")), os.listdir(spool)  # nothing left to start the unit again

    # An artifact that keeps growing while it is copied (legacy request: no size in signed bytes).
    key = "00000000000000b1"
    request(spool, key, world.signer, "fw", "2.0.0", release("2.0.0", target="fw"), legacy=True)
    stop = threading.Event()

    def grow() -> None:
        with open(spool / f"{key}.artifact", "ab") as f:
            for _ in range(400):  # up to 40 MB, far past the 2 MB limit
                if stop.is_set():
                    return
                f.write(b"\0" * 100_000)
                f.flush()

    writer = threading.Thread(target=grow)
    writer.start()
    time.sleep(0.05)
    r = run()
    stop.set()
    writer.join()
    result = json.loads((spool / f"{key}.result.json").read_text())
    assert result["status"] == "REJECTED" and ("grew past" in result["reason"] or "larger than" in result["reason"]), (
        result
    )
    assert slot(fw, "current") == "1.0.0"

    # The spool swapped for a symlink to another folder: root follows nothing.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    request(elsewhere, "00000000000000c1", world.signer, "fw", "3.0.0", release("3.0.0", target="fw"))
    os.rename(spool, tmp_path / "spool-old")
    os.symlink(elsewhere, spool)
    r = run()
    assert r.returncode != 0 and "symbolic link" in r.stderr, r.stderr
    assert not (elsewhere / "00000000000000c1.result.json").exists() and slot(fw, "current") == "1.0.0"
