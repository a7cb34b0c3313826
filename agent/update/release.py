"""What the agent, its self-updates and iot-agent-launch share: the trial record and exit codes.

A self-update switches the agent target's `current` link and writes `trial.json` beside it:

    {"state": "trial", "version": "2.0.0", "from_current": "1.0.0", "from_previous": null,
     "deadline": <unix time>, "attempts": 0}

The new release removes the record once it has reconnected and confirmed. Until then the launcher
counts starts and watches the deadline; when either runs out it restores the old links, marks the
new release broken and rewrites the record as {"state": "rolled_back", "reason": ...} for the old
release to report. Kept free of heavy imports: the launcher loads it on every start.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.base.machine import Machine, State

RELEASE_ENV = "IOT_AGENT_RELEASE"  # set by iot-agent-launch: the release the running agent came from
RESTART_EXIT = 75  # the agent exits with this to be started again at once (EX_TEMPFAIL)
TRIAL_FILE = "trial.json"

# The self-update's record (trial.json), shared by the agent that installs, the launcher and the new agent.
TRIAL = Machine(
    "self-update trial",
    State(
        "trial",
        "the launcher starts the new release, counting starts against its limit and the deadline; the "
        "new agent confirms once connected and taking jobs",
        ("rolled_back",),
        "the launcher starts it again (counted), or rolls back once out of starts or time",
    ),
    State(
        "rolled_back",
        "the launcher restored the old links and marked the release broken; the old agent reports "
        "the job FAILED with the reason",
        (),
        "the old release reports it",
    ),
    start=("trial",),
    end="confirmed by the new release, or reported by the old one: trial.json removed",
)


def read_trial(target_dir: Path) -> dict | None:
    try:
        doc = json.loads((target_dir / TRIAL_FILE).read_text())
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def write_trial(target_dir: Path, doc: dict) -> None:
    from agent.base.durable import write_json

    TRIAL.move((read_trial(target_dir) or {}).get("state"), doc.get("state", ""))
    write_json(target_dir / TRIAL_FILE, doc, 0o600)


def clear_trial(target_dir: Path) -> None:
    from agent.base.durable import remove

    remove(target_dir / TRIAL_FILE)
