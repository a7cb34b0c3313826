"""Configuration by shadow, end to end: the real agent, the local cloud's shadow service, an operator's updates.

A live change of the Defender interval shows in the reports' rhythm without a restart; an invalid value and a
trust setting are refused and reported with the reason, nothing changed; the overlay survives a restart; a
change after which no report reaches the cloud is rolled back.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from localcloud import pace
from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.shadows import Shadows

THING = "gw-RC1"


@pytest.fixture
def world(tmp_path, softhsm):
    cloud = LocalCloud(tmp_path / "cloud")
    cloud.registry.allow_serials(["RC1"])
    cloud.configure(defender_min_interval_s=0.5)
    ntp = Chrony(tmp_path / "chrony").start()
    cloud.up()
    dev = fresh_device(
        cloud,
        softhsm,
        "RC1",
        tmp_path / "dev",
        [ntp.server],
        extra={
            "defender": {"interval_s": 1.0, "testing_allow_short_interval": True},
            "inventory": {"enabled": False},
            "jobs": {"enabled": False},
            "remote_config": {"enabled": True, "confirm_within_s": 10},
        },
    )
    yield cloud, dev, Shadows(cloud.registry.db, cloud.registry.lock)
    ntp.stop()
    cloud.down()


def desire(shadows: Shadows, desired) -> None:
    shadows.operator_update(THING, "config", {"state": {"desired": desired}})


def reported(shadows: Shadows) -> dict:
    try:
        return shadows.get(THING, "config")["state"].get("reported") or {}
    except Exception:
        return {}


def eventually(check, timeout: float = 30.0):
    deadline = time.monotonic() + pace.scaled(timeout)
    last = None
    while time.monotonic() < deadline:
        try:
            return check()
        except AssertionError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {last}")


def status_is(shadows: Shadows, result: str) -> dict:
    st = reported(shadows).get("status") or {}
    assert st.get("result") == result, reported(shadows)
    return st


def has(shadows: Shadows, defender: dict) -> None:
    got = reported(shadows).get("defender")
    assert got == defender, reported(shadows)


def report_gaps(a, after: int) -> list[float]:
    times = [t for t, line in a.lines[after:] if re.search(r"report \d+ published", line)]
    return [b - x for x, b in zip(times, times[1:], strict=False)]


def test_config_shadow_end_to_end(world, agents):
    cloud, dev, shadows = world
    a = agents(dev)
    a.wait_for(r"report \d+ accepted", timeout=90)
    a.wait_for(r"configuration shadow 'config' reported", timeout=30)  # an empty shadow: nothing to apply

    # A live change: reports now come every 3 s, in the same process and the same connection.
    desire(shadows, {"defender": {"interval_s": 3}})
    i = a.wait_for(r"configuration shadow: version \d+ applied \(live\)", timeout=30)
    a.wait_for(r"Device Defender: now every 3 s", timeout=10)
    eventually(lambda: (status_is(shadows, "applied"), has(shadows, {"interval_s": 3})))
    a.wait_for(r"report \d+ published", after=a.wait_for(r"report \d+ published", after=i + 1, timeout=15) + 1)
    a.wait_for(r"report \d+ published", after=a.wait_for(r"report \d+ published", after=i + 1, timeout=15) + 1)
    gaps = report_gaps(a, i + 1)
    assert gaps and all(2.5 < g < 4.5 for g in gaps), gaps
    assert len(re.findall(r"connected to localhost:\d+ as gw-", a.text())) == 1, "the change reconnected"

    # An invalid value: refused, reported with the reason; the 3 s rhythm goes on.
    desire(shadows, {"defender": {"interval_s": -5}})
    j = a.wait_for(r"desired state \(version \d+\) refused, nothing changed", timeout=30)
    st = eventually(lambda: status_is(shadows, "refused"))
    assert any("defender.interval_s" in r for r in st["reasons"]), st
    assert reported(shadows)["defender"] == {"interval_s": 3}
    a.wait_for(r"report \d+ published", after=a.wait_for(r"report \d+ published", after=j + 1, timeout=15) + 1)
    assert all(2.5 < g < 4.5 for g in report_gaps(a, j + 1))

    # A trust setting: refused whole, even next to a valid change.
    desire(
        shadows,
        {
            "defender": {"interval_s": 2},
            "broker": {"endpoint": "evil.example"},
            "ota": {"code_signing_certificate": "x.pem"},
        },
    )
    a.wait_for(r"desired state \(version \d+\) refused", after=j + 1, timeout=30)

    def trust_refused() -> dict:
        st = status_is(shadows, "refused")
        assert any("broker: decides trust" in r and "never be set from the cloud" in r for r in st["reasons"]), st
        return st

    st = eventually(trust_refused)
    assert any(r.startswith("ota: decides trust") for r in st["reasons"]), st
    assert reported(shadows)["defender"] == {"interval_s": 3}
    assert "Device Defender: now every 2 s" not in a.text()

    # The overlay survives a restart.
    desire(shadows, {"defender": {"interval_s": 2}, "broker": None, "ota": None})
    a.wait_for(r"Device Defender: now every 2 s", timeout=30)
    assert a.stop() == 0
    b = agents(dev)
    b.wait_for(r'configuration shadow: overlay \{"defender": \{"interval_s": 2\}\} applies', timeout=60)
    b.wait_for(r"Device Defender reports every 2 s", timeout=60)

    # A change after which no report reaches the cloud (here: the reported state would exceed the shadow's
    # 8 KB) is rolled back after confirm_within_s, and the rollback is reported.
    big = {"defender": {"interval_s": 2, "custom_string_list": {"site": ["x" * 4500]}}}
    desire(shadows, big)
    b.wait_for(r"configuration shadow: version \d+ applied", timeout=30)
    b.wait_for(r"rolling back to", timeout=40)
    st = eventually(lambda: status_is(shadows, "rolled back"))
    assert "confirm_within_s" in st["reasons"][0]
    assert reported(shadows)["defender"] == {"interval_s": 2}
    overlay = json.loads((dev.directory / "state" / "config-overlay.json").read_text())
    assert overlay["overlay"] == {"defender": {"interval_s": 2}} and not overlay.get("pending")
    assert b.stop() == 0
