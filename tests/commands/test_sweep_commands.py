"""Power cut after every state-changing operation while the agent runs a command (see tests/sweep.py).

Whatever instant the power goes, the handler has run at most once, and after a restart the cloud hears a
final answer that matches what happened: SUCCEEDED (it ran and the record says so), FAILED with AGENT_RESTARTED
(the cut fell while it ran), or the cloud's own timeout when the request was lost before it was recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sweep import Outcome, Run, next_serial, op_at, sweep, sweep_env

from localcloud.bench import agent_cmd, enrolled_device
from localcloud.cloud import LocalCloud
from localcloud.commands import Commands
from localcloud.ntp import Chrony
from localcloud.tokens import softhsm_token

QUIET = {"defender": {"enabled": False}, "inventory": {"enabled": False}, "jobs": {"enabled": False}}
FINAL = {("SUCCEEDED", ""), ("FAILED", "AGENT_RESTARTED"), ("TIMED_OUT", "$NO_RESPONSE_FROM_DEVICE")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweepcmd")
    cloud = LocalCloud(d / "cloud")
    cloud.up()
    ntp = Chrony(d / "chrony").start()
    commands = Commands(cloud.registry.db, cloud.registry.lock)
    commands.create_command("count", b'{"action": "count"}')
    yield cloud, ntp, commands
    ntp.stop()
    cloud.down()


def commands_case(world, root: Path, seen: list[tuple[str, str]]):
    cloud, ntp, commands = world

    def case(n: int) -> Outcome:
        d = root / f"n{n:03d}"
        d.mkdir(parents=True)
        runs = d / "runs.log"
        handler = d / "count.sh"
        handler.write_text(f"#!/bin/sh\necho run >> {runs}\necho counted\n")
        handler.chmod(0o755)
        token = softhsm_token(d / "token")
        thing = f"gw-{next_serial('CM')}"
        extra = {**QUIET, "commands": {"enabled": True, "handlers": {"count": {"command": [str(handler)]}}}}
        dev = enrolled_device(cloud, token, thing, d / "dev", [ntp.server], extra=extra)
        ops = d / "ops.log"
        plain = {**token.full_env(), "PYTHONDONTWRITEBYTECODE": "1"}
        started: list[str] = []

        def status() -> tuple[str, str]:
            if not started:
                return "", ""
            ex = commands.get(started[0]) or {}
            return ex.get("status", ""), (ex.get("statusReason") or {}).get("reasonCode", "")

        def run_until_done(env: dict[str, str], log: Path) -> tuple[bool, str]:
            run = Run(agent_cmd(dev.config_path, "run"), env, log).start()

            def start_when_listening() -> None:
                if not started and "commands: waiting for requests" in run.text():
                    started.append(commands.start_execution("count", thing, 10)["executionId"])

            return run.until(lambda: status() in FINAL, 90, "no final answer", tick=start_when_listening)

        try:
            killed, error = run_until_done(sweep_env(plain, ops, dev.directory, n), d / "swept.log")
            if killed:
                _, error = run_until_done(sweep_env(plain, ops, dev.directory, None), d / "after.log")
            count = len(runs.read_text().splitlines()) if runs.exists() else 0
            if not error and count > 1:
                error = f"the handler ran {count} times"
            if not error:
                st = status()
                state = json.loads((dev.directory / "state" / "state.json").read_text())
                record = (((state.get("data") or state).get("commands") or {}).get("executions") or {}).get(
                    started[0], {}
                )
                seen.append(st)
                if st == ("SUCCEEDED", "") and count != 1:
                    error = f"SUCCEEDED but the handler ran {count} times"
                elif record and record.get("status") != st[0] and st[0] != "TIMED_OUT":
                    error = f"the record says {record}, the cloud {st}"
            return Outcome(n, killed, op_at(ops, n), error)
        finally:
            token.stop()

    return case


def test_sweep_commands(world, tmp_path):
    seen: list[tuple[str, str]] = []
    result = sweep("commands", commands_case(world, tmp_path, seen))
    print(result.summary(), sorted(set(seen)))
    assert result.kill_points >= 3, result.summary()  # the RUNNING record, the outcome, the sent mark
    assert not result.failures, "\n\n".join(f"kill after op {o.n} ({o.op}): {o.error}" for o in result.failures)
    assert {("SUCCEEDED", ""), ("FAILED", "AGENT_RESTARTED")} <= set(seen), seen  # both sides of the record
