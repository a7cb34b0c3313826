"""The PKCS#11 user PIN: read from a file that only the agent can read, never from the config.

Under systemd the PIN arrives as a credential (`LoadCredential=pkcs11-pin:...`), which systemd
exposes in $CREDENTIALS_DIRECTORY with mode 0400 to this service alone. Elsewhere the config may
name a file. A file readable by group or others is refused rather than used: the PIN guards the
device identity, and a leaked PIN lets any local user sign as the device.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .config import Config
from .errors import SecretError

CREDENTIAL_NAME = "pkcs11-pin"
MAX_PIN_BYTES = 256


def pin_path(cfg: Config, environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        p = Path(creds) / CREDENTIAL_NAME
        if p.exists() or cfg.pkcs11.pin_file is None:
            return p
    if cfg.pkcs11.pin_file is not None:
        return cfg.resolve(cfg.pkcs11.pin_file)
    raise SecretError(
        "pkcs11 PIN: no PIN file; set pkcs11.pin_file in the config or run under systemd with "
        f"LoadCredential={CREDENTIAL_NAME}:PATH"
    )


def read_pin(cfg: Config, environ: dict[str, str] | None = None) -> str:
    """Return the PIN, after checking the file is private to this user."""
    p = pin_path(cfg, environ)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretError(f"{p}: PIN file not found; create it with mode 600 (umask 077; printf %s PIN > {p})")
    except PermissionError:
        raise SecretError(f"{p}: PIN file not readable by this user; make the agent's user its owner, mode 600")
    except OSError as e:
        if e.errno == 40:  # ELOOP: a symlink where a private file was expected
            raise SecretError(f"{p}: PIN file is a symbolic link; point the config at the real file")
        raise SecretError(f"{p}: cannot open the PIN file ({e.strerror})")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{p}: PIN file is not a regular file")
        if st.st_mode & 0o077:
            raise SecretError(
                f"{p}: PIN file mode {stat.S_IMODE(st.st_mode):04o} lets group or others read it; "
                f"run `chmod 600 {p}` (and change the PIN if others may have read it)"
            )
        raw = os.read(fd, MAX_PIN_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_PIN_BYTES:
        raise SecretError(f"{p}: PIN file is longer than {MAX_PIN_BYTES} bytes; it should hold the PIN only")
    try:
        pin = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise SecretError(f"{p}: PIN file is not UTF-8 text")
    if not pin:
        raise SecretError(f"{p}: PIN file is empty; write the token's user PIN into it")
    return pin
