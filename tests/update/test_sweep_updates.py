"""Power cut after every state-changing operation of an update, on SoftHSM and on a software TPM:
an OTA install (healthy, and one whose health check fails and is rolled back), a privileged install
through the root helper, and a self-update under iot-agent-launch (see tests/sweep.py).

After each cut and a restart the job's final status in the cloud must match what is installed:
SUCCEEDED with `current` on the new release (and the agent's record and `iot-agent status` saying
so), or FAILED with `current` back where it was and the release marked broken. Only linked releases
stay, no partial download, no spool entry and no open trial are left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from otakit import HEALTH, release, tar_dir
from sweep import Outcome, Run, flush_tpm, next_serial, op_at, sweep, sweep_env

from agent.update.install import slot
from agent.update.release import read_trial
from localcloud.artifacts import Artifacts
from localcloud.bench import agent_cmd, enrolled_device
from localcloud.cloud import LocalCloud
from localcloud.jobs import Jobs
from localcloud.ntp import Chrony
from localcloud.tokens import softhsm_token, tpm_token
from localcloud.vendor import CodeSigner, signed_doc

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT")


class World:
    def __init__(self, d: Path):
        self.cloud = LocalCloud(d / "cloud")
        self.info = self.cloud.up()
        self.ntp = Chrony(d / "chrony").start()
        self.signer = CodeSigner(d / "signer")
        self.jobs = Jobs(self.cloud.registry.db, self.cloud.registry.lock)
        self.artifacts = Artifacts.open(self.cloud.directory)
        self.root = d
        self.n = 0
        self.lock = threading.Lock()

    def https(self, data: bytes) -> str:
        with self.lock:
            self.n += 1
            p = self.root / f"artifact-{self.n}"
        p.write_bytes(data)
        return self.artifacts.put(p, f"ota/{p.name}")

    def close(self) -> None:
        self.ntp.stop()
        self.cloud.down()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("sweepupd"))
    yield w
    w.close()


def _token(kind: str, d: Path):
    return softhsm_token(d) if kind == "softhsm" else tpm_token(d)


def _plain(token) -> dict[str, str]:
    return {**token.full_env(), "PYTHONDONTWRITEBYTECODE": "1"}


def _status(world, job: str, thing: str) -> str | None:
    ex = world.jobs.execution(job, thing)
    return ex["status"] if ex else None


def _wait_terminal(world, job: str, thing: str, run: Run, timeout: float) -> str | None:
    """The job's terminal status, or None if the process ended first (killed) or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _status(world, job, thing)
        if st in TERMINAL:
            return st
        if run.poll() is not None:
            st = _status(world, job, thing)
            return st if st in TERMINAL else None
        time.sleep(0.2)
    return None


class PathUnit:
    """Plays iot-agent-install.path: runs the root helper whenever a request or a claimed one waits.
    While the sweep is armed the helper counts operations too, and a cut in either process takes both."""

    def __init__(self, spool: Path, cfg: Path, d: Path):
        self.spool, self.cfg, self.d = spool, cfg, d
        self.env: dict[str, str] = {}
        self.pgids = d / "helper.pgids"
        self.stop_ = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stop_.wait(0.2):
            if not self.env or not self.spool.is_dir():
                continue
            if any(p.name.endswith((".request.json", ".claimed.json")) for p in self.spool.iterdir()):
                with open(self.d / "helper.log", "ab") as log:  # the helper writes to its own copy
                    p = subprocess.Popen(
                        [sys.executable, "-m", "agent.update.privileged", "--config", str(self.cfg)],
                        cwd=REPO,
                        env=self.env,
                        start_new_session=True,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                self.pgids.write_text(f"{p.pid}\n")
                # Wait without reaping, and forget the group before the PID is free again: the agent's cut
                # kills the groups in this file, and a stale number could be a stranger's (PIDs wrap).
                deadline = time.monotonic() + 120
                while os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                    if time.monotonic() > deadline:
                        p.kill()
                        break
                    time.sleep(0.05)
                self.pgids.write_text("")
                p.wait(5)

    def close(self) -> None:
        self.stop_.set()
        self.thread.join(10)


def _releases_clean(target: Path) -> list[str]:
    out = []
    linked = {slot(target, n) for n in ("current", "previous", "broken")} - {None}
    have = {p.name for p in (target / "releases").iterdir()} if (target / "releases").is_dir() else set()
    if have != linked:
        out.append(f"releases {sorted(have)} but linked {sorted(linked)}")
    leftovers = [p.name for p in target.iterdir() if p.name.startswith(".") and p.name not in (".install.json",)]
    if leftovers:
        out.append(f"left in the target: {leftovers}")
    return out


def update_case(world, kind: str, root: Path, flow: str):
    """flow: "ota" (healthy), "rollback" (its health check fails), "privileged", "self-update"."""

    def case(n: int) -> Outcome:
        d = root / f"{flow}-{n}"
        token = _token(kind, d / "token")
        unit = None
        try:
            thing = f"gw-{next_serial('SWU')}"
            target_dir = d / "device" / "target"
            target = {"directory": str(target_dir)}
            if flow in ("ota", "rollback"):
                target.update(health_command=HEALTH, health_timeout_s=10.0)
            elif flow == "privileged":
                target["privileged"] = True
            else:
                target["self_update"] = True
            name = "agent" if flow == "self-update" else "app"
            # Pre-provisioned (the identity sweeps cover provisioning): the swept run is the device's first.
            dev = enrolled_device(
                world.cloud,
                token,
                thing,
                d / "device",
                [world.ntp.server],
                extra={
                    "defender": {"enabled": False},
                    "inventory": {"enabled": False},
                    "ota": {
                        "code_signing_certificate": str(world.signer.cert_path),
                        "ca_file": world.info["ca_file"],
                        "self_update_deadline_s": 60.0,
                        "privileged_timeout_s": 60.0,
                        "targets": {name: target},
                    },
                },
            )
            connected = rf"connected to localhost:\d+ as {thing}"
            if flow == "privileged":
                spool = dev.directory / "state" / "ota" / "spool"
                cfg = d / "install.toml"
                cfg.write_text(
                    f'code_signing_certificate = "{world.signer.cert_path}"\nspool = "{spool}"\n'
                    f'[targets.app]\ndirectory = "{target_dir}"\n'
                    f"health_command = {json.dumps(HEALTH)}\n"
                )
                cfg.chmod(0o600)
                unit = PathUnit(spool, cfg, d)
            if flow == "self-update":
                data = tar_dir(REPO / "agent", "agent", "2.0.0")
                cmd = [sys.executable, "-m", "agent.launch", "--config", str(dev.config_path)]
            else:
                data = release("2.0.0", "unhealthy\n" if flow == "rollback" else None)
                cmd = agent_cmd(dev.config_path, "run")
            want = "FAILED" if flow == "rollback" else "SUCCEEDED"
            job = f"upd-{flow}-{kind}-{n}"
            world.jobs.create(
                job, thing, signed_doc(world.signer, name, "2.0.0", f"{name}.tar", data, url=world.https(data))
            )
            ops = d / "ops.log"
            env = sweep_env(token.full_env(), ops, dev.directory, n)
            agent_pgids = d / "agent.pgids"
            if unit:
                env["IOT_AGENT_TEST_KILL_ALSO"] = str(unit.pgids)
                unit.env = {
                    **os.environ,
                    **{k: v for k, v in env.items() if k.startswith("IOT_AGENT_TEST")},
                    "IOT_AGENT_TEST_KILL_ALSO": str(agent_pgids),
                    "PYTHONDONTWRITEBYTECODE": "1",
                }
                unit.env.pop("IOT_AGENT_TEST_KILL_GROUP", None)  # the helper's own process only
            run = Run(cmd, env, d / "run1.log", pgid_file=agent_pgids).start()
            st = _wait_terminal(world, job, thing, run, 120)
            killed = st is None and run.poll() is not None
            if st is not None:
                if flow == "self-update" and st == "SUCCEEDED":
                    run.wait_for(r"starting the agent from release 2\.0\.0", 30)
                run.stop()
                if st != want:
                    return Outcome(n, False, "", f"uncut run ended {st}, expected {want}:\n{run.text()[-3000:]}")
            elif not killed:
                run.stop()
                return Outcome(n, False, "", f"neither finished nor killed:\n{run.text()[-3000:]}")
            else:
                run.reap()
                if run.proc.returncode >= 0:
                    return Outcome(n, False, "", f"exited {run.proc.returncode}:\n{run.text()[-3000:]}")
            out = Outcome(n, killed, op_at(ops, n) if killed else "")
            if killed and run.proc.returncode != -9:  # a native crash: recovery is checked all the same
                out.crash, out.op = f"crash:{run.proc.returncode}", f"- crash:{run.proc.returncode}"
            if unit:
                unit.env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
            flush_tpm(token)
            again = Run(cmd, _plain(token), d / "run2.log").start()
            st = _wait_terminal(world, job, thing, again, 120) if killed else st
            if flow == "self-update" and st == "SUCCEEDED" and killed:
                again.wait_for(r"starting the agent from release 2\.0\.0", 30)
            if killed:
                again.wait_for(connected, 60)
            again.stop()
            problems = []
            if st != want:
                problems.append(f"job ended {st}, expected {want}")
            current = slot(target_dir, "current")
            if want == "SUCCEEDED":
                status = json.loads(dev.cli("status", "--json").stdout)
                state = json.loads((dev.directory / "state" / "state.json").read_text())["data"]
                if current != "2.0.0" or status["updates"][name]["current"] != "2.0.0":
                    problems.append(f"current {current}, status {status['updates'][name]}")
                if state.get("ota", {}).get("installed", {}).get(name) != "2.0.0":
                    problems.append(f"the agent's record says {state.get('ota', {}).get('installed')}")
            elif current is not None or slot(target_dir, "broken") != "2.0.0":
                problems.append(f"after the rollback current {current}, broken {slot(target_dir, 'broken')}")
            if target_dir.is_dir():
                problems += _releases_clean(target_dir)
            if flow == "self-update" and read_trial(target_dir) is not None:
                problems.append(f"trial left open: {read_trial(target_dir)}")
            work = dev.directory / "state" / "ota"
            leftovers = [p.name for p in work.iterdir() if p.is_file()] + (
                [p.name for p in (work / "spool").iterdir()] if (work / "spool").is_dir() else []
            )
            if leftovers:
                problems.append(f"left in the OTA folder: {leftovers}")
            if problems:
                out.error = "; ".join(problems) + "\n" + again.text()[-3000:]
            return out
        finally:
            if unit:
                unit.close()
            token.stop()

    return case


@pytest.mark.parametrize("kind", ["softhsm", "tpm"])
@pytest.mark.parametrize("flow", ["ota", "rollback", "privileged", "self-update"])
def test_sweep_update(world, kind, flow, tmp_path):
    result = sweep(f"{flow}/{kind}", update_case(world, kind, tmp_path, flow))
    assert result.kill_points >= 5, result.summary()
    assert not result.failures, "\n\n".join(f"kill after op {o.n} ({o.op}): {o.error}" for o in result.failures)
