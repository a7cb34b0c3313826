"""The inventory shadow as a daemon feature: reported at every (re)connection and when it changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.base.config import Config
from agent.base.state import StateStore
from agent.inventory.config import SECTIONS
from agent.session.feature import Feature, FeatureSpec, Session

if TYPE_CHECKING:  # imported in start(): the daemon never loads a disabled feature's modules
    from agent.inventory.reporter import InventoryReporter


class InventoryFeature(Feature):
    name = "inventory"

    def __init__(self, cfg: Config, store: StateStore) -> None:
        self.cfg, self.store = cfg, store
        self.reporter: InventoryReporter | None = None

    def start(self, session: Session) -> None:
        from agent.inventory.reporter import InventoryReporter

        self.reporter = InventoryReporter(
            self.cfg, self.store, session.thing_name, str(session.certificate_file), session.conn
        ).start()

    def on_connected(self) -> None:
        if self.reporter:
            self.reporter.on_connected()

    def stop(self) -> None:
        if self.reporter:
            self.reporter.stop()
            self.reporter = None


FEATURE = FeatureSpec("inventory", SECTIONS, enabled=lambda cfg: cfg.inventory.enabled, build=InventoryFeature)
