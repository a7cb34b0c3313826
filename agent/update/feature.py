"""Signed updates as a daemon feature: the `ota-update` job operation and its MQTT stream downloads.

Enabled when jobs are and at least one update target is declared (no target: nothing to install)."""

from __future__ import annotations

import os

from agent.base.config import Config
from agent.base.state import StateStore
from agent.session.feature import Feature, FeatureSpec, Session
from agent.update.config import SECTIONS
from agent.update.release import RELEASE_ENV


class UpdateFeature(Feature):
    name = "update"

    def __init__(self, cfg: Config, store: StateStore) -> None:
        self.cfg, self.store = cfg, store

    def start(self, session: Session) -> None:
        from agent.update.ota import OtaHandler

        conn, store = session.conn, self.store
        ota = OtaHandler(
            self.cfg,
            load=lambda: store.load().get("ota", {}),
            save=lambda d: store.update(ota=d),
            thing=session.thing_name,
            publish=lambda t, p: conn.publish(t, p, qos=1),
            subscribe=lambda t: conn.subscribe(t, qos=1),
            request_restart=session.request_restart,
            connected=conn.connected.is_set,
            running_release=os.environ.get(RELEASE_ENV),
        )
        ota.recover()  # what a stop or power cut left half-done, before the jobs feature takes a job
        session.router.add(f"$aws/things/{session.thing_name}/streams/", ota.on_stream_message)
        session.job_handlers["ota-update"] = ota


FEATURE = FeatureSpec(
    "update", SECTIONS, enabled=lambda cfg: cfg.jobs.enabled and bool(cfg.ota.targets), build=UpdateFeature
)
