"""`make check-arm64` leaves the host as it found it: it mounts binfmt_misc and registers the
qemu-aarch64 handler to run arm64 programs, and must remove both when it ends, also when it fails and
on Ctrl-C. The script fails on purpose right after registering (IOT_AGENT_ARM64_FAIL_AT), before any
root file system is needed, and the host's mounts and binfmt entries are compared with before.
(The whole check, which ends with the same comparison, runs in .ci/run after the suite.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check-arm64.sh"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# One at a time: two runs would see each other's registration.
pytestmark = pytest.mark.xdist_group("check_arm64_host")


def host_state() -> tuple[list[str], list[str]]:
    mounts = sorted(line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines())
    entries = sorted(p.name for p in BINFMT.iterdir()) if (BINFMT / "status").exists() else []
    return mounts, entries


def _env(fail_at: str) -> dict[str, str]:
    return {**os.environ, "IOT_AGENT_ARM64_FAIL_AT": fail_at}


@pytest.fixture
def root():
    if os.geteuid() != 0:
        pytest.fail("the check needs root (binfmt_misc)")


def _as_from_a_terminal() -> None:
    """In the child: SIGINT as a shell in a terminal has it (default, not blocked). The test runner's process
    may hold it ignored or blocked, and a shell that starts with SIGINT ignored can never trap it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _signal_masks(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "gone"
    return " ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_a_failing_check_removes_what_it_registered(root):
    before = host_state()
    r = subprocess.run(["bash", str(SCRIPT)], env=_env("registered"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failing on purpose after registering the handler" in r.stdout, r.stdout + r.stderr
    assert "host restored: no binfmt entry or mount left behind" in r.stdout, r.stdout + r.stderr
    assert host_state() == before


def test_ctrl_c_removes_what_it_registered(root):
    before = host_state()
    p = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env=_env("wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        deadline = time.monotonic() + 600  # the first run may install qemu-user-static
        seen = ""
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            seen += line
            if "waiting for a signal" in line or not line:
                break
        assert "waiting for a signal" in seen, seen
        registered = host_state()
        assert "qemu-aarch64" in registered[1], registered  # the handler was there while it ran
        masks = _signal_masks(p.pid)
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
        try:
            out, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 60 s after SIGINT; the script's signal state was {masks}") from None
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    assert p.returncode == 130, seen + out
    assert "host restored" in out, seen + out
    assert host_state() == before
