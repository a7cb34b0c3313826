"""One implementation of the atomic write (agent.durable), used everywhere.

The review found the atomic write implemented seven times, three of them without the fsync. The lint
below keeps it to one: outside agent/durable.py, a rename, replace, unlink, rmtree, symlink or
write_text/write_bytes in agent/ must either work relative to a directory descriptor (the root
helper's spool) or say why it is not a durable-state write with a `# durable:` comment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from agent.base import durable

AGENT = Path(__file__).resolve().parents[2] / "agent"
FORBIDDEN = re.compile(
    r"os\.replace\(|os\.rename\(|\.write_text\(|\.write_bytes\(|\.unlink\(|shutil\.rmtree\(|"
    r"\.symlink_to\(|os\.symlink\("
)


def test_state_changing_file_calls_go_through_agent_durable():
    offenders = []
    for path in sorted(AGENT.rglob("*.py")):
        if path.name in ("durable.py", "killpoints.py"):
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if FORBIDDEN.search(code) and "dir_fd" not in code and "# durable:" not in line:
                offenders.append(f"{path.name}:{no}: {line.strip()}")
    assert not offenders, "use agent.base.durable (or say why not with '# durable:'):\n" + "\n".join(offenders)


def test_write_atomic_replaces_with_the_mode_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f"
    durable.write_atomic(p, b"one", 0o644)
    durable.write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and (p.stat().st_mode & 0o777) == 0o600
    assert os.listdir(tmp_path) == ["f"]
    assert durable.remove(p) and not durable.remove(p)


def test_symlink_switch_is_atomic_and_removable(tmp_path):
    link = tmp_path / "current"
    durable.symlink(link, "releases/1.0.0")
    durable.symlink(link, "releases/2.0.0")
    assert os.readlink(link) == "releases/2.0.0" and sorted(os.listdir(tmp_path)) == ["current"]
    durable.symlink(link, None)
    assert not link.is_symlink()
    (tmp_path / "d" / "e").mkdir(parents=True)
    durable.remove_tree(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    (tmp_path / ".state.json.999999999.1.tmp").write_text("half")  # no such process
    mine = tmp_path / f".state.json.{os.getpid()}.1.tmp"
    mine.write_text("in progress")
    (tmp_path / "state.json").write_text("{}")
    assert durable.remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "state.json"])
