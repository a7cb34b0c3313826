"""Software inventory in a named device shadow: what this device runs, for fleet queries.

The reported state says the agent's version, each update target's current/previous/broken release, the
last job's result and the certificate's expiry. It is published with IotShadowClientV2 on connect and
whenever it changes (checked on a slow timer, so installs by the privileged helper or a rollback by the
launcher are seen too). Updates carry the shadow version last seen: a 409 (someone else wrote in
between) is answered by reading the shadow and writing again, a bounded number of times. Only
`state.reported` is written; `desired` belongs to the operator.

The same loop keeps the Software Package Catalog's reserved shadow `$package` true: for the agent and each
update target, `reported.<package>.version` is the version installed now (after an install and after a
rollback alike; the release links are the truth). Only those version fields are written: whatever else the
cloud keeps there (other packages, attributes, desired) is left as it is, and a target's package whose name
the catalog cannot hold is skipped.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from agent import __version__
from agent.base.config import Config
from agent.base.state import StateStore

log = logging.getLogger("agent.inventory")
PACKAGE_SHADOW = "$package"
REQUEST_TIMEOUT_S = 20
CHECK_EVERY_S = 10.0
CONFLICT_RETRIES = 3


def build(cfg: Config, store: StateStore, certificate_file: str | None) -> dict[str, Any]:
    """The reported document (pure apart from reading the state, the release links and the certificate)."""
    from agent.base.pemfile import certificate_expiry
    from agent.update.install import slot

    state = store.load()
    last = (state.get("jobs") or {}).get("last") or {}
    details = last.get("details") or {}
    return {
        "agent_version": __version__,
        "targets": {
            name: {k: slot(cfg.resolve(t.directory), k) for k in ("current", "previous", "broken")}
            for name, t in sorted(cfg.ota.targets.items())
        },
        "last_job": {
            "job_id": last.get("job_id"),
            "status": last.get("status"),
            "result": details.get("result") or details.get("reason") or details.get("version"),
        }
        if last
        else None,
        "certificate_expires": certificate_expiry(certificate_file),
        # Open secure tunnels (agent.tunneling records them as they open and close): id, services, since.
        "tunnels": [t for t in state.get("tunnels") or [] if isinstance(t, dict)],
    }


def packages(cfg: Config) -> dict[str, Any]:
    """reported for `$package`: {package: {"version": v}} for the agent and every target with a current release."""
    from agent.inventory.config import PACKAGE_NAME_RE
    from agent.update.install import slot

    out: dict[str, Any] = {cfg.inventory.agent_package: {"version": __version__}}
    for name, t in sorted(cfg.ota.targets.items()):
        current = slot(cfg.resolve(t.directory), "current")
        if current and PACKAGE_NAME_RE.fullmatch(name) and name != cfg.inventory.agent_package:
            out[name] = {"version": current}
    return out


class InventoryReporter:
    def __init__(self, cfg: Config, store: StateStore, thing: str, certificate_file: str, conn):
        from awsiot import iotshadow

        self.cfg, self.store, self.thing, self.cert = cfg, store, thing, certificate_file
        self.conn = conn
        self.name = cfg.inventory.shadow_name
        self.client = conn.service_client(iotshadow.IotShadowClientV2, 4, 1, REQUEST_TIMEOUT_S)
        self.version: int | None = None
        self.sent: dict | None = None
        self.package_version: int | None = None
        self.packages_sent: dict | None = None
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inventory", daemon=True)

    def start(self) -> InventoryReporter:
        self._thread.start()
        return self

    def on_connected(self) -> None:
        self.sent = None  # the shadow may have changed while we were away: report again
        self.packages_sent = None
        self.wake.set()

    def stop(self) -> None:
        # A request in flight must not hold up SIGTERM (the thread is a daemon). The service client
        # holds the MQTT client, and with it the token's PKCS#11 module: drop it, or the next session
        # (or the rotation's token work between sessions) cannot initialise the module again.
        self._stop.set()
        self.wake.set()
        self._thread.join(2)
        self.client = None
        self.conn = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.wake.wait(CHECK_EVERY_S)
            self.wake.clear()
            conn = self.conn
            if self._stop.is_set() or conn is None or not conn.connected.is_set():
                continue
            try:
                doc = build(self.cfg, self.store, self.cert)
                if doc != self.sent:
                    self.report(doc)
            except Exception as e:  # the next change or connection tries again
                log.warning("inventory shadow %r not updated: %s", self.name, e)
            if not self.cfg.inventory.packages:
                continue
            try:
                pkgs = packages(self.cfg)
                if pkgs != self.packages_sent:
                    self.report_packages(pkgs)
            except Exception as e:
                log.warning("package shadow %r not updated: %s", PACKAGE_SHADOW, e)

    def report(self, doc: dict) -> None:
        self.version = self._update(self.name, doc, self.version)
        self.sent = doc

    def report_packages(self, doc: dict) -> None:
        self.package_version = self._update(PACKAGE_SHADOW, doc, self.package_version)
        self.packages_sent = doc
        log.info("package shadow: %s", ", ".join(f"{k} {v['version']}" for k, v in doc.items()))

    def _update(self, name: str, doc: dict, version: int | None) -> int | None:
        """reported := doc (merged by the service) at the version last seen; a conflict reads it and retries."""
        import awsiot
        from awsiot import iotshadow

        for _ in range(CONFLICT_RETRIES + 1):
            if self.client is None:
                return version  # stopped meanwhile
            req = iotshadow.UpdateNamedShadowRequest(
                thing_name=self.thing,
                shadow_name=name,
                state=iotshadow.ShadowState(reported=doc),
                version=version,
            )
            try:
                resp = self.client.update_named_shadow(req).result(REQUEST_TIMEOUT_S + 5)
            except awsiot.V2ServiceException as e:
                err = e.modeled_error
                if err is not None and err.code == 409:
                    version = self._current_version(name)
                    log.info("shadow %r changed elsewhere; writing again on version %s", name, version)
                    continue
                raise RuntimeError(
                    f"{err.code}: {err.message}"
                    if err is not None
                    else f"{e.message} ({getattr(e.inner_error, 'name', e.inner_error)})"
                ) from None
            what = "package" if name == PACKAGE_SHADOW else "inventory"
            log.info("%s shadow %r updated (version %s)", what, name, resp.version)
            return resp.version
        raise RuntimeError(f"version conflict {CONFLICT_RETRIES + 1} times in a row")

    def _current_version(self, name: str) -> int | None:
        import awsiot
        from awsiot import iotshadow

        try:
            return (
                self.client.get_named_shadow(iotshadow.GetNamedShadowRequest(thing_name=self.thing, shadow_name=name))
                .result(REQUEST_TIMEOUT_S + 5)
                .version
            )
        except awsiot.V2ServiceException as e:
            if e.modeled_error is not None and e.modeled_error.code == 404:
                return None  # deleted meanwhile: write without a version
            raise
