"""localcloud.pace: the factor that stretches the harness's waits on a slow machine (qemu-user, a
board). It must never shrink a wait, must be measured once and handed to child processes, and must
refuse a value that is not a sane factor instead of silently ignoring it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localcloud import pace

REPO = Path(__file__).resolve().parents[2]


def _child(env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != pace.ENV}
    if env_value is not None:
        env[pace.ENV] = env_value
    code = "import os; from localcloud import pace; print(pace.factor(), os.environ[pace.ENV])"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_measured_once_and_inherited():
    r = _child(None)
    assert r.returncode == 0, r.stderr
    value, env_value = r.stdout.split()
    assert 1.0 <= float(value) <= pace.MAX_FACTOR
    assert float(env_value) == float(value)  # children of that process inherit it


def test_the_variable_overrides_the_measurement():
    r = _child("7.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["7.5", "7.5"]


@pytest.mark.parametrize("bad", ["0.5", "0", "-3", "101", "fast", "nan"])
def test_a_bad_value_is_refused(bad):
    r = _child(bad)
    assert r.returncode != 0
    assert f"{pace.ENV} must be a number from 1 to 100" in r.stderr


def test_a_slower_machine_stretches_waits_and_a_faster_one_never_shrinks_them(monkeypatch):
    monkeypatch.setattr(pace, "_factor", None)
    monkeypatch.delenv(pace.ENV, raising=False)
    monkeypatch.setattr(pace, "_loop", lambda: pace.REFERENCE_S * 6.2)
    assert pace.measure() == 7.0  # rounded up
    monkeypatch.setattr(pace, "_loop", lambda: pace.REFERENCE_S * 1.5)
    assert pace.measure() == 1.0  # within the dead band: timer noise
    monkeypatch.setattr(pace, "_loop", lambda: pace.REFERENCE_S / 10)
    assert pace.measure() == 1.0  # never below 1
    monkeypatch.setattr(pace, "_loop", lambda: pace.REFERENCE_S * 500)
    assert pace.measure() == pace.MAX_FACTOR
    monkeypatch.setattr(pace, "_factor", 4.0)
    before = time.monotonic()
    assert pace.scaled(10) == 40
    assert pace.deadline(10) - before >= 40
