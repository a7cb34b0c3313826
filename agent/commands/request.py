"""Commands requests: the topic and the payload, parsed as the hostile input they are (pure; no I/O).

AWS IoT Device Management Commands sends a request on
`$aws/commands/things/<thing>/executions/<executionId>/request/<json|cbor>`, or on `.../request` with the
payload's type in the MQTT 5 content type; the device answers on `.../response/<json|cbor>` with a status,
an optional statusReason {reasonCode, reasonDescription} and an optional result
(https://docs.aws.amazon.com/iot/latest/developerguide/iot-remote-command-workflow.html, and the
StatusReason API type: reasonCode is at most 64 of [A-Z0-9_-], reasonDescription at most 1024 characters).

The command's payload is ours to define, and we keep it small and strict: a map with `action` (a name the
config lists) and optionally `parameters` (a map, handed to an operator handler as JSON on stdin; built-in
actions take none). Whatever comes in, `parse_request` returns a Request or raises RequestError with a
documented reason code: nothing else escapes (tests/commands/test_request.py checks that with hypothesis).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from agent.base import cbor

PREFIX = "$aws/commands/things/"
EXECUTION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # AWS issues UUIDs; anything else cannot be echoed safely
FORMATS = ("json", "cbor")
CONTENT_TYPES = {"application/json": "json", "application/cbor": "cbor"}
MAX_DEPTH = 8  # levels inside `parameters`

# Status values and the reason codes this agent reports (README, "Commands").
IN_PROGRESS, SUCCEEDED, FAILED, REJECTED, TIMED_OUT = "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"
TERMINAL = (SUCCEEDED, FAILED, REJECTED, TIMED_OUT)
MALFORMED = "MALFORMED_REQUEST"
UNSUPPORTED_FORMAT = "UNSUPPORTED_PAYLOAD_FORMAT"
TOO_LARGE = "REQUEST_TOO_LARGE"
UNKNOWN = "UNKNOWN_COMMAND"
BUSY = "BUSY"
EXPIRED = "REQUEST_EXPIRED"
HANDLER_TIMEOUT = "HANDLER_TIMEOUT"
HANDLER_FAILED = "HANDLER_FAILED"
CANNOT_RUN = "CANNOT_RUN"
INTERRUPTED = "AGENT_RESTARTED"
REASON_CODES = (MALFORMED, UNSUPPORTED_FORMAT, TOO_LARGE, UNKNOWN, BUSY, EXPIRED, HANDLER_TIMEOUT, HANDLER_FAILED)
REASON_CODE_RE = re.compile(r"[A-Z0-9_-]{1,64}")
MAX_DESCRIPTION = 1024


@dataclass(frozen=True)
class Topic:
    """A request topic of this thing: the execution id and the payload format named in it (None: the
    content type says)."""

    execution_id: str
    fmt: str | None


def request_filter(thing: str) -> str:
    return f"{PREFIX}{thing}/executions/+/request/#"  # `#` also matches `.../request` itself


def response_topic(thing: str, execution_id: str, fmt: str) -> str:
    return f"{PREFIX}{thing}/executions/{execution_id}/response/{fmt}"


def parse_topic(topic: str, thing: str) -> Topic | None:
    """The request a topic names, or None when it is not one (another thing's, a response, a bad id).
    A None is dropped without an answer: an id we cannot echo has no topic to answer on."""
    head = f"{PREFIX}{thing}/executions/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) not in (2, 3) or parts[1] != "request" or not EXECUTION_ID_RE.fullmatch(parts[0]):
        return None
    if len(parts) == 2:
        return Topic(parts[0], None)
    if parts[2] not in FORMATS:
        return None
    return Topic(parts[0], parts[2])


class RequestError(Exception):
    """Why a request is refused without running: the status, a reason code of REASON_CODES, a description."""

    def __init__(self, reason_code: str, description: str, status: str = REJECTED) -> None:
        super().__init__(f"{reason_code}: {description}")
        self.status, self.reason_code, self.description = status, reason_code, description[:MAX_DESCRIPTION]


@dataclass(frozen=True)
class Request:
    action: str
    parameters: dict[str, Any] = field(default_factory=dict)


def response_format(topic: Topic, content_type: str | None) -> str:
    """The format to answer in: the request's own (json for a payload type we do not read)."""
    if topic.fmt:
        return topic.fmt
    return CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower(), "json")


def parse_request(
    payload: bytes, topic: Topic, content_type: str | None, *, max_bytes: int, actions: Collection[str]
) -> Request:
    """The request in `payload`, or RequestError. `actions`: the names the config lets run."""
    fmt = topic.fmt
    if fmt is None:
        ct = (content_type or "").split(";")[0].strip().lower()
        fmt = CONTENT_TYPES.get(ct)
        if fmt is None:
            shown = json.dumps((content_type or "")[:64])
            raise RequestError(UNSUPPORTED_FORMAT, f"payload type {shown}: this agent reads JSON and CBOR only")
    if len(payload) > max_bytes:
        raise RequestError(TOO_LARGE, f"{len(payload)} bytes; at most {max_bytes} (commands.max_request_kib)")
    doc = _decode(payload, fmt)
    if not isinstance(doc, dict):
        raise RequestError(MALFORMED, f"the payload must be a {fmt.upper()} map with an 'action'")
    unknown = sorted(str(k)[:32] for k in doc if k not in ("action", "parameters"))
    if unknown:
        raise RequestError(MALFORMED, f"unknown field(s) {', '.join(json.dumps(k) for k in unknown[:5])}")
    action = doc.get("action")
    if not isinstance(action, str) or not action:
        raise RequestError(MALFORMED, "'action' must be a non-empty string")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(MALFORMED, "'parameters' must be a map")
    problem = _plain(params, 0)
    if problem:
        raise RequestError(MALFORMED, f"'parameters': {problem}")
    if action not in actions:
        raise RequestError(UNKNOWN, f"{json.dumps(action[:64])} is not a command this device runs")
    return Request(action, params)


def _decode(payload: bytes, fmt: str) -> Any:
    try:
        if fmt == "json":
            return json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
        return cbor.loads(payload, max_depth=MAX_DEPTH + 2)
    except RecursionError:
        raise RequestError(MALFORMED, f"{fmt.upper()} nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(MALFORMED, f"not valid {fmt.upper()} ({e.__class__.__name__})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _plain(v: Any, depth: int) -> str | None:
    """What keeps `v` from being plain JSON data (string keys; no bytes, NaN or infinities), or None."""
    if depth > MAX_DEPTH:
        return f"nested more than {MAX_DEPTH} levels"
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                return "map keys must be strings"
            p = _plain(x, depth + 1)
            if p:
                return p
        return None
    if isinstance(v, list):
        for x in v:
            p = _plain(x, depth + 1)
            if p:
                return p
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return "numbers must be finite"
    if v is None or isinstance(v, (str, bool, int, float)):
        return None
    return f"a {type(v).__name__} value is not allowed (JSON types only)"


def response(status: str, reason_code: str | None = None, description: str = "", result: dict | None = None) -> dict:
    """The response document; reason codes and descriptions are bounded as AWS requires."""
    doc: dict[str, Any] = {"status": status}
    if reason_code:
        assert REASON_CODE_RE.fullmatch(reason_code), reason_code
        doc["statusReason"] = {"reasonCode": reason_code, "reasonDescription": description[:MAX_DESCRIPTION]}
    if result:
        doc["result"] = result
    return doc


def encode(doc: dict, fmt: str) -> bytes:
    if fmt == "cbor":
        return cbor.dumps(doc)
    return json.dumps(doc, separators=(",", ":")).encode("ascii")  # \u escapes: no lone surrogate can break it
