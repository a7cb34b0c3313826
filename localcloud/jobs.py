"""AWS IoT Jobs, device side: per-thing execution queues with AWS's states, versions and errors.

Pure state handling on the registry's SQLite file. `handle()` takes the thing (from the topic,
which the broker's ACL already bound to the caller's certificate), the operation and the decoded
request, and returns the reply topic suffix and document. Notifications (notify, notify-next)
are computed from the queue and sent by the service.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED"}
DEVICE_STATUSES = {"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"}
MAX_CLIENT_TOKEN = 64
MAX_STATUS_DETAILS = 10
MAX_DETAIL_LEN = 1024
MAX_STEP_TIMEOUT_MIN = 10080
MAX_DOCUMENT_BYTES = 32768  # AWS's limit for a job document

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, document TEXT NOT NULL, step_timeout_min INTEGER, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS executions (
    job_id TEXT NOT NULL, thing TEXT NOT NULL, status TEXT NOT NULL, status_details TEXT NOT NULL,
    queued_at INTEGER NOT NULL, started_at INTEGER, last_updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL, execution_number INTEGER NOT NULL, step_deadline REAL,
    PRIMARY KEY (job_id, thing)
);
CREATE TABLE IF NOT EXISTS job_notify (thing TEXT PRIMARY KEY);
"""


class RawDocument(str):
    """A job document stored as the bytes it was given (AWS keeps documents as given, up to 32 KB), which
    need not be JSON this service could build or re-encode (NaN, a 5,000-digit integer, a lone surrogate
    escape, deep nesting). As a str it shows the text; `encode()` puts `body` into replies byte for byte."""

    body: bytes

    def __new__(cls, body: bytes) -> RawDocument:
        self = super().__new__(cls, body.decode("utf-8", "replace"))
        self.body = bytes(body)
        return self


def encode(doc: dict) -> bytes:
    """A reply or notification as compact JSON, with any raw job document spliced in as given."""
    raws: dict[bytes, bytes] = {}

    def swap(holder: Any, key: str) -> Any:
        v = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(v, RawDocument):
            return holder
        import uuid

        mark = f"raw-document-{uuid.uuid4().hex}"
        raws[json.dumps(mark).encode()] = v.body
        return {**holder, key: mark}

    doc = swap(doc, "jobDocument")  # UpdateJobExecution with includeJobDocument
    if isinstance(doc, dict) and isinstance(doc.get("execution"), dict):
        doc = {**doc, "execution": swap(doc["execution"], "jobDocument")}
    out = json.dumps(doc, separators=(",", ":")).encode()
    for mark, body in raws.items():
        out = out.replace(mark, body, 1)
    return out


class JobError(Exception):
    def __init__(self, code: str, message: str, execution: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.execution = code, message, execution


@dataclass(eq=False)
class Jobs:
    db: sqlite3.Connection
    lock: threading.RLock
    now: Callable[[], float] = time.time
    # Applied to documents as they are delivered (presigned-URL placeholders -> short-lived URLs).
    resolve_document: Callable[[Any], Any] = lambda d: d

    def __post_init__(self) -> None:
        with self.lock:
            self.db.executescript(SCHEMA)

    # -- operator side (CLI) ----------------------------------------------------------------
    def create(self, job_id: str, thing: str, document: dict, step_timeout_min: int | None = None) -> None:
        if not job_id or len(job_id) > 64 or not all(c.isalnum() or c in "-_" for c in job_id):
            raise ValueError(f"job id {job_id!r}: 1-64 characters of [a-zA-Z0-9_-]")
        if step_timeout_min is not None and not 1 <= step_timeout_min <= MAX_STEP_TIMEOUT_MIN:
            raise ValueError(f"step timeout must be 1-{MAX_STEP_TIMEOUT_MIN} minutes")
        t = int(self.now())
        with self.lock:
            try:
                self.db.execute(
                    "INSERT INTO jobs VALUES (?,?,?,?)", (job_id, json.dumps(document), step_timeout_min, self.now())
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"job {job_id!r} already exists") from None
            self.db.execute(
                "INSERT INTO executions VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, thing, "QUEUED", "{}", t, None, t, 1, 1, None),
            )
            self._flag(thing)

    def create_raw(self, job_id: str, thing: str, body: bytes, step_timeout_min: int | None = None) -> None:
        """A job whose document is handed out exactly as these bytes (up to AWS's 32 KB), for devices that
        must cope with documents they cannot parse: stored as a BLOB, never decoded by this service."""
        if not isinstance(body, (bytes, bytearray)) or not 0 < len(body) <= MAX_DOCUMENT_BYTES:
            raise ValueError(f"a raw job document is 1-{MAX_DOCUMENT_BYTES} bytes")
        with self.lock:
            self.db.execute("SAVEPOINT create_raw")
            try:
                self.create(job_id, thing, {}, step_timeout_min)
                self.db.execute("UPDATE jobs SET document = ? WHERE job_id = ?", (bytes(body), job_id))
            except BaseException:
                self.db.execute("ROLLBACK TO create_raw")
                self.db.execute("RELEASE create_raw")
                raise
            self.db.execute("RELEASE create_raw")

    def create_for_things(
        self, job_id: str, things: list[str], document: dict, step_timeout_min: int | None = None
    ) -> None:
        """One job, one execution per thing (AWS's job with several targets), in one transaction."""
        things = list(dict.fromkeys(things))
        if not things:
            raise ValueError("a job needs at least one thing")
        with self.lock:
            self.db.execute("SAVEPOINT create_for_things")
            try:
                self.create(job_id, things[0], document, step_timeout_min)
                t = int(self.now())
                for thing in things[1:]:
                    self.db.execute(
                        "INSERT INTO executions VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (job_id, thing, "QUEUED", "{}", t, None, t, 1, 1, None),
                    )
                    self._flag(thing)
            except BaseException:
                self.db.execute("ROLLBACK TO create_for_things")
                self.db.execute("RELEASE create_for_things")
                raise
            self.db.execute("RELEASE create_for_things")

    def cancel(self, job_id: str) -> int:
        """Cancel the job's non-terminal executions; returns how many."""
        with self.lock:
            rows = self.db.execute("SELECT thing, status FROM executions WHERE job_id = ?", (job_id,)).fetchall()
            if not rows:
                raise ValueError(f"no job {job_id!r}")
            n = 0
            for thing, status in rows:
                if status not in TERMINAL:
                    self._set(job_id, thing, status="CANCELED")
                    n += 1
            return n

    def list(self) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT job_id, thing FROM executions ORDER BY queued_at, job_id").fetchall()
        return [self.execution(j, t) for j, t in rows]

    # -- the device API -----------------------------------------------------------------------
    def handle(self, thing: str, op: str, job_id: str | None, req: Any) -> tuple[str, dict]:
        """(reply suffix 'accepted'|'rejected', document) for one device request."""
        token = req.get("clientToken") if isinstance(req, dict) else None
        base: dict[str, Any] = {"timestamp": int(self.now())}
        if isinstance(token, str) and len(token) <= MAX_CLIENT_TOKEN:
            base["clientToken"] = token
        try:
            if not isinstance(req, dict):  # valid JSON, not an object: AWS's InvalidJson is for unreadable JSON
                raise JobError("InvalidRequest", "request must be a JSON object")
            if token is not None and (not isinstance(token, str) or len(token) > MAX_CLIENT_TOKEN):
                raise JobError(
                    "InvalidRequest", f"clientToken must be a string of at most {MAX_CLIENT_TOKEN} characters"
                )
            with self.lock:
                doc = {
                    "get": self._get,
                    "start-next": self._start_next,
                    "describe": self._describe,
                    "update": self._update,
                }[op](thing, job_id, req)
            return "accepted", {**doc, **base}
        except JobError as e:
            out = {"code": e.code, "message": e.message, **base}
            if e.execution is not None:
                out["executionState"] = e.execution
            return "rejected", out
        except Exception as e:  # a bug here must still answer, as AWS would, and never kill the service
            import logging

            logging.getLogger("localcloud.jobs").exception("jobs %s failed", op)
            return "rejected", {"code": "InternalError", "message": e.__class__.__name__, **base}

    def _fields(self, req: dict, allowed: set[str]) -> None:
        extra = sorted(set(req) - allowed - {"clientToken"})
        if extra:
            raise JobError("InvalidRequest", f"unknown field(s): {', '.join(extra)}")

    def _get(self, thing: str, _job: str | None, req: dict) -> dict:
        self._fields(req, set())
        rows = self._pending(thing)
        return {
            "inProgressJobs": [self._summary(r) for r in rows if r["status"] == "IN_PROGRESS"],
            "queuedJobs": [self._summary(r) for r in rows if r["status"] == "QUEUED"],
        }

    def _start_next(self, thing: str, _job: str | None, req: dict) -> dict:
        self._fields(req, {"statusDetails", "stepTimeoutInMinutes"})
        details = self._details(req.get("statusDetails"))
        timeout = self._timeout(req.get("stepTimeoutInMinutes"))
        rows = self._pending(thing)
        if not rows:
            return {}
        r = next((x for x in rows if x["status"] == "IN_PROGRESS"), rows[0])
        if r["status"] == "QUEUED":
            self._set(r["jobId"], thing, status="IN_PROGRESS", details=details, start=True, step_timeout=timeout)
        return {"execution": self.execution(r["jobId"], thing, with_document=True)}

    def _describe(self, thing: str, job_id: str | None, req: dict) -> dict:
        self._fields(req, {"executionNumber", "includeJobDocument"})
        inc = req.get("includeJobDocument", True)
        if not isinstance(inc, bool):
            raise JobError("InvalidRequest", "includeJobDocument must be a boolean")
        num = req.get("executionNumber")
        if num is not None and (not isinstance(num, int) or isinstance(num, bool)):
            raise JobError("InvalidRequest", "executionNumber must be an integer")
        if job_id == "$next":
            rows = self._pending(thing)
            if not rows:
                return {}
            r = next((x for x in rows if x["status"] == "IN_PROGRESS"), rows[0])
            return {"execution": self.execution(r["jobId"], thing, with_document=inc)}
        ex = self.execution(job_id, thing, with_document=inc)
        if ex is None or (num is not None and num != ex["executionNumber"]):
            raise JobError("ResourceNotFound", f"job execution {job_id} not found for {thing}")
        return {"execution": ex}

    def _update(self, thing: str, job_id: str | None, req: dict) -> dict:
        self._fields(
            req,
            {
                "status",
                "statusDetails",
                "expectedVersion",
                "executionNumber",
                "includeJobExecutionState",
                "includeJobDocument",
                "stepTimeoutInMinutes",
            },
        )
        status = req.get("status")
        if not isinstance(status, str) or status not in DEVICE_STATUSES:
            raise JobError("InvalidRequest", f"status must be one of {', '.join(sorted(DEVICE_STATUSES))}")
        details = self._details(req.get("statusDetails"))
        timeout = self._timeout(req.get("stepTimeoutInMinutes"))
        for k in ("expectedVersion", "executionNumber"):
            v = req.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise JobError("InvalidRequest", f"{k} must be an integer")
        for k in ("includeJobExecutionState", "includeJobDocument"):
            if k in req and not isinstance(req[k], bool):
                raise JobError("InvalidRequest", f"{k} must be a boolean")
        ex = self.execution(job_id, thing)
        if ex is None:
            raise JobError("ResourceNotFound", f"job execution {job_id} not found for {thing}")
        state = {"status": ex["status"], "statusDetails": ex["statusDetails"], "versionNumber": ex["versionNumber"]}
        # Error codes and when executionState comes with them (InvalidStateTransition, VersionMismatch only):
        # https://docs.aws.amazon.com/iot/latest/developerguide/jobs-api.html ("Jobs device MQTT API", errors)
        if req.get("executionNumber") is not None and req["executionNumber"] != ex["executionNumber"]:
            raise JobError("ResourceNotFound", f"job execution {job_id} number {req['executionNumber']} not found")
        if req.get("expectedVersion") is not None and req["expectedVersion"] != ex["versionNumber"]:
            raise JobError(
                "VersionMismatch", f"expected version {req['expectedVersion']}, current {ex['versionNumber']}", state
            )
        if ex["status"] in TERMINAL:  # an update the current state does not allow
            raise JobError("InvalidStateTransition", f"job execution is already {ex['status']}", state)
        self._set(
            job_id,
            thing,
            status=status,
            details=details if details is not None else None,
            start=ex["status"] == "QUEUED",
            step_timeout=timeout,
        )
        after = self.execution(job_id, thing, with_document=True)
        out: dict[str, Any] = {}
        if req.get("includeJobExecutionState"):
            out["executionState"] = {
                "status": after["status"],
                "statusDetails": after["statusDetails"],
                "versionNumber": after["versionNumber"],
            }
        if req.get("includeJobDocument"):
            out["jobDocument"] = after["jobDocument"]
        return out

    # -- validation helpers ---------------------------------------------------------------------
    def _details(self, d: Any) -> dict[str, str] | None:
        if d is None:
            return None
        if (
            not isinstance(d, dict)
            or len(d) > MAX_STATUS_DETAILS
            or not all(
                isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 128 and len(v) <= MAX_DETAIL_LEN
                for k, v in d.items()
            )
        ):
            raise JobError("InvalidRequest", f"statusDetails must map up to {MAX_STATUS_DETAILS} names to strings")
        return d

    def _timeout(self, v: Any) -> int | None:
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_STEP_TIMEOUT_MIN:
            raise JobError("InvalidRequest", f"stepTimeoutInMinutes must be 1-{MAX_STEP_TIMEOUT_MIN}")
        return v

    # -- storage --------------------------------------------------------------------------------
    def _pending(self, thing: str) -> list[dict]:
        rows = self.db.execute(
            "SELECT job_id FROM executions WHERE thing = ? AND status IN ('QUEUED','IN_PROGRESS') "
            "ORDER BY queued_at, rowid",
            (thing,),
        ).fetchall()
        return [self.execution(j, thing) for (j,) in rows]

    def execution(self, job_id: str | None, thing: str, with_document: bool = True) -> dict | None:
        with self.lock:
            row = self.db.execute(
                "SELECT e.status, e.status_details, e.queued_at, e.started_at, e.last_updated_at, e.version, "
                "e.execution_number, j.document FROM executions e JOIN jobs j USING (job_id) "
                "WHERE e.job_id = ? AND e.thing = ?",
                (job_id, thing),
            ).fetchone()
        if row is None:
            return None
        out = {
            "jobId": job_id,
            "thingName": thing,
            "status": row[0],
            "statusDetails": json.loads(row[1]),
            "queuedAt": row[2],
            "lastUpdatedAt": row[4],
            "versionNumber": row[5],
            "executionNumber": row[6],
        }
        if row[3] is not None:
            out["startedAt"] = row[3]
        if with_document:
            raw = row[7]  # bytes: a raw document (create_raw), else the JSON text create() stored
            out["jobDocument"] = RawDocument(raw) if isinstance(raw, bytes) else self.resolve_document(json.loads(raw))
        return out

    def _summary(self, ex: dict) -> dict:
        keys = ("jobId", "queuedAt", "startedAt", "lastUpdatedAt", "versionNumber", "executionNumber")
        return {k: ex[k] for k in keys if k in ex}

    def _set(
        self,
        job_id: str,
        thing: str,
        status: str,
        details: dict | None = None,
        start: bool = False,
        step_timeout: int | None = None,
    ) -> None:
        t = self.now()
        cur = self.db.execute(
            "SELECT status_details, started_at, step_deadline FROM executions WHERE job_id = ? AND thing = ?",
            (job_id, thing),
        ).fetchone()
        merged = {**json.loads(cur[0]), **(details or {})}
        started = int(t) if start and cur[1] is None else cur[1]
        deadline = cur[2]
        if status == "IN_PROGRESS":
            if step_timeout is None and start:
                row = self.db.execute("SELECT step_timeout_min FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                step_timeout = row[0] if row else None
            if step_timeout is not None:
                deadline = t + step_timeout * 60  # a new IN_PROGRESS with a timeout resets the timer
        else:
            deadline = None
        self.db.execute(
            "UPDATE executions SET status = ?, status_details = ?, started_at = ?, last_updated_at = ?, "
            "version = version + 1, step_deadline = ? WHERE job_id = ? AND thing = ?",
            (status, json.dumps(merged), started, int(t), deadline, job_id, thing),
        )
        self._flag(thing)

    def _flag(self, thing: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO job_notify VALUES (?)", (thing,))

    # -- timers and notifications (service loop) ------------------------------------------------
    def expire_steps(self) -> list[tuple[str, str]]:
        """Executions whose step timer ran out become TIMED_OUT; returns them."""
        with self.lock:
            rows = self.db.execute(
                "SELECT job_id, thing FROM executions WHERE status = 'IN_PROGRESS' AND "
                "step_deadline IS NOT NULL AND step_deadline <= ?",
                (self.now(),),
            ).fetchall()
            for job_id, thing in rows:
                self._set(job_id, thing, status="TIMED_OUT")
        return rows

    def take_notifications(self) -> list[tuple[str, dict, dict]]:
        """(thing, notify document, notify-next document) for every thing whose queue changed."""
        with self.lock:
            # Read and clear the flags in one transaction: another process (the CLI, a test) may flag a
            # thing between a separate SELECT and DELETE, and that notification would be lost.
            self.db.execute("BEGIN IMMEDIATE")
            try:
                things = [t for (t,) in self.db.execute("SELECT thing FROM job_notify")]
                self.db.execute("DELETE FROM job_notify")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            out = []
            for thing in things:
                rows = self._pending(thing)
                ts = int(self.now())
                jobs: dict[str, list] = {}
                for r in rows:
                    jobs.setdefault(r["status"], []).append(self._summary(r))
                nxt = next((x for x in rows if x["status"] == "IN_PROGRESS"), rows[0] if rows else None)
                nn = {"timestamp": ts}
                if nxt:
                    nn["execution"] = nxt
                out.append((thing, {"timestamp": ts, "jobs": jobs}, nn))
        return out


def route(topic: str) -> tuple[str, str, str | None] | None:
    """(thing, operation, job id) for a device jobs request topic, else None."""
    p = topic.split("/")
    if len(p) < 5 or p[0] != "$aws" or p[1] != "things" or p[3] != "jobs":
        return None
    thing = p[2]
    if len(p) == 5 and p[4] == "get":
        return thing, "get", None
    if len(p) == 5 and p[4] == "start-next":
        return thing, "start-next", None
    if len(p) == 6 and p[5] == "get":
        return thing, "describe", p[4]
    if len(p) == 6 and p[5] == "update" and p[4] != "$next":
        return thing, "update", p[4]
    return None
