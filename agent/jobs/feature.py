"""AWS IoT Jobs as a daemon feature. It serves the operations the other features registered in the
session (`Session.job_handlers`), so the registry starts it last; anything else is REJECTED."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.base.config import Config
from agent.base.state import StateStore
from agent.jobs.config import SECTIONS
from agent.session.feature import Feature, FeatureSpec, Session

if TYPE_CHECKING:  # imported in start(): the daemon never loads a disabled feature's modules
    from agent.jobs.engine import JobsEngine


class JobsFeature(Feature):
    name = "jobs"

    def __init__(self, cfg: Config, store: StateStore) -> None:
        self.store = store
        self.engine: JobsEngine | None = None

    def start(self, session: Session) -> None:
        from agent.jobs.engine import JobsEngine

        store = self.store
        self.engine = JobsEngine(
            session.thing_name,
            session.conn,
            load_state=lambda: store.load().get("jobs", {}),
            save_state=lambda d: store.update(jobs=d),
            handlers=dict(session.job_handlers),
        )
        # What the SDK's modeled client cannot read (a document it fails to parse) is handled here.
        session.router.add(f"$aws/things/{session.thing_name}/jobs/", self.engine.on_raw_message)
        self.engine.start()

    def on_connected(self) -> None:
        if self.engine:
            self.engine.on_connected()

    def status(self) -> str | None:
        return self.engine.activity if self.engine else None

    def stop(self) -> None:
        if self.engine:
            self.engine.stop()
            self.engine = None


FEATURE = FeatureSpec("jobs", SECTIONS, enabled=lambda cfg: cfg.jobs.enabled, build=JobsFeature)
