"""`iot-agent run`: clock gate, connect, stay connected until SIGTERM, shut down cleanly.

The order is the security argument: no TLS before the clock is trusted, no key material outside
the token, and a clean stop that releases the token (a TPM leaks handles otherwise).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.session.clock import ClockGate
from agent.base.config import Config, identity_mode
from agent.session.connection import Connection, ConnectionSettings
from agent.base import failpoints
from agent.base import sdnotify
from agent.base.errors import AgentError, ClockError
from agent.update.release import RESTART_EXIT
from agent.base.pin import read_pin
from agent.base.state import StateStore

log = logging.getLogger("agent")


@dataclass(frozen=True, eq=False)
class Identity:
    thing_name: str
    certificate_file: Path
    key_label: str


def current_identity(cfg: Config, state: dict) -> Identity:
    """The identity to connect with: what provisioning recorded in the state, else the config's."""
    thing = state.get("thing_name") or cfg.device.thing_name
    cert = state.get("certificate_file") or (str(cfg.resolve(cfg.identity.certificate_file)) if cfg.identity.certificate_file else None)
    key_label = state.get("key_label") or cfg.pkcs11.key_label
    if not thing or not cert:
        raise AgentError(
            "no device identity yet: set device.thing_name and identity.certificate_file for a pre-provisioned "
            "device, or provision it by claim"
        )
    if not Path(cert).is_file():
        raise AgentError(f"{cert}: device certificate not found; restore it or provision the device again")
    return Identity(thing, Path(cert), key_label)


def settings_for(cfg: Config, identity: Identity, pin: str) -> ConnectionSettings:
    b = cfg.broker
    return ConnectionSettings(
        endpoint=b.endpoint,
        port=b.port,
        ca_file=cfg.resolve(b.ca_file),
        client_id=identity.thing_name,
        certificate_file=identity.certificate_file,
        pkcs11_library=cfg.resolve(cfg.pkcs11.library),
        token_label=cfg.pkcs11.token_label,
        key_label=identity.key_label,
        pin=pin,
        keepalive_s=b.keepalive_s,
        connect_timeout_s=b.connect_timeout_s,
        reconnect_min_s=b.reconnect_min_s,
        reconnect_max_s=b.reconnect_max_s,
        reconnect_reset_after_s=b.reconnect_reset_after_s,
    )


def install_stop_signals(stop: threading.Event) -> None:
    def handler(signum, _frame):
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def has_identity(cfg: Config, state: dict) -> bool:
    return bool((state.get("thing_name") or cfg.device.thing_name)
                and (state.get("certificate_file") or cfg.identity.certificate_file))


def run(cfg: Config, stop: threading.Event) -> int:
    """Returns the exit status: 0 after SIGTERM, RESTART_EXIT when an update asks to be restarted into."""
    watchdog_stop = threading.Event()
    sdnotify.start_watchdog(watchdog_stop)
    # Ready for systemd from the start: what the agent is waiting for is in STATUS=.
    sdnotify.ready("waiting for a trustworthy clock before any TLS connection")
    rc = 1
    try:
        rc = _run(cfg, stop)
        return rc
    finally:
        if rc != RESTART_EXIT:  # a restart into a new release is not a stop of the service
            sdnotify.stopping()
        watchdog_stop.set()


def _run(cfg: Config, stop: threading.Event) -> int:
    pin = read_pin(cfg)
    store = StateStore(cfg.resolve(cfg.device.state_dir))
    from agent.base.durable import remove_stale_temps

    remove_stale_temps(store.directory)  # what a power cut left half-written: never read, now gone
    clock_trusted = False
    mode = identity_mode(cfg)
    if not has_identity(cfg, store.load()) and mode == "jitp":
        raise AgentError("identity.mode is jitp but there is no device certificate yet: run `iot-agent factory "
                         "device-key` and `factory device-cert` at the factory (README, 'Just-in-time provisioning')")
    if not has_identity(cfg, store.load()) and mode == "claim":
        from agent.identity.provisioning import Provisioner

        try:
            ClockGate(cfg.clock).wait(stop)
        except ClockError:
            if stop.is_set():
                return 0
            raise
        clock_trusted = True
        log.info("no identity yet: provisioning by claim")
        sdnotify.status_line("provisioning by claim (fleet provisioning)")
        if not Provisioner(cfg, store, pin).run(stop):
            return 0  # stopped while waiting to retry
    rotate_now = threading.Event()
    _install_rotate_signal(rotate_now)
    refused = Refusals(cfg, store)
    pid_file = store.directory / "agent.pid"
    _write_pid(pid_file)
    try:
        fast = 0
        while fast < 1000:  # sessions: a rotation restarts one with other credentials; bounded
            rc = _session(cfg, store, pin, stop, clock_trusted, rotate_now, refused)
            clock_trusted = True
            if rc != SESSION_RESTART or stop.is_set():
                return 0 if rc == SESSION_RESTART else rc
            if not refused.waited:  # restarts after a long refusal wait are paced already
                fast += 1
        return 0
    finally:
        from agent.base.durable import remove

        remove(pid_file)


SESSION_RESTART = -1


class Refusals:
    """The broker refusing this identity (revoked or inactive certificate, say): after
    broker.refused_after refusals in a row the session ends and the next one waits a long, jittered
    delay; then one refusal is enough to wait again. The state shows it for `iot-agent status`."""

    def __init__(self, cfg: Config, store: StateStore):
        from agent.base.backoff import Backoff

        b = cfg.broker
        self.cfg, self.store = cfg, store
        self.backoff = Backoff(b.refused_retry_min_s, b.refused_retry_max_s, floor_s=b.refused_retry_min_s)
        self.active = bool(store.load().get("connection", {}).get("refused_since"))
        self.waited = False

    def limit(self) -> int:
        return 1 if self.active else self.cfg.broker.refused_after

    def wait(self, why: str, stop: threading.Event) -> None:
        delay = self.backoff.next_delay()
        now = time.time()
        since = self.store.load().get("connection", {}).get("refused_since") or int(now)
        self.store.update(connection={"refused_since": since, "last_error": why, "next_try_at": int(now + delay)})
        log.error("the broker refuses this device's identity (%s): the certificate may be revoked or inactive; "
                  "next try in %.0f s", why, delay)
        sdnotify.status_line(f"refused by the broker since {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(since))}"
                             f" ({why}); next try in {delay:.0f} s")
        self.active, self.waited = True, True
        deadline = time.monotonic() + delay
        while not stop.wait(min(1.0, max(0.0, deadline - time.monotonic()))) and time.monotonic() < deadline:
            sdnotify.beat()

    def accepted(self) -> None:
        if self.active:
            log.info("the broker accepts this device's identity again")
            self.store.update(connection={})
        self.active, self.waited = False, False
        self.backoff.reset()


def _session(cfg: Config, store: StateStore, pin: str, stop: threading.Event, clock_trusted: bool,
             rotate_now: threading.Event, refused: Refusals) -> int:
    """Connect with the current identity (or the one a rotation must prove) and serve until stopped."""
    from agent.identity.rotation import Rotator, check_not_expired

    identity = current_identity(cfg, store.load())
    rotator = Rotator(cfg, store, identity.thing_name)
    if rotator.step in ("keygen", "csr", "cleanup", "abandon_cleanup"):
        sdnotify.expect_busy(250)  # two `iot-agent keys` runs, 120 s each at most
        try:
            rotator.token_work()
        except AgentError as e:
            log.warning("certificate rotation: %s; trying again later", e)
            if rotator.step in ("keygen", "csr"):
                rotator.fail_prepare(str(e))
        identity = current_identity(cfg, store.load())
    pending = rotator.pending_identity()
    if pending:
        identity = Identity(identity.thing_name, Path(pending[0]), pending[1])
        log.info("proving the new certificate %s", identity.certificate_file.name)
    else:
        check_not_expired(identity.certificate_file)
    router = MessageRouter()
    router.add(f"cmd/{identity.thing_name}/certificate-rotation/", rotator.on_message)
    exit_code = [0]
    session_restart = threading.Event()
    engine_box: list = []
    on_connected: list = []  # what wants to hear of every (re)connection: the jobs engine, the inventory
    conn = Connection(settings_for(cfg, identity, pin), on_message=router,
                      on_event=lambda ev: ev.kind == "connected" and [f() for f in on_connected])
    first_jitp = store.load().get("jitp", {}).get("registered") is False
    if not pending:
        conn.refusal_limit = refused.limit() + (cfg.identity.jitp_first_refusals if first_jitp else 0)
        if first_jitp:
            log.info("first connection of a JITP certificate: AWS IoT registers it and drops that connection; "
                     "the agent connects again")
    refusal = None
    reporter = worker = inventory = None
    try:
        try:
            if clock_trusted:
                conn.prepare()
            else:
                _prepare_during_clock_gate(cfg, conn, stop)
        except ClockError:
            if stop.is_set():  # SIGTERM while waiting for the clock: a normal stop
                return 0
            raise
        log.info("connecting to %s:%d as %s", cfg.broker.endpoint, cfg.broker.port, identity.thing_name)
        sdnotify.status_line(f"connecting to {cfg.broker.endpoint}:{cfg.broker.port} as {identity.thing_name}")
        conn.start()
        if pending:
            deadline = time.monotonic() + cfg.rotation.prove_timeout_s
            while not conn.connected.is_set() and time.monotonic() < deadline and not stop.is_set():
                sdnotify.beat()
                conn.connected.wait(0.5)
            if stop.is_set():
                return 0
            if not conn.connected.is_set():
                last = next((e.detail for e in reversed(conn.events) if e.kind == "failed"), "no answer")
                rotator.not_proven(f"no connection within {cfg.rotation.prove_timeout_s:g} s ({last})")
                session_restart.set()
                return SESSION_RESTART
            rotator.proven()
        if cfg.defender.enabled:
            reporter = start_defender(cfg, store, identity, conn, router)
        if cfg.jobs.enabled:
            from agent.jobs.engine import JobsEngine

            def restart() -> None:
                exit_code[0] = RESTART_EXIT
                stop.set()

            handlers = builtin_job_handlers(cfg, store, identity, conn, router, restart)
            handlers["rotate-certificate"] = _rotation_job_handler(rotator, rotate_now)
            engine = JobsEngine(identity.thing_name, conn, load_state=lambda: store.load().get("jobs", {}),
                                save_state=lambda d: store.update(jobs=d), handlers=handlers)
            engine_box.append(engine)
            router.add(f"$aws/things/{identity.thing_name}/jobs/", engine.on_raw_message)  # what the SDK cannot read
            on_connected.append(engine.on_connected)
            engine.start()
            if conn.connected.is_set():
                engine.on_connected()
        if cfg.inventory.enabled:
            from agent.inventory.reporter import InventoryReporter

            inventory = InventoryReporter(cfg, store, identity.thing_name, str(identity.certificate_file), conn).start()
            on_connected.append(inventory.on_connected)
            if conn.connected.is_set():
                inventory.on_connected()
        worker = threading.Thread(target=_rotation_worker, name="rotation", daemon=True, args=(
            cfg, rotator, conn, identity, rotate_now, session_restart, stop, engine_box))
        worker.start()
        waited, tick = 0.0, 0.5
        while not stop.wait(tick) and not session_restart.is_set():
            sdnotify.beat()
            failpoints.hang("daemon.main_loop_hang")
            if conn.connected.is_set():
                waited = 0.0
                if refused.active or refused.waited:
                    refused.accepted()
                if first_jitp:
                    first_jitp = False
                    store.update(jitp={"registered": True, "at": int(time.time())})
                    log.info("just-in-time registration done: connected as %s", identity.thing_name)
                activity = engine_box[0].activity if engine_box else None
                sdnotify.status_line(f"connected as {identity.thing_name}" + (f"; {activity}" if activity else ""))
                continue
            waited += tick
            if conn.refused.is_set():
                refusal = next((e.detail for e in reversed(conn.events) if e.kind == "failed"
                                and "USER_REQUESTED_STOP" not in e.detail), "refused")
                session_restart.set()
                break
            if waited % cfg.broker.connect_timeout_s < tick:
                last = next((e.detail for e in reversed(conn.events) if e.kind in ("failed", "disconnected")),
                            "none yet")
                log.warning("not connected for %.0f s (last error: %s); still retrying", waited, last)
                sdnotify.status_line(f"not connected for {waited:.0f} s (last error: {last}); retrying")
    finally:
        rotate_now.set()  # ends the worker's wait
        if worker:
            worker.join(5)
        rotate_now.clear()
        if engine_box:
            engine_box[0].stop()
        if reporter:
            reporter.stop()
        if inventory:
            inventory.stop()
        conn.stop()
        if session_restart.is_set() and not stop.is_set():
            log.info("reconnecting with %s credentials", "the new" if rotator.pending_identity() else "the current")
        else:
            log.info("stopped" if exit_code[0] == 0 else "stopped; restarting into the new release")
    if refusal and not stop.is_set():
        refused.wait(refusal, stop)  # the session is closed: no attempts while waiting, that is the point
    if session_restart.is_set() and not stop.is_set():
        return SESSION_RESTART
    return exit_code[0]


def _rotation_worker(cfg: Config, rotator, conn: Connection, identity: Identity, rotate_now: threading.Event,
                     session_restart: threading.Event, stop: threading.Event, engine_box: list) -> None:
    """Finishes a rotation after a switch, and starts one when due (checked at start, then every
    check_interval_s) or asked for (SIGUSR1 from `iot-agent rotate`, a job)."""
    from agent.base.errors import AgentError

    while not stop.is_set() and not session_restart.is_set():
        if conn.connected.is_set():
            try:
                step = rotator.step
                if step in ("commit", "abandon"):
                    rotator.finish(conn, identity.certificate_file, identity.key_label)
                    session_restart.set()  # the key work is done between sessions
                    return
                if step in ("requesting", "certificate", "registering"):
                    try:
                        rotator.prepare(conn)
                    except AgentError as e:
                        rotator.fail_prepare(str(e))
                        log.error("certificate rotation refused: %s", e)
                    session_restart.set()
                    return
                reason = rotator.wanted(identity.certificate_file) if step == "idle" else None
                if reason:
                    rotator.start(identity.certificate_file, identity.key_label, reason)
                    session_restart.set()
                    return
            except AgentError as e:
                log.warning("certificate rotation: %s; trying again later", e)
            except Exception:
                log.exception("certificate rotation failed unexpectedly; trying again later")
        wait = cfg.rotation.check_interval_s if conn.connected.is_set() else 1.0
        if rotator.step != "idle":
            wait = min(wait, 30.0)
        retry_at = float(rotator.flow().get("next_attempt_at", 0))
        if retry_at > time.time():  # a failed rotation is tried again when its backoff ends, not a day later
            wait = min(wait, max(1.0, retry_at - time.time() + 0.1))
        rotate_now.wait(wait)
        rotate_now.clear()


def _rotation_job_handler(rotator, rotate_now: threading.Event):
    from agent.jobs.engine import Outcome
    from agent.identity.rotation import job_outcome

    def handle(job_id: str, doc, progress) -> Outcome:
        res = job_outcome(rotator, job_id)
        if res:
            return Outcome(res[0], {"reason" if res[0] != "SUCCEEDED" else "result": res[1]})
        if rotator.step == "idle":
            rotator.request(job_id, f"job {job_id}")
        elif not rotator.flow().get("job_id"):
            rotator.attach_job(job_id)
        rotate_now.set()
        return Outcome("IN_PROGRESS", {"step": "rotating certificate"})

    return handle


def _install_rotate_signal(event: threading.Event) -> None:
    try:
        signal.signal(signal.SIGUSR1, lambda *_: event.set())
    except ValueError:  # not the main thread (embedded use): `iot-agent rotate` then waits for the next check
        pass


def _write_pid(path: Path) -> None:
    import os

    from agent.base.durable import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, f"{os.getpid()}\n".encode(), 0o600)
    except OSError as e:  # only `iot-agent rotate` needs it; it then waits for the next check
        log.warning("cannot write %s (%s); `iot-agent rotate` will not wake this agent", path, e.strerror)


def builtin_job_handlers(cfg: Config, store: StateStore, identity: Identity, conn: Connection,
                         router: "MessageRouter", restart) -> dict:
    """Operations this release performs; anything else is REJECTED with the reason."""
    handlers: dict = {}
    if cfg.ota.targets:
        import os

        from agent.update.ota import OtaHandler
        from agent.update.release import RELEASE_ENV

        ota = OtaHandler(cfg, load=lambda: store.load().get("ota", {}), save=lambda d: store.update(ota=d),
                         thing=identity.thing_name, publish=lambda t, p: conn.publish(t, p, qos=1),
                         subscribe=lambda t: conn.subscribe(t, qos=1), request_restart=restart,
                         connected=conn.connected.is_set,
                         running_release=os.environ.get(RELEASE_ENV))
        ota.recover()
        router.add(f"$aws/things/{identity.thing_name}/streams/", ota.on_stream_message)
        handlers["ota-update"] = ota
    return handlers


class MessageRouter:
    """Incoming publishes to the feature that subscribed, by topic prefix."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, object]] = []

    def add(self, prefix: str, handler) -> None:
        self.routes.append((prefix, handler))

    def __call__(self, topic: str, payload: bytes) -> None:
        for prefix, handler in self.routes:
            if topic.startswith(prefix):
                handler(topic, payload)
                return


def start_defender(cfg: Config, store: StateStore, identity: Identity, conn: Connection, router: MessageRouter):
    from agent.defender.reporter import Collector, Reporter

    reporter = Reporter(
        cfg=cfg.defender, thing=identity.thing_name,
        collector=Collector(cfg.defender, store.directory, identity.certificate_file),
        publish=lambda t, p: conn.publish(t, p, qos=1), subscribe=lambda t: conn.subscribe(t, qos=1),
        connected=conn.connected.is_set, connection_count=lambda: conn.connect_count,
        load_state=lambda: store.load().get("defender", {}), save_state=lambda d: store.update(defender=d))
    router.add(reporter.topic + "/", reporter.on_response)
    reporter.start()
    log.info("Device Defender reports every %g s (%s, %s names)", cfg.defender.interval_s, cfg.defender.format,
             cfg.defender.names)
    return reporter


def _prepare_during_clock_gate(cfg: Config, conn: Connection, stop: threading.Event) -> None:
    """Wait for the clock in a thread while this one loads the token and TLS context.

    NTP answers take a network round trip (seconds when servers are unreachable); loading awscrt,
    initialising PKCS#11 and logging in to the token take about as long on a Pi. Neither touches
    the broker, so doing them side by side shortens start-up without letting any TLS connection
    happen before the clock is trusted: start() runs only after the gate has opened.
    """
    outcome: dict[str, BaseException | str] = {}

    def gate() -> None:
        try:
            outcome["ok"] = ClockGate(cfg.clock).wait(stop)
        except BaseException as e:  # re-raised in the main thread
            outcome["error"] = e

    t = threading.Thread(target=gate, name="clock-gate", daemon=True)
    t.start()
    try:
        conn.prepare()
    except BaseException:
        stop.set()  # ends the gate's wait
        raise
    finally:
        while t.is_alive():  # short joins keep SIGTERM handling responsive
            sdnotify.beat()
            t.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
