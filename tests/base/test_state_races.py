"""Item 8 of the review: the rotation record was read and written without a lock while the jobs thread,
the rotation worker (and `iot-agent rotate`, another process) all wrote it: one writer's change could
be lost. Writes to a flow's record now go through the state store's lock (threads) and an flock
(processes). These tests failed on the code before the fix (lost updates)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from agent.base.state import StateStore
from agent.identity.rotation import Rotator
from agent.runtime.features import parse

REPO = Path(__file__).resolve().parents[2]


def _rotator(tmp_path: Path) -> Rotator:
    cfg = parse(
        {
            "broker": {"endpoint": "localhost", "ca_file": "ca.pem"},
            "pkcs11": {"library": "/nonexistent.so", "token_label": "t"},
        },
        tmp_path / "config.toml",
    )
    return Rotator(cfg, StateStore(tmp_path / "state"), "gw-1")


def test_threads_writing_the_rotation_record_lose_nothing(tmp_path):
    rot = _rotator(tmp_path)

    def writer(i: int) -> None:
        for j in range(40):
            rot._save(**{f"t{i}_{j}": j})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flow = rot.flow()
    missing = [f"t{i}_{j}" for i in range(4) for j in range(40) if f"t{i}_{j}" not in flow]
    assert not missing, f"{len(missing)} updates lost"


def test_another_process_writing_the_state_loses_nothing(tmp_path):
    rot = _rotator(tmp_path)
    rot._save(step="idle")
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from pathlib import Path\nfrom test_state_races import _rotator\n"
        f"r = _rotator(Path({str(tmp_path)!r}))\n"
        "print('ready', flush=True)\n"
        "for j in range(150): r._save(**{'p%d' % j: j})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    for j in range(150):
        rot._save(**{f"a{j}": j})
    assert child.wait(60) == 0
    flow = rot.flow()
    lost = [k for j in range(150) for k in (f"a{j}", f"p{j}") if k not in flow]
    assert not lost, f"{len(lost)} updates lost"
