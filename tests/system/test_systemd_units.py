"""The service units: `systemd-analyze verify`, the sandbox's exposure score (<= 1.5, printed), the
notify protocol against a real datagram socket, and an install script that changes nothing twice."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = ["iot-agent.service", "iot-agent-install.service", "iot-agent-install.path"]


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory):
    """A root with the host's system units, ours, and stand-ins for the executables they name."""
    root = tmp_path_factory.mktemp("unitroot")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for u in UNITS:
        shutil.copy(REPO / "systemd" / u, root / "etc/systemd/system" / u)
    for exe in ("iot-agent-launch", "iot-agent-install"):
        p = root / "opt/iot-agent/venv/bin" / exe
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    return root


@pytest.mark.parametrize("unit", UNITS)
def test_units_verify(unit_root, unit):
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={unit_root}", unit],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@pytest.mark.parametrize("unit", ["iot-agent.service", "iot-agent-install.service"])
def test_exposure_score(unit, capsys):
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", unit],
        cwd=REPO / "systemd",
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    score = float(m.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=true {unit}: exposure {score} (target <= 1.5)")
    assert score <= 1.5


def test_notify_protocol_and_watchdog_over_a_real_socket(tmp_path, monkeypatch):
    from agent.base import sdnotify

    path = tmp_path / "notify"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    got: list[str] = []

    def drain(seconds: float) -> list[str]:
        end, out = time.monotonic() + seconds, []
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                out.append(srv.recv(4096).decode())
        return out

    stop = threading.Event()
    try:
        sdnotify.ready("waiting for a trustworthy clock")
        sdnotify.status_line("connected as gw-1")
        sdnotify.status_line("connected as gw-1")  # unchanged: not sent again
        got += drain(0.2)
        assert got == ["READY=1\nSTATUS=waiting for a trustworthy clock", "STATUS=connected as gw-1"]
        sdnotify.start_watchdog(stop)
        pings = []
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # a beating main loop keeps the pings coming
            sdnotify.beat()
            pings += [m for m in drain(0.05) if m == "WATCHDOG=1"]
        assert len(pings) >= 3
        time.sleep(0.5)  # the loop "hangs": no beats
        drain(0.2)
        assert [m for m in drain(0.8) if m == "WATCHDOG=1"] == []
        sdnotify.stopping()
        assert drain(0.2) == ["STOPPING=1\nSTATUS=stopping"]
    finally:
        stop.set()
        srv.close()


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        data = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, data)
    return out


def test_install_script_twice_changes_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    env = {**os.environ, "IOT_AGENT_PIP_ARGS": "--no-deps"}
    first = subprocess.run(
        ["sh", str(REPO / "scripts/install.sh"), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installed the agent" in first.stdout and (root / "etc/systemd/system/iot-agent.service").is_file()
    assert (root / "opt/iot-agent/venv/bin/iot-agent-launch").is_file()
    assert (root / "etc/iot-agent/config.toml").is_file()
    before = _snapshot(root)
    second = subprocess.run(
        ["sh", str(REPO / "scripts/install.sh"), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert second.returncode == 0 and second.stdout.strip() == "install: nothing to change", second.stdout
    assert _snapshot(root) == before


def test_the_agent_speaks_the_notify_protocol_and_stops_feeding_a_hung_watchdog(bench, softhsm, agents, tmp_path):
    """The real agent, with $NOTIFY_SOCKET as systemd would set it: READY, STATUS lines, WATCHDOG pings;
    when its main loop hangs (fail point) the pings stop, which is what makes systemd restart it."""
    from agent.base.failpoints import ENV

    dev = bench.enroll(softhsm, "gw-notify")
    path = tmp_path / "notify"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(0.2)
    msgs: list[tuple[float, str]] = []
    stop = threading.Event()

    def collect():
        while not stop.is_set():
            try:
                msgs.append((time.monotonic(), srv.recv(4096).decode()))
            except TimeoutError:
                pass
            except OSError:
                return

    t = threading.Thread(target=collect, daemon=True)
    t.start()
    try:
        a = agents(dev, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        a.wait_for(r"connected to localhost:\d+ as gw-notify", timeout=60)
        time.sleep(2.5)
        assert a.stop() == 0
        texts = [m for _, m in msgs]
        assert texts[0].startswith("READY=1\nSTATUS=waiting for a trustworthy clock")
        assert "STATUS=connected as gw-notify" in texts and texts[-1] == "STOPPING=1\nSTATUS=stopping"
        assert texts.count("WATCHDOG=1") >= 2
        msgs.clear()
        b = agents(dev, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000", ENV: "daemon.main_loop_hang"})
        i = b.wait_for(r"test fail point daemon.main_loop_hang reached: hanging", timeout=60)
        hung_at = b.lines[i][0]
        time.sleep(4.0)
        late = [ts for ts, m in msgs if m == "WATCHDOG=1" and ts > hung_at + 2.0]
        assert late == [], "the watchdog kept being fed by a hung main loop"
        b.proc.kill()
        b.wait_exit(10)
    finally:
        stop.set()
        srv.close()


def test_the_privileged_install_step_is_bounded_and_finishes_what_a_cut_left():
    """Item 5 of the review: the helper's unit had no start timeout (a stuck step ran for ever), and a
    request it had claimed when the power went must start it again."""
    service = (REPO / "systemd" / "iot-agent-install.service").read_text()
    m = re.search(r"^TimeoutStartSec=(\d+)$", service, re.M)
    assert m and 0 < int(m.group(1)) <= 3600, "iot-agent-install.service needs a bounded TimeoutStartSec"
    path = (REPO / "systemd" / "iot-agent-install.path").read_text()
    globs = re.findall(r"^PathExistsGlob=(.*)$", path, re.M)
    assert sorted(g.rsplit("/", 1)[1] for g in globs) == ["*.claimed.json", "*.request.json"]
