"""The MicroPython board agent's whole lifecycle under the real MicroPython interpreter (WebAssembly, in
Node) against the real mosquitto and local cloud: SNTP clock gate, provisioning by claim with a key
made on the board, Device Defender custom metrics, signed OTA over MQTT streams (commit, refusals,
rollback) and certificate rotation."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from boardkit import BoardProcess, build_app, deploy
from localcloud.cloud import LocalCloud
from localcloud.defender import DefenderStore
from localcloud.jobs import Jobs
from localcloud.ntp import Chrony
from localcloud.streams import Streams
from mpkit import node  # noqa: F401  (fixture: Node and the npm interpreter)
from otakit import CodeSigner, our_doc
from test_jobs_engine import wait_status

SERIAL = "mp-0001"
THING = f"gw-{SERIAL}"


class MpWorld:
    """Local cloud, chrony, a code signer and one factory-fresh board (claim certificate on its flash)."""

    def __init__(self, root: Path, config: dict | None = None, mpy: bool = False):
        self.root = root
        self.cloud = LocalCloud(root / "cloud")
        self.cloud.registry.allow_serials([SERIAL])
        self.info = self.cloud.up()
        self.boards: list[BoardProcess] = []
        try:
            self.ntp = Chrony(root / "chrony").start()
            self.signer = CodeSigner(root / "signer")
            claim_cert, claim_key = self.cloud.issue_claim("mp-factory")
            self.jobs = Jobs(self.cloud.registry.db, self.cloud.registry.lock)
            self.streams = Streams(self.cloud.registry.db, self.cloud.registry.lock, self.cloud.directory / "streams")
            cfg = {"endpoint": "localhost", "port": self.info["port"], "ca": "certs/ca.pem",
                   "claim_cert": "certs/claim.pem", "claim_key": "certs/claim.key", "serial": SERIAL,
                   "template": "iot-agent-fleet", "code_signing_cert": "certs/signer.pem",
                   "ntp": [["127.0.0.1", self.ntp.port]], "keepalive": 20, "self_test_s": 25,
                   "backoff_min_s": 0.5, "backoff_max_s": 2, "block_size": 1024, **(config or {})}
            self.flash = deploy(root / "flash", cfg, {
                "ca.pem": Path(self.info["ca_file"]).read_bytes(), "claim.pem": claim_cert.read_bytes(),
                "claim.key": claim_key.read_bytes(), "signer.pem": self.signer.cert_path.read_bytes()}, mpy=mpy)
            self.n = 0
        except BaseException:
            self.close()
            raise

    def boot(self, max_boots: int = 8) -> BoardProcess:
        b = BoardProcess(self.flash, max_boots=max_boots).start()
        self.boards.append(b)
        return b

    def release(self, version: str, *, patch: dict | None = None, extra: dict[str, bytes] | None = None) -> bytes:
        """A release archive of the board's app, as a vendor's build would make it."""
        d = build_app(self.root / f"release-{version}-{self.n}", version, patch=patch)
        self.n += 1
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for p in sorted(d.iterdir()):
                tar.add(p, arcname=p.name)
            for name, data in (extra or {}).items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    def ota_doc(self, version: str, data: bytes, *, signature: str | None = None, **kw) -> dict:
        self.n += 1
        p = self.root / f"artifact-{self.n}"
        p.write_bytes(data)
        sid = self.streams.create([p], f"mp-ota-{self.n}")
        return our_doc("mpy-app", version, f"app-{version}.tar", data, signature or self.signer.sign(data),
                       stream=(sid, 0), **kw)

    def run_job(self, job_id: str, doc: dict, status: str, timeout: float = 90) -> dict:
        self.jobs.create(job_id, THING, doc)
        try:
            return wait_status(self.jobs, job_id, THING, status, timeout=timeout)
        except AssertionError:
            for b in self.boards:
                print(b.text()[-8000:])
            raise

    def app_version(self) -> str:
        return (self.flash / "app" / "VERSION").read_text().strip()

    def identity(self) -> dict:
        return json.loads((self.flash / "state" / "identity.json").read_text())

    def close(self) -> None:
        for b in self.boards:
            b.stop()
        if getattr(self, "ntp", None):
            self.ntp.stop()
        self.cloud.down()


@pytest.fixture
def world(tmp_path, node):  # noqa: F811
    w = MpWorld(tmp_path)
    yield w
    w.close()


def defender_reports(w: MpWorld) -> list[dict]:
    store = DefenderStore(w.cloud.registry.db, w.cloud.registry.lock)
    return store.reports(THING)


def test_provision_defender_ota_rotation_lifecycle(world):
    w = world
    b = w.boot()
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
    bad = w.release("1.2.0", patch={"agent.py": ("store.read(ident[\"key\"]), self.thing)",
                                                 "store.read(ident[\"key\"]), self.thing + \"-x\")")})
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
    # The new certificate connected (and subscribed) before the cloud was told to drop the old one.
    assert b.wait_for(r"rotation: the new certificate connected") < b.wait_for(r"rotation: SUCCEEDED")
