"""The README's "Drive it by hand" section, run as written.

The commands are the section's ```sh blocks, taken from README.md at test time (so the README and this
test cannot drift), joined in order and run by ONE `bash` with `set -euo pipefail`, as a user pasting
them into one shell would, with the virtualenv's bin folder on PATH. Only public commands run: the
outcome is checked afterwards through `localcloud`, `iot-agent status --json` and the files on disk,
never through the agent's modules.

Processes: the section starts the local cloud (`localcloud up`: mosquitto, the services, chronyd) and
the agent (`iot-agent run ... &`) and stops them itself (`kill "$agent_pid"`, `localcloud down`). If it
fails half-way, an EXIT trap added here records the lab folder and the agent's PID, and teardown stops
that PID and runs `localcloud down`, which stops the cloud's processes by the PIDs it recorded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from localcloud.procs import free_port

REPO = Path(__file__).resolve().parents[2]
TITLE = "## Drive it by hand"
# The README uses fixed loopback ports a reader can type; the test swaps in free ones (several runs, or
# test workers, side by side), replacing the literals wherever the section's commands use them.
README_BROKER_PORT = "18883"
README_NTP_PORT = "11123"
THING = "gw-SN-0001"
RUN_TIMEOUT_S = 240  # the section's own waits are bounded too (timeout 60 / 90 / 90)

# Added before the README's commands: strict mode, and a record of what to clean up whatever happens
# (bash runs the EXIT trap on a failing command under -e and on SIGTERM).
PROLOGUE = """set -euo pipefail
trap 'printf "%s\\n%s\\n" "${W:-}" "${agent_pid:-}" > "$DBH_STATE"' EXIT
"""


def section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(TITLE)
    nxt = re.search(r"^## ", text[start + len(TITLE) :], re.M)
    return text[start : start + len(TITLE) + nxt.start()] if nxt else text[start:]


def sh_blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", section(), re.M | re.S)


def readme_script(broker_port: int, ntp_port: int) -> str:
    blocks = sh_blocks()
    assert len(blocks) >= 8, f"the section's ```sh blocks: {len(blocks)}"
    body = "\n".join(blocks)
    for literal in (README_BROKER_PORT, README_NTP_PORT):
        assert re.search(rf"\b{literal}\b", body), f"the section no longer uses port {literal}; update this test"
    body = re.sub(rf"\b{README_BROKER_PORT}\b", str(broker_port), body)
    body = re.sub(rf"\b{README_NTP_PORT}\b", str(ntp_port), body)
    return PROLOGUE + body


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, a bounded wait, then SIGKILL: for a PID this test's script started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    lab: Path | None  # the section's $W
    agent_pid: int | None
    ntp_port: int
    elapsed_s: float

    def tool(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A public command, run as the section's shell would (PATH, SOFTHSM2_CONF, in the lab folder)."""
        env = {**_env(), "SOFTHSM2_CONF": str(self.lab / "softhsm2.conf")}
        r = subprocess.run(list(argv), cwd=self.lab, env=env, capture_output=True, text=True, timeout=60)
        if check:
            assert r.returncode == 0, f"{' '.join(argv)}: exit {r.returncode}\n{r.stderr}"
        return r

    def explain(self) -> str:
        log = (self.lab / "agent.log") if self.lab else None
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else "(no agent.log)"
        return (
            f"exit {self.rc} after {self.elapsed_s:.1f} s\n--- stdout\n{self.stdout[-3000:]}\n"
            f"--- stderr\n{self.stderr[-3000:]}\n--- agent.log\n{tail}"
        )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "CREDENTIALS_DIRECTORY")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the virtualenv's bin
    return env


def run_script(tmp_path: Path, edit=lambda s: s) -> Run:
    """Run the section's commands (after `edit`) in one bash; stop whatever they left running."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    state = tmp_path / "dbh-state"
    ntp_port = free_port(socket.SOCK_DGRAM)
    script = edit(readme_script(free_port(), ntp_port))
    (tmp_path / "drive-by-hand.sh").write_text(script)  # what ran, for whoever reads a failure
    env = {**_env(), "TMPDIR": str(tmpdir), "DBH_STATE": str(state)}
    # Output to files, not pipes: the agent started with `&` inherits them and would hold a pipe open
    # after bash has exited (a failed run would then look like a hung one).
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    t0 = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            ["bash", str(tmp_path / "drive-by-hand.sh")],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    lab = agent_pid = None
    note = ""
    try:
        try:
            proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            note = f"\n(test: the script did not finish within {RUN_TIMEOUT_S} s)"
            proc.send_signal(signal.SIGTERM)  # bash runs the EXIT trap, which records what to stop
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if state.exists():
            w, _, pid = state.read_text().partition("\n")
            lab = Path(w) if w.strip() else None
            agent_pid = int(pid) if pid.strip().isdigit() else None
        if lab is None:  # the trap did not run: the lab is what `mktemp -d` made in our TMPDIR, if anything
            made = [p for p in tmpdir.iterdir() if p.is_dir()]
            lab = made[0] if len(made) == 1 else None
        if agent_pid is not None and "iot-agent" in _cmdline(agent_pid):  # that PID, still the agent
            stop_pid(agent_pid)
        if lab is not None and (lab / ".localcloud").is_dir():
            subprocess.run(
                ["localcloud", "--dir", str(lab / ".localcloud"), "down"], env=_env(), capture_output=True, timeout=60
            )
    out, err = out_path.read_text(errors="replace"), err_path.read_text(errors="replace") + note
    return Run(proc.returncode, out, err, lab, agent_pid, ntp_port, elapsed)


def assert_nothing_left_running(run: Run) -> None:
    assert run.agent_pid is None or not alive(run.agent_pid), "the agent is still running"
    cloud = run.lab / ".localcloud"
    if not cloud.is_dir():
        return
    status = json.loads(run.tool("localcloud", "--dir", str(cloud), "status").stdout)
    assert status["running"] is False, status
    assert not (cloud / "pids.json").exists(), "localcloud down did not stop the broker and services"
    pidfile = cloud / "ntp" / "chronyd.pid"
    if pidfile.exists():
        assert not alive(int(pidfile.read_text().strip())), "chronyd (up --ntp-port) is still running"


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> Run:
    return run_script(tmp_path_factory.mktemp("drive-by-hand"))


def test_the_sections_commands_run_to_the_end(walked):
    assert walked.rc == 0, walked.explain()
    print(f"the section's commands ran in {walked.elapsed_s:.1f} s")


def test_the_device_is_provisioned(walked):
    assert walked.rc == 0, walked.explain()
    certs = [line.split("\t") for line in walked.tool("localcloud", "certs", "list").stdout.splitlines()]
    device = [c for c in certs if c[2] == "device"]
    assert [(c[1], c[3]) for c in device] == [("ACTIVE", THING)], certs
    claim = [c for c in certs if c[2] == "claim"]
    assert [c[1] for c in claim] == ["ACTIVE"], certs  # the one `certs sign-claim` registered
    things = [line.split("\t") for line in walked.tool("localcloud", "things", "list").stdout.splitlines()]
    assert [(t[0], json.loads(t[1])) for t in things] == [(THING, {"serial": "SN-0001"})], things
    assert device[0][0].startswith(things[0][2])

    status = json.loads(walked.tool("iot-agent", "status", "--config", "config.toml", "--json").stdout)
    assert status["thing_name"] == THING
    assert status["provisioning"]["step"] == "done", status["provisioning"]
    assert status["serial_number"] == "SN-0001"
    assert device[0][0] in Path(status["certificate_file"]).name  # the device uses the certificate the cloud activated
    assert status["certificate_expired"] is False and status["certificate_error"] is None
    keys = walked.tool("iot-agent", "keys", "list", "--config", "config.toml").stdout
    assert "device" in keys and "claim" in keys, keys  # both keys live on the SoftHSM token the section made


def test_the_clock_came_from_the_local_clouds_ntp_server(walked):
    assert walked.rc == 0, walked.explain()
    log = (walked.lab / "agent.log").read_text()
    assert f"clock trusted: 127.0.0.1:{walked.ntp_port} agrees with the system clock" in log, log[-2000:]


def _job(walked: Run, job_id: str) -> dict:
    return json.loads(walked.tool("localcloud", "jobs", "describe", job_id, "--thing", THING).stdout)


def test_the_schema_2_update_is_installed_as_one_file(walked):
    assert walked.rc == 0, walked.explain()
    job = _job(walked, "app-1-0-0")
    assert job["status"] == "SUCCEEDED", job
    assert job["statusDetails"]["result"] == "installed" and job["statusDetails"]["version"] == "1.0.0", job
    app = walked.lab / "app"
    release = app / "releases" / "1.0.0"
    assert sorted(p.name for p in release.iterdir()) == ["app.bin"]  # unpack = false: the artifact, kept whole
    assert (release / "app.bin").is_file() and not (release / "app.bin").is_symlink()
    assert (release / "app.bin").read_bytes() == (walked.lab / "app.bin").read_bytes()
    assert os.readlink(app / "current") == "releases/1.0.0"
    assert not (app / "previous").exists() and not (app / "broken").exists()


def test_the_afr_ota_update_is_installed_from_its_tar(walked):
    assert walked.rc == 0, walked.explain()
    job = _job(walked, "bundle-2-0-0")
    assert "afr_ota" in job["jobDocument"], job
    assert job["status"] == "SUCCEEDED", job
    bundle = walked.lab / "bundle"
    assert os.readlink(bundle / "current") == "releases/2.0.0"
    assert (bundle / "current" / "hello.txt").read_text() == "hello\n"
    assert (bundle / "current" / "VERSION").read_text() == "2.0.0\n"


def test_status_shows_both_releases_and_nothing_is_left_running(walked):
    assert walked.rc == 0, walked.explain()
    status = json.loads(walked.tool("iot-agent", "status", "--config", "config.toml", "--json").stdout)
    assert status["updates"]["app"]["current"] == "1.0.0", status["updates"]
    assert status["updates"]["bundle"]["current"] == "2.0.0", status["updates"]
    assert status["jobs"]["last"]["status"] == "SUCCEEDED"
    assert_nothing_left_running(walked)


def test_a_wrong_command_fails_the_run_and_is_cleaned_up(tmp_path):
    """The harness is not blind: a mistyped command in the section stops the run with an error, and
    what it had started (the local cloud) is stopped anyway."""
    assert "localcloud certs sign-claim " in readme_script(1, 2)
    run = run_script(tmp_path, lambda s: s.replace("localcloud certs sign-claim ", "localcloud certs sign-claims ", 1))
    assert run.rc != 0, run.explain()
    assert "invalid choice: 'sign-claims'" in run.stderr, run.explain()
    assert run.lab is not None and (run.lab / ".localcloud" / "endpoint.json").exists()  # it got as far as `up`
    assert_nothing_left_running(run)
