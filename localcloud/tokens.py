"""PKCS#11 tokens for the bench: SoftHSM in a private folder, and a swtpm TPM with tpm2-pkcs11.

A `Token` carries the environment a process needs to see it (SOFTHSM2_CONF, or the TPM's TCTI and
the tpm2-pkcs11 store). See shared/reference/pkcs11-softhsm-tpm.md for why each step is here.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import pace, procs

SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"


def tpm2_pkcs11_lib() -> str:
    hits = glob.glob("/usr/lib/*/pkcs11/libtpm2_pkcs11.so") + glob.glob("/usr/lib/pkcs11/libtpm2_pkcs11.so")
    if not hits:
        raise FileNotFoundError("libtpm2_pkcs11.so not found; run scripts/sysdeps.sh (package libtpm2-pkcs11-1)")
    return hits[0]


def write_private(path: Path, text: str) -> Path:
    """Mode 0600 from the start, and replaced atomically: an agent reading it meanwhile never sees it empty."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


@dataclass
class Token:
    kind: str  # "softhsm" or "tpm"
    library: str
    label: str
    pin: str
    so_pin: str
    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    tpm: Swtpm | None = None

    def pin_file(self) -> Path:
        return write_private(self.directory / "pkcs11-pin", self.pin)

    def current_env(self) -> dict[str, str]:
        """The token's variables, with the TPM's TCTI as it is now (a restarted swtpm may have other ports)."""
        return {**self.env, **(self.tpm.env() if self.tpm else {})}

    def full_env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(self.current_env())
        return e

    def apply_env(self) -> None:
        """For in-process PKCS#11 use (awscrt reads these at C_Initialize)."""
        os.environ.update(self.current_env())

    def stop(self) -> None:
        if self.tpm:
            self.tpm.stop()


def softhsm_token(directory: Path, label: str = "iot-agent", pin: str = "1234", so_pin: str = "5678") -> Token:
    directory = Path(directory)
    tokdir = directory / "tokens"
    tokdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokdir}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    env = {"SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    return Token("softhsm", SOFTHSM_LIB, label, pin, so_pin, directory, env)


@dataclass
class Swtpm:
    """A software TPM 2.0 on loopback TCP; shut down with TPM2_Shutdown so it never locks out."""

    directory: Path
    port: int = 0
    child: procs.Child | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def env(self) -> dict[str, str]:
        return {
            "TPM2TOOLS_TCTI": self.tcti,
            "TPM2_PKCS11_TCTI": self.tcti,
            "TPM2_PKCS11_STORE": str(self.directory / "store"),
            "TPM2_PKCS11_LOG_LEVEL": "0",
            "TSS2_LOG": "all+NONE",
        }

    def start(self) -> Swtpm:
        state = self.directory / "state"
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.directory / "store").mkdir(exist_ok=True, mode=0o700)
        if not self.port:
            self.port = procs.free_port(pairs=True)
        log = self.directory / "swtpm.log"
        for attempt in range(4):
            argv = [
                procs.find_binary("swtpm"),
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={state}",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
            ]
            if os.environ.get("IOT_AGENT_SWTPM_SECCOMP") == "none":
                # Under qemu-user (scripts/check-arm64.sh) swtpm's seccomp filter cannot load (errno 125):
                # that check, and only it, runs the test TPM without one. Never the default.
                argv += ["--seccomp", "action=none"]
            seen = log.stat().st_size if log.exists() else 0
            self.child = procs.start("swtpm", argv, log)
            try:
                procs.wait_port(self.port + 1, 10, self.child.proc)
                # The TCTI talks to the server port, which swtpm may open after the control port: under
                # load a tool started in between could not "load" the TCTI (connection refused).
                procs.wait_port(self.port, 10, self.child.proc)
                break
            except RuntimeError:
                # A restart on the same ports can find one still held (swtpm binds without SO_REUSEADDR, so
                # a connection of the previous run in TIME_WAIT blocks it): take other ports. The TCTI is
                # read from env() at each use, so users of the token follow.
                with open(log, "rb") as f:
                    f.seek(seen)
                    busy = b"Address already in use" in f.read()
                if not busy or attempt == 3:
                    raise
                self.port = procs.free_port(pairs=True)
        # A crash without TPM2_Shutdown counts as a dictionary-attack failure; start from a clean slate.
        self.tools("tpm2_dictionarylockout", "-c")
        self.tools("tpm2_dictionarylockout", "-s", "-n", "1000", "-t", "1", "-l", "1")
        return self

    def tools(self, *argv: str) -> str:
        r = subprocess.run(
            list(argv), env={**os.environ, **self.env()}, capture_output=True, text=True, timeout=pace.scaled(30)
        )
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()[-300:]}")
        return r.stdout

    def transient_handles(self) -> list[str]:
        out = self.tools("tpm2_getcap", "handles-transient")
        return re.findall(r"0x[0-9a-fA-F]+", out)

    def stop(self) -> None:
        if self.child and self.child.running():
            with contextlib.suppress(Exception):
                self.tools("tpm2_shutdown", "-c")
        if self.child:
            self.child.stop()
            self.child = None


def tpm_token(directory: Path, label: str = "iot-agent", pin: str = "1234", so_pin: str = "5678") -> Token:
    directory = Path(directory)
    tpm = Swtpm(directory).start()
    lib = tpm2_pkcs11_lib()
    env = {**os.environ, **tpm.env()}
    tool = shutil.which("pkcs11-tool") or "pkcs11-tool"
    try:
        subprocess.run(
            [tool, "--module", lib, "--slot-index", "0", "--init-token", "--label", label, "--so-pin", so_pin],
            env=env,
            check=True,
            capture_output=True,
            timeout=pace.scaled(60),
        )
        subprocess.run(
            [
                tool,
                "--module",
                lib,
                "--token-label",
                label,
                "--login",
                "--login-type",
                "so",
                "--so-pin",
                so_pin,
                "--init-pin",
                "--pin",
                pin,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=pace.scaled(60),
        )
    except BaseException:
        tpm.stop()
        raise
    return Token("tpm", lib, label, pin, so_pin, directory, tpm.env(), tpm)
