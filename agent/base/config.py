"""Configuration: TOML in, frozen dataclasses out, every problem reported in one line each.

This module is the loader and the error format, plus the sections every capability shares (device,
broker, pkcs11, clock, log). Each capability package declares its own sections (a dataclass, the
bounds of its numbers, its choices and its cross-field checks) as a `Section` in its `config.py`;
agent.runtime.features assembles them. The dataclasses are the single source of truth for the
format: the loader walks their fields and type hints, so a new option needs only a new field (with a
default, or it becomes required). Secrets never live here: the PKCS#11 PIN is read from a file
(agent.base.pin).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base.errors import ConfigError
from agent.base.pemfile import MISSING_FILE, certificate_file_problem

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DEFAULT_CONFIG_PATH = Path("/etc/iot-agent/config.toml")

# A field without a usable default gets this marker; the loader reports it as required.
REQUIRED: Any = dataclasses.MISSING


@dataclass(frozen=True)
class DeviceConfig:
    """Who the device is and where it keeps its state."""

    thing_name: str | None = None  # set by provisioning (state) or here for pre-provisioned devices
    state_dir: Path = Path("/var/lib/iot-agent")


@dataclass(frozen=True)
class BrokerConfig:
    """The AWS IoT Core data endpoint (or the local cloud) and how to reach it."""

    endpoint: str = REQUIRED
    ca_file: Path = REQUIRED  # the only CA trusted for the server (AmazonRootCA1.pem on AWS)
    port: int = 8883
    keepalive_s: int = 60
    connect_timeout_s: float = 30.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 120.0
    # A connection must last this long before the reconnect delay starts again from the minimum,
    # so a device refused right after CONNACK (policy, throttling) keeps backing off.
    reconnect_reset_after_s: float = 30.0
    # A broker that refuses the device's identity (TLS handshake refused: certificate revoked, inactive or
    # unknown; or CONNACK not authorized) this many times in a row is left alone for a long, jittered
    # while instead: at most refused_after + 3600 / refused_retry_min_s attempts an hour.
    refused_after: int = 3
    refused_retry_min_s: float = 300.0
    refused_retry_max_s: float = 3600.0
    # Pace publishes to AWS IoT Core's per-connection limits (100 publishes/s, 512 KiB/s), as awsiotsdk does by
    # default: past them AWS IoT Core throttles or drops the connection. false: for a broker without those
    # limits (the local cloud's, in tests and benchmarks of the agent's own speed).
    aws_iot_core_limits: bool = True


@dataclass(frozen=True)
class Pkcs11Config:
    """Which PKCS#11 module and token hold the device's keys."""

    library: Path = REQUIRED
    token_label: str = REQUIRED
    key_label: str = "device"
    # Used only when $CREDENTIALS_DIRECTORY/pkcs11-pin (the systemd credential) is absent.
    pin_file: Path | None = None


@dataclass(frozen=True)
class ClockConfig:
    """When the clock is trustworthy enough to validate certificates."""

    source: str = "ntp"  # "ntp": ask ntp_servers; "system": trust the host's NTP daemon once it is synchronised
    ntp_servers: list[str] = field(default_factory=lambda: ["time.aws.com"])
    max_skew_s: float = 5.0
    query_timeout_s: float = 2.0
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    max_wait_s: float = 0.0  # 0 waits for ever (a device without time must not connect)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    """The shared sections as fields; each capability's sections in `sections`, by TOML name.

    `cfg.ota` reads `cfg.sections["ota"]`: a capability reads its own section by name, and no code here
    needs to know which capabilities exist."""

    broker: BrokerConfig
    pkcs11: Pkcs11Config
    device: DeviceConfig = field(default_factory=DeviceConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sections: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None  # where it was read from; not a TOML key
    # The parsed TOML it was built from: a configuration shadow's overlay is merged into this and parsed
    # again (agent.runtime.remote_config), so the file and the overlay pass the same validation.
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"config has no section [{name}]")

    def resolve(self, p: Path) -> Path:
        """Relative paths in the file are relative to the file's folder, as a reader would expect."""
        if p.is_absolute() or self.path is None:
            return p
        return self.path.parent / p


@dataclass(frozen=True)
class Bound:
    """The inclusive range a number in the config must lie in (every number must also be finite)."""

    lo: float
    hi: float
    unit: str = ""
    hint: str = "set a value in that range"
    what: str = "is out of range"

    def range_text(self) -> str:
        """As the README shows it after each key: `5-1200`."""
        return f"{_num(self.lo)}-{_num(self.hi)}"

    def text(self) -> str:
        """The range with its unit: `5-1200 s`."""
        return self.range_text() + (f" {self.unit}" if self.unit else "")

    def problem(self, key: str, value: float) -> str | None:
        if self.lo <= value <= self.hi:
            return None
        return f"{key}: {_num(value)} {self.what} ({self.text()}); {self.hint}"


Problems = Callable[[Mapping[str, Any]], list[str]]


@dataclass(frozen=True)
class Section:
    """One TOML section a capability owns: its dataclass, the Bound of each number (every int and float
    field of it and of the tables inside it has an entry, or None for "any finite number"; a test enforces
    it), the allowed values of its string choices, and its cross-field checks, run once every section
    has parsed (they get the built sections by name). `files` checks the files it names (cheap; run
    before `run` and the other commands)."""

    name: str
    cls: type
    bounds: Mapping[type, Mapping[str, Bound | None]] = field(default_factory=dict)
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    problems: Problems | None = None
    files: Callable[[Config], list[str]] | None = None
    required: bool = False  # a required section is checked even when absent, so each missing key is named


DAY = 86400
WEEK = 7 * DAY
GIB = 1024**3


def _num(x: float) -> str:
    """A number as a person writes it: 5, 0.1, 2147483648 (never 2.14748e+09, never thousands of digits)."""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x) if abs(x) < 10**30 else f"{'a negative' if x < 0 else 'an'} integer of {_digits(x)} digits"
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def _digits(x: int) -> int:
    return int(math.log10(abs(x))) + 1 if x else 1


def _type_name(tp: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return str(tp)


def _convert(
    value: Any, tp: Any, key: str, problems: list[str], bound: Bound | None = None, schema: _Schema | None = None
) -> Any:
    """Convert a TOML value to the field type, or record one problem and return None.

    Every number must be finite, and within `bound` when given (for a table or list of numbers: each one)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner[0], key, problems, bound, schema)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if isinstance(val_tp, type) and dataclasses.is_dataclass(val_tp):  # a table of sections
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a table of tables, got {_describe(value)}")
                return None
            assert schema is not None
            return {k: _section(val_tp, v, f"{key}.{toml_key(k)}", problems, schema) for k, v in value.items()}
        if not isinstance(value, dict):
            problems.append(
                f"{key}: expected a table of {_type_name(val_tp).split(' ', 1)[1]}s, got {_describe(value)}"
            )
            return None
        return {k: _convert(v, val_tp, f"{key}.{toml_key(k)}", problems, bound, schema) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
            return None
        out = [_convert(v, item_tp, f"{key}[{i}]", problems, bound, schema) for i, v in enumerate(value)]
        return out
    ok = {
        str: isinstance(value, str),
        Path: isinstance(value, str) and value != "" and "\0" not in value,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(tp)
    if not ok:
        problems.append(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        return None
    if tp is Path:
        return Path(value)
    if tp in (int, float):
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite and tp is float:
            what = f"set a value in {bound.text()}" if bound else "set a finite number"
            problems.append(f"{key}: {_num(value)} is not a finite number; {what} (inf and nan are not allowed)")
            return None
        problem = bound.problem(key, value) if bound else None
        if problem:
            problems.append(problem)
            return None
        return float(value) if tp is float else value
    return value


def toml_key(k: str) -> str:
    """A TOML key as the one-line messages show it: bare, or quoted with escapes (a key may hold a newline)."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _describe(value: Any) -> str:
    kind = {str: "string", bool: "boolean", int: "integer", float: "number", list: "list", dict: "table"}
    if isinstance(value, int) and not isinstance(value, bool):
        text = _num(value)  # never thousands of digits
    else:
        text = repr(value) if not isinstance(value, (dict, list)) else ""
    return f"{kind.get(type(value), type(value).__name__)} {text}".strip()


def _section(cls: type, table: Any, name: str, problems: list[str], schema: _Schema) -> Any:
    if not isinstance(table, dict):
        problems.append(f"[{name}]: expected a table, got {_describe(table)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"{name}.{toml_key(key)}: unknown key (known keys in [{name}]: {known})")
    kwargs: dict[str, Any] = {}
    for fname, f in fields.items():
        key = f"{name}.{fname}"
        if fname in table:
            value = _convert(table[fname], hints[fname], key, problems, schema.bounds.get(cls, {}).get(fname), schema)
            choices = schema.choices.get((name, fname))
            if value is not None and choices and value not in choices:
                problems.append(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
            kwargs[fname] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: required but missing; add `{fname} = ...` under [{name}]")
    if any(v is None and not _optional(hints[k]) for k, v in kwargs.items()):
        return None
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing: already reported
        return None


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


@dataclass
class _Schema:
    """Every section's bounds and choices, merged for one parse."""

    bounds: dict[type, Mapping[str, Bound | None]]
    choices: dict[tuple[str, str], tuple[str, ...]]


def parse(data: dict[str, Any], path: Path | None = None, sections: Sequence[Section] = ()) -> Config:
    """Build a Config from parsed TOML with the shared sections and `sections` (the capabilities');
    raises ConfigError listing every problem, one line each."""
    specs = list(SHARED) + list(sections)
    schema = _Schema(
        {c: b for s in specs for c, b in s.bounds.items()},
        {(s.name, k): v for s in specs for k, v in s.choices.items()},
    )
    problems: list[str] = []
    known = {s.name: s for s in specs}
    for key in data:
        if key not in known:
            problems.append(f"[{toml_key(key)}]: unknown section (known: {', '.join(sorted(known))})")
    built: dict[str, Any] = {}
    for s in specs:
        if s.name in data or s.required:
            built[s.name] = _section(s.cls, data.get(s.name, {}), s.name, problems, schema)
        else:
            built[s.name] = s.cls()
    if not problems:
        for s in specs:
            if s.problems:
                problems.extend(s.problems(built))
    if problems:
        where = f"{path}: " if path else ""
        raise ConfigError([where + p for p in problems])
    shared = {s.name for s in SHARED}
    return Config(
        **{k: v for k, v in built.items() if k in shared},
        sections={k: v for k, v in built.items() if k not in shared},
        path=path,
        data=data,
    )


def order(c: Mapping[str, Any], section: str, lo_key: str, hi_key: str) -> list[str]:
    """A (min, max) pair of a section in order, or the one line saying which to change."""
    lo, hi = getattr(c[section], lo_key), getattr(c[section], hi_key)
    if lo <= hi:
        return []
    return [
        f"{section}.{hi_key}: {_num(hi)} is below {section}.{lo_key} ({_num(lo)}); raise {hi_key} or lower {lo_key}"
    ]


def split_server(s: str) -> tuple[str, int]:
    """'host', 'host:port' or '[v6]:port' -> (host, port)."""
    host, port = s, 123
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"{s!r}: unclosed '['")
        host, rest = s[1:end], s[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{s!r}: expected ':port' after ']'")
            port = _port(rest[1:], s)
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = _port(p, s)
    if not host:
        raise ValueError(f"{s!r}: empty host")
    return host, port


def _port(p: str, s: str) -> int:
    if not p.isdigit() or not 1 <= int(p) <= 65535:
        raise ValueError(f"{s!r}: port must be 1-65535")
    return int(p)


def load(path: Path | str | None = None, sections: Sequence[Section] = ()) -> Config:
    """Read and parse the config file; every failure is a ConfigError with one line per problem."""
    p = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            [f"{p}: config file not found; create it (see README, 'Configuration') or pass --config PATH"]
        ) from None
    except IsADirectoryError:
        raise ConfigError([f"{p}: is a directory, not a config file; pass --config PATH to the file"]) from None
    except PermissionError:
        raise ConfigError([f"{p}: cannot read the config file (permission denied); check its owner and mode"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not UTF-8 text; save the config as UTF-8 TOML"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{p}: TOML syntax error: {e}; fix the line named"]) from None
    except ValueError:  # an integer of thousands of digits (Python's int conversion limit)
        raise ConfigError(
            [f"{p}: TOML value too long to read (an integer of thousands of digits); fix the number"]
        ) from None
    except RecursionError:
        raise ConfigError([f"{p}: TOML arrays or tables nested too deeply to read; no key needs that"]) from None
    return parse(data, p.resolve(), sections)


def _shared_problems(c: Mapping[str, Any]) -> list[str]:
    out = order(c, "broker", "reconnect_min_s", "reconnect_max_s")
    out += order(c, "broker", "refused_retry_min_s", "refused_retry_max_s")
    k: ClockConfig = c["clock"]
    if k.source == "ntp" and not k.ntp_servers:
        out.append('clock.ntp_servers: empty; list at least one server or set clock.source = "system"')
    for s in k.ntp_servers:
        try:
            split_server(s)
        except ValueError as e:
            out.append(f"clock.ntp_servers: {e}")
    out += order(c, "clock", "retry_min_s", "retry_max_s")
    p: Pkcs11Config = c["pkcs11"]
    if not 1 <= len(p.token_label.encode()) <= 32:
        out.append(f"pkcs11.token_label: {p.token_label!r} must be 1-32 bytes (PKCS#11 token labels are 32 bytes)")
    if not p.key_label:
        out.append("pkcs11.key_label: must not be empty")
    return out


def _shared_files(cfg: Config) -> list[str]:
    out = []
    ca = cfg.resolve(cfg.broker.ca_file)
    problem = certificate_file_problem(ca)
    if problem == MISSING_FILE:
        out.append(f"broker.ca_file: {ca} does not exist; download the root CA (AmazonRootCA1.pem) to that path")
    elif problem:
        out.append(f"broker.ca_file: {ca} {problem}; download the root CA (AmazonRootCA1.pem) again to that path")
    lib = cfg.resolve(cfg.pkcs11.library)
    if not lib.is_file():
        out.append(f"pkcs11.library: {lib} does not exist; install the PKCS#11 module (softhsm2 or libtpm2-pkcs11-1)")
    import os

    sd = cfg.resolve(cfg.device.state_dir)
    if sd.exists() and not os.access(sd, os.W_OK | os.X_OK):
        out.append(f"device.state_dir: {sd} is not writable by this user; fix its owner or mode")
    return out


SHARED: tuple[Section, ...] = (
    Section(
        "broker",
        BrokerConfig,
        required=True,
        problems=_shared_problems,
        files=_shared_files,
        bounds={
            BrokerConfig: {
                "port": Bound(1, 65535, what="is not a TCP port"),
                "keepalive_s": Bound(5, 1200, "s", "AWS IoT allows 30-1200 s (5 is for tests)"),
                "connect_timeout_s": Bound(1, 600, "s"),
                "reconnect_min_s": Bound(0.1, 3600, "s"),
                "reconnect_max_s": Bound(0.1, DAY, "s"),
                "reconnect_reset_after_s": Bound(0, DAY, "s"),
                "refused_after": Bound(1, 100),
                "refused_retry_min_s": Bound(1, DAY, "s"),
                "refused_retry_max_s": Bound(1, DAY, "s"),
            }
        },
    ),
    Section("pkcs11", Pkcs11Config, required=True),
    Section("device", DeviceConfig),
    Section(
        "clock",
        ClockConfig,
        choices={"source": ("ntp", "system")},
        bounds={
            ClockConfig: {
                "max_skew_s": Bound(0.1, 3600, "s"),
                "query_timeout_s": Bound(0.1, 60, "s"),
                "retry_min_s": Bound(0.1, 3600, "s"),
                "retry_max_s": Bound(0.1, 3600, "s"),
                "max_wait_s": Bound(0, DAY, "s", "0 waits for ever; else at most a day"),
            }
        },
    ),
    Section("log", LogConfig, choices={"level": ("debug", "info", "warning", "error")}),
)
