"""Named fail points: tests kill the agent with SIGKILL at a chosen step to simulate power loss.

Armed only through the environment variable below, which nothing but the test suite sets. A
production agent never has it, and the check is a dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "IOT_AGENT_TEST_FAILPOINT"
log = logging.getLogger("agent.failpoints")


def hit(name: str) -> None:
    if os.environ.get(ENV) == name:
        log.warning("test fail point %s reached: SIGKILL", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
