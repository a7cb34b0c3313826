"""Run `python -m agent ...` and SIGKILL it (and its process group) just after a chosen write.

    python tests/killwrap.py --path '*/state.json' --state rotation.step=commit -- --config C run

The kill comes right after the first rename onto a path matching --path (fnmatch) whose new content,
when --state is given, has that value at that dotted path of the state file's data. It needs nothing
from the agent (an audit hook, installed before the agent is imported), so the finding tests can run
the same scenario against the code from before a fix and show it failing there.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import runpy
import signal
import sys
import threading

_pending: dict[int, str] = {}
_busy = threading.local()


def _matches(path: str, state: str | None) -> bool:
    if not state:
        return True
    key, _, want = state.partition("=")
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    node = doc.get("data", doc)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return str(node) == want


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--state")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args

    def kill() -> None:
        _busy.on = True
        if os.getpgid(0) == os.getpid():  # started in its own session: its children go with it
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def hook(event: str, hargs: tuple) -> None:
        if getattr(_busy, "on", False):
            return
        me = threading.get_ident()
        if me in _pending:  # the rename has returned: look at what it wrote
            path = _pending.pop(me)
            _busy.on = True
            try:
                hit = _matches(path, a.state)
            finally:
                _busy.on = False
            if hit:
                kill()
        if event == "os.rename" and len(hargs) >= 2 and isinstance(hargs[1], (str, bytes, os.PathLike)):
            dst = os.fsdecode(hargs[1])
            if fnmatch.fnmatch(dst, a.path):
                _pending[me] = dst

    sys.addaudithook(hook)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's agent
    sys.argv = ["agent", *args]
    runpy.run_module("agent", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
