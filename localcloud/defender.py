"""Device Defender device-side metrics: the report specification as a validator, plus the store.

`validate()` is pure: it checks a decoded report (JSON or CBOR) against AWS's device-side metrics
specification with long or short field names, and returns an error code and message or None.
The agent's own report builder is tested against it, so the two cannot drift apart silently.

Answers have AWS's shape: `{"thingName", "status": "ACCEPTED"|"REJECTED", "timestamp" (epoch ms),
"reportId", "statusDetails": {"ErrorCode", "ErrorMessage"}}`. The one rejection AWS documents is a
report that breaks the specification: ErrorCode "InvalidPayload", ErrorMessage "Malformed metrics
report" (Device Defender troubleshooting guide,
https://docs.aws.amazon.com/iot/latest/developerguide/device-defender-troubleshoot.html, source
awsdocs/aws-iot-docs developerguide/device-defender-troubleshoot.md; the example answers carry
`timestamp` in epoch milliseconds); here the message goes on to say what is wrong. A report sooner
than the minimum interval ("Devices are throttled to one metric report every 5 minutes",
https://docs.aws.amazon.com/iot/latest/developerguide/DetectMetricsMessages.html) is rejected
"Throttled": AWS documents the throttling, not its code. `reportId` in the answer is what AWS's
embedded Defender demo matches answers by.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

# long name -> short name
NAMES = {
    "header": "hed",
    "report_id": "rid",
    "version": "v",
    "metrics": "met",
    "custom_metrics": "cmet",
    "tcp_connections": "tc",
    "established_connections": "ec",
    "connections": "cs",
    "remote_addr": "rad",
    "local_port": "lp",
    "local_interface": "li",
    "total": "t",
    "listening_tcp_ports": "tp",
    "listening_udp_ports": "up",
    "ports": "pts",
    "port": "pt",
    "interface": "if",
    "network_stats": "ns",
    "bytes_in": "bi",
    "bytes_out": "bo",
    "packets_in": "pi",
    "packets_out": "po",
}
MAX_LIST = 1000
MAX_CUSTOM = 100
MALFORMED = "InvalidPayload"  # AWS's ErrorCode for a report that breaks the specification (see above)


class Invalid(Exception):
    """A report that breaks the specification. AWS answers every one of them InvalidPayload; `kind`
    (InvalidValue, MissingRequiredField) only says which sort of rule it broke."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.code, self.message = MALFORMED, f"Malformed metrics report: {message}"


def validate(doc: Any) -> tuple[str, str] | None:
    """(ErrorCode, ErrorMessage) when the report breaks the specification, else None."""
    try:
        _report(doc)
    except Invalid as e:
        return e.code, e.message
    return None


def report_id(doc: Any) -> int | None:
    if isinstance(doc, dict):
        for h, r in (("header", "report_id"), ("hed", "rid")):
            v = doc.get(h, {}).get(r) if isinstance(doc.get(h), dict) else None
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


class _N:
    """Field names for one report: all long or all short."""

    def __init__(self, short: bool):
        self.short = short

    def __call__(self, long: str) -> str:
        return NAMES[long] if self.short else long


def _obj(v: Any, where: str, n: _N, required: set[str], optional: set[str]) -> dict:
    if not isinstance(v, dict):
        raise Invalid("InvalidValue", f"{where} must be an object")
    allowed = {n(k) for k in required | optional}
    extra = sorted(set(v) - allowed)
    if extra:
        raise Invalid("InvalidValue", f"{where}: unknown field(s) {', '.join(map(str, extra))}")
    missing = sorted(n(k) for k in required if n(k) not in v)
    if missing:
        raise Invalid("MissingRequiredField", f"{where}: missing {', '.join(missing)}")
    return v


def _int(v: Any, where: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise Invalid("InvalidValue", f"{where} must be an integer in [{lo}, {hi}]")
    return v


def _str(v: Any, where: str, max_len: int = 256) -> str:
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise Invalid("InvalidValue", f"{where} must be a non-empty string of at most {max_len} characters")
    return v


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list) or len(v) > MAX_LIST:
        raise Invalid("InvalidValue", f"{where} must be a list of at most {MAX_LIST} items")
    return v


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


def _remote_addr(v: Any, where: str) -> None:
    s = _str(v, where, 64)
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
        ok = _is_ip(host, 6)
    else:
        host, sep, port = s.rpartition(":")
        ok = _is_ip(host, 4)
    if not (sep and ok and port.isdigit() and int(port) <= 65535):
        raise Invalid("InvalidValue", f'{where} must be "ip:port" (IPv6 as "[addr]:port"), got {s!r}')


def _report(doc: Any) -> None:
    if not isinstance(doc, dict):
        raise Invalid("InvalidValue", "report must be an object")
    short = "hed" in doc
    n = _N(short)
    _obj(doc, "report", n, {"header"}, {"metrics", "custom_metrics"})
    if n("metrics") not in doc and n("custom_metrics") not in doc:
        raise Invalid("MissingRequiredField", "report needs metrics or custom_metrics")
    h = _obj(doc[n("header")], n("header"), n, {"report_id", "version"}, set())
    _int(h[n("report_id")], f"{n('header')}.{n('report_id')}")
    if h[n("version")] != "1.0":
        raise Invalid("InvalidValue", f'{n("header")}.{n("version")} must be "1.0"')
    if n("metrics") in doc:
        _metrics(doc[n("metrics")], n)
    if n("custom_metrics") in doc:
        _custom(doc[n("custom_metrics")], n("custom_metrics"))


def _metrics(m: Any, n: _N) -> None:
    m = _obj(
        m, n("metrics"), n, set(), {"tcp_connections", "listening_tcp_ports", "listening_udp_ports", "network_stats"}
    )
    if n("tcp_connections") in m:
        tc = _obj(m[n("tcp_connections")], n("tcp_connections"), n, {"established_connections"}, set())
        ec = _obj(tc[n("established_connections")], n("established_connections"), n, set(), {"connections", "total"})
        for i, c in enumerate(_list(ec.get(n("connections"), []), n("connections"))):
            where = f"{n('connections')}[{i}]"
            c = _obj(c, where, n, {"remote_addr"}, {"local_port", "local_interface"})
            _remote_addr(c[n("remote_addr")], f"{where}.{n('remote_addr')}")
            if n("local_port") in c:
                _int(c[n("local_port")], f"{where}.{n('local_port')}", 0, 65535)
            if n("local_interface") in c:
                _str(c[n("local_interface")], f"{where}.{n('local_interface')}", 32)
        if n("total") in ec:
            _int(ec[n("total")], f"{n('established_connections')}.{n('total')}")
    for key in ("listening_tcp_ports", "listening_udp_ports"):
        if n(key) in m:
            lp = _obj(m[n(key)], n(key), n, set(), {"ports", "total"})
            for i, p in enumerate(_list(lp.get(n("ports"), []), n("ports"))):
                where = f"{n(key)}.{n('ports')}[{i}]"
                p = _obj(p, where, n, {"port"}, {"interface"})
                _int(p[n("port")], f"{where}.{n('port')}", 1, 65535)
                if n("interface") in p:
                    _str(p[n("interface")], f"{where}.{n('interface')}", 32)
            if n("total") in lp:
                _int(lp[n("total")], f"{n(key)}.{n('total')}")
    if n("network_stats") in m:
        ns = _obj(
            m[n("network_stats")], n("network_stats"), n, set(), {"bytes_in", "bytes_out", "packets_in", "packets_out"}
        )
        for k, v in ns.items():
            _int(v, f"{n('network_stats')}.{k}")


def _custom(c: Any, where: str) -> None:
    if not isinstance(c, dict) or len(c) > MAX_CUSTOM:
        raise Invalid("InvalidValue", f"{where} must be an object with at most {MAX_CUSTOM} metrics")
    for name, val in c.items():
        w = f"{where}.{name}"
        if not isinstance(name, str) or not 1 <= len(name) <= 128:
            raise Invalid("InvalidValue", f"{where}: metric names are 1-128 characters")
        if not isinstance(val, list) or len(val) != 1 or not isinstance(val[0], dict) or len(val[0]) != 1:
            raise Invalid("InvalidValue", f"{w} must be a one-element list holding one typed value")
        ((kind, v),) = val[0].items()
        if kind == "number":
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
                raise Invalid("InvalidValue", f"{w}.number must be a number")
        elif kind == "number_list":
            if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise Invalid("InvalidValue", f"{w}.number_list must be a list of numbers")
        elif kind == "string_list":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise Invalid("InvalidValue", f"{w}.string_list must be a list of strings")
        elif kind == "ip_list":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise Invalid("InvalidValue", f"{w}.ip_list must be a list of IP addresses")
            for x in v:
                try:
                    ipaddress.ip_address(x)
                except ValueError:
                    raise Invalid("InvalidValue", f"{w}.ip_list: {x!r} is not an IP address") from None
        else:
            raise Invalid("InvalidValue", f"{w}: unknown custom metric type {kind!r}")


SCHEMA = """
CREATE TABLE IF NOT EXISTS defender_reports (
    thing TEXT NOT NULL, report_id INTEGER, received REAL NOT NULL, format TEXT NOT NULL,
    status TEXT NOT NULL, error_code TEXT, report TEXT
);
"""


@dataclass(eq=False)
class DefenderStore:
    db: sqlite3.Connection
    lock: threading.RLock
    min_interval_s: float = 300.0

    def __post_init__(self) -> None:
        with self.lock:
            self.db.executescript(SCHEMA)

    def receive(self, thing: str, fmt: str, doc: Any, now: float | None = None) -> tuple[bool, dict]:
        """Validate, throttle, store; returns (accepted, response document)."""
        now = time.time() if now is None else now
        rid = report_id(doc)
        error = validate(doc)
        with self.lock:
            if error is None:
                last = self.db.execute(
                    "SELECT MAX(received), MAX(report_id) FROM defender_reports WHERE thing = ? "
                    "AND status = 'ACCEPTED'",
                    (thing,),
                ).fetchone()
                if last[0] is not None and now - last[0] < self.min_interval_s:
                    error = (
                        "Throttled",
                        f"one report per {self.min_interval_s:g} s; the last was {now - last[0]:.0f} s ago",
                    )
                elif last[1] is not None and rid is not None and rid <= last[1]:
                    # The specification: report_id is "monotonically increasing".
                    error = (
                        MALFORMED,
                        f"Malformed metrics report: report_id {rid} is not greater than the last accepted ({last[1]})",
                    )
            status = "ACCEPTED" if error is None else "REJECTED"
            self.db.execute(
                "INSERT INTO defender_reports VALUES (?,?,?,?,?,?,?)",
                (
                    thing,
                    rid,
                    now,
                    fmt,
                    status,
                    error[0] if error else None,
                    json.dumps(doc, default=repr) if error is None else None,
                ),
            )
        resp: dict[str, Any] = {"thingName": thing, "status": status, "timestamp": int(now * 1000)}
        if rid is not None:
            resp["reportId"] = rid
        if error:
            resp["statusDetails"] = {"ErrorCode": error[0], "ErrorMessage": error[1]}
        return error is None, resp

    def reports(self, thing: str) -> list[dict]:
        with self.lock:
            rows = self.db.execute(
                "SELECT report_id, received, format, status, error_code, report FROM defender_reports "
                "WHERE thing = ? ORDER BY rowid",
                (thing,),
            ).fetchall()
        return [
            {
                "reportId": r[0],
                "received": r[1],
                "format": r[2],
                "status": r[3],
                "errorCode": r[4],
                "report": json.loads(r[5]) if r[5] else None,
            }
            for r in rows
        ]
