"""Power cut after every state-changing operation while the agent applies a configuration shadow's change
(see tests/sweep.py). The change spans two sections; after each cut the overlay on disk is the old one or the
whole new one, never a part, and the agent, started again, ends with the new one applied and reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sweep import Outcome, Run, next_serial, op_at, sweep, sweep_env

from localcloud.bench import agent_cmd, enrolled_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.shadows import Shadows
from localcloud.tokens import softhsm_token

NEW = {"defender": {"interval_s": 600, "max_list": 10}, "log": {"level": "debug"}}
FILE = {
    "defender": {"enabled": False},
    "inventory": {"enabled": False},
    "jobs": {"enabled": False},
    "remote_config": {"enabled": True},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweeprc")
    cloud = LocalCloud(d / "cloud")
    cloud.up()
    ntp = Chrony(d / "chrony").start()
    yield cloud, ntp
    ntp.stop()
    cloud.down()


def overlay_problem(path: Path) -> str:
    """'' when the record holds no overlay or exactly the new one; else what it holds."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return ""
    except ValueError as e:
        return f"the record does not parse: {e}"
    overlay = record.get("overlay") or {}
    return "" if overlay in ({}, NEW) else f"a mixed overlay: {overlay}"


def remote_config_case(world, root: Path):
    cloud, ntp = world
    shadows = Shadows(cloud.registry.db, cloud.registry.lock)

    def case(n: int) -> Outcome:
        d = root / f"n{n:03d}"
        token = softhsm_token(d / "token")
        thing = f"gw-{next_serial('RC')}"
        dev = enrolled_device(cloud, token, thing, d / "dev", [ntp.server], extra=FILE)
        shadows.operator_update(thing, "config", {"state": {"desired": NEW}})
        record = dev.directory / "state" / "config-overlay.json"
        ops = d / "ops.log"
        plain = {**token.full_env(), "PYTHONDONTWRITEBYTECODE": "1"}

        def done() -> bool:
            try:
                r = json.loads(record.read_text())
            except (FileNotFoundError, ValueError):
                return False
            return r.get("overlay") == NEW and "status_reported" in r and not r.get("pending")

        def run_until_done(env: dict[str, str], log: Path) -> tuple[bool, str]:
            return Run(agent_cmd(dev.config_path, "run"), env, log).start().until(done, 90, "not applied")

        try:
            killed, error = run_until_done(sweep_env(plain, ops, dev.directory, n), d / "swept.log")
            if killed:
                error = overlay_problem(record)
                if not error:
                    _, error = run_until_done(sweep_env(plain, ops, dev.directory, None), d / "after.log")
            if not error:
                rep = shadows.get(thing, "config")["state"].get("reported") or {}
                if {k: rep.get(k) for k in NEW} != NEW or (rep.get("status") or {}).get("result") != "applied":
                    error = f"the shadow reports {rep}"
            return Outcome(n, killed, op_at(ops, n), error)
        finally:
            token.stop()

    return case


def test_sweep_remote_config(world, tmp_path):
    result = sweep("configuration shadow", remote_config_case(world, tmp_path))
    print(result.summary())
    # The pid file, then the overlay's two writes (the decision, its confirmation): each is a kill point.
    assert result.kill_points >= 3, result.summary()
    assert not result.failures, "\n\n".join(f"kill after op {o.n} ({o.op}): {o.error}" for o in result.failures)
