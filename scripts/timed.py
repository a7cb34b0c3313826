"""Run a command and print its wall time and the CPU time of every process it started (make test).

Why: the suite's speed target is about waiting, not computing; the two figures side by side show how
much of a run is idle."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: timed.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        rc = subprocess.call(sys.argv[1:])
    except KeyboardInterrupt:
        rc = 130
    wall = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime
    print(
        f"suite: wall {wall / 60:.1f} min ({wall:.0f} s); CPU {cpu / 60:.1f} min ({cpu:.0f} s, user+sys of every "
        f"process it waited for) on {os.cpu_count()} cores; exit {rc}"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
