"""Running scripts under the real MicroPython interpreter (WebAssembly) in Node: the harness in
micropython/harness copies every micropython/*.py into the interpreter's /lib and exposes PARAMS."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "micropython" / "harness"


@pytest.fixture(scope="module")
def node():
    exe = shutil.which("node")
    assert exe, "Node.js is required for the MicroPython tests (see README)"
    if not (HARNESS / "node_modules" / "@micropython").is_dir():
        r = subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=HARNESS, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    return exe


def run_mp(node: str, script: str, tmp_path: Path, params: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(script)
    return subprocess.run([node, str(HARNESS / "run.mjs"), str(path), json.dumps(params)], capture_output=True,
                          text=True, timeout=timeout)
