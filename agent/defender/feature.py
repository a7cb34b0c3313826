"""Device Defender as a daemon feature: a report every interval while connected."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from agent.base.config import Config
from agent.base.state import StateStore
from agent.defender.config import SECTIONS
from agent.session.feature import Feature, FeatureSpec, Session

if TYPE_CHECKING:  # imported in start(): the daemon never loads a disabled feature's modules
    from agent.defender.reporter import Reporter

log = logging.getLogger("agent")


class DefenderFeature(Feature):
    name = "defender"

    def __init__(self, cfg: Config, store: StateStore) -> None:
        self.section = cfg.defender
        self.store = store
        self.reporter: Reporter | None = None
        self._lock = threading.Lock()  # reconfigure (the config feature's thread) against stop (the daemon's)

    def start(self, session: Session) -> None:
        from agent.defender.reporter import Collector, Reporter

        conn, store = session.conn, self.store
        self.reporter = Reporter(
            cfg=self.section,
            thing=session.thing_name,
            collector=Collector(self.section, store.directory, session.certificate_file),
            publish=lambda t, p: conn.publish(t, p, qos=1),
            subscribe=lambda t: conn.subscribe(t, qos=1),
            connected=conn.connected.is_set,
            connection_count=lambda: conn.connect_count,
            load_state=lambda: store.load().get("defender", {}),
            save_state=lambda d: store.update(defender=d),
        )
        # Every format's answers: the route holds when reconfigure() changes the format.
        session.router.add(self.reporter.response_prefix, self.reporter.on_response)
        self.reporter.start()
        log.info(
            "Device Defender reports every %g s (%s)", self.section.interval_s, self.reporter.describe(self.section)
        )

    def reconfigure(self, cfg: Config) -> bool:
        """Apply a new [defender] to the running reporter (the next report uses it); True when applied live.

        False when the feature is not running or the new section turns it off: the caller then restarts
        the session, which builds the enabled features afresh."""
        new = cfg.defender
        with self._lock:
            if self.reporter is None or not new.enabled:
                return False
            self.reporter.reconfigure(new)
            self.section = new
            return True

    def stop(self) -> None:
        with self._lock:
            reporter, self.reporter = self.reporter, None
        if reporter:
            reporter.stop()


FEATURE = FeatureSpec("defender", SECTIONS, enabled=lambda cfg: cfg.defender.enabled, build=DefenderFeature)
