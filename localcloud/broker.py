"""A real mosquitto broker with TLS, client certificates required and per-device ACLs.

Identity comes from the client certificate's CN (`use_identity_as_username`), like AWS IoT's
`${iot:Connection.Thing.ThingName}` policy variable once the certificate is attached to the thing.
Devices may use only their own topics; the `observer` identity may read everything (tests use it
to see what devices publish).
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import pace, procs
from .pki import CertificateAuthority, Issued

OBSERVER = "observer"

DEVICE_ACL = """\
# Devices: their own topics only (mirrors the device policy's ${iot:Connection.Thing.ThingName}).
pattern readwrite $aws/things/%u/#
pattern readwrite dt/%u/#
pattern readwrite cmd/%u/#

user observer
topic read #
topic read $aws/#
"""

_CONNECTED = re.compile(r"New client connected from (\S+) as (\S+) \(([^)]*)\)")


@dataclass
class Broker:
    directory: Path
    ca: CertificateAuthority
    server: Issued
    port: int = 0
    host: str = "127.0.0.1"
    acl: str = DEVICE_ACL
    child: procs.Child | None = None
    tls_version: str = "tlsv1.2"  # tests lower it to show the agent refuses old protocols
    extra_conf: list[str] = field(default_factory=list)

    @property
    def conf_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "acl").write_text(self.acl)
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            "persistence false",
            "set_tcp_nodelay true",  # request/reply round trips would otherwise wait on delayed ACKs
            f"listener {self.port} {self.host}",
            f"cafile {self.ca.cert_path}",
            f"certfile {self.server.cert_path}",
            f"keyfile {self.server.key_path}",
            "require_certificate true",
            "use_identity_as_username true",
            f"tls_version {self.tls_version}",
            f"acl_file {self.directory / 'acl'}",
            f"log_dest file {self.log_path}",
            "log_type all",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # the bench's files belong to root; there is no mosquitto user here
        lines += self.extra_conf
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Broker:
        if not self.port:
            self.port = procs.free_port()
        self.write_config()
        argv = [procs.find_binary("mosquitto"), "-c", str(self.conf_path)]
        self.child = procs.start("mosquitto", argv, self.log_path)
        procs.wait_port(self.port, timeout, self.child.proc)
        return self

    def stop(self) -> None:
        if self.child:
            self.child.stop()
            self.child = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def reload(self) -> None:
        """SIGHUP: mosquitto rereads ACLs and (from the local cloud) the CRL."""
        if self.child:
            os.kill(self.child.pid, signal.SIGHUP)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connected_clients(self) -> list[tuple[str, str]]:
        """(client_id, username) of every connection mosquitto accepted, from its log."""
        out = []
        for m in _CONNECTED.finditer(self.log_text()):
            user = re.search(r"u'([^']*)'", m.group(3))
            out.append((m.group(2), user.group(1) if user else ""))
        return out

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = pace.deadline(timeout)
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.log_text())
            if m:
                return m
            time.sleep(0.05)
        raise TimeoutError(f"mosquitto log never matched {pattern!r}")
