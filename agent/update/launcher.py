"""`iot-agent-launch`: starts the agent from its current release and undoes a self-update that fails.

It is the one piece a self-update never replaces (like Greengrass's loader script): it comes from
the base installation, runs `python -m agent run` with the release in `<agent target>/current` first
on the import path, and restarts it at once when it exits with RESTART_EXIT. While a trial is open
(see agent.release) it also enforces the deadline and a start count, so a new release that crashes,
hangs or cannot connect is rolled back without its own help. Everything else (SIGTERM, a plain
exit) passes through to the service manager unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent.base.config import DEFAULT_CONFIG_PATH, Config
from agent.base.errors import AgentError
from agent.update.install import restore, slot
from agent.update.release import RELEASE_ENV, RESTART_EXIT, read_trial, write_trial

log = logging.getLogger("agent.launcher")

MAX_TRIAL_STARTS = 3  # starts of a new release before it is given up (crash loops end here)
MAX_LAUNCHES = 1000  # restarts requested by the agent in one launcher run; bounded like every loop


def _roll_back(tdir: Path, trial: dict, why: str) -> None:
    restore(tdir, trial.get("from_current"), trial.get("from_previous"), broken=trial.get("version"))
    write_trial(tdir, {**trial, "state": "rolled_back", "reason": why})
    log.warning("release %s rolled back to %s: %s", trial.get("version"), trial.get("from_current"), why)


def _open_trial(tdir: Path | None) -> dict | None:
    t = read_trial(tdir) if tdir else None
    return t if t and t.get("state") == "trial" else None


def main(argv: list[str] | None = None, load: Callable[[Path], Config] | None = None) -> int:
    """`load` reads the whole config (agent.launch passes the registry's loader: this package cannot
    import it, the runtime is above it)."""
    from agent.base import killpoints

    killpoints.install()  # a no-op unless a test sweeps kill points
    ap = argparse.ArgumentParser(prog="iot-agent-launch", description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    args = ap.parse_args(argv)
    from agent.base.logfmt import basic_config  # one record, one bounded line

    basic_config(
        level=logging.INFO,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    try:
        assert load is not None, "run iot-agent-launch (agent.launch), which passes the config loader"
        cfg = load(args.config)
    except AgentError as e:
        print(f"iot-agent-launch: {e}", file=sys.stderr)
        return e.exit_code
    target = next((t for t in cfg.ota.targets.values() if t and t.self_update), None)
    tdir = cfg.resolve(target.directory) if target else None

    stopping = [False]
    child: list[subprocess.Popen] = []

    def on_signal(signum, _frame):
        stopping[0] = True
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    rc = 0
    for _ in range(MAX_LAUNCHES):
        trial = _open_trial(tdir)
        if tdir and trial:  # a trial is only ever read from the self-update target's directory
            if time.time() > float(trial.get("deadline", 0)):
                _roll_back(tdir, trial, f"release {trial.get('version')} did not confirm within the deadline")
            elif int(trial.get("attempts", 0)) >= MAX_TRIAL_STARTS:
                _roll_back(
                    tdir, trial, f"release {trial.get('version')} stopped {MAX_TRIAL_STARTS} times without confirming"
                )
            else:
                write_trial(tdir, {**trial, "attempts": int(trial.get("attempts", 0)) + 1})
        env, cwd = dict(os.environ), None
        release = slot(tdir, "current") if tdir else None
        if tdir and release:
            cwd = tdir / "releases" / release
            env[RELEASE_ENV] = release
            env["PYTHONPATH"] = os.pathsep.join([str(cwd)] + [p for p in [env.get("PYTHONPATH")] if p])
        else:
            env.pop(RELEASE_ENV, None)
        log.info("starting the agent from %s", f"release {release}" if release else "the base installation")
        p = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg.path), "run"], cwd=cwd, env=env)
        child[:] = [p]
        while p.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(0.5)
            t = _open_trial(tdir)
            if t and not stopping[0] and time.time() > float(t.get("deadline", 0)):
                log.warning("release %s has not confirmed by its deadline: stopping it", t.get("version"))
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        rc = p.returncode
        if stopping[0]:
            return rc if rc >= 0 else 0
        if rc == RESTART_EXIT:
            continue
        if _open_trial(tdir):
            continue  # the new release stopped before confirming: counted, and rolled back when out of starts
        return rc if rc >= 0 else 1
    return rc
