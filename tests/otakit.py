"""Test helpers for OTA updates: a code-signing key with its certificate, release tarballs, job documents."""

from __future__ import annotations

from pathlib import Path

from cloudkit import wait_status

from agent.update.install import slot
from localcloud.artifacts import Artifacts
from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.jobs import Jobs
from localcloud.ntp import Chrony
from localcloud.streams import Streams
from localcloud.tokens import softhsm_token
from localcloud.vendor import CodeSigner, make_tar, our_doc, signed_doc  # noqa: F401  (re-exported for the tests)

HEALTH = ["sh", "-c", "test -f app.txt && ! grep -q unhealthy app.txt"]
AFR_PATH = "/opt/app/app.tar"


def tar_dir(src: Path, prefix: str, version: str, patch: dict[str, tuple[str, str]] | None = None) -> bytes:
    """A tarball of a source folder (e.g. the agent package) under `prefix/`, with text replacements."""
    files: dict[str, bytes] = {}
    for p in sorted(src.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"):
            rel = p.relative_to(src).as_posix()
            data = p.read_bytes()
            if patch and rel in patch:
                old, new = patch[rel]
                assert old.encode() in data, f"{rel}: {old!r} not found"
                data = data.replace(old.encode(), new.encode())
            files[f"{prefix}/{rel}"] = data
    return make_tar(files, version)


def afr_doc(filepath: str, data: bytes, signature: str, *, url: str | None = None, stream: str | None = None) -> dict:
    f = {
        "filepath": filepath,
        "filesize": len(data),
        "fileid": 0,
        "certfile": "codesign.crt",
        "fileType": 0,
        "sig-sha256-ecdsa": signature,
    }
    if url:
        f["update_data_url"] = url
        return {"afr_ota": {"protocols": ["HTTP"], "files": [f]}}
    return {"afr_ota": {"protocols": ["MQTT"], "streamname": stream, "files": [f]}}


def release(version: str, text: str | None = None, target: str | None = "app") -> bytes:
    """A release tar with VERSION and TARGET inside (what legacy documents need to bind them)."""
    return make_tar(
        {"app.txt": (text or f"app {version}\n").encode(), "bin/run": b"#!/bin/sh\necho hi\n"}, version, target
    )


class World:
    """A local cloud, NTP, a SoftHSM token, a code signer and one factory-fresh device with OTA targets
    (target directories are relative to the device folder)."""

    def __init__(self, root: Path, serial: str, targets: dict[str, dict], ota: dict | None = None):
        self.root = root
        self.cloud = LocalCloud(root / "cloud")
        self.cloud.registry.allow_serials([serial])
        self.info = self.cloud.up()
        self.ntp = Chrony(root / "chrony").start()
        self.token = softhsm_token(root / "softhsm")
        self.signer = CodeSigner(root / "signer")
        self.jobs = Jobs(self.cloud.registry.db, self.cloud.registry.lock)
        self.artifacts = Artifacts.open(self.cloud.directory)
        self.streams = Streams(self.cloud.registry.db, self.cloud.registry.lock, self.cloud.directory / "streams")
        self.app = root / "device" / "app"
        self.blob = root / "device" / "blob"
        targets = {n: {**t, "directory": str(root / "device" / t["directory"])} for n, t in targets.items()}
        try:
            self._enroll(serial, targets, ota)
        except BaseException:
            self.close()  # a fixture that fails here never reaches its teardown: stop what was started
            raise
        self.thing = f"gw-{serial}"
        self.n = 0

    def _enroll(self, serial: str, targets: dict, ota: dict | None) -> None:
        root = self.root
        self.dev = fresh_device(
            self.cloud,
            self.token,
            serial,
            root / "device",
            [self.ntp.server],
            extra={
                "defender": {"enabled": False},
                "log": {"level": "debug"},
                "ota": {
                    "code_signing_certificate": str(self.signer.cert_path),
                    "ca_file": self.info["ca_file"],
                    "max_artifact_bytes": 4 * 1024 * 1024,
                    "download_attempts": 2,
                    "targets": targets,
                    **(ota or {}),
                },
            },
        )

    def file(self, data: bytes) -> Path:
        self.n += 1
        p = self.root / f"artifact-{self.n}"
        p.write_bytes(data)
        return p

    def https(self, data: bytes) -> str:
        p = self.file(data)
        return self.artifacts.put(p, f"ota/{p.name}")

    def stream(self, data: bytes) -> str:
        p = self.file(data)
        return self.streams.create([p], f"ota-{p.name}")

    def signed(self, target: str, version: str, name: str, data: bytes, *, stream: bool = False, **kw) -> dict:
        """A schema 2 document (signed manifest) for `data`, served over HTTPS or an MQTT stream."""
        where = {"stream": (self.stream(data), 0)} if stream else {"url": kw.pop("url", None) or self.https(data)}
        return signed_doc(kw.pop("signer", self.signer), target, version, name, data, **where, **kw)

    def run(self, job_id: str, doc: dict, status: str) -> dict:
        self.jobs.create(job_id, self.thing, doc)
        return self.run_wait(job_id, status)

    def run_wait(self, job_id: str, status: str, timeout: float = 60) -> dict:
        import time as _t

        print(f"{_t.strftime('%H:%M:%S')} created {job_id}")
        try:
            return wait_status(self.jobs, job_id, self.thing, status, timeout=timeout)
        except AssertionError:
            if getattr(self, "agent", None) is not None:
                print(self.agent.text()[-8000:])  # shown by pytest on failure
            raise

    def assert_clean(self, current: str | None, target: Path | None = None) -> None:
        """One good version and nothing half-installed: only linked releases, no partial downloads."""
        target = target or self.app
        assert slot(target, "current") == current
        linked = {slot(target, n) for n in ("current", "previous", "broken")} - {None}
        assert {p.name for p in (target / "releases").iterdir()} == linked
        assert list((self.dev.directory / "state" / "ota").iterdir()) == []

    def close(self) -> None:
        self.token.stop()
        self.ntp.stop()
        self.cloud.down()
