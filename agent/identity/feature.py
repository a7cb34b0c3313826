"""Certificate rotation as a daemon feature, plus the two hooks that make it the session's identity.

Rotation is the one feature that decides which credentials a session uses, so besides the Feature
methods it has two the daemon calls around the connection: `session_identity()` before it (the token
work that must run while no connection holds the token, and the pending certificate to prove) and
`prove()` right after starting it. What each rotation step means is the Rotator's business
(agent.identity.rotation, its STEPS table); this module only routes its work to the right moment.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from agent.base import sdnotify
from agent.base.config import Config
from agent.base.errors import AgentError
from agent.base.state import StateStore
from agent.identity.config import SECTIONS
from agent.identity.current import Identity
from agent.identity.rotation import Rotator, check_not_expired, job_outcome
from agent.session.feature import Feature, FeatureSpec, Session

log = logging.getLogger("agent")


class RotationFeature(Feature):
    name = "rotation"

    def __init__(self, cfg: Config, store: StateStore) -> None:
        self.cfg, self.store = cfg, store
        self.wake = threading.Event()  # SIGUSR1 (`iot-agent rotate`) and rotate-certificate jobs set it
        self.rotator: Rotator | None = None
        self.pending = False
        self._session: Session | None = None
        self._worker: threading.Thread | None = None
        self._ending = threading.Event()

    # -- around the connection ------------------------------------------------------------------
    def session_identity(self, identity: Identity, reload) -> Identity:
        """The identity this session connects with. `reload()` reads the current identity again (the
        token work between sessions may commit a new one)."""
        self.rotator = rotator = Rotator(self.cfg, self.store, identity.thing_name)
        if rotator.needs_token_work():
            sdnotify.expect_busy(250)  # two `iot-agent keys` runs, 120 s each at most
            try:
                rotator.token_work()
            except AgentError as e:
                log.warning("certificate rotation: %s; trying again later", e)
                rotator.token_work_failed(str(e))
            identity = reload()
        pending = rotator.pending_identity()
        self.pending = bool(pending)
        if pending:
            log.info("proving the new certificate %s", Path(pending[0]).name)
            return Identity(identity.thing_name, Path(pending[0]), pending[1])
        check_not_expired(identity.certificate_file)
        return identity

    def prove(self, connected: threading.Event, last_error, stop: threading.Event) -> bool | None:
        """After the connection started, for a pending certificate: True once it connected (committed), False
        if it did not within rotation.prove_timeout_s (abandoned: the next session uses the old one), None
        if stopped first. Without a pending certificate: True at once."""
        assert self.rotator is not None
        if not self.pending:
            return True
        timeout = self.cfg.rotation.prove_timeout_s
        deadline = time.monotonic() + timeout
        while not connected.is_set() and time.monotonic() < deadline and not stop.is_set():
            sdnotify.beat()
            connected.wait(0.5)
        if stop.is_set():
            return None
        if not connected.is_set():
            self.rotator.not_proven(f"no connection within {timeout:g} s ({last_error()})")
            return False
        self.rotator.proven()
        return True

    # -- the feature ----------------------------------------------------------------------------
    def start(self, session: Session) -> None:
        assert self.rotator is not None
        self._session = session
        self._ending.clear()
        session.router.add(f"cmd/{session.thing_name}/certificate-rotation/", self.rotator.on_message)
        session.job_handlers["rotate-certificate"] = self._job
        self._worker = threading.Thread(target=self._loop, name="rotation", daemon=True)
        self._worker.start()

    def status(self) -> str | None:
        step = self.rotator.step if self.rotator else "idle"
        return None if step == "idle" else f"certificate rotation: {step}"

    def stop(self) -> None:
        self._ending.set()
        self.wake.set()  # ends the worker's wait
        if self._worker:
            self._worker.join(5)
        self.wake.clear()
        self._worker, self._session = None, None

    def _job(self, job_id: str, doc, progress):
        from agent.jobs.engine import Outcome

        assert self.rotator is not None
        res = job_outcome(self.rotator, job_id)
        if res:
            return Outcome(res[0], {"reason" if res[0] != "SUCCEEDED" else "result": res[1]})
        self.rotator.take_job(job_id)
        self.wake.set()
        return Outcome("IN_PROGRESS", {"step": "rotating certificate"})

    def _loop(self) -> None:
        """Finishes a rotation after a switch, and starts one when due (checked at start, then every
        check_interval_s) or asked for (SIGUSR1 from `iot-agent rotate`, a job). Whatever it records,
        the session ends: the key work runs between sessions, and a new certificate needs a new one."""
        s, rotator = self._session, self.rotator
        assert s is not None and rotator is not None
        conn = s.conn
        while not s.stop.is_set() and not self._ending.is_set():
            if conn.connected.is_set():
                try:
                    if rotator.advance(conn, s.certificate_file, s.key_label):
                        s.end()
                        return
                except AgentError as e:
                    log.warning("certificate rotation: %s; trying again later", e)
                except Exception:
                    log.exception("certificate rotation failed unexpectedly; trying again later")
            self.wake.wait(rotator.next_check_in(conn.connected.is_set()))
            self.wake.clear()


FEATURE = FeatureSpec("rotation", SECTIONS, enabled=lambda cfg: True, build=RotationFeature)
