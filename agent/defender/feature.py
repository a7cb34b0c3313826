"""Device Defender as a daemon feature: a report every interval while connected."""

from __future__ import annotations

import logging
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
        session.router.add(self.reporter.topic + "/", self.reporter.on_response)
        self.reporter.start()
        log.info(
            "Device Defender reports every %g s (%s, %s names)",
            self.section.interval_s,
            self.section.format,
            self.section.names,
        )

    def stop(self) -> None:
        if self.reporter:
            self.reporter.stop()
            self.reporter = None


FEATURE = FeatureSpec("defender", SECTIONS, enabled=lambda cfg: cfg.defender.enabled, build=DefenderFeature)
