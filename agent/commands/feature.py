"""AWS IoT Device Management Commands as a daemon feature: run what the config names, each execution once.

Why a record per execution in the state store, written before anything runs: MQTT delivers a request at
least once, and a power cut can fall anywhere. The record is the decision ("RUNNING", then the terminal
status); every effect after it can be derived again from it: a request seen again is not run again (its
answer is sent again if it never left), and a record found RUNNING after a restart is answered FAILED with
AGENT_RESTARTED (the action may have run in part; it is not run twice).

One worker runs the executions in arrival order; `max_pending` wait behind it and more are REJECTED (BUSY),
so a flood of requests cannot grow the agent. A request that waited past its execution timeout (the MQTT 5
message expiry) is answered TIMED_OUT (REQUEST_EXPIRED) without running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.base.config import Config
from agent.base.logfmt import escape
from agent.base.state import StateStore
from agent.commands import request as rq
from agent.commands.config import SECTIONS, CommandsConfig
from agent.session.feature import Feature, FeatureSpec, MessageProperties, Session

log = logging.getLogger("agent.commands")
SECTION = "commands"  # the state store's record: {"executions": {id: record}}
PUBLISH_TIMEOUT_S = 10.0
BUSY_BACKLOG = 64
STARTED_AT = time.time()


@dataclass(frozen=True)
class _Item:
    topic: rq.Topic
    payload: bytes
    content_type: str | None
    deadline: float | None  # time.monotonic() by which it must start


class CommandsFeature(Feature):
    name = "commands"

    def __init__(self, cfg: Config, store: StateStore) -> None:
        self.section: CommandsConfig = cfg.commands
        self.store = store
        self.session: Session | None = None
        # Bounded by queue_put (max_pending): None wakes the worker to send the answers an outage held back.
        self.queue: queue.Queue[_Item | None] = queue.Queue()
        # BUSY answers wait here for a thread of their own (a flood must not start one thread per request);
        # past BUSY_BACKLOG they are not answered at all: the cloud times those executions out.
        self.busy: queue.Queue[tuple[str, str, str] | None] = queue.Queue(maxsize=BUSY_BACKLOG)
        self.stop_event = threading.Event()
        self.running = threading.Event()  # an execution is being run (max_pending = 0: nothing may wait)
        self.connected = threading.Event()
        self.thread: threading.Thread | None = None
        self.busy_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._queued: set[str] = set()  # execution ids waiting or running (not yet terminal)
        self.ran = 0
        self.refused = 0

    # -- the session -----------------------------------------------------------------------------
    def start(self, session: Session) -> None:
        self.session = session
        session.router.add(f"{rq.PREFIX}{session.thing_name}/executions/", self.on_message, with_properties=True)
        self.thread = threading.Thread(target=self._work, name="commands", daemon=True)
        self.thread.start()
        self.busy_thread = threading.Thread(target=self._answer_busy, name="commands-busy", daemon=True)
        self.busy_thread.start()
        log.info(
            "commands: running %s on request",
            ", ".join(sorted([*self.section.builtin, *self.section.handlers])) or "nothing (none configured)",
        )

    def on_connected(self) -> None:
        session = self.session
        if session is None:
            return

        def subscribe() -> None:
            thing = session.thing_name
            for f in (rq.request_filter(thing), f"{rq.PREFIX}{thing}/executions/+/response/rejected/#"):
                try:
                    code = session.conn.subscribe(f, qos=1)
                except Exception as e:
                    log.warning("commands: could not subscribe to %s (%s)", f, e.__class__.__name__)
                    return
                if code >= 128:
                    log.warning("commands: subscribing to %s refused (reason %d): check the device policy", f, code)
                    return
            log.info("commands: waiting for requests on %s", rq.request_filter(thing))
            self.connected.set()
            self.queue.put(None)

        threading.Thread(target=subscribe, name="commands-subscribe", daemon=True).start()

    def status(self) -> str | None:
        if not self.ran and not self.refused:
            return None
        return f"commands: {self.ran} run, {self.refused} refused"

    def stop(self) -> None:
        self.stop_event.set()
        self.queue.put(None)
        with contextlib.suppress(queue.Full):
            self.busy.put_nowait(None)
        if self.thread:
            self.thread.join(5)
        self.session = None

    def queue_put(self, item: _Item) -> bool:
        """Queue a request unless max_pending are waiting already (with 0: unless one is running)."""
        with self._lock:
            waiting = sum(1 for x in list(self.queue.queue) if x is not None)
            room = waiting < self.section.max_pending or (waiting == 0 and not self.running.is_set())
            if room:
                self.queue.put(item)
            return room

    # -- arrival (the MQTT client's thread: never blocks) -----------------------------------------
    def on_message(self, topic: str, payload: bytes, props: MessageProperties) -> None:
        session = self.session
        if session is None:
            return
        if "/response/rejected/" in topic:
            log.warning(
                "commands: the cloud refused an answer (%s): %s", escape(topic, 200), escape(_text(payload), 300)
            )
            return
        t = rq.parse_topic(topic, session.thing_name)
        if t is None:
            if "/request" in topic:
                log.warning(
                    "commands: ignored a request on %s (not a valid execution id or format)", escape(topic, 200)
                )
            return
        deadline = None if props.message_expiry_s is None else time.monotonic() + props.message_expiry_s
        with self._lock:
            if t.execution_id in self._queued:
                log.info("commands: execution %s is already waiting or running; the repeat is ignored", t.execution_id)
                return
            self._queued.add(t.execution_id)
        if not self.queue_put(_Item(t, payload, props.content_type, deadline)):
            with self._lock:
                self._queued.discard(t.execution_id)
            self._finish_without_running(
                t,
                props.content_type,
                f"{self.section.max_pending} request(s) are waiting already (commands.max_pending)",
            )

    # -- the worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        self._recover()
        while not self.stop_event.is_set():
            item = self.queue.get()  # sleeps until a request, a (re)connection or the stop
            if self.stop_event.is_set():
                return
            if item is None:
                self._send_unsent()
                continue
            with self._lock:
                self.running.set()
            try:
                self._execute(item)
            except Exception:  # one bad execution must not end the feature
                log.exception("commands: execution %s failed", item.topic.execution_id)
            finally:
                self.running.clear()
                with self._lock:
                    self._queued.discard(item.topic.execution_id)

    def _execute(self, item: _Item) -> None:
        eid, fmt = item.topic.execution_id, rq.response_format(item.topic, item.content_type)
        record = self._records().get(eid)
        if record is not None:  # seen before: never run twice; its answer again if it never left
            log.info("commands: execution %s was seen before (%s); not run again", eid, record.get("status"))
            if record.get("status") in rq.TERMINAL:
                self._answer(eid, record, force=True)
            return
        if item.deadline is not None and time.monotonic() >= item.deadline:
            self._finish(eid, fmt, rq.TIMED_OUT, rq.EXPIRED, "the execution timeout passed before it could start")
            return
        try:
            req = rq.parse_request(
                item.payload,
                item.topic,
                item.content_type,
                max_bytes=self.section.max_request_kib * 1024,
                actions=(*self.section.builtin, *self.section.handlers),
            )
        except rq.RequestError as e:
            self._finish(eid, fmt, e.status, e.reason_code, e.description)
            return
        if req.action in self.section.builtin and req.parameters:
            self._finish(eid, fmt, rq.REJECTED, rq.MALFORMED, f"the built-in action {req.action} takes no parameters")
            return
        # The decision, durable before any effect: a crash from here on is answered AGENT_RESTARTED.
        self._record(eid, {"status": "RUNNING", "fmt": fmt, "action": req.action, "at": int(time.time())})
        log.info("commands: execution %s: running %s", eid, req.action)
        if req.action in self.section.builtin:
            self._builtin(eid, fmt, req.action)
        else:
            self._handler(eid, fmt, req, item.deadline)

    def _builtin(self, eid: str, fmt: str, action: str) -> None:
        session = self.session
        assert session is not None
        if action == "report-status":
            self._finish(eid, fmt, rq.SUCCEEDED, result=self._status_result(session))
        elif action == "rotate-certificate":
            # The same wake-up as `iot-agent rotate` (SIGUSR1): the rotation feature checks now and rotates.
            os.kill(os.getpid(), signal.SIGUSR1)
            self._finish(eid, fmt, rq.SUCCEEDED, result={"requested": {"s": "certificate rotation check started"}})
        elif action == "restart-agent":
            # Answered (and recorded) first: after the restart the request, if seen again, is not run again.
            self._finish(eid, fmt, rq.SUCCEEDED, result={"requested": {"s": "the agent restarts now"}})
            session.request_restart()

    def _status_result(self, session: Session) -> dict[str, Any]:
        from agent.base.pemfile import certificate_expiry

        out: dict[str, Any] = {
            "agent_version": {"s": __version__},
            "thing_name": {"s": session.thing_name},
            "uptime_s": {"s": str(int(time.time() - STARTED_AT))},
        }
        expiry = certificate_expiry(str(session.certificate_file))
        if expiry:
            out["certificate_expires"] = {"s": str(expiry)}
        return out

    def _handler(self, eid: str, fmt: str, req: rq.Request, deadline: float | None) -> None:
        from dataclasses import replace

        from agent.commands.runner import run

        h = self.section.handlers[req.action]
        timeout = h.timeout_s
        if deadline is not None:  # past the execution timeout the cloud has given up on it anyway
            timeout = max(0.1, min(timeout, deadline - time.monotonic()))
        session = self.session
        assert session is not None
        self._publish(eid, fmt, rq.response(rq.IN_PROGRESS))
        out = run(
            replace(h, timeout_s=timeout),
            req.parameters,
            {"IOT_AGENT_EXECUTION_ID": eid, "IOT_AGENT_THING_NAME": session.thing_name, "IOT_AGENT_ACTION": req.action},
            self.stop_event,
        )
        result = {
            "output": {"s": out.output.decode("utf-8", "replace")},
            "output_bytes": {"s": str(out.output_bytes)},
            "output_truncated": {"b": out.truncated},
        }
        if out.exit_code is not None:
            result["exit_code"] = {"s": str(out.exit_code)}
        if out.error:
            self._finish(eid, fmt, rq.FAILED, rq.CANNOT_RUN, out.error, result)
        elif out.timed_out:
            self._finish(eid, fmt, rq.TIMED_OUT, rq.HANDLER_TIMEOUT, f"killed after {timeout:g} s", result)
        elif out.exit_code == 0:
            self._finish(eid, fmt, rq.SUCCEEDED, result=result)
        else:
            self._finish(eid, fmt, rq.FAILED, rq.HANDLER_FAILED, f"exited with status {out.exit_code}", result)

    # -- records and answers ------------------------------------------------------------------------
    def _finish_without_running(self, t: rq.Topic, content_type: str | None, why: str) -> None:
        """From the MQTT thread (BUSY): recorded and answered by the busy thread, never here."""
        try:
            self.busy.put_nowait((t.execution_id, rq.response_format(t, content_type), why))
        except queue.Full:
            log.debug("commands: execution %s not answered (BUSY backlog full)", t.execution_id)

    def _answer_busy(self) -> None:
        while not self.stop_event.is_set():
            item = self.busy.get()
            if item is None or self.stop_event.is_set():
                return
            eid, fmt, why = item
            if eid in self._records():  # seen and decided before: that answer stands
                continue
            try:
                self._finish(eid, fmt, rq.REJECTED, rq.BUSY, why)
            except Exception:
                log.exception("commands: BUSY answer for %s failed", eid)

    def _finish(
        self,
        eid: str,
        fmt: str,
        status: str,
        code: str | None = None,
        why: str = "",
        result: dict | None = None,
    ) -> None:
        record = {"status": status, "fmt": fmt, "at": int(time.time()), "sent": False}
        if code:
            record.update(reason=code, description=why[: rq.MAX_DESCRIPTION])
        self._record(eid, record)
        if status == rq.SUCCEEDED:
            self.ran += 1
            log.info("commands: execution %s SUCCEEDED", eid)
        else:
            self.refused += status == rq.REJECTED
            self.ran += status != rq.REJECTED
            log.warning("commands: execution %s %s (%s: %s)", eid, status, code, escape(why, 300))
        self._answer(eid, record, result)

    def _answer(self, eid: str, record: dict, result: dict | None = None, force: bool = False) -> None:
        if record.get("sent") and not force:
            return
        doc = rq.response(record["status"], record.get("reason"), record.get("description", ""), result)
        if self._publish(eid, record.get("fmt", "json"), doc) and not record.get("sent"):
            self._record(eid, {**record, "sent": True})

    def _publish(self, eid: str, fmt: str, doc: dict) -> bool:
        session = self.session
        if session is None or not session.conn.connected.is_set():
            return False
        payload = rq.encode(doc, fmt)
        topic = rq.response_topic(session.thing_name, eid, fmt)
        try:
            code = session.conn.publish(topic, payload, qos=1, timeout=PUBLISH_TIMEOUT_S)
        except Exception as e:  # sent again on the next connection (a terminal answer) or never (IN_PROGRESS)
            log.info("commands: answer for %s not sent (%s)", eid, e.__class__.__name__)
            return False
        if code >= 128:
            log.warning("commands: the broker refused the answer for %s (reason %d)", eid, code)
            return False
        return True

    def _records(self) -> dict[str, dict]:
        return dict((self.store.load().get(SECTION) or {}).get("executions") or {})

    def _record(self, eid: str, record: dict) -> None:
        """One atomic state write; the history keeps the newest `history` executions (by a sequence number:
        the state file is written with sorted keys, so its order says nothing)."""
        limit = self.section.history

        def change(data: dict) -> dict:
            section = dict(data.get(SECTION) or {})
            executions = dict(section.get("executions") or {})
            seq = int(section.get("seq") or 0) + 1
            executions[eid] = {**record, "seq": seq}
            if len(executions) > limit:
                oldest = sorted(executions, key=lambda k: int(executions[k].get("seq") or 0))
                for k in oldest[: len(executions) - limit]:
                    if k != eid:
                        del executions[k]
            section["executions"], section["seq"] = executions, seq
            data[SECTION] = section
            return data

        self.store.modify(change)

    def _recover(self) -> None:
        """Executions a stop or a power cut interrupted: answered FAILED (AGENT_RESTARTED), never run again."""
        for eid, record in self._records().items():
            if record.get("status") == "RUNNING":
                log.warning("commands: execution %s (%s) was interrupted by a restart", eid, record.get("action"))
                self._finish(
                    eid,
                    record.get("fmt", "json"),
                    rq.FAILED,
                    rq.INTERRUPTED,
                    "the agent stopped while it ran; it may have run in part and is not run again",
                )

    def _send_unsent(self) -> None:
        for eid, record in self._records().items():
            if record.get("status") in rq.TERMINAL and not record.get("sent"):
                self._answer(eid, record)


def _text(payload: bytes) -> str:
    try:
        doc = json.loads(payload[:4096])
        return json.dumps(doc)[:300] if isinstance(doc, dict) else "?"
    except ValueError:
        return f"{len(payload)} bytes"


FEATURE = FeatureSpec("commands", SECTIONS, enabled=lambda cfg: cfg.commands.enabled, build=CommandsFeature)
