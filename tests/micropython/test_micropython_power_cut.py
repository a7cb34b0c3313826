"""Power cuts at every write-ahead step of the board agent (Mender's kill-in-every-state, for the
board), on MicroPython's unix port running the .mpy bundle users flash: micropython/unix/hostboard.py
SIGKILLs the interpreter at a named point (no `finally` runs, no socket is closed politely), the test
boots the board again, and the flow must finish with one working identity and one good release.

The sweeps below do not rely on named points: the harness numbers every flash sync (each state write,
rename or removal made durable) and every named point (the cloud's answers among them) across boots,
and cuts the power after the Nth; N goes up until a run ends without reaching it. The flash is a host
folder: what a flash file system loses of a file being written when the power goes is not simulated
(each state file is written whole to a temporary name and renamed, the step LittleFS makes atomic)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from boardkit import MP, THING, MpWorld

PROVISIONING = ["prov.after_key", "prov.after_certificate", "prov.after_identity"]
UPDATE = ["ota.mid_download", "ota.after_unpack", "ota.after_pending", "loader.mid_swap", "ota.after_commit_saved"]
ROLLBACK = ["loader.mid_rollback"]
ROTATION = [
    "rot.after_key",
    "rot.after_certificate",
    "rot.after_registered",
    "rot.after_proven",
    "rot.after_commit_sent",
]
CLOUD = ["request.answered"]  # after any request the cloud accepted (the first is CreateCertificateFromCsr)


def test_every_cut_point_in_the_code_is_tested():
    names = set()
    for f in MP.glob("*.py"):
        names |= set(re.findall(r'\bcut\("([a-z_.]+)"\)', f.read_text()))
    assert names == set(PROVISIONING + UPDATE + ROLLBACK + ROTATION + CLOUD)


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


@pytest.mark.parametrize("point", PROVISIONING + UPDATE + ROLLBACK + ROTATION + CLOUD)
def test_power_cut(point, tmp_path):
    w = MpWorld(tmp_path, config={"self_test_s": 8} if point in ROLLBACK else None)
    try:
        b = w.boot(max_boots=10, params={"cut": point})
        b.wait_for(r"connected as " + THING, 90)
        if point in UPDATE:
            ex = w.run_job("ota", w.ota_doc("1.1.0", w.release("1.1.0")), "SUCCEEDED", timeout=120)
            assert ex["statusDetails"]["version"] == "1.1.0"
            clean_release(w, "1.1.0")
        elif point in ROLLBACK:
            bad = w.release(
                "1.2.0",
                patch={
                    "agent.py": (
                        'store.read(ident["key"]), self.thing)',
                        'store.read(ident["key"]), self.thing + "-x")',
                    )
                },
            )
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


# -- sweeps: a cut after every step ----------------------------------------------------------------
# One Defender report at the first connection, then none, and jobs queued before the board boots: the
# numbering of the sweep points is then the same from run to run.
QUIET = {"defender_interval_s": 10**9, "backoff_min_s": 0.2, "backoff_max_s": 0.5}


def new_sweep_run(w: MpWorld) -> None:
    """Number the sweep points from 1 again (the harness keeps the count and its cuts beside the flash)."""
    for f in w.flash.parent.glob(f"{w.flash.name}.cut-sync-*"):
        f.unlink()
    Path(f"{w.flash}.syncs").unlink(missing_ok=True)


def sweep_points(w: MpWorld) -> int:
    f = Path(f"{w.flash}.syncs")
    return int(f.read_text() or 0) if f.exists() else 0


def settle(w: MpWorld, b, k: int | str, converged, timeout: float = 60) -> bool:
    """Wait until the flow has converged and the board has passed no sweep point for a while (after a
    cut: until it has connected again). True when the power was cut at sweep point k (or named cut k)."""
    mark = f"### power cut at {k if isinstance(k, str) else f'sync-{k}'} "
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = sweep_points(w)
        if n != last:
            last, since = n, time.monotonic()
        lines = list(b.lines)
        cut = [i for i, line in enumerate(lines) if line.startswith(mark)]
        back = not cut or any(f"connected as {THING}" in line for line in lines[cut[0] :])
        try:
            ok = converged()
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok and back and time.monotonic() - since > 1.0:
            return bool(cut)
        time.sleep(0.1)
    raise AssertionError(f"no convergence after a cut at {mark[17:].strip()}:\n{b.text()[-6000:]}")


def sweep(prepare, run, workers: int = 2) -> int:
    """run(ctx, k) cuts the power at sweep point k of a flow and checks how the flow ended; it returns
    whether the cut happened. k = 1, 2, ... until a run ends without reaching its point; `workers`
    runs at a time, each with its own ctx = prepare() (closed after). Returns the number of points."""
    lock = threading.Lock()
    state = {"next": 1, "end": None, "errors": []}

    def worker() -> None:
        ctx = prepare()
        try:
            while True:
                with lock:
                    if state["end"] is not None or state["errors"]:
                        return
                    k = state["next"]
                    state["next"] += 1
                try:
                    assert k < 80, "the sweep does not end"
                    cut = run(ctx, k)
                except BaseException as e:
                    with lock:
                        state["errors"].append((k, e))
                    return
                if not cut:
                    with lock:
                        state["end"] = k if state["end"] is None else min(state["end"], k)
        finally:
            if ctx is not None:
                ctx.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["errors"]:
        raise min(state["errors"], key=lambda e: e[0])[1]
    return state["end"] - 1


def id_files(w: MpWorld) -> list[str]:
    return sorted(p.name for p in (w.flash / "id").iterdir())


def attached(w: MpWorld) -> list:
    return [c for c in w.cloud.registry.certificates() if c.thing == THING]


def on_identity(w: MpWorld) -> bool:
    ident = w.identity()
    return id_files(w) == sorted([Path(ident["cert"]).name, Path(ident["key"]).name])


def provisioned(root: Path, settings: dict | None = None) -> MpWorld:
    """A provisioned board that has made its one Defender report, stopped between two sweep runs."""
    w = MpWorld(root, config=QUIET)
    try:
        if settings:
            w.cloud.configure(**settings)
            w.cloud.down()
            w.cloud.up()
        b = w.boot()
        b.wait_for(r"defender report \d+ accepted", 90)
        b.stop()
        return w
    except BaseException:
        w.close()
        raise


def test_provisioning_converges_after_a_power_cut_at_every_step(tmp_path):
    def run(_ctx, k: int) -> bool:
        w = MpWorld(tmp_path / f"k{k}", config=QUIET)
        try:
            b = w.boot(max_boots=12, params={"cut_sync": k})
            cut = settle(
                w,
                b,
                k,
                lambda: (
                    on_identity(w)
                    and (w.flash / "state" / "defender.json").exists()
                    and not (w.flash / "state" / "prov.json").exists()
                ),
            )
            one_identity(w)
            assert len(attached(w)) == 1, attached(w)  # one thing, one certificate: registered once
            return cut
        finally:
            w.close()

    n = sweep(lambda: None, run)
    print("provisioning:", n, "sweep points")
    assert n >= 10


@pytest.mark.parametrize("outcome", ["SUCCEEDED", "FAILED"])
def test_rotation_converges_after_a_power_cut_at_every_step(outcome, tmp_path):
    """SUCCEEDED: every step from the job to the old certificate's retirement. FAILED: the same for a
    rotation whose new certificate cannot connect (the cloud leaves it INACTIVE), which is abandoned.
    Wherever the power is cut, the board ends on one identity with its files, one ACTIVE certificate,
    the job settled once, and it never retires the certificate it is connected with."""
    settings = {"rotation_new_inactive": True} if outcome == "FAILED" else None
    worlds = iter(range(100))

    def run(w: MpWorld, k: int) -> bool:
        new_sweep_run(w)
        old, before = w.identity(), len(attached(w))
        job = f"rotate-{k}"
        w.jobs.create(job, THING, {"operation": "rotate-certificate"})
        b = w.boot(max_boots=12, params={"cut_sync": k})
        try:
            cut = settle(
                w,
                b,
                k,
                lambda: (
                    w.jobs.execution(job, THING)["status"] == outcome
                    and on_identity(w)
                    and "old" not in w.identity()
                    and not (w.flash / "state" / "rot.json").exists()
                ),
            )
            ident = one_identity(w)
            # One job, one rotation: exactly one more certificate was registered to the thing.
            assert len(attached(w)) == before + 1, (k, attached(w))
            if outcome == "SUCCEEDED":
                assert ident["cert_id"] != old["cert_id"] and ident["key"] != old["key"]
            else:
                assert ident == old
            return cut
        finally:
            b.stop()

    n = sweep(lambda: provisioned(tmp_path / f"w{next(worlds)}", settings), run)
    print(f"rotation ({outcome}):", n, "sweep points")
    assert n >= 15


def test_an_update_converges_after_a_power_cut_at_every_step(tmp_path):
    """The release is installed, or, when the power goes during its trial boot (which the board cannot
    tell from a crash), rolled back and remembered as failed; never half of either."""
    worlds = iter(range(100))

    def run(w: MpWorld, k: int) -> bool:
        new_sweep_run(w)
        before, version = w.app_version(), f"1.{k}.0"
        job = f"ota-{k}"
        w.jobs.create(job, THING, w.ota_doc(version, w.release(version)))
        b = w.boot(max_boots=12, params={"cut_sync": k})
        try:
            cut = settle(
                w,
                b,
                k,
                lambda: (
                    w.jobs.execution(job, THING)["status"] in ("SUCCEEDED", "FAILED")
                    and json.loads((w.flash / "state" / "boot.json").read_text()) == {}
                ),
            )
            lines = list(b.lines)
            if w.jobs.execution(job, THING)["status"] == "FAILED":
                at = [i for i, line in enumerate(lines) if line.startswith("### power cut at")]
                staged = [i for i, line in enumerate(lines) if "staged; resetting" in line]
                assert (
                    at
                    and staged
                    and staged[0] < at[0]
                    and not any("self-test passed" in line for line in lines[: at[0]])
                ), b.text()
                assert "rolled back to " + before in w.jobs.execution(job, THING)["statusDetails"]["reason"]
                assert version in json.loads((w.flash / "state" / "broken.json").read_text())
                clean_release(w, before)
            else:
                clean_release(w, version)
            one_identity(w)
            return cut
        finally:
            b.stop()

    n = sweep(lambda: provisioned(tmp_path / f"w{next(worlds)}"), run)
    print("update:", n, "sweep points")
    assert n >= 15


def test_a_cut_right_after_the_new_certificate_is_proven_keeps_the_identity(tmp_path):
    """Whatever the board writes first once its new certificate has connected is where the decision "the new
    certificate is proven" must be complete: cut the power right after that write, and the board still ends on
    one identity whose files exist, with the old certificate retired (told only over a connection made with
    the new one) and the job settled."""
    w = provisioned(tmp_path)
    try:
        old = w.identity()
        w.jobs.create("rotate", THING, {"operation": "rotate-certificate"})
        b = w.boot(max_boots=1)  # new key, certificate, registration; then the reset onto it, where this stops
        b.wait_for(r"### exit 75", 60)
        assert json.loads((w.flash / "state" / "rot.json").read_text())["step"] == "switch"
        b = w.boot(max_boots=8, params={"cut_on_change": ["state/identity.json", "state/rot.json"]})
        settle(
            w,
            b,
            "change",
            lambda: (
                w.jobs.execution("rotate", THING)["status"] == "SUCCEEDED"
                and on_identity(w)
                and "old" not in w.identity()
                and not (w.flash / "state" / "rot.json").exists()
            ),
        )
        ident = one_identity(w)
        assert ident["cert_id"] != old["cert_id"] and len(attached(w)) == 2
    finally:
        w.close()
