"""Rewrite the state-machine tables in docs/architecture.md from the code (tests/base/test_machines.py checks
that they agree). Each table sits between `<!-- machine: NAME -->` and `<!-- /machine -->`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.identity.provisioning import PROVISIONING  # noqa: E402
from agent.identity.rotation import ROTATION  # noqa: E402
from agent.update.ota import INSTALL  # noqa: E402
from agent.update.privileged import HAND_OVER, HELPER  # noqa: E402
from agent.update.release import TRIAL  # noqa: E402

MACHINES = {m.name: m for m in (PROVISIONING, ROTATION, INSTALL, TRIAL, HAND_OVER, HELPER)}


def main() -> int:
    doc = REPO / "docs" / "architecture.md"
    text = doc.read_text()

    def table(m: re.Match) -> str:
        return f"<!-- machine: {m.group(1)} -->\n{MACHINES[m.group(1)].table()}\n<!-- /machine -->"

    new = re.sub(r"<!-- machine: (.+?) -->\n.*?<!-- /machine -->", table, text, flags=re.S)
    if new != text:
        doc.write_text(new)
        print("docs/architecture.md: tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
