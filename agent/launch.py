"""`iot-agent-launch`: the self-update launcher's entry point (agent.update.launcher) with the whole config.

It lives at the top, beside the CLI, because reading the config needs the registry of every capability
(agent.runtime.features), which the update package must not import."""

from __future__ import annotations

import sys

from agent.runtime.features import load
from agent.update import launcher


def main(argv: list[str] | None = None) -> int:
    return launcher.main(argv, load)


if __name__ == "__main__":
    sys.exit(main())
