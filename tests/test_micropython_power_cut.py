"""Power cuts at every write-ahead step of the board agent (Mender's kill-in-every-state, for the
board): the harness ends the interpreter at a named point without writing back anything unsynced,
boots the board again, and the flow must finish with one working identity and one good release."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from boardkit import MP, THING, MpWorld
from mpkit import node  # noqa: F401  (fixture)

PROVISIONING = ["prov.after_key", "prov.after_certificate", "prov.after_identity"]
UPDATE = ["ota.mid_download", "ota.after_unpack", "ota.after_pending", "loader.mid_swap", "ota.after_commit_saved"]
ROLLBACK = ["loader.mid_rollback"]
ROTATION = ["rot.after_key", "rot.after_certificate", "rot.after_registered", "rot.after_proven",
            "rot.after_commit_sent"]


def test_every_cut_point_in_the_code_is_tested():
    names = set()
    for f in MP.glob("*.py"):
        names |= set(re.findall(r'\bcut\("([a-z_.]+)"\)', f.read_text()))
    assert names == set(PROVISIONING + UPDATE + ROLLBACK + ROTATION)


def one_identity(w: MpWorld) -> dict:
    ident = w.identity()
    files = sorted(p.name for p in (w.flash / "id").iterdir())
    assert files == sorted([Path(ident["cert"]).name, Path(ident["key"]).name]), files
    active = [c for c in w.cloud.registry.certificates() if c.thing == THING and c.status == "ACTIVE"]
    assert [c.id for c in active] == [ident["cert_id"]], active
    assert not (w.flash / "state" / "prov.json").exists() and not (w.flash / "state" / "rot.json").exists()
    return ident


def clean_release(w: MpWorld, version: str) -> None:
    assert w.app_version() == version
    for leftover in ("app.new", "app.old", "app.broken", "ota/download.bin"):
        assert not (w.flash / leftover).exists(), leftover
    # The board clears its boot state just after the cloud heard SUCCEEDED: allow it a moment (bounded).
    deadline = time.monotonic() + 15
    while json.loads((w.flash / "state" / "boot.json").read_text()) != {} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads((w.flash / "state" / "boot.json").read_text()) == {}


@pytest.mark.parametrize("point", PROVISIONING + UPDATE + ROLLBACK + ROTATION)
def test_power_cut(point, tmp_path, node):  # noqa: F811
    w = MpWorld(tmp_path, config={"self_test_s": 8} if point in ROLLBACK else None)
    try:
        b = w.boot(max_boots=10, params={"cut": point})
        b.wait_for(r"connected as " + THING, 90)
        if point in UPDATE:
            ex = w.run_job("ota", w.ota_doc("1.1.0", w.release("1.1.0")), "SUCCEEDED", timeout=120)
            assert ex["statusDetails"]["version"] == "1.1.0"
            clean_release(w, "1.1.0")
        elif point in ROLLBACK:
            bad = w.release("1.2.0", patch={"agent.py": ('store.read(ident["key"]), self.thing)',
                                                         'store.read(ident["key"]), self.thing + "-x")')})
            ex = w.run_job("ota", w.ota_doc("1.2.0", bad), "FAILED", timeout=120)
            assert "rolled back to 1.0.0" in ex["statusDetails"]["reason"]
            clean_release(w, "1.0.0")
        elif point in ROTATION:
            old = w.identity()
            w.run_job("rotate", {"operation": "rotate-certificate"}, "SUCCEEDED", timeout=120)
            b.wait_for(r"rotation: SUCCEEDED", 30)
            assert one_identity(w)["cert_id"] != old["cert_id"]
        assert f"### power cut at {point}" in b.text(), "the cut never happened"
        one_identity(w)
        b.wait_for(r"connected as " + THING, 30, after=b.wait_for(r"### power cut at "))
    finally:
        w.close()
