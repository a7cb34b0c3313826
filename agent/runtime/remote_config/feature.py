"""The configuration shadow as a daemon feature: read `desired`, decide, apply, report (see overlay.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.base.config import Config
from agent.base.logfmt import escape
from agent.runtime.remote_config.config import SECTIONS
from agent.runtime.remote_config.overlay import OverlayStore, check, digest
from agent.session.feature import Feature, FeatureSpec, Session

log = logging.getLogger("agent.remote_config")

REQUEST_TIMEOUT_S = 20
CHECK_EVERY_S = 300.0


class RemoteConfigFeature(Feature):
    name = "remote_config"

    def __init__(self, cfg: Config, store: Any) -> None:
        self.cfg = cfg
        self.state_dir = Path(store.directory)
        self.overlays = OverlayStore(self.state_dir)
        self.shadow = cfg.remote_config.shadow_name
        self.session: Session | None = None
        self.client: Any = None
        self.stream: Any = None
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result = ""

    def start(self, session: Session) -> None:
        from awsiot import iotshadow

        self.session = session
        self.client = session.conn.service_client(iotshadow.IotShadowClientV2, 4, 1, REQUEST_TIMEOUT_S)
        self._thread = threading.Thread(target=self._loop, name="remote-config", daemon=True)
        self._thread.start()

    def on_connected(self) -> None:
        self.wake.set()

    def status(self) -> str | None:
        return self.last_result or None

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(2)
        self.stream = None
        self.client = None
        self.session = None

    def _open_stream(self) -> None:
        if self.stream is not None or self.client is None or self.session is None:
            return
        from awsiot import ServiceStreamOptions, iotshadow

        try:
            stream = self.client.create_named_shadow_delta_updated_stream(
                iotshadow.NamedShadowDeltaUpdatedSubscriptionRequest(
                    thing_name=self.session.thing_name, shadow_name=self.shadow
                ),
                ServiceStreamOptions(incoming_event_listener=lambda _ev: self.wake.set()),
            )
            stream.open()
            self.stream = stream
        except Exception as e:
            log.warning("configuration shadow: no delta subscription (%s); checking every %.0f s", e, CHECK_EVERY_S)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.wake.wait(CHECK_EVERY_S)
            self.wake.clear()
            session = self.session
            if self._stop.is_set() or session is None or not session.conn.connected.is_set():
                continue
            try:
                self._open_stream()
                self.sync()
            except Exception as e:  # the next delta, connection or check tries again
                log.warning("configuration shadow %r: %s", self.shadow, escape(str(e), 300))

    def sync(self) -> None:
        """Read the shadow; apply or refuse a new desired state; report; confirm a change on probation."""
        import awsiot
        from awsiot import iotshadow

        session = self.session
        assert session is not None and self.client is not None
        try:
            doc = self.client.get_named_shadow(
                iotshadow.GetNamedShadowRequest(thing_name=session.thing_name, shadow_name=self.shadow)
            ).result(REQUEST_TIMEOUT_S + 5)
            state = doc.state
            desired = state.desired if state is not None else None
            reported = (state.reported if state is not None else None) or {}
            version = doc.version
        except awsiot.V2ServiceException as e:
            if e.modeled_error is None or e.modeled_error.code != 404:
                raise
            desired, reported, version = None, {}, None
        record = self.overlays.load()
        if digest(desired) != record.get("digest"):
            self._decide(desired, version, record)
            record = self.overlays.load()
        status = record.get("status")
        if not record.get("pending") and record.get("status_reported") == digest(status):
            return  # nothing new since the shadow was last told
        self._report(record.get("overlay") or {}, reported, status)
        record = self.overlays.load()
        if record.get("pending"):
            log.info("configuration shadow: the change is confirmed (the cloud took the report)")
        for k in ("pending", "confirm_by", "previous"):
            record.pop(k, None)
        record["status_reported"] = digest(record.get("status"))
        self.overlays.save(record)

    def _decide(self, desired: Any, version: int | None, record: dict) -> None:
        from agent.runtime.features import parse  # the registry: every section's validation

        session = self.session
        assert session is not None
        file_cfg = _file_config(self.cfg, parse)
        result = check(file_cfg, desired, parse)
        now = int(time.time())
        if isinstance(result, list):
            log.warning(
                "configuration shadow: desired state (version %s) refused, nothing changed: %s",
                version,
                escape("; ".join(result), 800),
            )
            status = {"result": "refused", "reasons": result[:20], "desired_version": version, "at": now}
            self.overlays.save({**record, "digest": digest(desired), "status": status})
            self.last_result = f"config shadow: version {version} refused"
            return
        overlay, new_cfg = result
        previous = record.get("overlay") or {}
        status = {"result": "applied", "desired_version": version, "at": now}
        # The decision: ONE write holding the new overlay, the one it replaces and its deadline.
        self.overlays.save(
            {
                "overlay": overlay,
                "digest": digest(desired),
                "status": status,
                "pending": True,
                "previous": previous,
                "confirm_by": time.time() + self.cfg.remote_config.confirm_within_s,
            }
        )
        how = session.reconfigure(new_cfg) if session.reconfigure else "at the next start"
        log.info(
            "configuration shadow: version %s applied (%s): %s", version, how, json.dumps(overlay, sort_keys=True)[:300]
        )
        self.last_result = f"config shadow: version {version} applied"

    def _report(self, overlay: dict, reported: dict, status: dict | None) -> None:
        """reported = the overlay in force (keys it no longer has set to null) and the last decision."""
        from awsiot import iotshadow

        session = self.session
        assert session is not None and self.client is not None
        doc: dict[str, Any] = {}
        for section, table in reported.items():
            if section == "status":
                continue
            if section not in overlay:
                doc[section] = None
            elif isinstance(table, dict):
                doc[section] = {k: None for k in table if k not in overlay[section]}
        for section, table in overlay.items():
            doc.setdefault(section, {})
            if doc[section] is None:
                doc[section] = {}
            doc[section].update(table)
        if status is not None:
            doc["status"] = status
        self.client.update_named_shadow(
            iotshadow.UpdateNamedShadowRequest(
                thing_name=session.thing_name, shadow_name=self.shadow, state=iotshadow.ShadowState(reported=doc)
            )
        ).result(REQUEST_TIMEOUT_S + 5)
        log.info("configuration shadow %r reported (%s)", self.shadow, (status or {}).get("result", "in force"))


def _file_config(cfg: Config, parse: Callable[..., Config]) -> Config:
    """The file's own config (without any overlay), from the data the running config was built from."""
    return dataclasses.replace(parse(dict(cfg.data), None), path=cfg.path, data=cfg.data)


FEATURE = FeatureSpec(
    "remote_config", SECTIONS, enabled=lambda cfg: cfg.remote_config.enabled, build=RemoteConfigFeature
)
