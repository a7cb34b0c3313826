"""Global options (--config, --log-level) are accepted before or after the subcommand: a new user
types `iot-agent run --config X` as often as `iot-agent --config X run` (issue 19)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import _parser, _service_args


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "/etc/x.toml", "run"],
        ["run", "--config", "/etc/x.toml"],
        ["keys", "list", "--config", "/etc/x.toml"],
        ["keys", "--config", "/etc/x.toml", "list"],
        ["factory", "init", "--serial", "S", "--csr-out", "c.pem", "--config", "/etc/x.toml"],
        ["status", "--json", "--config", "/etc/x.toml"],
    ],
)
def test_config_before_or_after_the_subcommand(argv):
    args = _parser().parse_args(argv)
    assert args.config == Path("/etc/x.toml")


def test_defaults_and_the_later_option_wins():
    a = _parser().parse_args(["run"])
    assert a.config is None and a.log_level is None
    a = _parser().parse_args(["--log-level", "info", "run"])
    assert a.log_level == "info"  # a subcommand that does not repeat it keeps it
    a = _parser().parse_args(["--config", "a.toml", "run", "--config", "b.toml", "--log-level", "debug"])
    assert a.config == Path("b.toml") and a.log_level == "debug"
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--log-level", "loud"])


def test_the_installed_command_takes_config_after_the_subcommand(tmp_path):
    missing = tmp_path / "missing.toml"
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert f"{missing}: config file not found" in r.stdout + r.stderr, r.stdout + r.stderr


SERVICE_LINES = [
    ["run"],
    ["--config", "/etc/x.toml", "run"],
    ["run", "--config", "/etc/x.toml"],
    ["--config=/etc/x.toml", "run", "--log-level=debug"],
    ["--log-level", "info", "run"],
    ["--config", "a.toml", "run", "--config", "b.toml", "--log-level", "debug"],
    ["--log-level", "warning", "--config", "c.toml", "run", "--log-level", "error"],
]
NOT_SERVICE_LINES = [
    [],
    ["run", "run"],
    ["run", "--log-level", "loud"],
    ["run", "--config"],
    ["run", "--config", "--log-level", "info"],
    ["run", "--verbose"],
    ["--help"],
    ["run", "-h"],
    ["status"],
    ["keys", "list"],
    ["run", "extra"],
]


@pytest.mark.parametrize("argv", SERVICE_LINES)
def test_the_service_line_is_read_as_argparse_reads_it(argv):
    """`run`'s command line is read without argparse (the service then does not carry it for months);
    what it reads must be exactly what argparse reads."""
    fast, full = _service_args(argv), _parser().parse_args(argv)
    assert fast is not None
    assert (fast.command, fast.config, fast.log_level) == (full.command, full.config, full.log_level)


@pytest.mark.parametrize("argv", NOT_SERVICE_LINES)
def test_anything_else_goes_to_argparse(argv):
    assert _service_args(argv) is None


def test_the_service_does_not_import_argparse(tmp_path):
    """What the long-lived process carries: not argparse, nor shutil or subprocess (each loaded only where
    a rare task needs it). A config error ends `run` before it connects; the modules are listed after the
    daemon's and each feature's are imported too."""
    code = (
        "import sys, agent.cli\n"
        "try:\n"
        f"    agent.cli.main(['--config', {str(tmp_path / 'missing.toml')!r}, 'run'])\n"
        "finally:\n"
        "    import agent.runtime.daemon, agent.update.ota, agent.update.streamdl, agent.update.download\n"
        "    import agent.jobs.engine, agent.inventory.reporter, agent.defender.reporter, agent.identity.rotation\n"
        "    print(sorted(m for m in ('argparse', 'shutil', 'subprocess') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "config file not found" in r.stderr + r.stdout, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


def test_a_failed_restart_in_place_goes_on_in_this_process(monkeypatch):
    """If the interpreter cannot be executed again (mid-upgrade, say), the agent logs it and goes on."""
    import os

    from agent.runtime import daemon
    from agent.session import connection

    def execv(*_args):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setattr(connection, "wait_token_released", lambda path: True)
    monkeypatch.delenv(daemon.RESTARTS_ENV, raising=False)
    cfg = load_example()
    daemon._restart_in_place("test", cfg)  # returns instead of raising
    assert os.environ.get(daemon.RESTARTS_ENV) == "0"


def load_example():
    from agent.runtime.features import load

    return load(Path(__file__).resolve().parents[2] / "systemd" / "config.example.toml")
