"""`iot-agent status`: what the device is and what it is doing, at a glance or as JSON.

It never raises on what it reads: a certificate that cannot be read or parsed shows as
"certificate_expires": null with a "certificate_error"; a corrupt state file is the StateError's one
line (exit 3), printed by the CLI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.base.config import Config
from agent.base.pemfile import certificate_expiry, certificate_status
from agent.base.state import StateStore


def _table(d: dict, key: str) -> dict:
    v = d.get(key)
    return v if isinstance(v, dict) else {}


def _text(v) -> str | None:
    return v if isinstance(v, str) and v else None


def collect(cfg: Config) -> dict:
    state = StateStore(cfg.resolve(cfg.device.state_dir)).load()  # StateError: one line, exit 3
    flow = _table(state, "provisioning")
    thing = _text(state.get("thing_name")) or cfg.device.thing_name
    cert = _text(state.get("certificate_file")) or (
        str(cfg.resolve(cfg.identity.certificate_file)) if cfg.identity.certificate_file else None
    )
    after, cert_error = certificate_status(cert)
    jobs = _table(state, "jobs")
    outbox = jobs.get("outbox")
    return {
        "thing_name": thing,
        "certificate_file": cert,
        "certificate_expires": certificate_expiry(cert) if after is not None else None,
        "certificate_error": cert_error,
        "serial_number": cfg.provisioning.serial_number or _table(state, "factory").get("serial"),
        "provisioning": {
            "step": flow.get("step", "not started" if not thing else "done"),
            "attempts": flow.get("attempts", 0),
            "last_error": flow.get("last_error"),
        },
        "certificate_expired": after is not None and time.time() > after,
        "key_label": _text(state.get("key_label")) or cfg.pkcs11.key_label,
        "rotation": {k: _table(state, "rotation").get(k) for k in ("step", "last", "next_attempt_at")},
        "defender": {
            "last_report_id": _table(state, "defender").get("last_report_id"),
            "last_report_at": _table(state, "defender").get("last_report_at"),
        },
        "jobs": {
            "current": _table(jobs, "current").get("job_id"),
            "last": jobs.get("last") if isinstance(jobs.get("last"), dict) else None,
            "unsent_updates": len(outbox) if isinstance(outbox, list) else 0,
        },
        "updates": {name: _slots(cfg.resolve(t.directory)) for name, t in sorted(cfg.ota.targets.items())},
        "connection": _table(state, "connection"),
        "tunnels": [t for t in state.get("tunnels") or [] if isinstance(t, dict)],
        "local_messaging": _spool(cfg),
    }


def _spool(cfg: Config) -> dict | None:
    """The spool's figures and counters, read from its file (read-only; None when local messaging is off)."""
    if not cfg.local_messaging.enabled:
        return None
    from agent.local_messaging.feature import spool_path
    from agent.local_messaging.spool import SpoolError, read_stats

    try:
        return read_stats(spool_path(cfg)) or {"messages": 0}
    except SpoolError as e:
        return {"error": str(e)}


def _slots(directory: Path) -> dict:
    from agent.update.install import slot

    return {n: slot(directory, n) for n in ("current", "previous", "broken")}


def show(cfg: Config, as_json: bool = False) -> int:
    s = collect(cfg)
    if as_json:
        print(json.dumps(s, indent=1))
        return 0
    p = s["provisioning"]
    print(f"thing:        {s['thing_name'] or '(not provisioned)'}")
    if s["certificate_error"]:
        print(f"certificate:  UNUSABLE: {s['certificate_error']}")
    else:
        print(f"certificate:  {s['certificate_file'] or '-'} (expires {s['certificate_expires'] or '-'})")
    if s["certificate_expired"]:
        print("              EXPIRED: the device cannot connect; re-provision it (see README, 'Certificate rotation')")
    print(f"serial:       {s['serial_number'] or '-'}")
    c = s["connection"]
    if _number(c.get("refused_since")):
        try:
            since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(c["refused_since"]))
        except (OverflowError, OSError, ValueError):
            since = "an unreadable time"
        print(
            f"connection:   REFUSED by the broker since {since} ({c.get('last_error')}): the certificate may be "
            f"revoked or inactive; next try in {max(0, (_number(c.get('next_try_at')) or 0) - time.time()):.0f} s"
        )
    r = s["rotation"]
    if r.get("step") or r.get("last"):
        last = r.get("last") if isinstance(r.get("last"), dict) else {}
        print(
            f"rotation:     {r.get('step') or 'idle'}"
            + (f"; last {last.get('status')}: {last.get('reason')}" if last else "")
        )
    line = f"provisioning: {p['step']}"
    if isinstance(p["last_error"], dict):
        e = p["last_error"]
        line += f"; last refusal {e.get('code')}: {e.get('message')} (attempt {p['attempts']})"
    print(line)
    d = s["defender"]
    if d["last_report_id"]:
        ago = time.time() - (_number(d["last_report_at"]) or 0)
        print(f"defender:     last report {d['last_report_id']}, {ago:.0f} s ago")
    j = s["jobs"]
    if j["current"] or j["last"]:
        last = j["last"] or {}
        details = last.get("details")
        d = details if isinstance(details, dict) else {}
        why = d.get("reason") or d.get("result") or d.get("version") or ""
        line = f"jobs:         last {last.get('job_id', '-')} {last.get('status', '')}" + (f" ({why})" if why else "")
        if j["current"]:
            line += f"; running {j['current']}"
        if j["unsent_updates"]:
            line += f"; {j['unsent_updates']} status update(s) waiting for the broker"
        print(line)
    for t in s["tunnels"]:
        services = t.get("services")
        shown = ", ".join(x for x in services if isinstance(x, str)) if isinstance(services, list) else "-"
        opened = _number(t.get("opened_at"))
        try:
            since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(opened)) if opened is not None else "?"
        except (OverflowError, OSError, ValueError):
            since = "?"
        print(f"tunnel:       {t.get('id')} open since {since} for {shown}")
    lm = s["local_messaging"]
    if isinstance(lm, dict):
        if lm.get("error"):
            print(f"spool:        UNREADABLE: {lm['error']}")
        else:
            age = _number(lm.get("oldest_age_s"))
            print(
                f"spool:        {lm.get('messages', 0)} message(s), {lm.get('bytes', 0)} bytes"
                + (f", oldest {age:.0f} s" if age is not None else "")
                + "; "
                + ", ".join(
                    f"{k} {lm.get(k, 0)}" for k in ("delivered", "refused", "evicted", "expired", "rejected", "resent")
                )
            )
    for name, sl in s["updates"].items():
        print(
            f"{'update ' + name + ':':<14}current {sl['current'] or '-'}, previous {sl['previous'] or '-'}"
            + (f", broken {sl['broken']}" if sl["broken"] else "")
        )
    return 0


def _number(v) -> float | None:
    """A finite number from the state, or None (the state is the agent's own, but status never raises on it)."""
    import math

    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
