"""A whole bench in one object: CA, broker, NTP, tokens and devices enrolled on them.

Tests (through fixtures) and the demo share this, so what the demo shows is what the tests check.
Device keys are generated on the token by the agent's own CLI in a separate process, the way a
factory or the provisioning flow does it; the CA then signs the CSR made on the token.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import pace, pki
from .broker import Broker
from .ntp import Chrony
from .tokens import Token


def agent_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "agent", "--config", str(config), *args]


def run_agent_cli(config: Path, token: Token, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        agent_cmd(config, *args), env=token.full_env(), capture_output=True, text=True, timeout=pace.scaled(timeout)
    )


@dataclass
class Device:
    thing_name: str
    token: Token
    config_path: Path
    cert_path: Path
    directory: Path

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return run_agent_cli(self.config_path, self.token, *args, timeout=timeout)


def write_config(
    path: Path,
    *,
    thing_name: str | None,
    broker: Broker | None = None,
    token: Token,
    cert_path: Path | None,
    ntp_servers: list[str],
    state_dir: Path,
    key_label: str = "device",
    extra: dict[str, dict] | None = None,
    port: int | None = None,
    ca_file: Path | None = None,
) -> Path:
    """An agent config for the bench or the local cloud (pass `broker`, or `port` and `ca_file`)."""
    port = broker.port if broker else port
    ca_file = broker.ca.cert_path if broker else ca_file
    device = {"state_dir": str(state_dir)}
    if thing_name:
        device["thing_name"] = thing_name
    sections: dict[str, dict] = {
        "device": device,
        "broker": {
            "endpoint": "localhost",
            "port": port,
            "ca_file": str(ca_file),
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 4.0,
            "connect_timeout_s": pace.scaled(5.0),
            "reconnect_reset_after_s": 1.0,
        },
        "pkcs11": {
            "library": token.library,
            "token_label": token.label,
            "key_label": key_label,
            "pin_file": str(token.pin_file()),
        },
        "identity": {"certificate_file": str(cert_path)} if cert_path else {},
        "clock": {
            "ntp_servers": ntp_servers,
            "max_skew_s": 5.0,
            "retry_min_s": 0.2,
            "retry_max_s": 2.0,
            "query_timeout_s": pace.scaled(1.0),
        },
    }
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    path.write_text(to_toml(sections))
    return path


def to_toml(sections: dict[str, dict]) -> str:
    """Enough TOML for flat sections of strings, numbers, booleans and string lists."""

    def val(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'

    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {val(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


@dataclass
class Bench:
    directory: Path
    ca: pki.CertificateAuthority = field(init=False)
    broker: Broker = field(init=False)
    chrony: Chrony | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = pki.CertificateAuthority(self.directory / "pki")
        server = self.ca.issue_server("server", ["localhost", "127.0.0.1"])
        self.broker = Broker(self.directory / "broker", self.ca, server)

    def start(self, ntp: bool = True) -> Bench:
        self.broker.start()
        if ntp:
            self.chrony = Chrony(self.directory / "chrony").start()
        return self

    def stop(self) -> None:
        self.broker.stop()
        if self.chrony:
            self.chrony.stop()

    def enroll(
        self,
        token: Token,
        thing_name: str,
        key_label: str = "device",
        ntp_servers: list[str] | None = None,
        extra: dict[str, dict] | None = None,
    ) -> Device:
        """Key on the token, CSR signed on the token, certificate from the CA, agent config."""
        d = self.directory / "devices" / thing_name
        d.mkdir(parents=True, exist_ok=True)
        servers = ntp_servers if ntp_servers is not None else ([self.chrony.server] if self.chrony else [])
        cfg = write_config(
            d / "config.toml",
            thing_name=thing_name,
            broker=self.broker,
            token=token,
            cert_path=None,
            ntp_servers=servers or ["127.0.0.1:1"],
            state_dir=d / "state",
            key_label=key_label,
            extra=extra,
        )
        r = run_agent_cli(cfg, token, "keys", "generate", key_label)
        if r.returncode != 0:
            raise RuntimeError(f"key generation failed: {r.stderr.strip()}")
        csr_path = d / "device.csr"
        r = run_agent_cli(cfg, token, "keys", "csr", key_label, "--cn", thing_name, "--out", str(csr_path))
        if r.returncode != 0:
            raise RuntimeError(f"CSR failed: {r.stderr.strip()}")
        cert = self.ca.sign_csr(csr_path.read_bytes(), thing_name)
        cert_path = d / "device.pem"
        cert_path.write_bytes(pki.pem(cert))
        write_config(
            cfg,
            thing_name=thing_name,
            broker=self.broker,
            token=token,
            cert_path=cert_path,
            ntp_servers=servers or ["127.0.0.1:1"],
            state_dir=d / "state",
            key_label=key_label,
            extra=extra,
        )
        return Device(thing_name, token, cfg, cert_path, d)


def fresh_device(
    cloud, token: Token, serial: str, directory: Path, ntp_servers: list[str], extra: dict[str, dict] | None = None
) -> Device:
    """A factory-fresh device for the local cloud: claim key on the token, claim certificate
    signed by the cloud's CA for the CSR made there, serial recorded; no identity yet."""
    directory.mkdir(parents=True, exist_ok=True)
    info = cloud.endpoint()
    prov = {"enabled": True, "retry_min_s": 0.5, "retry_max_s": 2.0}
    merged = {"provisioning": prov, **(extra or {})}
    if extra and "provisioning" in extra:
        merged["provisioning"] = {**prov, **extra["provisioning"]}
    cfg = write_config(
        directory / "config.toml",
        thing_name=None,
        token=token,
        cert_path=None,
        ntp_servers=ntp_servers,
        state_dir=directory / "state",
        port=info["port"],
        ca_file=Path(info["ca_file"]),
        extra=merged,
    )
    r = run_agent_cli(cfg, token, "factory", "init", "--serial", serial, "--csr-out", str(directory / "claim.csr"))
    if r.returncode != 0:
        raise RuntimeError(f"factory init failed: {r.stderr.strip()}")
    cloud.sign_claim_csr((directory / "claim.csr").read_bytes(), directory / "claim-signed.pem")
    r = run_agent_cli(cfg, token, "factory", "claim-cert", str(directory / "claim-signed.pem"))
    if r.returncode != 0:
        raise RuntimeError(f"factory claim-cert failed: {r.stderr.strip()}")
    return Device(serial, token, cfg, directory / "state" / "claim.pem", directory)


def local_publisher_config(socket: Path, app: str, **local_messaging: object) -> dict[str, dict]:
    """Config sections for a device whose local messaging serves one app, run by this user, publishing to
    dt/<thing>/#: what the local messaging benches and the fault campaign measure."""
    import os

    return {
        # The local broker has no per-connection publish limit; AWS IoT Core's (100/s) would make the agent pace
        # itself to it (broker.aws_iot_core_limits, on by default).
        "broker": {"aws_iot_core_limits": False},
        "local_messaging": {
            "enabled": True,
            "socket": str(socket),
            "apps": {app: {"user": str(os.getuid()), "publish": ["dt/${thing}/#"]}},
            **local_messaging,
        },
    }


def enrolled_device(
    cloud, token: Token, thing: str, directory: Path, ntp_servers: list[str], extra: dict[str, dict] | None = None
) -> Device:
    """A pre-provisioned device for the local cloud (identity.mode "preprovisioned"): key and CSR made
    on the token by the agent's CLI, certificate issued and attached to the thing by the cloud. For
    tests of what a device does once it has an identity, without paying for fleet provisioning."""
    directory.mkdir(parents=True, exist_ok=True)
    info = cloud.endpoint()
    common = dict(
        thing_name=thing,
        token=token,
        ntp_servers=ntp_servers,
        state_dir=directory / "state",
        port=info["port"],
        ca_file=Path(info["ca_file"]),
        extra=extra,
    )
    cfg = write_config(directory / "config.toml", cert_path=None, **common)
    csr = directory / "device.csr"
    r = run_agent_cli(cfg, token, "keys", "generate", "device", "--csr-out", str(csr), "--cn", thing)
    if r.returncode != 0:
        raise RuntimeError(f"key generation failed: {r.stderr.strip()}")
    cert_path = directory / "device.pem"
    cert_path.write_text(cloud.issue_device_certificate(csr.read_bytes(), thing))
    write_config(cfg, cert_path=cert_path, **common)
    return Device(thing, token, cfg, cert_path, directory)
