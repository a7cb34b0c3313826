"""AWS IoT Device Shadows (named, and the unnamed classic one), device side, plus a fleet query.

Pure state handling on the registry's SQLite file, like jobs.py: `request()` takes the thing (from
the topic, which the broker's ACL already bound to the caller's certificate), the shadow name
("" for the classic shadow), the operation and the raw payload, and returns the messages to
publish, in order: the reply (`.../accepted` or `.../rejected`), then for an accepted update
`.../update/delta` (when the update's desired state differs from reported) and
`.../update/documents`. The service publishes them; nothing here touches MQTT.

AWS semantics kept: `state.desired` / `state.reported` merge field by field (null deletes a key,
`"desired": null` clears the section), `version` +1 per accepted update and a 409 "Version
conflict" when the request's `version` is not the current one, per-field `metadata` timestamps,
`clientToken` echoed, `timestamp` (epoch seconds) on every document, 8 KB of desired + reported
state (metadata does not count), at most 6 levels of nesting, AWS's error codes and messages.
A deleted shadow keeps its version for 48 hours: recreated within that time it continues from it.

Operator-side updates (the CLI, standing in for UpdateThingShadow over HTTPS) are applied in the
CLI's process and their publications queued in `shadow_outbox`; the service drains it.

`things_matching()` is the fleet query that stands in for fleet indexing / dynamic thing groups:
which things have a shadow whose value at a path compares to a value (dotted versions compare
as versions).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .registry import write_transaction

MAX_REQUEST_BYTES = 64 * 1024  # never parsed beyond this (AWS's own MQTT limit is 128 KB)
MAX_STATE_BYTES = 8 * 1024  # desired + reported, compact JSON, metadata excluded
MAX_DEPTH = 6  # levels inside `desired` / `reported`
MAX_CLIENT_TOKEN_BYTES = 64
DELETED_VERSION_KEPT_S = 48 * 3600
NAME_RE = re.compile(r"[A-Za-z0-9:_-]{1,64}")
# Reserved names AWS itself uses; a `$` is otherwise not allowed in a shadow name. `$package` is the Software
# Package Catalog's: `{"state": {"reported": {"<package>": {"version": "1.0.0", "attributes": {...}}}}}`, which
# jobs update (VersionUpdateByJobsConfig) and fleet indexing queries. https://docs.aws.amazon.com/iot/latest/
# developerguide/preparing-to-use-software-package-catalog.html ("Reserved named shadow"),
# https://docs.aws.amazon.com/iot/latest/developerguide/preparing-fleet-indexing.html
PACKAGE_SHADOW = "$package"
RESERVED_NAMES = frozenset({PACKAGE_SHADOW})
NAME_RULE = "Invalid shadow name: 1-64 characters of a-z A-Z 0-9 : _ -, or $package"
OPERATIONS = ("get", "update", "delete")
QUERY_OPS = ("<", "<=", ">", ">=", "==", "!=", "exists")

SCHEMA = """
CREATE TABLE IF NOT EXISTS shadows (
    thing TEXT NOT NULL, name TEXT NOT NULL,     -- name '' is the classic (unnamed) shadow
    state TEXT NOT NULL, metadata TEXT NOT NULL,  -- {"desired": ..., "reported": ...} and their timestamps
    version INTEGER NOT NULL, updated INTEGER NOT NULL, deleted_at INTEGER,
    PRIMARY KEY (thing, name)
);
CREATE TABLE IF NOT EXISTS shadow_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                                          payload TEXT NOT NULL);
"""


# Rejections: `{"code": <HTTP status>, "message", "timestamp", "clientToken"}` with AWS's messages, word for
# word: "Device Shadow error messages", https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-error-messages.html
# (400 Invalid JSON / Missing required node: state / State node must be an object / Desired node must be an
# object / Reported node must be an object / Invalid version / Invalid clientToken / JSON contains too many
# levels of nesting; maximum is 6 / State contains an invalid node; 404 No shadow exists with name: ...;
# 409 Version conflict; 413 The payload exceeds the maximum size allowed; 415 Unsupported documented
# encoding; supported encoding is UTF-8; 500 Internal service failure), and the error document of
# https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-document.html. Not from that table:
# the 400 for an invalid shadow name (the name rule is AWS's, the message ours). Not produced here: 401/403
# (the broker's ACL refuses instead, as AWS's policy check does), 404 Thing not found (the ACL admits only
# registered things), 429 (one request at a time).
class ShadowError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def valid_name(name: str) -> bool:
    """A named shadow's name as AWS allows it: the name rule, or one of AWS's reserved names."""
    return name in RESERVED_NAMES or NAME_RE.fullmatch(name) is not None


def check_package_state(reported: Any) -> None:
    """`$package`'s reported state maps package names to {"version": text, "attributes": {...}} (other keys,
    such as a device's own timestamps, are kept): anything else would break the catalog's fleet queries, so it
    is refused with a 400 that names the entry."""
    if reported is None:
        return
    for name, entry in reported.items():
        pkg = name if len(name) <= 64 else name[:64] + "..."  # device text, echoed to that device only
        if not isinstance(entry, dict) or not isinstance(entry.get("version"), str) or not entry["version"]:
            raise ShadowError(400, f"Invalid $package shadow: reported.{pkg} must be an object with a string version")
        if "attributes" in entry and not isinstance(entry["attributes"], dict):
            raise ShadowError(400, f"Invalid $package shadow: reported.{pkg}.attributes must be an object")


def prefix(thing: str, name: str) -> str:
    return f"$aws/things/{thing}/shadow" + (f"/name/{name}" if name else "")


def route(topic: str) -> tuple[str, str, str] | None:
    """(thing, shadow name or '' for the classic shadow, operation) for a shadow request topic, else None."""
    p = topic.split("/")
    if len(p) < 5 or p[0] != "$aws" or p[1] != "things" or p[3] != "shadow" or not p[2]:
        return None
    if len(p) == 5 and p[4] in OPERATIONS:
        return p[2], "", p[4]
    if len(p) == 7 and p[4] == "name" and p[5] and p[6] in OPERATIONS:
        return p[2], p[5], p[6]
    return None


# -- JSON helpers -----------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError("number out of range")
    return v


def loads(payload: bytes) -> Any:
    """Strict JSON: UTF-8 (else 415), no NaN/Infinity, no overflowing floats, bounded nesting (else 400)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ShadowError(415, "Unsupported documented encoding; supported encoding is UTF-8") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        dumps(doc).encode()  # "\ud800" escapes parse, but are not text that can be stored or sent back
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise ShadowError(400, "Invalid JSON") from None
    return doc


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _depth(v: Any) -> int:
    """Levels of nesting of a value: a scalar is 0, {"a": 1} is 1, {"a": {"b": 1}} is 2 (iterative)."""
    best, stack = 0, [(v, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            stack.extend((c, d + 1) for c in x.values())
            best = max(best, d + 1)
        elif isinstance(x, list):
            stack.extend((c, d + 1) for c in x)
            best = max(best, d + 1)
    return best


def _stamp(v: Any, ts: int) -> Any:
    """Metadata for a value: objects mirrored, arrays element by element, every leaf {"timestamp": ts}."""
    if isinstance(v, dict):
        return {k: _stamp(c, ts) for k, c in v.items()}
    if isinstance(v, list):
        return [_stamp(c, ts) for c in v]
    return {"timestamp": ts}


def _without_nulls(v: Any) -> Any:
    if isinstance(v, dict):
        out = {k: _without_nulls(c) for k, c in v.items() if c is not None}
        return {k: c for k, c in out.items() if c != {}}
    return v


def _merge(state: dict, meta: dict, patch: dict, ts: int) -> None:
    """Apply one section of an update in place: null deletes, objects merge, anything else replaces."""
    for k, v in patch.items():
        if v is None:
            state.pop(k, None)
            meta.pop(k, None)
        elif isinstance(v, dict) and isinstance(state.get(k), dict):
            sub_meta = meta.get(k) if isinstance(meta.get(k), dict) else {}
            _merge(state[k], sub_meta, v, ts)
            if state[k]:
                meta[k] = sub_meta
            else:  # every field of it was deleted: the object goes too
                del state[k]
                meta.pop(k, None)
        else:
            v = _without_nulls(v)
            if v == {}:
                state.pop(k, None)
                meta.pop(k, None)
            else:
                state[k] = v
                meta[k] = _stamp(v, ts)


def delta(desired: Any, reported: Any) -> dict:
    """Fields of desired that reported lacks or holds differently; objects recurse, arrays are values."""
    if not isinstance(desired, dict):
        return {}
    reported = reported if isinstance(reported, dict) else {}
    out = {}
    for k, dv in desired.items():
        if k not in reported:
            out[k] = dv
        elif isinstance(dv, dict) and isinstance(reported[k], dict):
            sub = delta(dv, reported[k])
            if sub:
                out[k] = sub
        elif not _same(dv, reported[k]):
            out[k] = dv
    return out


def _restrict(d: dict, keys: dict) -> dict:
    """The part of delta `d` under the fields an update named."""
    out = {}
    for k, v in keys.items():
        if k in d:
            out[k] = _restrict(d[k], v) if isinstance(v, dict) and isinstance(d[k], dict) else d[k]
            if out[k] == {}:
                del out[k]
    return out


def _meta_for(shape: Any, meta: Any) -> Any:
    """Metadata shaped like `shape` (a delta), taken from the desired section's metadata."""
    if isinstance(shape, dict) and isinstance(meta, dict):
        return {k: _meta_for(v, meta.get(k)) for k, v in shape.items()}
    return meta if meta is not None else {}


# -- version-aware comparison for the fleet query ---------------------------------------------
VERSION_RE = re.compile(r"v?(\d+(?:\.\d+)*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?")


def _version_key(s: str) -> tuple | None:
    m = VERSION_RE.fullmatch(s)
    if not m:
        return None
    nums = [int(x) for x in m.group(1).split(".")]
    while len(nums) > 1 and nums[-1] == 0:  # 1.2 == 1.2.0
        nums.pop()
    pre = m.group(2)
    if pre is None:
        return tuple(nums), (1,)  # a release sorts after its pre-releases
    ids = tuple((0, int(i), "") if i.isdigit() else (1, 0, i) for i in pre.split("."))
    return tuple(nums), (0, ids)


def _as_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return repr(v)
    return None


def compare(actual: Any, op: str, value: Any) -> bool:
    """`actual OP value`: numbers numerically, dotted versions as versions (1.10 > 1.9, 1.2 == 1.2.0,
    1.2.0-rc1 < 1.2.0), other strings lexically; == and != also compare any JSON value; anything
    else does not match."""
    num = (int, float)
    if (
        isinstance(actual, num)
        and isinstance(value, num)
        and not isinstance(actual, bool)
        and not isinstance(value, bool)
    ):
        a, b = actual, value
    else:
        ta, tb = _as_text(actual), _as_text(value)
        ka, kb = (_version_key(ta) if ta is not None else None), (_version_key(tb) if tb is not None else None)
        if ka is not None and kb is not None:
            a, b = ka, kb
        elif isinstance(actual, str) and isinstance(value, str):
            a, b = actual, value
        elif op in ("==", "!="):
            return _same(actual, value) == (op == "==")
        else:
            return False
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]


def parse_where(expr: str) -> tuple[str, str, Any]:
    """'reported.a.b<1.2.0' -> (path, op, value); 'reported.a.b exists' -> (path, 'exists', None).

    The value is JSON when it parses as JSON (3, true, "x"), else the text as a string (1.2.0)."""
    expr = expr.strip()
    if expr.endswith(" exists"):
        return expr[: -len(" exists")].strip(), "exists", None
    m = re.fullmatch(r"\s*([^<>=!\s]+)\s*(<=|>=|==|!=|<|>|=)\s*(.*?)\s*", expr)
    if not m or not m.group(3):
        raise ValueError(
            f"cannot read the condition {expr!r}: expected PATH OP VALUE (OP one of < <= > >= == !=) or 'PATH exists'"
        )
    path, op, text = m.group(1), m.group(2), m.group(3)
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return path, "==" if op == "=" else op, value


@dataclass(eq=False)
class Shadows:
    db: sqlite3.Connection
    lock: threading.RLock
    now: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        with self.lock:
            self.db.executescript(SCHEMA)

    # -- the device API (MQTT) --------------------------------------------------------------------
    def request(self, thing: str, name: str, op: str, payload: bytes) -> list[tuple[str, dict]]:
        """Messages to publish, reply first, for one request on `prefix(thing, name)/op`."""
        base = f"{prefix(thing, name)}/{op}"
        ts = int(self.now())
        token = None
        try:
            if name and not valid_name(name):
                raise ShadowError(400, NAME_RULE)
            if len(payload) > MAX_REQUEST_BYTES:
                raise ShadowError(413, "The payload exceeds the maximum size allowed")
            req = loads(payload) if payload.strip() or op == "update" else {}
            if not isinstance(req, dict):
                raise ShadowError(400, "Invalid JSON")
            raw = req.get("clientToken")
            if raw is not None:
                if not isinstance(raw, str) or len(raw.encode()) > MAX_CLIENT_TOKEN_BYTES:
                    raise ShadowError(400, "Invalid clientToken")
                token = raw
            with self.lock:
                if op == "get":
                    out = [(f"{base}/accepted", self.get(thing, name))]
                elif op == "delete":
                    out = [(f"{base}/accepted", self.delete(thing, name))]
                else:
                    out = self.update(thing, name, req)
        except ShadowError as e:
            doc: dict[str, Any] = {"code": e.code, "message": e.message, "timestamp": ts}
            if token is not None:
                doc["clientToken"] = token
            return [(f"{base}/rejected", doc)]
        except Exception as e:  # a bug must still be answered, as AWS would, and never kill the service
            import logging

            logging.getLogger("localcloud.shadows").exception("shadow %s failed (%s)", op, e.__class__.__name__)
            doc = {"code": 500, "message": "Internal service failure", "timestamp": ts}
            if token is not None:
                doc["clientToken"] = token
            return [(f"{base}/rejected", doc)]
        if token is not None:
            for topic, doc in out:
                if not topic.endswith("/update/documents"):  # AWS's documents event carries no token
                    doc["clientToken"] = token
        return out

    # -- operations ----------------------------------------------------------------------------------
    def _write(self) -> contextlib.AbstractContextManager[None]:
        return write_transaction(self.db, self.lock, "shadow_write")

    def _row(self, thing: str, name: str) -> tuple | None:
        return self.db.execute(
            "SELECT state, metadata, version, updated, deleted_at FROM shadows WHERE thing = ? AND name = ?",
            (thing, name),
        ).fetchone()

    def get(self, thing: str, name: str = "") -> dict:
        """The shadow document as GetThingShadow returns it (state with delta, metadata, version, timestamp)."""
        with self.lock:
            row = self._row(thing, name)
        if row is None or row[4] is not None:
            raise ShadowError(404, f"No shadow exists with name: '{name or thing}'")
        state, meta = json.loads(row[0]), json.loads(row[1])
        d = delta(state.get("desired"), state.get("reported"))
        if d:
            state["delta"] = d
        return {"state": state, "metadata": meta, "version": row[2], "timestamp": int(self.now())}

    def delete(self, thing: str, name: str = "") -> dict:
        with self._write():
            row = self._row(thing, name)
            if row is None or row[4] is not None:
                raise ShadowError(404, f"No shadow exists with name: '{name or thing}'")
            ts = int(self.now())
            self.db.execute(
                "UPDATE shadows SET state = '{}', metadata = '{}', deleted_at = ? WHERE thing = ? AND name = ?",
                (ts, thing, name),
            )
        return {"version": row[2], "timestamp": ts}

    def update(self, thing: str, name: str, req: dict) -> list[tuple[str, dict]]:
        """Validate and apply an update request; returns accepted, then delta (if any) and documents."""
        if "version" in req and (not isinstance(req["version"], int) or isinstance(req["version"], bool)):
            raise ShadowError(400, "Invalid version")
        if "state" not in req:
            raise ShadowError(400, "Missing required node: state")
        patch = req["state"]
        if not isinstance(patch, dict):
            raise ShadowError(400, "State node must be an object")
        if set(patch) - {"desired", "reported"}:
            raise ShadowError(400, "State contains an invalid node")
        for section in ("desired", "reported"):
            if section in patch and patch[section] is not None and not isinstance(patch[section], dict):
                raise ShadowError(400, f"{section.capitalize()} node must be an object")
            if _depth(patch.get(section)) > MAX_DEPTH:
                raise ShadowError(400, f"JSON contains too many levels of nesting; maximum is {MAX_DEPTH}")
        with self._write():
            ts = int(self.now())
            row = self._row(thing, name)
            exists = row is not None and row[4] is None
            current = 0 if row is None or row[4] is not None and ts - row[4] > DELETED_VERSION_KEPT_S else row[2]
            if "version" in req and req["version"] != current:
                raise ShadowError(409, "Version conflict")
            state = json.loads(row[0]) if exists else {}
            meta = json.loads(row[1]) if exists else {}
            previous = (
                {"state": json.loads(row[0]), "metadata": json.loads(row[1]), "version": current} if exists else None
            )
            for section in ("desired", "reported"):
                if section not in patch:
                    continue
                if patch[section] is None:
                    state.pop(section, None)
                    meta.pop(section, None)
                    continue
                s, m = state.setdefault(section, {}), meta.setdefault(section, {})
                _merge(s, m, patch[section], ts)
                if not s:
                    state.pop(section)
                    meta.pop(section)
            if name == PACKAGE_SHADOW:
                check_package_state(state.get("reported"))
            if len(dumps(state).encode()) > MAX_STATE_BYTES:
                raise ShadowError(413, "The payload exceeds the maximum size allowed")
            version = current + 1
            self.db.execute(
                "INSERT INTO shadows VALUES (?,?,?,?,?,?,NULL) ON CONFLICT(thing, name) DO UPDATE SET "
                "state = excluded.state, metadata = excluded.metadata, version = excluded.version, "
                "updated = excluded.updated, deleted_at = NULL",
                (thing, name, dumps(state), dumps(meta), version, ts),
            )
        base = prefix(thing, name)
        accepted = {
            "state": patch,
            "metadata": {s: (_stamp(v, ts) if v is not None else {"timestamp": ts}) for s, v in patch.items()},
            "version": version,
            "timestamp": ts,
        }
        out = [(f"{base}/update/accepted", accepted)]
        if isinstance(patch.get("desired"), dict):
            d = _restrict(delta(state.get("desired"), state.get("reported")), patch["desired"])
            if d:
                out.append(
                    (
                        f"{base}/update/delta",
                        {
                            "state": d,
                            "metadata": _meta_for(d, meta.get("desired")),
                            "version": version,
                            "timestamp": ts,
                        },
                    )
                )
        documents: dict[str, Any] = {"current": {"state": state, "metadata": meta, "version": version}, "timestamp": ts}
        if previous is not None:
            documents["previous"] = previous
        out.append((f"{base}/update/documents", documents))
        return out

    # -- operator side (CLI) ------------------------------------------------------------------------
    def operator_update(self, thing: str, name: str, req: dict) -> dict:
        """UpdateThingShadow from outside MQTT: applied here, its publications queued for the service.

        Raises ShadowError; returns the accepted document."""
        if name and not valid_name(name):
            raise ShadowError(400, NAME_RULE)
        with self._write():
            out = self.update(thing, name, req)
            self.db.executemany(
                "INSERT INTO shadow_outbox (topic, payload) VALUES (?, ?)", [(t, dumps(d)) for t, d in out]
            )
        return out[0][1]

    def take_outbox(self) -> list[tuple[str, bytes]]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                rows = self.db.execute("SELECT topic, payload FROM shadow_outbox ORDER BY id").fetchall()
                self.db.execute("DELETE FROM shadow_outbox")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return [(t, p.encode()) for t, p in rows]

    # -- fleet query ---------------------------------------------------------------------------------
    def things_matching(self, shadow_name: str, path: str, op: str, value: Any = None) -> list[str]:
        """Things whose shadow `shadow_name` ("" = classic) holds a value at `path` that satisfies
        `<that value> OP value` — e.g. ("inventory", "reported.targets.app.current", "<", "1.2.0").

        `path` starts with reported, desired or delta; dots separate object keys (a number indexes an
        array). A thing without the shadow or without a value at the path never matches, whatever
        the operator (so `!=` selects things that report something else, not things that report
        nothing). Sorted by thing name."""
        if op not in QUERY_OPS:
            raise ValueError(f"operator must be one of {' '.join(QUERY_OPS)}")
        keys = path.split(".")
        if keys[0] not in ("reported", "desired", "delta") or any(k == "" for k in keys):
            raise ValueError(
                f"path {path!r} must start with reported, desired or delta, e.g. reported.targets.app.current"
            )
        with self.lock:
            rows = self.db.execute(
                "SELECT thing, state FROM shadows WHERE name = ? AND deleted_at IS NULL ORDER BY thing", (shadow_name,)
            ).fetchall()
        out = []
        for thing, raw in rows:
            state = json.loads(raw)
            node: Any = delta(state.get("desired"), state.get("reported")) if keys[0] == "delta" else state.get(keys[0])
            found = node is not None
            for k in keys[1:]:
                if isinstance(node, dict) and k in node:
                    node = node[k]
                elif isinstance(node, list) and k.isdigit() and int(k) < len(node):
                    node = node[int(k)]
                else:
                    found = False
                    break
            if found and (op == "exists" or compare(node, op, value)):
                out.append(thing)
        return out

    def list(self, thing: str | None = None) -> list[tuple[str, str, int]]:
        """(thing, shadow name, version) of the shadows that exist."""
        with self.lock:
            return self.db.execute(
                "SELECT thing, name, version FROM shadows WHERE deleted_at IS NULL AND "
                "(? IS NULL OR thing = ?) ORDER BY thing, name",
                (thing, thing),
            ).fetchall()
