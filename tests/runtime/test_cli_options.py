"""Global options (--config, --log-level) are accepted before or after the subcommand: a new user
types `iot-agent run --config X` as often as `iot-agent --config X run` (issue 19)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import _parser


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
