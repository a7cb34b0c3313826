"""Config parsing and the user-facing errors for bad config and bad PIN files."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.base.config import ClockConfig, Config, ConfigError, split_server
from agent.base.errors import SecretError
from agent.base.pin import read_pin
from agent.commands.config import HandlerConfig
from agent.runtime import features
from agent.runtime.features import BOUNDS, load, parse
from agent.tunneling.config import TunnelService
from agent.update.config import OtaTargetConfig

# Every config dataclass by its class name, with the registry's bounds and parser.
agent_config = types.SimpleNamespace(
    **{c.__name__: c for c in features.SECTION_CLASSES.values()},
    OtaTargetConfig=OtaTargetConfig,
    BOUNDS=features.BOUNDS,
    parse=features.parse,
)

REPO = Path(__file__).resolve().parents[2]

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

[identity]
certificate_file = "device.pem"

[clock]
ntp_servers = ["127.0.0.1:1123", "[::1]:123", "time.aws.com"]
"""


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def certificate_pem(cn: str = "test CA", days: float = 365, start_days: float = -1) -> bytes:
    """A real self-signed P-256 certificate, valid from now + start_days to now + days."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=start_days))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def cfgdir(tmp_path):
    (tmp_path / "ca.pem").write_bytes(certificate_pem())
    (tmp_path / "device.pem").write_bytes(certificate_pem("gw-1"))
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
        (lambda s: s.replace("port = 8883", 'port = "8883"'), "broker.port: expected an integer, got string '8883'"),
        (lambda s: s.replace("port = 8883", "prot = 8883"), "broker.prot: unknown key"),
        (lambda s: s.replace('endpoint = "localhost"\n', ""), "broker.endpoint: required but missing"),
        (lambda s: s + "\n[brokr]\nx = 1\n", "[brokr]: unknown section"),
        (lambda s: s.replace("port = 8883", "port = 70000"), "broker.port: 70000 is not a TCP port"),
        (
            lambda s: s.replace('"time.aws.com"', '"host:99999"'),
            "clock.ntp_servers: 'host:99999': port must be 1-65535",
        ),
        (lambda s: s + '\n[log]\nlevel = "loud"\n', "log.level: must be one of"),
        (lambda s: s.replace("[broker]", "[broker\n"), "TOML syntax error"),
        (lambda s: s.replace("ntp_servers = [", "ntp_servers = [1, "), "clock.ntp_servers[0]: expected a string"),
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
    assert any("broker.port: expected an integer, got boolean True" in line for line in lines)
    assert any("broker.bogus: unknown key" in line for line in lines)
    assert any("pkcs11.token_label: required but missing" in line for line in lines)


def test_missing_config_file(tmp_path):
    r = cli("--config", str(tmp_path / "nope.toml"), "run")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"iot-agent: {tmp_path / 'nope.toml'}: config file not found; "
        "create it (see README, 'Configuration') or pass --config PATH"
    )


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


@pytest.mark.parametrize(
    "s, hostport", [("h", ("h", 123)), ("h:5", ("h", 5)), ("[::1]:7", ("::1", 7)), ("::1", ("::1", 123))]
)
def test_split_server(s, hostport):
    assert split_server(s) == hostport


# -- numbers: finite and within the bounds table ---------------------------------------------------


def _config_classes() -> list[type]:
    """Every dataclass the loader builds from TOML: Config's sections and the tables inside them."""
    out = list(features.SECTION_CLASSES.values())
    todo = list(out)
    while todo:
        cls = todo.pop()
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            for t in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(t) and t not in out:
                    out.append(t)
                    todo.append(t)
    return out


def _holds_numbers(tp) -> bool:
    if tp in (int, float):
        return True
    return any(_holds_numbers(a) for a in typing.get_args(tp))


def _toml_name(cls) -> str:
    if cls is agent_config.OtaTargetConfig:
        return "ota.targets.app"
    if cls is TunnelService:
        return "tunneling.services.SSH"
    if cls is HandlerConfig:
        return "commands.handlers.h"
    return next(name for name, c in features.SECTION_CLASSES.items() if c is cls)


NUMERIC = [(cls, name, bound) for cls, fields in BOUNDS.items() for name, bound in fields.items() if bound]
BASE = {"broker": {"endpoint": "h", "ca_file": "c"}, "pkcs11": {"library": "l", "token_label": "t"}}


def _with(cls, key: str, value) -> dict:
    """BASE with one key of one table set (an OTA target when it is a target's key)."""
    doc = {name: dict(table) for name, table in BASE.items()}
    if cls is agent_config.OtaTargetConfig:
        doc["ota"] = {"code_signing_certificate": "cs.pem", "targets": {"app": {"directory": "d", key: value}}}
    elif cls is TunnelService:
        doc["tunneling"] = {"services": {"SSH": {"target": "127.0.0.1:22", key: value}}}
    elif cls is HandlerConfig:
        doc["commands"] = {"handlers": {"h": {"command": ["/bin/true"], key: value}}}
    else:
        doc.setdefault(_toml_name(cls), {})[key] = value
    return doc


def test_every_numeric_field_has_bounds():
    """A number added to the config without a range (or a finiteness rule) fails here."""
    classes = _config_classes()
    assert agent_config.OtaTargetConfig in classes and agent_config.BrokerConfig in classes
    for cls in classes:
        hints = typing.get_type_hints(cls)
        numeric = {
            f.name
            for f in dataclasses.fields(cls)
            if f.name != "path" and _holds_numbers(hints[f.name]) and hints[f.name] is not bool
        }
        assert numeric <= set(BOUNDS.get(cls, {})), (
            f"{cls.__name__}: no bounds for {numeric - set(BOUNDS.get(cls, {}))}"
        )
        assert set(BOUNDS.get(cls, {})) <= numeric, f"{cls.__name__}: bounds for fields that are not numbers"
        for f in dataclasses.fields(cls):  # and every default is within its own bounds
            bound = BOUNDS.get(cls, {}).get(f.name)
            if bound and f.default is not dataclasses.MISSING:
                assert bound.lo <= f.default <= bound.hi, f"{cls.__name__}.{f.name} default {f.default}"
    assert set(BOUNDS) <= set(classes)


@pytest.mark.parametrize("cls, key, bound", NUMERIC, ids=[f"{_toml_name(c)}.{k}" for c, k, _ in NUMERIC])
def test_each_number_is_finite_and_within_its_bounds(cls, key, bound):
    is_int = typing.get_type_hints(cls)[key] is int
    below = bound.lo - 1 if is_int else bound.lo / 2 if bound.lo > 0 else -0.5
    above = bound.hi + 1 if is_int else bound.hi * 2
    bad = [below, above, -1, 10**400] + ([] if is_int else [math.nan, math.inf, -math.inf, 1e308 * 10])
    if bound.lo > 0:
        bad.append(0)
    name = f"{_toml_name(cls)}.{key}"
    for value in bad:
        with pytest.raises(ConfigError) as e:
            parse(_with(cls, key, value))
        assert len(e.value.problems) == 1, (value, e.value.problems)
        line = e.value.problems[0]
        assert line.startswith(f"{name}: ") and bound.range_text() in line and "; " in line, (value, line)
    for value in (bound.lo, bound.hi):  # the ends are included
        value = int(value) if is_int else float(value)
        doc = _with(cls, key, value)
        if key.endswith("_min_s"):  # keep its max above it
            doc[_toml_name(cls)][key.replace("_min_s", "_max_s")] = bound.hi
        if key.endswith("_max_s") and key.replace("_max_s", "_min_s") in BOUNDS[cls]:
            doc[_toml_name(cls)][key.replace("_max_s", "_min_s")] = BOUNDS[cls][key.replace("_max_s", "_min_s")].lo
        if cls is agent_config.DefenderConfig and key == "interval_s":
            doc["defender"]["testing_allow_short_interval"] = True
        parse(doc)


@pytest.mark.parametrize(
    "table, value",
    [
        ("custom_number", {"a": math.nan}),
        ("custom_number", {"a": -math.inf}),
        ("custom_number_list", {"l": [1.0, math.inf]}),
    ],
)
def test_metric_values_are_finite(table, value):
    with pytest.raises(ConfigError, match=rf"defender\.{table}\.\S+: (nan|-?inf) is not a finite number"):
        parse({**BASE, "defender": {table: value}})


@pytest.mark.parametrize(
    "section, lo, hi",
    [
        ("broker", "reconnect_min_s", "reconnect_max_s"),
        ("broker", "refused_retry_min_s", "refused_retry_max_s"),
        ("clock", "retry_min_s", "retry_max_s"),
        ("provisioning", "retry_min_s", "retry_max_s"),
        ("rotation", "retry_min_s", "retry_max_s"),
    ],
)
def test_min_above_max_is_refused(section, lo, hi):
    with pytest.raises(ConfigError) as e:
        parse({**BASE, section: {**BASE.get(section, {}), lo: 50, hi: 10}})
    assert e.value.problems == [f"{section}.{hi}: 10 is below {section}.{lo} (50); raise {hi} or lower {lo}"]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("[clock]\nmax_skew_s = nan", "clock.max_skew_s: nan is not a finite number; set a value in 0.1-3600 s"),
        ("[defender]\ninterval_s = inf", "defender.interval_s: inf is not a finite number; set a value in 1-86400 s"),
        ("[defender]\ninterval_s = -300.0", "defender.interval_s: -300 is out of range (1-86400 s)"),
        ("[broker]\nkeepalive_s = 0", "broker.keepalive_s: 0 is out of range (5-1200 s)"),
        ("[broker]\nconnect_timeout_s = -1.0", "broker.connect_timeout_s: -1 is out of range (1-600 s)"),
        ("[broker]\nreconnect_min_s = 0.0", "broker.reconnect_min_s: 0 is out of range (0.1-3600 s)"),
        ("[rotation]\ncheck_interval_s = 1e400", "rotation.check_interval_s: inf is not a finite number"),
        (
            "[ota]\nmax_artifact_bytes = 3221225472",
            "ota.max_artifact_bytes: 3221225472 is out of range (1-2147483648 bytes)",
        ),
        ("[ota]\ndownload_attempts = 0", "ota.download_attempts: 0 is out of range (1-100)"),
        ("[identity]\njitp_first_refusals = -1", "identity.jitp_first_refusals: -1 is out of range (0-100)"),
        (
            '[ota]\ncode_signing_certificate = "ca.pem"\n[ota.targets.app]\ndirectory = "app"\nhealth_timeout_s = nan',
            "ota.targets.app.health_timeout_s: nan is not a finite number; set a value in 1-3600 s",
        ),
        ("[defender]\ncustom_number = { speed = nan }", "defender.custom_number.speed: nan is not a finite number"),
        ("[broker]\nport = 1" + "0" * 5000, "TOML value too long to read"),
    ],
)
def test_check_config_reports_bad_numbers_in_one_line(cfgdir, line, expected):
    """The reported classes: nan switched the skew check off, inf crashed `run` later; now each is one line, exit 2."""
    path = cfgdir / "config.toml"
    text = GOOD
    section = line.split("\n", 1)[0]
    if section in text and section != "[ota]":  # add the key to the existing table
        text = text.replace(section + "\n", line + "\n", 1)
    else:
        text += "\n" + line + "\n"
    path.write_text(text)
    r = cli("--config", str(path), "check-config")
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"{path}: ")


# Arbitrary numbers where the config has numbers (and where it has none): parse() either builds a Config whose
# every number is finite and within its bounds, or raises ConfigError; nothing else escapes.
_ints = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 2**31, 2**63, 10**400, -(10**400)]),
)
_floats = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-320, 5e-324]))
_number = st.one_of(_ints, _floats)
_value = st.one_of(
    _number,
    st.lists(_number, max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(_number, st.lists(_number, max_size=2)), max_size=3),
)
_SECTIONS = dict(features.SECTION_CLASSES)


def _table(cls, keys_extra: list[str]) -> st.SearchStrategy:
    keys = [f.name for f in dataclasses.fields(cls)] + keys_extra
    return st.dictionaries(st.sampled_from(keys), _value, max_size=6)


_target = _table(agent_config.OtaTargetConfig, []).map(lambda t: {"directory": "d", **t})
_doc = st.fixed_dictionaries(
    {
        "broker": _table(agent_config.BrokerConfig, ["x"]).map(lambda t: {"endpoint": "h", "ca_file": "c", **t}),
        "pkcs11": st.just({"library": "l", "token_label": "t"}),
    },
    optional={
        **{name: _table(cls, ["x"]) for name, cls in _SECTIONS.items() if name not in ("broker", "pkcs11", "ota")},
        "ota": st.one_of(
            _table(agent_config.OtaConfig, []),
            st.fixed_dictionaries(
                {
                    "code_signing_certificate": st.just("cs.pem"),
                    "targets": st.dictionaries(st.sampled_from(["app", "b"]), _target, min_size=1, max_size=2),
                },
                optional={
                    k: _number
                    for k in (
                        "max_artifact_bytes",
                        "download_attempts",
                        "self_update_deadline_s",
                        "privileged_timeout_s",
                    )
                },
            ),
        ),
        "extra": st.dictionaries(st.text(max_size=3), _value, max_size=2),
    },
)


def _numbers_of(obj, cls) -> list[tuple[str, float, object]]:
    out = []
    for f in dataclasses.fields(cls):
        v, bound = getattr(obj, f.name), BOUNDS.get(cls, {}).get(f.name)
        if dataclasses.is_dataclass(v):
            out += _numbers_of(v, type(v))
        elif isinstance(v, dict):
            for k, x in v.items():
                if dataclasses.is_dataclass(x):
                    out += _numbers_of(x, type(x))
                else:
                    out += [
                        (f"{f.name}.{k}", y, bound)
                        for y in (x if isinstance(x, list) else [x])
                        if isinstance(y, (int, float)) and not isinstance(y, bool)
                    ]
        elif isinstance(v, list):
            out += [(f.name, y, bound) for y in v if isinstance(y, (int, float)) and not isinstance(y, bool)]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((f.name, v, bound))
    return out


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_doc)
def test_parse_of_arbitrary_numbers_only_raises_config_error(doc):
    try:
        cfg = parse(doc)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and "\n" not in p and len(p) < 400 for p in e.problems)
        return
    for name, value, bound in _numbers_of(cfg, Config):
        assert math.isfinite(value), (name, value)
        if bound:
            assert bound.lo <= value <= bound.hi, (name, value)
