"""Config parsing and the user-facing errors for bad config and bad PIN files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ClockConfig, ConfigError, load, parse, split_server
from agent.errors import SecretError
from agent.pin import read_pin

REPO = Path(__file__).resolve().parent.parent

GOOD = """
[device]
thing_name = "gw-1"
state_dir = "state"

[broker]
endpoint = "localhost"
ca_file = "ca.pem"
port = 8883

[pkcs11]
library = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "iot-agent"
pin_file = "pin"

[clock]
ntp_servers = ["127.0.0.1:1123", "[::1]:123", "time.aws.com"]
"""


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=60)


@pytest.fixture
def cfgdir(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    (tmp_path / "config.toml").write_text(GOOD)
    return tmp_path


def test_good_config_parses_with_defaults_and_relative_paths(cfgdir):
    cfg = load(cfgdir / "config.toml")
    assert cfg.device.thing_name == "gw-1"
    assert cfg.broker.port == 8883 and cfg.broker.keepalive_s == 60
    assert cfg.resolve(cfg.broker.ca_file) == cfgdir / "ca.pem"
    assert cfg.clock == ClockConfig(ntp_servers=["127.0.0.1:1123", "[::1]:123", "time.aws.com"])
    assert read_pin(cfg, environ={}) == "1234"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s.replace('port = 8883', 'port = "8883"'), "broker.port: expected an integer, got string '8883'"),
        (lambda s: s.replace('port = 8883', 'prot = 8883'), "broker.prot: unknown key"),
        (lambda s: s.replace('endpoint = "localhost"\n', ''), "broker.endpoint: required but missing"),
        (lambda s: s + "\n[brokr]\nx = 1\n", "[brokr]: unknown section"),
        (lambda s: s.replace('port = 8883', 'port = 70000'), "broker.port: 70000 is not a TCP port"),
        (lambda s: s.replace('"time.aws.com"', '"host:99999"'), "clock.ntp_servers: 'host:99999': port must be 1-65535"),
        (lambda s: s + "\n[log]\nlevel = \"loud\"\n", "log.level: must be one of"),
        (lambda s: s.replace('[broker]', '[broker\n'), "TOML syntax error"),
        (lambda s: s.replace('ntp_servers = [', 'ntp_servers = [1, '), "clock.ntp_servers[0]: expected a string"),
    ],
)
def test_bad_config_is_refused_with_one_line_naming_the_key(cfgdir, mutate, expected):
    path = cfgdir / "config.toml"
    path.write_text(mutate(GOOD))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert len(e.value.problems) == 1, e.value.problems
    assert expected in e.value.problems[0]
    assert str(path) in e.value.problems[0]
    r = cli("--config", str(path), "check-config")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    r = cli("--config", str(path), "run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr


def test_every_problem_is_listed(cfgdir):
    path = cfgdir / "config.toml"
    path.write_text(GOOD.replace("port = 8883", "port = true\nbogus = 1").replace('token_label = "iot-agent"\n', ""))
    r = cli("--config", str(path), "check-config")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert any("broker.port: expected an integer, got boolean True" in l for l in lines)
    assert any("broker.bogus: unknown key" in l for l in lines)
    assert any("pkcs11.token_label: required but missing" in l for l in lines)


def test_missing_config_file(tmp_path):
    r = cli("--config", str(tmp_path / "nope.toml"), "run")
    assert r.returncode == 2
    assert r.stderr.strip() == f"iot-agent: {tmp_path / 'nope.toml'}: config file not found; create it (see README, 'Configuration') or pass --config PATH"


def test_missing_files_named_by_check_config(cfgdir):
    (cfgdir / "ca.pem").unlink()
    r = cli("--config", str(cfgdir / "config.toml"), "check-config")
    assert r.returncode == 2
    assert "broker.ca_file:" in r.stderr and "does not exist" in r.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_pin_file_readable_by_others_is_refused(cfgdir, mode):
    pin = cfgdir / "pin"
    pin.chmod(mode)
    cfg = load(cfgdir / "config.toml")
    with pytest.raises(SecretError) as e:
        read_pin(cfg, environ={})
    assert f"mode {mode:04o}" in str(e.value) and "chmod 600" in str(e.value)
    assert "1234" not in str(e.value)
    for cmd in ("check-config", "run"):
        r = cli("--config", str(cfgdir / "config.toml"), cmd, env={"CREDENTIALS_DIRECTORY": ""})
        assert r.returncode == 2, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "chmod 600" in lines[0], r.stderr
        assert "1234" not in r.stderr + r.stdout


def test_pin_from_systemd_credentials_directory_wins(cfgdir, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pkcs11-pin").write_text("9999")
    (creds / "pkcs11-pin").chmod(0o400)
    cfg = load(cfgdir / "config.toml")
    assert read_pin(cfg, environ={"CREDENTIALS_DIRECTORY": str(creds)}) == "9999"


def test_pin_symlink_empty_and_missing(cfgdir):
    cfg = load(cfgdir / "config.toml")
    pin = cfgdir / "pin"
    pin.write_text("")
    with pytest.raises(SecretError, match="empty"):
        read_pin(cfg, environ={})
    real = cfgdir / "real-pin"
    real.write_text("1234")
    real.chmod(0o600)
    pin.unlink()
    pin.symlink_to(real)
    with pytest.raises(SecretError, match="symbolic link"):
        read_pin(cfg, environ={})
    pin.unlink()
    with pytest.raises(SecretError, match="not found"):
        read_pin(cfg, environ={})


def test_no_pin_configured_at_all(cfgdir):
    cfg = parse({"broker": {"endpoint": "h", "ca_file": "c"}, "pkcs11": {"library": "l", "token_label": "t"}})
    with pytest.raises(SecretError, match="LoadCredential=pkcs11-pin"):
        read_pin(cfg, environ={})


@pytest.mark.parametrize("s, hostport", [("h", ("h", 123)), ("h:5", ("h", 5)), ("[::1]:7", ("::1", 7)),
                                         ("::1", ("::1", 123))])
def test_split_server(s, hostport):
    assert split_server(s) == hostport
