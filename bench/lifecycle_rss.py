"""Memory over a life, not at connect: RSS of `iot-agent run` after provisioning, an update, a rotation and 1,000 jobs.

One real agent process (the console script a user runs, no wrapper: its PID is the one it writes to
state/agent.pid) lives a device's life against the local cloud (localcloud), driven through the cloud's
in-process API only:
  1. factory-fresh, it provisions itself by claim (CreateCertificateFromCsr + RegisterThing) and connects;
  2. it installs a signed update (schema 2 manifest, MQTT file stream) from a job;
  3. it rotates its certificate from a job (new key on the token, new certificate proven, old one inactive);
  4. it takes a warm-up of jobs (--warmup, 100), then --jobs more (1,000): cheap but realistic ones, created
     in batches as an operator would: operations it does not know (REJECTED by the jobs engine), documents
     without an operation, and replays of the signed update (verified, then REJECTED as already installed
     by the OTA handler). Each goes through start-next, the state store, the outbox and UpdateJobExecution.
Its VmRSS is read from /proc/<pid>/status after each phase, once the agent is idle. The peak is the highest
VmHWM seen by a sampler that reads it every 0.1 s for the whole life: the agent restarts itself in place
(same PID) after provisioning and before proving a rotated certificate, and the kernel's VmHWM starts
again with each new program, so a reading at the end of a phase alone would miss the peak before it.

The floor is bench/startup.py's: bench/baseline_connect.py imports awscrt and awsiot and opens one PKCS#11
mTLS connection, nothing more. It runs in the same run (after the agent has stopped: it uses the device's
final identity, so the same broker, token, key and certificate), --floor-runs times; its median is used.
Targets: agent RSS after the whole life <= 1.10x the floor's RSS, and growth <= 1 MiB per 1,000 jobs
(RSS after warm-up + jobs minus RSS after warm-up, scaled to 1,000 jobs). Figures are printed as ratios
against the floor. Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# localcloud only: agent.* modules are driven as a subprocess, never imported here.
from localcloud.bench import fresh_device  # noqa: E402
from localcloud.cloud import LocalCloud  # noqa: E402
from localcloud.defender import DefenderStore  # noqa: E402
from localcloud.jobs import TERMINAL, Jobs  # noqa: E402
from localcloud.ntp import Chrony  # noqa: E402
from localcloud.streams import Streams  # noqa: E402
from localcloud.tokens import softhsm_token  # noqa: E402
from localcloud.vendor import CodeSigner, make_tar, signed_doc  # noqa: E402

TARGET_RATIO = 1.10
TARGET_GROWTH_KIB = 1024  # per 1,000 jobs
SERIAL = "SN-LIFE01"
THING = f"gw-{SERIAL}"
T0 = time.monotonic()


def say(what: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {what}", flush=True)


# -- /proc ----------------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB) and Threads of a live process."""
    text = Path(f"/proc/{pid}/status").read_text()
    out = {}
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
        m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
        out[key] = int(m.group(1)) if m else -1
    return out


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# -- the agent process ------------------------------------------------------------------------------
class Agent:
    """`iot-agent --config C run`, stderr to a log file; stopped by its PID."""

    def __init__(self, config: Path, env: dict[str, str], log_path: Path, state_dir: Path):
        self.log_path, self.state_dir = log_path, state_dir
        argv = [sys.executable, str(Path(sys.executable).parent / "iot-agent"), "--config", str(config), "run"]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=str(state_dir.parent),
            )
        self.peak = 0  # KiB: the highest VmHWM seen so far (VmHWM starts again when the agent re-executes)
        self._sampling = threading.Event()
        threading.Thread(target=self._sample_peak, daemon=True).start()

    def _sample_peak(self) -> None:
        while not self._sampling.wait(0.1) and self.proc.poll() is None:
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, proc_status(self.pid)["VmHWM"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")

    def verify_identity(self) -> None:
        """The process measured is the agent itself: the PID it wrote, running the agent's `run`."""
        pid_file = self.state_dir / "agent.pid"
        written = int(pid_file.read_text().strip())
        if written != self.pid:
            raise RuntimeError(f"{pid_file} says {written}, the process started is {self.pid}: a wrapper?")
        argv = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        if not any(a.endswith(b"iot-agent") for a in argv) or b"run" not in argv:
            raise RuntimeError(f"PID {self.pid} runs {argv!r}, not `iot-agent run`")

    def sample(self, n: int = 5, every: float = 0.2) -> dict[str, int]:
        """Median VmRSS over a short idle window, with the peak, threads and open files at its end."""
        rss = []
        for _ in range(n):
            self.check_alive()
            rss.append(proc_status(self.pid)["VmRSS"])
            time.sleep(every)
        st = proc_status(self.pid)
        self.peak = st["VmHWM"] = max(self.peak, st["VmHWM"])
        st["VmRSS"] = int(statistics.median(rss))
        st["fds"] = fd_count(self.pid)
        try:
            st["state_bytes"] = (self.state_dir / "state.json").stat().st_size
        except OSError:
            st["state_bytes"] = -1
        return st

    def stop(self, timeout: float = 30.0) -> int | None:
        self._sampling.set()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def wait_until(what: str, check, timeout: float, agent: Agent | None = None, every: float = 0.1):
    """Poll (bounded in time) until check() returns something true; fail early if the agent died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if agent is not None:
            agent.check_alive()
        time.sleep(every)
    tail = agent.log_text()[-2000:] if agent else ""
    raise RuntimeError(f"{what} did not happen within {timeout:g} s\n{tail}")


def settled(agent: Agent) -> bool:
    """No rotation under way, and the last session event in the log is a connection."""
    try:
        data = json.loads((agent.state_dir / "state.json").read_text())["data"]
    except (OSError, ValueError, KeyError):
        return False
    if (data.get("rotation") or {}).get("step", "idle") != "idle":
        return False
    events = re.findall(
        rf"(connected to \S+ as {THING}\b|connecting to |reconnecting with |disconnected)", agent.log_text()
    )
    return bool(events) and events[-1].startswith("connected to")


def terminal(jobs: Jobs, job_id: str) -> dict | None:
    ex = jobs.execution(job_id, THING, with_document=False)
    return ex if ex and ex["status"] in TERMINAL else None


# -- the floor --------------------------------------------------------------------------------------
def measure_floor(argv: list[str], env: dict[str, str], settle: float, timeout: float = 30.0) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) of bench/baseline_connect.py, connected and settled."""
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        got: list[bytes] = []
        done = threading.Event()

        def read() -> None:  # stderr is read in a thread so the wait below is bounded
            for line in p.stderr:
                got.append(line)
                if b"connected" in line:
                    done.set()
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if not done.wait(timeout) or not any(b"connected" in line for line in got):
            raise RuntimeError(f"the floor never connected: {b''.join(got).decode(errors='replace')[-800:]}")
        time.sleep(settle)
        rss = []
        for _ in range(5):
            rss.append(proc_status(p.pid)["VmRSS"])
            time.sleep(0.1)
        st = proc_status(p.pid)
        st["VmRSS"] = int(statistics.median(rss))
        os.kill(p.pid, signal.SIGTERM)
        if p.wait(15) != 0:
            raise RuntimeError(f"the floor exited with {p.returncode}")
        reader.join(5)
        return st
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
        p.stderr.close()


# -- documents --------------------------------------------------------------------------------------
def manifest_bytes(target: str, version: str, name: str, data: bytes) -> bytes:
    """README 'Updates': the release manifest a vendor signs (built here so no agent module is imported)."""
    return json.dumps(
        {
            "format": "iot-agent-release/1",
            "target": target,
            "version": version,
            "name": name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def cheap_documents(replay: dict) -> list[tuple[dict, str]]:
    """One cycle of the job mix: (document, what the agent answers)."""
    return [
        ({"operation": "reboot"}, "unsupported operation"),
        (
            {"operation": "collect-logs", "since": "1h", "upload": {"url": "https://example.invalid/logs"}},
            "unsupported operation",
        ),
        (replay, "replayed signed update: already installed"),
        ({"operation": "set-config", "config": {"telemetry_interval_s": 60, "debug": False}}, "unsupported operation"),
        ({"operation": "restart-app", "app": "app"}, "unsupported operation"),
        ({"description": "no operation at all", "steps": [1, 2, 3]}, "document without an operation"),
        ({"operation": "reboot", "delay_s": 5}, "unsupported operation"),
        (replay, "replayed signed update: already installed"),
        ({"operation": "run-command", "command": ["uptime"]}, "unsupported operation"),
        ({"operation": "collect-logs", "since": "24h"}, "unsupported operation"),
    ]


def run_jobs(
    jobs: Jobs,
    agent: Agent,
    first: int,
    count: int,
    batch: int,
    docs: list[tuple[dict, str]],
    statuses: dict[str, int],
    on_progress=None,
) -> None:
    """Create `count` jobs in batches of `batch`; each batch is awaited (bounded) before the next one."""
    i = first
    end = first + count
    while i < end:
        ids = []
        for j in range(i, min(i + batch, end)):
            job_id = f"life-{j:05d}"
            jobs.create(job_id, THING, docs[j % len(docs)][0])
            ids.append(job_id)
        last = ids[-1]
        wait_until(f"jobs {ids[0]}..{last}", lambda last=last: terminal(jobs, last), 30 + 3 * len(ids), agent, 0.05)
        for job_id in ids:  # jobs run in queue order: all of the batch are done; count how
            ex = wait_until(f"job {job_id}", lambda job_id=job_id: terminal(jobs, job_id), 30, agent, 0.05)
            statuses[ex["status"]] = statuses.get(ex["status"], 0) + 1
        i += len(ids)
        if on_progress:
            on_progress(i - first)


# -- the run ----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000, help="jobs measured after the warm-up (default 1000)")
    ap.add_argument("--warmup", type=int, default=100, help="jobs before the first job measurement (default 100)")
    ap.add_argument("--batch", type=int, default=20, help="jobs created at a time (default 20)")
    ap.add_argument("--floor-runs", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="keep everything in this folder (default: a temporary one, removed)")
    args = ap.parse_args()
    if args.jobs < 1 or args.warmup < 0 or args.batch < 1 or args.floor_runs < 1:
        ap.error("--jobs, --batch and --floor-runs must be positive, --warmup not negative")

    work = args.keep or Path(tempfile.mkdtemp(prefix="iot-agent-life-"))
    work.mkdir(parents=True, exist_ok=True)
    # An installed agent runs from byte code compiled at install time. In this editable checkout with
    # PYTHONDONTWRITEBYTECODE set, every start would compile the sources (and keep the allocator's
    # leftovers of it): compile them once into a private cache instead, outside the source tree.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    r = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(REPO / "agent")], timeout=300, capture_output=True, text=True
    )
    if r.returncode != 0:  # the agent will say more when it starts; this is only the cache
        say(f"warning: compiling agent/ failed: {(r.stdout + r.stderr).strip()[-300:]}")

    cloud = ntp = token = agent = None
    samples: list[tuple[str, dict[str, int]]] = []
    series: list[tuple[int, int]] = []
    reports: list[int] = []  # Device Defender reports so far, at each point of `series`
    statuses: dict[str, int] = {}
    floors: list[dict[str, int]] = []
    try:
        say(f"working folder: {work}")
        cloud = LocalCloud(work / "cloud")
        info = cloud.up()
        ntp = Chrony(work / "chrony").start()
        token = softhsm_token(work / "softhsm", label="iot-agent")
        signer = CodeSigner(work / "vendor")
        app_dir = work / "device" / "app"
        dev = fresh_device(
            cloud,
            token,
            SERIAL,
            work / "device",
            [ntp.server],
            extra={
                "ota": {
                    "code_signing_certificate": str(signer.cert_path),
                    "ca_file": info["ca_file"],
                    "targets": {"app": {"directory": str(app_dir), "health_command": ["sh", "-c", "test -f app.txt"]}},
                }
            },
        )
        cloud.registry.allow_serials([SERIAL])
        jobs = Jobs(cloud.registry.db, cloud.registry.lock)
        streams = Streams(cloud.registry.db, cloud.registry.lock, cloud.directory / "streams")
        env = token.full_env()
        say(
            f"local cloud on 127.0.0.1:{info['port']}, NTP {ntp.server}, "
            f"factory-fresh device {SERIAL} (claim key on SoftHSM)"
        )

        # 1. provisioning by claim
        agent = Agent(dev.config_path, env, work / "agent.log", dev.directory / "state")
        wait_until(
            "provisioning by claim and the connection as the thing",
            lambda: re.search(rf"connected to \S+ as {THING}\b", agent.log_text()),
            120,
            agent,
        )
        agent.verify_identity()
        wait_until(
            "a Device Defender report",
            lambda: [
                r
                for r in DefenderStore(cloud.registry.db, cloud.registry.lock).reports(THING)
                if r["status"] == "ACCEPTED"
            ],
            60,
            agent,
        )
        first_cert = [c.id for c in cloud.registry.certificates() if c.thing == THING and c.status == "ACTIVE"]
        if len(first_cert) != 1:
            raise RuntimeError(f"expected one active certificate for {THING}, found {len(first_cert)}")
        time.sleep(2)
        samples.append(("provisioning by claim (+ Defender report)", agent.sample()))
        say(
            f"agent PID {agent.pid} (= state/agent.pid): provisioned by claim and connected; "
            f"RSS {samples[-1][1]['VmRSS'] / 1024:.1f} MiB"
        )

        # 2. a signed update
        release = make_tar({"app.txt": b"app 1.1.0\n"}, "1.1.0")
        (work / "app-1.1.0.tar").write_bytes(release)
        sid = streams.create([work / "app-1.1.0.tar"], "app-1-1-0")
        raw = manifest_bytes("app", "1.1.0", "app-1.1.0.tar", release)
        update_doc = signed_doc(
            signer, "app", "1.1.0", "app-1.1.0.tar", release, stream=(sid, 0), manifest=(raw, signer.sign(raw))
        )
        jobs.create("update-1-1-0", THING, update_doc)
        ex = wait_until("the signed update", lambda: terminal(jobs, "update-1-1-0"), 120, agent)
        current = (app_dir / "current").resolve().name if (app_dir / "current").exists() else None
        if ex["status"] != "SUCCEEDED" or current != "1.1.0":
            raise RuntimeError(f"the signed update: {ex['status']} {ex.get('statusDetails')}, current {current}")
        time.sleep(1)
        samples.append(("signed update (stream, manifest)", agent.sample()))
        say(f"signed update 1.1.0 SUCCEEDED; RSS {samples[-1][1]['VmRSS'] / 1024:.1f} MiB")

        # 3. a certificate rotation
        jobs.create("rotate-1", THING, {"operation": "rotate-certificate"})
        ex = wait_until("the certificate rotation", lambda: terminal(jobs, "rotate-1"), 240, agent, 0.2)
        certs = {c.id: c.status for c in cloud.registry.certificates() if c.thing == THING}
        active = [cid for cid, st in certs.items() if st == "ACTIVE"]
        if ex["status"] != "SUCCEEDED" or len(active) != 1 or active[0] == first_cert[0]:
            raise RuntimeError(f"the rotation: {ex['status']} {ex.get('statusDetails')}, certificates {certs}")
        wait_until("the agent settled in a session with its new certificate", lambda: settled(agent), 60, agent, 0.2)
        time.sleep(2)
        agent.verify_identity()
        samples.append(("certificate rotation", agent.sample()))
        say(f"certificate rotated: SUCCEEDED; RSS {samples[-1][1]['VmRSS'] / 1024:.1f} MiB")

        # 4. jobs: warm-up, then the measured ones
        docs = cheap_documents(update_doc)
        t_jobs = time.monotonic()
        run_jobs(jobs, agent, 0, args.warmup, args.batch, docs, statuses)
        time.sleep(1)
        samples.append((f"{args.warmup} warm-up jobs", agent.sample()))
        warm = samples[-1][1]
        say(f"{args.warmup} warm-up jobs done; RSS {warm['VmRSS'] / 1024:.1f} MiB")
        series.append((0, warm["VmRSS"]))
        reports.append(len(DefenderStore(cloud.registry.db, cloud.registry.lock).reports(THING)))
        step = max(args.batch, (args.jobs // 10) // args.batch * args.batch)

        defender = DefenderStore(cloud.registry.db, cloud.registry.lock)

        def progress(done: int) -> None:
            if done % step == 0 or done == args.jobs:
                series.append((done, proc_status(agent.pid)["VmRSS"]))
                reports.append(len(defender.reports(THING)))

        t_measured = time.monotonic()
        run_jobs(jobs, agent, args.warmup, args.jobs, args.batch, docs, statuses, progress)
        jobs_elapsed = time.monotonic() - t_measured
        time.sleep(1)
        samples.append((f"{args.warmup} + {args.jobs} jobs: the whole life", agent.sample()))
        say(
            f"{args.jobs} more jobs done in {jobs_elapsed:.1f} s ({args.jobs / jobs_elapsed:.1f} jobs/s); "
            f"RSS {samples[-1][1]['VmRSS'] / 1024:.1f} MiB"
        )
        all_jobs_elapsed = time.monotonic() - t_jobs

        # the agent stops; the floor runs with the device's final identity
        rc = agent.stop()
        if rc != 0:
            raise RuntimeError(f"the agent did not stop cleanly on SIGTERM (exit {rc})")
        state = json.loads((dev.directory / "state" / "state.json").read_text())["data"]
        cfg_text = dev.config_path.read_text()
        lib = re.search(r'^library = "(.*)"$', cfg_text, re.M).group(1)
        base = [
            sys.executable,
            str(REPO / "bench" / "baseline_connect.py"),
            "localhost",
            str(info["port"]),
            info["ca_file"],
            state["certificate_file"],
            lib,
            token.label,
            state["key_label"],
            str(token.pin_file()),
            state["thing_name"],
        ]
        measure_floor(base, env, 0.3)  # warm-up: the interpreter and libraries from the page cache
        for _ in range(args.floor_runs):
            floors.append(measure_floor(base, env, 1.0))
        say(f"floor measured {args.floor_runs} times with the device's final identity")
    finally:
        if agent:
            agent.stop()
        if token:
            token.stop()
        if ntp:
            ntp.stop()
        if cloud:
            cloud.down()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    f_rss = statistics.median(f["VmRSS"] for f in floors)
    f_hwm = statistics.median(f["VmHWM"] for f in floors)
    print()
    print(
        f"floor (awscrt+awsiot, one PKCS#11 mTLS connection; median of {len(floors)}): "
        f"RSS {f_rss / 1024:.1f} MiB, peak {f_hwm / 1024:.1f} MiB "
        f"(runs: {', '.join('%.1f' % (f['VmRSS'] / 1024) for f in floors)} MiB)"
    )
    print(
        f"{'agent (iot-agent run, PID = state/agent.pid)':50s} {'RSS MiB':>8s} {'ratio':>6s} {'peak MiB':>9s} "
        f"{'anon MiB':>9s} {'threads':>7s} {'fds':>4s} {'state.json':>10s}"
    )
    for name, s in samples:
        print(
            f"  after {name:43s} {s['VmRSS'] / 1024:8.1f} {s['VmRSS'] / f_rss:6.3f} {s['VmHWM'] / 1024:9.1f} "
            f"{s['RssAnon'] / 1024:9.1f} {s['Threads']:7d} {s['fds']:4d} {s['state_bytes']:10d}"
        )
    end = samples[-1][1]
    ratio = end["VmRSS"] / f_rss
    growth = end["VmRSS"] - warm["VmRSS"]
    per_1000 = growth * 1000 / args.jobs
    print(
        f"RSS during the {args.jobs} measured jobs (jobs done: MiB): "
        + ", ".join(f"{n}: {r / 1024:.2f}" for n, r in series)
    )
    if reports[-1] > reports[0]:
        print(
            f"  (Device Defender reports during them: {reports[-1] - reports[0]}, after job "
            + ", ".join(str(series[i][0]) for i in range(1, len(reports)) if reports[i] > reports[i - 1])
            + ")"
        )
    if end["state_bytes"] > warm["state_bytes"]:
        print(
            f"  (state.json grew from {warm['state_bytes']} to {end['state_bytes']} bytes during them: bounded records "
            f"such as ota.done, up to 200 entries, still filling; --warmup 1100 measures past that)"
        )
    print(
        f"job outcomes: {dict(sorted(statuses.items()))} of {args.warmup + args.jobs} "
        f"(mix: {len([d for d in docs if 'replayed' in d[1]])}/{len(docs)} replayed signed updates, "
        f"the rest unknown operations or no operation); all jobs took {all_jobs_elapsed:.1f} s"
    )
    print(f"peak over the life: {end['VmHWM'] / 1024:.1f} MiB, {end['VmHWM'] / f_hwm:.3f}x the floor's peak")
    print(
        f"RSS after the whole life: {ratio:.3f}x the floor (target <= {TARGET_RATIO})  "
        f"{'ok' if ratio <= TARGET_RATIO else 'MISSED'}"
    )
    note = "" if args.jobs >= 1000 else f" (extrapolated from {args.jobs} jobs: a quick run, page-granular)"
    print(
        f"growth over {args.jobs} jobs after {args.warmup} warm-up: {growth:+d} KiB = {per_1000:+.0f} KiB per 1,000 "
        f"jobs{note}, {per_1000 / f_rss * 100:+.2f}% of the floor per 1,000 (target <= {TARGET_GROWTH_KIB} KiB)  "
        f"{'ok' if per_1000 <= TARGET_GROWTH_KIB else 'MISSED'}"
    )
    print(f"run time: {time.monotonic() - T0:.0f} s")
    return 0 if ratio <= TARGET_RATIO and per_1000 <= TARGET_GROWTH_KIB else 1


if __name__ == "__main__":
    sys.exit(main())
