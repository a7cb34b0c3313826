"""Secure tunneling end to end: the agent (a real `iot-agent run` on SoftHSM) gets the notification
from the local cloud over MQTT, opens the tunnel to the local cloud's tunneling endpoint, and a real
ssh/scp (and an HTTP client) reach services on the "gateway" through the source side, all over ONE
tunnel at once. Then what must end or resume does: the local service closing, the source leaving,
a network drop, the cloud closing the tunnel."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from localcloud import pace
from localcloud.bench import enrolled_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.shadows import Shadows
from localcloud.sshd import Sshd
from localcloud.tunnel_source import SourceProxy

REPO = Path(__file__).resolve().parents[2]
THING = "gw-tunnel"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test's output stays readable
        pass


@pytest.fixture
def gateway(tmp_path):
    """The services on the device: a real sshd and an HTTP server, both on loopback."""
    sshd = Sshd(tmp_path / "sshd").start()
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello through the tunnel\n")
    handler = lambda *a, **k: _Quiet(*a, directory=str(www), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield sshd, httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()
    sshd.stop()


@pytest.fixture
def world(tmp_path, softhsm, agents, gateway):
    sshd, http_port = gateway
    c = LocalCloud(tmp_path / "cloud")
    ntp = Chrony(tmp_path / "chrony").start()
    info = c.up()
    dev = enrolled_device(
        c,
        softhsm,
        THING,
        tmp_path / "dev",
        [ntp.server],
        extra={
            "tunneling": {
                "enabled": True,
                "endpoint": "localhost",
                "port": info["tunnels_port"],
                "reconnect_s": 30.0,
                "services": {"SSH": {"target": f"127.0.0.1:{sshd.port}"}, "HTTP": {"target": f"localhost:{http_port}"}},
            }
        },
    )
    a = agents(dev)
    a.wait_for("waiting for tunnel notifications", timeout=60)
    yield c, info, a, sshd
    ntp.stop()
    c.down()


def _open(c: LocalCloud, services: str, timeout: str = "10m") -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "localcloud", "--dir", str(c.directory), "tunnels", "open", "--thing", THING,
         "--services", services, "--timeout", timeout],
        cwd=REPO, capture_output=True, text=True, timeout=pace.scaled(60),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _source(c: LocalCloud, info: dict, token: str, services: tuple[str, ...]) -> SourceProxy:
    proxy = SourceProxy(
        "localhost", info["tunnels_port"], c.ca.cert_path, token, {s: ("127.0.0.1", 0) for s in services}
    )
    proxy.start()
    return proxy


def _ssh(sshd: Sshd, port: int, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", *sshd.ssh_args(port), sshd.host, command], capture_output=True, text=True, timeout=pace.scaled(timeout)
    )


def _agent_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _agent_sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def _wait(cond, what: str, timeout: float = 30) -> None:
    deadline = pace.deadline(timeout)
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {pace.scaled(timeout):g} s")


def test_ssh_scp_and_http_over_one_tunnel_then_the_cloud_closes_it(world, tmp_path):
    c, info, a, sshd = world
    pid = a.proc.pid
    threads0, sockets0 = _agent_threads(pid), _agent_sockets(pid)
    opened = _open(c, "SSH,HTTP")
    a.wait_for(r"secure tunneling: opening tunnel \w+ to localhost:\d+ for SSH, HTTP", timeout=30)
    a.wait_for(r"tunnel \w+: connected to localhost:\d+ \(protocol v3\)", timeout=30)
    src = _source(c, info, opened["sourceAccessToken"], ("SSH", "HTTP"))
    try:
        ssh_port, http_port = src.addresses["SSH"][1], src.addresses["HTTP"][1]
        # a command on the gateway
        r = _ssh(sshd, ssh_port, "echo hello from $(hostname); id -un")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("hello from "), r.stdout
        # two SSH sessions and an HTTP request at the same time, over the one tunnel
        first = subprocess.Popen(
            ["ssh", *sshd.ssh_args(ssh_port), sshd.host, "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        second = subprocess.Popen(
            ["ssh", *sshd.ssh_args(ssh_port), sshd.host, "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        _wait(lambda: src.open_connections("SSH") == 2, "two SSH connections open")
        page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/hello.txt", timeout=pace.scaled(30)).read()
        assert page == b"hello through the tunnel\n"
        out1, _ = first.communicate(b"one\n", timeout=pace.scaled(60))
        out2, _ = second.communicate(b"two\n", timeout=pace.scaled(60))
        assert (out1, out2, first.returncode, second.returncode) == (b"one\n", b"two\n", 0, 0)
        # scp of 20 MB arrives whole
        blob = tmp_path / "blob.bin"
        blob.write_bytes(os.urandom(20 * 1024 * 1024))
        dest = tmp_path / "received.bin"
        r = subprocess.run(
            ["scp", *sshd.scp_args(ssh_port), str(blob), f"{sshd.host}:{dest}"],
            capture_output=True, text=True, timeout=pace.scaled(120),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(blob.read_bytes()).digest()

        # one audit line per connection: service, start, end, bytes each way
        def audit() -> list[str]:
            rx = re.compile(r"tunnel \w+: (SSH|HTTP) connection \d+ \(stream \d+\) \S+Z to \S+Z: ")
            return [line for _, line in a.lines if rx.search(line)]

        # ssh, two cats, scp; and the HTTP request, each when its connection ends
        _wait(lambda: sum(" SSH " in x for x in audit()) >= 4 and any(" HTTP " in x for x in audit()), "audit lines")
        audit = audit()
        scp_line = max(audit, key=lambda x: int(re.search(r"(\d+) bytes to the service", x).group(1)))
        assert int(re.search(r"(\d+) bytes to the service", scp_line).group(1)) > 20 * 1024 * 1024
        # the inventory shadow reports it (checked by the reporter every 10 s)
        shadows = Shadows(c.registry.db, c.registry.lock)

        def reported_tunnels() -> list:
            doc = shadows.get(THING, "inventory")
            return ((doc.get("state") or {}).get("reported") or {}).get("tunnels") or []

        _wait(lambda: [t.get("services") for t in reported_tunnels()] == [["SSH", "HTTP"]], "the shadow", 60)
        # status shows the open tunnel
        st = a.device.cli("status", "--json")
        tunnels = json.loads(st.stdout)["tunnels"]
        assert [t["services"] for t in tunnels] == [["SSH", "HTTP"]], st.stdout
        # the cloud closes the tunnel: both sides end, the agent keeps nothing of it
        r = subprocess.run(
            [sys.executable, "-m", "localcloud", "--dir", str(c.directory), "tunnels", "close", opened["tunnelId"]],
            cwd=REPO, capture_output=True, text=True, timeout=pace.scaled(60),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        a.wait_for(r"tunnel \w+ closed: ", timeout=60)
        _wait(src.ended.is_set, "the source hears the tunnel closed")
    finally:
        src.stop()
    _wait(lambda: _agent_threads(pid) <= threads0, f"the agent back to {threads0} threads")
    _wait(lambda: _agent_sockets(pid) <= sockets0, f"the agent back to {sockets0} sockets")
    assert json.loads(a.device.cli("status", "--json").stdout)["tunnels"] == []
    assert not any("Traceback" in line for _, line in a.lines), a.text()[-3000:]
