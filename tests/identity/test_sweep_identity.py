"""Power cut after every state-changing operation of provisioning and of certificate rotation, on
SoftHSM and on a software TPM (see tests/sweep.py for how the sweep works).

After each cut and a restart the device must hold exactly one working identity: it connects as its
thing, the cloud has one thing and exactly one ACTIVE certificate for it, which is the certificate
the device uses, the token holds exactly one device key (the one in use), no private key is on disk;
and the flow has finished (provisioned; rotated, with the old certificate retired).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sweep import Outcome, Run, flush_tpm, next_serial, op_at, sweep, sweep_env

from localcloud.bench import agent_cmd, enrolled_device, fresh_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.tokens import softhsm_token, tpm_token

QUIET = {"defender": {"enabled": False}, "inventory": {"enabled": False}, "jobs": {"enabled": False}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweepid")
    cloud = LocalCloud(d / "cloud")
    cloud.up()
    ntp = Chrony(d / "chrony").start()
    yield cloud, ntp
    ntp.stop()
    cloud.down()


def _token(kind: str, d: Path):
    return softhsm_token(d) if kind == "softhsm" else tpm_token(d)


def _plain_env(token) -> dict[str, str]:
    return {**token.full_env(), "PYTHONDONTWRITEBYTECODE": "1"}


def identity_problems(cloud, dev, thing: str, key_prefix: str = "device") -> list[str]:
    """What is wrong with the device's identity, or [] (the invariants every cut must keep)."""
    out = []
    st = dev.cli("status", "--json")
    if st.returncode != 0:
        return [f"status failed: {st.stderr.strip()[-300:]}"]
    status = json.loads(st.stdout)
    if status["thing_name"] != thing:
        out.append(f"thing {status['thing_name']!r}, expected {thing!r}")
    things = [n for n, _ in cloud.registry.things() if n == thing]
    if len(things) != 1:
        out.append(f"{len(things)} things named {thing}")
    active = [c for c in cloud.registry.certificates() if c.thing == thing and c.status == "ACTIVE"]
    if len(active) != 1:
        out.append(f"{len(active)} ACTIVE certificates for {thing}")
    elif (
        not status["certificate_file"] or Path(status["certificate_file"]).read_text().strip() != active[0].pem.strip()
    ):
        out.append("the certificate in use is not the ACTIVE one")
    keys = [line.split("\t")[0] for line in dev.cli("keys", "list").stdout.splitlines() if line.startswith(key_prefix)]
    if keys != [status["key_label"]]:
        out.append(f"device keys on the token {keys}, in use {status['key_label']!r}")
    leaked = subprocess.run(["grep", "-rl", "PRIVATE KEY", str(dev.directory)], capture_output=True, text=True).stdout
    if leaked:
        out.append(f"private key on disk: {leaked.strip()}")
    temps = [p.name for p in (dev.directory / "state").iterdir() if p.name.endswith(".tmp")]
    if temps:
        out.append(f"half-written files left: {temps}")
    return out


def _finish(run: Run, pattern: str, timeout: float = 90) -> tuple[bool, str]:
    """(killed, error) for the swept run: it either reached `pattern` or died by SIGKILL. A run that died of
    another signal (a native crash) counts as cut there, with the error text "crash:<signal>" so the
    sweep reports it; the restart must recover from it like from a cut."""
    if run.wait_for(pattern, timeout):
        run.stop()
        return False, ""
    try:
        rc = run.wait(30)
    except subprocess.TimeoutExpired:
        run.stop()
        return False, "neither finished nor killed"
    run.reap()
    if rc == -9:
        return True, ""
    if rc < 0:
        return True, f"crash:{rc}"
    return False, f"exited {rc} before finishing:\n{run.text()[-2000:]}"


def _new_device(world, kind: str, d: Path, prefix: str):
    """A factory-fresh device on its own token: (token, device, thing, the log line of its connection)."""
    cloud, ntp = world
    token = _token(kind, d / "token")
    try:
        serial = next_serial(prefix)
        cloud.registry.allow_serials([serial])
        dev = fresh_device(cloud, token, serial, d / "device", [ntp.server], extra=QUIET)
    except BaseException:
        token.stop()
        raise
    return token, dev, f"gw-{serial}", rf"connected to localhost:\d+ as gw-{serial}"


def provisioning_case(world, kind: str, root: Path):
    cloud, ntp = world

    def case(n: int) -> Outcome:
        d = root / f"prov-{n}"
        token, dev, thing, connected = _new_device(world, kind, d, "SWP")
        try:
            ops = d / "ops.log"
            killed, error = _finish(
                Run(
                    agent_cmd(dev.config_path, "run"),
                    sweep_env(token.full_env(), ops, dev.directory, n),
                    d / "run1.log",
                ).start(),
                connected,
            )
            out = Outcome(n, killed, op_at(ops, n) if killed else "", error)
            if error.startswith("crash:"):
                out.error, out.crash, out.op = "", error, f"- {error}"
            elif error:
                return out
            flush_tpm(token)
            again = Run(agent_cmd(dev.config_path, "run"), _plain_env(token), d / "run2.log").start()
            if not again.wait_for(connected, 90):
                again.stop()
                out.error = f"no connection after the restart:\n{again.text()[-3000:]}"
                return out
            again.stop()
            problems = identity_problems(cloud, dev, thing)
            if problems:
                out.error = "; ".join(problems) + "\n" + again.text()[-2000:]
            return out
        finally:
            token.stop()

    return case


def rotation_case(world, kind: str, root: Path):
    cloud, ntp = world

    def case(n: int) -> Outcome:
        d = root / f"rot-{n}"
        token = _token(kind, d / "token")
        try:
            # Pre-provisioned (the provisioning sweep covers how a device gets its identity): the swept run
            # is the device's first, and its rotation starts at once.
            thing = f"gw-{next_serial('SWR')}"
            connected = rf"connected to localhost:\d+ as {thing}"
            dev = enrolled_device(cloud, token, thing, d / "device", [ntp.server], extra=QUIET)
            before = json.loads(dev.cli("status", "--json").stdout)["certificate_file"]
            dev.cli("rotate")
            ops = d / "ops.log"
            killed, error = _finish(
                Run(
                    agent_cmd(dev.config_path, "run"),
                    sweep_env(token.full_env(), ops, dev.directory, n),
                    d / "run1.log",
                ).start(),
                r"certificate rotation done",
            )
            out = Outcome(n, killed, op_at(ops, n) if killed else "", error)
            if error.startswith("crash:"):
                out.error, out.crash, out.op = "", error, f"- {error}"
            elif error:
                return out
            flush_tpm(token)
            again = Run(agent_cmd(dev.config_path, "run"), _plain_env(token), d / "run2.log").start()
            done = False
            if again.wait_for(connected, 90):
                # The rotation finishes after the restart, or had finished before the cut. `iot-agent status`
                # says which; between its calls the log is watched (a CLI process every half second costs CPU).
                for _ in range(20):  # bounded: about 60 s
                    st = json.loads(dev.cli("status", "--json").stdout)
                    if st["rotation"]["step"] == "idle" and (st["rotation"]["last"] or {}).get("status") == "SUCCEEDED":
                        done = True
                        break
                    again.wait_for(r"certificate rotation done", 3)
            again.stop()
            if not done:
                out.error = f"the rotation did not finish after the restart:\n{again.text()[-3000:]}"
                return out
            problems = identity_problems(cloud, dev, thing)
            if json.loads(dev.cli("status", "--json").stdout)["certificate_file"] == before:
                problems.append("still on the certificate from before the rotation")
            if problems:
                out.error = "; ".join(problems) + "\n" + again.text()[-2000:]
            return out
        finally:
            token.stop()

    return case


@pytest.mark.parametrize("kind", ["softhsm", "tpm"])
def test_sweep_provisioning(world, kind, tmp_path):
    result = sweep(f"provisioning/{kind}", provisioning_case(world, kind, tmp_path))
    assert result.kill_points >= 8, result.summary()
    assert not result.failures, "\n\n".join(f"kill after op {o.n} ({o.op}): {o.error}" for o in result.failures)


@pytest.mark.parametrize("kind", ["softhsm", "tpm"])
def test_sweep_rotation(world, kind, tmp_path):
    result = sweep(f"rotation/{kind}", rotation_case(world, kind, tmp_path))
    assert result.kill_points >= 8, result.summary()
    assert not result.failures, "\n\n".join(f"kill after op {o.n} ({o.op}): {o.error}" for o in result.failures)
