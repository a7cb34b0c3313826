"""A real OpenSSH server on a free loopback port, for the secure-tunneling tests.

sshd is the one scripts/sysdeps.sh unpacked into the project's sysroot (never installed as a service),
started by absolute path (sshd re-executes itself for every connection and refuses a relative one) and
stopped by PID. Everything it reads or writes lives in the test's directory: an ed25519 host key, the
client's key, authorized_keys, known_hosts, sshd_config, the PID file and the log. It listens on
127.0.0.1 only and accepts public keys only (no passwords, no keyboard-interactive, no PAM), for the
current user only.

What sshd needs outside that directory when started as root (the tests run as root):
- the privilege separation user `sshd`: OpenSSH 7.5 removed the option that turned privilege separation
  off, and no sshd_config option names another user. scripts/sysdeps.sh creates it (as openssh-server's
  postinst would), since that is a lasting change to the host;
- the directory /run/sshd (root's, not group or world writable), where each connection's unprivileged
  child is chrooted. It lives on a tmpfs and is what Debian's unit (RuntimeDirectory=sshd) creates:
  start() creates it when missing and leaves it there, empty, for other servers running side by side;
- /etc/passwd and /etc/shadow are read (UsePAM no: sshd checks the account itself, and refuses a
  locked one, i.e. a password field starting with "!"). A session that asks for a terminal (ssh -t)
  would be recorded in utmp/wtmp/lastlog like any login; the commands and scp used here get none.
Started as another user, sshd needs neither the user nor the directory, and can log in only that user.

The client side (ssh_args, scp_args) uses no user configuration, no agent and no global known_hosts:
the generated host key is pinned under a fixed alias (HostKeyAlias), so a tunnel's local port checks
the same key as sshd's own port.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import pace, procs

HOST = "127.0.0.1"
HOST_KEY_ALIAS = "localcloud-sshd"  # known_hosts pins the host key under this name, whatever the port
PRIVSEP_DIR = Path("/run/sshd")  # compiled into Debian's sshd (_PATH_PRIVSEP_CHROOT_DIR)


def current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass
class Sshd:
    directory: Path  # a temporary directory the test owns
    port: int = 0  # 0: a free loopback port, chosen by start()
    child: procs.Child | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def user(self) -> str:
        return current_user()

    @property
    def host_key(self) -> Path:
        return self.directory / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.directory / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    @property
    def config_path(self) -> Path:
        return self.directory / "sshd_config"

    @property
    def pid_path(self) -> Path:
        return self.directory / "sshd.pid"

    @property
    def log_path(self) -> Path:
        return self.directory / "sshd.log"

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def running(self) -> bool:
        return self.child is not None and self.child.running()

    def write_keys(self) -> None:
        """Host and client keys (kept across restarts, so known_hosts stays right), authorized_keys and
        the known_hosts line that pins the host key."""
        keygen = procs.find_binary("ssh-keygen")
        for key, comment in ((self.host_key, "localcloud sshd host"), (self.client_key, f"{self.user}@tests")):
            if not key.exists():
                subprocess.run(
                    [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                    check=True,
                    capture_output=True,
                    timeout=pace.scaled(30),
                )
        _write_private(self.authorized_keys, self.client_key.with_suffix(".pub").read_text())
        host_pub = self.host_key.with_suffix(".pub").read_text().split()
        _write_private(self.known_hosts, f"{HOST_KEY_ALIAS} {host_pub[0]} {host_pub[1]}\n")

    def write_config(self) -> None:
        lines = [
            "# Written by localcloud/sshd.py for one test: loopback only, public keys only.",
            f"ListenAddress {HOST}",  # the port comes from -p
            "AddressFamily inet",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_path}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "AuthorizedPrincipalsFile none",
            f"AllowUsers {self.user}",
            "AuthenticationMethods publickey",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "GSSAPIAuthentication no",
            "PermitEmptyPasswords no",
            "UsePAM no",
            # StrictModes checks every directory above authorized_keys up to / (it stops only at the
            # user's home), and pytest's tmp_path lies under the world-writable /tmp: "Authentication
            # refused: bad ownership or modes for directory /tmp". The test's directory is kept 0700
            # and the key files 0600 instead.
            "StrictModes no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "PermitTunnel no",
            "PermitUserRC no",
            "PermitUserEnvironment no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "Subsystem sftp internal-sftp",  # scp speaks sftp; no sftp-server binary needed
            "LogLevel VERBOSE",
        ]
        if os.geteuid() == 0:
            lines.append("PermitRootLogin prohibit-password")  # the tests run as root: keys only
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Sshd:
        if self.running():
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        if not self.port:
            self.port = procs.free_port()
        self.write_keys()
        self.write_config()
        _ensure_privsep_dir()
        sshd = os.path.abspath(procs.find_binary("sshd"))
        argv = [sshd, "-D", "-e", "-E", str(self.log_path), "-f", str(self.config_path), "-p", str(self.port)]
        self.child = procs.start("sshd", argv, self.log_path, cwd=self.directory)
        try:
            procs.wait_port(self.port, timeout, self.child.proc)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise RuntimeError(f"sshd did not start on {HOST}:{self.port}: {e}\n{self.log_tail()}") from e
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the listening sshd by PID (SIGTERM, then SIGKILL), and the per-connection sshd processes
        it forked, which outlive it otherwise; each wait is bounded."""
        if not self.child:
            return
        connections = _children(self.child.pid)
        self.child.stop(pace.scaled(timeout))
        for pid in connections:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = pace.deadline(timeout)
        while connections and time.monotonic() < deadline:
            connections = [p for p in connections if _alive(p)]
            time.sleep(0.05)
        for pid in connections:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.child = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _client_options(self) -> list[str]:
        opts = {
            "User": self.user,
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "HostKeyAlias": HOST_KEY_ALIAS,
            "CheckHostIP": "no",
            "UpdateHostKeys": "no",
            "ConnectTimeout": str(max(1, round(pace.scaled(10)))),
        }
        args = ["-F", "/dev/null", "-i", str(self.client_key)]
        for k, v in opts.items():
            args += ["-o", f"{k}={v}"]
        return args

    def ssh_args(self, port: int | None = None) -> list[str]:
        """ssh's options to log in as the current user at 127.0.0.1:`port` (default: sshd's own port; a
        tunnel's local listener works too, the host key is pinned whatever the port). The caller adds the
        host (self.host) and the command."""
        return [*self._client_options(), "-p", str(port or self.port)]

    def scp_args(self, port: int | None = None) -> list[str]:
        """The same for scp (its port option is -P); remote paths are written f"{self.host}:{path}"."""
        return [*self._client_options(), "-P", str(port or self.port)]


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def _ensure_privsep_dir() -> None:
    """sshd started as root chroots each connection's unprivileged child into /run/sshd and exits at
    once without it ("Missing privilege separation directory"). Debian's unit creates it at each start
    (it is on a tmpfs); with no unit here, create it the same way: root's, mode 0755."""
    if os.geteuid() != 0 or PRIVSEP_DIR.is_dir():
        return
    with contextlib.suppress(FileExistsError):  # another test's sshd created it meanwhile
        PRIVSEP_DIR.mkdir(mode=0o755)
    PRIVSEP_DIR.chmod(0o755)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (sshd's connections), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"
