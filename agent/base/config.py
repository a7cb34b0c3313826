"""Configuration: TOML in, frozen dataclasses out, every problem reported in one line each.

The dataclasses below are the single source of truth for the configuration format: the loader walks
their fields and type hints, so a new option needs only a new field (with a default, or it becomes
required). Secrets never live here: the PKCS#11 PIN is read from a file (see `agent.pin`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import json
import math
import os
import re
import stat
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base.errors import ConfigError

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


@dataclass(frozen=True)
class Pkcs11Config:
    """Which PKCS#11 module and token hold the device's keys."""

    library: Path = REQUIRED
    token_label: str = REQUIRED
    key_label: str = "device"
    # Used only when $CREDENTIALS_DIRECTORY/pkcs11-pin (the systemd credential) is absent.
    pin_file: Path | None = None


@dataclass(frozen=True)
class IdentityConfig:
    """How the device gets its identity, and its certificate (public; its key is on the token).

    mode: "claim" (fleet provisioning from a claim certificate; sets provisioning.enabled), "jitp" (a
    certificate the manufacturer's CA issued at the factory, registered by AWS on first contact),
    "preprovisioned" (a certificate already registered). Empty: "claim" if provisioning.enabled, else
    "preprovisioned"."""

    mode: str = ""
    certificate_file: Path | None = None
    jitp_first_refusals: int = 6  # JITP drops the first connection(s) while it registers: not a revocation


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
class ProvisioningConfig:
    """Fleet provisioning by claim: used only while the device has no identity of its own."""

    enabled: bool = False  # true on a factory-fresh device that provisions itself
    template_name: str = "iot-agent-fleet"
    claim_certificate: Path = Path("claim.pem")  # public; its key is on the token (relative: in state_dir)
    claim_key_label: str = "claim"
    serial_number: str = ""  # as recorded by the factory step when empty
    parameters: dict[str, str] = field(default_factory=dict)  # extra template parameters
    delete_claim_key: bool = False  # remove the claim key from the token once provisioned
    retry_min_s: float = 30.0  # after a rejection: bounded, jittered backoff
    retry_max_s: float = 3600.0


@dataclass(frozen=True)
class DefenderConfig:
    """Device Defender device-side metrics."""

    enabled: bool = True
    interval_s: float = 300.0  # AWS throttles more than one report per 300 s
    testing_allow_short_interval: bool = False  # lets tests go below 300 s; never on a real device
    format: str = "json"  # or "cbor"
    names: str = "long"  # or "short"
    max_list: int = 50  # list entries per metric; `total` keeps the full count
    custom_number: dict[str, float] = field(default_factory=dict)
    custom_number_list: dict[str, list[float]] = field(default_factory=dict)
    custom_string_list: dict[str, list[str]] = field(default_factory=dict)
    custom_ip_list: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class RotationConfig:
    """Certificate rotation: a new key on the token and a new certificate, proven before the old is dropped."""

    enabled: bool = True  # automatic rotation by expiry window and age (jobs and `iot-agent rotate` always work)
    expiry_window_days: float = 30.0
    max_age_days: float = 90.0  # AWS's guidance: rotate device credentials regularly
    check_interval_s: float = 86400.0  # also checked at every start
    template_name: str = "iot-agent-rotation"  # provisioning template that attaches the new certificate
    prove_timeout_s: float = 60.0  # the new certificate must connect within this, or the old one is kept
    retry_min_s: float = 300.0
    retry_max_s: float = 86400.0


@dataclass(frozen=True)
class JobsConfig:
    """AWS IoT Jobs: the agent takes the next pending job on connect and on notify-next."""

    enabled: bool = True


@dataclass(frozen=True)
class InventoryConfig:
    """What the device runs, reported into a named shadow (fleet indexing and dynamic groups query it)."""

    enabled: bool = True
    shadow_name: str = "inventory"


@dataclass(frozen=True)
class OtaTargetConfig:
    """Something the agent may update: its releases live in `directory` (releases/, current, previous, broken)."""

    directory: Path = REQUIRED
    unpack: bool = True  # the artifact is a tar archive extracted into the release; false: one file, kept as is
    health_command: list[str] = field(default_factory=list)  # run in the new release; exit 0 means healthy
    health_timeout_s: float = 60.0
    self_update: bool = False  # this target is the agent itself: restart into it, confirm after reconnecting
    afr_ota_filepath: str = ""  # afr_ota documents whose file has this filepath install here
    # Installed by the root helper iot-agent-install (which re-verifies everything) instead of the agent:
    # for directories the unprivileged agent must not write. Its health check is the helper's.
    privileged: bool = False


@dataclass(frozen=True)
class OtaConfig:
    """Signed updates. Nothing is installed unless it verifies against the pinned code-signing certificate."""

    code_signing_certificate: Path | None = None  # required when any target is declared
    ca_file: Path | None = None  # CA for HTTPS downloads; the system's trust store when unset
    max_artifact_bytes: int = 512 * 1024 * 1024
    insecure_allow_downgrade: bool = False  # lets an older version replace a newer one (re-opens fixed holes)
    # Legacy documents (schema 1, afr_ota) sign the artifact only: without VERSION and TARGET files inside a
    # signed tar, nothing binds what it installs as. True trusts the document's labels instead: a relabelled
    # old release can then install as "newer" (a downgrade) or into another target.
    insecure_trust_version_labels: bool = False
    download_attempts: int = 5  # per job, per agent run; a partial download resumes where it stopped
    self_update_deadline_s: float = 300.0  # the new agent must reconnect and confirm within this, or rolls back
    privileged_timeout_s: float = 600.0  # how long to wait for iot-agent-install to answer a request
    targets: dict[str, OtaTargetConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    broker: BrokerConfig
    pkcs11: Pkcs11Config
    device: DeviceConfig = field(default_factory=DeviceConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    defender: DefenderConfig = field(default_factory=DefenderConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    log: LogConfig = field(default_factory=LogConfig)
    path: Path | None = None  # where it was read from; not a TOML key

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


DAY = 86400
WEEK = 7 * DAY
GIB = 1024 ** 3
# Every int and float field of every config dataclass, and every field holding numbers, has an entry (a test
# enforces it): its Bound, or None for "any finite number" (your own metric values). Inf and nan are refused for
# all of them when the value is converted. Relations between fields (min <= max) are checked after.
BOUNDS: dict[type, dict[str, Bound | None]] = {
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
    },
    IdentityConfig: {"jitp_first_refusals": Bound(0, 100)},
    ClockConfig: {
        "max_skew_s": Bound(0.1, 3600, "s"),
        "query_timeout_s": Bound(0.1, 60, "s"),
        "retry_min_s": Bound(0.1, 3600, "s"),
        "retry_max_s": Bound(0.1, 3600, "s"),
        "max_wait_s": Bound(0, DAY, "s", "0 waits for ever; else at most a day"),
    },
    ProvisioningConfig: {"retry_min_s": Bound(0.1, DAY, "s"), "retry_max_s": Bound(0.1, DAY, "s")},
    DefenderConfig: {
        "interval_s": Bound(1, DAY, "s"),
        "max_list": Bound(1, 1000),
        "custom_number": None,
        "custom_number_list": None,
    },
    RotationConfig: {
        "expiry_window_days": Bound(0, 3650, "days"),
        "max_age_days": Bound(1, 3650, "days"),
        "check_interval_s": Bound(1, WEEK, "s"),
        "prove_timeout_s": Bound(1, 3600, "s"),
        "retry_min_s": Bound(1, DAY, "s"),
        "retry_max_s": Bound(1, WEEK, "s"),
    },
    OtaConfig: {
        "max_artifact_bytes": Bound(1, 2 * GIB, "bytes"),
        "download_attempts": Bound(1, 100),
        "self_update_deadline_s": Bound(10, 3600, "s"),
        "privileged_timeout_s": Bound(1, 3600, "s"),
    },
    OtaTargetConfig: {"health_timeout_s": Bound(1, 3600, "s")},
}


def _num(x: float) -> str:
    """A number as a person writes it: 5, 0.1, 2147483648 (never 2.14748e+09, never thousands of digits)."""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x) if abs(x) < 10 ** 30 else f"{'a negative' if x < 0 else 'an'} integer of {_digits(x)} digits"
    if math.isfinite(x) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def _digits(x: int) -> int:
    return int(math.log10(abs(x))) + 1 if x else 1


_NOT_KEYS = {"path"}
_CHOICES = {
    ("clock", "source"): ("ntp", "system"),
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("defender", "format"): ("json", "cbor"),
    ("defender", "names"): ("long", "short"),
}


def _type_name(tp: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return str(tp)


def _convert(value: Any, tp: Any, key: str, problems: list[str], bound: Bound | None = None) -> Any:
    """Convert a TOML value to the field type, or record one problem and return None.

    Every number must be finite, and within `bound` when given (for a table or list of numbers: each one)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner[0], key, problems, bound)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if dataclasses.is_dataclass(val_tp):
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a table of tables, got {_describe(value)}")
                return None
            return {k: _section(val_tp, v, f"{key}.{_key(k)}", problems) for k, v in value.items()}
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a table of {_type_name(val_tp).split(' ', 1)[1]}s, got {_describe(value)}")
            return None
        return {k: _convert(v, val_tp, f"{key}.{_key(k)}", problems, bound) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
            return None
        out = [_convert(v, item_tp, f"{key}[{i}]", problems, bound) for i, v in enumerate(value)]
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


def _key(k: str) -> str:
    """A TOML key as the one-line messages show it: bare, or quoted with escapes (a key may hold a newline)."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _describe(value: Any) -> str:
    kind = {str: "string", bool: "boolean", int: "integer", float: "number", list: "list", dict: "table"}
    if isinstance(value, int) and not isinstance(value, bool):
        text = _num(value)  # never thousands of digits
    else:
        text = repr(value) if not isinstance(value, (dict, list)) else ""
    return f"{kind.get(type(value), type(value).__name__)} {text}".strip()


def _section(cls: type, table: Any, name: str, problems: list[str]) -> Any:
    if not isinstance(table, dict):
        problems.append(f"[{name}]: expected a table, got {_describe(table)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"{name}.{_key(key)}: unknown key (known keys in [{name}]: {known})")
    kwargs: dict[str, Any] = {}
    for fname, f in fields.items():
        key = f"{name}.{fname}"
        if fname in table:
            value = _convert(table[fname], hints[fname], key, problems, BOUNDS.get(cls, {}).get(fname))
            choices = _CHOICES.get((name, fname))
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


def parse(data: dict[str, Any], path: Path | None = None) -> Config:
    """Build a Config from parsed TOML; raises ConfigError listing every problem."""
    problems: list[str] = []
    hints = typing.get_type_hints(Config)
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name not in _NOT_KEYS}
    for key in data:
        if key not in sections:
            problems.append(f"[{_key(key)}]: unknown section (known: {', '.join(sorted(sections))})")
    built: dict[str, Any] = {}
    for name, f in sections.items():
        if name in data:
            built[name] = _section(hints[name], data[name], name, problems)
        elif f.default_factory is dataclasses.MISSING:
            # A required section still gets its fields checked so each missing key is named.
            built[name] = _section(hints[name], {}, name, problems)
        else:
            built[name] = f.default_factory()
    if not problems:
        problems.extend(_semantic_problems(built))
    if problems:
        where = f"{path}: " if path else ""
        raise ConfigError([where + p for p in problems])
    return Config(**built, path=path)


def _semantic_problems(c: dict[str, Any]) -> list[str]:
    out = []
    # Each number is within its Bound already (BOUNDS, checked at conversion); what is left are relations.
    b: BrokerConfig = c["broker"]
    out += _order(c, "broker", "reconnect_min_s", "reconnect_max_s")
    if c["identity"].mode not in ("", "claim", "jitp", "preprovisioned"):
        out.append(f"identity.mode: {c['identity'].mode!r} is not one of claim, jitp, preprovisioned")
    out += _order(c, "broker", "refused_retry_min_s", "refused_retry_max_s")
    k: ClockConfig = c["clock"]
    if k.source == "ntp" and not k.ntp_servers:
        out.append("clock.ntp_servers: empty; list at least one server or set clock.source = \"system\"")
    for s in k.ntp_servers:
        try:
            split_server(s)
        except ValueError as e:
            out.append(f"clock.ntp_servers: {e}")
    out += _order(c, "clock", "retry_min_s", "retry_max_s")
    pv: ProvisioningConfig = c["provisioning"]
    out += _order(c, "provisioning", "retry_min_s", "retry_max_s")
    if pv.enabled and pv.claim_key_label == c["pkcs11"].key_label:
        out.append("provisioning.claim_key_label: must differ from pkcs11.key_label (the device key)")
    d: DefenderConfig = c["defender"]
    if d.interval_s < 300 and not d.testing_allow_short_interval:
        out.append(f"defender.interval_s: {d.interval_s:g} is below AWS's 300 s minimum (reports would be throttled)")
    import ipaddress

    for name, ips in d.custom_ip_list.items():
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                out.append(f"defender.custom_ip_list.{name}: {ip!r} is not an IP address")
    out += _order(c, "rotation", "retry_min_s", "retry_max_s")
    o: OtaConfig = c["ota"]
    if o.targets and o.code_signing_certificate is None:
        out.append("ota.code_signing_certificate: required when update targets are declared (updates are "
                   "verified against it; nothing else is trusted)")
    for raw_name, t in o.targets.items():
        if t is None:
            continue
        name = _key(raw_name)
        if not NAME_RE.fullmatch(raw_name):  # not match(): "$" would accept a trailing newline
            out.append(f"ota.targets.{name}: target names are letters, digits, '.', '_' and '-'")
        if t.self_update and t.privileged:
            out.append(f"ota.targets.{name}: the agent itself is not a privileged target (it updates its own release)")
        if t.self_update and not t.unpack:
            out.append(f"ota.targets.{name}: a self-update target must be unpacked (a tar of the agent package)")
    if sum(1 for t in o.targets.values() if t and t.self_update) > 1:
        out.append("ota.targets: at most one target can be the agent itself (self_update = true)")
    p: Pkcs11Config = c["pkcs11"]
    if not 1 <= len(p.token_label.encode()) <= 32:
        out.append(f"pkcs11.token_label: {p.token_label!r} must be 1-32 bytes (PKCS#11 token labels are 32 bytes)")
    if not p.key_label:
        out.append("pkcs11.key_label: must not be empty")
    return out


def _order(c: dict[str, Any], section: str, lo_key: str, hi_key: str) -> list[str]:
    """A (min, max) pair of a section in order, or the one line saying which to change."""
    lo, hi = getattr(c[section], lo_key), getattr(c[section], hi_key)
    if lo <= hi:
        return []
    return [f"{section}.{hi_key}: {_num(hi)} is below {section}.{lo_key} ({_num(lo)}); raise {hi_key} or lower {lo_key}"]


def split_server(s: str) -> tuple[str, int]:
    """'host', 'host:port' or '[v6]:port' -> (host, port)."""
    host, port = s, 123
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"{s!r}: unclosed '['")
        host, rest = s[1:end], s[end + 1:]
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


def load(path: Path | str | None = None) -> Config:
    """Read and parse the config file; every failure is a ConfigError with one line per problem."""
    p = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{p}: config file not found; create it (see README, 'Configuration') or pass --config PATH"])
    except IsADirectoryError:
        raise ConfigError([f"{p}: is a directory, not a config file; pass --config PATH to the file"])
    except PermissionError:
        raise ConfigError([f"{p}: cannot read the config file (permission denied); check its owner and mode"])
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not UTF-8 text; save the config as UTF-8 TOML"])
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{p}: TOML syntax error: {e}; fix the line named"])
    except ValueError:  # an integer of thousands of digits (Python's int conversion limit)
        raise ConfigError([f"{p}: TOML value too long to read (an integer of thousands of digits); fix the number"])
    except RecursionError:
        raise ConfigError([f"{p}: TOML arrays or tables nested too deeply to read; no key needs that"])
    return parse(data, p.resolve())


def check_files(cfg: Config) -> list[str]:
    """Problems with the files the config names (existence, readability; the CA files must be PEM bundles of
    certificates that parse), one line each. Cheap and light: also run before `run` and the other commands."""
    out = []
    ca = cfg.resolve(cfg.broker.ca_file)
    problem = certificate_file_problem(ca)
    if problem == MISSING_FILE:
        out.append(f"broker.ca_file: {ca} does not exist; download the root CA (AmazonRootCA1.pem) to that path")
    elif problem:
        out.append(f"broker.ca_file: {ca} {problem}; download the root CA (AmazonRootCA1.pem) again to that path")
    if cfg.ota.ca_file is not None:
        oca = cfg.resolve(cfg.ota.ca_file)
        problem = certificate_file_problem(oca)
        if problem:
            out.append(f"ota.ca_file: {oca} {problem}; point it at the PEM CA bundle of your download host, or "
                       "remove it to use the system's trust store")
    lib = cfg.resolve(cfg.pkcs11.library)
    if not lib.is_file():
        out.append(f"pkcs11.library: {lib} does not exist; install the PKCS#11 module (softhsm2 or libtpm2-pkcs11-1)")
    cert = cfg.identity.certificate_file
    if cert is not None and not cfg.resolve(cert).is_file():
        out.append(f"identity.certificate_file: {cfg.resolve(cert)} does not exist; provision the device first")
    if cfg.ota.code_signing_certificate is not None:
        cs = cfg.resolve(cfg.ota.code_signing_certificate)
        if not cs.is_file():
            out.append(f"ota.code_signing_certificate: {cs} does not exist; install the code-signing certificate "
                       "that signs your updates")
    sd = cfg.resolve(cfg.device.state_dir)
    if sd.exists() and not os.access(sd, os.W_OK | os.X_OK):
        out.append(f"device.state_dir: {sd} is not writable by this user; fix its owner or mode")
    return out


MAX_CERTIFICATE_FILE_BYTES = 4 * 1024 * 1024  # a whole system CA bundle is about 200 KB
MISSING_FILE = "does not exist"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----(.*?)-----END ([A-Z0-9 ]{1,40})-----", re.S)
_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}


def read_regular_file(path: Path, limit: int) -> bytes:
    """A small file's bytes, read without ever blocking: opened O_NONBLOCK and checked with fstat before any
    read, so a FIFO, device or socket where a file is expected is refused instead of hanging the reader.
    Raises FileNotFoundError, or ValueError whose text follows the path: "is a FIFO, not a regular file"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket (or a FIFO opened for writing elsewhere)
            raise ValueError("is not a regular file")
        raise ValueError(f"cannot be read ({e.strerror})")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"is {_FILE_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, not a regular file")
        if st.st_size > limit:
            raise ValueError(f"is larger than {limit} bytes")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror})")
    finally:
        os.close(fd)
    if size > limit:
        raise ValueError(f"is larger than {limit} bytes")
    return b"".join(chunks)


def certificate_ders(data: bytes) -> list[bytes]:
    """The DER of each certificate in a PEM bundle that passes certificate_problem (first one first)."""
    return [base64.b64decode(b"".join(body.split())) for label, body, _ in _PEM_BLOCK.findall(data)
            if label == b"CERTIFICATE"]


def certificate_problem(data: bytes) -> str | None:
    """Why `data` is not a PEM bundle of one or more X.509 certificates (each must parse), or None; the
    reason follows the file's path in a message: "is not a PEM certificate (...)".

    Text between the blocks (a bundle's comments) is allowed; any other PEM block (a key) is not."""
    from agent.base.x509lite import subject_public_key_info, validity

    blocks = _PEM_BLOCK.findall(data)
    if data.count(b"-----BEGIN") != len(blocks):
        return "has a PEM block that is not closed (-----END CERTIFICATE----- missing)"
    if not blocks:
        return "is not a PEM certificate (no -----BEGIN CERTIFICATE----- block)"
    for i, (label, body, end) in enumerate(blocks, 1):
        which = f"PEM block {i} of {len(blocks)}" if len(blocks) > 1 else "a PEM block"
        if label != b"CERTIFICATE" or end != label:
            return f"has {which} labelled {label.decode()!r}, not CERTIFICATE (the file must hold certificates only)"
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            return f"has {which} that is not valid base64"
        if not _one_der_element(der) or validity(der) is None or subject_public_key_info(der) is None:
            return f"has {which} that is not an X.509 certificate"
    return None


def _one_der_element(der: bytes) -> bool:
    """A DER SEQUENCE that spans exactly these bytes (nothing missing, nothing after it)."""
    if len(der) < 2 or der[0] != 0x30:
        return False
    n, i = der[1], 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4 or len(der) < 2 + k:
            return False
        n, i = int.from_bytes(der[2:2 + k], "big"), 2 + k
    return i + n == len(der)


def certificate_file_problem(path: Path) -> str | None:
    """None for a readable PEM bundle of certificates, else what follows the path in a message: MISSING_FILE
    ("does not exist"), "is a FIFO, not a regular file", "is not a PEM certificate (...)", ..."""
    try:
        data = read_regular_file(path, MAX_CERTIFICATE_FILE_BYTES)
    except FileNotFoundError:
        return MISSING_FILE
    except ValueError as e:
        return str(e)
    return certificate_problem(data)


def identity_mode(cfg: Config) -> str:
    """claim, jitp or preprovisioned: identity.mode, or what the older provisioning.enabled switch meant."""
    if cfg.identity.mode:
        return cfg.identity.mode
    return "claim" if cfg.provisioning.enabled else "preprovisioned"
