"""A quarantined device: the operator's policy leaves it only jobs, streams and the rotation path. The
agent keeps taking jobs, so a rotation job completes, while its other traffic (here the inventory
shadow) is refused; released, it is whole again."""

from __future__ import annotations

from cloudkit import wait_status
from otakit import World


def test_quarantined_device_rotates_while_other_topics_are_refused(tmp_path, agents):
    w = World(tmp_path, "QUAR", {})
    try:
        a = agents(w.dev)
        a.wait_for(r"inventory shadow 'inventory' updated", 90)
        assert w.cloud.quarantine(w.thing)
        old = next(c.id for c in w.cloud.registry.certificates() if c.thing == w.thing and c.status == "ACTIVE")
        w.jobs.create("rotate-q", w.thing, {"operation": "rotate-certificate"})
        ex = wait_status(w.jobs, "rotate-q", w.thing, "SUCCEEDED", timeout=120)
        certs = {c.id: c.status for c in w.cloud.registry.certificates() if c.thing == w.thing}
        assert certs[old] == "INACTIVE" and list(certs.values()).count("ACTIVE") == 1, certs
        assert "rotated to certificate" in ex["statusDetails"]["result"]
        # every new session reports the inventory again: refused while quarantined
        i = a.wait_for(r"certificate rotation done", 60)
        a.wait_for(r"inventory shadow 'inventory' not updated", 60, after=i)
        assert w.thing in w.cloud.quarantined()
        assert w.cloud.release(w.thing)
        j = len(a.lines)
        a.wait_for(r"inventory shadow 'inventory' updated", 60, after=j)
        assert a.stop() == 0
    finally:
        w.close()
