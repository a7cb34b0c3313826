"""Fixtures: a real bench per test (mosquitto with TLS + client certs, chrony, SoftHSM, swtpm).

Every process is started by the bench's own helpers and stopped by PID at teardown.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localcloud import pace  # noqa: E402
from localcloud.bench import Bench, Device, agent_cmd  # noqa: E402
from localcloud.tokens import Token, softhsm_token, tpm_token  # noqa: E402


@pytest.fixture
def bench(tmp_path):
    b = Bench(tmp_path / "bench").start()
    yield b
    b.stop()


def _make_token(kind: str, directory: Path) -> Token:
    if kind == "softhsm":
        return softhsm_token(directory)
    return tpm_token(directory)


@pytest.fixture(params=["softhsm", "tpm"])
def token(request, tmp_path):
    tok = _make_token(request.param, tmp_path / request.param)
    yield tok
    tok.stop()


@pytest.fixture
def softhsm(tmp_path):
    tok = softhsm_token(tmp_path / "softhsm")
    yield tok
    tok.stop()


@pytest.fixture
def tpm(tmp_path):
    tok = tpm_token(tmp_path / "tpm")
    yield tok
    tok.stop()


LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}) (\w+) ([\w.]+): (.*)$")


@dataclass
class AgentProcess:
    """`iot-agent run` as a real child process; its log lines are collected as they arrive."""

    device: Device
    args: tuple[str, ...] = ("run",)
    env_extra: dict[str, str] = field(default_factory=dict)
    cmd: list[str] | None = None  # instead of `iot-agent <args>` (e.g. the launcher)
    session: bool = False  # its own process group, so a kill sweep's cut takes its children too
    proc: subprocess.Popen | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time seen, text)
    _reader: threading.Thread | None = None

    def start(self) -> AgentProcess:
        self.proc = subprocess.Popen(
            self.cmd or agent_cmd(self.device.config_path, *self.args),
            env={**self.device.token.full_env(), **self.env_extra},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=self.session,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0, after: int = 0) -> int:
        """Index of the first line (from `after`) matching; fails the test after `timeout`."""
        rx = re.compile(pattern)
        deadline = pace.deadline(timeout)
        while time.monotonic() < deadline:
            for i in range(after, len(self.lines)):
                if rx.search(self.lines[i][1]):
                    return i
            if self.proc.poll() is not None and self._reader and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"agent log never matched {pattern!r} within {timeout} s; log:\n{self.text()[-3000:]}")

    def wait_exit(self, timeout: float = 90.0) -> int:
        """Wait for the process to end by itself, and for its last log lines to be read."""
        self.proc.wait(pace.scaled(timeout))
        if self._reader:
            self._reader.join(5)
        return self.proc.returncode

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(pace.scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader:
            self._reader.join(5)
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def agents():
    started: list[AgentProcess] = []

    def launch(
        device: Device,
        *args: str,
        env: dict[str, str] | None = None,
        cmd: list[str] | None = None,
        session: bool = False,
    ) -> AgentProcess:
        a = AgentProcess(device, args or ("run",), dict(env or {}), cmd, session=session).start()
        started.append(a)
        return a

    yield launch
    for a in started:
        a.stop()


_SWEEP_LINES: list[str] = []
# Modules whose tests are independent of each other and long: pytest-xdist spreads them over its
# workers. Every other module runs whole on one worker (its module fixtures and the order of its tests
# are shared, e.g. a happy path that a later test builds on).
SPREAD = {"test_sweep_updates", "test_sweep_identity", "test_micropython_power_cut", "test_tunnel_io"}


# The longest work first, so no worker starts a long sweep while the others run out of work
# (longest-processing-time-first; `make test` passes --no-loadscope-reorder so pytest-xdist keeps this
# order instead of putting the largest modules first). Busy sweeps (their cases run on four threads)
# alternate with long modules that mostly wait. Figures: --durations of `make test` on 2 cores.
LONG_FIRST = [
    "test_systemd_nspawn.py",  # on a fresh checkout its fixture builds the container image first (~1.5 min)
    "test_sweep_updates.py::test_sweep_update[self-update-softhsm]",
    "test_connection.py",
    "test_sweep_updates.py::test_sweep_update[privileged-tpm]",
    "test_revocation.py",
    "test_sweep_updates.py::test_sweep_update[privileged-softhsm]",
    "test_localcloud_fuzz.py",
    "test_tpm_handles.py",
    "test_inventory.py",
    "test_sweep_updates.py::test_sweep_update[self-update-tpm]",
    "test_soak.py",
    "test_campaign.py",  # local messaging's fault campaign: 30 s of publishing under faults, then checks
    "test_tunnel_io.py",  # spread: a refused certificate waits 10-30 s (s2n), a network drop 10 s
    "test_tunneling_agent.py",
    "test_sweep_spool.py",
    "test_local_messaging_agent.py",
    "test_localcloud_tunnels.py",
    "test_sweep_updates.py::test_sweep_update[ota-tpm]",
    "test_ota_selfupdate.py",
    "test_sweep_identity.py::test_sweep_rotation[tpm]",
    "test_micropython_power_cut.py",
    "test_sweep_updates.py::test_sweep_update[rollback-tpm]",
    "test_sweep_updates.py::test_sweep_update[rollback-softhsm]",
    "test_sweep_updates.py::test_sweep_update[ota-softhsm]",
    "test_sweep_identity.py::test_sweep_rotation[softhsm]",
    "test_rotation.py",
    "test_micropython_agent.py",
    "test_sweep_identity.py",
]


def _rank(item) -> int:
    for i, key in enumerate(LONG_FIRST):
        if item.nodeid.endswith(key) or item.nodeid.split("::")[0].endswith(key):
            return i
    return len(LONG_FIRST)


def pytest_configure(config):
    """Measures the machine's pace once, before pytest-xdist starts its workers: they (and every
    process a test starts) inherit it through IOT_AGENT_TIME_SCALE, so all waits stretch alike."""
    pace.factor()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.module.__name__.rsplit(".", 1)[-1]
        if name not in SPREAD and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(name))
    items.sort(key=_rank)  # stable: a module's own tests keep their order


@pytest.fixture(autouse=True)
def _sweep_figures(request):
    """Hands the kill sweeps' figures to the report, which reaches the main process under pytest-xdist too."""
    mod = sys.modules.get("sweep")
    before = len(getattr(mod, "SUMMARIES", []))
    yield
    mod = sys.modules.get("sweep")
    for line in list(getattr(mod, "SUMMARIES", []))[before:]:
        request.node.user_properties.append(("sweep", line))


_CPU: dict[str, float] = {}  # module -> CPU seconds (the worker's own and the children it reaped)


def _cpu_now() -> float:
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The CPU each test costs, with the processes it started (counted when they are reaped, so a module's
    broker lands on its last test): `make test` prints the costliest modules, where a faster suite starts."""
    before = _cpu_now()
    item.user_properties.append(("cpu_start", before))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    start = next((v for k, v in item.user_properties if k == "cpu_start"), None)
    if start is not None:
        item.user_properties.append(("cpu", _cpu_now() - start))


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        _SWEEP_LINES.extend(v for k, v in report.user_properties if k == "sweep")
        module = report.nodeid.split("::")[0]
        _CPU[module] = _CPU.get(module, 0.0) + sum(v for k, v in report.user_properties if k == "cpu")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The kill sweeps' figures (kill points per flow and token), whatever -q hides; the costliest modules."""
    terminalreporter.write_line(f"waits scaled by {pace.factor():g} for this machine's pace ({pace.ENV})")
    if _CPU:
        terminalreporter.section("CPU by module (top 12)")
        for module, cpu in sorted(_CPU.items(), key=lambda kv: -kv[1])[:12]:
            terminalreporter.write_line(f"{cpu:7.1f} s  {module}")
    if _SWEEP_LINES:
        terminalreporter.section("kill sweeps")
        for line in sorted(_SWEEP_LINES):
            terminalreporter.write_line(line)
