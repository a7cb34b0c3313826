"""The installed agent under a real systemd: a Debian bookworm root file system (built once by
scripts/nspawn-image.sh, with the agent installed by scripts/install.sh) booted with systemd-nspawn.
The container shares the host's network namespace, so the agent reaches the local cloud and NTP on
the host's loopback, as a device reaches AWS."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony

REPO = Path(__file__).resolve().parents[2]
# One worker runs this module: its image fixture builds .deps/nspawn, which two builders must not share.
pytestmark = pytest.mark.xdist_group("nspawn")
SERIAL = "NSPAWN-1"
THING = f"gw-{SERIAL}"


class Container:
    def __init__(self, rootfs: Path, xchg: Path, log: Path):
        self.log = log
        with open(log, "w") as out:  # the container writes to its own copy of the descriptor
            self.proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "-q",
                    "-D",
                    str(rootfs),
                    "--register=no",
                    "--keep-unit",
                    "--volatile=overlay",
                    "--boot",
                    "--console=pipe",
                    f"--bind={xchg}:/xchg",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.pid1 = None
        try:
            self._wait_booted()
        except BaseException:
            self.stop()  # a container that did not boot must not outlive the test (it holds the image)
            raise

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + 30
        while self.pid1 is None and time.monotonic() < deadline:
            for p in Path("/proc").iterdir():
                if p.name.isdigit():
                    try:
                        if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            self.pid1 = int(p.name)
                    except (OSError, IndexError, ValueError):
                        pass
            time.sleep(0.2)
        assert self.pid1, "the container's init did not start"
        # Right after init starts, the system bus may not exist yet ("Failed to connect to bus"), and
        # systemctl gives up at once instead of waiting: ask again until booted (bounded: 90 s).
        deadline = time.monotonic() + 90
        while True:
            r = self.run("systemctl", "is-system-running", "--wait", timeout=90, check=False)
            if r.stdout.strip() in ("running", "degraded") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if r.stdout.strip() not in ("running", "degraded"):
            ended = "" if self.proc.poll() is None else f"systemd-nspawn ended with {self.proc.returncode}; "
            tail = self.log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"the container did not boot: {ended}{r.stdout}{r.stderr}console:\n{tail}")

    def run(self, *cmd: str, timeout: float = 60, check: bool = True, input: str | None = None):
        r = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *cmd], capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd}: exit {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def write(self, path: str, text: str, mode: str = "0644", owner: str = "root") -> None:
        self.run("sh", "-c", f"umask 077; cat > {path} && chmod {mode} {path} && chown {owner}: {path}", input=text)

    def show(self, prop: str, unit: str = "iot-agent.service") -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def wait_show(self, prop: str, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        value = ""
        while time.monotonic() < deadline:
            value = self.show(prop)
            if re.search(pattern, value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"{prop} never matched {pattern!r} (last {value!r}); journal:\n{self.journal()}")

    def journal(self, lines: int = 60) -> str:
        return self.run("journalctl", "-u", "iot-agent", "--no-pager", "-n", str(lines), check=False).stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def image():
    if os.geteuid() != 0:
        pytest.fail("booting a container needs root")
    r = subprocess.run(["sh", str(REPO / "scripts/nspawn-image.sh")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    # install.sh ran inside the image (apt, venv, units, sysusers, tmpfiles, systemctl enable); again: no change.
    again = subprocess.run(["sh", str(REPO / "scripts/nspawn-image.sh")], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.strip() == "install: nothing to change", again.stdout + again.stderr
    return Path(os.environ.get("IOT_AGENT_NSPAWN_DIR", REPO / ".deps/nspawn")) / "rootfs"


@pytest.fixture(scope="module")
def device(image, tmp_path_factory):
    """A booted container with a factory-fresh device (SoftHSM token, claim certificate) and a local cloud."""
    d = tmp_path_factory.mktemp("nspawn")
    cloud = LocalCloud(d / "cloud")
    cloud.registry.allow_serials([SERIAL])
    info = cloud.up()
    ntp = Chrony(d / "chrony").start()
    xchg = d / "xchg"
    xchg.mkdir()
    xchg.chmod(0o1777)  # the agent's user writes its CSR here
    box = None
    try:
        box = Container(image, xchg, d / "container.log")
        box.write("/etc/iot-agent/ca.pem", Path(info["ca_file"]).read_text())
        box.write("/etc/iot-agent/pkcs11-pin", "1234\n", mode="0600")
        box.write(
            "/etc/iot-agent/config.toml",
            f"""
[device]
state_dir = "/var/lib/iot-agent"
[broker]
endpoint = "localhost"
port = {info["port"]}
ca_file = "ca.pem"
reconnect_min_s = 0.5
reconnect_max_s = 4.0
[pkcs11]
library = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "iot-agent"
[provisioning]
enabled = true
retry_min_s = 1.0
retry_max_s = 5.0
[clock]
ntp_servers = ["{ntp.server}"]
retry_min_s = 0.5
retry_max_s = 2.0
""",
        )
        # The SoftHSM token lives in the agent's state folder; the unit learns where through a drop-in.
        box.write(
            "/var/lib/iot-agent/softhsm2.conf",
            "directories.tokendir = /var/lib/iot-agent/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
            owner="iot-agent",
        )
        box.run("install", "-d", "-o", "iot-agent", "-g", "iot-agent", "-m", "0700", "/var/lib/iot-agent/tokens")
        box.run("mkdir", "-p", "/etc/systemd/system/iot-agent.service.d")
        box.write(
            "/etc/systemd/system/iot-agent.service.d/softhsm.conf",
            "[Service]\nEnvironment=SOFTHSM2_CONF=/var/lib/iot-agent/softhsm2.conf\nWatchdogSec=10\n",
        )
        box.run("systemctl", "daemon-reload")
        env = ["env", "SOFTHSM2_CONF=/var/lib/iot-agent/softhsm2.conf"]
        box.run(
            "runuser",
            "-u",
            "iot-agent",
            "--",
            *env,
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "iot-agent",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        )
        # The factory steps, as the agent's user, with the PIN handed over as the service would.
        factory = [
            "systemd-run",
            "--quiet",
            "--pipe",
            "--wait",
            "-p",
            "User=iot-agent",
            "-p",
            "LoadCredential=pkcs11-pin:/etc/iot-agent/pkcs11-pin",
            "-p",
            "Environment=SOFTHSM2_CONF=/var/lib/iot-agent/softhsm2.conf",
            "/opt/iot-agent/venv/bin/iot-agent",
            "--config",
            "/etc/iot-agent/config.toml",
            "factory",
        ]
        box.run(*factory, "init", "--serial", SERIAL, "--csr-out", "/xchg/claim.csr")
        cloud.sign_claim_csr((xchg / "claim.csr").read_bytes(), xchg / "claim.pem")
        box.run(*factory, "claim-cert", "/xchg/claim.pem")
        yield box, cloud
    finally:
        if box:
            box.stop()
        ntp.stop()
        cloud.down()


def test_the_service_provisions_reports_status_and_stays_in_its_sandbox(device):
    box, cloud = device
    box.run("systemctl", "start", "iot-agent")  # Type=notify: returns once READY=1 arrived
    assert box.show("ActiveState") == "active"
    box.wait_show("StatusText", rf"^connected as {THING}")
    status = box.run("systemctl", "status", "--no-pager", "iot-agent", check=False).stdout
    assert f'Status: "connected as {THING}' in status
    assert [t for t, _ in cloud.registry.things()] == [THING]
    main = box.show("MainPID")
    users = box.run("ps", "-o", "user=", "--ppid", main, "-p", main).stdout.split()
    assert users and set(users) == {"iot-agent"}, users  # the launcher and the agent
    agent_pid = box.run("pgrep", "-P", main).stdout.split()[0]
    environ = box.run("cat", f"/proc/{agent_pid}/environ").stdout.split("\0")
    assert any(e.startswith("CREDENTIALS_DIRECTORY=") for e in environ)  # the PIN came as a credential
    assert "pin_file" not in box.run("cat", "/etc/iot-agent/config.toml").stdout
    # Inside the agent's own namespaces and identity: /usr and /etc are read-only, its state folder is not.
    uid, gid = box.run("id", "-u", "iot-agent").stdout.strip(), box.run("id", "-g", "iot-agent").stdout.strip()
    as_agent = ["nsenter", "-t", agent_pid, "-m", "-S", uid, "-G", gid, "--"]
    for path in ("/usr/lib/evil", "/etc/evil", "/opt/iot-agent/evil"):
        r = box.run(*as_agent, "sh", "-c", f"echo x > {path}", check=False)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, (path, r.stderr)
    box.run(*as_agent, "sh", "-c", "echo x > /var/lib/iot-agent/probe && rm /var/lib/iot-agent/probe")
    # Everything the agent owns outside its state folder: nothing.
    found = box.run(
        "find", "/", "-xdev", "-user", "iot-agent", "-not", "-path", "/var/lib/iot-agent*", check=False
    ).stdout.split()
    assert found == [], found


def test_the_watchdog_restarts_a_hung_agent(device):
    box, _ = device
    box.write(
        "/etc/systemd/system/iot-agent.service.d/hang.conf",
        "[Service]\nEnvironment=IOT_AGENT_TEST_FAILPOINT=daemon.main_loop_hang\n",
    )
    box.run("systemctl", "daemon-reload")
    box.run("journalctl", "--rotate", check=False)
    box.run("journalctl", "--vacuum-time=1s", check=False)
    box.run("systemctl", "restart", "iot-agent")
    deadline, journal = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # WatchdogSec=10 (drop-in): the hung loop is killed and restarted
        journal = box.journal(400)
        if "Watchdog timeout" in journal and "Scheduled restart job" in journal.split("Watchdog timeout", 1)[1]:
            break
        time.sleep(1)
    assert "test fail point daemon.main_loop_hang reached" in journal, journal
    assert "Watchdog timeout" in journal and "Scheduled restart job" in journal.split("Watchdog timeout", 1)[1], journal
    box.run("rm", "/etc/systemd/system/iot-agent.service.d/hang.conf")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "reset-failed", "iot-agent", check=False)
    box.run("systemctl", "restart", "iot-agent")
    box.wait_show("StatusText", rf"^connected as {THING}")


def test_the_path_unit_runs_the_privileged_install_step(device, tmp_path):
    """A request left in the agent's spool starts iot-agent-install.service (root, sandboxed), which
    re-verifies and installs into a target only its own config names, and answers in the spool."""
    import json

    from otakit import CodeSigner, release

    box, _ = device
    signer = CodeSigner(tmp_path / "signer")
    box.write("/etc/iot-agent/codesign.pem", signer.cert_path.read_text())
    box.write(
        "/etc/iot-agent/install.toml",
        'code_signing_certificate = "/etc/iot-agent/codesign.pem"\n'
        'spool = "/var/lib/iot-agent/ota/spool"\n[targets.firmware]\ndirectory = "/opt/firmware"\n',
        mode="0600",
    )
    box.run("mkdir", "-p", "/etc/systemd/system/iot-agent-install.service.d", "/opt/firmware")
    box.write(
        "/etc/systemd/system/iot-agent-install.service.d/targets.conf", "[Service]\nReadWritePaths=/opt/firmware\n"
    )
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "iot-agent-install.path")
    spool = "/var/lib/iot-agent/ota/spool"
    box.run("install", "-d", "-o", "iot-agent", "-g", "iot-agent", "-m", "0700", "/var/lib/iot-agent/ota", spool)
    import base64

    good, bad = release("1.0.0", target="firmware"), release("2.0.0", "tampered\n", target="firmware")
    manifests = {v: signer.manifest("firmware", v, "fw.tar", d) for v, d in (("1.0.0", good), ("2.0.0", good))}
    for key, data, version in (("00000000000000a1", good, "1.0.0"), ("00000000000000b2", bad, "2.0.0")):
        raw, sig = manifests[version]  # 2.0.0: the manifest of other bytes than those in the spool
        xfer = Path(f"/proc/{box.pid1}/root/xchg/{key}.artifact")  # the shared folder, seen from the host
        xfer.write_bytes(data)
        box.run("runuser", "-u", "iot-agent", "--", "cp", f"/xchg/{key}.artifact", f"{spool}/{key}.artifact")
        req = json.dumps(
            {
                "job_id": key,
                "target": "firmware",
                "name": "fw.tar",
                "signature": sig,
                "manifest": base64.b64encode(raw).decode(),
            }
        )
        box.run("runuser", "-u", "iot-agent", "--", "sh", "-c", f"cat > {spool}/{key}.request.json", input=req)
        deadline, result = time.monotonic() + 60, None
        while time.monotonic() < deadline and result is None:
            r = box.run("cat", f"{spool}/{key}.result.json", check=False)
            result = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None
            time.sleep(0.5)
        assert result is not None, box.run("journalctl", "-u", "iot-agent-install", "--no-pager", check=False).stdout
        if version == "1.0.0":
            assert result["status"] == "SUCCEEDED", result
        else:
            assert result["status"] == "REJECTED" and "signed manifest" in result["reason"], result
    assert box.run("readlink", "/opt/firmware/current").stdout.strip() == "releases/1.0.0"
    assert box.run("stat", "-c", "%U", "/opt/firmware/releases/1.0.0").stdout.strip() == "root"
