"""The jobs engine: AWS IoT Jobs through awsiotsdk's IotJobsClientV2, one job at a time.

On connect and on every notify-next it starts the next pending execution, dispatches the document
to the handler for its `operation` (afr_ota documents count as "ota-update"), and reports the
result. Every status update goes through a persisted outbox first: if the broker is down or the
agent restarts, the update is delivered later, in order. A repeat after a lost answer is
recognised (TerminalStateReached / VersionMismatch with the execution already in that state), so
from the job's point of view each update happens once. Unknown or invalid documents are REJECTED
with the reason; a handler's exception fails the job, never the agent.

A document the SDK cannot read (the CRT cannot match an answer holding NaN, a lone surrogate escape or
deep nesting to its request; Python's json refuses a 5,000-digit integer or recursion beyond its limit)
must not block the queue: the daemon routes the raw `$aws/things/<thing>/jobs/` publishes here too
(`on_raw_message`), `scan_execution` reads the execution's jobId from the raw start-next answer or
notify-next without building the document, and that job is REJECTED by its id with the reason. A
document the SDK does read but that is not plain JSON for us (NaN, Infinity, a lone surrogate, deeper
than MAX_DEPTH, larger than AWS's 32 KB, an integer beyond 64 bits) is REJECTED the same way.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.base import killpoints
from agent.base.logfmt import escape
from agent.base.memory import release_freed_memory

log = logging.getLogger("agent.jobs")

TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED")
REQUEST_TIMEOUT_S = 20
IDLE_POLL_MIN_S = 2.0
IDLE_POLL_MAX_S = 60.0
RAW_GRACE_S = 2.0  # how long a request the SDK could not read waits for the raw copy of its answer
STREAM_RETRY_MIN_S = 1.0  # a notify-next subscription that failed is opened again after this, doubling
STREAM_RETRY_MAX_S = 300.0
MAX_REFUSED_UPDATES = 3  # an update the cloud refuses as invalid this often is dropped, not resent for ever
PERMANENT_REFUSALS = ("InvalidRequest", "InvalidJson", "InvalidTopic")  # not RequestThrottled, InternalError

MAX_DOCUMENT_BYTES = 32 * 1024  # AWS's limit for a job document
MAX_MESSAGE_BYTES = 128 * 1024  # AWS's limit for an MQTT payload: no more is scanned
MAX_DEPTH = 32  # arrays/objects in a document (ours and afr_ota need 4)
MAX_INT_BITS = 64
JOB_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}\Z")  # AWS's jobId pattern


def valid_job_id(job_id: Any) -> bool:
    return isinstance(job_id, str) and JOB_ID.match(job_id) is not None


@dataclass(frozen=True)
class RawExecution:
    """What `scan_execution` read from a raw start-next answer or notify-next message."""

    job_id: str | None  # execution.jobId, only when it has AWS's form
    client_token: str | None  # the answer's clientToken (which request it answers)
    problem: str | None  # why the message (its job document, mostly) is not plain JSON for us; None if it is


_WS = re.compile(r"[ \t\n\r]*")
# A JSON string: no raw control character, any escape (checked afterwards). Unrolled: linear, no backtracking.
_STR = re.compile(r'"([^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*)"', re.S)
_ESC = re.compile(r"\\(?:u([0-9a-fA-F]{4})|(.))", re.S)
_NUM = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _string_problem(body: str) -> str | None:
    """An invalid escape or an unpaired UTF-16 surrogate escape in a JSON string's body (between quotes)."""
    if "\\" not in body:
        return None
    high_end = -1  # where a high surrogate escape ended, waiting for its low half
    for m in _ESC.finditer(body):
        if m.group(2) is not None:
            if m.group(2) not in '"\\/bfnrt':
                return "an invalid escape in a string"
            if high_end >= 0:
                return "an unpaired surrogate escape in a string"
            continue
        code = int(m.group(1), 16)
        if 0xDC00 <= code <= 0xDFFF:
            if high_end != m.start():
                return "an unpaired surrogate escape in a string"
            high_end = -1
        elif high_end >= 0:
            return "an unpaired surrogate escape in a string"
        elif 0xD800 <= code <= 0xDBFF:
            high_end = m.end()
    return "an unpaired surrogate escape in a string" if high_end >= 0 else None


def _decode_short(body: str) -> str | None:
    """A short JSON string's value (member names, ids); None when too long to matter or not decodable."""
    if len(body) > 256:
        return None
    if "\\" not in body:
        return body
    try:
        return json.loads(f'"{body}"')
    except ValueError:
        return None


def scan_execution(payload: bytes) -> RawExecution:
    """Read execution.jobId (and the top-level clientToken) from a jobs message without building it.

    Tolerant, bounded and iterative: at most MAX_MESSAGE_BYTES are read, in one pass with an explicit
    stack (its depth is bounded by the input's length), so deep nesting, huge numbers, NaN, lone
    surrogate escapes, invalid UTF-8 or a syntax error cost no more than reading the bytes. The first
    problem found is reported; the scan goes on past problems that leave the syntax readable, so a
    jobId after a bad document is still found, and stops at a syntax error. Never raises for bytes;
    anything else is a TypeError.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"scan_execution takes bytes, not {type(payload).__name__}")
    data = bytes(payload[: MAX_MESSAGE_BYTES + 1])
    problem: list[str] = []
    job_id = client_token = None
    stack = bytearray()  # b"{" or b"[" for every open container
    keys: list[str | None] = [None, None, None]  # member names on the path, depths 1 and 2
    doc_start = doc_end = -1  # where execution.jobDocument's value starts and ends

    def in_doc() -> bool:
        return doc_start >= 0 and doc_end < 0

    def note(what: str, at: int, where: bool = True) -> None:
        if not problem:
            where_ = (" in the job document" if in_doc() else " in the message") if where else ""
            problem.append(f"{what}{where_} (offset {at})")

    if len(data) > MAX_MESSAGE_BYTES:
        data = data[:MAX_MESSAGE_BYTES]
        problem.append(f"the message is larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        note("bytes that are not UTF-8", e.start)
        text = data.decode("utf-8", "replace")

    def at_document() -> bool:
        return len(stack) == 2 and stack == b"{{" and keys[1] == "execution" and keys[2] == "jobDocument"

    def document_ended(end: int) -> None:
        nonlocal doc_end
        size = len(text[doc_start:end].encode("utf-8", "replace"))
        if size > MAX_DOCUMENT_BYTES:
            note(f"a job document of {size} bytes (AWS's limit is {MAX_DOCUMENT_BYTES})", doc_start, where=False)
        doc_end = end

    VALUE, VALUE_OR_END, KEY, KEY_OR_END, COLON, AFTER = range(6)
    state, i, n = VALUE, 0, len(text)
    while True:
        ws = _WS.match(text, i)
        assert ws is not None  # "[ \t\n\r]*" matches everywhere, if only the empty string
        i = ws.end()
        if i >= n:
            break
        c = text[i]
        if state in (VALUE, VALUE_OR_END):
            if c == "]" and state == VALUE_OR_END:
                pass  # an empty array: closed below
            else:
                doc_here = at_document()
                if doc_here:
                    doc_start, doc_end = i, -1
                if c in "{[":
                    stack.append(ord(c))
                    if len(stack) <= 2:
                        keys[len(stack)] = None
                    if len(stack) > MAX_DEPTH + 2:
                        note(f"nesting deeper than {MAX_DEPTH} levels", i)
                    state = KEY_OR_END if c == "{" else VALUE_OR_END
                    i += 1
                    continue
                if c == '"':
                    m = _STR.match(text, i)
                    if m is None:
                        note("a string that does not end, or holds a control character,", i)
                        break
                    why = _string_problem(m.group(1))
                    if why:
                        note(why, i)
                    if len(stack) == 1 and stack == b"{" and keys[1] == "clientToken":
                        client_token = _decode_short(m.group(1))
                    elif len(stack) == 2 and stack == b"{{" and keys[1] == "execution" and keys[2] == "jobId":
                        v = _decode_short(m.group(1))
                        job_id = v if valid_job_id(v) else None
                        if job_id is None:
                            note("a jobId that is not AWS's [a-zA-Z0-9_-]{1,64}", i)
                    i = m.end()
                elif c in "-0123456789":
                    m = _NUM.match(text, i)
                    if m is None:
                        if text.startswith("-Infinity", i):
                            note("-Infinity, which is not JSON,", i)
                            i += 9
                        else:
                            note("not JSON", i)
                            break
                    else:
                        lit = m.group(0)
                        if m.group(1) is None and m.group(2) is None:
                            digits = len(lit) - (lit[0] == "-")
                            if digits > 20 or int(lit).bit_length() > MAX_INT_BITS:
                                note(f"an integer of {digits} digits (more than {MAX_INT_BITS} bits)", i)
                        elif not math.isfinite(float(lit)):
                            note("a number beyond a double's range", i)
                        i = m.end()
                elif text.startswith(("true", "null"), i):
                    i += 4
                elif text.startswith("false", i):
                    i += 5
                elif text.startswith("NaN", i):
                    note("NaN, which is not JSON,", i)
                    i += 3
                elif text.startswith("Infinity", i):
                    note("Infinity, which is not JSON,", i)
                    i += 8
                else:
                    note("not JSON", i)
                    break
                if doc_here:
                    document_ended(i)
                state = AFTER
                continue
        elif state in (KEY, KEY_OR_END):
            if c == "}" and state == KEY_OR_END:
                pass  # an empty object: closed below
            elif c == '"':
                m = _STR.match(text, i)
                if m is None:
                    note("a member name that does not end, or holds a control character,", i)
                    break
                why = _string_problem(m.group(1))
                if why:
                    note(why, i)
                if len(stack) <= 2:
                    keys[len(stack)] = _decode_short(m.group(1))
                i, state = m.end(), COLON
                continue
            else:
                note("not JSON (a member name was expected)", i)
                break
        elif state == COLON:
            if c != ":":
                note("not JSON (':' was expected)", i)
                break
            i, state = i + 1, VALUE
            continue
        elif not stack:  # AFTER the top-level value
            note("not JSON (more after the end)", i)
            break
        elif c == ",":
            i, state = i + 1, KEY if stack[-1] == 0x7B else VALUE
            continue
        elif not (c == "}" and stack[-1] == 0x7B or c == "]" and stack[-1] == 0x5B):
            note("not JSON (',' or the container's end was expected)", i)
            break
        # closing the innermost container
        if not stack or (c == "}") != (stack[-1] == 0x7B):
            note("not JSON (a container's end does not match)", i)
            break
        stack.pop()
        i, state = i + 1, AFTER
        if len(stack) == 2 and in_doc() and at_document():
            document_ended(i)
    if (state != AFTER or stack) and not problem:
        note("not JSON (it ends early)", n)
    return RawExecution(job_id, client_token, problem[0] if problem else None)


def document_problem(doc: Any) -> str | None:
    """Why a document the SDK did build is not plain JSON for us, or None: the same rules as
    scan_execution's (depth, NaN/Infinity, lone surrogates, 64-bit integers, AWS's 32 KB). Iterative."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    seen = 0
    while stack:
        v, depth = stack.pop()
        seen += 1
        if seen > MAX_DOCUMENT_BYTES:  # every value takes at least a byte
            return f"more than {MAX_DOCUMENT_BYTES} values (AWS's limit is {MAX_DOCUMENT_BYTES} bytes)"
        if isinstance(v, (dict, list)):
            if depth + 1 > MAX_DEPTH:
                return f"nesting deeper than {MAX_DEPTH} levels"
            if isinstance(v, dict):
                for k, x in v.items():
                    if not isinstance(k, str):
                        return "a member name that is not a string"
                    if _SURROGATE.search(k):
                        return "an unpaired surrogate in a member name"
                    stack.append((x, depth + 1))
            else:
                stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, str):
            if _SURROGATE.search(v):
                return "an unpaired surrogate in a string"
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if abs(v).bit_length() > MAX_INT_BITS:
                return f"an integer of more than {MAX_INT_BITS} bits"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return "NaN or Infinity, which is not JSON"
        else:
            return f"a value of type {type(v).__name__}"
    size = len(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_DOCUMENT_BYTES:
        return f"a job document of {size} bytes (AWS's limit is {MAX_DOCUMENT_BYTES})"
    return None


def _describe(e: BaseException) -> str:
    """An error for a log line or statusDetails: its kind and a bounded, escaped message."""
    from awsiot import V2ServiceException

    if isinstance(e, V2ServiceException):
        if e.modeled_error is not None:
            code = getattr(e.modeled_error, "code", None)
            msg = getattr(e.modeled_error, "message", None)
            return escape(f"{e.message}: {code} {msg or ''}".strip(), 300)
        inner = e.inner_error
        name = getattr(inner, "name", None) or (inner.__class__.__name__ if inner else "no answer")
        return escape(f"{e.message}: {name}", 300)
    return escape(f"{e.__class__.__name__}: {e}", 300)


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
    """statusDetails are strings, at most 10 entries of bounded size (AWS's limits), with control
    characters and unpaired surrogates escaped (they may quote a document; the state file and AWS
    take neither)."""
    out = {}
    for k, v in list(details.items())[:10]:
        key = escape(str(k)[:128])[:128]
        if key:
            out[key] = escape(str(v)[:1024])[:1024]
    return out


@dataclass(eq=False)
class JobsEngine:
    thing: str
    conn: Any  # agent.connection.Connection
    load_state: Callable[[], dict]
    save_state: Callable[[dict], object]  # what it returns (StateStore.update's new state) is unused
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
    # Raw copies of start-next answers and notify-next messages (on_raw_message), scanned by the jobs thread.
    _raw: collections.deque = field(default_factory=lambda: collections.deque(maxlen=8))
    _raw_cv: threading.Condition = field(default_factory=threading.Condition)
    _bad_docs: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # job id -> problem
    _next_bad: tuple[str, str] | None = None  # the job notify-next named last, if its document is bad
    _stream_halted: bool = False
    _stream_retry_at: float = 0.0
    _stream_delay: float = STREAM_RETRY_MIN_S

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
        if self._client is None:
            from awsiot import iotjobs

            self._client = self.conn.service_client(iotjobs.IotJobsClientV2, 4, 2, REQUEST_TIMEOUT_S)
        self._ensure_stream()

    def _ensure_stream(self) -> None:
        """The notify-next stream, opened again (with a bounded backoff) after it failed or halted: the
        queue is polled meanwhile, so a failed subscription delays jobs, never stops them."""
        if self._stream is not None and not self._stream_halted:
            return
        if time.monotonic() < self._stream_retry_at:
            return
        from awsiot import ServiceStreamOptions, iotjobs

        self._stream, self._stream_halted = None, False  # a halted stream is released here, not in its callback
        try:
            stream = self._client.create_next_job_execution_changed_stream(
                iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=self.thing),
                ServiceStreamOptions(
                    incoming_event_listener=lambda ev: self._wake.set(),
                    subscription_status_listener=self._on_stream_status,
                    deserialization_failure_listener=self._on_bad_notification,
                ),
            )
            stream.open()
            self._stream = stream
        except Exception as e:
            self._stream_failed(f"cannot be opened ({_describe(e)})")

    def _stream_failed(self, why: str) -> None:
        delay = self._stream_delay
        self._stream_delay = min(delay * 2, STREAM_RETRY_MAX_S)
        self._stream_retry_at = time.monotonic() + delay
        log.warning(
            "notify-next subscription %s; subscribing again in %.0f s (the queue is polled meanwhile)", why, delay
        )

    def _on_stream_status(self, ev) -> None:
        """A job queued before the notify-next subscription was in place sends no notification: check
        the queue whenever the subscription is (re-)established. Runs on the CRT's thread, which passes
        the event type as a plain int; it must never raise."""
        try:
            kind = int(ev.type)
            error = getattr(ev, "error", None)
            why = f" ({getattr(error, 'name', None) or error.__class__.__name__})" if error is not None else ""
            if kind == 0:  # SUBSCRIPTION_ESTABLISHED
                log.debug("notify-next subscription established")
                self._stream_delay = STREAM_RETRY_MIN_S
            elif kind == 2:  # SUBSCRIPTION_HALTED: the CRT gave up on it (a refused SUBACK, say)
                self._stream_failed(f"halted{why}")
                self._stream_halted = True
            else:  # SUBSCRIPTION_LOST: the CRT subscribes again by itself
                log.info("notify-next subscription lost%s; the queue is checked again when it is back", why)
            self._wake.set()
        except Exception:
            log.exception("notify-next subscription status event not understood")
            self._wake.set()

    def _on_bad_notification(self, failure) -> None:
        log.warning("notify-next message could not be read; checking the queue instead")
        self._wake.set()

    def on_raw_message(self, topic: str, payload: bytes) -> None:
        """Every publish on `$aws/things/<thing>/jobs/` (the daemon's router): the raw start-next answers
        and notify-next messages are kept (a few, bounded) for the jobs thread, which reads the job id
        from one when the SDK cannot model it. Cheap: no parsing on the CRT's thread."""
        prefix = f"$aws/things/{self.thing}/jobs/"
        kind = topic[len(prefix) :] if topic.startswith(prefix) else ""
        if kind not in ("start-next/accepted", "notify-next"):
            return
        with self._raw_cv:
            self._raw.append((kind, bytes(payload[: MAX_MESSAGE_BYTES + 1])))
            self._raw_cv.notify_all()

    def _take_raw(self) -> list[tuple[str, RawExecution]]:
        """Scan the raw copies that arrived since the last call; remember jobs whose document is bad."""
        with self._raw_cv:
            items = list(self._raw)
            self._raw.clear()
        out = []
        for kind, payload in items:
            r = scan_execution(payload)
            out.append((kind, r))
            if r.job_id and r.problem:
                self._bad_docs[r.job_id] = r.problem
                self._bad_docs.move_to_end(r.job_id)
                while len(self._bad_docs) > 16:
                    self._bad_docs.popitem(last=False)
            if kind == "notify-next":
                self._next_bad = (r.job_id, r.problem) if r.job_id and r.problem else None
        return out

    def _await_answer(self, fut, token: str | None, timeout: float) -> RawExecution | None:
        """Wait (at most `timeout`) until the SDK's future is done, or until the raw copy of the answer to
        this request shows a document the SDK cannot model (the CRT may never match such an answer to
        its request: no need to wait for its timeout). Returns that raw copy, if it came."""
        fut.add_done_callback(lambda _f: self._notify_raw())
        deadline = time.monotonic() + timeout
        found = None
        failed = False
        while True:
            for kind, r in self._take_raw():
                # An answer without a readable token is taken too: it names an execution whose answer is bad.
                if kind == "start-next/accepted" and r.client_token in (token, None):
                    found = r
            if found is not None and (found.problem and found.job_id or fut.done()):
                return found
            if fut.done():
                if fut.exception() is None:
                    return found  # read by the SDK: its document is checked by document_problem
                if not failed:  # not read: the raw copy may still be on its way (another callback)
                    failed, deadline = True, min(deadline, time.monotonic() + RAW_GRACE_S)
            left = deadline - time.monotonic()
            if left <= 0:
                return found
            with self._raw_cv:
                if not self._raw:
                    self._raw_cv.wait(min(left, 0.5))

    def _notify_raw(self) -> None:
        with self._raw_cv:
            self._raw_cv.notify_all()

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
                log.warning("jobs: %s; retrying in %.0f s", _describe(e), delay)
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
            if (
                status == "IN_PROGRESS"
                and outbox
                and outbox[-1]["job_id"] == job_id
                and outbox[-1]["status"] == "IN_PROGRESS"
            ):
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
                self._client.update_job_execution(
                    iotjobs.UpdateJobExecutionRequest(
                        thing_name=self.thing,
                        job_id=item["job_id"],
                        status=item["status"],
                        status_details=item["details"],
                    )
                ).result(REQUEST_TIMEOUT_S + 5)
                killpoints.op("cloud:update-job", item["status"])
                log.info("job %s: %s delivered", item["job_id"], item["status"])
            except V2ServiceException as e:
                code = getattr(e.modeled_error, "code", None)
                if code in ("TerminalStateReached", "VersionMismatch", "ResourceNotFound", "InvalidStateTransition"):
                    # Already applied (a lost answer), or the cloud moved on (canceled, timed out): either
                    # way this update must not be sent again.
                    log.info("job %s: %s not applied again (%s)", item["job_id"], item["status"], escape(str(code), 64))
                elif code in PERMANENT_REFUSALS and item.get("refused", 0) + 1 >= MAX_REFUSED_UPDATES:
                    # The cloud read it and keeps refusing it (InvalidRequest, say): sending it again cannot
                    # help, and it must not hold up every later update.
                    log.error(
                        "job %s: %s refused %d times (%s); dropped",
                        item["job_id"],
                        item["status"],
                        MAX_REFUSED_UPDATES,
                        _describe(e),
                    )
                else:
                    if code in PERMANENT_REFUSALS:
                        with self._lock:
                            st = self.load_state()
                            rest = list(st.get("outbox", []))
                            if rest and rest[0] == item:
                                rest[0] = {**item, "refused": item.get("refused", 0) + 1}
                                self.save_state({**st, "outbox": rest})
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
        from awsiot import V2ServiceException, iotjobs

        self._take_raw()  # raw answers to earlier requests are no answer to this one
        req = iotjobs.StartNextPendingJobExecutionRequest(thing_name=self.thing, status_details={"agent": "started"})
        fut = self._client.start_next_pending_job_execution(req)
        token = getattr(req, "client_token", None)  # set by the SDK: the answer's correlation token
        raw = self._await_answer(fut, token, REQUEST_TIMEOUT_S + 5)
        if raw is not None and raw.problem and raw.job_id:
            return self._refuse(raw.job_id, f"the job's message is not plain JSON: {raw.problem}")
        try:
            resp = fut.result(0)
        except V2ServiceException as e:
            if e.modeled_error is not None:
                raise  # the cloud's own refusal: retried with backoff
            # The SDK could not read the answer (or never matched it to the request): the raw copy says
            # which job it was, and that job must not block the queue.
            if raw is not None and raw.job_id:
                return self._refuse(
                    raw.job_id,
                    f"the job's message is not plain JSON: {raw.problem}"
                    if raw.problem
                    else f"the SDK cannot read the job's message ({_describe(e)})",
                )
            if self._next_bad:  # no copy of the answer: notify-next named the next job, and it is bad
                bad_id, bad_problem = self._next_bad
                return self._refuse(bad_id, f"the job's message is not plain JSON: {bad_problem}")
            if raw is not None and raw.problem:
                log.error(
                    "the next job's message is not plain JSON (%s) and holds no jobId of AWS's form: it "
                    "cannot be rejected by its id",
                    raw.problem,
                )
            raise
        ex = resp.execution
        if ex is None:
            log.debug("no pending job")
            return False
        killpoints.op("cloud:start-next-job")
        job_id, doc = ex.job_id, ex.job_document
        if not valid_job_id(job_id):
            raise ValueError(f"the cloud sent a job id that is not AWS's: {escape(repr(job_id), 100)}")
        problem = self._bad_docs.get(job_id)
        if problem:  # the raw copy showed what the SDK read past (a number's form, the size as given)
            return self._refuse(job_id, f"the job's message is not plain JSON: {problem}")
        problem = document_problem(doc)
        if problem:
            return self._refuse(job_id, f"the job document is not plain JSON: {problem}")
        log.info("job %s started (%s)", job_id, escape(operation_of(doc) or "unknown document"))
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
            self.save_state(
                {
                    **st,
                    "current": None,
                    "last": {"job_id": job_id, "status": outcome.status, "details": _clean(outcome.details)},
                }
            )
        log.info("job %s: %s %s", job_id, outcome.status, outcome.details)
        self.flush_outbox()
        return True

    def _refuse(self, job_id: str, reason: str) -> bool:
        """REJECT a job whose document is not plain JSON for us, by its id; the queue moves on."""
        details = _clean({"reason": reason})
        log.warning("job %s: REJECTED, %s", job_id, details["reason"])
        self._next_bad = None
        self._enqueue(job_id, "REJECTED", details)
        with self._lock:
            st = self.load_state()
            self.save_state({**st, "last": {"job_id": job_id, "status": "REJECTED", "details": details}})
        self.flush_outbox()  # if it cannot be delivered now, the loop backs off and delivers it first
        return True

    def dispatch(self, job_id: str, doc: Any) -> Outcome:
        op = operation_of(doc)
        handler = self.handlers.get(op) if op else None
        if op is None or handler is None:
            why = f"unsupported operation {op!r}" if op else "document has no operation (and is not afr_ota)"
            return Outcome("REJECTED", {"reason": why})

        def progress(details: dict[str, str]) -> None:
            self.activity = f"job {job_id}: " + " ".join(
                str(v) for k, v in details.items() if k in ("step", "progress")
            )
            self._enqueue(job_id, "IN_PROGRESS", _clean(details))
            if self.conn.connected.is_set():
                try:
                    self.flush_outbox()
                except Exception as e:  # delivered later
                    log.debug("progress update deferred: %s", _describe(e))

        self.activity = f"job {job_id}: {escape(op)}"
        try:
            return handler(job_id, doc, progress)
        except Exception as e:
            log.exception("job %s: handler for %s failed", job_id, escape(op))
            return Outcome("FAILED", {"reason": f"{e.__class__.__name__}: {str(e)[:200]}"})
        finally:
            self.activity = None
            release_freed_memory()  # an update's download and checks peak once; keep the heap at its floor
