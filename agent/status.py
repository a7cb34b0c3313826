"""`iot-agent status`: what the device is and what it is doing, at a glance or as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config
from .state import StateStore


def certificate_expiry(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    from asn1crypto import pem as apem
    from asn1crypto import x509 as ax509

    raw = Path(path).read_bytes()
    der = apem.unarmor(raw)[2] if apem.detect(raw) else raw
    return ax509.Certificate.load(der)["tbs_certificate"]["validity"]["not_after"].native.isoformat()


def collect(cfg: Config) -> dict:
    state = StateStore(cfg.resolve(cfg.device.state_dir)).load()
    flow = state.get("provisioning", {})
    thing = state.get("thing_name") or cfg.device.thing_name
    cert = state.get("certificate_file") or (str(cfg.resolve(cfg.identity.certificate_file))
                                             if cfg.identity.certificate_file else None)
    return {
        "thing_name": thing,
        "certificate_file": cert,
        "certificate_expires": certificate_expiry(cert),
        "serial_number": cfg.provisioning.serial_number or state.get("factory", {}).get("serial"),
        "provisioning": {"step": flow.get("step", "not started" if not thing else "done"),
                         "attempts": flow.get("attempts", 0), "last_error": flow.get("last_error")},
        "certificate_expired": _expired(cert),
        "key_label": state.get("key_label") or cfg.pkcs11.key_label,
        "rotation": {k: state.get("rotation", {}).get(k) for k in ("step", "last", "next_attempt_at")},
        "defender": {"last_report_id": state.get("defender", {}).get("last_report_id"),
                     "last_report_at": state.get("defender", {}).get("last_report_at")},
        "jobs": {"current": (state.get("jobs", {}).get("current") or {}).get("job_id"),
                 "last": state.get("jobs", {}).get("last"),
                 "unsent_updates": len(state.get("jobs", {}).get("outbox", []))},
        "updates": {name: _slots(cfg.resolve(t.directory)) for name, t in sorted(cfg.ota.targets.items())},
        "connection": state.get("connection") or {},
    }


def _slots(directory: Path) -> dict:
    from .install import slot

    return {n: slot(directory, n) for n in ("current", "previous", "broken")}


def _expired(cert: str | None) -> bool:
    import time as _time

    from .x509lite import validity

    try:
        v = validity(open(cert, "rb").read()) if cert else None
    except OSError:
        return False
    return bool(v and _time.time() > v[1])


def show(cfg: Config, as_json: bool = False) -> int:
    s = collect(cfg)
    if as_json:
        print(json.dumps(s, indent=1))
        return 0
    p = s["provisioning"]
    print(f"thing:        {s['thing_name'] or '(not provisioned)'}")
    print(f"certificate:  {s['certificate_file'] or '-'} (expires {s['certificate_expires'] or '-'})")
    if s["certificate_expired"]:
        print("              EXPIRED: the device cannot connect; re-provision it (see README, 'Certificate rotation')")
    print(f"serial:       {s['serial_number'] or '-'}")
    c = s["connection"]
    if c.get("refused_since"):
        import time as _time

        since = _time.strftime("%Y-%m-%d %H:%M UTC", _time.gmtime(c["refused_since"]))
        print(f"connection:   REFUSED by the broker since {since} ({c.get('last_error')}): the certificate may be "
              f"revoked or inactive; next try in {max(0, c.get('next_try_at', 0) - _time.time()):.0f} s")
    r = s["rotation"]
    if r.get("step") or r.get("last"):
        last = r.get("last") or {}
        print(f"rotation:     {r.get('step') or 'idle'}" + (f"; last {last.get('status')}: {last.get('reason')}" if last else ""))
    line = f"provisioning: {p['step']}"
    if p["last_error"]:
        e = p["last_error"]
        line += f"; last refusal {e['code']}: {e['message']} (attempt {p['attempts']})"
    print(line)
    d = s["defender"]
    if d["last_report_id"]:
        import time as _time

        ago = _time.time() - (d["last_report_at"] or 0)
        print(f"defender:     last report {d['last_report_id']}, {ago:.0f} s ago")
    j = s["jobs"]
    if j["current"] or j["last"]:
        last = j["last"] or {}
        d = last.get("details") or {}
        why = d.get("reason") or d.get("result") or d.get("version") or ""
        line = f"jobs:         last {last.get('job_id', '-')} {last.get('status', '')}" + (f" ({why})" if why else "")
        if j["current"]:
            line += f"; running {j['current']}"
        if j["unsent_updates"]:
            line += f"; {j['unsent_updates']} status update(s) waiting for the broker"
        print(line)
    for name, sl in s["updates"].items():
        print(f"{'update ' + name + ':':<14}current {sl['current'] or '-'}, previous {sl['previous'] or '-'}"
              + (f", broken {sl['broken']}" if sl["broken"] else ""))
    return 0
