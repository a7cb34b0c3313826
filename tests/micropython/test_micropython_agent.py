"""The MicroPython board agent's whole lifecycle under the real MicroPython interpreter (WebAssembly, in
Node) against the real mosquitto and local cloud: SNTP clock gate, provisioning by claim with a key
made on the board, Device Defender custom metrics, signed OTA over MQTT streams (commit, refusals,
rollback) and certificate rotation."""

from __future__ import annotations

import json
import os

import pytest
from boardkit import THING, MpWorld
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mpkit import run_unix
from otakit import CodeSigner

from localcloud.defender import DefenderStore


@pytest.fixture
def world(tmp_path):
    w = MpWorld(tmp_path)
    yield w
    w.close()


def defender_reports(w: MpWorld) -> list[dict]:
    store = DefenderStore(w.cloud.registry.db, w.cloud.registry.lock)
    return store.reports(THING)


# The whole lifecycle runs under this heap cap on the unix port (64-bit objects: 1.6 times a 32-bit
# board's figures). The smallest heap it completes in is 92k-100k from run to run (bench/
# micropython_footprint.py finds it); 112k leaves room for that spread, so growth of the agent's working
# set by about a sixth fails this test, as does any MemoryError the agent only recovered from.
LIFECYCLE_HEAP = os.environ.get("IOT_AGENT_MP_LIFECYCLE_HEAP", "112k")


def test_provision_defender_ota_rotation_lifecycle(world):
    w = world
    b = w.boot(heap=LIFECYCLE_HEAP)
    b.wait_for(r"agent 1\.0\.0 on unix", 10)
    # Clock gate: the RTC starts in 2000; SNTP from chrony sets it before any TLS.
    b.wait_for(r"clock set from SNTP", 30)
    b.wait_for(r"provisioned as " + THING, 60)
    ident = w.identity()
    cert = x509.load_pem_x509_certificate((w.flash / ident["cert"]).read_bytes())
    key = serialization.load_pem_private_key((w.flash / ident["key"]).read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert not (w.flash / "state" / "prov.json").exists()
    b.wait_for(r"connected as " + THING, 30)
    b.wait_for(r"defender report \d+ accepted", 30)
    reps = defender_reports(w)
    assert [r["status"] for r in reps] == ["ACCEPTED"], reps
    custom = reps[0]["report"]["custom_metrics"]
    assert set(custom) >= {"free_heap_bytes", "uptime_s", "reconnects"}, custom

    # A release signed by another key is refused and nothing changes.
    rogue = CodeSigner(w.root / "rogue")
    data = w.release("1.1.0")
    ex = w.run_job("bad-sig", w.ota_doc("1.1.0", data, signature=rogue.sign(data)), "REJECTED")
    assert "signature" in ex["statusDetails"]["reason"], ex
    assert w.app_version() == "1.0.0" and not (w.flash / "app.new").exists()

    # A good release: streamed, verified, staged, swapped on reset, self-tested, committed.
    boots = b.boots
    ex = w.run_job("ota-110", w.ota_doc("1.1.0", data), "SUCCEEDED", timeout=120)
    assert ex["statusDetails"]["version"] == "1.1.0" and ex["statusDetails"]["result"] == "installed", ex
    assert w.app_version() == "1.1.0" and b.boots == boots + 1
    assert not (w.flash / "app.old").exists() and not (w.flash / "ota" / "download.bin").exists()

    # A release that cannot connect (wrong client ID) fails its self-test and is rolled back.
    bad = w.release(
        "1.2.0",
        patch={"agent.py": ('store.read(ident["key"]), self.thing)', 'store.read(ident["key"]), self.thing + "-x")')},
    )
    ex = w.run_job("ota-120", w.ota_doc("1.2.0", bad), "FAILED", timeout=180)
    assert "rolled back to 1.1.0" in ex["statusDetails"]["reason"], ex
    assert w.app_version() == "1.1.0"
    assert json.loads((w.flash / "state" / "broken.json").read_text()) == ["1.2.0"]
    ex = w.run_job("ota-120-again", w.ota_doc("1.2.0", bad), "REJECTED")
    assert "failed on this device before" in ex["statusDetails"]["reason"]

    # Certificate rotation: a new key on the board, proven on a connection before the old is dropped.
    old = w.identity()
    ex = w.run_job("rotate-1", {"operation": "rotate-certificate"}, "SUCCEEDED", timeout=120)
    new = w.identity()
    assert new["cert_id"] != old["cert_id"] and new["key"] != old["key"] and new["thing"] == THING
    assert not (w.flash / old["key"]).exists() and not (w.flash / old["cert"]).exists()
    status = {c.id: c.status for c in w.cloud.registry.certificates()}
    assert status[old["cert_id"]] == "INACTIVE" and status[new["cert_id"]] == "ACTIVE", status
    assert "memory allocation failed" not in b.text(), b.text()[-3000:]
    # The new certificate connected (and subscribed) before the cloud was told to drop the old one.
    assert b.wait_for(r"rotation: the new certificate connected") < b.wait_for(r"rotation: SUCCEEDED")


def test_refused_updates_install_nothing(world):
    """Hostile or wrong job documents are REJECTED (or FAILED) and leave the running release alone."""
    import io
    import tarfile

    from otakit import our_doc

    w = world
    b = w.boot()
    b.wait_for(r"connected as " + THING, 90)
    boots = b.boots

    def tar(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    good = w.release("2.0.0")
    tampered = bytearray(good)
    tampered[600] ^= 1
    doc = w.ota_doc("2.0.0", good)
    url_doc = our_doc("mpy-app", "2.0.0", "a.tar", good, w.signer.sign(good), url="https://localhost/a.tar")
    cases = [
        ("url", url_doc, "REJECTED", "MQTT streams only"),
        ("downgrade", w.ota_doc("0.9.0", w.release("0.9.0")), "REJECTED", "not newer"),
        ("replay", w.ota_doc("1.0.0", w.release("1.0.0")), "REJECTED", "not newer"),
        ("target", {**doc, "target": "other"}, "REJECTED", "unknown target"),
        ("schema", {**doc, "schema": 2}, "REJECTED", "schema"),
        ("extra-field", {**doc, "run": "rm -rf /"}, "REJECTED", "unknown field"),
        ("operation", {"operation": "format-flash"}, "REJECTED", "unsupported operation"),
        (
            "tampered",
            w.ota_doc(
                "2.0.0",
                bytes(tampered),
                signature=w.signer.sign(good),
                sha256=__import__("hashlib").sha256(good).hexdigest(),
            ),
            "REJECTED",
            "sha256",
        ),
        (
            "tampered-signed-hash",
            w.ota_doc("2.0.0", bytes(tampered), signature=w.signer.sign(good)),
            "REJECTED",
            "signature",
        ),
        (
            "traversal",
            w.ota_doc("2.0.0", tar({"VERSION": b"2.0.0\n", "../main.py": b"print('owned')\n"})),
            "REJECTED",
            "not a plain file",
        ),
        ("version-file", w.ota_doc("2.0.0", w.release("2.0.1")), "REJECTED", "VERSION"),
        ("oversized", w.ota_doc("2.0.0", good, size=10 * 1024 * 1024), "REJECTED", "artifact.size"),
        (
            "truncated",
            w.ota_doc("2.0.0", good[:4096], size=len(good), sha256=__import__("hashlib").sha256(good).hexdigest()),
            "FAILED",
            "stream",
        ),
    ]
    main_py = (w.flash / "main.py").read_bytes()
    for job_id, d, status, reason in cases:
        ex = w.run_job(job_id, d, status)
        assert reason in ex["statusDetails"]["reason"], (job_id, ex)
        assert w.app_version() == "1.0.0", job_id
        assert not (w.flash / "app.new").exists() and not (w.flash / "ota" / "download.bin").exists(), job_id
    assert (w.flash / "main.py").read_bytes() == main_py
    assert b.boots == boots, "a refused update must not reset the board"


def test_versions_have_one_spelling_and_come_from_the_signed_archive(world):
    """As on Linux: MAJOR.MINOR.PATCH in ASCII digits without leading zeros, compared as numbers, anything
    else REJECTED, so a failed release cannot come back under another spelling. The version the board
    installs as is the signed VERSION in the archive; the document's (unsigned) version, if any, must equal it."""
    w = world
    b = w.boot()
    b.wait_for(r"connected as " + THING, 90)
    boots = b.boots

    def doc(version: str | None, signed: bytes) -> dict:
        d = w.ota_doc(version or "0.0.0", w.release("2.0.0", extra={"VERSION": signed}))
        if version is None:
            del d["version"]
        return d

    canonical = "MAJOR.MINOR.PATCH"
    cases = [
        ("two-parts", doc("6.0", b"6.0\n"), canonical),
        ("leading-zero", doc("06.0.0", b"06.0.0\n"), canonical),
        ("arabic-indic-digit", doc("\u0666.0.0", "\u0666.0.0\n".encode()), canonical),
        ("newline", doc("9.0.0\n", b"9.0.0\n"), canonical),
        ("four-parts", doc("1.2.3.4", b"1.2.3.4\n"), canonical),
        ("space", doc(" 3.0.0", b" 3.0.0\n"), canonical),
        ("not-a-string", doc(None, b"3.0.0\n") | {"version": 3}, canonical),
        # No version in the document: the signed VERSION alone decides, and is held to the same rules.
        ("signed-four-parts", doc(None, b"3.0.0.0\n"), canonical),
        ("signed-leading-zero", doc(None, b"03.0.0\n"), canonical),
        ("signed-two-lines", doc(None, b"3.0.0\n\n"), canonical),
        ("signed-not-newer", doc(None, b"1.0.0\n"), "not newer"),
        ("document-disagrees", doc("3.0.0", b"3.0.1\n"), "VERSION"),
    ]
    for job_id, d, reason in cases:
        ex = w.run_job(job_id, d, "REJECTED", timeout=45)
        assert reason in ex["statusDetails"]["reason"], (job_id, ex)
        assert w.app_version() == "1.0.0" and not (w.flash / "app.new").exists(), job_id
    assert b.boots == boots, "a refused update must not reset the board"
    # A document without a version: the release installs as its signed VERSION, compared as numbers.
    ex = w.run_job("unlabelled", doc(None, b"10.0.0\n"), "SUCCEEDED", timeout=120)
    assert ex["statusDetails"]["version"] == "10.0.0" and w.app_version() == "10.0.0", ex
    ex = w.run_job("numeric", doc("9.9.9", b"9.9.9\n"), "REJECTED")
    assert "not newer" in ex["statusDetails"]["reason"], ex


JOB_RECORD = """
import json, os, store, agent

class Board:
    def sync(self):
        pass

class Agent(agent.Agent):
    thing = "gw-1"

    def __init__(self):
        self.board, self.job = Board(), None

    async def request(self, c, topic, body, reply=None):
        raise agent.Refused("the cut comes before the cloud hears")

os.mkdir("w")
os.chdir("w")
os.mkdir("state")
store.save(Board(), agent.JOBS, {"job-%d" % i: ["SUCCEEDED", {}] for i in range(2, 10)})
asyncio.run(Agent().finish(None, "job-10", "SUCCEEDED", {}))
print(json.dumps(sorted(store.load(agent.JOBS))))
"""


def test_the_outcome_of_the_job_just_finished_is_kept(tmp_path):
    """The board records a job's outcome before telling the cloud, so that a job handed out again after a
    power cut gets the same answer instead of running twice (a second update or rotation). The record keeps
    the last 8 jobs; the one just finished must never be the one it forgets."""
    r = run_unix(JOB_RECORD, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    kept = json.loads(r.stdout.strip().splitlines()[-1])
    assert "job-10" in kept and len(kept) == 8, kept


def test_no_tls_before_the_clock_is_set(tmp_path):
    """The RTC starts in 2000. Untrustworthy SNTP answers (unsynchronised server, a time before this
    software was built, silence) keep the board off the network; a good answer lets it on."""
    from localcloud.ntp import NtpResponder

    ntp = NtpResponder(mode="good", stratum=0)
    w = MpWorld(tmp_path, ntp=ntp)
    try:
        b = w.boot()
        b.wait_for(r"clock: no trustworthy SNTP answer", 30)
        ntp.set(stratum=2, skew_s=-20 * 365 * 86400)
        n = ntp.requests
        b.wait_for(r"clock: no trustworthy SNTP answer", 30, after=len(b.lines))
        assert ntp.requests > n
        ntp.set(mode="silent", skew_s=0)
        b.wait_for(r"clock: no trustworthy SNTP answer", 30, after=len(b.lines))
        assert "provisioned" not in b.text() and not (w.flash / "state" / "prov.json").exists()
        assert not (w.flash / "id").exists(), "no key before the clock is trusted"
        ntp.set(mode="good")
        b.wait_for(r"clock set from SNTP", 30)
        b.wait_for(r"provisioned as " + THING, 60)
        b.wait_for(r"connected as " + THING, 30)
    finally:
        w.close()


LOADER_CASES = """
import os, json, loader

class Board:
    def sync(self):
        pass

    def cut(self, name):
        pass

def rm(p):
    try:
        if os.stat(p)[0] & 0x4000:
            for n in os.listdir(p):
                rm(p + "/" + n)
            os.rmdir(p)
        else:
            os.remove(p)
    except OSError:
        pass

def slot(name, version):
    os.mkdir(name)
    with open(name + "/VERSION", "w") as f:
        f.write(version)

def version(name):
    try:
        with open(name + "/VERSION") as f:
            return f.read()
    except OSError:
        return None

out = {}
top = os.getcwd()
for case in PARAMS["cases"]:
    os.chdir(top)
    d = case["name"]
    os.mkdir(d)
    os.chdir(d)
    os.mkdir("state")
    for name, v in case["slots"].items():
        slot(name, v)
    with open("state/boot.json", "w") as f:
        f.write(json.dumps(case["boot"]))
    st = loader.decide(Board())
    out[case["name"]] = {"state": st.get("state"), "boots": st.get("boots"),
                         "slots": {n: version(n) for n in ("app", "app.new", "app.old", "app.broken") if version(n)},
                         "saved": json.load(open("state/boot.json")).get("state")}
print(json.dumps(out))
"""


def test_loader_finishes_a_swap_or_rollback_cut_at_any_step(tmp_path):
    """Power cut between any two steps of the swap or the rollback: the next boot runs exactly one
    release, the right one, and the boot state says which (checked on the interpreter's file system)."""
    import json as _json

    pending = {"state": "pending", "version": "2", "job": "j", "from": "1"}
    trial = {"state": "trial", "version": "2", "job": "j", "from": "1", "boots": 1}
    cases = [
        # swap: nothing done yet / cut after app -> app.old / cut after app.new -> app (state not yet trial)
        ("swap-start", {"app": "1", "app.new": "2"}, pending, "trial", {"app": "2", "app.old": "1"}),
        ("swap-half", {"app.old": "1", "app.new": "2"}, pending, "trial", {"app": "2", "app.old": "1"}),
        ("swap-done", {"app": "2", "app.old": "1"}, pending, "trial", {"app": "2", "app.old": "1"}),
        # first boot of the release on trial: it runs
        ("trial-first", {"app": "2", "app.old": "1"}, {**trial, "boots": 0}, "trial", {"app": "2", "app.old": "1"}),
        # it did not commit: roll back; cut after app -> app.broken; cut after app.old -> app
        ("rollback-start", {"app": "2", "app.old": "1"}, trial, "rolledback", {"app": "1"}),
        ("rollback-half", {"app.broken": "2", "app.old": "1"}, trial, "rolledback", {"app": "1"}),
        ("rollback-done", {"app.broken": "2", "app": "1"}, trial, "rolledback", {"app": "1"}),
        ("idle", {"app": "1"}, {}, None, {"app": "1"}),
    ]
    r = run_unix(LOADER_CASES, tmp_path, {"cases": [{"name": c[0], "slots": c[1], "boot": c[2]} for c in cases]})
    assert r.returncode == 0, r.stdout + r.stderr
    got = _json.loads(r.stdout.strip().splitlines()[-1])
    for name, _slots, _boot, state, slots in cases:
        assert got[name]["state"] == state, (name, got[name])
        assert got[name]["slots"] == slots, (name, got[name])
        if state:
            assert got[name]["saved"] == state, (name, got[name])


def test_keepalive_and_reconnect_with_backoff(tmp_path):
    """PINGREQ keeps an idle session up (mosquitto drops a client silent for 1.5 keepalives); a broker
    that stops answering is noticed by the missing PINGRESP, and the board reconnects with backoff
    once it is back."""
    import os
    import signal
    import time

    w = MpWorld(tmp_path, config={"keepalive": 2})
    try:
        b = w.boot()
        b.wait_for(r"connected as " + THING, 90)
        mark = len(b.lines)
        time.sleep(8)  # 4 keepalive periods with nothing to say
        assert "session ended" not in "\n".join(b.lines[mark:]), b.text()[-2000:]
        pid = w.cloud._mosquitto_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            b.wait_for(r"session ended: no answer to PINGREQ", 20, after=mark)
            time.sleep(3)  # reconnect attempts meet a broker that does not answer
        finally:
            os.kill(pid, signal.SIGCONT)
        i = b.wait_for(r"session ended", 5, after=mark)
        b.wait_for(r"connected as " + THING, 60, after=i)
    finally:
        w.close()


def test_a_reset_that_returns_never_provisions_twice(world):
    """Bug 5: on a port where board.reset() does not reset (the unix port has no machine.reset(), so the
    shipped board.py raises), the agent carried on in its provisioning loop. Now it restarts in-process
    (loader.Restart) on the identity it saved: one certificate in the cloud, whatever reset() does, and
    the later flows that reset (a staged update, a rotation) finish the same way."""
    w = world
    b = w.boot(max_boots=1, params={"reset": "real"})
    b.wait_for(r"connected as " + THING, 60)
    b.wait_for(r"defender report \d+ accepted", 30)
    assert b.count(r"reset failed: AttributeError") == 1 and b.count(r"loader: restarting in-process") == 1
    assert b.count(r"provisioned as ") == 1, b.text()[-3000:]
    active = [c for c in w.cloud.registry.certificates() if c.status == "ACTIVE" and not c.cn.startswith("claim-")]
    assert len(active) == 1 and active[0].id == w.identity()["cert_id"], active
    ex = w.run_job("ota-noreset", w.ota_doc("1.1.0", w.release("1.1.0")), "SUCCEEDED", timeout=120)
    assert ex["statusDetails"]["version"] == "1.1.0" and w.app_version() == "1.1.0", ex
    old = w.identity()
    w.run_job("rotate-noreset", {"operation": "rotate-certificate"}, "SUCCEEDED", timeout=120)
    status = {c.id: c.status for c in w.cloud.registry.certificates()}
    assert status[old["cert_id"]] == "INACTIVE" and status[w.identity()["cert_id"]] == "ACTIVE", status
    assert b.boots == 1 and b.count(r"loader: restarting in-process") == 3, b.text()[-3000:]
