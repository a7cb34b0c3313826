"""The bench's real OpenSSH server (localcloud.sshd), which the secure-tunneling tests reach through a
tunnel: the real ssh and scp log in with the generated key, passwords are never offered, sshd listens
on 127.0.0.1 only, and stop() ends it by PID, open connections included."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from localcloud import pace, procs
from localcloud.sshd import Sshd


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path / "sshd").start()
    yield server
    server.stop()


def ssh(server: Sshd, *command: str, options: tuple[str, ...] = (), timeout: float = 30.0, **kw):
    """ssh to the server; `options` come first, so they win over ssh_args' (ssh keeps an option's first value)."""
    argv = [procs.find_binary("ssh"), *options, *server.ssh_args(), server.host, *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=pace.scaled(timeout), **kw)


def test_ssh_logs_in_with_the_generated_key_and_runs_a_command(sshd):
    r = ssh(sshd, "echo hello; uname -m")
    assert r.returncode == 0, r.stderr + sshd.log_tail()
    assert r.stdout.splitlines() == ["hello", platform.machine()]
    assert f"Accepted publickey for {sshd.user} from 127.0.0.1" in sshd.log_text()
    assert sshd.directory.stat().st_mode & 0o777 == 0o700
    assert int(sshd.pid_path.read_text()) == sshd.pid


def test_the_pinned_host_key_holds_on_another_port(sshd):
    """A tunnel's local listener forwards to sshd from another port: ssh_args(port) logs in through it
    with the same pinned host key (here a plain TCP relay stands in for the tunnel)."""
    with _Relay(sshd.port) as relay:
        argv = [procs.find_binary("ssh"), *sshd.ssh_args(relay.port), sshd.host, "echo through"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=pace.scaled(30))
    assert r.returncode == 0, r.stderr + sshd.log_tail()
    assert r.stdout == "through\n"
    assert relay.accepted == 1


def test_scp_copies_20_mb_intact(sshd, tmp_path):
    src = tmp_path / "client" / "blob.bin"
    src.parent.mkdir()
    with open(src, "wb") as f:
        for _ in range(20):
            f.write(os.urandom(1024 * 1024))
    dst = tmp_path / "server" / "blob.bin"
    dst.parent.mkdir()
    started = time.monotonic()
    r = subprocess.run(
        [procs.find_binary("scp"), "-q", *sshd.scp_args(), str(src), f"{sshd.host}:{dst}"],
        capture_output=True,
        text=True,
        timeout=pace.scaled(120),
    )
    assert r.returncode == 0, r.stderr + sshd.log_tail()
    assert dst.stat().st_size == 20 * 1024 * 1024
    assert _sha256(dst) == _sha256(src)
    print(f"scp: 20 MB in {time.monotonic() - started:.2f} s")


def test_passwords_are_never_offered(sshd, tmp_path):
    """A client that would send a password (askpass forced, public keys off) is told that only
    publickey can continue, and is never asked for one."""
    asked = tmp_path / "asked"
    askpass = tmp_path / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\ntouch {asked}\necho not-the-password\n")
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    r = ssh(
        sshd,
        "true",
        options=(
            "-v",
            "-o",
            "BatchMode=no",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "NumberOfPasswordPrompts=1",
        ),
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 255
    assert f"{sshd.user}@127.0.0.1: Permission denied (publickey)." in r.stderr
    methods = [line for line in r.stderr.splitlines() if "Authentications that can continue" in line]
    assert methods and all(line.endswith(": publickey") for line in methods), methods
    assert not asked.exists()
    assert "Accepted" not in sshd.log_text()


def test_a_key_not_in_authorized_keys_is_refused(sshd, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(
        [procs.find_binary("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
        check=True,
        capture_output=True,
        timeout=pace.scaled(30),
    )
    args = sshd.ssh_args()
    args[args.index("-i") + 1] = str(other)  # every -i given is tried: replace the bench's key
    r = subprocess.run(
        [procs.find_binary("ssh"), *args, sshd.host, "true"], capture_output=True, text=True, timeout=pace.scaled(30)
    )
    assert r.returncode == 255
    assert "Permission denied (publickey)" in r.stderr
    assert "Accepted" not in sshd.log_text()


def test_listens_on_127_0_0_1_only(sshd):
    listening = _listening(sshd.port)
    assert {addr for addr, _ in listening} == {"127.0.0.1"}, listening
    sshd_sockets = _socket_inodes(sshd.pid)
    assert {inode for _, inode in listening} <= sshd_sockets
    # 127.0.0.2 is loopback too, but not the address sshd bound
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", sshd.port), timeout=5):
        pass


def test_stop_ends_sshd_and_its_connections_by_pid(tmp_path):
    server = Sshd(tmp_path / "sshd").start()
    try:
        pid = server.pid
        session = subprocess.Popen(
            [procs.find_binary("ssh"), *server.ssh_args(), server.host, "echo up; exec sleep 600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert session.stdout.readline() == "up\n"
            connections = [p for p in _all_pids() if _ppid(p) == pid]
            assert connections, "no per-connection sshd under the listener"
            started = time.monotonic()
            server.stop()
            print(f"stop: {time.monotonic() - started:.2f} s")
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            assert session.wait(pace.scaled(15)) != 0  # the connection was cut
            assert not [p for p in connections if _running(p)]
        finally:
            if session.poll() is None:
                session.kill()
                session.wait()
        with pytest.raises(ConnectionRefusedError), socket.create_connection((server.host, server.port), timeout=5):
            pass
    finally:
        server.stop()


def test_start_fails_with_the_log_when_sshd_exits(tmp_path):
    server = Sshd(tmp_path / "sshd")
    server.port = procs.free_port()
    with socket.socket() as taken:  # bound, not listening: sshd cannot bind it, and nothing answers there
        taken.bind(("127.0.0.1", server.port))
        with pytest.raises(RuntimeError, match="Cannot bind any address"):
            server.start()
    assert server.child is None


# -- helpers --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _listening(port: int) -> list[tuple[str, int]]:
    """(local address, socket inode) of every TCP socket listening on `port`, IPv4 and IPv6."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                addr_hex, port_hex = fields[1].rsplit(":", 1)
                if int(port_hex, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(addr_hex)
                # /proc prints each 32-bit word in host order (little-endian here)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                out.append((socket.inet_ntop(family, words), int(fields[9])))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _stat_fields(pid: int) -> list[str]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def _ppid(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else 0


def _running(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


class _Relay:
    """A loopback TCP relay to `target`, one thread per direction, closed on exit."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.accepted = 0
        self.server = socket.create_server(("127.0.0.1", procs.free_port()))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> _Relay:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.thread.join(pace.scaled(5))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
