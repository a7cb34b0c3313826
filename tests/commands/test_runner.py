"""Operator handlers run for real: parameters on stdin, a deadline for the whole process group, capped output."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from agent.commands.config import HandlerConfig
from agent.commands.runner import run


def handler(tmp_path: Path, script: str, **kw) -> HandlerConfig:
    exe = tmp_path / f"h{abs(hash(script))}.sh"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return HandlerConfig(command=[str(exe)], **kw)


def test_parameters_arrive_on_stdin_and_the_exit_code_comes_back(tmp_path):
    h = handler(tmp_path, 'cat; echo; echo "id=$IOT_AGENT_EXECUTION_ID"; exit 3\n')
    out = run(h, {"lines": 5, "who": "a'b\"; rm -rf /"}, {"IOT_AGENT_EXECUTION_ID": "e1"}, threading.Event())
    assert out.exit_code == 3 and not out.timed_out and out.error is None
    assert out.output.decode() == '{"lines": 5, "who": "a\'b\\"; rm -rf /"}\nid=e1\n'


def test_ten_megabytes_of_output_are_capped_and_the_handler_is_not_blocked(tmp_path):
    h = handler(tmp_path, "head -c 10485760 /dev/zero | tr '\\0' x\necho done >&2\n", max_output_kib=16)
    out = run(h, {}, {}, threading.Event())
    assert out.exit_code == 0 and out.output_bytes == 10 * 1024 * 1024 + 5
    assert len(out.output) == 16 * 1024 and out.truncated


def test_the_deadline_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "grandchild.pid"
    h = handler(tmp_path, f"sleep 300 &\necho $! > {marker}\nsleep 300\n", timeout_s=1.0)
    start = time.monotonic()
    out = run(h, {}, {}, threading.Event())
    assert out.timed_out and out.exit_code is None
    assert time.monotonic() - start < 30
    pid = int(marker.read_text())
    for _ in range(50):  # the grandchild went with its group (a zombie reaped by init at most)
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat").read_text().split()[2]
            if stat == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid} outlived the handler's deadline")


def test_a_handler_that_cannot_start_is_an_error_not_an_exception(tmp_path):
    out = run(HandlerConfig(command=[str(tmp_path / "missing")]), {}, {}, threading.Event())
    assert out.exit_code is None and out.error and "FileNotFoundError" in out.error


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
def test_runs_as_the_configured_user():
    import shutil
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="cmd-user-"))  # pytest's tmp_path is private to root
    try:
        where.chmod(0o755)
        h = handler(where, "id -u; id -G\n", user="nobody")
        out = run(h, {}, {}, threading.Event())
    finally:
        shutil.rmtree(where)
    import pwd

    nobody = pwd.getpwnam("nobody")
    uid, groups = out.output.decode().split("\n")[:2]
    assert int(uid) == nobody.pw_uid and groups.split() == [str(nobody.pw_gid)]


def test_the_history_keeps_the_newest_executions(tmp_path):
    """Each execution id runs at most once while it is remembered; the oldest are forgotten first (by sequence,
    not by the id's sort order, which is how the state file stores them)."""
    from agent.base.state import StateStore
    from agent.commands.feature import CommandsFeature
    from agent.runtime.features import parse

    cfg = parse(
        {
            "broker": {"endpoint": "h", "ca_file": "c"},
            "pkcs11": {"library": "l", "token_label": "t"},
            "commands": {"enabled": True, "history": 16},
        }
    )
    f = CommandsFeature(cfg, StateStore(tmp_path))
    ids = [f"z{i:03d}" if i % 2 else f"a{i:03d}" for i in range(40)]  # sort order unlike arrival order
    for eid in ids:
        f._record(eid, {"status": "SUCCEEDED", "sent": True})
    assert sorted(f._records()) == sorted(ids[-16:])
