"""`iot-agent run`: clock gate, connect, stay connected until SIGTERM, shut down cleanly.

The order is the security argument: no TLS before the clock is trusted, no key material outside
the token, and a clean stop that releases the token (a TPM leaks handles otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path

from agent.base import failpoints, sdnotify
from agent.base.config import Config
from agent.base.errors import AgentError, ClockError
from agent.base.memory import limit_malloc_arenas, release_freed_memory
from agent.base.pin import read_pin
from agent.base.state import StateStore
from agent.identity.config import identity_mode
from agent.identity.current import Identity, current_identity, has_identity
from agent.identity.feature import RotationFeature
from agent.runtime.features import enabled as enabled_features
from agent.session.clock import ClockGate
from agent.session.connection import Connection, ConnectionSettings
from agent.session.feature import Feature, MessageRouter, Session
from agent.update.release import RESTART_EXIT

log = logging.getLogger("agent")


def settings_for(cfg: Config, identity: Identity, pin: str) -> ConnectionSettings:
    return ConnectionSettings.from_config(cfg, identity.thing_name, identity.certificate_file, identity.key_label, pin)


def install_stop_signals(stop: threading.Event) -> None:
    def handler(signum, _frame):
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run(cfg: Config, stop: threading.Event, restart_in_place: bool = False) -> int:
    """Returns the exit status: 0 after SIGTERM, RESTART_EXIT when an update asks to be restarted into.
    restart_in_place: the process is the `iot-agent run` command itself (not embedded), so it may
    replace itself with a fresh copy after its identity changed (see _restart_in_place)."""
    limit_malloc_arenas()  # before the first thread (the watchdog's, then awscrt's)
    watchdog_stop = threading.Event()
    sdnotify.start_watchdog(watchdog_stop)
    # Ready for systemd from the start: what the agent is waiting for is in STATUS=.
    sdnotify.ready("waiting for a trustworthy clock before any TLS connection")
    rc = 1
    try:
        rc = _run(cfg, stop, restart_in_place)
        return rc
    finally:
        if rc != RESTART_EXIT:  # a restart into a new release is not a stop of the service
            sdnotify.stopping()
        watchdog_stop.set()


def _run(cfg: Config, stop: threading.Event, restart_in_place: bool = False) -> int:
    pin = read_pin(cfg)
    store = StateStore(cfg.resolve(cfg.device.state_dir))
    from agent.base.durable import remove_stale_temps

    remove_stale_temps(store.directory)  # what a power cut left half-written: never read, now gone
    clock_trusted = False
    mode = identity_mode(cfg)
    if not has_identity(cfg, store.load()) and mode == "jitp":
        raise AgentError(
            "identity.mode is jitp but there is no device certificate yet: run `iot-agent factory "
            "device-key` and `factory device-cert` at the factory (README, 'Just-in-time provisioning')"
        )
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
        if restart_in_place:
            _restart_in_place("provisioned; connecting with the device's own certificate", cfg)
        release_freed_memory()  # the claim connection and its TLS context are gone
    rotate_now = threading.Event()
    _install_rotate_signal(rotate_now)
    refused = Refusals(cfg, store)
    pid_file = store.directory / "agent.pid"
    _write_pid(pid_file)
    try:
        fast = 0
        first = True
        while fast < 1000:  # sessions: a rotation restarts one with other credentials; bounded
            session_cfg = _session_config(cfg, store, first)
            first = False
            rc = _session(session_cfg, store, pin, stop, clock_trusted, rotate_now, refused)
            clock_trusted = True
            if rc == SESSION_NEW_IDENTITY and not stop.is_set() and restart_in_place:
                _restart_in_place("a new certificate to prove", cfg)
            if rc == SESSION_NEW_IDENTITY:
                rc = SESSION_RESTART
            if rc != SESSION_RESTART or stop.is_set():
                return 0 if rc == SESSION_RESTART else rc
            release_freed_memory()  # the old session's client, TLS context and token module are gone
            if not refused.waited:  # restarts after a long refusal wait are paced already
                fast += 1
        return 0
    finally:
        from agent.base.durable import remove

        _close_features(cfg)
        remove(pid_file)


def _session_config(cfg: Config, store: StateStore, first: bool) -> Config:
    """The file's config, with the configuration shadow's overlay in force when that feature is on."""
    if not cfg.remote_config.enabled:
        return cfg
    from agent.runtime.features import parse
    from agent.runtime.remote_config.overlay import session_config

    out = session_config(cfg, store.directory, parse, first)
    if out.log.level != cfg.log.level:
        logging.getLogger().setLevel(out.log.level.upper())
    return out


def _reconfigure(
    old: Config, new: Config, features: list[Feature], started: list[Feature], session_end: threading.Event
) -> str:
    """Give the running features a changed config: in place where they can, else a new session (a
    reconnect with the new config; the overlay record already holds it). Returns how, for the log."""
    if new.log.level != old.log.level:
        logging.getLogger().setLevel(new.log.level.upper())
    if [s.name for s in enabled_features(old)] != [s.name for s in enabled_features(new)]:
        session_end.set()
        return "a new session: features turned on or off"
    again = []
    for spec, f in zip(enabled_features(old), features, strict=True):
        if all(old.sections.get(s.name) == new.sections.get(s.name) for s in spec.sections):
            continue
        if not (f in started and f.reconfigure(new)):
            again.append(spec.name)
    if again:
        session_end.set()
        return f"a new session for {', '.join(again)}"
    return "live"


def _close_features(cfg: Config) -> None:
    """Release what features keep across sessions (sockets, open files) before the process stops or execs."""
    for spec in enabled_features(cfg):
        if spec.close is not None:
            try:
                spec.close()
            except Exception:
                log.exception("%s: close failed", spec.name)


SESSION_RESTART = -1
SESSION_NEW_IDENTITY = -2  # a restart with other credentials (a rotation's new certificate to prove)
RESTARTS_ENV = "IOT_AGENT_RESTARTS_IN_PLACE"
MAX_RESTARTS_IN_PLACE = 100


def _restart_in_place(why: str, cfg: Config) -> None:
    """Replace this process by a fresh `iot-agent run`: same PID (systemd's main PID, state/agent.pid),
    same arguments and environment.

    Provisioning and rotation are the agent's two big one-off tasks (a claim connection, key
    generation, CSR, cloud calls): afterwards the process would carry their modules and heap
    fragments for the rest of its life (bench/lifecycle_rss.py). Both end where the agent reconnects
    with other credentials anyway, and everything they decided is already in the state store, so a
    fresh process started right there loses nothing and costs one import. The connection and the
    token are already released (a TPM would otherwise keep the old session's handles). Bounded by a
    counter in the environment: past it, the agent goes on in this process."""
    import os
    import sys

    from agent.session.connection import wait_token_released

    done = int(os.environ.get(RESTARTS_ENV, "0") or 0)
    if done >= MAX_RESTARTS_IN_PLACE or not getattr(sys, "orig_argv", None):
        return
    if not wait_token_released(cfg.resolve(cfg.pkcs11.library)):
        log.warning("%s: the token is still in use; going on in this process", why)
        return
    os.environ[RESTARTS_ENV] = str(done + 1)
    _close_features(cfg)  # the next process opens them again (a closed hub is rebuilt on demand)
    log.info("%s: restarting in place (same PID) to start clean", why)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # argv[0] locates the venv
    except OSError as e:  # the interpreter gone or not executable (mid-upgrade): not a reason to stop
        os.environ[RESTARTS_ENV] = str(done)
        log.warning("%s: cannot restart in place (%s); going on in this process", why, e.strerror)


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
        log.error(
            "the broker refuses this device's identity (%s): the certificate may be revoked or inactive; "
            "next try in %.0f s",
            why,
            delay,
        )
        sdnotify.status_line(
            f"refused by the broker since {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(since))}"
            f" ({why}); next try in {delay:.0f} s"
        )
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


def _session(
    cfg: Config,
    store: StateStore,
    pin: str,
    stop: threading.Event,
    clock_trusted: bool,
    rotate_now: threading.Event,
    refused: Refusals,
) -> int:
    """Connect with the current identity (or the one a rotation must prove), run the enabled features
    over the connection until stopped, and stop them."""
    features = [spec.build(cfg, store) for spec in enabled_features(cfg)]
    rotation = next(f for f in features if isinstance(f, RotationFeature))
    rotation.wake = rotate_now
    identity = rotation.session_identity(
        current_identity(cfg, store.load()), lambda: current_identity(cfg, store.load())
    )
    router = MessageRouter()
    exit_code = [0]
    session_end = threading.Event()
    started: list[Feature] = []

    def on_event(ev) -> None:
        if ev.kind == "connected":
            for f in list(started):
                f.on_connected()

    conn = Connection(settings_for(cfg, identity, pin), on_message=router, on_event=on_event)
    first_jitp = store.load().get("jitp", {}).get("registered") is False
    if not rotation.pending:
        conn.limit_refusals(refused.limit() + (cfg.identity.jitp_first_refusals if first_jitp else 0))
        if first_jitp:
            log.info(
                "first connection of a JITP certificate: AWS IoT registers it and drops that connection; "
                "the agent connects again"
            )
    refusal = None
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
        proven = rotation.prove(conn.connected, conn.last_error, stop)
        if proven is None:
            return 0
        if not proven:
            session_end.set()
            return SESSION_RESTART

        def restart() -> None:
            exit_code[0] = RESTART_EXIT
            stop.set()

        current = [cfg]

        def reconfigure(new: Config) -> str:
            how = _reconfigure(current[0], new, features, started, session_end)
            current[0] = new
            return how

        session = Session(
            thing_name=identity.thing_name,
            certificate_file=identity.certificate_file,
            key_label=identity.key_label,
            conn=conn,
            store=store,
            router=router,
            stop=stop,
            end=session_end.set,
            request_restart=restart,
            reconfigure=reconfigure,
        )
        guard = None
        if cfg.remote_config.enabled:
            from agent.runtime.remote_config.overlay import Guard

            guard = Guard(store.directory, session_end.set)
        for f in features:
            f.start(session)
            started.append(f)
            if conn.connected.is_set():  # connected before it could hear of it
                f.on_connected()
        waited, tick = 0.0, 0.5
        while not stop.wait(tick) and not session_end.is_set():
            sdnotify.beat()
            failpoints.hang("daemon.main_loop_hang")
            if guard is not None:
                guard.tick()
            if conn.connected.is_set():
                waited = 0.0
                if refused.active or refused.waited:
                    refused.accepted()
                if first_jitp:
                    first_jitp = False
                    store.update(jitp={"registered": True, "at": int(time.time())})
                    log.info("just-in-time registration done: connected as %s", identity.thing_name)
                lines = [line for f in started if (line := f.status())]
                sdnotify.status_line(f"connected as {identity.thing_name}" + "".join(f"; {x}" for x in lines))
                continue
            waited += tick
            if conn.refused.is_set():
                refusal = conn.last_error(default="refused")
                session_end.set()
                break
            if waited % cfg.broker.connect_timeout_s < tick:
                last = conn.last_error(("failed", "disconnected"))
                log.warning("not connected for %.0f s (last error: %s); still retrying", waited, last)
                sdnotify.status_line(f"not connected for {waited:.0f} s (last error: {last}); retrying")
    finally:
        for f in reversed(started):
            f.stop()
        conn.stop()
        if session_end.is_set() and not stop.is_set():
            log.info(
                "reconnecting with %s credentials",
                "the new" if rotation.rotator and rotation.rotator.pending_identity() else "the current",
            )
        else:
            log.info("stopped" if exit_code[0] == 0 else "stopped; restarting into the new release")
    if refusal and not stop.is_set():
        refused.wait(refusal, stop)  # the session is closed: no attempts while waiting, that is the point
    if session_end.is_set() and not stop.is_set():
        new = rotation.rotator is not None and rotation.rotator.pending_identity() is not None
        return SESSION_NEW_IDENTITY if new else SESSION_RESTART
    return exit_code[0]


def _install_rotate_signal(event: threading.Event) -> None:
    # Not the main thread (embedded use): ValueError, and `iot-agent rotate` then waits for the next check.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGUSR1, lambda *_: event.set())


def _write_pid(path: Path) -> None:
    import os

    from agent.base.durable import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, f"{os.getpid()}\n".encode(), 0o600)
    except OSError as e:  # only `iot-agent rotate` needs it; it then waits for the next check
        log.warning("cannot write %s (%s); `iot-agent rotate` will not wake this agent", path, e.strerror)


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
    error = outcome.get("error")
    if isinstance(error, BaseException):  # always, when set: "ok" holds the gate's answer, "error" what it raised
        raise error
