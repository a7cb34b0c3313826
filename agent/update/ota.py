"""Signed OTA updates as a write-ahead state machine over the release slots of `agent.install`.

Every step is recorded in the state file before its effect, so a power cut at any point resumes or
undoes cleanly when the job comes back (AWS hands an IN_PROGRESS execution out again):

    accepted    checks that need no bytes passed (size limit, version, not broken); download next
    downloaded  the whole artifact is on disk; verify next (sha256, signature, version inside)
    verified    a verified artifact waits to be staged
    activating  releases/<version> staged, links about to switch; `from_*` records the old links
    trial       (self-update) links switched and the agent restarted into the new release, which
                must reconnect and confirm before the deadline (iot-agent-launch enforces it)
    committed   the new release is good; the job's result is recorded in `done`

An install interrupted in `activating` is undone at start-up (links restored, the release dropped),
so no half-installed version is ever left running. A job whose result is in `done` gets the same
answer again without doing anything: a repeated execution is never installed twice.

What an update installs AS (target, version) comes from signed bytes only: a schema 2 document's
manifest (agent.manifest), or for legacy documents the VERSION and TARGET files inside a signed tar.
Each outcome is ONE state write (`done` with `installed` or `broken`, or a `rolling_back` record);
the file work after it (prune, partial files, the helper's answer) is idempotent and redone at
start-up from that record.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tarfile

from agent.base import durable
from agent.base.config import Config
from agent.base.digest import sha256
from agent.base.machine import Machine, State
from agent.base.pemfile import read_regular_file
from agent.jobs.engine import Outcome
from agent.update import install, manifest
from agent.update.config import OtaTargetConfig
from agent.update.download import DownloadError, https_download
from agent.update.otadoc import DocumentError, UpdateSpec, parse
from agent.update.release import clear_trial, read_trial, write_trial
from agent.update.signing import load_pinned_key, sha256_file, verify_digest
from agent.update.streamdl import StreamDownload
from agent.update.versions import VersionError, installed_key, parse_version

log = logging.getLogger("agent.ota")

MAX_DONE = 200
OUTAGE_WAIT_S = 600.0  # a stream download waits this long for the broker to come back
OUTAGE_RETRIES = 20  # resumptions after broker outages, on top of ota.download_attempts


class Refused(Exception):
    """The update is not acceptable: REJECTED, nothing installed."""


class Failed(Exception):
    """The update could not be done now: FAILED, nothing installed."""


LEGACY_UNBOUND = (
    "a legacy update (schema 1 or afr_ota) binds no version or target: its artifact must be a tar "
    "with VERSION and TARGET files (signed with it), or send a schema 2 document (signed manifest); "
    "ota.insecure_trust_version_labels accepts the document's unsigned labels"
)


def _small_member(tar: tarfile.TarFile, name: str) -> str | None:
    for candidate in (name, "./" + name):
        try:
            m = tar.getmember(candidate)
        except KeyError:
            continue
        if not m.isfile() or m.size > 80:
            raise Refused(f"{name} in the artifact is not a small regular file")
        member = tar.extractfile(m)
        assert member is not None  # None only for what is not a regular file, refused above
        raw = member.read()
        text = raw[:-1] if raw.endswith(b"\n") else raw
        try:
            return text.decode("ascii")
        except UnicodeDecodeError:
            raise Refused(f"{name} in the artifact is not ASCII") from None
    return None


def release_labels_in_tar(path: Path) -> tuple[str | None, str | None]:
    """(VERSION, TARGET) at the top of a tar artifact, signed with it; None where absent."""
    import tarfile  # only while an update is checked (about 1 MiB resident)

    try:
        with tarfile.open(path) as tar:
            version, target = _small_member(tar, "VERSION"), _small_member(tar, "TARGET")
    except tarfile.TarError as e:
        raise Refused(f"artifact is not a tar archive: {str(e)[:100]}") from None
    if version is not None:
        try:
            parse_version(version)
        except VersionError as e:
            raise Refused(f"VERSION in the artifact: {e}") from None
    if target is not None and not manifest.TARGET_RE.fullmatch(target):
        raise Refused("TARGET in the artifact is not a plain name")
    return version, target


def version_in_tar(path: Path) -> str | None:
    return release_labels_in_tar(path)[0]


def _answer_seq(entry: list) -> int:
    """The order a recorded answer was given in (records from before the counter count as oldest)."""
    return entry[2] if len(entry) > 2 and isinstance(entry[2], int) else 0


# The install of one job (`ota.active` in the state file): the record names the phase before its effect.
INSTALL = Machine(
    "OTA install",
    State(
        "accepted",
        "the artifact is downloaded (HTTPS, or an MQTT stream; a partial download resumes)",
        ("downloaded",),
        "resumes the download",
    ),
    State(
        "downloaded",
        "the signature and the signed manifest are checked; the version and target come from signed bytes only",
        ("verified",),
        "verifies again",
    ),
    State(
        "verified",
        "the release is staged in releases/<version>; a privileged target is handed to the root helper instead",
        ("activating", "handed_over"),
        "stages again (a half-staged release is pruned)",
    ),
    State(
        "activating",
        "the links switch (current, previous); then the health check, or the restart of a self-update",
        ("trial", "committed", "rolling_back", "verified"),
        "restores the links the record saved, back to `verified`",
    ),
    State(
        "trial",
        "the agent restarts into the new release (iot-agent-launch); it confirms once connected",
        ("committed", "rolling_back"),
        "the new release confirms; anything else rolls back",
    ),
    State(
        "handed_over",
        "iot-agent-install verifies everything again and installs; its answer is awaited",
        (),
        "waits for the helper's answer again (the spool files say where the hand-over is)",
    ),
    State("committed", "the installed version is recorded; the job's SUCCEEDED answer follows", (), "answers the job"),
    State(
        "rolling_back",
        "ONE write records the broken version and the job's FAILED answer; the links are "
        "restored and the release pruned",
        (),
        "restores and prunes again, then answers",
    ),
    start=("accepted",),
    end="the job's answer, with what it changed (installed or broken), recorded in ONE write; files removed after",
)


@dataclass(eq=False)
class OtaHandler:
    """The `ota-update` job handler (our schema and afr_ota documents)."""

    cfg: Config
    load: Callable[[], dict]  # the "ota" part of the state
    save: Callable[[dict], object]  # what it returns (StateStore.update's new state) is unused
    thing: str
    publish: Callable[[str, bytes], int]
    subscribe: Callable[[str], int]
    request_restart: Callable[[], None] = lambda: None
    running_release: str | None = None
    connected: Callable[[], bool] = lambda: True  # the MQTT connection (stream downloads need it)
    _stream: StreamDownload | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        o = self.cfg.ota
        self.pinned = load_pinned_key(self.cfg.resolve(o.code_signing_certificate))
        self.work = self.cfg.resolve(self.cfg.device.state_dir) / "ota"
        self.work.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.targets = {n: t for n, t in o.targets.items()}

    # -- state ------------------------------------------------------------------------------------
    def _state(self) -> dict:
        st = dict(self.load())
        st.setdefault("installed", {})
        st.setdefault("broken", {})
        st.setdefault("done", {})
        return st

    def _put(self, **changes: Any) -> dict:
        with self._lock:
            st = self._state()
            for k, v in changes.items():
                if v is None:
                    st.pop(k, None)
                else:
                    st[k] = v
            self.save(st)
            return st

    def _set_phase(self, active: dict, phase: str, **extra: Any) -> dict:
        INSTALL.move(active.get("phase"), phase)
        active = {**active, "phase": phase, **extra}
        self._put(active=active)
        return active

    @staticmethod
    def _key(job_id: str) -> str:
        """A job's file names in the work folder and the spool (job ids are network text: never a path)."""
        return sha256(job_id.encode()).hexdigest()[:24]

    def target_dir(self, name: str) -> Path:
        return self.cfg.resolve(self.targets[name].directory)

    def installed_version(self, name: str) -> str | None:
        return self._state()["installed"].get(name) or install.slot(self.target_dir(name), "current")

    # -- start-up ---------------------------------------------------------------------------------
    def recover(self) -> None:
        """At start-up, redo from the state record what a power cut may have left undone: undo an install
        cut between staging and a proven release, finish a roll-back, close a trial already committed,
        and drop what no record points at (unlinked releases, partial downloads)."""
        st = self._state()
        a = st.get("active")
        if a and a.get("target") in self.targets:
            tdir = self.target_dir(a["target"])
            if a["phase"] == "activating":
                install.restore(tdir, a.get("from_current"), a.get("from_previous"))
                install.prune(tdir)
                self._set_phase(a, "verified")
                log.warning(
                    "update to %s %s was interrupted while switching; the previous release is restored and "
                    "the install resumes with the job",
                    a["target"],
                    a["version"],
                )
            elif a["phase"] == "rolling_back":
                self._finish_roll_back(a)
        for name, t in self.targets.items():
            tdir = self.target_dir(name)
            trial = read_trial(tdir) if t.self_update else None
            if (
                trial
                and trial.get("state") == "trial"
                and self._state()["installed"].get(name) == trial.get("version")
                and install.slot(tdir, "current") == trial.get("version")
            ):
                clear_trial(tdir)  # committed before the cut: the launcher must not roll it back
            if not t.privileged and tdir.is_dir():
                install.prune(tdir)
        keep = set()
        st = self._state()
        a = st.get("active")
        if a:
            keep = {Path(a["partial"]).name, Path(a["partial"]).name + ".blocks"}
        spool = self.work / "spool"
        if spool.is_dir():  # the helper's answer to a job whose outcome is recorded has served its purpose
            recorded = {self._key(job_id) for job_id in st["done"]} - ({Path(a["partial"]).stem} if a else set())
            for f in spool.iterdir():
                if f.name.split(".", 1)[0] in recorded and f.is_file():
                    durable.remove(f)
        for f in self.work.iterdir():
            if f.is_file() and f.name not in keep and (f.name.endswith((".part", ".blocks")) or ".tmp" in f.name):
                durable.remove(f)

    def on_stream_message(self, topic: str, payload: bytes) -> None:
        dl = self._stream
        if dl is not None and topic.startswith(dl.base + "/"):
            dl.on_message(topic, payload)

    # -- the job ----------------------------------------------------------------------------------
    def __call__(self, job_id: str, doc: Any, progress: Callable[[dict[str, str]], None]) -> Outcome:
        st = self._state()
        if job_id in st["done"]:
            status, details = st["done"][job_id][:2]
            return Outcome(status, details)  # a repeat of a finished job: the same answer, nothing done again
        active = st.get("active")
        if active and active.get("job_id") != job_id:
            self._abandon(active)
            active = None
        try:
            spec = parse(doc)
            if spec.source == "signed":
                spec = self._verified_manifest(spec)
            target = self._target_for(spec)
            if active is None:
                active = self._accept(job_id, spec, target)
            return self._run(active, spec, progress)
        except DocumentError as e:
            return self._finish(job_id, "REJECTED", {"reason": str(e)}, None)
        except Refused as e:
            return self._finish(job_id, "REJECTED", {"reason": str(e)}, self._state().get("active"))
        except Failed as e:
            return self._finish(job_id, "FAILED", {"reason": str(e)}, self._state().get("active"))

    def _verified_manifest(self, spec: UpdateSpec) -> UpdateSpec:
        """Schema 2: the manifest's signature first; then its fields are the update's facts."""
        import dataclasses

        assert spec.manifest is not None  # parse() gives every schema 2 document its manifest's bytes
        try:
            m = manifest.verify(self.pinned, spec.manifest, spec.signature)
        except manifest.ManifestError as e:
            raise Refused(str(e)) from None
        return dataclasses.replace(
            spec, target=m.target, version=m.version, name=m.name, size=m.size, sha256=m.sha256, bound=True
        )

    def _target_for(self, spec: UpdateSpec) -> str:
        if spec.source in ("our", "signed"):
            if spec.target is None or spec.target not in self.targets:
                raise Refused(
                    f"unknown update target {spec.target!r} (targets on this device: "
                    f"{', '.join(sorted(self.targets)) or 'none'})"
                )
            return spec.target
        for name, t in self.targets.items():
            if t.afr_ota_filepath and t.afr_ota_filepath == spec.filepath:
                return name
        raise Refused(f"no update target takes afr_ota file {spec.filepath!r} (set afr_ota_filepath on a target)")

    def _check_version(self, target: str, version: str) -> None:
        """`version` is canonical (one spelling per version), so the broken list cannot be sidestepped."""
        try:
            key = parse_version(version)
        except VersionError as e:
            raise Refused(str(e)) from None
        st = self._state()
        broken = set(st["broken"].get(target, [])) | {install.slot(self.target_dir(target), "broken")}
        if version in broken:
            raise Refused(f"version {version} of {target} failed on this device before; it is not retried")
        cur = self.installed_version(target)
        if cur is None:
            return
        try:
            cur_key = installed_key(cur)
        except VersionError as e:
            raise Refused(str(e)) from None
        if key + (0,) == cur_key:
            raise Refused(f"version {version} of {target} is already installed (a replayed or repeated update)")
        if key + (0,) < cur_key and not self.cfg.ota.insecure_allow_downgrade:
            raise Refused(
                f"downgrade of {target} from {cur} to {version} refused (ota.insecure_allow_downgrade is off)"
            )

    def _accept(self, job_id: str, spec: UpdateSpec, target: str) -> dict:
        o = self.cfg.ota
        if spec.size > o.max_artifact_bytes:
            raise Refused(f"artifact of {spec.size} bytes exceeds ota.max_artifact_bytes ({o.max_artifact_bytes})")
        if spec.version:  # bound by a manifest, or a legacy label checked again against the signed VERSION
            self._check_version(target, spec.version)
        st = os.statvfs(self.work)
        free = st.f_bavail * st.f_frsize  # what shutil.disk_usage calls free
        if free < spec.size * 2 + (16 << 20):
            raise Failed(f"not enough disk space: {free} bytes free, the update needs {spec.size * 2} plus a margin")
        key = self._key(job_id)
        active = {
            "job_id": job_id,
            "target": target,
            "version": spec.version,
            "phase": "accepted",
            "partial": str(self.work / f"{key}.part"),
        }
        INSTALL.move(None, "accepted")
        self._put(active=active)
        log.info("job %s: update of %s to %s accepted", job_id, target, spec.version or "(version in artifact)")
        return active

    def _run(self, a: dict, spec: UpdateSpec, progress) -> Outcome:
        t = self.targets[a["target"]]
        for _ in range(8):  # each phase moves forward; bounded in case of a corrupt record
            phase = a["phase"]
            if phase == "accepted":
                self._download(a, spec, progress)
                a = self._set_phase(a, "downloaded")
            elif phase == "downloaded":
                progress({"step": "verifying", "version": str(a.get("version"))})
                a = self._set_phase(a, "verified", version=self._verify(a, spec, t))
            elif phase == "verified":
                out = self._install(a, spec, t, progress)
                if out is not None:
                    return out
                a = self._state()["active"]
            elif phase == "activating":  # only without recover() (tests); undo and install again
                self.recover()
                a = self._state()["active"]
            elif phase == "trial":
                return self._confirm(a, t)
            elif phase == "handed_over":
                return self._await_helper(a)
            elif phase == "rolling_back":
                return self._finish_roll_back(a)
            elif phase == "committed":
                return self._finish(
                    a["job_id"], "SUCCEEDED", {"result": "installed", "target": a["target"], "version": a["version"]}, a
                )
            else:
                raise Failed(f"unknown install phase {phase!r} in the state file")
        raise Failed("the install made no progress")

    def _wait_connected(self, limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while not self.connected():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    # -- steps -----------------------------------------------------------------------------------
    def _download(self, a: dict, spec: UpdateSpec, progress) -> None:
        partial = Path(a["partial"])
        last = [-1]

        def report(done: int, total: int) -> None:
            pct = done * 100 // max(total, 1)
            if pct // 10 != last[0] // 10:
                last[0] = pct
                progress({"step": "downloading", "progress": f"{pct}%", "version": str(a.get("version"))})

        delay, why, attempt = 0.5, "", 0
        for _ in range(self.cfg.ota.download_attempts + OUTAGE_RETRIES):
            if spec.stream_id and not self._wait_connected(OUTAGE_WAIT_S):
                raise Failed(f"download failed: no broker connection for {OUTAGE_WAIT_S:g} s")
            attempt += 1
            if attempt > self.cfg.ota.download_attempts:
                break
            try:
                if spec.url:
                    https_download(
                        spec.url,
                        partial,
                        spec.size,
                        ca_file=self.cfg.resolve(self.cfg.ota.ca_file) if self.cfg.ota.ca_file else None,
                        progress=report,
                    )
                else:
                    # No URL: parse() gave the document a stream and a file id instead.
                    assert spec.stream_id is not None and spec.file_id is not None
                    self._stream = StreamDownload(
                        self.thing,
                        spec.stream_id,
                        spec.file_id,
                        partial,
                        spec.size,
                        publish=self.publish,
                        subscribe=self.subscribe,
                        progress=report,
                    )
                    try:
                        self._stream.run()
                    finally:
                        self._stream = None
                return
            except DownloadError as e:
                why = str(e)
                if why.startswith("size mismatch"):
                    raise Refused(why) from None  # the artifact is not the one the signed document describes
                if "refused" in why or why.startswith("only https"):
                    raise Failed(why) from None  # expired URL, missing stream: trying again cannot help
                if spec.stream_id and not self.connected():
                    attempt -= 1  # the broker went away: a resumed download after the reconnect is not a new try
                    log.warning("job %s: stream download paused while the broker is unreachable (%s)", a["job_id"], why)
                    continue
                log.warning("job %s: download attempt %d: %s", a["job_id"], attempt, why)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            except Exception as e:  # a publish or subscribe that failed with the connection (stream downloads)
                if not spec.stream_id:
                    raise
                why = f"{e.__class__.__name__}: {str(e)[:120]}"
                if not self.connected():
                    attempt -= 1
                    log.warning("job %s: stream download paused while the broker is unreachable (%s)", a["job_id"], why)
                    continue
                log.warning("job %s: download attempt %d: %s", a["job_id"], attempt, why)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise Failed(f"download failed after {self.cfg.ota.download_attempts} attempts: {why}")

    def _verify(self, a: dict, spec: UpdateSpec, t: OtaTargetConfig) -> str:
        """The version to install as, from signed bytes only; Refused for anything that does not hold."""
        path = Path(a["partial"])
        if not path.is_file() or path.stat().st_size != spec.size:
            raise Refused("downloaded artifact has the wrong size")
        digest = sha256_file(path)
        if spec.bound:
            if digest.hex() != spec.sha256:
                raise Refused("artifact sha256 does not match the signed manifest (tampered or corrupted)")
        else:
            if spec.sha256 is not None and digest.hex() != spec.sha256:
                raise Refused("artifact sha256 does not match the job document (tampered or corrupted)")
            if not verify_digest(self.pinned, digest, spec.signature):
                raise Refused("signature does not verify with the pinned code-signing certificate")
        log.info("job %s: signature verified (sha256 %s)", a["job_id"], digest.hex()[:16])
        inside, inside_target = release_labels_in_tar(path) if t.unpack else (None, None)
        if inside_target is not None and inside_target != a["target"]:
            raise Refused(f"the artifact is a release of {inside_target!r}, not of {a['target']!r}")
        if spec.bound:
            assert spec.version is not None  # bound: it is the verified manifest's version
            if inside is not None and inside != spec.version:
                raise Refused(
                    f"VERSION inside the artifact ({inside}) differs from the signed manifest ({spec.version})"
                )
            version = spec.version
        elif inside is not None and (inside_target is not None or self.cfg.ota.insecure_trust_version_labels):
            if spec.version is not None and inside != spec.version:
                raise Refused(f"VERSION inside the artifact ({inside}) differs from the job's version ({spec.version})")
            version = inside
        elif self.cfg.ota.insecure_trust_version_labels and spec.version is not None:
            log.warning(
                "job %s: installing under the document's unsigned version label %s (ota.insecure_trust_version_labels)",
                a["job_id"],
                spec.version,
            )
            version = spec.version
        else:
            raise Refused(LEGACY_UNBOUND)
        self._check_version(a["target"], version)
        return version

    def _install(self, a: dict, spec: UpdateSpec, t: OtaTargetConfig, progress) -> Outcome | None:
        tdir = self.target_dir(a["target"])
        version = a["version"]
        progress({"step": "installing", "version": version})
        if t.privileged:
            return self._hand_over(a, spec)
        tdir.mkdir(parents=True, exist_ok=True)
        try:
            release = install.stage(tdir, version, Path(a["partial"]), spec.name, t.unpack)
        except install.InstallError as e:
            raise Refused(str(e)) from None
        a = self._set_phase(
            a, "activating", from_current=install.slot(tdir, "current"), from_previous=install.slot(tdir, "previous")
        )
        install.activate(tdir, version)
        if t.self_update:
            deadline = time.time() + self.cfg.ota.self_update_deadline_s
            write_trial(
                tdir,
                {
                    "state": "trial",
                    "version": version,
                    "from_current": a["from_current"],
                    "from_previous": a["from_previous"],
                    "deadline": deadline,
                    "attempts": 0,
                },
            )
            self._set_phase(a, "trial", deadline=deadline)
            log.info(
                "job %s: restarting into %s %s; it must confirm within %g s",
                a["job_id"],
                a["target"],
                version,
                self.cfg.ota.self_update_deadline_s,
            )
            self.request_restart()
            return Outcome("IN_PROGRESS", {"step": "restarting", "version": version})
        progress({"step": "health check", "version": version})
        healthy, reason = install.health_check(t.health_command, release, t.health_timeout_s)
        if not healthy:
            return self._roll_back(a, tdir, reason)
        self._commit(a, tdir)
        return None

    # -- privileged targets (agent.update.privileged does the install) --------------------------------------
    def _spool(self) -> Path:
        d = self.work / "spool"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def _request_for(self, a: dict, spec: UpdateSpec) -> dict:
        """What the root helper needs to check everything again from signed bytes."""
        req = {
            "job_id": a["job_id"],
            "target": a["target"],
            "name": spec.name,
            "signature": base64.b64encode(spec.signature).decode(),
        }
        if spec.bound:
            assert spec.manifest is not None  # bound: the version and target come from this signed manifest
            req["manifest"] = base64.b64encode(spec.manifest).decode()
        elif a.get("version"):
            req["version_label"] = a["version"]  # honoured only under the helper's own insecure switch
        return req

    def _hand_over(self, a: dict, spec: UpdateSpec) -> Outcome:
        """Idempotent: every step is re-derived from what is on disk, so a cut anywhere is finished here.
        A result the helper already wrote is never deleted before its outcome is recorded."""
        key = Path(a["partial"]).stem
        spool = self._spool()
        if not (spool / f"{key}.result.json").exists():
            if Path(a["partial"]).exists():
                durable.replace(Path(a["partial"]), spool / f"{key}.artifact")
            if (spool / f"{key}.artifact").exists() and not (spool / f"{key}.claimed.json").exists():
                durable.write_json(spool / f"{key}.request.json", self._request_for(a, spec), 0o644)
        a = self._set_phase(a, "handed_over", handed_at=a.get("handed_at") or time.time())
        log.info("job %s: %s %s handed to iot-agent-install", a["job_id"], a["target"], a["version"])
        return self._await_helper(a)

    def _read_result(self, path: Path) -> dict | None:
        try:
            raw = read_regular_file(path, 16 * 1024)
            doc = json.loads(raw)
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def _await_helper(self, a: dict) -> Outcome:
        key = Path(a["partial"]).stem
        spool = self._spool()
        result_path = spool / f"{key}.result.json"
        limit = self.cfg.ota.privileged_timeout_s
        deadline = float(a.get("handed_at", time.time())) + limit
        result = None
        while result is None:
            result = self._read_result(result_path)
            if result is not None:
                break
            if time.time() > deadline:
                try:  # withdraw the request, unless the helper has claimed it (then it answers)
                    os.rename(spool / f"{key}.request.json", spool / f".{key}.withdrawn")  # durable: test-and-take
                except FileNotFoundError:
                    if (spool / f"{key}.claimed.json").exists() and time.time() < deadline + limit:
                        time.sleep(0.25)
                        continue
                durable.remove(spool / f".{key}.withdrawn")
                durable.remove(spool / f"{key}.artifact")
                return self._finish(
                    a["job_id"],
                    "FAILED",
                    {
                        "reason": f"iot-agent-install did not answer within "
                        f"{limit:g} s (is its systemd path unit enabled?)"
                    },
                    a,
                )
            time.sleep(0.25)
        said = result.get("status")
        status = said if isinstance(said, str) and said in ("SUCCEEDED", "FAILED", "REJECTED") else "FAILED"
        reason = str(result.get("reason", ""))[:500]
        version = result.get("version")
        st = self._state()
        if status == "SUCCEEDED" and (
            result.get("target") != a["target"]
            or not isinstance(version, str)
            or (a.get("version") and version != a["version"])
        ):
            status, reason = "FAILED", "iot-agent-install reported another release than the one handed over"
        if status == "SUCCEEDED" and isinstance(version, str):  # it is a str: checked just above
            out = self._finish(
                a["job_id"],
                status,
                {"result": "installed", "target": a["target"], "version": version, "by": "iot-agent-install"},
                a,
                installed={**st["installed"], a["target"]: version},
            )
        elif reason.startswith("rolled back") and isinstance(version, str):
            out = self._finish(
                a["job_id"],
                status,
                {"reason": f"iot-agent-install: {reason}"},
                a,
                broken={**st["broken"], a["target"]: sorted(set(st["broken"].get(a["target"], [])) | {version})},
            )
        else:
            out = self._finish(a["job_id"], status, {"reason": f"iot-agent-install: {reason}"}, a)
        for suffix in (".claimed.json", ".request.json", ".artifact", ".result.json"):  # claim before answer:
            durable.remove(spool / f"{key}{suffix}")  # agent.privileged.recover relies on it
        return out

    def _confirm(self, a: dict, t: OtaTargetConfig) -> Outcome:
        """Run by the agent after a self-update restart, once connected and taking jobs."""
        tdir = self.target_dir(a["target"])
        trial = read_trial(tdir) or {}
        if self.running_release == a["version"] and trial.get("state") != "rolled_back":
            healthy, reason = install.health_check(
                t.health_command, tdir / "releases" / a["version"], t.health_timeout_s
            )
            if not healthy:
                return self._roll_back(a, tdir, reason, restart=True)
            self._commit(a, tdir)
            clear_trial(tdir)
            return self._finish(
                a["job_id"],
                "SUCCEEDED",
                {"result": "installed", "target": a["target"], "version": a["version"]},
                self._state()["active"],
            )
        reason = (
            str(trial.get("reason"))  # the launcher's words (it writes a str): only ever formatted into text
            if trial.get("state") == "rolled_back"
            else (
                f"the agent did not restart into {a['version']} "
                f"(running {self.running_release or 'the base install'}); "
                "is it started by iot-agent-launch?"
            )
        )
        return self._roll_back(a, tdir, reason)

    def _commit(self, a: dict, tdir: Path) -> None:
        st = self._state()
        installed = {**st["installed"], a["target"]: a["version"]}
        INSTALL.move(a.get("phase"), "committed")
        self._put(installed=installed, active={**a, "phase": "committed"})
        install.prune(tdir)
        durable.remove(Path(a["partial"]))
        log.info("job %s: %s %s installed", a["job_id"], a["target"], a["version"])

    def _roll_back(self, a: dict, tdir: Path, reason: str, restart: bool = False) -> Outcome:
        """Record the decision (broken version, the job's FAILED answer, the links to restore) in one
        write; the links, prune and the restart follow from that record, also after a power cut."""
        st = self._state()
        broken = {**st["broken"], a["target"]: sorted(set(st["broken"].get(a["target"], [])) | {a["version"]})}
        why = f"rolled back to {a.get('from_current')}: {reason}"[:1000]
        INSTALL.move(a.get("phase"), "rolling_back")
        a = {
            **a,
            "phase": "rolling_back",
            "outcome": ["FAILED", {"reason": why, "version": a["version"]}],
            "restart": restart,
        }
        self._put(broken=broken, active=a)
        log.warning(
            "job %s: %s %s rolled back to %s: %s", a["job_id"], a["target"], a["version"], a.get("from_current"), reason
        )
        return self._finish_roll_back(a)

    def _finish_roll_back(self, a: dict) -> Outcome:
        tdir = self.target_dir(a["target"])
        install.restore(tdir, a.get("from_current"), a.get("from_previous"), broken=a["version"])
        install.prune(tdir)
        if self.targets[a["target"]].self_update:
            clear_trial(tdir)
        status, details = a["outcome"]
        out = self._finish(a["job_id"], status, details, a)
        if a.get("restart"):
            self.request_restart()  # the old release must run again
        return out

    def _finish(self, job_id: str, status: str, details: dict[str, str], active: dict | None, **record: Any) -> Outcome:
        """The job's answer, with what it changed (installed or broken), in ONE write; then the files."""
        st = self._state()
        done = dict(st["done"])
        seq = int(st.get("done_seq") or 0) + 1
        done[job_id] = [status, details, seq]
        while len(done) > MAX_DONE:  # the oldest answer goes: the state file keeps its keys sorted, not in order
            done.pop(min(done, key=lambda k: _answer_seq(done[k])))
        self._put(done=done, done_seq=seq, active=None, **record)
        if active and active.get("job_id") == job_id:
            durable.remove(Path(active["partial"]))
            durable.remove(Path(active["partial"] + ".blocks"))
            t = self.targets.get(active.get("target"))
            if active.get("phase") in ("verified", "downloaded", "accepted") and t and not t.privileged:
                install.prune(self.target_dir(active["target"]))
        return Outcome(status, details)

    def _abandon(self, a: dict) -> None:
        """The cloud moved on (job canceled or timed out): drop what that job left behind."""
        log.warning(
            "job %s is no longer ours to finish (canceled?); dropping its update of %s",
            a.get("job_id"),
            a.get("target"),
        )
        if a.get("target") in self.targets:
            tdir = self.target_dir(a["target"])
            if a.get("phase") in ("activating", "trial"):
                if a.get("phase") == "trial" and self.running_release == a.get("version"):
                    self._commit(a, tdir)
                else:
                    install.restore(tdir, a.get("from_current"), a.get("from_previous"))
                clear_trial(tdir)
            install.prune(tdir)
        durable.remove(Path(a["partial"]))
        durable.remove(Path(a["partial"] + ".blocks"))
        self._put(active=None)
