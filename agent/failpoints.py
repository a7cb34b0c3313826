"""Named fail points: tests kill the agent with SIGKILL at a chosen step to simulate power loss.

Armed only through the environment variable below, which nothing but the test suite sets. A
production agent never has it, and the check is a dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "IOT_AGENT_TEST_FAILPOINT"
ONCE_ENV = "IOT_AGENT_TEST_FAILPOINT_ONCE"  # a file path: fire only if it does not exist yet (then create it)
log = logging.getLogger("agent.failpoints")


def hit(name: str) -> None:
    if os.environ.get(ENV) == name:
        once = os.environ.get(ONCE_ENV)
        if once:
            if os.path.exists(once):
                return
            open(once, "w").close()
        log.warning("test fail point %s reached: SIGKILL", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def hang(name: str) -> None:
    """A test fail point that makes the calling loop hang (the systemd watchdog must restart the agent)."""
    if os.environ.get(ENV) == name:
        import time

        log.warning("test fail point %s reached: hanging", name)
        while True:
            time.sleep(3600)
