"""A named hang point: a test makes the agent's main loop hang, and the systemd watchdog must restart it.

Power cuts are no longer simulated at named points: agent.base.killpoints cuts after EVERY state-changing
operation (the kill sweeps), so no step can be missed by forgetting to name it. Armed only through the
environment variable below, which nothing but the test suite sets; the check is a dictionary lookup.
"""

from __future__ import annotations

import logging
import os

ENV = "IOT_AGENT_TEST_FAILPOINT"
log = logging.getLogger("agent.failpoints")


def hang(name: str) -> None:
    """Make the calling loop hang when the test armed `name`."""
    if os.environ.get(ENV) == name:
        import time

        log.warning("test fail point %s reached: hanging", name)
        while True:
            time.sleep(3600)
