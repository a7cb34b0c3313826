"""AWS IoT Device Management Commands, the cloud side: commands, executions, and the device's responses.

Pure state on the registry's SQLite file, like jobs.py and shadows.py: nothing here touches MQTT. The
operator (the CLI, in another process) creates commands and starts executions; each start queues the
request in `commands_outbox`, which the service drains and publishes. The service hands every device
response to `device_response()` and publishes the reply it returns.

Wire format, as AWS documents it:
- Request to the device: `$aws/commands/things/<thing>/executions/<executionId>/request/<json|cbor>` when the
  command's payload is JSON or CBOR, else `.../request` with the payload type in the MQTT 5 content type. The
  execution timeout travels as the MQTT 5 message expiry interval (seconds); the SDKs hand it to the device as
  the execution's `timeout` (aws-iot-device-sdk-java-v2, iotcommands/IotCommandsV2Client.java).
- Response from the device (UpdateCommandExecution): `.../executions/<executionId>/response/<json|cbor>` with
  `{"status", "statusReason": {"reasonCode", "reasonDescription"}, "result": {name: {"s"|"b"|"bin": ...}}}`;
  reasonCode `[A-Z0-9_-]+` of at most 64 characters, reasonDescription at most 1024 characters and no control
  characters; `result`, when given, has at least one entry, each typed with exactly one of s, b, bin.
- The cloud answers on `.../response/accepted/<fmt>` with `{"executionId"}` or `.../response/rejected/<fmt>`
  with `{"error": <code>, "errorMessage", "executionId"}`, the codes InvalidJson, InvalidRequest,
  InvalidStateTransition, ResourceNotFound, InternalError... (the SDK's V2ErrorResponse and RejectedErrorCode:
  aws-iot-device-sdk-java-v2, sdk/src/main/java/software/amazon/awssdk/iot/iotcommands/model/). A response on
  `.../response` without a format is read as JSON and answered on `.../response/accepted|rejected` (the sample
  device policies list both forms of those topics).
- Status: an execution starts CREATED; the device may report IN_PROGRESS (again and again), then SUCCEEDED,
  FAILED, REJECTED or TIMED_OUT. When the timeout (default 10 s on AWS, at most 12 hours) passes first, the
  cloud sets TIMED_OUT with reasonCode `$NO_RESPONSE_FROM_DEVICE`; that TIMED_OUT is *not* terminal: the device
  may still report SUCCEEDED/FAILED/REJECTED, or TIMED_OUT to replace the reason, and then the execution is
  terminal. `completedAt` is set only when the device reports a terminal status.
- Events: every status change is published on `$aws/events/commandExecution/<commandId>/<status>`.

Sources:
https://docs.aws.amazon.com/iot/latest/developerguide/iot-remote-command.html
https://docs.aws.amazon.com/iot/latest/developerguide/iot-remote-command-concepts.html
https://docs.aws.amazon.com/iot/latest/developerguide/iot-remote-command-workflow.html
https://docs.aws.amazon.com/iot/latest/developerguide/iot-remote-command-execution-start-monitor.html
  ("Time out value and TIMED_OUT execution status", "Considerations when using the UpdateCommandExecution API")
https://docs.aws.amazon.com/iot/latest/developerguide/command-events.html
https://docs.aws.amazon.com/iot/latest/apireference/API_StatusReason.html
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import json
import math
import re
import sqlite3
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .registry import write_transaction

MAX_RESPONSE_BYTES = 128 * 1024  # AWS IoT's MQTT message limit: nothing larger is ever decoded
# A command's payload must fit one MQTT message with its topic; AWS's own per-command limit is not stated here.
MAX_PAYLOAD_BYTES = 128 * 1024 - 1024
MAX_DESCRIPTION = 2028  # CreateCommand's description limit
MAX_TIMEOUT_S = 12 * 3600  # "You can also configure the timeout to a maximum value of 12 hours"
AWS_DEFAULT_TIMEOUT_S = 10
COMMAND_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
THING_RE = re.compile(r"[A-Za-z0-9:_-]{1,128}")
REASON_CODE_RE = re.compile(r"[A-Z0-9_-]{1,64}")
MAX_REASON_DESCRIPTION = 1024
# Not AWS's numbers (undocumented): bounds on what one response may make us store.
MAX_RESULT_ENTRIES = 100
MAX_RESULT_NAME = 128
MAX_DEPTH = 8  # deeper than any valid response (4 levels); refused before it is walked
DEVICE_STATUSES = ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"})
CLOUD_TIMEOUT_REASON = "$NO_RESPONSE_FROM_DEVICE"
SDK_FIELDS = frozenset({"deviceType", "deviceId", "executionId"})  # the SDKs serialize the whole request object
REGION, ACCOUNT = "us-east-1", "123456789012"  # for the ARNs in events: the local cloud has one account

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY, payload BLOB NOT NULL, content_type TEXT NOT NULL,
    description TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS command_executions (
    execution_id TEXT PRIMARY KEY, command_id TEXT NOT NULL, thing TEXT NOT NULL, status TEXT NOT NULL,
    reason_code TEXT, reason_description TEXT, result TEXT,   -- result: JSON {name: {"s"|"b"|"bin": ...}}
    timeout_s INTEGER NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, completed REAL,
    cloud_timed_out INTEGER NOT NULL DEFAULT 0              -- TIMED_OUT set by the cloud: not yet terminal
);
CREATE INDEX IF NOT EXISTS command_executions_thing ON command_executions (thing, created);
CREATE TABLE IF NOT EXISTS commands_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    content_type TEXT, expires REAL                          -- requests: content type and deadline; events: NULL
);
"""


class CommandError(Exception):
    """A rejected device response: `code` is one of AWS's RejectedErrorCode values."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Request:
    """One publication the service makes: a command request (content type, expiry) or an event (neither)."""

    topic: str
    payload: bytes
    content_type: str | None = None
    expiry_s: int | None = None


def payload_format(content_type: str) -> str | None:
    """'json' / 'cbor' for the request topic's format segment, None for any other payload type."""
    media = content_type.split(";", 1)[0].strip().lower()
    return {"application/json": "json", "application/cbor": "cbor"}.get(media)


def request_topic(thing: str, execution_id: str, content_type: str) -> str:
    fmt = payload_format(content_type)
    base = f"$aws/commands/things/{thing}/executions/{execution_id}/request"
    return f"{base}/{fmt}" if fmt else base


def route(topic: str) -> tuple[str, str, str | None] | None:
    """(thing, execution id, 'json'|'cbor'|None) for a device response topic, else None (our own replies,
    requests, anything else under $aws/commands)."""
    p = topic.split("/")
    if len(p) not in (7, 8) or p[:3] != ["$aws", "commands", "things"] or p[4] != "executions" or p[6] != "response":
        return None
    if not p[3] or not p[5]:
        return None
    if len(p) == 7:
        return p[3], p[5], None
    return (p[3], p[5], p[7]) if p[7] in ("json", "cbor") else None


def reply_topic(thing: str, execution_id: str, fmt: str | None, accepted: bool) -> str:
    base = f"$aws/commands/things/{thing}/executions/{execution_id}/response/{'accepted' if accepted else 'rejected'}"
    return f"{base}/{fmt}" if fmt else base


def encode(doc: dict, fmt: str | None) -> bytes:
    if fmt == "cbor":
        import cbor2

        return cbor2.dumps(doc)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def printable(text: str, limit: int = 80) -> str:
    """Device text for a log line: escaped (no newlines or terminal controls) and cut short."""
    out = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return out if len(out) <= limit else out[:limit] + "..."


# -- decoding and validating a device response (every byte is hostile) ------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError("number out of range")
    return v


def _too_deep(payload: bytes, limit: int) -> bool:
    """Whether JSON text nests brackets deeper than `limit` (strings skipped): checked before parsing, so a
    megabyte of '[' costs a scan, not the parser's recursion."""
    depth, in_str, esc = 0, False, False
    for ch in payload:
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:
                esc = True
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return False


def decode(payload: bytes, fmt: str | None) -> Any:
    """The response document; CommandError InvalidJson (AWS's code, for CBOR too) when it cannot be read."""
    what = "CBOR" if fmt == "cbor" else "JSON"
    if fmt == "cbor":
        import cbor2

        try:
            return cbor2.loads(payload)
        except Exception as e:  # CBORDecodeError, RecursionError, MemoryError on absurd declared lengths...
            raise CommandError("InvalidJson", f"payload is not valid {what} ({e.__class__.__name__})") from None
    if _too_deep(payload, MAX_DEPTH):
        raise CommandError("InvalidRequest", f"payload nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CommandError("InvalidJson", f"payload is not valid UTF-8 {what} ({e.__class__.__name__})") from None


def _has_control(text: str) -> bool:
    """AWS's `[^\\p{C}]*`: no control, format, surrogate, private-use or unassigned code points."""
    return any(unicodedata.category(ch).startswith("C") for ch in text)


@dataclass(frozen=True)
class Response:
    status: str
    reason_code: str | None
    reason_description: str | None
    result: dict[str, dict[str, Any]] | None  # stored form: bin as base64 text


def validate(doc: Any, fmt: str | None) -> Response:
    """A complete check of a decoded response; nothing is saved unless all of it is valid."""
    if not isinstance(doc, dict):
        raise CommandError("InvalidRequest", "the response must be an object")
    if not all(isinstance(k, str) for k in doc):
        raise CommandError("InvalidRequest", "the response's keys must be strings")
    extra = sorted(set(doc) - {"status", "statusReason", "result"} - SDK_FIELDS)
    if extra:
        raise CommandError("InvalidRequest", f"unknown field(s): {printable(', '.join(extra))}")
    status = doc.get("status")
    if not isinstance(status, str) or status not in DEVICE_STATUSES:
        raise CommandError("InvalidRequest", f"status must be one of {', '.join(DEVICE_STATUSES)}")
    code = desc = None
    if doc.get("statusReason") is not None:
        sr = doc["statusReason"]
        if not isinstance(sr, dict) or set(sr) - {"reasonCode", "reasonDescription"}:
            raise CommandError("InvalidRequest", "statusReason must be an object of reasonCode and reasonDescription")
        code, desc = sr.get("reasonCode"), sr.get("reasonDescription")
        if not isinstance(code, str) or not REASON_CODE_RE.fullmatch(code):
            raise CommandError("InvalidRequest", "statusReason.reasonCode must be 1-64 characters of [A-Z0-9_-]")
        if desc is not None and (not isinstance(desc, str) or len(desc) > MAX_REASON_DESCRIPTION or _has_control(desc)):
            raise CommandError(
                "InvalidRequest",
                f"statusReason.reasonDescription must be at most {MAX_REASON_DESCRIPTION} characters, "
                "none of them control characters",
            )
    result = None
    if doc.get("result") is not None:
        result = _result(doc["result"], fmt)
    return Response(status, code, desc, result)


def _result(raw: Any, fmt: str | None) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise CommandError("InvalidRequest", "result must be an object of named values")
    if not raw:
        raise CommandError("InvalidRequest", "At least 1 command execution result is required")
    if len(raw) > MAX_RESULT_ENTRIES:
        raise CommandError("InvalidRequest", f"result has more than {MAX_RESULT_ENTRIES} entries")
    out: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_RESULT_NAME or _has_control(name):
            raise CommandError("InvalidRequest", f"result names are 1-{MAX_RESULT_NAME} printable characters")
        if not isinstance(value, dict) or len(value) != 1:
            raise CommandError("InvalidRequest", f"result {printable(name)!r}: exactly one of s, b, bin")
        ((kind, v),) = value.items()
        if kind == "s" and isinstance(v, str):
            out[name] = {"s": v}
        elif kind == "b" and isinstance(v, bool):
            out[name] = {"b": v}
        elif kind == "bin" and isinstance(v, (bytes, bytearray)) and fmt == "cbor":
            out[name] = {"bin": base64.b64encode(bytes(v)).decode()}
        elif kind == "bin" and isinstance(v, str):
            try:
                base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise CommandError("InvalidRequest", f"result {printable(name)!r}: bin is not base64") from None
            out[name] = {"bin": v}
        else:
            raise CommandError(
                "InvalidRequest",
                f'result {printable(name)!r}: the value must be {{"s": string}}, {{"b": boolean}} or {{"bin": base64}}',
            )
    return out


@dataclass(eq=False)
class Commands:
    db: sqlite3.Connection
    lock: threading.RLock
    now: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        with self.lock:
            self.db.executescript(SCHEMA)

    def _write(self) -> contextlib.AbstractContextManager[None]:
        return write_transaction(self.db, self.lock, "commands_write")

    # -- operator side (CLI) -------------------------------------------------------------------
    def create_command(
        self, command_id: str, payload: bytes, content_type: str = "application/json", description: str = ""
    ) -> None:
        """CreateCommand (namespace AWS-IoT, a static payload). A JSON or CBOR payload must parse as one, so a
        typo is caught here rather than by every device."""
        if not isinstance(command_id, str) or not COMMAND_ID_RE.fullmatch(command_id):
            raise ValueError(f"command id {command_id!r}: 1-128 characters of [A-Za-z0-9_-]")
        if not isinstance(payload, (bytes, bytearray)) or not 0 < len(payload) <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"a command payload is 1-{MAX_PAYLOAD_BYTES} bytes")
        if not content_type or len(content_type) > 255 or _has_control(content_type):
            raise ValueError("the content type must be 1-255 printable characters, e.g. application/json")
        if len(description) > MAX_DESCRIPTION:
            raise ValueError(f"the description is at most {MAX_DESCRIPTION} characters")
        fmt = payload_format(content_type)
        if fmt == "json":
            try:
                json.loads(bytes(payload).decode("utf-8"))
            except (ValueError, RecursionError):
                raise ValueError("the payload is not UTF-8 JSON, but the content type is application/json") from None
        elif fmt == "cbor":
            import cbor2

            try:
                cbor2.loads(bytes(payload))
            except Exception:
                raise ValueError("the payload is not CBOR, but the content type is application/cbor") from None
        with self._write():
            try:
                self.db.execute(
                    "INSERT INTO commands VALUES (?,?,?,?,?)",
                    (command_id, bytes(payload), content_type, description, self.now()),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"command {command_id!r} already exists") from None

    def command(self, command_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute(
                "SELECT payload, content_type, description, created FROM commands WHERE command_id = ?", (command_id,)
            ).fetchone()
        if row is None:
            return None
        return {
            "commandId": command_id,
            "payload": bytes(row[0]),
            "contentType": row[1],
            "description": row[2],
            "createdAt": row[3],
        }

    def start_execution(self, command_id: str, thing: str, timeout_s: int = AWS_DEFAULT_TIMEOUT_S) -> dict:
        """StartCommandExecution: a CREATED execution, and its request queued for the service to publish."""
        if not isinstance(thing, str) or not THING_RE.fullmatch(thing):
            raise ValueError(f"thing name {thing!r}: 1-128 characters of [A-Za-z0-9:_-]")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or not 1 <= timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"the timeout is 1-{MAX_TIMEOUT_S} seconds")
        execution_id = str(uuid.uuid4())
        with self._write():
            cmd = self.command(command_id)
            if cmd is None:
                raise ValueError(f"no command {command_id!r}")
            t = self.now()
            self.db.execute(
                "INSERT INTO command_executions (execution_id, command_id, thing, status, timeout_s, created, updated) "
                "VALUES (?,?,?,?,?,?,?)",
                (execution_id, command_id, thing, "CREATED", timeout_s, t, t),
            )
            self.db.execute(
                "INSERT INTO commands_outbox (topic, payload, content_type, expires) VALUES (?,?,?,?)",
                (
                    request_topic(thing, execution_id, cmd["contentType"]),
                    cmd["payload"],
                    cmd["contentType"],
                    t + timeout_s,
                ),
            )
            self._event(execution_id)
        return self._get(execution_id)  # type: ignore[return-value]

    def get(self, execution_id: str) -> dict | None:
        """GetCommandExecution (with its result); a timeout that has passed is applied first."""
        self.expire()
        return self._get(execution_id)

    def list(self, thing: str | None = None, command_id: str | None = None) -> list[dict]:
        """ListCommandExecutions, oldest first, optionally for one thing and/or one command."""
        self.expire()
        with self.lock:
            rows = self.db.execute(
                "SELECT execution_id FROM command_executions WHERE (? IS NULL OR thing = ?) AND "
                "(? IS NULL OR command_id = ?) ORDER BY created, rowid",
                (thing, thing, command_id, command_id),
            ).fetchall()
        return [x for (eid,) in rows if (x := self._get(eid)) is not None]

    # -- timers ------------------------------------------------------------------------------
    def expire(self) -> builtins.list[str]:
        """Executions still CREATED or IN_PROGRESS when their timeout passes become TIMED_OUT
        ($NO_RESPONSE_FROM_DEVICE, not terminal); returns their ids. Called lazily by get/list, and by
        the service's tick so the event goes out on time."""
        with self._write():
            rows = self.db.execute(
                "SELECT execution_id FROM command_executions WHERE status IN ('CREATED','IN_PROGRESS') "
                "AND created + timeout_s <= ?",
                (self.now(),),
            ).fetchall()
            for (eid,) in rows:
                self.db.execute(
                    "UPDATE command_executions SET status = 'TIMED_OUT', reason_code = ?, reason_description = NULL, "
                    "cloud_timed_out = 1, updated = ? WHERE execution_id = ?",
                    (CLOUD_TIMEOUT_REASON, self.now(), eid),
                )
                self._event(eid)
        return [eid for (eid,) in rows]

    # -- the device API (MQTT) ---------------------------------------------------------------
    def device_response(self, thing: str, execution_id: str, fmt: str | None, payload: bytes) -> tuple[bool, dict]:
        """(accepted, reply document) for one response on `.../executions/<id>/response[/<fmt>]`.

        `thing` comes from the topic, which the broker's ACL bound to the publisher's certificate."""
        try:
            if len(payload) > MAX_RESPONSE_BYTES:
                raise CommandError("InvalidRequest", f"payload larger than {MAX_RESPONSE_BYTES} bytes")
            resp = validate(decode(payload, fmt), fmt)
            self.expire()
            with self._write():
                self._apply(thing, execution_id, resp)
            return True, {"executionId": execution_id}
        except CommandError as e:
            return False, {"error": e.code, "errorMessage": e.message, "executionId": execution_id}
        except Exception as e:  # a bug must still be answered, as AWS would, and never kill the service
            import logging

            logging.getLogger("localcloud.commands").exception("command response failed (%s)", e.__class__.__name__)
            return False, {"error": "InternalError", "errorMessage": "internal error", "executionId": execution_id}

    def _apply(self, thing: str, execution_id: str, r: Response) -> None:
        row = self.db.execute(
            "SELECT thing, status, cloud_timed_out FROM command_executions WHERE execution_id = ?", (execution_id,)
        ).fetchone()
        if row is None or row[0] != thing:  # another thing's execution is as unknown as a made-up one
            raise CommandError("ResourceNotFound", f"command execution {printable(execution_id)} not found")
        _, status, cloud_timed_out = row
        if status in TERMINAL and not (status == "TIMED_OUT" and cloud_timed_out):
            raise CommandError("InvalidStateTransition", f"the command execution is already {status}")
        if status == "TIMED_OUT" and r.status == "IN_PROGRESS":
            raise CommandError("InvalidStateTransition", "the command execution timed out: report a terminal status")
        t = self.now()
        self.db.execute(
            "UPDATE command_executions SET status = ?, reason_code = ?, reason_description = ?, "
            "result = COALESCE(?, result), updated = ?, completed = ?, cloud_timed_out = 0 WHERE execution_id = ?",
            (
                r.status,
                r.reason_code,
                r.reason_description,
                json.dumps(r.result, separators=(",", ":"), ensure_ascii=False) if r.result is not None else None,
                t,
                t if r.status in TERMINAL else None,
                execution_id,
            ),
        )
        self._event(execution_id)

    # -- storage ------------------------------------------------------------------------------
    def _get(self, execution_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute(
                "SELECT command_id, thing, status, reason_code, reason_description, result, timeout_s, created, "
                "updated, completed FROM command_executions WHERE execution_id = ?",
                (execution_id,),
            ).fetchone()
        if row is None:
            return None
        out: dict[str, Any] = {
            "executionId": execution_id,
            "commandId": row[0],
            "commandArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:command/{row[0]}",
            "thingName": row[1],
            "targetArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{row[1]}",
            "status": row[2],
            "executionTimeoutSeconds": row[6],
            "createdAt": row[7],
            "lastUpdatedAt": row[8],
        }
        if row[3] is not None:
            out["statusReason"] = {
                "reasonCode": row[3],
                **({"reasonDescription": row[4]} if row[4] is not None else {}),
            }
        if row[5] is not None:
            out["result"] = json.loads(row[5])
        if row[9] is not None:
            out["completedAt"] = row[9]
        return out

    def _event(self, execution_id: str) -> None:
        """The status-change event (command-events.html) queued for the service, in the caller's transaction."""
        ex = self._get(execution_id)
        if ex is None:
            return
        doc = {
            "executionId": execution_id,
            "status": ex["status"],
            **({"statusReason": ex["statusReason"]} if "statusReason" in ex else {}),
            "eventType": "COMMAND_EXECUTION",
            "commandArn": ex["commandArn"],
            "targetArn": ex["targetArn"],
            "timestamp": int(self.now() * 1000),
        }
        self.db.execute(
            "INSERT INTO commands_outbox (topic, payload) VALUES (?, ?)",
            (f"$aws/events/commandExecution/{ex['commandId']}/{ex['status']}", encode(doc, "json")),
        )

    def take_outbox(self) -> builtins.list[Request]:
        """Queued requests and events, oldest first, removed in the same transaction. A request whose
        execution timed out before it could be sent is dropped (its expiry would be 0 or less)."""
        with self._write():
            rows = self.db.execute(
                "SELECT topic, payload, content_type, expires FROM commands_outbox ORDER BY id"
            ).fetchall()
            self.db.execute("DELETE FROM commands_outbox")
        t = self.now()
        out = []
        for topic, payload, content_type, expires in rows:
            if expires is None:
                out.append(Request(topic, bytes(payload)))
            elif expires > t:
                out.append(Request(topic, bytes(payload), content_type, max(1, round(expires - t))))
        return out
