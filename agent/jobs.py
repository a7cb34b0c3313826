"""The jobs engine: AWS IoT Jobs through awsiotsdk's IotJobsClientV2, one job at a time.

On connect and on every notify-next it starts the next pending execution, dispatches the document
to the handler for its `operation` (afr_ota documents count as "ota-update"), and reports the
result. Every status update goes through a persisted outbox first: if the broker is down or the
agent restarts, the update is delivered later, in order. A repeat after a lost answer is
recognised (TerminalStateReached / VersionMismatch with the execution already in that state), so
from the job's point of view each update happens once. Unknown or invalid documents are REJECTED
with the reason; a handler's exception fails the job, never the agent.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("agent.jobs")

TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED")
REQUEST_TIMEOUT_S = 20
IDLE_POLL_MIN_S = 2.0
IDLE_POLL_MAX_S = 60.0


@dataclass(frozen=True)
class Outcome:
    # SUCCEEDED, FAILED or REJECTED; or IN_PROGRESS when the job goes on after a restart of the agent
    # (a self-update): the engine then reports the details and takes no further job in this run.
    status: str
    details: dict[str, str]


Handler = Callable[[str, dict, Callable[[dict[str, str]], None]], Outcome]


def operation_of(document: Any) -> str | None:
    if isinstance(document, dict):
        if "afr_ota" in document:
            return "ota-update"
        op = document.get("operation")
        if isinstance(op, str) and 0 < len(op) <= 64:
            return op
    return None


def _clean(details: dict) -> dict[str, str]:
    """statusDetails are strings, at most 10 entries of bounded size (AWS's limits)."""
    out = {}
    for k, v in list(details.items())[:10]:
        out[str(k)[:128]] = str(v)[:1024]
    return out


@dataclass(eq=False)
class JobsEngine:
    thing: str
    conn: Any  # agent.connection.Connection
    load_state: Callable[[], dict]
    save_state: Callable[[dict], None]
    handlers: dict[str, Handler] = field(default_factory=dict)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _client: Any = None
    _stream: Any = None
    _thread: threading.Thread | None = None
    _seen_connects: int = -1
    _parked: bool = False  # a handler asked to finish its job after a restart
    activity: str | None = None  # "job X: downloading 40%", for systemd's STATUS= line

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        # A request in flight (up to REQUEST_TIMEOUT_S) must not hold up SIGTERM: the thread is a
        # daemon, its outbox is persisted, and the connection's stop fails its futures.
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(2)
        self._stream = None
        self._client = None

    def _ensure_client(self) -> None:
        if self._client is not None:
            return
        import awscrt.mqtt_request_response as rr
        from awsiot import ServiceStreamOptions, iotjobs

        self._client = iotjobs.IotJobsClientV2(self.conn.client, rr.ClientOptions(
            max_request_response_subscriptions=4, max_streaming_subscriptions=2,
            operation_timeout_in_seconds=REQUEST_TIMEOUT_S))
        self._stream = self._client.create_next_job_execution_changed_stream(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=self.thing),
            ServiceStreamOptions(incoming_event_listener=lambda ev: self._wake.set(),
                                 subscription_status_listener=self._on_stream_status,
                                 deserialization_failure_listener=self._on_bad_notification))
        self._stream.open()

    def _on_stream_status(self, ev) -> None:
        """A job queued before the notify-next subscription was in place sends no notification: check
        the queue whenever the subscription is (re-)established."""
        import awscrt.mqtt_request_response as rr

        if ev.type == rr.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED:
            log.debug("notify-next subscription established")
            self._wake.set()
        else:
            log.info("notify-next subscription %s; the queue is checked again when it is back",
                     ev.type.name.lower().replace("_", " "))

    def _on_bad_notification(self, failure) -> None:
        log.warning("notify-next message could not be read; checking the queue instead")
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        delay, poll = 1.0, IDLE_POLL_MIN_S
        while not self._stop.is_set():
            # Woken by notify-next or a connect. The queue is also polled: soon after activity, then
            # less and less often (up to IDLE_POLL_MAX_S), because a notification can be missed (one
            # sent while the last update was in flight or before the subscription was in place).
            poll = IDLE_POLL_MIN_S if self._wake.wait(poll) else min(poll * 2, IDLE_POLL_MAX_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self.conn.connected.is_set():
                continue
            try:
                self._ensure_client()
                self.flush_outbox()
                while not self._stop.is_set() and not self._parked and self.run_next():
                    poll = IDLE_POLL_MIN_S
                delay = 1.0
            except Exception as e:
                log.warning("jobs: %s; retrying in %.0f s", e, delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 60.0)
                self._wake.set()

    def unpark(self) -> None:
        """A handler's job can be finished in this run after all (e.g. a rotation refused early)."""
        self._parked = False
        self._wake.set()

    def on_connected(self) -> None:
        """Call on every connection success: pending updates are flushed and the queue is checked."""
        self._wake.set()

    # -- outbox ---------------------------------------------------------------------------------
    def _enqueue(self, job_id: str, status: str, details: dict[str, str]) -> None:
        with self._lock:
            st = self.load_state()
            outbox = list(st.get("outbox", []))
            if status == "IN_PROGRESS" and outbox and outbox[-1]["job_id"] == job_id and outbox[-1]["status"] == "IN_PROGRESS":
                outbox[-1] = {"job_id": job_id, "status": status, "details": details}  # coalesce progress
            else:
                outbox.append({"job_id": job_id, "status": status, "details": details})
            self.save_state({**st, "outbox": outbox})

    def flush_outbox(self) -> None:
        """Deliver queued updates in order; stop at the first that cannot be delivered now."""
        from awsiot import V2ServiceException, iotjobs

        while True:
            with self._lock:
                outbox = list(self.load_state().get("outbox", []))
            if not outbox:
                return
            item = outbox[0]
            try:
                self._client.update_job_execution(iotjobs.UpdateJobExecutionRequest(
                    thing_name=self.thing, job_id=item["job_id"], status=item["status"],
                    status_details=item["details"])).result(REQUEST_TIMEOUT_S + 5)
                log.info("job %s: %s delivered", item["job_id"], item["status"])
            except V2ServiceException as e:
                code = getattr(e.modeled_error, "code", None)
                if code in ("TerminalStateReached", "VersionMismatch", "ResourceNotFound", "InvalidStateTransition"):
                    # Already applied (a lost answer), or the cloud moved on (canceled, timed out): either
                    # way this update must not be sent again.
                    log.info("job %s: %s not applied again (%s)", item["job_id"], item["status"], code)
                else:
                    raise
            with self._lock:
                st = self.load_state()
                rest = list(st.get("outbox", []))
                if rest and rest[0] == item:
                    rest.pop(0)
                self.save_state({**st, "outbox": rest})

    # -- one job ----------------------------------------------------------------------------------
    def run_next(self) -> bool:
        """Start and run the next pending job; False when there is none."""
        from awsiot import iotjobs

        resp = self._client.start_next_pending_job_execution(iotjobs.StartNextPendingJobExecutionRequest(
            thing_name=self.thing, status_details={"agent": "started"})).result(REQUEST_TIMEOUT_S + 5)
        ex = resp.execution
        if ex is None:
            log.debug("no pending job")
            return False
        job_id, doc = ex.job_id, ex.job_document
        log.info("job %s started (%s)", job_id, operation_of(doc) or "unknown document")
        with self._lock:
            st = self.load_state()
            self.save_state({**st, "current": {"job_id": job_id, "started_at": int(time.time())}})
        outcome = self.dispatch(job_id, doc)
        if outcome.status == "IN_PROGRESS":
            self._parked = True
            self._enqueue(job_id, "IN_PROGRESS", _clean(outcome.details))
            log.info("job %s continues after a restart: %s", job_id, outcome.details)
            self.flush_outbox()
            return False
        self._enqueue(job_id, outcome.status, _clean(outcome.details))
        with self._lock:
            st = self.load_state()
            self.save_state({**st, "current": None, "last": {"job_id": job_id, "status": outcome.status,
                                                             "details": _clean(outcome.details)}})
        log.info("job %s: %s %s", job_id, outcome.status, outcome.details)
        self.flush_outbox()
        return True

    def dispatch(self, job_id: str, doc: Any) -> Outcome:
        op = operation_of(doc)
        handler = self.handlers.get(op) if op else None
        if handler is None:
            why = f"unsupported operation {op!r}" if op else "document has no operation (and is not afr_ota)"
            return Outcome("REJECTED", {"reason": why})

        def progress(details: dict[str, str]) -> None:
            self.activity = f"job {job_id}: " + " ".join(str(v) for k, v in details.items() if k in ("step", "progress"))
            self._enqueue(job_id, "IN_PROGRESS", _clean(details))
            if self.conn.connected.is_set():
                try:
                    self.flush_outbox()
                except Exception as e:  # delivered later
                    log.debug("progress update deferred: %s", e)

        self.activity = f"job {job_id}: {op}"
        try:
            return handler(job_id, doc, progress)
        except Exception as e:
            log.exception("job %s: handler for %s failed", job_id, op)
            return Outcome("FAILED", {"reason": f"{e.__class__.__name__}: {str(e)[:200]}"})
        finally:
            self.activity = None
